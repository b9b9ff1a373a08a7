//! lepus: a synchronous, thread-safe AMQP 0-9-1 client for RabbitMQ.
//!
//! ```no_run
//! use lepus::{BasicProperties, Connection, ConsumeOptions, PublishOptions, QueueDeclareOptions};
//!
//! let conn = Connection::open("amqp://guest:guest@127.0.0.1:5672/%2f")?;
//! let ch = conn.open_channel()?;
//! let q = ch.queue_declare("", &QueueDeclareOptions { exclusive: true, ..Default::default() })?;
//! ch.basic_publish("", &q.name, b"hello", &BasicProperties::new(), &PublishOptions::default())?;
//! let consumer = ch.basic_consume(&q.name, &ConsumeOptions::default())?;
//! let d = consumer
//!     .recv_timeout(std::time::Duration::from_secs(5))?
//!     .expect("a delivery within 5 s");
//! assert_eq!(d.body(), b"hello");
//! d.ack()?;
//! conn.close()?;
//! # Ok::<(), lepus::Error>(())
//! ```
//!
//! # Design
//!
//! Each [`Connection`] owns one I/O thread: a `mio` poll over the non-blocking TCP stream
//! and a waker. It alone reads the socket. Handles encode their frames on the caller's
//! thread and pass whole units (a publish is method + header + body frames) through a
//! bounded queue; the I/O thread writes everything queued in as few writes as it can,
//! decodes inbound frames, and hands them to per-channel queues: RPC replies to the
//! waiting caller, deliveries to their consumer's bounded queue, confirms to the tracker.
//! When the I/O thread rests with nothing queued, a thread that publishes or acks writes
//! its frames to the socket itself, without waking it (plain TCP only; see
//! [`ConnectionOptions::caller_writes`]): what the socket does not take at once is left
//! to the I/O thread, which writes it before anything else.
//!
//! Everything the broker sends is checked before it is buffered or parsed: frame sizes
//! against `frame_max`, message sizes against a maximum, field-table depth before the
//! parser recurses. A delivery that cannot be decoded reaches its consumer as
//! [`RecvError::Bad`] with its delivery tag; any other violation closes the connection
//! with the matching reply code and a clear error, never a panic.
//!
//! [`Error`] is plain data: no variant holds a channel or any other live handle, so an
//! error can be cloned, kept, logged or sent anywhere without keeping a channel alive,
//! and it has the same shape in every build. That is why receiving has its own error,
//! [`RecvError`], as a failed send in crossbeam gives the message back: a bad delivery
//! comes back as [`RecvError::Bad`] with the [`BadDelivery`] that can still ack, reject
//! or dead-letter it, and `?` turns it into the plain [`Error::BadDelivery`] (tag, kind,
//! exchange, routing key) in a function returning [`Result`].
//!
//! With the `tls` feature (on by default), `amqps://` URIs and
//! [`ConnectionOptions::tls`] put rustls between the socket and the frame decoder: the
//! decoder and every bound above still see plaintext, and each TLS failure is its own
//! [`Error::Tls`] kind. [`Connection::update_secret`] and a [`CredentialsProvider`] keep
//! expiring credentials (OAuth2 tokens) fresh without reconnecting.
//!
//! ## Module graph
//!
//! Imports point down this list and never up (`scripts/check-layers` checks it, and that
//! there is no cycle):
//!
//! ```text
//! fuzzing                                       fuzz harnesses: only with the `fuzzing`
//!                                               feature (fuzz/ and lepus's tests), no API
//! pool, worker, dispatch                        the channel pool; the worker pool over a
//!                                               consumer; the dispatcher over many
//! connection, channel, consumer, confirm,       handles (a method that creates a handle
//! batch, stream                                 lives with it: Channel::basic_consume in
//!                                               consumer.rs, Connection::open_channel in
//!                                               channel.rs, Channel::stream_consume in
//!                                               stream.rs); batches of deliveries
//! reliable, refresher                           publish until confirmed; renews a
//!                                               connection's expiring secret (holds the
//!                                               connection weakly)
//! recovery, entity_recovery, connection_state,  the procedure; the state behind Connection
//! secrets                                       (it reaches channels through a trait); the
//!                                               secret each connect logs in with
//! topology                                      recorded exchanges, queues, bindings, channels
//! io (reactor, engine, handshake)               the I/O thread
//! delivery, confirm_tracker, pool_core,        what the I/O thread produces; the pool's
//! unacked                                       books; unsettled deliveries' ages
//! options, uri, events, addresses, tls,        plain data (TLS options, the credentials
//! credentials, queue_args, stats, event_hub    provider, typed queue arguments);
//!                                               counters; the event log and its
//!                                               listener thread
//! error                                         re-exports protocol's reply codes
//! protocol (frame, methods, table, properties, content, reply_code)   bytes only
//! sync, delivery_queue, link, send_core,
//! end_relay, write_gate, trace                 primitives and the loom-checked cores; the
//!                                               one door to `log` / `tracing`
//! ```
//!
//! # Threads
//!
//! [`Connection`], [`Channel`], [`Consumer`], [`Delivery`] and [`Confirmation`] are `Send`
//! and `Sync` (`Consumer` is `Sync` so several threads may receive from one). Give each
//! thread its own channel; calls on one channel are serialised. Every blocking call has a
//! deadline: the connection's operation timeout by default, or [`Channel::with_timeout`].
//! Hundreds of consumers need not mean hundreds of threads: a [`Dispatcher`] serves them
//! with a few, a handler per consumer, each consumer's deliveries in order.
//!
//! When the connection dies (socket error, EOF, two missed heartbeats, stalled writes, or
//! the broker closing it) every thread blocked on it wakes at once with the same error:
//! [`Error::ConnectionLost`] (or [`Error::ServerClosedConnection`]) for a failure, which
//! [`Error::is_connection_lost`] tells apart from [`Error::ConnectionClosed`] after an
//! intentional [`Connection::close`].
//!
//! A connection with an event listener ([`ConnectionOptions::event_listener`] or
//! [`RecoveryOptions::listener`]) has one more thread, `lepus-events`, that calls it:
//! listeners never run on the I/O thread or on a caller's thread.
//!
//! # Recovery
//!
//! Automatic recovery is on by default ([`RecoveryOptions`]). After a lost link, one
//! recovery thread (never more, however many threads saw the failure) reconnects with
//! jittered backoff over the address list, declares the recorded exchanges, queues and
//! bindings again (a server-named queue gets a new name, reported as
//! [`RecoveryEventKind::QueueRenamed`]; its bindings and consumers follow), and reopens
//! every channel under its id with its qos, confirm mode and consumers. The same
//! [`Channel`], [`PooledChannel`] and [`Consumer`] handles go on working; calls made
//! meanwhile wait for the recovery within their deadline. Messages published in confirm
//! mode and not yet confirmed are republished (or handed back, see
//! [`UnconfirmedPolicy`]); nothing is dropped without the caller being told.
//! [`Connection::recovery_events`] gives every step with its time.
//!
//! # Observability
//!
//! [`Connection::events`] and [`ConnectionOptions::event_listener`]: blocked and unblocked,
//! channels closed and consumers cancelled by the broker, returns dropped, recovery steps
//! ([`ConnectionEventKind`]). [`Connection::stats`]: counters of messages, bytes,
//! reconnects, channels and consumers ([`ConnectionStats`]). Cargo features: `metrics`
//! (the counters through the `metrics` facade), `tracing` (spans, and diagnostics as
//! `tracing` events instead of `log` records), `opentelemetry` (the W3C trace context in
//! message headers). The README's "Observability" section names every metric.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
// Under loom only the synchronisation cores are built; much of the rest is unused.
#![cfg_attr(lepus_loom, allow(dead_code, missing_docs))]

/// Items built everywhere except in the loom model build (`--cfg lepus_loom`, a name of
/// lepus's own so that a `--cfg loom` meant for another crate changes nothing here), which
/// compiles only the synchronisation cores that `loom-tests/` explores.
macro_rules! not_under_loom {
    ($($item:item)*) => { $( #[cfg(not(lepus_loom))] $item )* };
}

// The synchronisation cores (checked by the loom models) and what they need: built in
// every configuration.
mod confirm_tracker;
mod delivery_queue;
mod end_relay;
mod error;
mod link;
mod pool_core;
mod protocol;
mod send_core;
mod sync;
mod trace;
mod write_gate;

// Everything else: the I/O thread, the handles, options, topology and recovery.
not_under_loom! {
    mod addresses;
    mod batch;
    mod channel;
    mod confirm;
    mod connection;
    mod connection_state;
    mod consumer;
    mod credentials;
    mod delivery;
    mod dispatch;
    mod entity_recovery;
    mod event_hub;
    mod events;
    mod io;
    mod options;
    mod pool;
    #[cfg(feature = "opentelemetry")]
    mod propagation;
    mod queue_args;
    mod recovery;
    mod refresher;
    mod reliable;
    mod reopen;
    mod secrets;
    mod stats;
    mod stream;
    mod tls;
    mod topology;
    mod unacked;
    mod uri;
    mod worker;
}

// The README's examples compile as doctests (`cargo test --doc`), so that they keep up
// with the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

// The fuzz harnesses: only with the `fuzzing` feature (fuzz/ and lepus's own tests).
#[cfg(feature = "fuzzing")]
pub mod fuzzing;

// The public interface is:
pub use confirm_tracker::Confirm;
pub use error::{BadDeliveryKind, Error, HandshakeStage, Result, TlsFailure, reply_code};
pub use pool_core::{DEFAULT_POOL_SIZE, PoolStats};
pub use protocol::properties::BasicProperties;
pub use protocol::table::{FieldTable, FieldValue};
not_under_loom! {
    pub use addresses::{Address, AddressResolver, DnsResolver};
    pub use channel::{Channel, QueueInfo, UnconfirmedMessage};
    pub use confirm::Confirmation;
    pub use connection::Connection;
    pub use batch::Batch;
    pub use consumer::{Consumer, Iter};
    pub use credentials::{Credentials, CredentialsProvider};
    pub use delivery::{BadDelivery, Delivery, RecvError, Returned};
    pub use dispatch::Dispatcher;
    pub use events::{
        ConnectionEvent, ConnectionEventKind, RecoveryEvent, RecoveryEventKind, TopologyEntity,
    };
    pub use options::{
        AuthMechanism, ConnectionOptions, ConsumeOptions, DEFAULT_CONNECTION_QUEUE_BYTES,
        DEFAULT_CONSUMER_QUEUE_BYTES, DEFAULT_MAX_OUTPUT_BYTES, DEFAULT_WRITE_STALL_TIMEOUT,
        EventListener, ExchangeDeclareOptions, ExchangeDeleteOptions, PublishOptions,
        QueueDeclareOptions, QueueDeleteOptions, RecoveryOptions, TopologyFilter,
        UnconfirmedPolicy,
    };
    #[cfg(feature = "opentelemetry")]
    pub use propagation::{HeaderExtractor, HeaderInjector};
    pub use stats::ConnectionStats;
    pub use pool::{ChannelPool, ChannelPoolBuilder, PooledChannel};
    pub use queue_args::{
        DeadLetterStrategy, Overflow, QueueArgs, QueueType, StreamArgs, StreamInterval, StreamOffset,
    };
    /// The rustls version lepus is built with, for [`TlsOptions::client_config`].
    #[cfg(feature = "tls")]
    pub use rustls;
    /// The OpenTelemetry API version lepus is built with (the `opentelemetry` feature),
    /// for the contexts of [`BasicProperties::with_context`] and
    /// [`Delivery::trace_context`].
    #[cfg(feature = "opentelemetry")]
    pub use opentelemetry;
    pub use tls::TlsOptions;
    pub use worker::{Outcome, WorkerOptions, WorkerPool, WorkerStats};
}

/// Internals exposed for fuzzing, model checks and tests; not part of the stable API.
#[doc(hidden)]
pub mod internal {
    pub use crate::delivery_queue::set_stall_repoll;
    pub use crate::protocol::content::{Assembler, Content, ContentMethod, ContentProblem};
    pub use crate::protocol::decode_server_method;
    pub use crate::protocol::frame::{
        DecodedPublish, FrameDecoder, FrameError, RawFrame, decode_publish, put_publish,
    };
    pub use crate::protocol::lenient::{LenientClose, decode_close, decode_content_method};
    pub use crate::protocol::properties::{decode_properties, header_prefix};
    pub use crate::protocol::table::{encode_table, scan_table};

    /// The synchronisation cores, as the model tests in `loom-tests/` drive them.
    pub mod model {
        pub use crate::confirm_tracker::{ConfirmTracker, Entry, outcome};
        pub use crate::delivery_queue::QueueShared;
        pub use crate::end_relay::EndRelay;
        pub use crate::link::{Ended, Link, LinkCell, LinkGen, LinkState};
        pub use crate::pool_core::{Lease, PoolCore, PoolStats, Poolable};
        pub use crate::send_core::{FailFlag, WakeFlag};
        pub use crate::sync::lightq as queue;
        pub use crate::sync::oneshot;
        pub use crate::sync::ready_list::{ReadyList, Ticket};
        pub use crate::write_gate::{Direct, WriteGate};
    }
}
