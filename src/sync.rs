//! The one door through which lepus imports threads' shared-state primitives and queues.
//!
//! Everything else in the crate takes `Arc`, `Mutex`, `Condvar`, atomics and queues from
//! here, so that a model checker can replace them in one place.

pub(crate) use parking_lot::{Condvar, Mutex, MutexGuard};
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
pub(crate) use std::sync::{Arc, Weak};

/// Multi-producer queues between handles and the I/O thread.
pub(crate) mod queue {
    pub(crate) use crossbeam_channel::{
        Receiver, RecvTimeoutError, SendTimeoutError, Sender, TryRecvError, bounded, select,
        unbounded,
    };
}
