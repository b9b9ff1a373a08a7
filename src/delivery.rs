//! What the I/O thread produces for consumers and publishers: deliveries, bad deliveries,
//! returned messages, the consumer queue's sending end, and the acknowledgement handle
//! they carry. Handles (`Consumer`, `Channel`) consume these; this file knows no handle.

use std::fmt;

use crate::error::{BadDeliveryKind, Error, Result};
use crate::protocol::frame::{put_ack, put_nack, put_reject};
use crate::protocol::properties::BasicProperties;
use crate::sync::lightq::{Notifier, Sender};
use crate::stats::Stats;
use crate::sync::{Arc, AtomicBool, AtomicU64, AtomicUsize, Ordering};

pub(crate) enum ConsumerMsg {
    // Boxed: queue slots stay small whatever the size of a delivery.
    Delivery(Box<Delivery>),
    Bad(Box<BadDelivery>),
    /// The link was lost and the consumer will be restored by recovery.
    Lost(Error),
    End(Error),
}

/// A byte count with a bound, shared by the I/O thread (which charges it before queueing
/// a delivery, and stops reading when a delivery does not fit) and whoever takes the
/// delivery out (which releases it and wakes the I/O thread if it waits). The same
/// hand-shake as the count bound of [`QueueShared`](crate::delivery_queue::QueueShared).
pub(crate) struct ByteBudget {
    queued: AtomicUsize,
    limit: usize,
    io_waiting: AtomicBool,
    /// Wakes the I/O thread that charged this budget (none for a consumer's own budget:
    /// the connection's budget, charged with it, wakes).
    wake: Option<Box<dyn Fn() + Send + Sync>>,
}

impl ByteBudget {
    pub(crate) fn new(limit: usize, wake: Option<Box<dyn Fn() + Send + Sync>>) -> Self {
        ByteBudget {
            queued: AtomicUsize::new(0),
            limit,
            io_waiting: AtomicBool::new(false),
            wake,
        }
    }

    /// Bytes charged and not yet released.
    pub(crate) fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    // An empty budget always takes one message, whatever its size (at most
    // max_message_size): otherwise a message larger than the bound would wait forever.
    fn over(&self, n: usize) -> bool {
        let q = self.queued.load(Ordering::SeqCst);
        q > 0 && q.saturating_add(n) > self.limit
    }

    /// I/O side: true if `n` more bytes fit; if not, the I/O thread is registered for a
    /// wake-up by the next release and must stop reading until then.
    pub(crate) fn reserve_or_wait(&self, n: usize) -> bool {
        if !self.over(n) {
            return true;
        }
        self.io_waiting.store(true, Ordering::SeqCst);
        // Re-check: a release may have come before it could see the flag.
        if self.over(n) {
            return false;
        }
        self.io_waiting.store(false, Ordering::SeqCst);
        true
    }

    fn charge(&self, n: usize) {
        self.queued.fetch_add(n, Ordering::SeqCst);
    }

    /// Release `n` bytes; true if the I/O thread waited for room.
    fn release(&self, n: usize) -> bool {
        self.queued.fetch_sub(n, Ordering::SeqCst);
        self.io_waiting.swap(false, Ordering::SeqCst)
    }
}

/// Queue state shared by a consumer and the I/O thread: the count bound (the loom-tested
/// core) and the byte bound.
pub(crate) struct ConsumerShared {
    queue: crate::delivery_queue::QueueShared,
    pub(crate) bytes: ByteBudget,
    /// A stream consumer (its arguments carry `x-stream-offset`): its recovery resumes
    /// after the last offset queued to it (see `stream.rs`).
    pub(crate) stream: AtomicBool,
    /// One past the `x-stream-offset` of the latest delivery queued to this stream
    /// consumer; 0 before the first.
    pub(crate) stream_next: AtomicU64,
}

impl std::ops::Deref for ConsumerShared {
    type Target = crate::delivery_queue::QueueShared;
    fn deref(&self) -> &Self::Target {
        &self.queue
    }
}

impl ConsumerShared {
    /// A queue bounded by `capacity` messages only (tests and the fuzz harness).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn new(capacity: usize) -> Self {
        Self::bounded(capacity, usize::MAX)
    }

    /// A queue bounded by `capacity` messages and `bytes` bytes (decoded size).
    pub(crate) fn bounded(capacity: usize, bytes: usize) -> Self {
        ConsumerShared {
            queue: crate::delivery_queue::QueueShared::new(capacity),
            bytes: ByteBudget::new(bytes, None),
            stream: AtomicBool::new(false),
            stream_next: AtomicU64::new(0),
        }
    }
}

/// What a queued delivery holds of its consumer's and its connection's byte budgets.
/// Released when the delivery is taken from the queue, or when it is dropped unread.
#[derive(Default)]
pub(crate) struct Charge {
    bytes: usize,
    consumer: Option<Arc<ConsumerShared>>,
    conn: Option<Arc<ByteBudget>>,
}

impl Charge {
    /// Charge `bytes` to both budgets.
    pub(crate) fn new(bytes: usize, consumer: Arc<ConsumerShared>, conn: Arc<ByteBudget>) -> Self {
        consumer.bytes.charge(bytes);
        conn.charge(bytes);
        Charge {
            bytes,
            consumer: Some(consumer),
            conn: Some(conn),
        }
    }

    /// Give the bytes back (once) and wake the I/O thread if it waits for them.
    pub(crate) fn release(&mut self) {
        let mut wake = false;
        if let Some(c) = self.consumer.take() {
            wake |= c.bytes.release(self.bytes);
        }
        if let Some(b) = self.conn.take() {
            wake |= b.release(self.bytes);
            if wake && let Some(w) = &b.wake {
                w();
            }
        }
        self.bytes = 0;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.release();
    }
}

impl Clone for Charge {
    /// A copy is not in any queue: it holds nothing.
    fn clone(&self) -> Self {
        Charge::default()
    }
}

impl ConsumerMsg {
    /// Charge this message's `bytes` to its consumer's and its connection's budgets.
    pub(crate) fn charge(
        &mut self,
        bytes: usize,
        consumer: Arc<ConsumerShared>,
        conn: Arc<ByteBudget>,
    ) {
        let c = match self {
            ConsumerMsg::Delivery(d) => &mut d.charge,
            ConsumerMsg::Bad(b) => &mut b.charge,
            ConsumerMsg::Lost(_) | ConsumerMsg::End(_) => return,
        };
        *c = Charge::new(bytes, consumer, conn);
    }

    /// Release what this message holds of the byte budgets (when it is taken).
    pub(crate) fn release(&mut self) {
        match self {
            ConsumerMsg::Delivery(d) => d.charge.release(),
            ConsumerMsg::Bad(b) => b.charge.release(),
            ConsumerMsg::Lost(_) | ConsumerMsg::End(_) => {}
        }
    }
}

/// The I/O thread's end of a consumer (also kept by the channel, for recovery).
#[derive(Clone)]
pub(crate) struct ConsumerSink {
    pub(crate) tx: Sender<ConsumerMsg>,
    pub(crate) shared: Arc<ConsumerShared>,
    pub(crate) no_ack: bool,
    /// The queue it was subscribed to (for the `ConsumerCancelled` event).
    pub(crate) queue: String,
}

impl ConsumerSink {
    pub(crate) fn is_active(&self) -> bool {
        self.shared.active.load(Ordering::Acquire)
    }

    /// A copy of this sink that names `queue` (recovery subscribes it again there).
    pub(crate) fn for_queue(&self, queue: &str) -> ConsumerSink {
        ConsumerSink {
            queue: queue.to_string(),
            ..self.clone()
        }
    }

    /// End the consumer for good.
    pub(crate) fn end(&self, err: Error) {
        self.shared.active.store(false, Ordering::Release);
        let _ = self.push(ConsumerMsg::End(err));
    }

    /// Push; gives the message back if the consumer is gone.
    pub(crate) fn push(&self, msg: ConsumerMsg) -> std::result::Result<(), ConsumerMsg> {
        self.note_stream_offset(&msg);
        self.shared.pushed();
        self.tx.send(msg).map_err(|e| {
            self.shared.unpushed();
            e.0
        })
    }

    /// Push without waking a consumer thread that sleeps on the queue: `Some` when a
    /// wake-up became owed, which the caller pays with the notifier once its batch is
    /// queued (one wake-up per sleeping thread for all the batch's messages). Gives the
    /// message back if the consumer is gone.
    pub(crate) fn push_quiet(
        &self,
        msg: ConsumerMsg,
    ) -> std::result::Result<Option<Notifier<ConsumerMsg>>, ConsumerMsg> {
        self.note_stream_offset(&msg);
        self.shared.pushed();
        match self.tx.send_quiet(msg) {
            Ok(owed) => Ok(owed.then(|| self.tx.notifier())),
            Err(e) => {
                self.shared.unpushed();
                Err(e.0)
            }
        }
    }

    fn note_stream_offset(&self, msg: &ConsumerMsg) {
        if let ConsumerMsg::Delivery(d) = msg
            && self.shared.stream.load(Ordering::Relaxed)
            && let Some(o) = d.stream_offset()
        {
            // Queued deliveries reach the application before the recovery's new ones
            // (one queue, in order): resuming after the last one queued neither skips
            // nor repeats.
            self.shared.stream_next.store(o + 1, Ordering::Release);
        }
    }
}

/// Where an acknowledgement goes: the channel a delivery came on. The I/O side's channel
/// state implements it; a trait keeps this file (which the I/O thread fills) from
/// importing the I/O module back.
pub(crate) trait AckTarget: Send + Sync {
    /// The channel id.
    fn channel_id(&self) -> u16;
    /// Queue frames that need no reply, waiting for room at most the operation timeout.
    fn send_frames(&self, bytes: Vec<u8>, what: &'static str) -> Result<()>;
    /// The connection's counters (acks and rejects sent are counted there).
    fn stats(&self) -> Option<&Stats> {
        None
    }
    /// The delivery `tag` (with `multiple`, every earlier one too) has been settled.
    fn settled(&self, _tag: u64, _multiple: bool) {}
    /// The lowest delivery tag of the channel not settled yet, when the channel keeps
    /// track (the unacked warning is on); `None` when unknown.
    fn lowest_unsettled(&self) -> Option<u64> {
        None
    }
    /// False once the channel is closed or its connection lost: an ack can no longer
    /// reach the broker, which delivers the message again (after a recovery, to the
    /// restored consumer).
    fn is_open(&self) -> bool {
        true
    }
}

/// Acknowledgement handle shared by deliveries and bad deliveries. A delivery is settled
/// at most once: the first ack, nack or reject wins, a later one is
/// [`Error::AlreadySettled`] and sends nothing (a second ack of a tag would be a 406
/// "unknown delivery tag" that closes the channel). A [`Delivery`] owns its handle (the
/// flag is in place: no allocation of its own per message); a [`BadDelivery`], which can
/// be cloned, shares one handle between its clones (`Arc<Acker>`), and so the flag.
pub(crate) struct Acker {
    pub(crate) channel: Arc<dyn AckTarget>,
    pub(crate) delivery_tag: u64,
    settled: AtomicBool,
}

impl Acker {
    fn count(&self, counter: impl Fn(&Stats) -> &AtomicU64) {
        self.count_n(counter, 1);
    }

    pub(crate) fn new(channel: Arc<dyn AckTarget>, delivery_tag: u64) -> Self {
        Acker {
            channel,
            delivery_tag,
            settled: AtomicBool::new(false),
        }
    }

    /// Claim the right to settle: `Err(AlreadySettled)` if an earlier settle claimed it.
    pub(crate) fn claim(&self) -> Result<()> {
        if self.settled.swap(true, Ordering::AcqRel) {
            return Err(Error::AlreadySettled {
                delivery_tag: self.delivery_tag,
            });
        }
        Ok(())
    }

    /// Give a claim back: the settle it was for sent nothing (its frame could not be
    /// queued), so a later one may try again.
    pub(crate) fn unclaim(&self) {
        self.settled.store(false, Ordering::Release);
    }

    /// Count `n` settles under `counter` in the connection's stats.
    pub(crate) fn count_n(&self, counter: impl Fn(&Stats) -> &AtomicU64, n: u64) {
        if let Some(s) = self.channel.stats() {
            Stats::add(counter(s), n);
        }
    }

    /// Claim, send `bytes`, and give the claim back if they could not be sent.
    fn send_claimed(&self, bytes: Vec<u8>, what: &'static str) -> Result<()> {
        self.claim()?;
        self.channel.send_frames(bytes, what).inspect_err(|_| self.unclaim())
    }

    pub(crate) fn channel_id(&self) -> u16 {
        self.channel.channel_id()
    }

    pub(crate) fn ack(&self, multiple: bool) -> Result<()> {
        let mut bytes = Vec::with_capacity(21);
        put_ack(&mut bytes, self.channel_id(), self.delivery_tag, multiple);
        self.send_claimed(bytes, "room to send basic.ack")?;
        self.count(|s| &s.acked);
        self.channel.settled(self.delivery_tag, multiple);
        Ok(())
    }

    pub(crate) fn nack(&self, multiple: bool, requeue: bool) -> Result<()> {
        let mut bytes = Vec::with_capacity(21);
        put_nack(
            &mut bytes,
            self.channel_id(),
            self.delivery_tag,
            multiple,
            requeue,
        );
        self.send_claimed(bytes, "room to send an acknowledgement")?;
        self.count(|s| &s.rejected);
        self.channel.settled(self.delivery_tag, multiple);
        Ok(())
    }

    pub(crate) fn reject(&self, requeue: bool) -> Result<()> {
        let mut bytes = Vec::with_capacity(21);
        put_reject(&mut bytes, self.channel_id(), self.delivery_tag, requeue);
        self.send_claimed(bytes, "room to send an acknowledgement")?;
        self.count(|s| &s.rejected);
        self.channel.settled(self.delivery_tag, false);
        Ok(())
    }
}

/// A message delivered to a consumer or fetched with `basic.get`.
///
/// ```no_run
/// let conn = lepus::Connection::open("amqp://127.0.0.1")?;
/// let ch = conn.open_channel()?;
/// if let Some(d) = ch.basic_get("jobs", false).map_err(lepus::Error::from)? {
///     println!(
///         "{} bytes from {:?} with key {:?}, content type {:?}",
///         d.body().len(),
///         d.exchange(),
///         d.routing_key(),
///         d.properties().content_type,
///     );
///     if d.redelivered() { d.reject(false)? } else { d.ack()? }
/// }
/// # Ok::<(), lepus::Error>(())
/// ```
pub struct Delivery {
    pub(crate) body: Vec<u8>,
    pub(crate) properties: BasicProperties,
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) redelivered: bool,
    pub(crate) message_count: Option<u32>,
    pub(crate) acker: Acker,
    /// Bytes held of the queue bounds while it waits in a consumer's queue.
    pub(crate) charge: Charge,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("delivery_tag", &self.acker.delivery_tag)
            .field("channel", &self.acker.channel_id())
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .field("redelivered", &self.redelivered)
            .field("body_len", &self.body.len())
            .finish()
    }
}

impl Delivery {
    /// The body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }
    /// Take the body out.
    pub fn into_body(self) -> Vec<u8> {
        self.body
    }
    /// The properties.
    pub fn properties(&self) -> &BasicProperties {
        &self.properties
    }
    /// The delivery tag (per channel).
    pub fn delivery_tag(&self) -> u64 {
        self.acker.delivery_tag
    }
    /// True if the broker delivered it before.
    pub fn redelivered(&self) -> bool {
        self.redelivered
    }
    /// The exchange it was published to.
    pub fn exchange(&self) -> &str {
        &self.exchange
    }
    /// The routing key it was published with.
    pub fn routing_key(&self) -> &str {
        &self.routing_key
    }
    /// The offset of a message read from a stream queue: its `x-stream-offset` header,
    /// which the broker sets on every delivery of a stream consumer. It is read from the
    /// headers whatever the queue: a message from another queue has one only if its
    /// publisher set such a header (then that value, unchecked), else `None`.
    ///
    /// ```no_run
    /// # fn f(d: lepus::Delivery) {
    /// if let Some(offset) = d.stream_offset() {
    ///     println!("stream offset {offset}");
    /// }
    /// # }
    /// ```
    pub fn stream_offset(&self) -> Option<u64> {
        let v = self.properties.headers.as_ref()?.get("x-stream-offset")?;
        u64::try_from(v.as_i64()?).ok()
    }
    /// For `basic.get`: messages left in the queue.
    pub fn message_count(&self) -> Option<u32> {
        self.message_count
    }
    /// The id of the channel it came on.
    pub fn channel_id(&self) -> u16 {
        self.acker.channel_id()
    }
    /// False when the channel it came on is closed or its connection was lost: it can
    /// no longer be acknowledged, and the broker delivers it again (to the recovered
    /// consumer, if recovery is on).
    pub(crate) fn can_settle(&self) -> bool {
        self.acker.channel.is_open()
    }
    /// Acknowledge this delivery. A delivery is settled at most once: after an ack,
    /// nack or reject (here, through its [`Batch`](crate::Batch) or by a worker pool) a
    /// second one is [`Error::AlreadySettled`] and sends nothing (the broker would
    /// close the channel with 406 "unknown delivery tag"). If queueing the frame fails
    /// (a timeout, a lost link) the delivery is not marked settled.
    pub fn ack(&self) -> Result<()> {
        self.acker.ack(false)
    }
    /// Acknowledge this and every earlier unacknowledged delivery of the channel. Only
    /// this delivery is marked settled: settling one of the earlier ones afterwards
    /// sends a frame the broker refuses (406, the channel closes).
    pub fn ack_multiple(&self) -> Result<()> {
        self.acker.ack(true)
    }
    /// Negatively acknowledge; `requeue` puts it back, otherwise it is dropped or
    /// dead-lettered.
    pub fn nack(&self, requeue: bool) -> Result<()> {
        self.acker.nack(false, requeue)
    }
    /// Negatively acknowledge this and every earlier unacknowledged delivery (only this
    /// one is marked settled, as with [`Delivery::ack_multiple`]).
    pub fn nack_multiple(&self, requeue: bool) -> Result<()> {
        self.acker.nack(true, requeue)
    }
    /// Reject this delivery.
    pub fn reject(&self, requeue: bool) -> Result<()> {
        self.acker.reject(requeue)
    }
}

/// A delivery that reached its consumer but could not be decoded. It keeps its delivery
/// tag so the application can ack, reject or dead-letter it.
///
/// ```no_run
/// use lepus::RecvError;
/// let conn = lepus::Connection::open("amqp://127.0.0.1")?;
/// let consumer = conn.open_channel()?.basic_consume("jobs", &Default::default())?;
/// match consumer.recv() {
///     Ok(d) => d.ack()?,
///     Err(RecvError::Bad(bad)) => {
///         eprintln!("undecodable delivery {}: {}", bad.delivery_tag(), bad.kind());
///         bad.reject(false)?; // dead-letter it (or drop it) rather than see it again
///     }
///     Err(e) => return Err(e.into()),
/// }
/// # Ok::<(), lepus::Error>(())
/// ```
#[derive(Clone)]
pub struct BadDelivery {
    pub(crate) kind: BadDeliveryKind,
    pub(crate) body: Vec<u8>,
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) redelivered: bool,
    /// Shared by the clones: a settle through one is a settle of all.
    pub(crate) acker: Arc<Acker>,
    /// Bytes held of the queue bounds while it waits in a consumer's queue.
    pub(crate) charge: Charge,
}

impl fmt::Debug for BadDelivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BadDelivery")
            .field("delivery_tag", &self.acker.delivery_tag)
            .field("kind", &self.kind)
            .field("routing_key", &self.routing_key)
            .finish()
    }
}

impl fmt::Display for BadDelivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "delivery {} on channel {} could not be decoded: {}",
            self.acker.delivery_tag,
            self.acker.channel_id(),
            self.kind
        )
    }
}

impl BadDelivery {
    /// The same facts as plain data, without the acknowledgement handle: what
    /// [`Error::BadDelivery`] carries.
    pub(crate) fn to_error(&self) -> Error {
        Error::BadDelivery {
            channel: self.acker.channel_id(),
            delivery_tag: self.acker.delivery_tag,
            kind: self.kind.clone(),
            exchange: self.exchange.clone(),
            routing_key: self.routing_key.clone(),
        }
    }
    /// Why it is bad.
    pub fn kind(&self) -> &BadDeliveryKind {
        &self.kind
    }
    /// The delivery tag.
    pub fn delivery_tag(&self) -> u64 {
        self.acker.delivery_tag
    }
    /// The body, when it was within the size limit.
    pub fn body(&self) -> &[u8] {
        &self.body
    }
    /// Exchange it was published to.
    pub fn exchange(&self) -> &str {
        &self.exchange
    }
    /// Routing key.
    pub fn routing_key(&self) -> &str {
        &self.routing_key
    }
    /// Redelivered flag.
    pub fn redelivered(&self) -> bool {
        self.redelivered
    }
    /// Acknowledge (drop) it.
    pub fn ack(&self) -> Result<()> {
        self.acker.ack(false)
    }
    /// Reject it; without requeue it is dropped or dead-lettered.
    pub fn reject(&self, requeue: bool) -> Result<()> {
        self.acker.reject(requeue)
    }
    /// Negatively acknowledge it.
    pub fn nack(&self, requeue: bool) -> Result<()> {
        self.acker.nack(false, requeue)
    }
}

/// A mandatory message the broker could not route, sent back with `basic.return`.
///
/// ```no_run
/// use std::time::Duration;
/// let conn = lepus::Connection::open("amqp://127.0.0.1")?;
/// let ch = conn.open_channel()?;
/// let mandatory = lepus::PublishOptions { mandatory: true };
/// ch.basic_publish("", "no-such-queue", b"x", &lepus::BasicProperties::new(), &mandatory)?;
/// if let Some(r) = ch.recv_return(Duration::from_secs(1))? {
///     assert_eq!(r.reply_code, lepus::reply_code::NO_ROUTE);
///     println!("{} returned: {}", r.routing_key, r.reply_text);
/// }
/// # Ok::<(), lepus::Error>(())
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Returned {
    /// Reply code (312 NO_ROUTE, ...).
    pub reply_code: u16,
    /// Reply text.
    pub reply_text: String,
    /// Exchange it was published to.
    pub exchange: String,
    /// Routing key it was published with.
    pub routing_key: String,
    /// Properties, or why they could not be decoded.
    pub properties: std::result::Result<BasicProperties, BadDeliveryKind>,
    /// Body (empty if too large).
    pub body: Vec<u8>,
}

impl Returned {
    /// What it costs in memory while queued (decoded size), for the returns' byte bound.
    pub(crate) fn cost(&self) -> usize {
        std::mem::size_of::<Returned>()
            + self.reply_text.capacity()
            + self.exchange.capacity()
            + self.routing_key.capacity()
            + self.body.capacity()
            + match &self.properties {
                Ok(p) => crate::protocol::size::properties_heap(p),
                Err(BadDeliveryKind::Undecodable(s)) => s.capacity(),
                Err(BadDeliveryKind::TooLarge { .. }) => 0,
            }
    }
}

/// Why [`Consumer::recv`](crate::Consumer::recv) (and its variants, the consumer's
/// iterator and [`Channel::basic_get`](crate::Channel::basic_get)) returned no
/// [`Delivery`].
///
/// A bad delivery is not a failure of the consumer: it comes back here with its
/// acknowledgement handle, the way a failed send gives the message back, and the
/// consumer carries on. `?` turns either case into an [`Error`] (a bad delivery becomes
/// the plain-data [`Error::BadDelivery`], dropping the handle).
///
/// ```no_run
/// use lepus::RecvError;
/// fn handle(consumer: &lepus::Consumer) -> lepus::Result<()> {
///     loop {
///         match consumer.recv() {
///             Ok(d) => d.ack()?,
///             Err(RecvError::Bad(bad)) => bad.reject(false)?, // settle it; the consumer goes on
///             Err(e) if e.is_connection_lost() => continue,   // recovery restores the consumer
///             Err(e) => return Err(e.into()),                // the consumer has ended
///         }
///     }
/// }
/// ```
#[derive(Debug, Clone, thiserror::Error)]
pub enum RecvError {
    /// A delivery that could not be decoded; ack, reject or dead-letter it.
    #[error("{0}")]
    Bad(Box<BadDelivery>),
    /// The call failed: timeout, consumer cancelled, channel or connection closed or lost.
    #[error(transparent)]
    Failed(#[from] Error),
}

impl RecvError {
    /// True when the link was lost (see [`Error::is_connection_lost`]); false for a bad
    /// delivery.
    pub fn is_connection_lost(&self) -> bool {
        self.as_error().is_some_and(Error::is_connection_lost)
    }

    /// The failure, unless this is a bad delivery.
    pub fn as_error(&self) -> Option<&Error> {
        match self {
            RecvError::Failed(e) => Some(e),
            RecvError::Bad(_) => None,
        }
    }

    /// The bad delivery, if this is one.
    pub fn bad_delivery(&self) -> Option<&BadDelivery> {
        match self {
            RecvError::Bad(b) => Some(b),
            RecvError::Failed(_) => None,
        }
    }
}

impl From<RecvError> for Error {
    fn from(e: RecvError) -> Error {
        match e {
            RecvError::Bad(b) => b.to_error(),
            RecvError::Failed(e) => e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::Mutex;

    /// Records what an acknowledgement would send.
    struct Recorder(Mutex<Vec<Vec<u8>>>);

    impl AckTarget for Recorder {
        fn channel_id(&self) -> u16 {
            9
        }
        fn send_frames(&self, bytes: Vec<u8>, _what: &'static str) -> Result<()> {
            self.0.lock().push(bytes);
            Ok(())
        }
    }

    #[test]
    fn a_bad_delivery_acks_through_its_channel_and_converts_to_plain_data() {
        let target = Arc::new(Recorder(Mutex::new(Vec::new())));
        let bad = BadDelivery {
            kind: BadDeliveryKind::Undecodable("headers nested too deep".into()),
            body: vec![1, 2],
            exchange: "ex".into(),
            routing_key: "rk".into(),
            redelivered: false,
            acker: Arc::new(Acker::new(target.clone(), 42)),
            charge: Charge::default(),
        };
        bad.reject(false).unwrap();
        let mut want = Vec::new();
        put_reject(&mut want, 9, 42, false);
        assert_eq!(target.0.lock().as_slice(), &[want]);

        let err: RecvError = RecvError::Bad(Box::new(bad));
        assert!(!err.is_connection_lost());
        assert!(err.as_error().is_none());
        let text = err.to_string();
        match Error::from(err) {
            e @ Error::BadDelivery { .. } => {
                assert_eq!(e.to_string(), text);
                let Error::BadDelivery {
                    channel,
                    delivery_tag,
                    kind,
                    exchange,
                    routing_key,
                } = e
                else {
                    unreachable!()
                };
                assert_eq!((channel, delivery_tag), (9, 42));
                assert_eq!(
                    kind,
                    BadDeliveryKind::Undecodable("headers nested too deep".into())
                );
                assert_eq!((exchange.as_str(), routing_key.as_str()), ("ex", "rk"));
            }
            other => panic!("became {other:?}"),
        }
        let failed = RecvError::from(Error::ConnectionLost("gone".into()));
        assert!(failed.is_connection_lost());
        assert!(matches!(Error::from(failed), Error::ConnectionLost(_)));
    }

    /// A bad delivery's clones are one delivery: the first settle through any of them
    /// wins, the others send nothing.
    #[test]
    fn a_bad_deliverys_clones_settle_once() {
        let target = Arc::new(Recorder(Mutex::new(Vec::new())));
        let bad = BadDelivery {
            kind: BadDeliveryKind::Undecodable("x".into()),
            body: Vec::new(),
            exchange: String::new(),
            routing_key: "rk".into(),
            redelivered: false,
            acker: Arc::new(Acker::new(target.clone(), 7)),
            charge: Charge::default(),
        };
        let copy = bad.clone();
        copy.ack().unwrap();
        assert!(matches!(
            bad.reject(true),
            Err(Error::AlreadySettled { delivery_tag: 7 })
        ));
        assert!(matches!(
            copy.nack(false),
            Err(Error::AlreadySettled { delivery_tag: 7 })
        ));
        assert_eq!(target.0.lock().len(), 1, "one frame sent");
    }
}
