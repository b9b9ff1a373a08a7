//! The `Connection` handle: open (handshake on the caller's thread, then the I/O
//! thread), observe blocked state, survive link failures through generations (one TCP
//! connection each), close. Its state is in connection_state.rs; channels are opened from
//! it in channel.rs.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::connection_state::{ConnectionInner, Recover};
use crate::error::{Error, Result};
use crate::events::{ConnectionEvent, RecoveryEvent};
use crate::options::ConnectionOptions;
use crate::protocol::table::FieldTable;
use crate::recovery;
use crate::refresher;
use crate::stats::ConnectionStats;
use crate::sync::Arc;

/// A connection to the broker. Cheap to clone, `Send + Sync`: share one between threads
/// and give each thread its own [`Channel`](crate::Channel). The last handle dropped (connections and
/// channels alike) closes it.
///
/// With automatic recovery (the default, see [`crate::RecoveryOptions`]) a lost link is
/// replaced by a new TCP connection: the same `Connection`, [`Channel`](crate::Channel) and
/// [`crate::Consumer`] handles keep working on it.
///
/// ```no_run
/// use std::time::Duration;
/// use lepus::{Connection, ConnectionOptions, RecoveryOptions};
///
/// // By URI (heartbeat, frame_max, ... as query parameters) ...
/// let conn = Connection::open("amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=10")?;
/// // ... or with options.
/// let conn2 = Connection::open_with(
///     ConnectionOptions::from_uri("amqp://127.0.0.1")?
///         .connection_name("billing-worker")
///         .operation_timeout(Duration::from_secs(5))
///         .recovery(RecoveryOptions::new().backoff(Duration::from_millis(100), Duration::from_secs(5))),
/// )?;
/// // One connection, shared by threads: clone it (a handle) or share a reference.
/// let ch = conn.open_channel()?;
/// conn.close()?;
/// conn2.close()?;
/// # Ok::<(), lepus::Error>(())
/// ```
#[derive(Clone)]
pub struct Connection {
    inner: Arc<ConnectionInner>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let o = &self.inner.opts;
        f.debug_struct("Connection")
            .field("host", &o.host)
            .field("port", &o.port)
            .field("vhost", &o.vhost)
            .field("generation", &self.generation())
            .field("open", &self.is_open())
            .finish()
    }
}

impl Connection {
    /// Open a connection from an `amqp://` URI (see [`ConnectionOptions::from_uri`]).
    ///
    /// ```no_run
    /// let conn = lepus::Connection::open("amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=10")?;
    /// # Ok::<(), lepus::Error>(())
    /// ```
    pub fn open(uri: &str) -> Result<Connection> {
        Self::open_with(ConnectionOptions::from_uri(uri)?)
    }

    /// Open a connection with explicit options. Connecting and the handshake happen on
    /// this thread and end within `connection_timeout` per address, with an error that
    /// says which step failed. The addresses are tried in order.
    pub fn open_with(opts: ConnectionOptions) -> Result<Connection> {
        let inner = ConnectionInner::open(
            opts,
            Recover {
                run: recovery::run,
                reopen: crate::reopen::reopen_channel,
            },
        )?;
        refresher::start_refresher(&inner, inner.secrets.clone());
        Ok(Connection { inner })
    }

    pub(crate) fn inner(&self) -> &Arc<ConnectionInner> {
        &self.inner
    }

    /// True while the connection is usable (not closed, not lost, not recovering).
    pub fn is_open(&self) -> bool {
        let link = self.inner.link.lock();
        !link.current.shared().is_failed() && link.terminal.is_none()
    }

    /// Why the connection ended, once it has for good (closed, or lost without recovery).
    pub fn close_reason(&self) -> Option<Error> {
        if self.inner.is_closed() {
            return Some(Error::ConnectionClosed);
        }
        let link = self.inner.link.lock();
        if let Some(t) = &link.terminal {
            return Some(t.clone());
        }
        // Failed with no recovery to follow (e.g. a protocol violation): ended for good
        // already, though the I/O thread may still be waiting for the peer's close-ok.
        let shared = link.current.shared();
        (shared.is_failed() && !shared.will_recover() && !link.flight.is_recovering())
            .then(|| shared.error())
    }

    /// The current connection generation: 1 for the first TCP connection, +1 for each
    /// one recovery opened.
    pub fn generation(&self) -> u64 {
        self.inner.link.lock().current.number()
    }

    /// Our end of the current TCP connection.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.inner.link.lock().current.shared().local_addr
    }

    /// The broker address the current TCP connection went to (which node of a cluster).
    pub fn address(&self) -> crate::Address {
        self.inner.current_address()
    }

    /// The recovery steps among the most recent [`Connection::events`], oldest first.
    pub fn recovery_events(&self) -> Vec<RecoveryEvent> {
        self.inner
            .hub
            .snapshot()
            .iter()
            .filter_map(RecoveryEvent::from_connection_event)
            .collect()
    }

    /// The most recent events of this connection (up to 4096, all kinds), oldest first:
    /// blocked and unblocked, channels closed and consumers cancelled by the broker,
    /// returns dropped, recovery steps. The same events go to
    /// [`ConnectionOptions::event_listener`].
    ///
    /// ```no_run
    /// use lepus::ConnectionEventKind;
    /// let conn = lepus::Connection::open("amqp://127.0.0.1")?;
    /// for e in conn.events() {
    ///     if let ConnectionEventKind::ChannelClosed { channel, reply_code, reply_text } = &e.kind {
    ///         eprintln!("broker closed channel {channel}: {reply_code} {reply_text}");
    ///     }
    /// }
    /// # Ok::<(), lepus::Error>(())
    /// ```
    pub fn events(&self) -> Vec<ConnectionEvent> {
        self.inner.hub.snapshot()
    }

    /// A snapshot of this connection's counters (messages published, confirmed, nacked,
    /// returned, delivered, acked, rejected; bytes; reconnects; channels and consumers
    /// now), summed over its generations. Cheap: a few relaxed atomic loads.
    ///
    /// ```no_run
    /// let conn = lepus::Connection::open("amqp://127.0.0.1")?;
    /// let s = conn.stats();
    /// println!("{} published, {} bytes out, {} channels", s.published, s.bytes_out, s.channels);
    /// # Ok::<(), lepus::Error>(())
    /// ```
    pub fn stats(&self) -> ConnectionStats {
        self.inner.stats.snapshot()
    }

    /// Wait until the connection is usable (e.g. after a recovery), up to `timeout`.
    pub fn wait_open(&self, timeout: Duration) -> Result<()> {
        self.inner.current(Instant::now() + timeout).map(|_| ())
    }

    /// The broker's reason if it has blocked publishing on this connection
    /// (`connection.blocked`, e.g. a memory or disk alarm). Publishers wait, within their
    /// deadline, while it is blocked.
    pub fn blocked(&self) -> Option<String> {
        self.inner.link.lock().current.shared().blocked_reason()
    }

    /// The broker's `server_properties` from `connection.start`.
    pub fn server_properties(&self) -> FieldTable {
        self.inner
            .link
            .lock()
            .current
            .shared()
            .server_properties
            .clone()
    }

    /// Negotiated frame_max in bytes.
    pub fn frame_max(&self) -> u32 {
        self.inner.link.lock().current.shared().tuned.frame_max
    }

    /// Negotiated channel_max.
    pub fn channel_max(&self) -> u16 {
        self.inner.link.lock().current.shared().tuned.channel_max
    }

    /// Negotiated heartbeat in seconds (0: none).
    pub fn heartbeat(&self) -> u16 {
        self.inner.link.lock().current.shared().tuned.heartbeat
    }

    /// Send the broker a new secret for the logged-in user (`connection.update-secret`,
    /// e.g. a fresh OAuth2 token) and wait for its `update-secret-ok` within the
    /// operation timeout. The connection and its channels carry on; reconnects use the
    /// new secret too (unless a credentials provider is set: it is asked instead). A
    /// secret the broker refuses closes the connection.
    ///
    /// ```no_run
    /// # let conn = lepus::Connection::open("amqp://127.0.0.1")?;
    /// conn.update_secret("eyJhbGciOi...", "token refreshed")?;
    /// # Ok::<(), lepus::Error>(())
    /// ```
    pub fn update_secret(&self, secret: &str, reason: &str) -> Result<()> {
        let deadline = Instant::now() + self.inner.opts.operation_timeout;
        self.inner.update_secret(secret, reason, deadline)
    }

    /// Close the connection: send `connection.close`, wait for `close-ok` up to the
    /// close timeout, and join the I/O thread. Every waiter on the connection gets
    /// [`Error::ConnectionClosed`] and nothing recovers afterwards. Closing twice, or
    /// closing a lost connection, is fine.
    pub fn close(&self) -> Result<()> {
        self.inner.close()
    }
}
