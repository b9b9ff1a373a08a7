//! What a connection tells about itself: its events (blocked, channels and consumers the
//! broker ended, returns dropped, recovery steps) with their timestamps, and the bounded
//! log a connection keeps of them (the listener side is in event_hub.rs).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A step of a recovery, with when it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecoveryEventKind {
    /// The link of `generation` failed with this error.
    FailureDetected(String),
    /// Every thread waiting on the failed link has been woken.
    WaitersWoken,
    /// A reconnection attempt failed.
    AttemptFailed {
        /// 1-based attempt number.
        attempt: u32,
        /// Why.
        error: String,
    },
    /// A new connection is open (handshake done).
    Connected {
        /// Host connected to.
        host: String,
        /// Port connected to.
        port: u16,
    },
    /// A server-named queue was declared again and got a new name; its bindings and
    /// consumers follow it.
    QueueRenamed {
        /// The name before the failure.
        old: String,
        /// The name on the new connection.
        new: String,
    },
    /// Exchanges, queues and bindings are declared again.
    TopologyRecovered,
    /// Channels, qos, confirm mode and consumers are restored.
    ConsumersRestored {
        /// Channels reopened.
        channels: usize,
        /// Consumers restored.
        consumers: usize,
        /// Unconfirmed messages republished.
        republished: usize,
    },
    /// The new connection is in use.
    Recovered,
    /// Recovery stopped trying (attempts exhausted); the connection is dead.
    GaveUp(String),
    /// The credentials provider gave a new secret and the broker took it
    /// (`connection.update-secret`); it is valid for this long, if the provider said.
    SecretRefreshed {
        /// The new secret's lifetime.
        expires_in: Option<Duration>,
    },
    /// Refreshing the secret failed (provider or broker); it is retried.
    SecretRefreshFailed(String),
    /// One recorded entity could not be restored (e.g. a classic queue whose node is
    /// down: 404). The rest of the topology recovered and the connection serves traffic;
    /// this entity (and what depends on it: its bindings, its consumers) is retried in the
    /// background with backoff.
    EntityFailed {
        /// What could not be restored.
        entity: TopologyEntity,
        /// The broker's answer (reply code and text) or why it could not be sent.
        error: String,
    },
    /// An entity that had failed was restored by the background retry.
    EntityRecovered(TopologyEntity),
}

/// One recorded entity of a connection's topology, as recovery names it (in events and
/// in the filter of [`crate::RecoveryOptions::topology_filter`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TopologyEntity {
    /// An exchange, by name.
    Exchange(String),
    /// A queue, by name (a server-named queue by its name before recovery).
    Queue(String),
    /// A binding of `destination` (a queue, or an exchange if `to_exchange`) to `source`.
    Binding {
        /// Source exchange.
        source: String,
        /// Destination queue or exchange.
        destination: String,
        /// Routing key.
        routing_key: String,
        /// The destination is an exchange.
        to_exchange: bool,
    },
    /// A consumer, by tag, with its queue and channel.
    Consumer {
        /// Consumer tag.
        tag: String,
        /// The queue it consumes from.
        queue: String,
        /// Its channel id.
        channel: u16,
    },
}

impl std::fmt::Display for TopologyEntity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TopologyEntity::Exchange(n) => write!(f, "exchange {n:?}"),
            TopologyEntity::Queue(n) => write!(f, "queue {n:?}"),
            TopologyEntity::Binding {
                source,
                destination,
                routing_key,
                to_exchange,
            } => {
                let kind = if *to_exchange { "exchange" } else { "queue" };
                write!(
                    f,
                    "binding of {kind} {destination:?} to {source:?} with key {routing_key:?}"
                )
            }
            TopologyEntity::Consumer {
                tag,
                queue,
                channel,
            } => write!(
                f,
                "consumer {tag:?} of queue {queue:?} on channel {channel}"
            ),
        }
    }
}

/// One recovery event.
///
/// ```no_run
/// use lepus::RecoveryEventKind;
/// let conn = lepus::Connection::open("amqp://127.0.0.1")?;
/// // ... after a failure:
/// for e in conn.recovery_events() {
///     println!("{:?} generation {}: {:?}", e.at, e.generation, e.kind);
///     if let RecoveryEventKind::QueueRenamed { old, new } = &e.kind {
///         println!("server-named queue {old} is now {new}");
///     }
/// }
/// # Ok::<(), lepus::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecoveryEvent {
    /// When it happened.
    pub at: Instant,
    /// The connection generation it concerns (1 is the first connection).
    pub generation: u64,
    /// What happened.
    pub kind: RecoveryEventKind,
}

impl RecoveryEvent {
    /// The recovery step of a connection event, if it is one.
    pub(crate) fn from_connection_event(e: &ConnectionEvent) -> Option<RecoveryEvent> {
        match &e.kind {
            ConnectionEventKind::Recovery(kind) => Some(RecoveryEvent {
                at: e.at,
                generation: e.generation,
                kind: kind.clone(),
            }),
            _ => None,
        }
    }
}

/// What happened to a connection (see [`ConnectionEvent`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionEventKind {
    /// The broker blocked publishing on this connection (`connection.blocked`, e.g. a
    /// memory or disk alarm); publishers wait, within their deadline, until it unblocks.
    Blocked {
        /// The broker's reason (RabbitMQ: `"low on memory"`, `"low on disk"`).
        reason: String,
    },
    /// The broker lifted the block (`connection.unblocked`).
    Unblocked,
    /// The broker closed a channel (`channel.close`, e.g. 404 after a passive declare of
    /// a missing queue, 406 for a precondition). Its waiters got the same error.
    ChannelClosed {
        /// The channel id.
        channel: u16,
        /// The broker's reply code.
        reply_code: u16,
        /// The broker's reply text.
        reply_text: String,
    },
    /// The broker cancelled a consumer (`basic.cancel` from the broker: its queue was
    /// deleted, or its node went down).
    ConsumerCancelled {
        /// The channel id.
        channel: u16,
        /// The consumer tag.
        tag: String,
        /// The queue it consumed from (as subscribed).
        queue: String,
    },
    /// Returned messages (`basic.return`) were dropped because the channel's returns
    /// queue was full (1,024 returns or its byte bound) and nobody read it
    /// ([`crate::Channel::recv_return`]), or because the application closed the channel
    /// as one was being queued. Reported at the 1st, 2nd, 4th, 8th, ... drop of a
    /// channel; [`crate::ConnectionStats::returns_dropped`] has the exact count.
    ReturnsDropped {
        /// The channel id.
        channel: u16,
        /// Returns dropped on this channel so far.
        dropped: u64,
    },
    /// Deliveries of this channel stayed unacknowledged past the threshold of
    /// [`ConnectionOptions::unacked_warning`](crate::ConnectionOptions::unacked_warning)
    /// (each reported once): ack them before the broker's `consumer_timeout` closes the
    /// channel.
    DeliveriesUnacked {
        /// The channel.
        channel: u16,
        /// Their delivery tags, oldest first.
        delivery_tags: Vec<u64>,
        /// How long the oldest has waited.
        oldest: Duration,
    },
    /// A step of a recovery (the same as [`RecoveryEvent`]s).
    Recovery(RecoveryEventKind),
}

/// One event of a connection, with when it happened and on which of its TCP connections
/// (generations). Read them with [`crate::Connection::events`] or hear them with
/// [`crate::ConnectionOptions::event_listener`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionEvent {
    /// When it happened.
    pub at: Instant,
    /// The connection generation it concerns (1 is the first connection; 0 for a
    /// recovery that gave up).
    pub generation: u64,
    /// What happened.
    pub kind: ConnectionEventKind,
}

impl ConnectionEvent {
    pub(crate) fn new(generation: u64, kind: ConnectionEventKind) -> Self {
        ConnectionEvent {
            at: Instant::now(),
            generation,
            kind,
        }
    }
}

/// Bounded log of recent events.
pub(crate) struct EventLog {
    events: VecDeque<ConnectionEvent>,
}

/// Events a connection keeps (oldest dropped first).
pub(crate) const EVENT_LOG: usize = 4096;

impl EventLog {
    pub(crate) fn new() -> Self {
        EventLog {
            events: VecDeque::new(),
        }
    }
    pub(crate) fn push(&mut self, e: ConnectionEvent) {
        if self.events.len() == EVENT_LOG {
            self.events.pop_front();
        }
        self.events.push_back(e);
    }
    pub(crate) fn snapshot(&self) -> Vec<ConnectionEvent> {
        self.events.iter().cloned().collect()
    }
}
