//! The v2 metadata parsers' bounds-checked reader; it lives in
//! [`crate::codec::reader`] (the root record's parser there uses it too).

pub use crate::codec::reader::{BLOCK, Reader, is_block_padding};
