//! A bounded pool of channels on one connection: lazily opened and set up alike (confirm
//! mode, qos, a hook), handed out behind a guard whose acquisition is released exactly
//! once, and a channel that comes back changed or broken is discarded. The bookkeeping is
//! `pool_core`'s, which the loom models check.

use std::ops::Deref;
use std::time::{Duration, Instant};

use crate::channel::Channel;
use crate::connection::Connection;
use crate::error::Result;
use crate::pool_core::{DEFAULT_POOL_SIZE, Lease, PoolCore, PoolStats, Poolable};
use crate::sync::Arc;

/// The user's set-up step for each channel the pool opens.
type Hook = Arc<dyn Fn(&Channel) -> Result<()> + Send + Sync>;

/// What the pool does to each channel it opens.
#[derive(Clone, Default)]
struct SetUp {
    confirm: bool,
    qos: Option<(u16, bool)>,
    hook: Option<Hook>,
}

impl SetUp {
    fn apply(&self, ch: &Channel) -> Result<()> {
        if self.confirm {
            ch.confirm_select()?;
        }
        if let Some((prefetch, global)) = self.qos {
            ch.basic_qos(prefetch, global)?;
        }
        if let Some(hook) = &self.hook {
            hook(ch)?;
        }
        Ok(())
    }
}

/// The state of a channel that the pool compares on release: the channel is handed out
/// again only if a borrower left it as the set-up made it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Baseline {
    confirm: bool,
    qos: Option<(u16, bool)>,
    tx: bool,
    consumers: usize,
}

impl Baseline {
    fn of(ch: &Channel) -> Self {
        let r = ch.record().lock();
        Baseline {
            confirm: r.confirm,
            qos: r.qos,
            tx: r.tx,
            consumers: r.consumers.len(),
        }
    }
}

/// A pooled channel with the state its set-up gave it.
#[derive(Clone)]
struct Pooled {
    channel: Channel,
    baseline: Baseline,
}

impl Poolable for Pooled {
    fn usable(&self) -> bool {
        self.channel.pool_usable()
    }
}

/// A bounded pool of channels on one connection (default [`DEFAULT_POOL_SIZE`], 100),
/// opened lazily and set up alike.
///
/// ```no_run
/// let conn = lepus::Connection::open("amqp://127.0.0.1")?;
/// let pool = lepus::ChannelPool::new(&conn);
/// let ch = pool.acquire()?; // derefs to a Channel; goes back to the pool on drop
/// ch.basic_publish("", "jobs", b"x", &lepus::BasicProperties::new(), &Default::default())?;
/// # Ok::<(), lepus::Error>(())
/// ```
///
/// # Set-up, and what a borrower may change
///
/// [`ChannelPool::builder`] sets what every channel gets when the pool opens it: confirm
/// mode, a qos, and a hook of your own. A borrower may publish, consume, get, ack,
/// declare and bind. It must give the channel back as the set-up left it: a channel
/// whose confirm mode, qos or transaction mode differs from the set-up's, or with a
/// consumer still running, is closed when its guard is dropped and discarded (counted
/// in [`PoolStats::discarded`]), and the next borrower gets a fresh channel set up by the
/// pool. So one borrower's `confirm_select` or `basic_qos` never leaks into the next
/// borrower's channel. Cancel consumers, and wait for confirmations you need, before
/// giving a channel back (a discarded channel's waiters get [`crate::Error::ChannelClosed`]).
///
/// ```no_run
/// let conn = lepus::Connection::open("amqp://127.0.0.1")?;
/// let pool = lepus::ChannelPool::builder(&conn).max(20).confirm_select().build();
/// let ch = pool.acquire()?; // already in confirm mode
/// let props = lepus::BasicProperties::new();
/// ch.basic_publish_confirmed("", "jobs", b"x", &props, &Default::default())?.wait()?;
/// # Ok::<(), lepus::Error>(())
/// ```
///
/// In a confirm-mode pool, [`Channel::wait_for_confirms`] covers every message
/// published on the channel, by earlier borrowers too; a
/// [`Confirmation`](crate::Confirmation) per message is the borrower's own.
///
/// Channels survive connection recovery with their pool (recovery restores their set-up).
/// A channel closed by the broker (or the application), or on a connection that will not
/// come back, is discarded, never handed out again; if the pool is full, its place is
/// reclaimed for a waiter even before its guard is dropped.
#[derive(Clone)]
pub struct ChannelPool {
    conn: Connection,
    core: Arc<PoolCore<Pooled>>,
    setup: SetUp,
}

impl std::fmt::Debug for ChannelPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelPool")
            .field("max", &self.core.max())
            .field("confirm", &self.setup.confirm)
            .field("qos", &self.setup.qos)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Builds a [`ChannelPool`]: its size and the set-up of each channel it opens.
///
/// ```no_run
/// let conn = lepus::Connection::open("amqp://127.0.0.1")?;
/// let pool = lepus::ChannelPool::builder(&conn)
///     .max(50)
///     .qos(100, false)
///     .on_open(|ch| {
///         ch.queue_declare("jobs", &lepus::QueueDeclareOptions::default()).map(|_| ())
///     })
///     .build();
/// # Ok::<(), lepus::Error>(())
/// ```
#[must_use = "call build() to get the pool"]
pub struct ChannelPoolBuilder {
    conn: Connection,
    max: usize,
    setup: SetUp,
}

impl std::fmt::Debug for ChannelPoolBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelPoolBuilder")
            .field("max", &self.max)
            .field("confirm", &self.setup.confirm)
            .field("qos", &self.setup.qos)
            .field("hook", &self.setup.hook.is_some())
            .finish()
    }
}

impl ChannelPoolBuilder {
    /// At most `max` channels (at least 1; default [`DEFAULT_POOL_SIZE`]).
    pub fn max(mut self, max: usize) -> Self {
        self.max = max;
        self
    }

    /// Put every channel in confirm mode ([`Channel::confirm_select`]).
    pub fn confirm_select(mut self) -> Self {
        self.setup.confirm = true;
        self
    }

    /// Give every channel this [`Channel::basic_qos`].
    pub fn qos(mut self, prefetch_count: u16, global: bool) -> Self {
        self.setup.qos = Some((prefetch_count, global));
        self
    }

    /// Run `hook` on every channel the pool opens, after confirm mode and qos; an error
    /// closes that channel and fails the `acquire` that opened it. What the hook leaves
    /// (confirm, qos or transaction mode) is what the pool expects back on release.
    pub fn on_open(mut self, hook: impl Fn(&Channel) -> Result<()> + Send + Sync + 'static) -> Self {
        self.setup.hook = Some(Arc::new(hook));
        self
    }

    /// The pool.
    pub fn build(self) -> ChannelPool {
        ChannelPool {
            conn: self.conn,
            core: Arc::new(PoolCore::new(self.max)),
            setup: self.setup,
        }
    }
}

/// A channel taken from a [`ChannelPool`]; derefs to [`Channel`] and goes back to the
/// pool when dropped (or with [`PooledChannel::release`]), exactly once. A channel the
/// borrower changed (see [`ChannelPool`]) is closed and discarded instead.
///
/// ```no_run
/// let conn = lepus::Connection::open("amqp://127.0.0.1")?;
/// let pool = lepus::ChannelPool::new(&conn);
/// {
///     let ch = pool.acquire()?; // a PooledChannel: use it as a &Channel
///     ch.queue_declare("jobs", &Default::default())?;
/// } // dropped: back to the pool
/// let ch = pool.acquire()?;
/// ch.discard(); // or closed, never handed out again
/// # Ok::<(), lepus::Error>(())
/// ```
pub struct PooledChannel {
    lease: Lease<Pooled>,
}

impl std::fmt::Debug for PooledChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledChannel")
            .field("channel", &self.lease.item().channel)
            .finish()
    }
}

impl ChannelPool {
    /// A pool of at most [`DEFAULT_POOL_SIZE`] channels on `conn`, with no set-up.
    pub fn new(conn: &Connection) -> Self {
        Self::builder(conn).build()
    }

    /// A pool of at most `max` channels (at least 1) on `conn`, with no set-up.
    pub fn with_max(conn: &Connection, max: usize) -> Self {
        Self::builder(conn).max(max).build()
    }

    /// A pool with a size and a set-up for each channel (confirm mode, qos, a hook).
    pub fn builder(conn: &Connection) -> ChannelPoolBuilder {
        ChannelPoolBuilder {
            conn: conn.clone(),
            max: DEFAULT_POOL_SIZE,
            setup: SetUp::default(),
        }
    }

    /// The most channels this pool holds open.
    pub fn max(&self) -> usize {
        self.core.max()
    }

    /// A channel, waiting up to the connection's operation timeout for one.
    pub fn acquire(&self) -> Result<PooledChannel> {
        // The clock is read only if the pool has no idle channel (see `acquire_by`).
        let timeout = self.conn.inner().opts.operation_timeout;
        let lease = PoolCore::acquire_by(
            &self.core,
            || Instant::now() + timeout,
            |deadline| self.open(deadline),
        )?;
        Ok(PooledChannel { lease })
    }

    /// A channel, waiting up to `timeout` for one.
    pub fn acquire_timeout(&self, timeout: Duration) -> Result<PooledChannel> {
        self.acquire_until(Instant::now() + timeout)
    }

    /// A channel, waiting until `deadline` for one to be free (opening and setting up one
    /// takes round trips to the broker, within the same deadline).
    pub fn acquire_until(&self, deadline: Instant) -> Result<PooledChannel> {
        let lease = PoolCore::acquire(&self.core, deadline, || self.open(deadline))?;
        Ok(PooledChannel { lease })
    }

    fn open(&self, deadline: Instant) -> Result<Pooled> {
        let channel = self.conn.open_channel_until(deadline)?;
        let within = deadline.saturating_duration_since(Instant::now());
        if let Err(e) = self.setup.apply(&channel.with_timeout(within)) {
            channel.close_nowait();
            return Err(e);
        }
        let baseline = Baseline::of(&channel);
        Ok(Pooled { channel, baseline })
    }

    /// An idle channel if one is ready now; never blocks (so never opens a channel).
    pub fn try_acquire(&self) -> Option<PooledChannel> {
        PoolCore::try_acquire(&self.core).map(|lease| PooledChannel { lease })
    }

    /// Counters.
    pub fn stats(&self) -> PoolStats {
        self.core.stats()
    }
}

impl PooledChannel {
    /// Give the channel back now (dropping the guard does the same).
    pub fn release(self) {
        drop(self);
    }

    /// Close the channel and give its place back (it is not reused).
    pub fn discard(self) {
        let _ = self.lease.item().channel.close();
    }
}

impl Drop for PooledChannel {
    fn drop(&mut self) {
        let p = self.lease.item();
        let now = Baseline::of(&p.channel);
        let usable = p.channel.pool_usable();
        let changed = now != p.baseline;
        if usable && changed {
            // Changed by the borrower: close it and discard it rather than hand the
            // change to the next borrower.
            crate::trace::debug!(
                "pool: channel {} came back changed ({now:?}, set up as {:?}); discarded",
                p.channel.id(),
                p.baseline
            );
            p.channel.close_nowait();
        }
        // What was just checked goes with the release: the pool's lock is taken once.
        self.lease.release_as(usable && !changed);
    }
}

impl Deref for PooledChannel {
    type Target = Channel;
    fn deref(&self) -> &Channel {
        &self.lease.item().channel
    }
}
