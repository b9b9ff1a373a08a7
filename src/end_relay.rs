//! How a consumer's end reaches every thread blocked on it: the I/O thread queues one
//! end message; the thread that takes it records the end and puts a copy back for the
//! next one. The model tests in `loom-tests/` run this code with loom.

use crate::delivery_queue::QueueShared;
use crate::sync::lightq::Sender;
use crate::sync::{Mutex, Ordering};

/// The recorded end of a consumer and the sender that passes it on.
#[doc(hidden)]
pub struct EndRelay<M, E> {
    ended: Mutex<Option<E>>,
    relay: Sender<M>,
}

impl<M, E: Clone> EndRelay<M, E> {
    /// `relay` sends into the consumer's own queue.
    pub fn new(relay: Sender<M>) -> Self {
        EndRelay {
            ended: Mutex::new(None),
            relay,
        }
    }

    /// The end, once a thread has seen it: checked before blocking on the queue.
    pub fn ended(&self) -> Option<E> {
        self.ended.lock().clone()
    }

    /// Record `e` as the end unless one is recorded already; returns the recorded one.
    pub fn end_with(&self, e: E) -> E {
        self.ended.lock().get_or_insert(e).clone()
    }

    /// A thread took the end message `e` off the queue (and counted it taken): record
    /// it, and queue it again (`end` builds the message, `queue` counts it) so that the
    /// next thread blocked on this consumer wakes too. Returns the recorded end.
    pub fn took_end(&self, e: E, queue: &QueueShared, end: impl FnOnce(E) -> M) -> E {
        let e = self.end_with(e);
        queue.queued.fetch_add(1, Ordering::AcqRel);
        // The queue lives as long as this consumer: the send fails only if it was dropped.
        let _ = self.relay.send(end(e.clone()));
        e
    }
}
