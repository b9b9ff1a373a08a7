//! The ready list of a [`Dispatcher`](crate::Dispatcher): many queues, few threads.
//!
//! Each queue served by a dispatcher has a [`Ticket`]. Whoever queues an item calls
//! [`Ticket::queued`]: the first call since the ticket was last released puts the ticket
//! on the list (once: the `scheduled` flag is claimed with a swap), later ones do
//! nothing. A thread takes a ticket ([`ReadyList::take`]), empties (part of) its queue,
//! and gives it back with [`Ticket::release`], which clears the flag and then looks at
//! the queue again: an item queued between the thread's last look and the clearing found
//! the flag still set and did not schedule the ticket, so the release must. Hence a
//! queue is served by one thread at a time (its items handled in order), and no item is
//! left behind with nobody to take it. The model tests run this code with loom.

use std::collections::VecDeque;
use std::time::Instant;

use super::{Arc, AtomicBool, Condvar, CondvarExt, Mutex, Ordering};

/// How a listing tells a sleeping taker.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// Wake one now.
    Now,
    /// Owe a wake-up, paid later by [`ReadyList::pay`].
    Owe,
    /// Nobody: the lister takes the next ticket itself.
    None,
}

struct Inner {
    ready: VecDeque<Arc<Ticket>>,
    /// Threads asleep in `take`.
    waiting: usize,
    /// Wake-ups owed to sleepers for tickets scheduled quietly, at most one per sleeper.
    owed: usize,
    stopped: bool,
}

/// The tickets with work, and the threads that take them.
pub struct ReadyList {
    inner: Mutex<Inner>,
    cv: Condvar,
}

impl std::fmt::Debug for ReadyList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = self.inner.lock();
        f.debug_struct("ReadyList")
            .field("ready", &i.ready.len())
            .field("waiting", &i.waiting)
            .field("stopped", &i.stopped)
            .finish()
    }
}

/// One queue's place on a [`ReadyList`].
pub struct Ticket {
    id: usize,
    scheduled: AtomicBool,
    list: Arc<ReadyList>,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("id", &self.id)
            .field("scheduled", &self.scheduled.load(Ordering::Relaxed))
            .finish()
    }
}

impl Default for ReadyList {
    fn default() -> Self {
        Self::new()
    }
}

impl ReadyList {
    /// An empty list.
    pub fn new() -> Self {
        ReadyList {
            inner: Mutex::new(Inner {
                ready: VecDeque::new(),
                waiting: 0,
                owed: 0,
                stopped: false,
            }),
            cv: Condvar::new(),
        }
    }

    /// A ticket of this list for the queue `id` (not scheduled).
    pub fn ticket(list: &Arc<Self>, id: usize) -> Arc<Ticket> {
        Arc::new(Ticket {
            id,
            scheduled: AtomicBool::new(false),
            list: list.clone(),
        })
    }

    /// Put `t` on the list; `wake`: how to tell a sleeping taker. Returns true if a
    /// wake-up became owed (`Wake::Owe`, paid by [`ReadyList::pay`]).
    fn push(&self, t: Arc<Ticket>, wake: Wake) -> bool {
        let mut i = self.inner.lock();
        if i.stopped {
            // Nobody will take it (and a listed ticket holds the list).
            return false;
        }
        i.ready.push_back(t);
        if wake == Wake::None {
            return false;
        }
        if wake == Wake::Owe {
            let first = i.owed == 0;
            if i.waiting > i.owed {
                i.owed += 1;
            }
            return first && i.owed > 0;
        }
        let sleeper = i.waiting > 0;
        drop(i);
        if sleeper {
            self.cv.notify_one();
        }
        false
    }

    /// Wake as many sleepers as quiet schedules owe (at most one per sleeper).
    pub fn pay(&self) {
        let mut i = self.inner.lock();
        let n = i.owed.min(i.waiting);
        i.owed = 0;
        drop(i);
        for _ in 0..n {
            self.cv.notify_one();
        }
    }

    /// The next ticket with work, waiting until `deadline` (`None` for no deadline);
    /// `None` once the list is stopped or the deadline passed.
    pub fn take(&self, deadline: Option<Instant>) -> Option<Arc<Ticket>> {
        let mut i = self.inner.lock();
        loop {
            if i.stopped {
                return None;
            }
            if let Some(t) = i.ready.pop_front() {
                return Some(t);
            }
            i.waiting += 1;
            let timed_out = match deadline {
                // Under loom a timed wait never ends by itself: no deadline passes there.
                Some(d) if !cfg!(lepus_loom) => self.cv.wait_until_deadline(&mut i, d),
                _ => {
                    self.cv.wait(&mut i);
                    false
                }
            };
            i.waiting -= 1;
            if timed_out && i.ready.is_empty() {
                return None;
            }
        }
    }

    /// Stop: every `take`, now and later, returns `None`. The tickets listed are let go
    /// (each holds the list: dropped here, outside the lock).
    pub fn stop(&self) {
        let mut i = self.inner.lock();
        i.stopped = true;
        let listed = std::mem::take(&mut i.ready);
        drop(i);
        self.cv.notify_all();
        drop(listed);
    }

    /// Tickets on the list now.
    pub fn len(&self) -> usize {
        self.inner.lock().ready.len()
    }

    /// True when no ticket is on the list.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Ticket {
    /// The queue's id, as given to [`ReadyList::ticket`].
    pub fn id(&self) -> usize {
        self.id
    }

    /// An item was queued: put the ticket on its list unless it is there or taken.
    /// `quiet`: wake no thread now; true if a wake-up became owed, which the caller
    /// pays with [`Ticket::pay`] once its batch is queued.
    pub fn queued(this: &Arc<Self>, quiet: bool) -> bool {
        // The model tests' broken variant `dispatch-claim` reads and sets the flag in two
        // steps: two queuers may both schedule it, and two threads serve one queue.
        let was = if super::broken("dispatch-claim") {
            let was = this.scheduled.load(Ordering::SeqCst);
            this.scheduled.store(true, Ordering::SeqCst);
            was
        } else {
            this.scheduled.swap(true, Ordering::SeqCst)
        };
        if was {
            return false;
        }
        this.list
            .push(this.clone(), if quiet { Wake::Owe } else { Wake::Now })
    }

    /// Pay the wake-ups that quiet schedules on this ticket's list owe.
    pub fn pay(&self) {
        self.list.pay();
    }

    /// The taker is done with the queue for now: clear the flag, then schedule the ticket
    /// again if `has_work` (asked after the clearing) says the queue holds anything. The
    /// taker must call [`ReadyList::take`] next: a ticket listed again here wakes nobody.
    pub fn release(this: &Arc<Self>, has_work: impl FnOnce() -> bool) {
        // A read-modify-write, as every write of the flag (and as the consumer queue's
        // flag in `delivery_queue`): the writes form one chain. (With a plain store here
        // loom reports the ticket left unlisted with an item queued; by the C11 rules the
        // queue's lock, taken by the claim and by the second look, should rule that out,
        // so it may be the model's artefact, but the swap costs nothing and needs no such
        // argument.)
        this.scheduled.swap(false, Ordering::SeqCst);
        // The model tests' broken variant `dispatch-recheck` trusts the taker's last look
        // instead: an item queued while the flag was still set is left with nobody to
        // take it.
        if super::broken("dispatch-recheck") {
            return;
        }
        // Listed again without waking anyone: the releasing thread takes the next
        // ticket itself right after (the others were woken for theirs when listed).
        if has_work() && !this.scheduled.swap(true, Ordering::SeqCst) {
            this.list.push(this.clone(), Wake::None);
        }
    }
}

#[cfg(all(test, not(lepus_loom)))]
mod tests {
    use super::*;
    use std::thread;
    use std::time::Duration;

    #[test]
    fn a_ticket_is_listed_once_until_released() {
        let list = Arc::new(ReadyList::new());
        let t = ReadyList::ticket(&list, 7);
        assert!(!Ticket::queued(&t, false));
        assert!(!Ticket::queued(&t, false));
        assert_eq!(list.len(), 1, "scheduled once");
        let got = list.take(Some(Instant::now())).expect("listed");
        assert_eq!(got.id(), 7);
        assert!(!Ticket::queued(&t, false), "taken: still scheduled");
        assert!(list.is_empty());
        Ticket::release(&got, || false);
        assert!(list.is_empty(), "no work: not listed again");
        Ticket::queued(&t, false);
        let got = list.take(Some(Instant::now())).expect("listed again");
        Ticket::release(&got, || true);
        assert_eq!(list.len(), 1, "work left: listed again at release");
    }

    #[test]
    fn a_quiet_schedule_wakes_a_sleeper_when_paid() {
        let list = Arc::new(ReadyList::new());
        let t = ReadyList::ticket(&list, 1);
        let sleeper = {
            let list = list.clone();
            thread::spawn(move || list.take(Some(Instant::now() + Duration::from_secs(30))))
        };
        while list.inner.lock().waiting == 0 {
            thread::yield_now();
        }
        assert!(Ticket::queued(&t, true), "a wake-up is owed");
        thread::sleep(Duration::from_millis(30));
        assert_eq!(list.inner.lock().waiting, 1, "still asleep");
        t.pay();
        assert_eq!(sleeper.join().unwrap().map(|t| t.id()), Some(1));
    }

    #[test]
    fn stop_and_deadline_end_a_take() {
        let list = Arc::new(ReadyList::new());
        let t0 = Instant::now();
        assert!(list.take(Some(t0 + Duration::from_millis(20))).is_none());
        assert!(t0.elapsed() >= Duration::from_millis(20));
        let sleeper = {
            let list = list.clone();
            thread::spawn(move || list.take(None))
        };
        while list.inner.lock().waiting == 0 {
            thread::yield_now();
        }
        list.stop();
        assert!(sleeper.join().unwrap().is_none());
        Ticket::queued(&ReadyList::ticket(&list, 2), false);
        assert!(list.take(None).is_none(), "stopped for good");
    }
}
