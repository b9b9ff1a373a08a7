//! A bounded pool of channels on one connection: lazily opened, handed out behind a
//! guard that gives its channel back exactly once, broken channels discarded.

use std::ops::Deref;
use std::time::{Duration, Instant};

use crate::channel::Channel;
use crate::connection::Connection;
use crate::error::{Error, Result};
use crate::sync::{Arc, AtomicBool, AtomicU64, Condvar, CondvarExt, Mutex, Ordering};

/// Default number of channels a pool may hold open.
pub const DEFAULT_POOL_SIZE: usize = 100;

struct State {
    idle: Vec<Channel>,
    in_use: usize,
    opening: usize,
    waiters: usize,
}

struct PoolInner {
    conn: Connection,
    max: usize,
    state: Mutex<State>,
    cv: Condvar,
    opened: AtomicU64,
    acquired: AtomicU64,
    released: AtomicU64,
    discarded: AtomicU64,
}

/// Counters of a [`ChannelPool`]. At any quiet moment `acquired == released + in_use`,
/// and `opened == idle + in_use + discarded` once every channel has been returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Channels the pool opened.
    pub opened: u64,
    /// Successful acquisitions.
    pub acquired: u64,
    /// Acquisitions ended (channel returned or discarded).
    pub released: u64,
    /// Channels thrown away because they were closed (by the broker, the application,
    /// or a connection that will not recover).
    pub discarded: u64,
    /// Channels handed out now.
    pub in_use: usize,
    /// Channels waiting in the pool.
    pub idle: usize,
    /// Threads waiting in `acquire`.
    pub waiters: usize,
}

/// A bounded pool of channels on one connection (default 100), opened lazily.
///
/// ```no_run
/// let conn = lepus::Connection::open("amqp://127.0.0.1")?;
/// let pool = lepus::ChannelPool::new(&conn, 100);
/// let ch = pool.acquire()?; // derefs to a Channel; goes back to the pool on drop
/// ch.basic_publish("", "jobs", b"x", &lepus::BasicProperties::new(), Default::default())?;
/// # Ok::<(), lepus::Error>(())
/// ```
///
/// Channels survive connection recovery with their pool. A channel closed by the broker
/// (or by the application) is discarded when it comes back, never handed out again.
#[derive(Clone)]
pub struct ChannelPool {
    inner: Arc<PoolInner>,
}

impl std::fmt::Debug for ChannelPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelPool")
            .field("max", &self.inner.max)
            .field("stats", &self.stats())
            .finish()
    }
}

/// A channel taken from a [`ChannelPool`]; derefs to [`Channel`] and goes back to the
/// pool when dropped (or with [`PooledChannel::release`]), exactly once.
pub struct PooledChannel {
    channel: Option<Channel>,
    released: AtomicBool,
    pool: Arc<PoolInner>,
}

impl std::fmt::Debug for PooledChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledChannel")
            .field("channel", &self.channel)
            .finish()
    }
}

impl ChannelPool {
    /// A pool of at most `max` channels (at least 1) on `conn`.
    pub fn new(conn: &Connection, max: usize) -> Self {
        ChannelPool {
            inner: Arc::new(PoolInner {
                conn: conn.clone(),
                max: max.max(1),
                state: Mutex::new(State {
                    idle: Vec::new(),
                    in_use: 0,
                    opening: 0,
                    waiters: 0,
                }),
                cv: Condvar::new(),
                opened: AtomicU64::new(0),
                acquired: AtomicU64::new(0),
                released: AtomicU64::new(0),
                discarded: AtomicU64::new(0),
            }),
        }
    }

    /// The most channels this pool holds open.
    pub fn max(&self) -> usize {
        self.inner.max
    }

    /// A channel, waiting up to the connection's operation timeout for one to be free.
    pub fn acquire(&self) -> Result<PooledChannel> {
        self.acquire_until(Instant::now() + self.inner.conn.inner().opts.operation_timeout)
    }

    /// A channel, waiting up to `timeout` for one to be free.
    pub fn acquire_timeout(&self, timeout: Duration) -> Result<PooledChannel> {
        self.acquire_until(Instant::now() + timeout)
    }

    /// An idle channel if one is ready now; never blocks (so never opens a channel,
    /// which takes a round trip to the broker).
    pub fn try_acquire(&self) -> Option<PooledChannel> {
        let mut st = self.inner.state.lock();
        let ch = self.take_idle(&mut st)?;
        st.in_use += 1;
        drop(st);
        Some(self.guard(ch))
    }

    fn guard(&self, ch: Channel) -> PooledChannel {
        self.inner.acquired.fetch_add(1, Ordering::AcqRel);
        PooledChannel {
            channel: Some(ch),
            released: AtomicBool::new(false),
            pool: self.inner.clone(),
        }
    }

    /// Pop idle channels until a usable one; broken ones are counted and dropped.
    fn take_idle(&self, st: &mut State) -> Option<Channel> {
        while let Some(ch) = st.idle.pop() {
            if ch.pool_usable() {
                return Some(ch);
            }
            self.inner.discarded.fetch_add(1, Ordering::AcqRel);
        }
        None
    }

    /// A channel, waiting until `deadline` for one to be free.
    pub fn acquire_until(&self, deadline: Instant) -> Result<PooledChannel> {
        let mut st = self.inner.state.lock();
        loop {
            if let Some(ch) = self.take_idle(&mut st) {
                st.in_use += 1;
                drop(st);
                return Ok(self.guard(ch));
            }
            if st.in_use + st.opening < self.inner.max {
                st.opening += 1;
                drop(st);
                let opened = self.inner.conn.open_channel_until(deadline);
                let mut st = self.inner.state.lock();
                st.opening -= 1;
                return match opened {
                    Ok(ch) => {
                        self.inner.opened.fetch_add(1, Ordering::AcqRel);
                        st.in_use += 1;
                        drop(st);
                        Ok(self.guard(ch))
                    }
                    Err(e) => {
                        // The slot we reserved is free again for another waiter.
                        self.inner.cv.notify_one();
                        Err(e)
                    }
                };
            }
            st.waiters += 1;
            let timed_out = self.inner.cv.wait_until_deadline(&mut st, deadline);
            st.waiters -= 1;
            if timed_out && st.idle.is_empty() && st.in_use + st.opening >= self.inner.max {
                return Err(Error::Timeout("a free channel in the pool"));
            }
        }
    }

    /// Counters, read consistently under the pool's lock.
    pub fn stats(&self) -> PoolStats {
        let st = self.inner.state.lock();
        PoolStats {
            opened: self.inner.opened.load(Ordering::Acquire),
            acquired: self.inner.acquired.load(Ordering::Acquire),
            released: self.inner.released.load(Ordering::Acquire),
            discarded: self.inner.discarded.load(Ordering::Acquire),
            in_use: st.in_use,
            idle: st.idle.len(),
            waiters: st.waiters,
        }
    }
}

impl PoolInner {
    /// The one way back into the pool; the guard calls it at most once.
    fn release(&self, ch: Channel) {
        let mut st = self.state.lock();
        st.in_use -= 1;
        self.released.fetch_add(1, Ordering::AcqRel);
        let discard = if ch.pool_usable() {
            st.idle.push(ch);
            None
        } else {
            self.discarded.fetch_add(1, Ordering::AcqRel);
            Some(ch)
        };
        self.cv.notify_one();
        drop(st);
        // Dropping a broken channel may send channel.close: outside the lock.
        drop(discard);
    }
}

impl PooledChannel {
    /// Give the channel back now (dropping the guard does the same).
    pub fn release(mut self) {
        self.release_once();
    }

    /// Close the channel and give its place back (e.g. after a protocol error the
    /// application does not want to reuse it).
    pub fn discard(mut self) {
        if let Some(ch) = &self.channel {
            let _ = ch.close();
        }
        self.release_once();
    }

    fn release_once(&mut self) {
        if self.released.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(ch) = self.channel.take() {
            self.pool.release(ch);
        }
    }
}

impl Deref for PooledChannel {
    type Target = Channel;
    fn deref(&self) -> &Channel {
        self.channel
            .as_ref()
            .expect("a pooled channel is present until its guard is released")
    }
}

impl Drop for PooledChannel {
    fn drop(&mut self) {
        self.release_once();
    }
}
