//! The two hand-shakes of handing a command to the I/O thread: the failure flag (an RPC
//! waiter racing a link failure always wakes) and the wake flag (one wake-up per batch of
//! commands, never a lost one).
//!
//! The command queue is crossbeam's: a push publishes with release and a pop reads with
//! acquire, nothing stronger. Each hand-shake here is "store mine, then load theirs" on
//! both sides (the queue on one side, a flag on the other), which release/acquire alone
//! does not order: each side may miss the other's store. A `SeqCst` fence between the
//! store and the load on both sides forbids that. The model tests in `loom-tests/` run
//! this code with a queue that gives only crossbeam's guarantees.

use crate::sync::oneshot;
use crate::sync::{AtomicBool, Ordering, fence};
use std::time::Instant;

/// Whether a connection generation's link has failed, and the fences around it.
#[doc(hidden)]
#[derive(Debug, Default)]
pub struct FailFlag {
    failed: AtomicBool,
    will_recover: AtomicBool,
}

impl FailFlag {
    /// A link that has not failed.
    pub fn new() -> Self {
        FailFlag {
            failed: AtomicBool::new(false),
            will_recover: AtomicBool::new(false),
        }
    }

    /// True once the link failed.
    pub fn is_set(&self) -> bool {
        // Acquire is enough: where a reader must not miss a failure racing its own
        // store (a queued command), the two fences in `send` and `set` order it. (A
        // `SeqCst` load here would not replace the fence in `send`: a release store
        // followed by a `SeqCst` load may still be reordered. loom treats a `SeqCst` load
        // as stronger than that, and would not see the fence go missing.)
        self.failed.load(Ordering::Acquire)
    }

    /// Handle side: queue a command with `push`, unless the link has already failed
    /// (`None`). After a successful push, fence: either the I/O thread's final drain
    /// sees the command (and drops its reply sender), or a later [`FailFlag::is_set`]
    /// of this thread sees the failure.
    pub fn send<T, E>(&self, push: impl FnOnce() -> Result<T, E>) -> Option<Result<T, E>> {
        // A cheap early out only: a failure after this check is caught by the fence.
        if self.failed.load(Ordering::Acquire) {
            return None;
        }
        let r = push();
        // The model tests' broken variant `send-fence` forgets this fence.
        if r.is_ok() && !crate::sync::broken("send-fence") {
            fence(Ordering::SeqCst);
        }
        Some(r)
    }

    /// Handle side, after [`FailFlag::send`]: the reply, waiting until `deadline`. If
    /// the link has failed, the I/O thread either drained the command (dropping the
    /// reply sender) or never will: only a reply already here counts.
    pub fn wait_reply<T>(
        &self,
        rx: &oneshot::Receiver<T>,
        deadline: Instant,
    ) -> Result<T, oneshot::RecvError> {
        if self.is_set() {
            return rx.try_recv().ok_or(oneshot::RecvError::Disconnected);
        }
        rx.recv_deadline(deadline)
    }

    /// True when the failure will be followed by a recovery (right once
    /// [`FailFlag::is_set`] is true).
    pub fn will_recover(&self) -> bool {
        self.will_recover.load(Ordering::Acquire)
    }

    /// I/O side: the link fails. In this order: `failing` tells the owner (which
    /// decides and records whether a recovery follows: true if so), `record` keeps the
    /// reason, and only then the flag is set. A thread that sees the flag then also sees
    /// whether a recovery follows and why the link failed: a waiter for the connection
    /// (`LinkCell::current`) waits for the recovery instead of reporting a loss as final.
    /// Returns what `failing` said.
    pub fn fail(&self, failing: impl FnOnce() -> bool, record: impl FnOnce()) -> bool {
        let recover = failing();
        self.will_recover.store(recover, Ordering::Release);
        record();
        self.set();
        recover
    }

    /// I/O side: the link failed. The fence pairs with the one in [`FailFlag::send`]
    /// and must come before the final drain.
    pub fn set(&self) {
        self.failed.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    /// I/O side, once the engine is done: drop every queued command (`pop` takes one,
    /// false when the queue is empty) so that their reply senders wake their waiters.
    pub fn drain_failed(&self, mut pop: impl FnMut() -> bool) {
        // `set` fenced already; this one keeps the drain ordered after the failure even
        // if a caller reaches it another way.
        fence(Ordering::SeqCst);
        while pop() {}
    }
}

/// "The I/O thread has been asked to look at its queue": coalesces wake-ups to one per
/// batch of commands.
#[doc(hidden)]
#[derive(Debug, Default)]
pub struct WakeFlag {
    pending: AtomicBool,
}

impl WakeFlag {
    /// No wake-up pending.
    pub fn new() -> Self {
        WakeFlag {
            pending: AtomicBool::new(false),
        }
    }

    /// Handle side, after queuing a command (and [`FailFlag::send`]'s fence): wake the
    /// I/O thread with `wake` unless a wake-up is pending already.
    pub fn wake(&self, wake: impl FnOnce()) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            wake();
        }
    }

    /// I/O side, before it drains the queue. The fence orders the cleared flag before
    /// the drain's reads: either the drain sees a command queued meanwhile, or its
    /// sender's [`WakeFlag::wake`] sees the flag cleared and wakes the I/O thread again.
    /// (crossbeam's `try_recv` happens to fence too; this one does not rely on it.)
    pub fn clear(&self) {
        self.pending.store(false, Ordering::Release);
        fence(Ordering::SeqCst);
    }
}
