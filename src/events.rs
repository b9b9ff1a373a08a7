//! Recovery events with their timestamps, and the bounded log a connection keeps of them.

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

/// Bounded log of recent events.
pub(crate) struct EventLog {
    events: VecDeque<RecoveryEvent>,
}

const EVENT_LOG: usize = 4096;

impl EventLog {
    pub(crate) fn new() -> Self {
        EventLog {
            events: VecDeque::new(),
        }
    }
    pub(crate) fn push(&mut self, e: RecoveryEvent) {
        if self.events.len() == EVENT_LOG {
            self.events.pop_front();
        }
        self.events.push_back(e);
    }
    pub(crate) fn snapshot(&self) -> Vec<RecoveryEvent> {
        self.events.iter().cloned().collect()
    }
}
