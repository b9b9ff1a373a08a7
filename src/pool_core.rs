//! The bookkeeping of the channel pool, generic over what it pools so that the model
//! tests run this very code with loom: acquisitions released exactly once (by the guard,
//! or by the pool when the item dies first), the bound held at every step, broken items
//! discarded.

use std::time::Instant;

use crate::error::{Error, Result};
use crate::sync::{Arc, AtomicBool, AtomicU64, Condvar, CondvarExt, Mutex, Ordering};

/// Default number of channels a pool may hold open.
pub const DEFAULT_POOL_SIZE: usize = 100;

/// What a pool holds: cheap to clone (a handle), and able to say whether it still works.
#[doc(hidden)]
pub trait Poolable: Clone {
    /// False once it must never be handed out again (closed, dead connection).
    fn usable(&self) -> bool;
}

/// The once-flag of one acquisition, shared by its guard and the pool.
#[doc(hidden)]
#[derive(Debug, Default)]
pub struct LeaseFlag {
    released: AtomicBool,
}

impl LeaseFlag {
    /// True for the first caller only: that caller performs the release.
    fn claim(&self) -> bool {
        // The model tests' broken variant drops the once-guard; loom must catch it.
        if crate::sync::broken("pool") {
            return !self.released.load(Ordering::Acquire);
        }
        !self.released.swap(true, Ordering::AcqRel)
    }
}

struct State<R> {
    idle: Vec<R>,
    leased: Vec<(Arc<LeaseFlag>, R)>,
    opening: usize,
    waiters: usize,
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
    opened: AtomicU64,
    acquired: AtomicU64,
    released: AtomicU64,
    discarded: AtomicU64,
}

/// One acquisition: the item and its once-flag.
#[doc(hidden)]
pub struct Lease<R: Poolable> {
    item: R,
    flag: Arc<LeaseFlag>,
    core: Arc<PoolCore<R>>,
}

impl<R: Poolable> Lease<R> {
    /// The leased item.
    pub fn item(&self) -> &R {
        &self.item
    }
    /// End the acquisition, unless another path already did.
    pub fn release(&self) {
        if self.flag.claim() {
            self.core.give_back(&self.flag, self.item.clone());
        }
    }
}

impl<R: Poolable> Drop for Lease<R> {
    fn drop(&mut self) {
        self.release();
    }
}

impl<R: Poolable> PoolCore<R> {
    /// A pool of at most `max` items (at least 1).
    pub fn new(max: usize) -> Self {
        PoolCore {
            max: max.max(1),
            state: Mutex::new(State {
                idle: Vec::new(),
                leased: Vec::new(),
                opening: 0,
                waiters: 0,
            }),
            cv: Condvar::new(),
            opened: AtomicU64::new(0),
            acquired: AtomicU64::new(0),
            released: AtomicU64::new(0),
            discarded: AtomicU64::new(0),
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
            st.leased.len() + st.idle.len() + st.opening <= self.max,
            "pool over its bound: {} leased + {} idle + {} opening > {}",
            st.leased.len(),
            st.idle.len(),
            st.opening,
            self.max
        );
    }

    /// Places taken: leased, idle and being opened (at most [`PoolCore::max`]).
    pub fn occupied(&self) -> usize {
        let st = self.state.lock();
        st.leased.len() + st.idle.len() + st.opening
    }

    fn lease(this: &Arc<Self>, st: &mut State<R>, item: R) -> Lease<R> {
        let flag = Arc::new(LeaseFlag::default());
        st.leased.push((flag.clone(), item.clone()));
        this.check_bound(st);
        this.acquired.fetch_add(1, Ordering::AcqRel);
        Lease {
            item,
            flag,
            core: this.clone(),
        }
    }

    fn take_idle(&self, st: &mut State<R>) -> Option<R> {
        while let Some(r) = st.idle.pop() {
            if r.usable() {
                return Some(r);
            }
            self.discarded.fetch_add(1, Ordering::AcqRel);
        }
        None
    }

    /// Release every lease whose item died (channel closed by the broker, connection
    /// gone for good), so that its place serves a waiter before its guard is dropped.
    pub fn reclaim_dead(&self) -> usize {
        let mut st = self.state.lock();
        let mut dead = Vec::new();
        let mut i = 0;
        while i < st.leased.len() {
            if st.leased[i].1.usable() {
                i += 1;
                continue;
            }
            let (flag, item) = st.leased.swap_remove(i);
            if flag.claim() {
                self.released.fetch_add(1, Ordering::AcqRel);
                self.discarded.fetch_add(1, Ordering::AcqRel);
                dead.push(item);
            }
        }
        let n = dead.len();
        if n > 0 {
            self.cv.notify_all();
        }
        drop(st);
        drop(dead);
        n
    }

    /// The guard's release: back to idle if it still works.
    fn give_back(&self, flag: &Arc<LeaseFlag>, item: R) {
        let mut st = self.state.lock();
        if let Some(i) = st.leased.iter().position(|(f, _)| Arc::ptr_eq(f, flag)) {
            st.leased.swap_remove(i);
        }
        self.released.fetch_add(1, Ordering::AcqRel);
        let dead = if item.usable() {
            st.idle.push(item);
            None
        } else {
            self.discarded.fetch_add(1, Ordering::AcqRel);
            Some(item)
        };
        self.check_bound(&st);
        self.cv.notify_one();
        drop(st);
        // Dropping a dead item may do I/O (a channel sends close): outside the lock.
        drop(dead);
    }

    /// An idle item if one is ready now; never blocks and never opens one.
    pub fn try_acquire(this: &Arc<Self>) -> Option<Lease<R>> {
        let mut st = this.state.lock();
        let item = this.take_idle(&mut st)?;
        Some(Self::lease(this, &mut st, item))
    }

    /// An item, opening one with `open` if the bound allows, else waiting until
    /// `deadline` for one to come back.
    pub fn acquire(
        this: &Arc<Self>,
        deadline: Instant,
        open: impl Fn() -> Result<R>,
    ) -> Result<Lease<R>> {
        let (core, self_) = (this, &**this);
        let mut st = self_.state.lock();
        loop {
            if let Some(item) = self_.take_idle(&mut st) {
                return Ok(Self::lease(core, &mut st, item));
            }
            if st.leased.len() + st.opening < self_.max {
                st.opening += 1;
                self_.check_bound(&st);
                drop(st);
                let opened = open();
                let mut st = self_.state.lock();
                st.opening -= 1;
                return match opened {
                    Ok(item) => {
                        self_.opened.fetch_add(1, Ordering::AcqRel);
                        Ok(Self::lease(core, &mut st, item))
                    }
                    Err(e) => {
                        // The place we reserved is free again for another waiter.
                        self_.cv.notify_one();
                        Err(e)
                    }
                };
            }
            // Full: places held by dead items can be taken back now.
            if st.leased.iter().any(|(_, r)| !r.usable()) {
                drop(st);
                self_.reclaim_dead();
                st = self_.state.lock();
                continue;
            }
            st.waiters += 1;
            let timed_out = self_.cv.wait_until_deadline(&mut st, deadline);
            st.waiters -= 1;
            if timed_out && st.idle.is_empty() && st.leased.len() + st.opening >= self_.max {
                return Err(Error::Timeout("a free channel in the pool"));
            }
        }
    }

    /// Counters, read under the pool's lock.
    pub fn stats(&self) -> PoolStats {
        let st = self.state.lock();
        PoolStats {
            opened: self.opened.load(Ordering::Acquire),
            acquired: self.acquired.load(Ordering::Acquire),
            released: self.released.load(Ordering::Acquire),
            discarded: self.discarded.load(Ordering::Acquire),
            in_use: st.leased.len(),
            idle: st.idle.len(),
            waiters: st.waiters,
        }
    }
}

#[cfg(all(test, not(lepus_loom)))]
mod tests {
    use super::*;
    use crate::sync::AtomicBool;
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
