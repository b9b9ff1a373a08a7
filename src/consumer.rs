//! Consumers and what they receive: deliveries, undeliverable-as-such "bad" deliveries,
//! and returned messages. Acks can be sent from any thread.

use std::fmt;
use std::time::{Duration, Instant};

use amq_protocol::protocol::{AMQPClass, basic};

use crate::channel::Channel;
use crate::error::{Error, Result};
use crate::io::ChannelShared;
use crate::protocol::frame::{FRAME_END, FRAME_METHOD, put_method};
use crate::protocol::properties::BasicProperties;
use crate::sync::queue::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use crate::sync::{Arc, AtomicBool, Mutex, Ordering};

/// Queue slots beyond the prefetch count, for deliveries in flight when the consumer
/// starts and for the cancel notice.
pub(crate) const QUEUE_MARGIN: usize = 64;
/// Bound of a consumer's queue when the channel has no prefetch limit.
pub(crate) const UNLIMITED_PREFETCH_QUEUE: usize = 1024;

pub(crate) enum ConsumerMsg {
    // Boxed: queue slots stay small whatever the size of a delivery.
    Delivery(Box<Delivery>),
    Bad(Box<BadDelivery>),
    /// The link was lost and the consumer will be restored by recovery.
    Lost(Error),
    End(Error),
}

/// Counter-bounded queue state shared by a consumer and the I/O thread.
pub(crate) type ConsumerShared = crate::delivery_queue::QueueShared;

/// The I/O thread's end of a consumer (also kept by the channel, for recovery).
#[derive(Clone)]
pub(crate) struct ConsumerSink {
    pub(crate) tx: Sender<ConsumerMsg>,
    pub(crate) shared: Arc<ConsumerShared>,
    pub(crate) no_ack: bool,
}

impl ConsumerSink {
    pub(crate) fn is_active(&self) -> bool {
        self.shared.active.load(Ordering::Acquire)
    }

    /// End the consumer for good.
    pub(crate) fn end(&self, err: Error) {
        self.shared.active.store(false, Ordering::Release);
        let _ = self.push(ConsumerMsg::End(err));
    }

    /// Push; gives the message back if the consumer is gone.
    pub(crate) fn push(&self, msg: ConsumerMsg) -> std::result::Result<(), ConsumerMsg> {
        self.shared.pushed();
        self.tx.send(msg).map_err(|e| {
            self.shared.unpushed();
            e.0
        })
    }
}

/// A stream of deliveries from one `basic.consume`.
///
/// Its queue is bounded by the channel's prefetch count plus a margin (or 1024 without
/// a prefetch limit); when it is full the I/O thread stops reading from the socket, so a
/// slow consumer holds the broker back instead of growing memory. Set a prefetch with
/// [`Channel::basic_qos`] before consuming.
pub struct Consumer {
    tag: String,
    rx: Receiver<ConsumerMsg>,
    /// Passes the end on: one `End` in the queue wakes one receiving thread, which hands
    /// it to the next one blocked on this consumer.
    relay: Sender<ConsumerMsg>,
    shared: Arc<ConsumerShared>,
    channel: Channel,
    ended: Mutex<Option<Error>>,
    cancelled: AtomicBool,
    no_ack: bool,
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
            relay,
            shared,
            channel,
            no_ack,
            ended: Mutex::new(None),
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

    fn took_one(&self) {
        if self.shared.took_one() {
            self.channel.shared().conn.wake();
        }
    }

    fn on_msg(&self, msg: ConsumerMsg) -> Result<Delivery> {
        self.took_one();
        match msg {
            ConsumerMsg::Delivery(d) => Ok(*d),
            ConsumerMsg::Bad(b) => Err(Error::BadDelivery(b)),
            ConsumerMsg::Lost(e) => Err(e),
            ConsumerMsg::End(e) => {
                let e = self.end_with(e);
                // Other threads may be blocked on this consumer too: wake the next one.
                self.shared.queued.fetch_add(1, Ordering::AcqRel);
                let _ = self.relay.send(ConsumerMsg::End(e.clone()));
                Err(e)
            }
        }
    }

    fn end_with(&self, e: Error) -> Error {
        let mut ended = self.ended.lock();
        ended.get_or_insert(e).clone()
    }

    fn ended(&self) -> Option<Error> {
        self.ended.lock().clone()
    }

    /// Wait for the next delivery. Returns an error when the consumer ends (cancelled,
    /// channel or connection closed or lost: the I/O thread wakes every consumer at
    /// once), or [`Error::BadDelivery`] for a delivery that could not be decoded, after
    /// which the consumer carries on.
    pub fn recv(&self) -> Result<Delivery> {
        if let Some(e) = self.ended() {
            return Err(e);
        }
        match self.rx.recv() {
            Ok(m) => self.on_msg(m),
            Err(_) => Err(self.end_with(self.channel.shared().error())),
        }
    }

    /// Like [`Consumer::recv`] with a deadline; [`Error::Timeout`] when none came.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Delivery> {
        self.recv_deadline(Instant::now() + timeout)
    }

    /// Like [`Consumer::recv`] with a deadline.
    pub fn recv_deadline(&self, deadline: Instant) -> Result<Delivery> {
        if let Some(e) = self.ended() {
            return Err(e);
        }
        match self.rx.recv_deadline(deadline) {
            Ok(m) => self.on_msg(m),
            Err(RecvTimeoutError::Timeout) => Err(Error::Timeout("a delivery")),
            Err(RecvTimeoutError::Disconnected) => {
                Err(self.end_with(self.channel.shared().error()))
            }
        }
    }

    /// A delivery if one is queued, without blocking.
    pub fn try_recv(&self) -> Result<Option<Delivery>> {
        if let Some(e) = self.ended() {
            return Err(e);
        }
        match self.rx.try_recv() {
            Ok(m) => self.on_msg(m).map(Some),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => Err(self.end_with(self.channel.shared().error())),
        }
    }

    /// Iterate over deliveries: `Ok` for each delivery, `Err` for a bad delivery (the
    /// iteration goes on) and once for the reason the consumer ended (then it stops).
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            consumer: self,
            done: false,
        }
    }

    /// Cancel the consumer (`basic.cancel`) and wait for the broker's `cancel-ok`.
    /// Deliveries already queued can still be received.
    pub fn cancel(&self) -> Result<()> {
        if self.cancelled.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.shared.active.store(false, Ordering::Release);
        self.channel.basic_cancel(&self.tag)
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
        // 406 that closes the channel).
        if !self.no_ack {
            while let Ok(msg) = self.rx.try_recv() {
                let requeued = match msg {
                    ConsumerMsg::Delivery(d) => d.reject(true),
                    ConsumerMsg::Bad(b) => b.reject(true),
                    ConsumerMsg::Lost(_) | ConsumerMsg::End(_) => Ok(()),
                };
                if let Err(e) = requeued {
                    log::debug!(
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
    type Item = Result<Delivery>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.consumer.recv() {
            Ok(d) => Some(Ok(d)),
            Err(e) => {
                // Bad deliveries and a lost link that recovery will restore are not
                // the end; an ended consumer is.
                self.done = self.consumer.ended().is_some();
                Some(Err(e))
            }
        }
    }
}

impl<'a> IntoIterator for &'a Consumer {
    type Item = Result<Delivery>;
    type IntoIter = Iter<'a>;
    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

/// Acknowledgement handle shared by deliveries and bad deliveries.
#[derive(Clone)]
pub(crate) struct Acker {
    pub(crate) channel: Arc<ChannelShared>,
    pub(crate) delivery_tag: u64,
}

impl Acker {
    fn deadline(&self) -> Instant {
        Instant::now() + self.channel.conn.opts.operation_timeout
    }

    pub(crate) fn ack(&self, multiple: bool) -> Result<()> {
        let ch = self.channel.id.to_be_bytes();
        let t = self.delivery_tag.to_be_bytes();
        let bytes = vec![
            FRAME_METHOD,
            ch[0],
            ch[1],
            0,
            0,
            0,
            13,
            0,
            60,
            0,
            80,
            t[0],
            t[1],
            t[2],
            t[3],
            t[4],
            t[5],
            t[6],
            t[7],
            multiple as u8,
            FRAME_END,
        ];
        self.channel
            .send(bytes, self.deadline(), "room to send basic.ack")
    }

    pub(crate) fn nack(&self, multiple: bool, requeue: bool) -> Result<()> {
        self.method(AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
            delivery_tag: self.delivery_tag,
            multiple,
            requeue,
        })))
    }

    pub(crate) fn reject(&self, requeue: bool) -> Result<()> {
        self.method(AMQPClass::Basic(basic::AMQPMethod::Reject(basic::Reject {
            delivery_tag: self.delivery_tag,
            requeue,
        })))
    }

    fn method(&self, m: AMQPClass) -> Result<()> {
        let mut bytes = Vec::with_capacity(32);
        put_method(&mut bytes, self.channel.id, m).map_err(Error::InvalidArgument)?;
        self.channel
            .send(bytes, self.deadline(), "room to send an acknowledgement")
    }
}

/// A message delivered to a consumer or fetched with `basic.get`.
pub struct Delivery {
    pub(crate) body: Vec<u8>,
    pub(crate) properties: BasicProperties,
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) redelivered: bool,
    pub(crate) message_count: Option<u32>,
    pub(crate) acker: Acker,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("delivery_tag", &self.acker.delivery_tag)
            .field("channel", &self.acker.channel.id)
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
    /// For `basic.get`: messages left in the queue.
    pub fn message_count(&self) -> Option<u32> {
        self.message_count
    }
    /// The id of the channel it came on.
    pub fn channel_id(&self) -> u16 {
        self.acker.channel.id
    }
    /// Acknowledge this delivery.
    pub fn ack(&self) -> Result<()> {
        self.acker.ack(false)
    }
    /// Acknowledge this and every earlier unacknowledged delivery of the channel.
    pub fn ack_multiple(&self) -> Result<()> {
        self.acker.ack(true)
    }
    /// Negatively acknowledge; `requeue` puts it back, otherwise it is dropped or
    /// dead-lettered.
    pub fn nack(&self, requeue: bool) -> Result<()> {
        self.acker.nack(false, requeue)
    }
    /// Negatively acknowledge this and every earlier unacknowledged delivery.
    pub fn nack_multiple(&self, requeue: bool) -> Result<()> {
        self.acker.nack(true, requeue)
    }
    /// Reject this delivery.
    pub fn reject(&self, requeue: bool) -> Result<()> {
        self.acker.reject(requeue)
    }
}

/// Why a delivery could not be handed over as a [`Delivery`].
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

/// A delivery that reached its consumer but could not be decoded. It keeps its delivery
/// tag so the application can ack, reject or dead-letter it.
#[derive(Clone)]
pub struct BadDelivery {
    pub(crate) kind: BadDeliveryKind,
    pub(crate) body: Vec<u8>,
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) redelivered: bool,
    pub(crate) acker: Acker,
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
            "delivery {} on channel {} could not be decoded: ",
            self.acker.delivery_tag, self.acker.channel.id
        )?;
        match &self.kind {
            BadDeliveryKind::Undecodable(why) => f.write_str(why),
            BadDeliveryKind::TooLarge { size, max } => {
                write!(f, "body of {size} bytes exceeds the maximum of {max}")
            }
        }
    }
}

impl BadDelivery {
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
#[derive(Debug, Clone)]
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
