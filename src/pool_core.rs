//! The bookkeeping of the channel pool, generic over what it pools so that the model
//! tests run this very code with loom: acquisitions released exactly once (by the guard,
//! or by the pool when the item dies first), the bound held at every step, broken items
//! discarded.
//!
//! Items live in a slab of slots; a lease is a slot's index and the lease's number, so an
//! acquire/release pair allocates nothing, finds its slot at once and takes the pool's
//! lock once each way.

use std::time::Instant;

use crate::error::{Error, Result};
use crate::sync::{Arc, Condvar, CondvarExt, Mutex};

/// Default number of channels a pool may hold open.
pub const DEFAULT_POOL_SIZE: usize = 100;

/// What a pool holds: cheap to clone (a handle), and able to say whether it still works.
#[doc(hidden)]
pub trait Poolable: Clone {
    /// False once it must never be handed out again (closed, dead connection).
    fn usable(&self) -> bool;
}

/// A leased item, kept by the pool (a clone of the lease's) to see it die.
struct Held<R> {
    item: R,
    /// The lease's number: a release ends this lease only, never a later one of the slot.
    id: u64,
}

struct State<R> {
    /// One place per item: `Some` while leased. Idle and free places are `None`.
    slots: Vec<Option<Held<R>>>,
    /// Idle items and their slots; the last one returned is handed out first.
    idle: Vec<(usize, R)>,
    /// Slots with no item.
    free: Vec<usize>,
    leased: usize,
    opening: usize,
    waiters: usize,
    // Counters live under the lock that every change takes anyway: no atomics.
    opened: u64,
    /// Also the number of the last lease (lease numbers are never reused).
    acquired: u64,
    released: u64,
    discarded: u64,
}

impl<R: Poolable> State<R> {
    /// End lease `id` of slot `index` if it is still on: the first release of a lease
    /// only, whatever path it takes (guard, or reclaim of a dead item).
    fn end_lease(&mut self, index: usize, id: u64) -> Option<R> {
        // The model tests' broken variant drops the lease-number check (a release
        // without its once-guard); loom must catch it.
        let ours = self.slots[index]
            .as_ref()
            .is_some_and(|h| h.id == id || crate::sync::broken("pool"));
        if !ours {
            return None;
        }
        let held = self.slots[index].take()?;
        self.leased -= 1;
        self.released += 1;
        Some(held.item)
    }

    /// Slot `index` (off its lease or off idle) holds no item any more.
    fn put_free(&mut self, index: usize) {
        self.free.push(index);
        self.discarded += 1;
    }

    /// A slot for a new item: a free one, or a new one (the slab never outgrows the
    /// bound: a place was reserved by `opening`).
    fn free_slot(&mut self) -> usize {
        self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        })
    }

    /// The number of a lease whose item died, if one did.
    fn dead_lease(&self, index: usize) -> Option<u64> {
        let held = self.slots[index].as_ref()?;
        (!held.item.usable()).then_some(held.id)
    }
}

/// Counters of a pool. At any quiet moment `acquired == released + in_use`.
///
/// ```no_run
/// let conn = lepus::Connection::open("amqp://127.0.0.1")?;
/// let pool = lepus::ChannelPool::new(&conn);
/// drop(pool.acquire()?);
/// let s = pool.stats();
/// assert_eq!(s.acquired, s.released + s.in_use as u64);
/// println!("{} open, {} idle, {} waiting", s.opened - s.discarded, s.idle, s.waiters);
/// # Ok::<(), lepus::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStats {
    /// Items (channels) the pool opened.
    pub opened: u64,
    /// Successful acquisitions.
    pub acquired: u64,
    /// Acquisitions ended: returned by the guard, or reclaimed because the item died.
    pub released: u64,
    /// Items thrown away because they no longer worked.
    pub discarded: u64,
    /// Items handed out now.
    pub in_use: usize,
    /// Items waiting in the pool.
    pub idle: usize,
    /// Threads waiting in `acquire`.
    pub waiters: usize,
}

/// The pool's bookkeeping: bounded, lazily filled, released at most once per lease.
#[doc(hidden)]
pub struct PoolCore<R> {
    max: usize,
    state: Mutex<State<R>>,
    cv: Condvar,
}

/// One acquisition: the item, and which slot and lease it is.
#[doc(hidden)]
pub struct Lease<R: Poolable> {
    item: R,
    core: Arc<PoolCore<R>>,
    index: usize,
    id: u64,
    /// Set by [`Lease::release_as`]: the drop has nothing left to do.
    done: bool,
}

impl<R: Poolable> Lease<R> {
    /// The leased item.
    pub fn item(&self) -> &R {
        &self.item
    }

    /// End the acquisition, unless another path already did.
    pub fn release(&self) {
        self.core.give_back(self.index, self.id, self.item.usable());
    }

    /// End the acquisition now, the caller having found the item `usable` (or not): the
    /// guard's path, which knows it already and takes the lock once.
    pub fn release_as(&mut self, usable: bool) {
        if !self.done {
            self.done = true;
            self.core.give_back(self.index, self.id, usable);
        }
    }
}

impl<R: Poolable> Drop for Lease<R> {
    fn drop(&mut self) {
        if !self.done {
            self.release();
        }
    }
}

impl<R: Poolable> PoolCore<R> {
    /// A pool of at most `max` items (at least 1).
    pub fn new(max: usize) -> Self {
        PoolCore {
            max: max.max(1),
            state: Mutex::new(State {
                slots: Vec::new(),
                idle: Vec::new(),
                free: Vec::new(),
                leased: 0,
                opening: 0,
                waiters: 0,
                opened: 0,
                acquired: 0,
                released: 0,
                discarded: 0,
            }),
            cv: Condvar::new(),
        }
    }

    /// The bound.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Channels held open or being opened never exceed the bound. Checked (in debug
    /// builds and the model tests) after every change of the state.
    fn check_bound(&self, st: &State<R>) {
        debug_assert!(
            st.leased + st.idle.len() + st.opening <= self.max,
            "pool over its bound: {} leased + {} idle + {} opening > {}",
            st.leased,
            st.idle.len(),
            st.opening,
            self.max
        );
    }

    /// Places taken: leased, idle and being opened (at most [`PoolCore::max`]).
    pub fn occupied(&self) -> usize {
        let st = self.state.lock();
        st.leased + st.idle.len() + st.opening
    }

    /// Hand out the item in slot `index` (not on a lease now).
    fn lease(this: &Arc<Self>, st: &mut State<R>, index: usize, item: R) -> Lease<R> {
        st.acquired += 1;
        let id = st.acquired;
        st.slots[index] = Some(Held {
            item: item.clone(),
            id,
        });
        st.leased += 1;
        this.check_bound(st);
        Lease {
            item,
            core: this.clone(),
            index,
            id,
            done: false,
        }
    }

    /// The most recently returned idle item that still works; dead ones met on the way
    /// are discarded into `dead` (dropped by the caller, outside the lock).
    fn take_idle(st: &mut State<R>, dead: &mut Vec<R>) -> Option<(usize, R)> {
        while let Some((i, item)) = st.idle.pop() {
            if item.usable() {
                return Some((i, item));
            }
            st.put_free(i);
            dead.push(item);
        }
        None
    }

    /// Release every lease whose item died (channel closed by the broker, connection
    /// gone for good), so that its place serves a waiter before its guard is dropped.
    pub fn reclaim_dead(&self) -> usize {
        let mut st = self.state.lock();
        let mut dead = Vec::new();
        for i in 0..st.slots.len() {
            let Some(id) = st.dead_lease(i) else {
                continue;
            };
            if let Some(item) = st.end_lease(i, id) {
                st.put_free(i);
                dead.push(item);
            }
        }
        self.check_bound(&st);
        let n = dead.len();
        if n > 0 {
            // Each freed place may serve another waiter.
            self.cv.notify_all();
        }
        drop(st);
        drop(dead);
        n
    }

    /// A lease's release: back to idle if it still works, else discarded; nothing if the
    /// lease was already released.
    fn give_back(&self, index: usize, id: u64, usable: bool) {
        let mut st = self.state.lock();
        let Some(item) = st.end_lease(index, id) else {
            return;
        };
        let dead = if usable {
            st.idle.push((index, item));
            None
        } else {
            st.put_free(index);
            Some(item)
        };
        self.check_bound(&st);
        if st.waiters > 0 {
            // A waiter counts itself under this lock before it sleeps: none can miss this.
            self.cv.notify_one();
        }
        drop(st);
        // Dropping a dead item may do I/O (a channel sends close): outside the lock.
        drop(dead);
    }

    /// An idle item if one is ready now; never blocks and never opens one.
    pub fn try_acquire(this: &Arc<Self>) -> Option<Lease<R>> {
        let mut dead = Vec::new();
        let mut st = this.state.lock();
        let (i, item) = Self::take_idle(&mut st, &mut dead)?;
        Some(Self::lease(this, &mut st, i, item))
    }

    /// An item, opening one with `open` if the bound allows, else waiting until
    /// `deadline` for one to come back.
    pub fn acquire(
        this: &Arc<Self>,
        deadline: Instant,
        open: impl FnOnce() -> Result<R>,
    ) -> Result<Lease<R>> {
        Self::acquire_by(this, || deadline, |_| open())
    }

    /// [`PoolCore::acquire`] with the deadline read from `deadline` only when it is
    /// needed (to open an item or to wait): an idle item is handed out without a clock
    /// read.
    pub fn acquire_by(
        this: &Arc<Self>,
        deadline: impl FnOnce() -> Instant,
        open: impl FnOnce(Instant) -> Result<R>,
    ) -> Result<Lease<R>> {
        let mut dead = Vec::new();
        let mut st = this.state.lock();
        if let Some((i, item)) = Self::take_idle(&mut st, &mut dead) {
            return Ok(Self::lease(this, &mut st, i, item));
        }
        let deadline = deadline();
        loop {
            if let Some((i, item)) = Self::take_idle(&mut st, &mut dead) {
                return Ok(Self::lease(this, &mut st, i, item));
            }
            if st.leased + st.opening < this.max {
                st.opening += 1;
                this.check_bound(&st);
                drop(st);
                drop(dead);
                return Self::open_into_slot(this, || open(deadline));
            }
            // Full: places held by dead items can be taken back now.
            if (0..st.slots.len()).any(|i| st.dead_lease(i).is_some()) {
                drop(st);
                this.reclaim_dead();
                st = this.state.lock();
                continue;
            }
            st.waiters += 1;
            let timed_out = this.cv.wait_until_deadline(&mut st, deadline);
            st.waiters -= 1;
            if timed_out && st.idle.is_empty() && st.leased + st.opening >= this.max {
                return Err(Error::Timeout("a free channel in the pool"));
            }
        }
    }

    /// Open an item into the place `acquire` reserved (outside the lock: round trips).
    fn open_into_slot(this: &Arc<Self>, open: impl FnOnce() -> Result<R>) -> Result<Lease<R>> {
        let opened = open();
        let mut st = this.state.lock();
        st.opening -= 1;
        match opened {
            Ok(item) => {
                st.opened += 1;
                let i = st.free_slot();
                Ok(Self::lease(this, &mut st, i, item))
            }
            Err(e) => {
                // The place we reserved is free again for another waiter.
                this.cv.notify_one();
                Err(e)
            }
        }
    }

    /// Counters, read under the pool's lock.
    pub fn stats(&self) -> PoolStats {
        let st = self.state.lock();
        PoolStats {
            opened: st.opened,
            acquired: st.acquired,
            released: st.released,
            discarded: st.discarded,
            in_use: st.leased,
            idle: st.idle.len(),
            waiters: st.waiters,
        }
    }
}

#[cfg(all(test, not(lepus_loom)))]
mod tests {
    use super::*;
    use crate::sync::{AtomicBool, Ordering};
    use std::time::Duration;

    #[derive(Clone)]
    struct Item(Arc<AtomicBool>);
    impl Poolable for Item {
        fn usable(&self) -> bool {
            self.0.load(Ordering::Acquire)
        }
    }

    #[test]
    fn dead_items_are_reclaimed_once_and_never_reused() {
        let core = Arc::new(PoolCore::new(1));
        let alive = Arc::new(AtomicBool::new(true));
        let far = Instant::now() + Duration::from_secs(5);
        let a = PoolCore::acquire(&core, far, || Ok(Item(alive.clone()))).unwrap();
        alive.store(false, Ordering::Release);
        // Full, but the held item died: its place is reclaimed for the next caller.
        let fresh = Arc::new(AtomicBool::new(true));
        let b = PoolCore::acquire(&core, far, || Ok(Item(fresh.clone()))).unwrap();
        assert!(Arc::ptr_eq(&b.item().0, &fresh));
        drop(a); // already released by the pool: nothing happens
        drop(b);
        let s = core.stats();
        assert_eq!((s.acquired, s.released, s.in_use), (2, 2, 0));
        assert_eq!((s.opened, s.discarded, s.idle), (2, 1, 1));
    }

    #[test]
    fn a_second_release_never_ends_a_later_lease_of_the_slot() {
        let core = Arc::new(PoolCore::new(1));
        let alive = Arc::new(AtomicBool::new(true));
        let far = Instant::now() + Duration::from_secs(5);
        let a = PoolCore::acquire(&core, far, || Ok(Item(alive.clone()))).unwrap();
        a.release();
        let b = PoolCore::try_acquire(&core).expect("the item a gave back");
        drop(a); // a's second release: b's lease of the same slot stays on
        assert_eq!(core.stats().in_use, 1);
        assert!(
            PoolCore::try_acquire(&core).is_none(),
            "b's item handed out again"
        );
        drop(b);
        let s = core.stats();
        assert_eq!((s.opened, s.acquired, s.released, s.idle), (1, 2, 2, 1));
        // Many pairs: the slab stays at one slot and the counters add up.
        for _ in 0..1000 {
            drop(PoolCore::acquire(&core, far, || Ok(Item(alive.clone()))).unwrap());
        }
        let s = core.stats();
        assert_eq!(
            (s.opened, s.acquired, s.released, s.in_use),
            (1, 1002, 1002, 0)
        );
        assert_eq!(core.state.lock().slots.len(), 1);
    }

    #[test]
    fn full_pool_times_out() {
        let core = Arc::new(PoolCore::new(1));
        let alive = Arc::new(AtomicBool::new(true));
        let _a = PoolCore::acquire(&core, Instant::now(), || Ok(Item(alive.clone()))).unwrap();
        let r = PoolCore::acquire(&core, Instant::now() + Duration::from_millis(20), || {
            Ok(Item(alive.clone()))
        });
        assert!(matches!(r, Err(Error::Timeout(_))));
        assert_eq!(core.stats().waiters, 0);
    }
}
