//! A volume as the attaching machine serves it: the NBD backend behind
//! `meshdisk attach` (the design is in [`v2`]: log-structured segments, a
//! block map inside the volume, one authenticated root).
//!
//! One writer: the volume's lease (`lease.rs`) is taken at attach, with a
//! note in the state folder so a crashed attach resumes its epoch; a writer
//! taken over is fenced (peers refuse its epoch) and fails writes with EIO.

mod error;
pub(crate) mod lease;
pub mod v2;

pub use error::VolumeError;
