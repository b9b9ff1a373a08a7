//! The bound of a consumer's queue and the hand-shake that lets the I/O thread stop
//! reading when the queue is full and be woken when the consumer takes one.
//!
//! The queue itself is an unbounded channel (no slots allocated up front); this counter
//! enforces the bound. The model tests run this code with loom.

use crate::sync::{AtomicBool, AtomicUsize, Ordering, StdAtomicBool};

/// Whether the I/O thread re-polls a stalled queue (every 20 ms), a safety net for a
/// wake-up lost between the consumer and the I/O thread. On, except in integration tests
/// that turn it off so that a lost wake-up shows as a stall rather than a 20 ms delay.
static STALL_REPOLL: StdAtomicBool = StdAtomicBool::new(true);

/// Turn the I/O threads' re-poll of stalled consumer queues off (or on again), for the
/// whole process: a test hook (`lepus::internal::set_stall_repoll`), not an option.
pub fn set_stall_repoll(on: bool) {
    STALL_REPOLL.store(on, Ordering::Relaxed);
}

/// See [`set_stall_repoll`].
pub(crate) fn stall_repoll() -> bool {
    STALL_REPOLL.load(Ordering::Relaxed)
}

/// Counter-bounded queue state shared by a consumer and the I/O thread.
#[doc(hidden)]
#[derive(Debug)]
pub struct QueueShared {
    /// Messages in the queue.
    pub queued: AtomicUsize,
    /// The bound.
    pub capacity: usize,
    /// Set by the I/O thread when it stopped reading because this queue was full.
    pub io_waiting: AtomicBool,
    /// Cleared when the consumer ends (cancelled, dropped): nobody will take from it.
    pub active: AtomicBool,
}

impl QueueShared {
    /// An empty, active queue of `capacity`.
    pub fn new(capacity: usize) -> Self {
        QueueShared {
            queued: AtomicUsize::new(0),
            capacity,
            io_waiting: AtomicBool::new(false),
            active: AtomicBool::new(true),
        }
    }

    /// True when the I/O thread must wait for room. A consumer that was cancelled or
    /// dropped never holds it back: nobody may ever take from its queue again, and the
    /// cancel-ok it waits for can only be read if reading goes on.
    pub fn is_full(&self) -> bool {
        self.active.load(Ordering::Acquire) && self.queued.load(Ordering::Acquire) >= self.capacity
    }

    /// I/O side, before pushing: true if there is room. If not, the I/O thread has
    /// registered for a wake-up (the consumer's next [`QueueShared::took_one`] returns
    /// true) and must stop reading until then.
    pub fn reserve_or_wait(&self) -> bool {
        if !self.is_full() {
            return true;
        }
        // The flag's writes are all read-modify-writes (here and in `took_one`), so they
        // form one chain: if the consumer's swap comes after this one it sees the flag
        // and wakes us; if it came before, this swap reads what it wrote and so sees the
        // `queued` it lowered first (release/acquire through the flag). A plain store
        // here is the store-then-load race of both sides, where each may miss the
        // other's write and the I/O thread stalls with nobody left to wake it (the loom
        // model of the I/O side and one consumer alone deadlocks: variant `queue-store`).
        set_flag(&self.io_waiting, true);
        // Re-check: the consumer may have taken one before it could see the flag.
        if self.is_full() {
            return false;
        }
        set_flag(&self.io_waiting, false);
        true
    }

    /// I/O side: count a message about to be sent into the queue.
    pub fn pushed(&self) {
        self.queued.fetch_add(1, Ordering::SeqCst);
    }

    /// I/O side: the send failed (receiver gone): uncount it.
    pub fn unpushed(&self) {
        self.queued.fetch_sub(1, Ordering::SeqCst);
    }

    /// Consumer side, after taking one message: true if the I/O thread waits for room
    /// and must be woken.
    pub fn took_one(&self) -> bool {
        self.queued.fetch_sub(1, Ordering::SeqCst);
        self.io_waiting.swap(false, Ordering::SeqCst)
    }
}

/// Write the I/O side's flag as a read-modify-write (see `reserve_or_wait`); the model
/// tests' broken variant `queue-store` writes it with a plain store, as before.
fn set_flag(flag: &AtomicBool, v: bool) {
    if crate::sync::broken("queue-store") {
        flag.store(v, Ordering::SeqCst);
    } else {
        flag.swap(v, Ordering::SeqCst);
    }
}
