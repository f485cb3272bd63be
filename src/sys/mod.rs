//! What every layer above stands on: the one io_uring driver ([`uring`]),
//! recycled large buffers ([`pool`]) and the clock ([`clock`]).

pub mod clock;
pub mod pool;
pub mod uring;
