//! Sequences and segment ids: 64-bit numbers whose order is (epoch, counter).
//!
//! ```text
//!  63            40 39                                   0
//! +----------------+--------------------------------------+
//! | epoch (24 bit) | counter (40 bit)                     |
//! +----------------+--------------------------------------+
//! ```
//!
//! The epoch is the write lease's fencing epoch, so every number a writer
//! with a newer epoch allocates is above every number an older (fenced)
//! writer ever allocated, without the two ever talking. Within one epoch the
//! counter starts above a *floor*: the highest number in the committed root
//! and in the local log, so a writer that resumes its epoch after a crash
//! never hands out a number twice. Counter 0 is never handed out, so
//! [`Sequence::ZERO`] (epoch 0, counter 0) sorts below every real write.
//!
//! ```
//! use meshdisk::codec::sequence::{Sequence, Sequencer};
//! let floor = Sequence::new(3, 41).unwrap(); // highest committed or logged
//! let mut seq: Sequencer<Sequence> = Sequencer::new(3, floor).unwrap();
//! assert_eq!(seq.next().unwrap(), Sequence::new(3, 42).unwrap());
//! // A newer epoch starts over at counter 1 and is above all of epoch 3.
//! let mut newer: Sequencer<Sequence> = Sequencer::new(4, floor).unwrap();
//! assert!(newer.next().unwrap() > Sequence::new(3, u64::from(u32::MAX)).unwrap());
//! ```

use std::fmt;
use std::marker::PhantomData;

/// Bits of the epoch (high part).
pub const EPOCH_BITS: u32 = 24;
/// Bits of the counter (low part).
pub const COUNTER_BITS: u32 = 40;
/// The highest epoch a sequence can carry: 2^24 - 1.
pub const MAX_EPOCH: u64 = (1 << EPOCH_BITS) - 1;
/// The highest counter within one epoch: 2^40 - 1.
pub const MAX_COUNTER: u64 = (1 << COUNTER_BITS) - 1;

/// Errors from making or allocating sequences and segment ids.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SequenceError {
    #[error(
        "epoch {0} does not fit in a sequence (epochs go up to {MAX_EPOCH}); this volume has used every epoch"
    )]
    EpochTooLarge(u64),
    #[error("counter {0} does not fit in a sequence (counters go up to {MAX_COUNTER})")]
    CounterTooLarge(u64),
    #[error(
        "writer epoch {epoch} is older than {kind} {floor} already committed or logged; a fenced writer may not allocate"
    )]
    EpochBelowFloor { kind: &'static str, epoch: u64, floor: String },
    #[error("epoch {epoch} has used all {MAX_COUNTER} {kind}s; re-attach to take a new epoch")]
    Exhausted { kind: &'static str, epoch: u64 },
}

/// A number laid out as (epoch:24 | counter:40). Implemented by
/// [`Sequence`] and [`SegmentId`], which share the allocator.
pub trait Ordinal: Copy + Ord + fmt::Display {
    /// What the number is called in error messages.
    const KIND: &'static str;
    fn from_raw(raw: u64) -> Self;
    fn raw(self) -> u64;
}

macro_rules! ordinal {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(u64);

        impl $name {
            /// Epoch 0, counter 0: below everything ever allocated.
            pub const ZERO: Self = Self(0);

            /// The number for (epoch, counter), refusing either out of range.
            pub fn new(epoch: u64, counter: u64) -> Result<Self, SequenceError> {
                if epoch > MAX_EPOCH {
                    return Err(SequenceError::EpochTooLarge(epoch));
                }
                if counter > MAX_COUNTER {
                    return Err(SequenceError::CounterTooLarge(counter));
                }
                Ok(Self(epoch << COUNTER_BITS | counter))
            }

            /// Every u64 is a valid number (its top 24 bits are the epoch).
            pub const fn from_raw(raw: u64) -> Self {
                Self(raw)
            }

            pub const fn raw(self) -> u64 {
                self.0
            }

            pub const fn epoch(self) -> u64 {
                self.0 >> COUNTER_BITS
            }

            pub const fn counter(self) -> u64 {
                self.0 & MAX_COUNTER
            }

            /// The number `n` counters later in the same epoch, if it fits.
            pub fn checked_add(self, n: u64) -> Option<Self> {
                let counter = self.counter().checked_add(n)?;
                // Checked too: a value parsed from outside input may carry
                // an epoch past MAX_EPOCH, its raw number near u64::MAX.
                let raw = self.0.checked_add(n)?;
                (counter <= MAX_COUNTER).then_some(Self(raw))
            }
        }

        impl Ordinal for $name {
            const KIND: &'static str = $kind;
            fn from_raw(raw: u64) -> Self {
                Self(raw)
            }
            fn raw(self) -> u64 {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}.{}", self.epoch(), self.counter())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self)
            }
        }
    };
}

ordinal!(
    /// The version of one block write (or trim): the highest sequence of a
    /// block wins everywhere, and (address, sequence) is the block's XTS
    /// tweak, so no two versions of a block share a tweak.
    Sequence,
    "sequence"
);

ordinal!(
    /// A segment's name, allocated like sequences and never reused.
    SegmentId,
    "segment id"
);

/// Hands out strictly increasing numbers for one writer epoch.
///
/// Not synchronised: the volume assigns sequences under the block's lock,
/// and wraps this in whatever lock that is.
#[derive(Clone, Debug)]
pub struct Sequencer<T: Ordinal> {
    epoch: u64,
    /// The last counter handed out (or the floor's, in the same epoch).
    last: u64,
    _kind: PhantomData<T>,
}

impl<T: Ordinal> Sequencer<T> {
    /// A sequencer for `epoch` whose numbers are all above `floor` (the
    /// highest committed or logged). Refuses an epoch that does not fit and
    /// an epoch older than the floor's (a fenced writer).
    pub fn new(epoch: u64, floor: T) -> Result<Self, SequenceError> {
        if epoch > MAX_EPOCH {
            return Err(SequenceError::EpochTooLarge(epoch));
        }
        let floor_epoch = floor.raw() >> COUNTER_BITS;
        if floor_epoch > epoch {
            return Err(SequenceError::EpochBelowFloor { kind: T::KIND, epoch, floor: floor.to_string() });
        }
        let last = if floor_epoch == epoch { floor.raw() & MAX_COUNTER } else { 0 };
        Ok(Self { epoch, last, _kind: PhantomData })
    }

    /// The writer epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The next number.
    #[allow(clippy::should_implement_trait)] // fallible, so not an Iterator
    pub fn next(&mut self) -> Result<T, SequenceError> {
        self.next_run(1)
    }

    /// `n` (≥ 1) consecutive numbers; returns the first. A multi-block write
    /// takes one run so that its map entry stays one extent.
    pub fn next_run(&mut self, n: u64) -> Result<T, SequenceError> {
        let first = self.last + 1;
        match first.checked_add(n.max(1) - 1) {
            Some(end) if end <= MAX_COUNTER => {
                self.last = end;
                Ok(T::from_raw(self.epoch << COUNTER_BITS | first))
            }
            _ => Err(SequenceError::Exhausted { kind: T::KIND, epoch: self.epoch }),
        }
    }

    /// The last number handed out (or the floor, if none yet in this epoch).
    pub fn last(&self) -> T {
        T::from_raw(self.epoch << COUNTER_BITS | self.last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adding_to_a_value_from_outside_input_never_overflows() {
        // An epoch past MAX_EPOCH (a raw number off a peer or a disk): the
        // counter has room, the raw number does not (found by fuzzing).
        let raw = Sequence::from_raw(u64::MAX - 3);
        assert_eq!(raw.checked_add(1 << 30), None);
        assert_eq!(SegmentId::from_raw(u64::MAX).checked_add(1), None);
        let s = Sequence::new(5, 10).unwrap();
        assert_eq!(s.checked_add(2), Some(Sequence::new(5, 12).unwrap()));
        assert_eq!(Sequence::new(5, MAX_COUNTER).unwrap().checked_add(1), None);
    }

    #[test]
    fn order_is_epoch_then_counter() {
        let a = Sequence::new(1, MAX_COUNTER).unwrap();
        let b = Sequence::new(2, 0).unwrap();
        assert!(a < b);
        assert_eq!((b.epoch(), b.counter()), (2, 0));
        assert_eq!(a.to_string(), format!("1.{MAX_COUNTER}"));
        assert_eq!(a.checked_add(1), None);
        assert_eq!(Sequence::new(1, 5).unwrap().checked_add(2), Some(Sequence::new(1, 7).unwrap()));
        assert!(Sequence::ZERO < Sequence::new(0, 1).unwrap());
    }

    #[test]
    fn out_of_range_epochs_and_counters_are_refused() {
        assert_eq!(Sequence::new(MAX_EPOCH + 1, 0), Err(SequenceError::EpochTooLarge(MAX_EPOCH + 1)));
        assert_eq!(SegmentId::new(0, MAX_COUNTER + 1), Err(SequenceError::CounterTooLarge(MAX_COUNTER + 1)));
        let err = Sequencer::<Sequence>::new(1 << 24, Sequence::ZERO).unwrap_err();
        assert!(err.to_string().contains("16777216"), "{err}");
    }

    #[test]
    fn allocation_starts_above_the_floor_in_the_same_epoch() {
        let floor = Sequence::new(5, 100).unwrap();
        let mut s = Sequencer::new(5, floor).unwrap();
        assert_eq!(s.last(), floor);
        let a = s.next().unwrap();
        assert_eq!(a, Sequence::new(5, 101).unwrap());
        let run = s.next_run(10).unwrap();
        assert_eq!(run, Sequence::new(5, 102).unwrap());
        assert_eq!(s.next().unwrap(), Sequence::new(5, 112).unwrap());
        // A newer epoch starts at counter 1 whatever the floor's counter.
        let mut t = Sequencer::new(6, floor).unwrap();
        assert_eq!(t.next().unwrap(), Sequence::new(6, 1).unwrap());
        // A fenced (older) writer may not allocate.
        let err = Sequencer::new(4, floor).unwrap_err();
        assert!(matches!(err, SequenceError::EpochBelowFloor { epoch: 4, .. }), "{err}");
        assert!(err.to_string().contains("5.100"), "{err}");
    }

    #[test]
    fn an_exhausted_epoch_is_refused_not_wrapped() {
        let mut s = Sequencer::new(7, SegmentId::new(7, MAX_COUNTER - 2).unwrap()).unwrap();
        assert!(s.next_run(3).is_err());
        assert_eq!(s.next_run(2).unwrap(), SegmentId::new(7, MAX_COUNTER - 1).unwrap());
        let err = s.next().unwrap_err();
        assert_eq!(err, SequenceError::Exhausted { kind: "segment id", epoch: 7 });
        assert!(err.to_string().contains("new epoch"), "{err}");
        // Still exhausted: nothing wrapped into epoch 8.
        assert!(s.next().is_err());
    }
}
