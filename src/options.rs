//! Plain option values: how a connection is opened ([`ConnectionOptions`], with the
//! `amqp://` or `amqps://` URI applied through `uri.rs`, TLS through [`TlsOptions`]), how it recovers ([`RecoveryOptions`]), and the
//! options of the AMQP methods a channel sends.

use std::time::Duration;

use crate::addresses::{Address, AddressResolver};
use crate::credentials::{CredentialsProvider, ProviderRef};
use crate::error::{Error, Result};
use crate::events::{ConnectionEvent, RecoveryEvent, TopologyEntity};
use crate::protocol::table::{DEFAULT_MAX_TABLE_DEPTH, FieldTable, MAX_TABLE_DEPTH_CAP};
use crate::sync::Arc;
use crate::tls::{self, TlsOptions};
use crate::uri::ParsedUri;

// ---------------- connection ----------------

/// SASL mechanism used to log in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum AuthMechanism {
    /// `PLAIN` (the default).
    #[default]
    Plain,
    /// `AMQPLAIN`.
    AmqPlain,
    /// `EXTERNAL`: the broker takes the identity from the TLS client certificate
    /// (RabbitMQ's `rabbitmq_auth_mechanism_ssl` plugin; the user is the certificate's
    /// CN by default). User name and password are not sent.
    External,
}

impl AuthMechanism {
    /// The mechanism an `auth_mechanism=` URI value names (any case).
    fn from_uri_value(v: &str) -> Option<Self> {
        match v.to_ascii_lowercase().as_str() {
            "plain" => Some(AuthMechanism::Plain),
            "amqplain" => Some(AuthMechanism::AmqPlain),
            "external" => Some(AuthMechanism::External),
            _ => None,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            AuthMechanism::Plain => "PLAIN",
            AuthMechanism::AmqPlain => "AMQPLAIN",
            AuthMechanism::External => "EXTERNAL",
        }
    }
}

/// Everything a connection is opened with. Build it with [`ConnectionOptions::new`] and
/// the setters, or parse it from a URI with [`ConnectionOptions::from_uri`].
///
/// ```no_run
/// use std::time::Duration;
/// use lepus::{ConnectionOptions, Connection};
/// let opts = ConnectionOptions::new()
///     .host("rabbit.internal")
///     .port(5672)
///     .vhost("/billing")
///     .credentials("billing", "secret")
///     .heartbeat(15)
///     .connection_name("billing-worker")
///     .connection_timeout(Duration::from_secs(5))
///     .operation_timeout(Duration::from_secs(10));
/// let conn = Connection::open_with(opts)?;
/// # Ok::<(), lepus::Error>(())
/// ```
#[derive(Clone)]
pub struct ConnectionOptions {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) vhost: String,
    pub(crate) username: String,
    pub(crate) password: String,
    pub(crate) auth: AuthMechanism,
    pub(crate) heartbeat: u16,
    pub(crate) frame_max: u32,
    pub(crate) channel_max: u16,
    pub(crate) connection_timeout: Duration,
    pub(crate) connection_name: Option<String>,
    pub(crate) client_properties: FieldTable,
    pub(crate) operation_timeout: Duration,
    pub(crate) max_message_size: u64,
    pub(crate) max_table_depth: usize,
    pub(crate) close_timeout: Duration,
    pub(crate) more_addresses: Vec<(String, u16)>,
    pub(crate) recovery: RecoveryOptions,
    pub(crate) consumer_queue_bytes: usize,
    pub(crate) connection_queue_bytes: usize,
    pub(crate) max_output_bytes: usize,
    pub(crate) write_stall_timeout: Duration,
    pub(crate) caller_writes: bool,
    pub(crate) unacked_warning: Option<Duration>,
    pub(crate) tls: TlsOptions,
    pub(crate) credentials_provider: Option<ProviderRef>,
    /// SASL mechanisms in order of preference; empty: `auth` alone.
    pub(crate) auth_mechanisms: Vec<AuthMechanism>,
    /// Try the addresses in a random order (the default) rather than as listed.
    pub(crate) shuffle_addresses: bool,
    /// Where the addresses come from instead of host, port and `more_addresses`.
    pub(crate) resolver: Option<Arc<dyn AddressResolver>>,
    /// Hears every connection event (on the connection's event thread).
    pub(crate) event_listener: Option<EventListener>,
}

/// Called for each [`ConnectionEvent`] of a connection, in order, on the connection's
/// own event thread (`lepus-events`), never on the I/O thread or a caller's thread. A
/// slow listener delays only later events (up to 1,024 wait; beyond that it misses
/// events, counted in [`crate::ConnectionStats::events_dropped`], while
/// [`crate::Connection::events`] still has them); a panic is caught and counted
/// ([`crate::ConnectionStats::listener_panics`]) and the listener hears the next event.
pub type EventListener = Arc<dyn Fn(&ConnectionEvent) + Send + Sync>;

/// Prints whether a resolver is set (it has no `Debug` of its own).
struct ResolverSet<'a>(&'a Option<Arc<dyn AddressResolver>>);

impl std::fmt::Debug for ResolverSet<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", if self.0.is_some() { "Some(..)" } else { "None" })
    }
}

/// Default bound of one consumer's local queue in bytes (decoded size).
pub const DEFAULT_CONSUMER_QUEUE_BYTES: usize = 16 * 1024 * 1024;
/// Default bound of all consumer queues of a connection together, in bytes.
pub const DEFAULT_CONNECTION_QUEUE_BYTES: usize = 64 * 1024 * 1024;
/// Default bound of the bytes waiting to be written before the I/O thread stops reading.
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 16 * 1024 * 1024;
/// Default time the broker may leave our bytes unread before the link counts as dead.
pub const DEFAULT_WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(20);

impl Default for ConnectionOptions {
    fn default() -> Self {
        ConnectionOptions {
            host: "127.0.0.1".into(),
            port: 5672,
            vhost: "/".into(),
            username: "guest".into(),
            password: "guest".into(),
            auth: AuthMechanism::Plain,
            heartbeat: 60,
            frame_max: 131_072,
            channel_max: 2047,
            connection_timeout: Duration::from_secs(10),
            connection_name: None,
            client_properties: FieldTable::new(),
            operation_timeout: Duration::from_secs(30),
            max_message_size: 128 * 1024 * 1024,
            max_table_depth: DEFAULT_MAX_TABLE_DEPTH,
            close_timeout: Duration::from_secs(5),
            more_addresses: Vec::new(),
            recovery: RecoveryOptions::default(),
            consumer_queue_bytes: DEFAULT_CONSUMER_QUEUE_BYTES,
            connection_queue_bytes: DEFAULT_CONNECTION_QUEUE_BYTES,
            max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
            write_stall_timeout: DEFAULT_WRITE_STALL_TIMEOUT,
            caller_writes: true,
            unacked_warning: None,
            tls: TlsOptions::default(),
            credentials_provider: None,
            auth_mechanisms: Vec::new(),
            shuffle_addresses: true,
            resolver: None,
            event_listener: None,
        }
    }
}

impl std::fmt::Debug for ConnectionOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No password in logs.
        f.debug_struct("ConnectionOptions")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("vhost", &self.vhost)
            .field("username", &self.username)
            .field("auth", &self.auth)
            .field("heartbeat", &self.heartbeat)
            .field("frame_max", &self.frame_max)
            .field("channel_max", &self.channel_max)
            .field("connection_timeout", &self.connection_timeout)
            .field("connection_name", &self.connection_name)
            .field("operation_timeout", &self.operation_timeout)
            .field("max_message_size", &self.max_message_size)
            .field("max_table_depth", &self.max_table_depth)
            .field("close_timeout", &self.close_timeout)
            .field("more_addresses", &self.more_addresses)
            .field("recovery", &self.recovery)
            .field("consumer_queue_bytes", &self.consumer_queue_bytes)
            .field("connection_queue_bytes", &self.connection_queue_bytes)
            .field("max_output_bytes", &self.max_output_bytes)
            .field("write_stall_timeout", &self.write_stall_timeout)
            .field("caller_writes", &self.caller_writes)
            .field("unacked_warning", &self.unacked_warning)
            .field("shuffle_addresses", &self.shuffle_addresses)
            .field("resolver", &ResolverSet(&self.resolver))
            .field("event_listener", &self.event_listener.is_some())
            .field("tls", &self.tls)
            .field("credentials_provider", &self.credentials_provider)
            .field("auth_mechanisms", &self.auth_mechanisms)
            .finish_non_exhaustive()
    }
}

impl ConnectionOptions {
    /// Defaults: `amqp://guest:guest@127.0.0.1:5672/`, heartbeat 60 s, frame_max 128 KiB,
    /// channel_max 2047, connection timeout 10 s, operation timeout 30 s, maximum message
    /// size 128 MiB, field tables at most 64 levels deep.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parse `amqp://user:pass@host:port/vhost?heartbeat=..&frame_max=..&channel_max=..
    /// &connection_timeout=..&connection_name=..&auth_mechanism=..`. User, password and
    /// vhost are percent-decoded; `connection_timeout` is in milliseconds, `heartbeat` in
    /// seconds. Unknown query keys are refused so that a typo does not go unnoticed.
    ///
    /// `amqps://` (port 5671 by default) connects with TLS and takes RabbitMQ's TLS
    /// parameters: `cacertfile`, `certfile`, `keyfile` (PEM files), `verify`
    /// (`verify_peer`, the default, or `verify_none`, which is unsafe: see
    /// [`TlsOptions::danger_accept_invalid_certs`]), `server_name_indication`, and
    /// `auth_mechanism=external` to log in with the client certificate.
    ///
    /// A cluster is several hosts separated by commas, each with its own port (5672 when
    /// left out, 5671 with `amqps://`): `amqp://user:pass@node1:5672,node2:5673,[::1]:5674/vhost`. They are
    /// tried in a random order (see [`ConnectionOptions::shuffle_addresses`]).
    pub fn from_uri(uri: &str) -> Result<Self> {
        let (parsed, more) = crate::uri::parse_multi(uri)?;
        let mut o = Self::default().apply_uri(parsed)?;
        // Each host of the list without a port gets the scheme's (5671 for amqps).
        let default_port = if o.tls.enabled { 5671 } else { 5672 };
        o.more_addresses = more
            .into_iter()
            .map(|(h, p)| (h, p.unwrap_or(default_port)))
            .collect();
        Ok(o)
    }

    /// These options with what a URI said put over them.
    fn apply_uri(mut self, p: ParsedUri) -> Result<Self> {
        if p.amqps {
            if cfg!(not(feature = "tls")) {
                return Err(tls::disabled());
            }
            self.tls = TlsOptions::new();
            self.port = 5671;
        }
        for (k, v) in &p.other {
            if !tls::apply_query(&mut self.tls, k, v)? {
                return Err(Error::InvalidUri(format!("unknown URI option {k:?}")));
            }
        }
        tls::validate(&self.tls)?;
        if let Some(m) = p.auth_mechanism {
            self.auth = AuthMechanism::from_uri_value(&m)
                .ok_or_else(|| Error::InvalidUri(format!("unsupported auth_mechanism {m:?}")))?;
        }
        fn set<T>(slot: &mut T, v: Option<T>) {
            if let Some(v) = v {
                *slot = v;
            }
        }
        set(&mut self.username, p.username);
        set(&mut self.password, p.password);
        set(&mut self.host, p.host);
        set(&mut self.port, p.port);
        set(&mut self.vhost, p.vhost);
        set(&mut self.heartbeat, p.heartbeat);
        set(&mut self.frame_max, p.frame_max);
        set(&mut self.channel_max, p.channel_max);
        set(&mut self.connection_timeout, p.connection_timeout);
        if p.connection_name.is_some() {
            self.connection_name = p.connection_name;
        }
        Ok(self)
    }

    /// Broker host name or address.
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.host = host.into();
        self
    }
    /// Broker port.
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }
    /// Virtual host.
    pub fn vhost(mut self, vhost: impl Into<String>) -> Self {
        self.vhost = vhost.into();
        self
    }
    /// User name and password.
    pub fn credentials(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.username = user.into();
        self.password = password.into();
        self
    }
    /// SASL mechanism.
    pub fn auth_mechanism(mut self, m: AuthMechanism) -> Self {
        self.auth = m;
        self.auth_mechanisms.clear();
        self
    }
    /// SASL mechanisms in order of preference: the first one the broker offers is used
    /// (e.g. `[External, Plain]`: the client certificate where the broker takes it, else
    /// user and password). None in common is a clear error naming both lists.
    pub fn auth_mechanisms(mut self, preference: &[AuthMechanism]) -> Self {
        self.auth_mechanisms = preference.to_vec();
        if let Some(&first) = preference.first() {
            self.auth = first;
        }
        self
    }
    /// Heartbeat interval in seconds asked for (0: no heartbeats). The broker's value
    /// wins where it is lower.
    pub fn heartbeat(mut self, seconds: u16) -> Self {
        self.heartbeat = seconds;
        self
    }
    /// Largest frame asked for (0: no limit from our side; the broker's value is used).
    pub fn frame_max(mut self, bytes: u32) -> Self {
        self.frame_max = bytes;
        self
    }
    /// Most channels asked for (0: no limit from our side, i.e. 65535).
    pub fn channel_max(mut self, n: u16) -> Self {
        self.channel_max = n;
        self
    }
    /// Deadline for the whole connection attempt: TCP connect and AMQP handshake.
    pub fn connection_timeout(mut self, t: Duration) -> Self {
        self.connection_timeout = t;
        self
    }
    /// Name shown in the management UI (and the `connection` label of the metrics of
    /// the `metrics` feature).
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = Some(name.into());
        self
    }
    /// Hear every event of the connection: blocked and unblocked, channels closed and
    /// consumers cancelled by the broker, returns dropped, recovery steps (see
    /// [`EventListener`] for the thread it runs on). [`crate::Connection::events`] keeps
    /// the same events for polling.
    ///
    /// ```no_run
    /// use lepus::{ConnectionEventKind, ConnectionOptions};
    /// let opts = ConnectionOptions::from_uri("amqp://127.0.0.1")?.event_listener(|e| {
    ///     if let ConnectionEventKind::Blocked { reason } = &e.kind {
    ///         eprintln!("broker blocked publishing: {reason}");
    ///     }
    /// });
    /// let conn = lepus::Connection::open_with(opts)?;
    /// # Ok::<(), lepus::Error>(())
    /// ```
    pub fn event_listener(mut self, f: impl Fn(&ConnectionEvent) + Send + Sync + 'static) -> Self {
        self.event_listener = Some(Arc::new(f));
        self
    }
    /// Extra client properties sent in `connection.start-ok`.
    pub fn client_property(
        mut self,
        key: impl Into<String>,
        value: impl Into<crate::FieldValue>,
    ) -> Self {
        self.client_properties.insert(key, value);
        self
    }
    /// Default deadline of every blocking call that is not given its own.
    pub fn operation_timeout(mut self, t: Duration) -> Self {
        self.operation_timeout = t;
        self
    }
    /// Largest message body accepted from the broker; a larger delivery is skipped
    /// unbuffered and reported with its delivery tag. Also the largest body published.
    pub fn max_message_size(mut self, bytes: u64) -> Self {
        self.max_message_size = bytes;
        self
    }
    /// Deepest nesting of field tables and arrays accepted (at most 128).
    pub fn max_table_depth(mut self, depth: usize) -> Self {
        self.max_table_depth = depth.clamp(1, MAX_TABLE_DEPTH_CAP);
        self
    }
    /// Another broker address to fail over to (tried after the URI's host, in order,
    /// when connecting and when recovering).
    pub fn address(mut self, host: impl Into<String>, port: u16) -> Self {
        self.more_addresses.push((host.into(), port));
        self
    }
    /// Automatic recovery settings ([`RecoveryOptions::disabled`] turns it off).
    pub fn recovery(mut self, r: RecoveryOptions) -> Self {
        self.recovery = r;
        self
    }
    /// Connect with TLS (as `amqps://` does); see [`TlsOptions`]. Set the port too
    /// (RabbitMQ's TLS port is 5671).
    pub fn tls(mut self, tls: TlsOptions) -> Self {
        self.tls = tls;
        self.tls.enabled = true;
        self
    }
    /// Take user name and secret from `provider`, asked at every connect and reconnect;
    /// when it says the secret expires, lepus asks again before it does and sends the
    /// new secret to the broker (`connection.update-secret`) on a thread of its own.
    /// Failures are logged, reported as recovery events and retried. Overrides
    /// [`ConnectionOptions::credentials`].
    pub fn credentials_provider(mut self, provider: impl CredentialsProvider) -> Self {
        self.credentials_provider = Some(ProviderRef(Arc::new(provider)));
        self
    }
    /// Every address, the primary first.
    pub(crate) fn addresses(&self) -> Vec<(String, u16)> {
        let mut v = vec![(self.host.clone(), self.port)];
        v.extend(self.more_addresses.iter().cloned());
        v
    }
    /// Connect to these addresses (replacing the host, port and addresses set so far).
    /// They are tried in a random order unless [`ConnectionOptions::shuffle_addresses`]
    /// says otherwise; each attempt is bounded by the connection timeout, so a node that
    /// drops packets costs at most that.
    pub fn addresses_list(mut self, list: impl IntoIterator<Item = Address>) -> Self {
        let mut it = list.into_iter();
        if let Some(first) = it.next() {
            self.host = first.host;
            self.port = first.port;
            self.more_addresses = it.map(|a| (a.host, a.port)).collect();
        }
        self
    }
    /// Try the addresses in a random order (`true`, the default: the clients of a
    /// cluster spread over its nodes) or in the order given (`false`). Either way a
    /// recovery starts with the address after the one whose connection failed.
    pub fn shuffle_addresses(mut self, shuffle: bool) -> Self {
        self.shuffle_addresses = shuffle;
        self
    }
    /// Ask `resolver` for the addresses at every connection and recovery, instead of the
    /// host, port and addresses set here ([`crate::DnsResolver`]: every A/AAAA record of
    /// a name).
    pub fn address_resolver(mut self, resolver: impl AddressResolver + 'static) -> Self {
        self.resolver = Some(Arc::new(resolver));
        self
    }
    /// The addresses to try now, in the order to try them: from the resolver (or the
    /// list), shuffled if asked, starting after `failed`.
    pub(crate) fn address_order(&self, failed: Option<&Address>) -> Result<Vec<Address>> {
        let list = match &self.resolver {
            Some(r) => r.resolve()?,
            None => self
                .addresses()
                .into_iter()
                .map(|(h, p)| Address::new(h, p))
                .collect(),
        };
        if list.is_empty() {
            return Err(Error::InvalidArgument(
                "the address resolver returned no address".into(),
            ));
        }
        Ok(crate::addresses::order(
            list,
            self.shuffle_addresses,
            failed,
        ))
    }
    /// How long `close()` waits for the broker's `close-ok`.
    pub fn close_timeout(mut self, t: Duration) -> Self {
        self.close_timeout = t;
        self
    }
    /// Bound of each consumer's local queue in bytes, counted on the decoded messages
    /// (body, properties, headers): when a delivery does not fit, the I/O thread stops
    /// reading until the consumer takes some (an empty queue always takes one message,
    /// up to [`max_message_size`](Self::max_message_size)). Default 16 MiB
    /// ([`DEFAULT_CONSUMER_QUEUE_BYTES`]).
    pub fn consumer_queue_bytes(mut self, bytes: usize) -> Self {
        self.consumer_queue_bytes = bytes.max(1);
        self
    }
    /// Bound of all consumer queues of the connection together, in bytes (decoded size);
    /// same backpressure as [`consumer_queue_bytes`](Self::consumer_queue_bytes).
    /// Default 64 MiB ([`DEFAULT_CONNECTION_QUEUE_BYTES`]).
    pub fn connection_queue_bytes(mut self, bytes: usize) -> Self {
        self.connection_queue_bytes = bytes.max(1);
        self
    }
    /// Bytes waiting to be written above which the I/O thread stops reading (a broker
    /// that stops reading but keeps sending things we must answer cannot grow our output
    /// without limit). Default 16 MiB ([`DEFAULT_MAX_OUTPUT_BYTES`]).
    pub fn max_output_bytes(mut self, bytes: usize) -> Self {
        self.max_output_bytes = bytes.max(64 * 1024);
        self
    }
    /// How long output may wait without the broker reading a byte of it before the link
    /// counts as dead (lost, recovered if recovery is on). While the broker has blocked
    /// the connection (`connection.blocked`) the limit is two heartbeat intervals
    /// instead. Default 20 s ([`DEFAULT_WRITE_STALL_TIMEOUT`]).
    pub fn write_stall_timeout(mut self, t: Duration) -> Self {
        self.write_stall_timeout = t.max(Duration::from_millis(100));
        self
    }
    /// Let a thread that publishes (or acks, or sends any frame that needs no reply)
    /// write its frames to the socket itself when the I/O thread is idle and nothing is
    /// queued ahead of them, instead of handing them to the I/O thread and waking it
    /// (on by default; plain TCP only: over TLS the I/O thread writes every record).
    /// A direct write never blocks: what the socket does not take at once is left to the
    /// I/O thread, which also reports a broken socket. Off: every frame goes through
    /// the I/O thread, and no socket call happens on the caller's thread.
    ///
    /// ```
    /// let opts = lepus::ConnectionOptions::new().caller_writes(false);
    /// # let _ = opts;
    /// ```
    pub fn caller_writes(mut self, on: bool) -> Self {
        self.caller_writes = on;
        self
    }
    /// Warn about deliveries left unacknowledged longer than `threshold` (off by
    /// default): a log line (`warn`) and a [`ConnectionEventKind::DeliveriesUnacked`]
    /// event per channel and check, each delivery reported once. RabbitMQ closes a
    /// channel (406) whose delivery stays unacknowledged past its `consumer_timeout`
    /// (30 min by default): set this well below it to hear before it happens. The I/O
    /// thread checks every quarter of the threshold (at most every second); each
    /// delivery costs a queue entry until it is settled.
    ///
    /// ```
    /// use std::time::Duration;
    /// let opts = lepus::ConnectionOptions::new().unacked_warning(Duration::from_secs(20 * 60));
    /// ```
    ///
    /// [`ConnectionEventKind::DeliveriesUnacked`]: crate::ConnectionEventKind::DeliveriesUnacked
    pub fn unacked_warning(mut self, threshold: Duration) -> Self {
        self.unacked_warning = Some(threshold.max(Duration::from_millis(10)));
        self
    }
}

// ---------------- recovery ----------------

/// What happens to messages published in confirm mode but not yet confirmed when the
/// link is lost.
///
/// ```no_run
/// use lepus::{ConnectionOptions, RecoveryOptions, UnconfirmedPolicy};
/// let opts = ConnectionOptions::from_uri("amqp://127.0.0.1")?
///     .recovery(RecoveryOptions::new().unconfirmed(UnconfirmedPolicy::HandBack));
/// let conn = lepus::Connection::open_with(opts)?;
/// let ch = conn.open_channel()?;
/// ch.confirm_select()?;
/// // ... after a recovery, what was never confirmed is the application's to resend:
/// for m in ch.take_unconfirmed() {
///     ch.basic_publish(&m.exchange, &m.routing_key, &m.body, &m.properties, &Default::default())?;
/// }
/// # Ok::<(), lepus::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum UnconfirmedPolicy {
    /// Publish them again on the recovered channel (at-least-once; the broker may see a
    /// message twice). Their [`crate::Confirmation`]s follow the new copies.
    #[default]
    Republish,
    /// Keep them for the application: [`crate::Channel::take_unconfirmed`] returns them
    /// and their confirmations fail.
    HandBack,
}

/// Called for each recovery event, on the connection's event thread like an
/// [`EventListener`] (which hears the same steps as [`crate::ConnectionEventKind::Recovery`]).
pub type RecoveryListener = Arc<dyn Fn(&RecoveryEvent) + Send + Sync>;

/// Says whether recovery restores an entity (true) or leaves it out (false).
pub type TopologyFilter = Arc<dyn Fn(&TopologyEntity) -> bool + Send + Sync>;

/// Automatic recovery settings (on by default).
///
/// ```no_run
/// use std::time::Duration;
/// use lepus::{ConnectionOptions, RecoveryOptions, UnconfirmedPolicy};
/// let recovery = RecoveryOptions::new()
///     .backoff(Duration::from_millis(100), Duration::from_secs(10))
///     .max_attempts(Some(30))
///     .unconfirmed(UnconfirmedPolicy::Republish)
///     .listener(|e| eprintln!("recovery: {:?}", e.kind));
/// let conn = lepus::Connection::open_with(ConnectionOptions::from_uri("amqp://127.0.0.1")?.recovery(recovery))?;
/// // Or no recovery at all: every failure reaches the application as it is.
/// let raw = lepus::Connection::open_with(
///     ConnectionOptions::from_uri("amqp://127.0.0.1")?.recovery(RecoveryOptions::disabled()),
/// )?;
/// # Ok::<(), lepus::Error>(())
/// ```
#[derive(Clone)]
pub struct RecoveryOptions {
    pub(crate) filter: Option<TopologyFilter>,
    pub(crate) resubscribe_cancelled: bool,
    pub(crate) enabled: bool,
    pub(crate) max_attempts: Option<u32>,
    pub(crate) initial_backoff: Duration,
    pub(crate) max_backoff: Duration,
    pub(crate) unconfirmed: UnconfirmedPolicy,
    pub(crate) listener: Option<RecoveryListener>,
}

impl std::fmt::Debug for RecoveryOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecoveryOptions")
            .field("enabled", &self.enabled)
            .field("max_attempts", &self.max_attempts)
            .field("initial_backoff", &self.initial_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("unconfirmed", &self.unconfirmed)
            .field("listener", &self.listener.is_some())
            .field("topology_filter", &self.filter.is_some())
            .field("resubscribe_cancelled", &self.resubscribe_cancelled)
            .finish()
    }
}

impl Default for RecoveryOptions {
    fn default() -> Self {
        RecoveryOptions {
            enabled: true,
            max_attempts: None,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            unconfirmed: UnconfirmedPolicy::Republish,
            listener: None,
            filter: None,
            resubscribe_cancelled: false,
        }
    }
}

impl RecoveryOptions {
    /// Recovery on, unbounded attempts, backoff from 100 ms doubling to 10 s (jittered),
    /// unconfirmed messages republished.
    pub fn new() -> Self {
        Self::default()
    }
    /// No recovery: a lost link is final and every waiter gets the raw failure.
    pub fn disabled() -> Self {
        RecoveryOptions {
            enabled: false,
            ..Self::default()
        }
    }
    /// Give up after this many failed reconnection attempts (`None`: never give up).
    pub fn max_attempts(mut self, n: Option<u32>) -> Self {
        self.max_attempts = n;
        self
    }
    /// Backoff before the second attempt (the first is immediate), doubling up to `max`.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max.max(initial);
        self
    }
    /// What to do with unconfirmed messages.
    pub fn unconfirmed(mut self, policy: UnconfirmedPolicy) -> Self {
        self.unconfirmed = policy;
        self
    }
    /// Restore only the entities for which `keep` says true (exchanges, queues,
    /// bindings, consumers; see [`TopologyEntity`]). What is left out is neither
    /// declared again nor retried; its records stay, so a later filter change is not
    /// needed to keep the application's own declarations working.
    pub fn topology_filter(
        mut self,
        keep: impl Fn(&TopologyEntity) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.filter = Some(Arc::new(keep));
        self
    }
    /// Bring back a consumer the broker cancelled (its queue was deleted, or its node went
    /// down): the consumer's next receive returns the cancellation as a passing error (as
    /// for a lost link: the consumer carries on), a
    /// [`RecoveryEventKind::EntityFailed`](crate::RecoveryEventKind::EntityFailed) names
    /// it, and it is subscribed again under its tag, with backoff, once a passive declare
    /// finds its queue; the same [`crate::Consumer`] keeps receiving
    /// ([`RecoveryEventKind::EntityRecovered`](crate::RecoveryEventKind::EntityRecovered)).
    ///
    /// Off by default: a broker cancel is final in AMQP and in the other clients, it is
    /// often deliberate (the queue was deleted), and an application that stops or
    /// re-declares on `ConsumerCancelled` would otherwise see a consumer that lives on and
    /// polls for a queue that may never come back. Turn it on for queues on cluster nodes
    /// that come and go.
    pub fn resubscribe_cancelled_consumers(mut self, on: bool) -> Self {
        self.resubscribe_cancelled = on;
        self
    }
    /// Whether recovery restores `e` (the filter's answer; true without a filter).
    pub(crate) fn keeps(&self, e: &TopologyEntity) -> bool {
        self.filter.as_ref().is_none_or(|f| f(e))
    }
    /// Hear every recovery event, on the connection's event thread (see
    /// [`EventListener`]; [`ConnectionOptions::event_listener`] hears these and the other
    /// connection events).
    pub fn listener(mut self, f: impl Fn(&RecoveryEvent) + Send + Sync + 'static) -> Self {
        self.listener = Some(Arc::new(f));
        self
    }
}

// ---------------- methods ----------------

/// Options of `exchange.declare`.
///
/// ```no_run
/// use lepus::{ExchangeDeclareOptions, FieldTable};
/// let conn = lepus::Connection::open("amqp://127.0.0.1")?;
/// let ch = conn.open_channel()?;
/// let opts = ExchangeDeclareOptions {
///     durable: true,
///     arguments: FieldTable::new().with("alternate-exchange", "unrouted"),
///     ..Default::default()
/// };
/// ch.exchange_declare("events", "topic", &opts)?;
/// # Ok::<(), lepus::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct ExchangeDeclareOptions {
    /// Only check that it exists (404 closes the channel if not).
    pub passive: bool,
    /// Survive a broker restart.
    pub durable: bool,
    /// Delete when the last binding is removed.
    pub auto_delete: bool,
    /// Not publishable directly, only through exchange-to-exchange bindings.
    pub internal: bool,
    /// Extra arguments (e.g. `alternate-exchange`).
    pub arguments: FieldTable,
}

/// Options of `queue.declare`.
///
/// ```no_run
/// use lepus::{FieldTable, QueueDeclareOptions};
/// let conn = lepus::Connection::open("amqp://127.0.0.1")?;
/// let ch = conn.open_channel()?;
/// let quorum = QueueDeclareOptions {
///     durable: true,
///     arguments: FieldTable::new().with("x-queue-type", "quorum"),
///     ..Default::default()
/// };
/// ch.queue_declare("payments", &quorum)?;
/// // A server-named queue for this connection only.
/// let mine = ch.queue_declare("", &QueueDeclareOptions { exclusive: true, ..Default::default() })?;
/// println!("{}", mine.name);
/// # Ok::<(), lepus::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct QueueDeclareOptions {
    /// Only check that it exists (404 closes the channel if not).
    pub passive: bool,
    /// Survive a broker restart.
    pub durable: bool,
    /// Used only by this connection and deleted when it closes.
    pub exclusive: bool,
    /// Delete when the last consumer goes.
    pub auto_delete: bool,
    /// Extra arguments (`x-message-ttl`, `x-queue-type`, `x-dead-letter-exchange`, ...).
    pub arguments: FieldTable,
}

/// Options of `queue.delete`.
///
/// ```no_run
/// let conn = lepus::Connection::open("amqp://127.0.0.1")?;
/// let ch = conn.open_channel()?;
/// let opts = lepus::QueueDeleteOptions { if_unused: true, if_empty: true };
/// let dropped = ch.queue_delete("scratch", &opts)?;
/// # Ok::<(), lepus::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueDeleteOptions {
    /// Only if it has no consumers.
    pub if_unused: bool,
    /// Only if it is empty.
    pub if_empty: bool,
}

/// Options of `exchange.delete`.
///
/// ```no_run
/// let conn = lepus::Connection::open("amqp://127.0.0.1")?;
/// let ch = conn.open_channel()?;
/// ch.exchange_delete("scratch-ex", &lepus::ExchangeDeleteOptions { if_unused: true })?;
/// # Ok::<(), lepus::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct ExchangeDeleteOptions {
    /// Only if it has no bindings.
    pub if_unused: bool,
}

/// Options of `basic.consume`.
///
/// ```no_run
/// let conn = lepus::Connection::open("amqp://127.0.0.1")?;
/// let ch = conn.open_channel()?;
/// let opts = lepus::ConsumeOptions {
///     consumer_tag: "audit-1".into(),
///     exclusive: true,
///     ..Default::default()
/// };
/// let consumer = ch.basic_consume("audit", &opts)?;
/// assert_eq!(consumer.tag(), "audit-1");
/// # Ok::<(), lepus::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct ConsumeOptions {
    /// Consumer tag; empty lets the broker choose one.
    pub consumer_tag: String,
    /// Deliveries need no acknowledgement.
    pub no_ack: bool,
    /// The only consumer of the queue.
    pub exclusive: bool,
    /// Do not deliver messages published on this connection.
    pub no_local: bool,
    /// Extra arguments (`x-priority`, ...).
    pub arguments: FieldTable,
}

/// Options of `basic.publish`.
///
/// ```no_run
/// let conn = lepus::Connection::open("amqp://127.0.0.1")?;
/// let ch = conn.open_channel()?;
/// let props = lepus::BasicProperties::new();
/// ch.basic_publish("", "jobs", b"x", &props, &lepus::PublishOptions::default())?;
/// // mandatory: an unroutable message comes back (Channel::recv_return) instead of vanishing.
/// ch.basic_publish("", "jobs", b"x", &props, &lepus::PublishOptions { mandatory: true })?;
/// # Ok::<(), lepus::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct PublishOptions {
    /// Return the message (see [`Channel::recv_return`](crate::Channel::recv_return)) if no queue takes it.
    pub mandatory: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_uri() {
        let o = ConnectionOptions::from_uri(
            "amqp://us%40r:p%3Ass@rabbit.local:5673/my%2fvh?heartbeat=5&frame_max=8192&channel_max=10&connection_timeout=1500&connection_name=app%201&auth_mechanism=AMQPLAIN",
        )
        .unwrap();
        assert_eq!(o.username, "us@r");
        assert_eq!(o.password, "p:ss");
        assert_eq!(o.host, "rabbit.local");
        assert_eq!(o.port, 5673);
        assert_eq!(o.vhost, "my/vh");
        assert_eq!(o.heartbeat, 5);
        assert_eq!(o.frame_max, 8192);
        assert_eq!(o.channel_max, 10);
        assert_eq!(o.connection_timeout, Duration::from_millis(1500));
        assert_eq!(o.connection_name.as_deref(), Some("app 1"));
        assert_eq!(o.auth, AuthMechanism::AmqPlain);
    }

    #[test]
    fn defaults_and_ipv6() {
        let o = ConnectionOptions::from_uri("amqp://[::1]").unwrap();
        assert_eq!(
            (o.host.as_str(), o.port, o.vhost.as_str()),
            ("::1", 5672, "/")
        );
        let o = ConnectionOptions::from_uri("amqp://h/").unwrap();
        assert_eq!(o.vhost, "/");
        assert_eq!(o.username, "guest");
    }

    #[test]
    fn amqps_defaults_to_5671_and_takes_tls_parameters() {
        let r = ConnectionOptions::from_uri(
            "amqps://h?cacertfile=%2Ftmp%2Fca.pem&certfile=/c.pem&keyfile=/k.pem&verify=verify_peer&server_name_indication=rabbit&auth_mechanism=external",
        );
        #[cfg(feature = "tls")]
        {
            let o = r.unwrap();
            assert_eq!(o.port, 5671);
            assert!(o.tls.enabled);
            assert!(o.tls.has_client_cert());
            assert_eq!(o.tls.server_name.as_deref(), Some("rabbit"));
            assert_eq!(o.auth, AuthMechanism::External);
            assert_eq!(
                ConnectionOptions::from_uri("amqps://h:1234").unwrap().port,
                1234
            );
            assert!(!ConnectionOptions::from_uri("amqp://h").unwrap().tls.enabled);
            let o = ConnectionOptions::from_uri("amqps://h1,h2:1234,h3").unwrap();
            assert_eq!(o.port, 5671);
            assert_eq!(
                o.more_addresses,
                vec![("h2".to_string(), 1234), ("h3".to_string(), 5671)]
            );
        }
        #[cfg(not(feature = "tls"))]
        match r {
            Err(Error::Tls { kind, detail }) => {
                assert_eq!(kind, crate::TlsFailure::NotCompiledIn);
                assert!(detail.contains("`tls` cargo feature"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_uris_are_refused() {
        for u in [
            "http://h",
            "amqp://h?cacertfile=/ca.pem",
            #[cfg(feature = "tls")]
            "amqps://h?certfile=/c.pem",
            #[cfg(feature = "tls")]
            "amqps://h?verify=maybe",
            "amqp://h:notaport",
            "amqp://h/a/b",
            "amqp://h?heartbeat=x",
            "amqp://h?bogus=1",
            "amqp://h/%zz",
            "amqp://h/%+f",
            "amqp://[::1",
            "amqp://h?frame_max=100",
        ] {
            assert!(
                matches!(ConnectionOptions::from_uri(u), Err(Error::InvalidUri(_))),
                "{u}"
            );
        }
    }
}

#[cfg(test)]
mod address_tests {
    use super::*;

    #[test]
    fn uri_with_several_hosts_and_address_order() {
        let o = ConnectionOptions::from_uri("amqp://u:p@h1:5681,h2:5682,h3/v").unwrap();
        assert_eq!((o.host.as_str(), o.port), ("h1", 5681));
        assert_eq!(
            o.more_addresses,
            vec![("h2".into(), 5682), ("h3".into(), 5672)]
        );
        let o = o.shuffle_addresses(false);
        let order = o.address_order(Some(&Address::new("h1", 5681))).unwrap();
        assert_eq!(order[0], Address::new("h2", 5682));
        assert_eq!(order[2], Address::new("h1", 5681));
        let o = ConnectionOptions::new()
            .addresses_list([Address::new("a", 1), Address::new("b", 2)])
            .address_resolver(vec![Address::new("r", 3)]);
        assert_eq!(o.address_order(None).unwrap(), vec![Address::new("r", 3)]);
        let o = o.address_resolver(Vec::<Address>::new());
        assert!(o.address_order(None).is_err());
        assert!(
            !format!("{o:?}").contains("password"),
            "no password in Debug"
        );
    }
}
