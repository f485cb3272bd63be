//! What every layer above stands on: the one io_uring driver ([`uring`]),
//! recycled large buffers ([`pool`]), the clock ([`clock`]), the one
//! durable write ([`durable`]) and the shape of background work
//! ([`worker`]).

pub mod clock;
pub mod durable;
pub mod pool;
pub mod uring;
pub mod worker;
