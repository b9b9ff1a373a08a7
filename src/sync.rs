//! The one door through which lepus imports threads' shared-state primitives and queues.
//!
//! Everything else in the crate takes `Arc`, `Mutex`, `Condvar`, atomics and queues from
//! here. Under `cfg(lepus_loom)` they are loom's (crossbeam-channel and parking_lot are not
//! loom-aware, so queues become a Mutex + Condvar queue with the same interface), and the
//! model tests in `loom-tests/` explore the crate's own code with them.

pub use self::imp::*;

/// True when the model tests asked for the deliberately broken variant `name` of a
/// primitive (`LEPUS_LOOM_BROKEN=name`), to show that loom catches it. Only under loom;
/// elsewhere it is the constant false.
#[cfg(lepus_loom)]
pub fn broken(name: &str) -> bool {
    std::env::var("LEPUS_LOOM_BROKEN").is_ok_and(|v| v == name)
}

/// See the loom version: never broken outside the model tests.
#[cfg(not(lepus_loom))]
#[inline(always)]
pub fn broken(_name: &str) -> bool {
    false
}

/// Plain shared ownership of immutable values (an error's I/O cause): not a
/// synchronisation point, so never loom's. (Its users are not built under loom.)
#[cfg_attr(lepus_loom, allow(unused_imports))]
pub use std::sync::Arc as StdArc;

/// A process-wide setting (a test hook), not a synchronisation point: never loom's.
pub(crate) use std::sync::atomic::AtomicBool as StdAtomicBool;

/// Timed waits: parking_lot's interface, over either implementation.
pub(crate) trait CondvarExt {
    /// Wait until notified or `deadline`; true if the deadline passed.
    fn wait_until_deadline<T>(
        &self,
        guard: &mut MutexGuard<'_, T>,
        deadline: std::time::Instant,
    ) -> bool;
}

#[cfg(not(lepus_loom))]
mod imp {
    pub(crate) use parking_lot::{Condvar, Mutex, MutexGuard};
    pub(crate) use std::sync::atomic::{
        AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering, fence,
    };
    pub(crate) use std::sync::{Arc, Weak};

    impl super::CondvarExt for Condvar {
        fn wait_until_deadline<T>(
            &self,
            guard: &mut MutexGuard<'_, T>,
            deadline: std::time::Instant,
        ) -> bool {
            self.wait_until(guard, deadline).timed_out()
        }
    }

    /// Multi-producer queues between handles and the I/O thread.
    pub mod queue {
        pub use crossbeam_channel::{
            Receiver, RecvTimeoutError, SendTimeoutError, Sender, bounded, unbounded,
        };
    }
}

#[cfg(lepus_loom)]
mod imp {
    pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering, fence};
    pub(crate) use loom::sync::{Arc, Condvar as LoomCondvar};

    use std::ops::{Deref, DerefMut};
    use std::time::Instant;

    /// parking_lot's `Mutex` interface over loom's.
    #[derive(Debug)]
    pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);

    pub(crate) struct MutexGuard<'a, T>(Option<loom::sync::MutexGuard<'a, T>>);

    impl<T> Mutex<T> {
        pub(crate) fn new(v: T) -> Self {
            Mutex(loom::sync::Mutex::new(v))
        }
        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            MutexGuard(Some(self.0.lock().expect("loom mutex poisoned")))
        }
        pub(crate) fn try_lock_until(&self, _deadline: Instant) -> Option<MutexGuard<'_, T>> {
            Some(self.lock())
        }
        /// Without waiting: `None` when another thread holds it (loom explores both).
        pub(crate) fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
            self.0.try_lock().ok().map(|g| MutexGuard(Some(g)))
        }
        pub(crate) fn get_mut(&mut self) -> &mut T {
            self.0.get_mut().expect("loom mutex poisoned")
        }
    }

    impl<T: Default> Default for Mutex<T> {
        fn default() -> Self {
            Mutex::new(T::default())
        }
    }

    impl<T> Deref for MutexGuard<'_, T> {
        type Target = T;
        fn deref(&self) -> &T {
            self.0.as_ref().expect("guard present")
        }
    }

    impl<T> DerefMut for MutexGuard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            self.0.as_mut().expect("guard present")
        }
    }

    /// parking_lot's `Condvar` interface over loom's. loom's timed wait never times out:
    /// models must not rely on deadlines, and a wait nobody ends is reported as a deadlock.
    #[derive(Debug)]
    pub(crate) struct Condvar(LoomCondvar);

    impl Default for Condvar {
        fn default() -> Self {
            Self::new()
        }
    }

    impl Condvar {
        pub(crate) fn new() -> Self {
            Condvar(LoomCondvar::new())
        }
        pub(crate) fn notify_one(&self) {
            self.0.notify_one();
        }
        pub(crate) fn notify_all(&self) {
            self.0.notify_all();
        }
        pub(crate) fn wait<T>(&self, guard: &mut MutexGuard<'_, T>) {
            let g = guard.0.take().expect("guard present");
            guard.0 = Some(self.0.wait(g).expect("loom mutex poisoned"));
        }
    }

    impl super::CondvarExt for Condvar {
        fn wait_until_deadline<T>(
            &self,
            guard: &mut MutexGuard<'_, T>,
            _deadline: Instant,
        ) -> bool {
            self.wait(guard);
            false
        }
    }

    /// crossbeam-channel's interface (the part lepus uses) as a Mutex + Condvar queue.
    pub mod queue {
        use super::{Arc, Condvar, Mutex};
        use std::collections::VecDeque;
        use std::time::{Duration, Instant};

        pub use crossbeam_channel::{
            RecvError, RecvTimeoutError, SendError, SendTimeoutError, TryRecvError,
        };

        struct Inner<T> {
            items: VecDeque<T>,
            cap: Option<usize>,
            senders: usize,
            receivers: usize,
        }

        struct Chan<T> {
            inner: Mutex<Inner<T>>,
            cv: Condvar,
        }

        pub struct Sender<T>(Arc<Chan<T>>);
        pub struct Receiver<T>(Arc<Chan<T>>);

        fn chan<T>(cap: Option<usize>) -> (Sender<T>, Receiver<T>) {
            let c = Arc::new(Chan {
                inner: Mutex::new(Inner {
                    items: VecDeque::new(),
                    cap,
                    senders: 1,
                    receivers: 1,
                }),
                cv: Condvar::new(),
            });
            (Sender(c.clone()), Receiver(c))
        }

        pub fn bounded<T>(cap: usize) -> (Sender<T>, Receiver<T>) {
            chan(Some(cap.max(1)))
        }

        pub fn unbounded<T>() -> (Sender<T>, Receiver<T>) {
            chan(None)
        }

        impl<T> Clone for Sender<T> {
            fn clone(&self) -> Self {
                self.0.inner.lock().senders += 1;
                Sender(self.0.clone())
            }
        }

        impl<T> Drop for Sender<T> {
            fn drop(&mut self) {
                self.0.inner.lock().senders -= 1;
                self.0.cv.notify_all();
            }
        }

        impl<T> Clone for Receiver<T> {
            fn clone(&self) -> Self {
                self.0.inner.lock().receivers += 1;
                Receiver(self.0.clone())
            }
        }

        impl<T> Drop for Receiver<T> {
            fn drop(&mut self) {
                let mut i = self.0.inner.lock();
                i.receivers -= 1;
                if i.receivers == 0 {
                    // As crossbeam's list flavour: messages nobody can receive are dropped.
                    i.items.clear();
                }
                drop(i);
                self.0.cv.notify_all();
            }
        }

        impl<T> Sender<T> {
            pub fn send(&self, v: T) -> Result<(), SendError<T>> {
                let mut i = self.0.inner.lock();
                loop {
                    if i.receivers == 0 {
                        return Err(SendError(v));
                    }
                    if i.cap.is_none_or(|c| i.items.len() < c) {
                        i.items.push_back(v);
                        drop(i);
                        self.0.cv.notify_all();
                        return Ok(());
                    }
                    self.0.cv.wait(&mut i);
                }
            }
            pub fn send_deadline(&self, v: T, _d: Instant) -> Result<(), SendTimeoutError<T>> {
                self.send(v)
                    .map_err(|e| SendTimeoutError::Disconnected(e.0))
            }
            pub fn is_empty(&self) -> bool {
                self.0.inner.lock().items.is_empty()
            }
        }

        impl<T> Receiver<T> {
            pub fn recv(&self) -> Result<T, RecvError> {
                let mut i = self.0.inner.lock();
                loop {
                    if let Some(v) = i.items.pop_front() {
                        drop(i);
                        self.0.cv.notify_all();
                        return Ok(v);
                    }
                    if i.senders == 0 {
                        return Err(RecvError);
                    }
                    self.0.cv.wait(&mut i);
                }
            }
            pub fn recv_deadline(&self, _d: Instant) -> Result<T, RecvTimeoutError> {
                self.recv().map_err(|_| RecvTimeoutError::Disconnected)
            }
            pub fn recv_timeout(&self, _d: Duration) -> Result<T, RecvTimeoutError> {
                self.recv().map_err(|_| RecvTimeoutError::Disconnected)
            }
            pub fn try_recv(&self) -> Result<T, TryRecvError> {
                let mut i = self.0.inner.lock();
                match i.items.pop_front() {
                    Some(v) => {
                        drop(i);
                        self.0.cv.notify_all();
                        Ok(v)
                    }
                    None if i.senders == 0 => Err(TryRecvError::Disconnected),
                    None => Err(TryRecvError::Empty),
                }
            }
            pub fn is_empty(&self) -> bool {
                self.0.inner.lock().items.is_empty()
            }
            pub fn len(&self) -> usize {
                self.0.inner.lock().items.len()
            }
        }
    }
}

/// A one-shot reply slot: the I/O thread sends one value or drops its end, which wakes
/// the waiter with "disconnected". Built on the primitives above, so the same code runs
/// in the model tests.
pub mod oneshot {
    use super::{Arc, Condvar, CondvarExt, Mutex};
    use std::time::Instant;

    struct State<T> {
        value: Option<T>,
        sender_gone: bool,
        receiver_gone: bool,
    }

    struct Slot<T> {
        state: Mutex<State<T>>,
        cv: Condvar,
    }

    /// The sending end; dropping it without sending disconnects the receiver.
    pub struct Sender<T>(Arc<Slot<T>>);
    /// The receiving end.
    pub struct Receiver<T>(Arc<Slot<T>>);

    /// Why no value came.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum RecvError {
        /// The deadline passed.
        Timeout,
        /// The sender was dropped without sending.
        Disconnected,
    }

    /// A new slot's two ends.
    pub fn channel<T>() -> (Sender<T>, Receiver<T>) {
        let slot = Arc::new(Slot {
            state: Mutex::new(State {
                value: None,
                sender_gone: false,
                receiver_gone: false,
            }),
            cv: Condvar::new(),
        });
        (Sender(slot.clone()), Receiver(slot))
    }

    impl<T> Sender<T> {
        /// Deliver the value; gives it back if the receiver has gone.
        pub fn send(self, v: T) -> Result<(), T> {
            let mut s = self.0.state.lock();
            if s.receiver_gone {
                return Err(v);
            }
            s.value = Some(v);
            drop(s);
            self.0.cv.notify_all();
            Ok(())
        }
    }

    impl<T> Drop for Sender<T> {
        fn drop(&mut self) {
            self.0.state.lock().sender_gone = true;
            // The model tests' broken variant forgets this wake-up; loom must catch it.
            if !super::broken("oneshot") {
                self.0.cv.notify_all();
            }
        }
    }

    impl<T> Drop for Receiver<T> {
        fn drop(&mut self) {
            self.0.state.lock().receiver_gone = true;
        }
    }

    impl<T> Receiver<T> {
        /// The value, or why there is none, waiting until `deadline`. After a timeout the
        /// receiver counts as gone: wait once, with the last deadline.
        pub fn recv_deadline(&self, deadline: Instant) -> Result<T, RecvError> {
            let mut s = self.0.state.lock();
            loop {
                if let Some(v) = s.value.take() {
                    return Ok(v);
                }
                if s.sender_gone {
                    return Err(RecvError::Disconnected);
                }
                if self.0.cv.wait_until_deadline(&mut s, deadline) {
                    if let Some(v) = s.value.take() {
                        return Ok(v);
                    }
                    // Gone for the sender from now on, under the same lock: a reply sent
                    // after this timeout is handed back to it (the I/O thread then undoes
                    // what the caller no longer waits for, a consumer it would start),
                    // never left in a slot nobody reads.
                    s.receiver_gone = true;
                    return Err(RecvError::Timeout);
                }
            }
        }

        /// The value if it is there now.
        pub fn try_recv(&self) -> Option<T> {
            self.0.state.lock().value.take()
        }
    }
}

/// An unbounded queue of a `Mutex<VecDeque>` and a `Condvar` (see its file).
pub mod lightq;
pub mod ready_list;

#[cfg(all(test, not(lepus_loom)))]
mod tests {
    use super::oneshot;
    use std::time::Instant;

    /// A reply that comes after its waiter timed out goes back to the sender (which then
    /// undoes what nobody waits for), and one that came before is still taken.
    #[test]
    fn oneshot_reply_after_a_timeout_is_handed_back() {
        let (tx, rx) = oneshot::channel::<u32>();
        assert_eq!(
            rx.recv_deadline(Instant::now()),
            Err(oneshot::RecvError::Timeout)
        );
        assert_eq!(tx.send(7), Err(7), "the late reply comes back");
        let (tx, rx) = oneshot::channel::<u32>();
        tx.send(8).unwrap();
        assert_eq!(rx.recv_deadline(Instant::now()), Ok(8));
    }
}
