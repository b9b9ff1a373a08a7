//! The one error type of lepus, with AMQP reply codes where the broker gave them.

use std::fmt;
use std::io;

use crate::protocol::content::ContentProblem;

/// AMQP reply codes (AMQP 0-9-1 section 1.3 and RabbitMQ's extensions) used by lepus.
pub use crate::protocol::reply_code;

/// Why a delivery could not be handed over as a `Delivery`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BadDeliveryKind {
    /// Its properties could not be decoded (malformed, or headers nested too deep).
    Undecodable(String),
    /// Its body exceeds the maximum message size; the body was skipped, not buffered.
    TooLarge {
        /// The announced body size.
        size: u64,
        /// The configured maximum.
        max: u64,
    },
}

impl fmt::Display for BadDeliveryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BadDeliveryKind::Undecodable(why) => f.write_str(why),
            BadDeliveryKind::TooLarge { size, max } => {
                write!(f, "body of {size} bytes exceeds the maximum of {max}")
            }
        }
    }
}

impl From<ContentProblem> for BadDeliveryKind {
    fn from(p: ContentProblem) -> Self {
        match p {
            ContentProblem::Undecodable(s) => BadDeliveryKind::Undecodable(s),
            ContentProblem::TooLarge { size, max } => BadDeliveryKind::TooLarge { size, max },
        }
    }
}

/// Where a connection attempt stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandshakeStage {
    /// Opening the TCP connection.
    Connect,
    /// Waiting for `connection.start` after sending the protocol header.
    Start,
    /// Waiting for `connection.tune` (or a SASL challenge) after `start-ok`.
    Tune,
    /// Waiting for `connection.open-ok`.
    Open,
    /// The TLS handshake (`amqps://`).
    Tls,
}

impl fmt::Display for HandshakeStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HandshakeStage::Connect => "TCP connect",
            HandshakeStage::Start => "waiting for connection.start",
            HandshakeStage::Tune => "waiting for connection.tune",
            HandshakeStage::Open => "waiting for connection.open-ok",
            HandshakeStage::Tls => "TLS handshake",
        })
    }
}

/// Which TLS failure an [`Error::Tls`] is.
///
/// ```no_run
/// use lepus::{Error, TlsFailure};
/// match lepus::Connection::open("amqps://rabbit.internal") {
///     Ok(_) => {}
///     Err(Error::Tls { kind: TlsFailure::UnknownCa, .. }) => eprintln!("give the broker's CA with cacertfile="),
///     Err(Error::Tls { kind, detail }) => eprintln!("TLS {kind}: {detail}"),
///     Err(e) => eprintln!("{e}"),
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlsFailure {
    /// The broker's certificate is not signed by a trusted CA.
    UnknownCa,
    /// The broker's certificate does not name the host (or the SNI name) connected to.
    HostnameMismatch,
    /// The broker's certificate has expired.
    CertificateExpired,
    /// The broker's certificate was refused for another reason.
    InvalidCertificate,
    /// The broker requires a client certificate and none was given.
    ClientCertificateRequired,
    /// The broker refused the client certificate given (unknown CA, expired, ...).
    ClientCertificateRefused,
    /// The peer on the TLS port does not speak TLS (a plaintext AMQP port?).
    NotTlsServer,
    /// A plaintext `amqp://` connection reached a TLS port.
    TlsServerOnPlainPort,
    /// The TLS options could not be used (unreadable PEM, no roots, bad server name).
    Configuration,
    /// `amqps://` in a build without the `tls` cargo feature.
    NotCompiledIn,
    /// Any other TLS failure.
    Other,
}

impl fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsFailure::UnknownCa => "unknown certificate authority",
            TlsFailure::HostnameMismatch => "hostname mismatch",
            TlsFailure::CertificateExpired => "certificate expired",
            TlsFailure::InvalidCertificate => "invalid certificate",
            TlsFailure::ClientCertificateRequired => "client certificate required",
            TlsFailure::ClientCertificateRefused => "client certificate refused",
            TlsFailure::NotTlsServer => "not a TLS server",
            TlsFailure::TlsServerOnPlainPort => "TLS server on a plaintext connection",
            TlsFailure::Configuration => "configuration",
            TlsFailure::NotCompiledIn => "not compiled in",
            TlsFailure::Other => "failure",
        })
    }
}

/// Everything that can go wrong in lepus.
///
/// Use [`Error::is_connection_lost`] to tell a recoverable loss of the link from an
/// intentional close, and [`Error::reply_code`] for the AMQP reply code when there is one.
///
/// ```no_run
/// use lepus::{Error, QueueDeclareOptions, reply_code};
/// let conn = lepus::Connection::open("amqp://127.0.0.1")?;
/// let ch = conn.open_channel()?;
/// let passive = QueueDeclareOptions { passive: true, ..Default::default() };
/// match ch.queue_declare("maybe", &passive) {
///     Ok(q) => println!("{} messages ready", q.message_count),
///     // The broker closed the channel (404): the connection and other channels live on.
///     Err(e) if e.reply_code() == Some(reply_code::NOT_FOUND) => println!("no such queue"),
///     Err(e) if e.is_connection_lost() => println!("link lost; recovery is on it: {e}"),
///     Err(Error::Timeout(what)) => println!("no answer in time: {what}"),
///     Err(e) => return Err(e),
/// }
/// # Ok::<(), lepus::Error>(())
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The `amqp://` URI or an option could not be understood.
    #[error("invalid connection URI or option: {0}")]
    InvalidUri(String),

    /// A socket operation failed while connecting.
    #[error("I/O error during {stage}: {source}")]
    Io {
        /// The step that failed.
        stage: HandshakeStage,
        /// The underlying error (shared, so that every waiter can get a copy).
        // std's Arc by its own name (not the sync shim's `StdArc` alias, which the docs
        // showed): plain shared ownership of an immutable value, never loom's.
        #[source]
        source: std::sync::Arc<io::Error>,
    },

    /// The connection attempt did not finish within the connection timeout.
    #[error("connection timed out after {elapsed_ms} ms ({stage})")]
    ConnectTimeout {
        /// The step that did not finish.
        stage: HandshakeStage,
        /// How long the attempt ran.
        elapsed_ms: u64,
    },

    /// A TLS connection could not be made (`amqps://`); `kind` says which failure.
    #[error("TLS error ({kind}): {detail}")]
    Tls {
        /// Which failure.
        kind: TlsFailure,
        /// What happened, and what to do about it.
        detail: String,
    },

    /// The peer does not speak AMQP 0-9-1.
    #[error("peer is not an AMQP 0-9-1 server: {0}")]
    NotAmqp(String),

    /// The broker refused the credentials.
    #[error("authentication failed: {0}")]
    AuthenticationFailed(String),

    /// The broker refused access to the virtual host.
    #[error("access to vhost {vhost:?} refused ({code}): {text}")]
    VhostRefused {
        /// The vhost asked for.
        vhost: String,
        /// The reply code (usually 530 or 403).
        code: u16,
        /// The broker's text.
        text: String,
    },

    /// The broker closed the connection (`connection.close` from the server).
    #[error("connection closed by the broker ({code}): {text}")]
    ServerClosedConnection {
        /// AMQP reply code.
        code: u16,
        /// The broker's reply text.
        text: String,
        /// Class id of the method that caused it (0 if none).
        class_id: u16,
        /// Method id of the method that caused it (0 if none).
        method_id: u16,
    },

    /// The broker closed a channel (`channel.close` from the server); other channels live on.
    #[error("channel {channel} closed by the broker ({code}): {text}")]
    ServerClosedChannel {
        /// The channel id.
        channel: u16,
        /// AMQP reply code (e.g. 404, 406).
        code: u16,
        /// The broker's reply text.
        text: String,
        /// Class id of the method that caused it.
        class_id: u16,
        /// Method id of the method that caused it.
        method_id: u16,
    },

    /// The peer broke the protocol; lepus closed the connection with this reply code.
    #[error("protocol violation by the peer, connection closed ({code}): {text}")]
    Protocol {
        /// The reply code lepus sent in its `connection.close`.
        code: u16,
        /// What was wrong.
        text: String,
    },

    /// The link to the broker was lost (socket error, EOF, missed heartbeats, stalled write).
    /// This is recoverable: a new connection may succeed.
    #[error("connection lost: {0}")]
    ConnectionLost(String),

    /// The connection was closed by this application; nothing will recover it.
    #[error("connection closed by the application")]
    ConnectionClosed,

    /// The channel was closed by this application.
    #[error("channel {0} closed by the application")]
    ChannelClosed(u16),

    /// A blocking call did not finish before its deadline.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),

    /// The broker cancelled the consumer (queue deleted, node failure, ...).
    #[error("consumer {tag:?} cancelled: {reason}")]
    ConsumerCancelled {
        /// The consumer tag.
        tag: String,
        /// Why the consumer ended.
        reason: String,
    },

    /// A delivery arrived that could not be decoded or was too large. The consumer, the
    /// channel and the connection carry on. This is the plain-data form of a
    /// [`crate::RecvError::Bad`] (which also lets you ack, reject or dead-letter the
    /// message); it is what `?` makes of one in a function returning [`Result`].
    #[error("delivery {delivery_tag} on channel {channel} could not be decoded: {kind}")]
    BadDelivery {
        /// The channel it came on.
        channel: u16,
        /// Its delivery tag.
        delivery_tag: u64,
        /// Why it is bad.
        kind: BadDeliveryKind,
        /// The exchange it was published to.
        exchange: String,
        /// The routing key it was published with.
        routing_key: String,
    },

    /// A message was larger than the configured maximum message size.
    #[error("message of {size} bytes exceeds the maximum message size of {max} bytes")]
    MessageTooLarge {
        /// The message size.
        size: u64,
        /// The configured maximum.
        max: u64,
    },

    /// An argument the caller passed cannot be sent (string too long, table too deep, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// All channel ids allowed by `channel_max` are in use.
    #[error("no free channel id (channel_max {0})")]
    NoFreeChannel(u16),

    /// The broker replied with something lepus did not expect for this call.
    #[error("unexpected reply to {operation}: {got}")]
    UnexpectedReply {
        /// The call.
        operation: &'static str,
        /// What came back.
        got: String,
    },

    /// The channel is not in confirm mode.
    #[error("channel is not in confirm mode")]
    NotInConfirmMode,

    /// The broker nacked messages published in confirm mode: it did not take them (a
    /// queue's overflow policy refused them, a quorum queue had no leader, an internal
    /// error). Publish them again, or give up on them: nothing else will.
    /// [`Confirmation::wait`](crate::Confirmation::wait) reports its one message;
    /// [`Channel::wait_for_confirms`](crate::Channel::wait_for_confirms) every message
    /// nacked since its last call.
    #[error("{}", nacked_text(*channel, sequences, *unlisted))]
    #[non_exhaustive]
    Nacked {
        /// The channel they were published on.
        channel: u16,
        /// Their publish sequence numbers (the delivery tags the broker nacked, counted
        /// from 1 on the channel's current connection, as
        /// [`Channel::next_publish_sequence`](crate::Channel::next_publish_sequence)
        /// gives them), in the order the broker nacked them. `wait_for_confirms` lists at
        /// most the first 1,024 nacked since its last call (the channel does not keep more
        /// for an application that never asks) and counts the rest in `unlisted`.
        sequences: Vec<u64>,
        /// How many more messages were nacked beyond those in `sequences` (0 unless more
        /// than 1,024 were nacked since the last `wait_for_confirms`).
        unlisted: u64,
    },
}

/// The text of an [`Error::Nacked`]: the first few sequence numbers, then how many more.
fn nacked_text(channel: u16, sequences: &[u64], unlisted: u64) -> String {
    const SHOWN: usize = 8;
    let total = sequences.len() as u64 + unlisted;
    let mut s = format!(
        "the broker nacked {total} message(s) published on channel {channel}: sequence number(s) "
    );
    let shown: Vec<String> = sequences.iter().take(SHOWN).map(u64::to_string).collect();
    s.push_str(&shown.join(", "));
    let more = total - shown.len() as u64;
    if more > 0 {
        s.push_str(&format!(" and {more} more"));
    }
    s
}

impl Error {
    /// True when the link was lost (socket error, EOF, heartbeat timeout, broker forced
    /// close, or a broker closing the connection with 541 INTERNAL_ERROR): the kind of
    /// failure that automatic recovery handles.
    ///
    /// A 541 is the broker's own failure, not the application's: RabbitMQ 3.10 closes a
    /// connection with it when one of its channel processes crashes, e.g. a publish to a
    /// quorum queue while a member's node shuts down (seen in a rolling restart).
    pub fn is_connection_lost(&self) -> bool {
        match self {
            Error::ConnectionLost(_) => true,
            Error::ServerClosedConnection { code, .. } => {
                *code == reply_code::CONNECTION_FORCED || *code == reply_code::INTERNAL_ERROR
            }
            _ => false,
        }
    }

    /// The AMQP reply code, where the broker (or lepus, on a protocol violation) gave one.
    pub fn reply_code(&self) -> Option<u16> {
        match self {
            Error::ServerClosedConnection { code, .. }
            | Error::ServerClosedChannel { code, .. }
            | Error::Protocol { code, .. }
            | Error::VhostRefused { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Result alias used throughout lepus.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    /// The text counts the unlisted nacks with the listed ones.
    #[test]
    fn nacked_text_counts_the_unlisted_sequence_numbers() {
        let e = Error::Nacked {
            channel: 3,
            sequences: (1..=10).collect(),
            unlisted: 5,
        };
        let text = e.to_string();
        assert!(text.starts_with("the broker nacked 15 message(s) published on channel 3"));
        assert!(
            text.ends_with("1, 2, 3, 4, 5, 6, 7, 8 and 7 more"),
            "{text}"
        );
        let one = Error::Nacked {
            channel: 1,
            sequences: vec![4],
            unlisted: 0,
        };
        assert!(one.to_string().ends_with("sequence number(s) 4"));
    }
}
