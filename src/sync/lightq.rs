//! An unbounded queue of a `Mutex<VecDeque>` and a `Condvar`, with crossbeam-channel's
//! interface (the part lepus uses): about 100 bytes where crossbeam's unbounded channel is
//! about 500 (two cache-padded positions and a waker list). For queues that are many and
//! mostly idle: one per consumer. Built on `sync`'s primitives, so the model tests run
//! this very code (`lepus::internal::model::queue` is this module).

use super::ready_list::Ticket;
use super::{Arc, Condvar, CondvarExt, Mutex};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

pub use crossbeam_channel::{RecvError, RecvTimeoutError, SendError, TryRecvError};

/// Room kept by an empty queue after a burst; more is given back.
const KEEP: usize = 16;

struct Inner<T> {
    items: VecDeque<T>,
    senders: usize,
    receivers: usize,
    /// Receivers asleep on `cv`: a send wakes one only if there is one.
    waiting: usize,
    /// Wake-ups owed to sleeping receivers for items sent quietly
    /// ([`Sender::send_quiet`]), at most one per sleeper; paid by [`Notifier::wake`].
    owed: usize,
    /// The dispatcher's ticket of a queue served by a dispatcher's threads rather than
    /// by a receiver asleep on it: every send schedules it ([`Receiver::watch`]).
    watch: Option<Arc<Ticket>>,
}

struct Chan<T> {
    inner: Mutex<Inner<T>>,
    cv: Condvar,
}

/// The sending end.
pub struct Sender<T>(Arc<Chan<T>>);
/// The receiving end.
pub struct Receiver<T>(Arc<Chan<T>>);

/// A new queue.
pub fn unbounded<T>() -> (Sender<T>, Receiver<T>) {
    let c = Arc::new(Chan {
        inner: Mutex::new(Inner {
            items: VecDeque::new(),
            senders: 1,
            receivers: 1,
            waiting: 0,
            owed: 0,
            watch: None,
        }),
        cv: Condvar::new(),
    });
    (Sender(c.clone()), Receiver(c))
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.0.inner.lock().senders += 1;
        Sender(self.0.clone())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut i = self.0.inner.lock();
        i.senders -= 1;
        let last = i.senders == 0;
        if last && let Some(t) = &i.watch {
            // The end is news too: the dispatcher's thread finds the queue disconnected.
            Ticket::queued(t, false);
        }
        drop(i);
        if last {
            // Every sleeping receiver learns that nothing more will come.
            self.0.cv.notify_all();
        }
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
        // As crossbeam's: messages nobody can receive are dropped (outside the lock).
        let orphans = if i.receivers == 0 {
            std::mem::take(&mut i.items)
        } else {
            VecDeque::new()
        };
        drop(i);
        drop(orphans);
    }
}

impl<T> Sender<T> {
    /// Queue `v`; it comes back if every receiver is gone.
    pub fn send(&self, v: T) -> Result<(), SendError<T>> {
        let mut i = self.0.inner.lock();
        if i.receivers == 0 {
            return Err(SendError(v));
        }
        i.items.push_back(v);
        if let Some(t) = &i.watch {
            Ticket::queued(t, false);
        }
        let sleeper = i.waiting > 0;
        drop(i);
        if sleeper {
            self.0.cv.notify_one();
        }
        Ok(())
    }
}

/// Wakes the receivers of a queue that [`Sender::send_quiet`] left asleep. It does not
/// count as a sender: holding one keeps nothing connected.
pub struct Notifier<T>(Arc<Chan<T>>);

impl<T> Sender<T> {
    /// Queue `v` without waking a sleeping receiver: the wake-up is owed instead, and
    /// [`Notifier::wake`] pays it. Returns true when this send made a wake-up owed where
    /// none was: the caller must then call `wake` on [`Sender::notifier`] later (several
    /// quiet sends, one wake-up each sleeper). `v` comes back if every receiver is gone.
    /// For a sender that hands over a batch of items to many queues and wakes each
    /// queue's receivers once, after the batch.
    pub fn send_quiet(&self, v: T) -> Result<bool, SendError<T>> {
        let mut i = self.0.inner.lock();
        if i.receivers == 0 {
            return Err(SendError(v));
        }
        i.items.push_back(v);
        // A dispatcher's ticket is scheduled quietly too; its list's wake-up is owed
        // and paid through this queue's notifier.
        let listed = i.watch.as_ref().is_some_and(|t| Ticket::queued(t, true));
        let first = i.owed == 0;
        if i.waiting > i.owed {
            i.owed += 1;
        }
        Ok(listed || (first && i.owed > 0))
    }

    /// The handle that pays this queue's owed wake-ups.
    pub fn notifier(&self) -> Notifier<T> {
        Notifier(self.0.clone())
    }
}

impl<T> Notifier<T> {
    /// Wake as many sleeping receivers as wake-ups are owed (at most one per sleeper).
    pub fn wake(&self) {
        let mut i = self.0.inner.lock();
        let mut n = i.owed.min(i.waiting);
        // The model tests' broken variant `quiet-wake-one` wakes one whatever is owed.
        if super::broken("quiet-wake-one") {
            n = n.min(1);
        }
        i.owed = 0;
        let watch = i.watch.clone();
        drop(i);
        for _ in 0..n {
            self.0.cv.notify_one();
        }
        if let Some(t) = watch {
            t.pay();
        }
    }
}

/// The first item, giving back the room of a burst once the queue is empty.
fn pop<T>(i: &mut Inner<T>) -> Option<T> {
    let v = i.items.pop_front()?;
    if i.items.is_empty() && i.items.capacity() > KEEP {
        i.items.shrink_to(KEEP);
    }
    Some(v)
}

impl<T> Receiver<T> {
    /// The next item, waiting as long as it takes; an error once the queue is empty
    /// and every sender is gone.
    pub fn recv(&self) -> Result<T, RecvError> {
        let mut i = self.0.inner.lock();
        loop {
            if let Some(v) = pop(&mut i) {
                return Ok(v);
            }
            if i.senders == 0 {
                return Err(RecvError);
            }
            i.waiting += 1;
            self.0.cv.wait(&mut i);
            i.waiting -= 1;
        }
    }

    /// The next item, waiting until `deadline`.
    pub fn recv_deadline(&self, deadline: Instant) -> Result<T, RecvTimeoutError> {
        let mut i = self.0.inner.lock();
        loop {
            if let Some(v) = pop(&mut i) {
                return Ok(v);
            }
            if i.senders == 0 {
                return Err(RecvTimeoutError::Disconnected);
            }
            // Under loom a timed wait never ends by itself and the clock is not the
            // model's: a deadline never passes there, so every interleaving is the same.
            if !cfg!(lepus_loom) && Instant::now() >= deadline {
                return Err(RecvTimeoutError::Timeout);
            }
            i.waiting += 1;
            // A timed-out wait loops back: an item sent meanwhile is still taken.
            let _ = self.0.cv.wait_until_deadline(&mut i, deadline);
            i.waiting -= 1;
        }
    }

    /// The next item, waiting up to `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<T, RecvTimeoutError> {
        match Instant::now().checked_add(timeout) {
            Some(deadline) => self.recv_deadline(deadline),
            // Further than the clock reaches: no deadline.
            None => self.recv().map_err(|_| RecvTimeoutError::Disconnected),
        }
    }

    /// The next item if there is one now.
    pub fn try_recv(&self) -> Result<T, TryRecvError> {
        let mut i = self.0.inner.lock();
        match pop(&mut i) {
            Some(v) => Ok(v),
            None if i.senders == 0 => Err(TryRecvError::Disconnected),
            None => Err(TryRecvError::Empty),
        }
    }

    /// Items queued now.
    pub fn len(&self) -> usize {
        self.0.inner.lock().items.len()
    }

    /// True if no item is queued now.
    pub fn is_empty(&self) -> bool {
        self.0.inner.lock().items.is_empty()
    }

    /// True when an item is queued or every sender is gone: a receive would not wait.
    pub fn has_news(&self) -> bool {
        let i = self.0.inner.lock();
        !i.items.is_empty() || i.senders == 0
    }

    /// Have every send schedule `ticket` (a dispatcher's threads serve this queue), or
    /// stop that (`None`). A queue that already holds something is scheduled at once.
    ///
    /// The ticket replaced pays what its list is owed: a quiet send through it may have
    /// left a wake-up owed that this queue's notifier, finding no ticket any more, would
    /// not pay (and a list whose debt is never paid owes no new wake-up either).
    pub fn watch(&self, ticket: Option<Arc<Ticket>>) {
        let mut i = self.0.inner.lock();
        let old = std::mem::replace(&mut i.watch, ticket);
        if let Some(t) = &i.watch
            && (!i.items.is_empty() || i.senders == 0)
        {
            Ticket::queued(t, false);
        }
        drop(i);
        // The model tests' broken variant `dispatch-unwatch` forgets the payment.
        if let Some(old) = old
            && !super::broken("dispatch-unwatch")
        {
            old.pay();
        }
    }
}

#[cfg(all(test, not(lepus_loom)))]
mod tests {
    use super::*;
    use std::thread;

    #[test]
    fn order_disconnect_and_orphans() {
        let (tx, rx) = unbounded();
        for v in 0..40 {
            tx.send(v).unwrap();
        }
        assert_eq!(rx.len(), 40);
        for v in 0..40 {
            assert_eq!(rx.try_recv(), Ok(v));
        }
        assert!(
            rx.0.inner.lock().items.capacity() <= KEEP,
            "burst room given back"
        );
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        let tx2 = tx.clone();
        drop(tx);
        tx2.send(7).unwrap();
        drop(tx2);
        assert_eq!(rx.recv(), Ok(7));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Disconnected));
        assert_eq!(rx.recv(), Err(RecvError));
        assert_eq!(
            rx.recv_timeout(Duration::from_millis(1)),
            Err(RecvTimeoutError::Disconnected)
        );
        let (tx, rx) = unbounded::<u8>();
        drop(rx);
        assert_eq!(tx.send(1), Err(SendError(1)));
    }

    #[test]
    fn timeout_then_late_item() {
        let (tx, rx) = unbounded::<u32>();
        tx.send(3).unwrap();
        assert_eq!(rx.recv_timeout(Duration::MAX), Ok(3), "no overflow");
        let (tx, rx) = unbounded::<u32>();
        assert_eq!(
            rx.recv_timeout(Duration::from_millis(5)),
            Err(RecvTimeoutError::Timeout)
        );
        tx.send(1).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_millis(5)), Ok(1));
    }

    /// A receiver's clone going leaves the queue to the others; the last receiver's
    /// going drops what nobody can take any more.
    #[test]
    fn a_clone_dropping_keeps_the_items() {
        let (tx, rx) = unbounded::<Arc<()>>();
        let item = Arc::new(());
        tx.send(item.clone()).unwrap();
        drop(rx.clone());
        assert_eq!(rx.len(), 1, "a clone's drop kept the item");
        drop(rx);
        assert_eq!(
            Arc::strong_count(&item),
            1,
            "the last receiver's drop freed the item"
        );
        assert!(tx.send(item.clone()).is_err());
    }

    /// Two receivers asleep when the last sender goes: both wake and learn it. (lepus's
    /// consumers never see this: a `Consumer` holds a sender of its own queue, its end
    /// relay; the queue must still keep crossbeam's promise.)
    #[test]
    fn last_sender_wakes_every_receiver() {
        let (tx, rx) = unbounded::<u8>();
        let sleepers: Vec<_> = (0..2)
            .map(|_| {
                let rx = rx.clone();
                thread::spawn(move || {
                    let t0 = Instant::now();
                    (rx.recv_timeout(Duration::from_secs(30)), t0.elapsed())
                })
            })
            .collect();
        while rx.0.inner.lock().waiting < 2 {
            thread::yield_now();
        }
        drop(tx);
        for s in sleepers {
            let (r, waited) = s.join().unwrap();
            assert_eq!(r, Err(RecvTimeoutError::Disconnected));
            // Woken by the drop, not let go by the 30 s deadline (after which a receiver
            // also finds the queue disconnected).
            assert!(waited < Duration::from_secs(20), "not woken: {waited:?}");
        }
    }

    fn wait_for_sleepers<T>(rx: &Receiver<T>, n: usize) {
        while rx.0.inner.lock().waiting < n {
            thread::yield_now();
        }
    }

    /// A quiet send leaves the sleeping receiver asleep (the wake-up is owed, and the
    /// sender is told to pay it); the payment wakes it.
    #[test]
    fn a_quiet_send_wakes_when_paid() {
        let (tx, rx) = unbounded::<u32>();
        let sleeper = {
            let rx = rx.clone();
            thread::spawn(move || {
                let t0 = Instant::now();
                (rx.recv_timeout(Duration::from_secs(30)), t0.elapsed())
            })
        };
        wait_for_sleepers(&rx, 1);
        assert_eq!(tx.send_quiet(5), Ok(true), "a wake-up is owed");
        assert_eq!(tx.send_quiet(6), Ok(false), "owed already");
        thread::sleep(Duration::from_millis(50));
        {
            let i = rx.0.inner.lock();
            assert_eq!(
                (i.waiting, i.items.len(), i.owed),
                (1, 2, 1),
                "still asleep"
            );
        }
        tx.notifier().wake();
        let (r, waited) = sleeper.join().unwrap();
        assert_eq!(r, Ok(5));
        assert!(waited < Duration::from_secs(20), "not woken: {waited:?}");
        assert_eq!(rx.0.inner.lock().owed, 0, "paid");
        assert_eq!(rx.try_recv(), Ok(6));
        // Nobody asleep: nothing owed, nothing to pay.
        assert_eq!(tx.send_quiet(7), Ok(false));
        drop(rx);
        assert_eq!(tx.send_quiet(8), Err(SendError(8)));
    }

    /// A dispatcher's list owes a wake-up for a quiet send through queue A; A stops
    /// being watched (its consumer left) before its notifier pays: the unwatch pays, so
    /// the list's sleeper wakes and the next quiet send (through B) owes a new one.
    #[test]
    fn an_unwatched_queue_pays_what_its_list_is_owed() {
        use crate::sync::ready_list::ReadyList;
        let list = Arc::new(ReadyList::new());
        let (ta, ra) = unbounded::<u32>();
        let (tb, rb) = unbounded::<u32>();
        ra.watch(Some(ReadyList::ticket(&list, 0)));
        rb.watch(Some(ReadyList::ticket(&list, 1)));
        let sleeper = {
            let list = list.clone();
            thread::spawn(move || {
                list.take(Some(Instant::now() + Duration::from_secs(30)))
                    .map(|t| t.id())
            })
        };
        while format!("{list:?}").contains("waiting: 0") {
            thread::yield_now();
        }
        assert_eq!(ta.send_quiet(1), Ok(true), "the list owes a wake-up");
        ra.watch(None);
        let t0 = Instant::now();
        assert_eq!(
            sleeper.join().unwrap(),
            Some(0),
            "woken by the unwatch's payment"
        );
        assert!(t0.elapsed() < Duration::from_secs(20));
        let sleeper = {
            let list = list.clone();
            thread::spawn(move || list.take(Some(Instant::now() + Duration::from_secs(30))))
        };
        while format!("{list:?}").contains("waiting: 0") {
            thread::yield_now();
        }
        assert_eq!(
            tb.send_quiet(2),
            Ok(true),
            "nothing left owed: a new wake-up is"
        );
        tb.notifier().wake();
        assert_eq!(sleeper.join().unwrap().map(|t| t.id()), Some(1));
        list.stop();
        rb.watch(None);
    }

    /// One wake-up owed per sleeping receiver, however many items: two sleepers and
    /// three quiet sends, one payment, and both wake.
    #[test]
    fn a_payment_wakes_every_sleeper_owed() {
        let (tx, rx) = unbounded::<u32>();
        let sleepers: Vec<_> = (0..2)
            .map(|_| {
                let rx = rx.clone();
                thread::spawn(move || rx.recv_timeout(Duration::from_secs(30)))
            })
            .collect();
        wait_for_sleepers(&rx, 2);
        assert_eq!(tx.send_quiet(1), Ok(true));
        assert_eq!(tx.send_quiet(2), Ok(false));
        assert_eq!(tx.send_quiet(3), Ok(false));
        assert_eq!(rx.0.inner.lock().owed, 2, "one per sleeper");
        tx.notifier().wake();
        let mut got: Vec<u32> = sleepers
            .into_iter()
            .map(|s| s.join().unwrap().expect("woken with an item"))
            .collect();
        got.sort_unstable();
        assert!(got == [1, 2], "{got:?}");
        assert_eq!(rx.try_recv(), Ok(3));
    }

    /// Four receivers asleep on one queue, 10,000 items from two senders: every item
    /// reaches exactly one receiver, and every receiver ends when the senders go.
    #[test]
    fn many_sleeping_receivers_each_item_once() {
        let (tx, rx) = unbounded::<u32>();
        let takers: Vec<_> = (0..4)
            .map(|k| {
                let rx = rx.clone();
                thread::spawn(move || {
                    let mut got = Vec::new();
                    loop {
                        // Half of them with short deadlines, to race timeouts with sends.
                        let r = if k % 2 == 0 {
                            rx.recv().map_err(|_| ())
                        } else {
                            match rx.recv_timeout(Duration::from_micros(50)) {
                                Err(RecvTimeoutError::Timeout) => continue,
                                r => r.map_err(|_| ()),
                            }
                        };
                        match r {
                            Ok(v) => got.push(v),
                            Err(()) => return got,
                        }
                    }
                })
            })
            .collect();
        drop(rx);
        let senders: Vec<_> = (0..2u32)
            .map(|s| {
                let tx = tx.clone();
                thread::spawn(move || {
                    for v in 0..5_000 {
                        tx.send(s * 5_000 + v).unwrap();
                    }
                })
            })
            .collect();
        drop(tx);
        for s in senders {
            s.join().unwrap();
        }
        let mut all: Vec<u32> = takers.into_iter().flat_map(|t| t.join().unwrap()).collect();
        all.sort_unstable();
        assert_eq!(all, (0..10_000).collect::<Vec<_>>());
    }
}
