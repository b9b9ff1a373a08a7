//! Typed queue and consumer arguments: quorum, stream and classic queue features as
//! builders that produce the field tables RabbitMQ reads (`x-queue-type`, ...).
//!
//! Raw tables stay possible: [`QueueArgs::raw`] adds any key, and
//! [`QueueDeclareOptions::arguments`] / [`ConsumeOptions::arguments`] are plain
//! [`FieldTable`]s.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::options::{ConsumeOptions, QueueDeclareOptions};
use crate::protocol::table::{FieldTable, FieldValue};

/// The kind of queue (`x-queue-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueueType {
    /// A classic queue (the default).
    Classic,
    /// A replicated quorum queue (durable, not exclusive).
    Quorum,
    /// An append-only stream (durable, not exclusive; consumers need a prefetch and
    /// manual acknowledgement).
    Stream,
}

impl QueueType {
    fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
            QueueType::Stream => "stream",
        }
    }
}

/// What a full queue does with a new message (`x-overflow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Overflow {
    /// Drop (or dead-letter) the oldest message (the default).
    DropHead,
    /// Refuse the new message: a publisher in confirm mode gets a nack.
    RejectPublish,
    /// Refuse and dead-letter the new message (classic queues).
    RejectPublishDlx,
}

impl Overflow {
    fn as_str(self) -> &'static str {
        match self {
            Overflow::DropHead => "drop-head",
            Overflow::RejectPublish => "reject-publish",
            Overflow::RejectPublishDlx => "reject-publish-dlx",
        }
    }
}

/// How a quorum queue dead-letters (`x-dead-letter-strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeadLetterStrategy {
    /// Fire and forget (the default).
    AtMostOnce,
    /// Kept until the dead-letter target confirmed it; needs `x-overflow:
    /// reject-publish` ([`QueueArgs::dead_letter_at_least_once`] sets both).
    AtLeastOnce,
}

/// Arguments of a `queue.declare`, built with typed setters.
///
/// ```no_run
/// use lepus::{Connection, Overflow, QueueArgs};
/// use std::time::Duration;
///
/// let conn = Connection::open("amqp://guest:guest@127.0.0.1:5672/%2f")?;
/// let ch = conn.open_channel()?;
/// let opts = QueueArgs::quorum()
///     .delivery_limit(5)
///     .dead_letter_exchange("dlx")
///     .message_ttl(Duration::from_secs(60))
///     .max_length(10_000)
///     .overflow(Overflow::RejectPublish)
///     .declare_options();
/// ch.queue_declare("orders", &opts)?;
/// # Ok::<(), lepus::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueArgs {
    table: FieldTable,
    queue_type: Option<QueueType>,
}

impl QueueArgs {
    /// No arguments: a classic queue with the broker's defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// A quorum queue (`x-queue-type: quorum`).
    pub fn quorum() -> Self {
        Self::new().queue_type(QueueType::Quorum)
    }

    /// A stream (`x-queue-type: stream`); see also [`StreamArgs`].
    pub fn stream() -> Self {
        Self::new().queue_type(QueueType::Stream)
    }

    /// `x-queue-type`.
    pub fn queue_type(mut self, t: QueueType) -> Self {
        self.queue_type = Some(t);
        self.set("x-queue-type", t.as_str())
    }

    /// Quorum queues: after this many redeliveries a message is dropped or
    /// dead-lettered (`x-delivery-limit`): the cure for a poison message requeued forever.
    pub fn delivery_limit(self, n: u32) -> Self {
        self.set("x-delivery-limit", i64::from(n))
    }

    /// Quorum queues: `x-dead-letter-strategy`.
    pub fn dead_letter_strategy(self, s: DeadLetterStrategy) -> Self {
        let v = match s {
            DeadLetterStrategy::AtMostOnce => "at-most-once",
            DeadLetterStrategy::AtLeastOnce => "at-least-once",
        };
        self.set("x-dead-letter-strategy", v)
    }

    /// Quorum queues: at-least-once dead-lettering, with the `reject-publish` overflow it
    /// requires.
    pub fn dead_letter_at_least_once(self) -> Self {
        self.dead_letter_strategy(DeadLetterStrategy::AtLeastOnce)
            .overflow(Overflow::RejectPublish)
    }

    /// Rejected, expired or overflowing messages go to this exchange
    /// (`x-dead-letter-exchange`; `""` is the default exchange).
    pub fn dead_letter_exchange(self, exchange: &str) -> Self {
        self.set("x-dead-letter-exchange", exchange)
    }

    /// ...with this routing key instead of their own (`x-dead-letter-routing-key`).
    pub fn dead_letter_routing_key(self, key: &str) -> Self {
        self.set("x-dead-letter-routing-key", key)
    }

    /// Messages expire after this long in the queue (`x-message-ttl`, milliseconds).
    pub fn message_ttl(self, ttl: Duration) -> Self {
        self.set("x-message-ttl", millis(ttl))
    }

    /// The queue is deleted after being unused this long (`x-expires`, milliseconds).
    pub fn expires(self, after: Duration) -> Self {
        self.set("x-expires", millis(after))
    }

    /// At most this many ready messages (`x-max-length`); see [`QueueArgs::overflow`].
    pub fn max_length(self, n: u64) -> Self {
        self.set("x-max-length", clamp(n))
    }

    /// At most this many bytes of ready message bodies (`x-max-length-bytes`); on a
    /// stream, the total size it keeps (older segments are discarded).
    pub fn max_length_bytes(self, n: u64) -> Self {
        self.set("x-max-length-bytes", clamp(n))
    }

    /// What happens when a max length is reached (`x-overflow`).
    pub fn overflow(self, o: Overflow) -> Self {
        self.set("x-overflow", o.as_str())
    }

    /// Only one consumer receives at a time; the others take over in turn when it goes
    /// (`x-single-active-consumer`).
    pub fn single_active_consumer(self, on: bool) -> Self {
        self.set("x-single-active-consumer", on)
    }

    /// Classic queues: priorities 0..=`max` (`x-max-priority`).
    pub fn max_priority(self, max: u8) -> Self {
        self.set("x-max-priority", i64::from(max))
    }

    /// Classic queues on RabbitMQ before 3.12: keep messages on disk (`x-queue-mode:
    /// lazy`). From 3.12 on every classic queue behaves so and the argument is ignored.
    pub fn lazy(self) -> Self {
        self.set("x-queue-mode", "lazy")
    }

    /// Streams: discard segments older than this (`x-max-age`, whole seconds).
    pub fn max_age(self, age: Duration) -> Self {
        self.set("x-max-age", format!("{}s", age.as_secs().max(1)))
    }

    /// Streams: size of a segment file (`x-stream-max-segment-size-bytes`).
    pub fn stream_max_segment_size_bytes(self, n: u64) -> Self {
        self.set("x-stream-max-segment-size-bytes", clamp(n))
    }

    /// Any other argument, as a raw value.
    pub fn raw(self, key: &str, value: impl Into<FieldValue>) -> Self {
        self.set(key, value)
    }

    fn set(mut self, key: &str, value: impl Into<FieldValue>) -> Self {
        self.table.insert(key, value);
        self
    }

    /// The field table.
    pub fn table(&self) -> &FieldTable {
        &self.table
    }

    /// The field table, taken out.
    pub fn into_table(self) -> FieldTable {
        self.table
    }

    /// Declare options carrying these arguments; quorum queues and streams are durable
    /// (the broker refuses them otherwise).
    pub fn declare_options(self) -> QueueDeclareOptions {
        let durable = matches!(
            self.queue_type,
            Some(QueueType::Quorum | QueueType::Stream)
        );
        QueueDeclareOptions {
            durable,
            arguments: self.table,
            ..Default::default()
        }
    }
}

impl From<QueueArgs> for FieldTable {
    fn from(a: QueueArgs) -> FieldTable {
        a.table
    }
}

impl From<QueueArgs> for QueueDeclareOptions {
    fn from(a: QueueArgs) -> QueueDeclareOptions {
        a.declare_options()
    }
}

/// Typed options of a stream queue: [`QueueArgs::stream`] with the three settings a
/// stream has. See [`Channel::stream_declare`](crate::Channel::stream_declare).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamArgs {
    /// Total size kept (`x-max-length-bytes`).
    pub max_length_bytes: Option<u64>,
    /// Age kept (`x-max-age`, whole seconds).
    pub max_age: Option<Duration>,
    /// Segment file size (`x-stream-max-segment-size-bytes`).
    pub max_segment_size_bytes: Option<u64>,
}

impl StreamArgs {
    /// The broker's defaults (kept forever).
    pub fn new() -> Self {
        Self::default()
    }
    /// Keep at most this many bytes.
    pub fn max_length_bytes(mut self, n: u64) -> Self {
        self.max_length_bytes = Some(n);
        self
    }
    /// Keep messages this long.
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = Some(age);
        self
    }
    /// Segment file size.
    pub fn max_segment_size_bytes(mut self, n: u64) -> Self {
        self.max_segment_size_bytes = Some(n);
        self
    }
    /// As queue arguments.
    pub fn queue_args(&self) -> QueueArgs {
        let mut a = QueueArgs::stream();
        if let Some(n) = self.max_length_bytes {
            a = a.max_length_bytes(n);
        }
        if let Some(age) = self.max_age {
            a = a.max_age(age);
        }
        if let Some(n) = self.max_segment_size_bytes {
            a = a.stream_max_segment_size_bytes(n);
        }
        a
    }
}

/// Where a stream consumer starts (`x-stream-offset`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamOffset {
    /// The first message still in the stream.
    First,
    /// The last chunk written (a few of the latest messages).
    Last,
    /// Only messages written from now on (the broker's default).
    Next,
    /// From this offset (clamped by the broker to what the stream still holds).
    Offset(u64),
    /// From the first chunk written at or after this time (second precision).
    Timestamp(SystemTime),
    /// From this long ago: a number and a unit among `Y M D h m s`, e.g. `"30m"`, `"1D"`
    /// (build it with [`StreamOffset::interval`], which checks the form).
    Interval(String),
}

impl StreamOffset {
    /// An interval like `"2h"` or `"7D"`; refused unless it is digits and one unit of
    /// `Y M D h m s`.
    pub fn interval(s: &str) -> Result<Self> {
        let (digits, unit) = s.split_at(s.len().saturating_sub(1));
        let ok = !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
            && matches!(unit, "Y" | "M" | "D" | "h" | "m" | "s");
        if ok {
            Ok(StreamOffset::Interval(s.to_owned()))
        } else {
            Err(Error::InvalidArgument(format!(
                "stream interval {s:?}: digits then one of Y M D h m s"
            )))
        }
    }

    /// The argument value.
    pub fn to_field_value(&self) -> FieldValue {
        match self {
            StreamOffset::First => "first".into(),
            StreamOffset::Last => "last".into(),
            StreamOffset::Next => "next".into(),
            StreamOffset::Offset(n) => FieldValue::I64(clamp(*n)),
            StreamOffset::Timestamp(t) => FieldValue::Timestamp(
                t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            ),
            StreamOffset::Interval(s) => s.as_str().into(),
        }
    }
}

// Typed consumer arguments, as builder methods on the options they fill.
impl ConsumeOptions {
    /// Consumer priority (`x-priority`): higher-priority consumers of a queue get
    /// messages first while they have prefetch room.
    ///
    /// ```
    /// let opts = lepus::ConsumeOptions::default().priority(10);
    /// assert_eq!(opts.arguments.get("x-priority"), Some(&lepus::FieldValue::I32(10)));
    /// ```
    pub fn priority(mut self, p: i32) -> Self {
        self.arguments.insert("x-priority", p);
        self
    }

    /// Where a stream consumer starts (`x-stream-offset`). A consumer with this argument
    /// is a stream consumer: recovery resubscribes it after the last offset it received,
    /// not from here (see [`Channel::stream_consume`](crate::Channel::stream_consume)).
    pub fn stream_offset(mut self, from: StreamOffset) -> Self {
        self.arguments.insert("x-stream-offset", from.to_field_value());
        self
    }
}

// Whole milliseconds, as RabbitMQ reads TTLs.
fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorum_builder_fills_the_table() {
        let o = QueueArgs::quorum()
            .delivery_limit(3)
            .dead_letter_at_least_once()
            .message_ttl(Duration::from_secs(2))
            .declare_options();
        assert!(o.durable);
        let t = &o.arguments;
        assert_eq!(t.get("x-queue-type").and_then(|v| v.as_str()), Some("quorum"));
        assert_eq!(t.get("x-delivery-limit"), Some(&FieldValue::I64(3)));
        assert_eq!(t.get("x-overflow").and_then(|v| v.as_str()), Some("reject-publish"));
        assert_eq!(t.get("x-message-ttl"), Some(&FieldValue::I64(2000)));
    }

    #[test]
    fn intervals_are_checked() {
        assert!(StreamOffset::interval("30m").is_ok());
        assert!(StreamOffset::interval("7D").is_ok());
        for bad in ["", "m", "3", "3x", "-1h", "1.5h"] {
            assert!(StreamOffset::interval(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn offsets_encode_as_rabbitmq_reads_them() {
        assert_eq!(StreamOffset::Offset(7).to_field_value(), FieldValue::I64(7));
        assert_eq!(StreamOffset::First.to_field_value().as_str(), Some("first"));
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            StreamOffset::Timestamp(t).to_field_value(),
            FieldValue::Timestamp(1_700_000_000)
        );
    }
}
