//! The `Consumer` handle: receiving a consumer's deliveries from any thread.

use std::fmt;
use std::time::{Duration, Instant};

use amq_protocol::protocol::{AMQPClass, basic};

use crate::channel::{Channel, check_depth, short};
use crate::connection::Connection;
use crate::delivery::{ConsumerMsg, ConsumerShared, ConsumerSink, Delivery, RecvError};
use crate::end_relay::EndRelay;
use crate::error::{Error, Result};
use crate::io::{ChannelShared, Reply};
use crate::options::ConsumeOptions;
use crate::protocol::methods;
use crate::sync::lightq::{self as q, Receiver, RecvTimeoutError, Sender, TryRecvError};
use crate::sync::{Arc, AtomicBool, Ordering};
use crate::topology::ConsumerRecord;

/// Queue slots beyond the prefetch count, for deliveries in flight when the consumer
/// starts and for the cancel notice.
const QUEUE_MARGIN: usize = 64;
/// Bound of a consumer's queue when the channel has no prefetch limit.
const UNLIMITED_PREFETCH_QUEUE: usize = 1024;

/// What `basic.consume` needs besides its reply: made before the request goes out, so
/// that the queue exists when the first delivery does.
struct ConsumeStart {
    sink: ConsumerSink,
    rx: Receiver<ConsumerMsg>,
    shared: Arc<ConsumerShared>,
}

/// Check a consume request and make its method and queue. `prefetch` bounds the queue
/// (0: no limit).
fn consume_start(
    queue: &str,
    opts: &ConsumeOptions,
    prefetch: usize,
    max_queue_bytes: usize,
) -> Result<(AMQPClass, ConsumeStart)> {
    short("queue name", queue)?;
    short("consumer tag", &opts.consumer_tag)?;
    let capacity = if prefetch == 0 {
        UNLIMITED_PREFETCH_QUEUE
    } else {
        prefetch + QUEUE_MARGIN
    };
    let (tx, rx) = q::unbounded();
    let shared = Arc::new(ConsumerShared::bounded(capacity, max_queue_bytes));
    if opts.arguments.get("x-stream-offset").is_some() {
        shared.stream.store(true, Ordering::Release);
    }
    let sink = ConsumerSink {
        tx,
        shared: shared.clone(),
        no_ack: opts.no_ack,
        queue: queue.to_string(),
    };
    let method = methods::consume(
        queue,
        &opts.consumer_tag,
        opts.no_local,
        opts.no_ack,
        opts.exclusive,
        &opts.arguments,
    );
    Ok((method, ConsumeStart { sink, rx, shared }))
}

// A consumer is started from a channel; the method lives with the handle it creates, so
// that imports point one way (consumer -> channel).
impl Channel {
    /// Start a consumer on `queue`.
    pub fn basic_consume(&self, queue: &str, opts: &ConsumeOptions) -> Result<Consumer> {
        let deadline = self.deadline();
        let ch = self.usable(deadline)?;
        self.check_args(&opts.arguments)?;
        let (method, start) = consume_start(
            queue,
            opts,
            ch.prefetch.load(Ordering::Acquire),
            ch.conn.opts.consumer_queue_bytes,
        )?;
        let r = ch.rpc(
            method,
            deadline,
            "basic.consume-ok",
            Some(start.sink.clone()),
        )?;
        self.consume_finish(&ch, r, start, queue, opts)
    }

    /// Record a started consumer (from its `consume-ok`) and make its handle.
    fn consume_finish(
        &self,
        shared: &ChannelShared,
        reply: Reply,
        start: ConsumeStart,
        queue: &str,
        opts: &ConsumeOptions,
    ) -> Result<Consumer> {
        let tag = match reply {
            Reply::Method(AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(ok))) => {
                ok.consumer_tag.to_string()
            }
            other => {
                return Err(Error::UnexpectedReply {
                    operation: "basic.consume",
                    got: format!("{other:?}"),
                });
            }
        };
        let relay = start.sink.tx.clone();
        let mut record = self.record_for(shared, "basic.consume")?;
        if record.consumers.capacity() == 0 {
            // Most channels carry one consumer: no room for three more (saves ~400 B).
            record.consumers.reserve_exact(1);
        }
        record.consumers.push(ConsumerRecord {
            tag: tag.clone(),
            queue: queue.to_owned(),
            opts: opts.clone(),
            sink: start.sink,
        });
        drop(record);
        Ok(Consumer::new(
            tag,
            start.rx,
            relay,
            start.shared,
            self.clone(),
            opts.no_ack,
        ))
    }
}

impl Connection {
    /// Open a channel, set its prefetch (`basic.qos`, per consumer) and start a consumer
    /// on `queue`, in one round trip: `channel.open`, `basic.qos` and `basic.consume` go
    /// out together and their replies are awaited together (AMQP answers a channel's
    /// requests in order), where opening, then [`Channel::basic_qos`], then
    /// [`Channel::basic_consume`] wait for three. The channel is the consumer's
    /// ([`Consumer::channel`]), recorded and recovered like any other. `prefetch` 0 sets
    /// no limit. Waits up to the operation timeout.
    ///
    /// If any step fails, the call fails with that step's error and the channel is
    /// closed: nothing is left half set up. The consumer holds the channel's only
    /// handle: when it is dropped the channel closes, and deliveries not yet settled are
    /// requeued by the broker (keep `consumer.channel().clone()` to settle them later).
    ///
    /// ```no_run
    /// use lepus::{Connection, ConsumeOptions};
    ///
    /// let conn = Connection::open("amqp://127.0.0.1")?;
    /// let consumer = conn.open_consumer("jobs", 50, &ConsumeOptions::default())?;
    /// if let Some(d) = consumer.recv_timeout(std::time::Duration::from_secs(1))? {
    ///     d.ack()?;
    /// }
    /// # Ok::<(), lepus::Error>(())
    /// ```
    pub fn open_consumer(
        &self,
        queue: &str,
        prefetch: u16,
        opts: &ConsumeOptions,
    ) -> Result<Consumer> {
        let inner = self.inner();
        let deadline = Instant::now() + inner.opts.operation_timeout;
        check_depth(&opts.arguments, inner.opts.max_table_depth)?;
        let (method, start) = consume_start(
            queue,
            opts,
            prefetch.into(),
            inner.opts.consumer_queue_bytes,
        )?;
        let conn = inner.current(deadline)?;
        // One command and one write: nobody else knows this channel yet, so its requests
        // need no serialising.
        let (ch, open, [qos, consume]) = conn.open_channel_with(
            None,
            [
                (methods::qos(prefetch, false), None),
                (method, Some(start.sink.clone())),
            ],
            deadline,
        )?;
        // The broker answers a channel's requests in order, and a channel that ends
        // drops every reply still awaited at once: when the consume-ok (or the end) is
        // here, so are the replies before it. Waiting for the last one first wakes this
        // thread once per start instead of once per reply; the earlier ones are then
        // read without blocking, in order, so that the first step that failed is the
        // one reported (and a deadline that passed finds the step it stopped at).
        // Registered before any wait: a recovery that snapshots the channels while this
        // thread waits finds it (and copies its record, so that the consume below is
        // reported lost and done again rather than left on the dead link).
        let channel = Channel::new(ch.clone(), self.clone());
        let consumed = ch.wait_reply(&consume, deadline, "basic.consume-ok");
        ch.open_finish(&open, deadline)?;
        channel.qos_finish(&ch, ch.wait_reply(&qos, deadline, "basic.qos-ok")?, prefetch, false)?;
        channel.consume_finish(&ch, consumed?, start, queue, opts)
    }
}

/// A stream of deliveries from one `basic.consume`.
///
/// Its queue is bounded by the channel's prefetch count plus a margin (or 1024 without
/// a prefetch limit), and in bytes (16 MiB by default, see
/// [`ConnectionOptions::consumer_queue_bytes`](crate::ConnectionOptions::consumer_queue_bytes)
/// and the connection-wide
/// [`connection_queue_bytes`](crate::ConnectionOptions::connection_queue_bytes)); when it is full the I/O thread stops reading from the socket, so a
/// slow consumer holds the broker back instead of growing memory. Set a prefetch with
/// [`Channel::basic_qos`] before consuming.
///
/// ```no_run
/// use std::time::Duration;
/// use lepus::{Connection, ConsumeOptions, RecvError};
///
/// let conn = Connection::open("amqp://127.0.0.1")?;
/// let ch = conn.open_channel()?;
/// ch.basic_qos(50, false)?;
/// let consumer = ch.basic_consume("jobs", &ConsumeOptions::default())?;
/// loop {
///     match consumer.recv_timeout(Duration::from_secs(1)) {
///         Ok(Some(d)) => d.ack()?,
///         Ok(None) => continue, // nothing within the second
///         // A delivery that could not be decoded: settle it, the consumer goes on.
///         Err(RecvError::Bad(bad)) => bad.reject(false)?,
///         // A lost link that recovery heals passes by; anything else ends the consumer.
///         Err(e) if e.is_connection_lost() => continue,
///         Err(e) => return Err(e.into()),
///     }
/// }
/// # #[allow(unreachable_code)] Ok::<(), lepus::Error>(())
/// ```
pub struct Consumer {
    tag: String,
    rx: Receiver<ConsumerMsg>,
    /// The recorded end, passed on: one `End` in the queue wakes one receiving thread,
    /// which hands it to the next one blocked on this consumer.
    end: EndRelay<ConsumerMsg, Error>,
    shared: Arc<ConsumerShared>,
    channel: Channel,
    cancelled: AtomicBool,
    no_ack: bool,
}

impl Consumer {
    /// True when this is the only consumer of its channel that acknowledges (a
    /// `multiple` ack of its deliveries covers nobody else's).
    pub(crate) fn sole_acking_consumer(&self) -> bool {
        let record = self.channel.record().lock();
        record
            .consumers
            .iter()
            .filter(|r| !r.opts.no_ack && r.tag != self.tag)
            .count()
            == 0
    }
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("tag", &self.tag)
            .field("channel", &self.channel.id())
            .field("queued", &self.shared.queued.load(Ordering::Relaxed))
            .finish()
    }
}

impl Consumer {
    pub(crate) fn new(
        tag: String,
        rx: Receiver<ConsumerMsg>,
        relay: Sender<ConsumerMsg>,
        shared: Arc<ConsumerShared>,
        channel: Channel,
        no_ack: bool,
    ) -> Self {
        Consumer {
            tag,
            rx,
            end: EndRelay::new(relay),
            shared,
            channel,
            no_ack,
            cancelled: AtomicBool::new(false),
        }
    }

    /// The consumer tag (the broker's if none was given).
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The channel this consumer lives on.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Deliveries waiting in the local queue.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::Acquire)
    }

    /// Bytes (decoded size) of the deliveries waiting in the local queue.
    pub fn queued_bytes(&self) -> usize {
        self.shared.bytes.queued()
    }

    fn took_one(&self) {
        if self.shared.took_one() {
            self.channel.shared().conn.wake();
        }
    }

    fn on_msg(&self, mut msg: ConsumerMsg) -> Result<Delivery, RecvError> {
        // Bytes first: the count's wake-up may let the I/O thread retry at once.
        msg.release();
        self.took_one();
        match msg {
            ConsumerMsg::Delivery(d) => Ok(*d),
            ConsumerMsg::Bad(b) => Err(RecvError::Bad(b)),
            ConsumerMsg::Lost(e) => Err(e.into()),
            ConsumerMsg::End(e) if self.comes_back(&e) => {
                // Still active: the retry subscribes it again under its tag.
                Err(e.into())
            }
            // Other threads may be blocked on this consumer too: wake the next one.
            ConsumerMsg::End(e) => Err(self.end.took_end(e, &self.shared, ConsumerMsg::End).into()),
        }
    }

    /// A broker cancel of a consumer the application still has, with
    /// `resubscribe_cancelled_consumers` on: keep it and have it subscribed again.
    fn comes_back(&self, e: &Error) -> bool {
        if !matches!(e, Error::ConsumerCancelled { .. }) || self.cancelled.load(Ordering::Acquire) {
            return false;
        }
        let inner = self.channel.connection_inner();
        if !inner.opts.recovery.resubscribe_cancelled || inner.is_dead() {
            return false;
        }
        // An application cancel forgets the record first: only a broker cancel finds it.
        let queue = self
            .channel
            .record()
            .lock()
            .consumers
            .iter()
            .find(|r| r.tag == self.tag)
            .map(|r| r.queue.clone());
        let Some(queue) = queue else { return false };
        // Already active again: a recovery since the cancel restored it (or left it
        // pending); subscribing it a second time would reuse its tag.
        if !self.shared.active.swap(true, Ordering::AcqRel) {
            crate::entity_recovery::resubscribe_later(inner, self.channel.id(), &self.tag, &queue);
        }
        true
    }

    fn end_with(&self, e: Error) -> Error {
        self.end.end_with(e)
    }

    fn ended(&self) -> Option<Error> {
        self.end.ended()
    }

    /// True for a stream consumer (`x-stream-offset`): its recovery resumes after the
    /// last offset queued locally, so the broker does not deliver those again.
    pub(crate) fn is_stream(&self) -> bool {
        self.shared.stream.load(Ordering::Acquire)
    }

    /// True for a `no_ack` consumer (its deliveries are settled on arrival).
    pub(crate) fn is_no_ack(&self) -> bool {
        self.no_ack
    }

    /// Have every message queued for this consumer schedule a dispatcher's `ticket`
    /// (`None`: no more).
    pub(crate) fn watch(&self, ticket: Option<Arc<crate::sync::ready_list::Ticket>>) {
        self.rx.watch(ticket);
    }

    /// True when a receive would not wait: a message is queued, or the queue ended.
    pub(crate) fn has_news(&self) -> bool {
        self.rx.has_news()
    }

    /// True once the consumer ended for good (cancelled, channel or connection closed);
    /// a lost link that recovery restores is not an end.
    pub(crate) fn has_ended(&self) -> bool {
        self.end.ended().is_some()
    }

    /// Wait for the next delivery. Returns an error when the consumer ends (cancelled,
    /// channel or connection closed or lost: the I/O thread wakes every consumer at
    /// once; [`RecvError::Failed`]), or [`RecvError::Bad`] for a delivery that could not
    /// be decoded, after which the consumer carries on.
    pub fn recv(&self) -> Result<Delivery, RecvError> {
        if let Some(e) = self.ended() {
            return Err(e.into());
        }
        match self.rx.recv() {
            Ok(m) => self.on_msg(m),
            Err(_) => Err(self.end_with(self.channel.shared().error()).into()),
        }
    }

    /// Like [`Consumer::recv`], waiting at most `timeout`: `Ok(None)` when no delivery
    /// came in time; errors as [`Consumer::recv`].
    ///
    /// ```no_run
    /// # fn main() -> Result<(), lepus::RecvError> {
    /// use std::time::Duration;
    /// let conn = lepus::Connection::open("amqp://127.0.0.1")?;
    /// let ch = conn.open_channel()?;
    /// let consumer = ch.basic_consume("jobs", &lepus::ConsumeOptions::default())?;
    /// while let Some(d) = consumer.recv_timeout(Duration::from_secs(1))? {
    ///     println!("{} bytes", d.body().len());
    ///     d.ack()?;
    /// }
    /// println!("quiet for a second");
    /// # Ok(()) }
    /// ```
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Option<Delivery>, RecvError> {
        self.recv_deadline(Instant::now() + timeout)
    }

    /// Like [`Consumer::recv`], waiting until `deadline`: `Ok(None)` when no delivery
    /// came in time.
    pub fn recv_deadline(&self, deadline: Instant) -> Result<Option<Delivery>, RecvError> {
        if let Some(e) = self.ended() {
            return Err(e.into());
        }
        match self.rx.recv_deadline(deadline) {
            Ok(m) => self.on_msg(m).map(Some),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => {
                Err(self.end_with(self.channel.shared().error()).into())
            }
        }
    }

    /// A delivery if one is queued, without blocking.
    pub fn try_recv(&self) -> Result<Option<Delivery>, RecvError> {
        if let Some(e) = self.ended() {
            return Err(e.into());
        }
        match self.rx.try_recv() {
            Ok(m) => self.on_msg(m).map(Some),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => {
                Err(self.end_with(self.channel.shared().error()).into())
            }
        }
    }

    /// Iterate over deliveries: `Ok` for each delivery, `Err` for a bad delivery (the
    /// iteration goes on: ack, reject or dead-letter it through
    /// [`RecvError::Bad`]) and once for the reason the consumer ended (then it stops).
    ///
    /// A lost link that recovery will heal does not end the iteration and is not
    /// yielded: the iterator keeps waiting, through the recovery, for the next delivery
    /// (so the natural `let d = d?;` loop survives a recovery). The same goes for a
    /// broker cancel of a consumer that
    /// [`resubscribe_cancelled_consumers`](crate::RecoveryOptions::resubscribe_cancelled_consumers)
    /// brings back. Only an end that nothing will heal is yielded as an error: the
    /// consumer or channel closed or cancelled for good, the connection closed, or the
    /// link lost with recovery off or given up. Use [`Consumer::recv`] to see the passing
    /// notices too.
    ///
    /// ```no_run
    /// # fn main() -> lepus::Result<()> {
    /// let conn = lepus::Connection::open("amqp://127.0.0.1")?;
    /// let ch = conn.open_channel()?;
    /// ch.basic_qos(50, false)?;
    /// let consumer = ch.basic_consume("jobs", &lepus::ConsumeOptions::default())?;
    /// for d in &consumer {
    ///     let d = d?; // a bad delivery or the consumer's end; never a healed loss
    ///     println!("{} bytes", d.body().len());
    ///     d.ack()?;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            consumer: self,
            done: false,
        }
    }

    /// Cancel the consumer (`basic.cancel`) and wait for the broker's `cancel-ok`.
    /// Deliveries already queued can still be received.
    pub fn cancel(&self) -> Result<()> {
        self.cancel_via(&self.channel)
    }

    /// [`Consumer::cancel`] waiting at most `timeout` for the `cancel-ok`.
    pub(crate) fn cancel_within(&self, timeout: Duration) -> Result<()> {
        self.cancel_via(&self.channel.with_timeout(timeout))
    }

    /// Start cancelling without waiting for the broker's `cancel-ok` (`None`: cancelled
    /// already). If the cancel cannot be sent in time, it is sent without a reply to wait
    /// for (as a dropped consumer's is) and the error returned.
    pub(crate) fn cancel_start(
        &self,
        deadline: Instant,
    ) -> Result<Option<(Arc<ChannelShared>, crate::io::ReplyRx)>> {
        if self.cancelled.swap(true, Ordering::AcqRel) {
            return Ok(None);
        }
        self.shared.active.store(false, Ordering::Release);
        match self.channel.cancel_start(&self.tag, deadline) {
            Ok(p) => Ok(Some(p)),
            Err(e) => {
                self.channel.cancel_nowait(&self.tag);
                Err(e)
            }
        }
    }

    fn cancel_via(&self, channel: &Channel) -> Result<()> {
        if self.cancelled.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.shared.active.store(false, Ordering::Release);
        channel.basic_cancel(&self.tag)
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.shared.active.store(false, Ordering::Release);
        if !self.cancelled.swap(true, Ordering::AcqRel) {
            if self.channel.shared().is_closed() {
                self.channel.forget_consumer(&self.tag);
            } else {
                self.channel.cancel_nowait(&self.tag);
            }
        }
        // Deliveries nobody will read go back to the queue now, not when the channel
        // closes (a no-ack consumer's are already settled; an ack for them would be a
        // 406 that closes the channel). Either way they leave the queue now, giving
        // back what they hold of the connection's byte bound.
        if self.no_ack {
            while self.rx.try_recv().is_ok() {}
        } else {
            while let Ok(msg) = self.rx.try_recv() {
                let requeued = match msg {
                    ConsumerMsg::Delivery(d) => d.reject(true),
                    ConsumerMsg::Bad(b) => b.reject(true),
                    ConsumerMsg::Lost(_) | ConsumerMsg::End(_) => Ok(()),
                };
                if let Err(e) = requeued {
                    crate::trace::debug!(
                        "could not requeue a delivery of dropped consumer {:?}: {e}",
                        self.tag
                    );
                    break;
                }
            }
        }
    }
}

/// Iterator over a consumer's deliveries; see [`Consumer::iter`].
#[derive(Debug)]
pub struct Iter<'a> {
    consumer: &'a Consumer,
    done: bool,
}

impl Iterator for Iter<'_> {
    type Item = Result<Delivery, RecvError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        loop {
            match self.consumer.recv() {
                Ok(d) => return Some(Ok(d)),
                // A bad delivery is the application's to settle; the consumer goes on.
                Err(e @ RecvError::Bad(_)) => return Some(Err(e)),
                Err(e) if self.consumer.ended().is_some() => {
                    self.done = true;
                    return Some(Err(e));
                }
                // A passing notice (a lost link that recovery restores, a broker cancel
                // that resubscribing brings back): the consumer carries on.
                Err(e) => crate::trace::debug!(
                    "consumer {:?}: {e}; waiting for the recovery",
                    self.consumer.tag
                ),
            }
        }
    }
}

impl<'a> IntoIterator for &'a Consumer {
    type Item = Result<Delivery, RecvError>;
    type IntoIter = Iter<'a>;
    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}
