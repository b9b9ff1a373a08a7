//! A bounded pool of channels on one connection: lazily opened, handed out behind a
//! guard whose acquisition is released exactly once, broken channels discarded. The
//! bookkeeping is `pool_core`'s, which the loom models check.

use std::ops::Deref;
use std::time::{Duration, Instant};

use crate::channel::Channel;
use crate::connection::Connection;
use crate::error::Result;
use crate::pool_core::{Lease, PoolCore, PoolStats, Poolable};
use crate::sync::Arc;

impl Poolable for Channel {
    fn usable(&self) -> bool {
        self.pool_usable()
    }
}

/// A bounded pool of channels on one connection (default 100), opened lazily.
///
/// ```no_run
/// let conn = lepus::Connection::open("amqp://127.0.0.1")?;
/// let pool = lepus::ChannelPool::new(&conn, 100);
/// let ch = pool.acquire()?; // derefs to a Channel; goes back to the pool on drop
/// ch.basic_publish("", "jobs", b"x", &lepus::BasicProperties::new(), &Default::default())?;
/// # Ok::<(), lepus::Error>(())
/// ```
///
/// Channels survive connection recovery with their pool. A channel closed by the
/// broker (or the application), or on a connection that will not come back, is
/// discarded, never handed out again; if the pool is full, its place is reclaimed
/// for a waiter even before its guard is dropped.
#[derive(Clone)]
pub struct ChannelPool {
    conn: Connection,
    core: Arc<PoolCore<Channel>>,
}

impl std::fmt::Debug for ChannelPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelPool")
            .field("max", &self.core.max())
            .field("stats", &self.stats())
            .finish()
    }
}

/// A channel taken from a [`ChannelPool`]; derefs to [`Channel`] and goes back to the
/// pool when dropped (or with [`PooledChannel::release`]), exactly once.
pub struct PooledChannel {
    lease: Lease<Channel>,
}

impl std::fmt::Debug for PooledChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledChannel")
            .field("channel", self.lease.item())
            .finish()
    }
}

impl ChannelPool {
    /// A pool of at most `max` channels (at least 1) on `conn`.
    pub fn new(conn: &Connection, max: usize) -> Self {
        ChannelPool {
            conn: conn.clone(),
            core: Arc::new(PoolCore::new(max)),
        }
    }

    /// The most channels this pool holds open.
    pub fn max(&self) -> usize {
        self.core.max()
    }

    /// A channel, waiting up to the connection's operation timeout for one.
    pub fn acquire(&self) -> Result<PooledChannel> {
        self.acquire_until(Instant::now() + self.conn.inner().opts.operation_timeout)
    }

    /// A channel, waiting up to `timeout` for one.
    pub fn acquire_timeout(&self, timeout: Duration) -> Result<PooledChannel> {
        self.acquire_until(Instant::now() + timeout)
    }

    /// A channel, waiting until `deadline` for one to be free (opening one takes a
    /// round trip to the broker, within the same deadline).
    pub fn acquire_until(&self, deadline: Instant) -> Result<PooledChannel> {
        let lease = PoolCore::acquire(&self.core, deadline, || {
            self.conn.open_channel_until(deadline)
        })?;
        Ok(PooledChannel { lease })
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
        self.lease.release();
    }

    /// Close the channel and give its place back (it is not reused).
    pub fn discard(self) {
        let _ = self.lease.item().close();
        self.lease.release();
    }
}

impl Deref for PooledChannel {
    type Target = Channel;
    fn deref(&self) -> &Channel {
        self.lease.item()
    }
}
