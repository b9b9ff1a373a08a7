//! Stream queues: declaring one with typed options, and consuming it from a typed offset
//! with a consumer that recovery resumes where it stopped.
//!
//! (The at-least-once contract is in [`Channel::stream_consume`]'s docs.)

use crate::channel::{Channel, QueueInfo};
use crate::consumer::Consumer;
use crate::error::{Error, Result};
use crate::options::ConsumeOptions;
use crate::queue_args::{StreamArgs, StreamOffset};
use crate::sync::Ordering;
#[cfg(doc)]
use crate::Delivery;

impl Channel {
    /// Declare a stream queue (durable, `x-queue-type: stream`) with these limits.
    ///
    /// ```no_run
    /// use lepus::{Connection, StreamArgs};
    /// use std::time::Duration;
    ///
    /// let conn = Connection::open("amqp://guest:guest@127.0.0.1:5672/%2f")?;
    /// let ch = conn.open_channel()?;
    /// let args = StreamArgs::new()
    ///     .max_length_bytes(5_000_000_000)
    ///     .max_age(Duration::from_secs(7 * 24 * 3600))
    ///     .max_segment_size_bytes(100_000_000);
    /// ch.stream_declare("events", &args)?;
    /// # Ok::<(), lepus::Error>(())
    /// ```
    pub fn stream_declare(&self, name: &str, args: &StreamArgs) -> Result<QueueInfo> {
        self.queue_declare(name, &args.queue_args().declare_options())
    }

    /// Consume a stream from `from`. The channel needs a prefetch count
    /// ([`Channel::basic_qos`]) and the consumer manual acknowledgement: RabbitMQ refuses
    /// a stream consumer without them, and so does this call (before asking).
    ///
    /// After a lost link, recovery subscribes the consumer again after the last offset
    /// queued to it, not from `from`.
    ///
    /// # At-least-once, and where a recovered stream consumer resumes
    ///
    /// A stream keeps its messages; a consumer chooses where to start ([`StreamOffset`]).
    /// After a lost link, other clients subscribe the consumer again with its original
    /// specification, so a consumer that started at `first` gets the whole stream again. A
    /// lepus stream consumer instead records, as the I/O thread queues each delivery to it,
    /// the offset after that delivery's `x-stream-offset`, and recovery subscribes it from
    /// there. Deliveries already in the consumer's local queue at the failure are still
    /// handed to the application (they come before the recovery's, in the same queue), so
    /// the application sees each offset once, in order:
    ///
    /// - nothing is skipped: what the broker had sent but lepus had not queued (in the
    ///   socket, or waiting for room in a full queue) comes again from the new subscription;
    /// - nothing is repeated: the in-flight window of redeliveries is zero messages. The one
    ///   assumption is the broker's: RabbitMQ reads a stream in chunks and, asked for an
    ///   offset inside a chunk, drops that chunk's earlier messages itself (RabbitMQ 3.10
    ///   does; `tests/stream.rs` checks it with `StreamOffset::Offset(42)`).
    ///
    /// Before its first delivery a consumer resubscribes with `from` itself: one that
    /// started at [`StreamOffset::Next`] and received nothing yet misses what was written
    /// while the link was down (start from a timestamp or an offset to avoid that).
    ///
    /// That is at-least-once processing in the application's hands, as for every consumer:
    /// a delivery handed out is the application's, and what it does with it before a crash
    /// of the whole process is beyond any client. An application that keeps its own position
    /// (for a restart) stores [`Delivery::stream_offset`] of what it processed and consumes
    /// from [`StreamOffset::Offset`] one past it.
    ///
    /// Acknowledgements on a stream are credit only (a stream keeps every message whether it
    /// is acked or not); ack each delivery, or the broker stops at the prefetch count.
    ///
    /// ```no_run
    /// use lepus::{Connection, ConsumeOptions, StreamOffset};
    ///
    /// let conn = Connection::open("amqp://guest:guest@127.0.0.1:5672/%2f")?;
    /// let ch = conn.open_channel()?;
    /// ch.basic_qos(500, false)?;
    /// let consumer = ch.stream_consume("events", StreamOffset::First, &ConsumeOptions::default())?;
    /// for d in consumer.iter() {
    ///     let d = d?;
    ///     println!("{:?}: {} bytes", d.stream_offset(), d.body().len());
    ///     d.ack()?;
    /// }
    /// # Ok::<(), lepus::Error>(())
    /// ```
    pub fn stream_consume(
        &self,
        queue: &str,
        from: StreamOffset,
        opts: &ConsumeOptions,
    ) -> Result<Consumer> {
        if opts.no_ack {
            return Err(Error::InvalidArgument(
                "a stream consumer needs manual acknowledgement (no_ack: false)".into(),
            ));
        }
        if self.shared().prefetch.load(Ordering::Acquire) == 0 {
            return Err(Error::InvalidArgument(
                "a stream consumer needs a prefetch count: call basic_qos first".into(),
            ));
        }
        let opts = opts.clone().stream_offset(from);
        self.basic_consume(queue, &opts)
    }
}
