//! The `Channel` handle: every AMQP method a client sends, each blocking with a deadline.

use std::time::{Duration, Instant};

use amq_protocol::protocol::{AMQPClass, basic, channel as chan, confirm, exchange, queue, tx};
use amq_protocol::types::ShortString;

use crate::confirm::Confirmation;
use crate::connection::Connection;
use crate::consumer::{
    Acker, BadDelivery, BadDeliveryKind, Consumer, ConsumerShared, ConsumerSink, Delivery,
    QUEUE_MARGIN, Returned, UNLIMITED_PREFETCH_QUEUE,
};
use crate::error::{Error, Result, reply_code};
use crate::io::{ChannelShared, Command, Reply};
use crate::protocol::content::{ContentMethod, ContentProblem};
use crate::protocol::frame::{put_method, put_publish};
use crate::protocol::properties::BasicProperties;
use crate::protocol::table::{FieldTable, table_to_amqp};
use crate::sync::queue::{self as q, RecvTimeoutError};
use crate::sync::{Arc, AtomicBool, AtomicUsize, Mutex, Ordering};

/// Options of `exchange.declare`.
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
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueDeleteOptions {
    /// Only if it has no consumers.
    pub if_unused: bool,
    /// Only if it is empty.
    pub if_empty: bool,
}

/// Options of `basic.consume`.
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
#[derive(Debug, Clone, Copy, Default)]
pub struct PublishOptions {
    /// Return the message (see [`Channel::recv_return`]) if no queue takes it.
    pub mandatory: bool,
}

/// What `queue.declare` answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueInfo {
    /// The queue name (the broker's choice for a server-named queue).
    pub name: String,
    /// Messages ready in it.
    pub message_count: u32,
    /// Consumers on it.
    pub consumer_count: u32,
}

/// A channel: `Send + Sync` and usable from any thread. RPCs on one channel are
/// serialised; give each thread its own channel for parallelism.
///
/// Every call waits at most the connection's operation timeout, or the one given with
/// [`Channel::with_timeout`]. A channel the broker closes (e.g. 404 on a passive
/// declare) ends with [`Error::ServerClosedChannel`]; the connection and its other
/// channels carry on.
#[derive(Clone)]
pub struct Channel {
    inner: Arc<ChannelInner>,
    timeout: Option<Duration>,
}

struct ChannelInner {
    shared: Arc<ChannelShared>,
    _conn: Connection,
    rpc_lock: Mutex<()>,
    publish_lock: Mutex<()>,
    closed_by_us: AtomicBool,
    consumers: AtomicUsize,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("id", &self.inner.shared.id)
            .field("open", &self.is_open())
            .finish()
    }
}

impl Drop for ChannelInner {
    fn drop(&mut self) {
        if self.closed_by_us.load(Ordering::Acquire) || self.shared.is_closed() {
            return;
        }
        let id = self.shared.id;
        let mut bytes = Vec::with_capacity(48);
        if put_method(&mut bytes, id, close_method()).is_ok() {
            self.shared.set_closed(Error::ChannelClosed(id));
            let _ = self.shared.conn.send(
                Command::CloseChannel {
                    channel: id,
                    bytes,
                    reply: None,
                },
                Instant::now() + Duration::from_millis(100),
                "room to send channel.close",
            );
        }
    }
}

fn close_method() -> AMQPClass {
    AMQPClass::Channel(chan::AMQPMethod::Close(chan::Close {
        reply_code: reply_code::REPLY_SUCCESS,
        reply_text: "closed by the application".into(),
        class_id: 0,
        method_id: 0,
    }))
}

fn short(what: &str, s: &str) -> Result<ShortString> {
    if s.len() > 255 {
        return Err(Error::InvalidArgument(format!(
            "{what} is {} bytes long; AMQP short strings hold at most 255",
            s.len()
        )));
    }
    Ok(s.into())
}

macro_rules! expect_reply {
    ($reply:expr, $op:expr, $pat:pat => $val:expr) => {
        match $reply {
            Reply::Method($pat) => Ok($val),
            other => Err(Error::UnexpectedReply {
                operation: $op,
                got: format!("{other:?}"),
            }),
        }
    };
}

impl Channel {
    pub(crate) fn new(shared: Arc<ChannelShared>, conn: Connection) -> Self {
        Channel {
            inner: Arc::new(ChannelInner {
                shared,
                _conn: conn,
                rpc_lock: Mutex::new(()),
                publish_lock: Mutex::new(()),
                closed_by_us: AtomicBool::new(false),
                consumers: AtomicUsize::new(0),
            }),
            timeout: None,
        }
    }

    pub(crate) fn shared(&self) -> &Arc<ChannelShared> {
        &self.inner.shared
    }

    /// The channel id.
    pub fn id(&self) -> u16 {
        self.inner.shared.id
    }

    /// True until the channel or its connection is closed.
    pub fn is_open(&self) -> bool {
        !self.inner.shared.is_closed()
    }

    /// Why the channel ended, once it has.
    pub fn close_reason(&self) -> Option<Error> {
        self.inner
            .shared
            .is_closed()
            .then(|| self.inner.shared.error())
    }

    /// The same channel, with `timeout` as the deadline of every call made through it:
    /// `ch.with_timeout(Duration::from_millis(200)).queue_declare(..)`.
    pub fn with_timeout(&self, timeout: Duration) -> Channel {
        Channel {
            inner: self.inner.clone(),
            timeout: Some(timeout),
        }
    }

    fn deadline(&self) -> Instant {
        Instant::now()
            + self
                .timeout
                .unwrap_or(self.inner.shared.conn.opts.operation_timeout)
    }

    fn max_depth(&self) -> usize {
        self.inner.shared.conn.opts.max_table_depth
    }

    fn args(&self, t: &FieldTable) -> Result<amq_protocol::types::FieldTable> {
        let d = t.depth();
        if d > self.max_depth() {
            return Err(Error::InvalidArgument(format!(
                "arguments table nested {d} levels deep; the limit is {}",
                self.max_depth()
            )));
        }
        Ok(table_to_amqp(t))
    }

    fn rpc_with(
        &self,
        m: AMQPClass,
        what: &'static str,
        consumer: Option<ConsumerSink>,
    ) -> Result<Reply> {
        let deadline = self.deadline();
        let shared = &self.inner.shared;
        let _serial = self
            .inner
            .rpc_lock
            .try_lock_until(deadline)
            .ok_or(Error::Timeout(what))?;
        if shared.is_closed() {
            return Err(shared.error());
        }
        let mut bytes = Vec::with_capacity(64);
        put_method(&mut bytes, shared.id, m).map_err(Error::InvalidArgument)?;
        let (tx, rx) = q::bounded(1);
        shared.conn.send(
            Command::Rpc {
                channel: shared.id,
                bytes,
                reply: tx,
                consumer,
            },
            deadline,
            what,
        )?;
        shared.wait_reply(&rx, deadline, what)
    }

    fn rpc(&self, m: AMQPClass, what: &'static str) -> Result<Reply> {
        self.rpc_with(m, what, None)
    }

    // ---------------- exchanges ----------------

    /// Declare an exchange of `kind` (`direct`, `fanout`, `topic`, `headers`, or a plugin's).
    pub fn exchange_declare(
        &self,
        name: &str,
        kind: &str,
        opts: &ExchangeDeclareOptions,
    ) -> Result<()> {
        let m = AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
            exchange: short("exchange name", name)?,
            kind: short("exchange type", kind)?,
            passive: opts.passive,
            durable: opts.durable,
            auto_delete: opts.auto_delete,
            internal: opts.internal,
            nowait: false,
            arguments: self.args(&opts.arguments)?,
        }));
        let r = self.rpc(m, "exchange.declare-ok")?;
        expect_reply!(r, "exchange.declare", AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(_)) => ())
    }

    /// Delete an exchange.
    pub fn exchange_delete(&self, name: &str, if_unused: bool) -> Result<()> {
        let m = AMQPClass::Exchange(exchange::AMQPMethod::Delete(exchange::Delete {
            exchange: short("exchange name", name)?,
            if_unused,
            nowait: false,
        }));
        let r = self.rpc(m, "exchange.delete-ok")?;
        expect_reply!(r, "exchange.delete", AMQPClass::Exchange(exchange::AMQPMethod::DeleteOk(_)) => ())
    }

    /// Bind exchange `destination` to exchange `source` (exchange-to-exchange binding).
    pub fn exchange_bind(
        &self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<()> {
        let m = AMQPClass::Exchange(exchange::AMQPMethod::Bind(exchange::Bind {
            destination: short("destination", destination)?,
            source: short("source", source)?,
            routing_key: short("routing key", routing_key)?,
            nowait: false,
            arguments: self.args(arguments)?,
        }));
        let r = self.rpc(m, "exchange.bind-ok")?;
        expect_reply!(r, "exchange.bind", AMQPClass::Exchange(exchange::AMQPMethod::BindOk(_)) => ())
    }

    /// Remove an exchange-to-exchange binding.
    pub fn exchange_unbind(
        &self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<()> {
        let m = AMQPClass::Exchange(exchange::AMQPMethod::Unbind(exchange::Unbind {
            destination: short("destination", destination)?,
            source: short("source", source)?,
            routing_key: short("routing key", routing_key)?,
            nowait: false,
            arguments: self.args(arguments)?,
        }));
        let r = self.rpc(m, "exchange.unbind-ok")?;
        expect_reply!(r, "exchange.unbind", AMQPClass::Exchange(exchange::AMQPMethod::UnbindOk(_)) => ())
    }

    // ---------------- queues ----------------

    /// Declare a queue; an empty `name` asks the broker to choose one.
    pub fn queue_declare(&self, name: &str, opts: &QueueDeclareOptions) -> Result<QueueInfo> {
        let m = AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: short("queue name", name)?,
            passive: opts.passive,
            durable: opts.durable,
            exclusive: opts.exclusive,
            auto_delete: opts.auto_delete,
            nowait: false,
            arguments: self.args(&opts.arguments)?,
        }));
        let r = self.rpc(m, "queue.declare-ok")?;
        expect_reply!(r, "queue.declare", AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)) => QueueInfo {
            name: ok.queue.to_string(),
            message_count: ok.message_count,
            consumer_count: ok.consumer_count,
        })
    }

    /// Bind a queue to an exchange.
    pub fn queue_bind(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<()> {
        let m = AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
            queue: short("queue name", queue)?,
            exchange: short("exchange name", exchange)?,
            routing_key: short("routing key", routing_key)?,
            nowait: false,
            arguments: self.args(arguments)?,
        }));
        let r = self.rpc(m, "queue.bind-ok")?;
        expect_reply!(r, "queue.bind", AMQPClass::Queue(queue::AMQPMethod::BindOk(_)) => ())
    }

    /// Remove a queue binding.
    pub fn queue_unbind(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<()> {
        let m = AMQPClass::Queue(queue::AMQPMethod::Unbind(queue::Unbind {
            queue: short("queue name", queue)?,
            exchange: short("exchange name", exchange)?,
            routing_key: short("routing key", routing_key)?,
            arguments: self.args(arguments)?,
        }));
        let r = self.rpc(m, "queue.unbind-ok")?;
        expect_reply!(r, "queue.unbind", AMQPClass::Queue(queue::AMQPMethod::UnbindOk(_)) => ())
    }

    /// Remove every ready message; returns how many.
    pub fn queue_purge(&self, queue: &str) -> Result<u32> {
        let m = AMQPClass::Queue(queue::AMQPMethod::Purge(queue::Purge {
            queue: short("queue name", queue)?,
            nowait: false,
        }));
        let r = self.rpc(m, "queue.purge-ok")?;
        expect_reply!(r, "queue.purge", AMQPClass::Queue(queue::AMQPMethod::PurgeOk(ok)) => ok.message_count)
    }

    /// Delete a queue; returns how many messages it held.
    pub fn queue_delete(&self, queue: &str, opts: QueueDeleteOptions) -> Result<u32> {
        let m = AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
            queue: short("queue name", queue)?,
            if_unused: opts.if_unused,
            if_empty: opts.if_empty,
            nowait: false,
        }));
        let r = self.rpc(m, "queue.delete-ok")?;
        expect_reply!(r, "queue.delete", AMQPClass::Queue(queue::AMQPMethod::DeleteOk(ok)) => ok.message_count)
    }

    // ---------------- basic ----------------

    /// Limit unacknowledged deliveries (per consumer, or per channel if `global`). Also
    /// sizes the local queue of consumers started afterwards.
    pub fn basic_qos(&self, prefetch_count: u16, global: bool) -> Result<()> {
        let m = AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
            prefetch_count,
            global,
        }));
        let r = self.rpc(m, "basic.qos-ok")?;
        expect_reply!(r, "basic.qos", AMQPClass::Basic(basic::AMQPMethod::QosOk(_)) => ())?;
        self.inner
            .shared
            .prefetch
            .store(prefetch_count.into(), Ordering::Release);
        Ok(())
    }

    /// Publish a message. In confirm mode it is tracked for
    /// [`Channel::wait_for_confirms`]; use [`Channel::basic_publish_confirmed`] for a
    /// handle on its own confirmation. Waits (within the deadline) while the broker has
    /// blocked the connection or the I/O thread's queue is full.
    pub fn basic_publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: &BasicProperties,
        opts: PublishOptions,
    ) -> Result<()> {
        self.publish(exchange, routing_key, body, properties, opts, false)
            .map(|_| ())
    }

    /// Publish in confirm mode and get the message's [`Confirmation`].
    pub fn basic_publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: &BasicProperties,
        opts: PublishOptions,
    ) -> Result<Confirmation> {
        if !self.inner.shared.confirms.is_enabled() {
            return Err(Error::NotInConfirmMode);
        }
        self.publish(exchange, routing_key, body, properties, opts, true)?
            .ok_or(Error::NotInConfirmMode)
    }

    fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: &BasicProperties,
        opts: PublishOptions,
        want_handle: bool,
    ) -> Result<Option<Confirmation>> {
        let shared = &self.inner.shared;
        let conn = &shared.conn;
        if shared.is_closed() {
            return Err(shared.error());
        }
        if body.len() as u64 > conn.opts.max_message_size {
            return Err(Error::MessageTooLarge {
                size: body.len() as u64,
                max: conn.opts.max_message_size,
            });
        }
        let deadline = self.deadline();
        conn.wait_unblocked(deadline)?;
        let mut bytes = Vec::with_capacity(body.len() + 96 + exchange.len() + routing_key.len());
        put_publish(
            &mut bytes,
            shared.id,
            exchange,
            routing_key,
            opts.mandatory,
            properties,
            body,
            conn.tuned.frame_max,
            conn.opts.max_table_depth,
        )
        .map_err(Error::InvalidArgument)?;
        if !shared.confirms.is_enabled() {
            shared.send(bytes, deadline, "room in the I/O thread's queue to publish")?;
            return Ok(None);
        }
        // Sequence numbers must follow the order in which publishes reach the I/O thread.
        let _order = self
            .inner
            .publish_lock
            .try_lock_until(deadline)
            .ok_or(Error::Timeout("the channel's publish lock"))?;
        let Some((seq, slot)) = shared.confirms.register(want_handle) else {
            shared.send(bytes, deadline, "room in the I/O thread's queue to publish")?;
            return Ok(None);
        };
        if let Err(e) = shared.send(bytes, deadline, "room in the I/O thread's queue to publish") {
            shared.confirms.unregister(seq);
            return Err(e);
        }
        Ok(slot.map(|s| Confirmation::new(seq, s, shared.clone())))
    }

    /// Fetch one message (`basic.get`); `Ok(None)` if the queue is empty.
    pub fn basic_get(&self, queue: &str, no_ack: bool) -> Result<Option<Delivery>> {
        let m = AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
            queue: short("queue name", queue)?,
            no_ack,
        }));
        let content = match self.rpc(m, "basic.get-ok")? {
            Reply::Get(Some(c)) => c,
            Reply::Get(None) => return Ok(None),
            other => {
                return Err(Error::UnexpectedReply {
                    operation: "basic.get",
                    got: format!("{other:?}"),
                });
            }
        };
        let ContentMethod::GetOk {
            delivery_tag,
            redelivered,
            exchange,
            routing_key,
            message_count,
        } = content.method
        else {
            return Err(Error::UnexpectedReply {
                operation: "basic.get",
                got: "a content that is not get-ok".into(),
            });
        };
        let acker = Acker {
            channel: self.inner.shared.clone(),
            delivery_tag,
        };
        match content.properties {
            Ok(properties) => Ok(Some(Delivery {
                body: content.body,
                properties,
                exchange,
                routing_key,
                redelivered,
                message_count: Some(message_count),
                acker,
            })),
            Err(p) => Err(Error::BadDelivery(Box::new(BadDelivery {
                kind: match p {
                    ContentProblem::Undecodable(s) => BadDeliveryKind::Undecodable(s),
                    ContentProblem::TooLarge { size, max } => {
                        BadDeliveryKind::TooLarge { size, max }
                    }
                },
                body: content.body,
                exchange,
                routing_key,
                redelivered,
                acker,
            }))),
        }
    }

    /// Start a consumer on `queue`.
    pub fn basic_consume(&self, queue: &str, opts: &ConsumeOptions) -> Result<Consumer> {
        let prefetch = self.inner.shared.prefetch.load(Ordering::Acquire);
        let capacity = if prefetch == 0 {
            UNLIMITED_PREFETCH_QUEUE
        } else {
            prefetch + QUEUE_MARGIN
        };
        let (tx, rx) = q::unbounded();
        let shared = Arc::new(ConsumerShared {
            queued: AtomicUsize::new(0),
            capacity,
            io_waiting: AtomicBool::new(false),
        });
        let sink = ConsumerSink {
            tx,
            shared: shared.clone(),
            no_ack: opts.no_ack,
        };
        let m = AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: short("queue name", queue)?,
            consumer_tag: short("consumer tag", &opts.consumer_tag)?,
            no_local: opts.no_local,
            no_ack: opts.no_ack,
            exclusive: opts.exclusive,
            nowait: false,
            arguments: self.args(&opts.arguments)?,
        }));
        let r = self.rpc_with(m, "basic.consume-ok", Some(sink))?;
        let tag = expect_reply!(r, "basic.consume", AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(ok)) => ok.consumer_tag.to_string())?;
        self.inner.consumers.fetch_add(1, Ordering::AcqRel);
        Ok(Consumer::new(tag, rx, shared, self.clone()))
    }

    /// Cancel a consumer by tag and wait for `cancel-ok`.
    pub fn basic_cancel(&self, consumer_tag: &str) -> Result<()> {
        let m = AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
            consumer_tag: short("consumer tag", consumer_tag)?,
            nowait: false,
        }));
        let r = self.rpc(m, "basic.cancel-ok")?;
        expect_reply!(r, "basic.cancel", AMQPClass::Basic(basic::AMQPMethod::CancelOk(_)) => ())
    }

    /// Send `basic.cancel` without waiting (used when a consumer is dropped).
    pub(crate) fn cancel_nowait(&self, consumer_tag: &str) {
        let Ok(tag) = short("consumer tag", consumer_tag) else {
            return;
        };
        let mut bytes = Vec::with_capacity(32);
        let m = AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
            consumer_tag: tag,
            nowait: false,
        }));
        if put_method(&mut bytes, self.id(), m).is_err() {
            return;
        }
        let (tx, _rx) = q::bounded(1);
        let _ = self.inner.shared.conn.send(
            Command::Rpc {
                channel: self.id(),
                bytes,
                reply: tx,
                consumer: None,
            },
            Instant::now() + Duration::from_millis(100),
            "room to send basic.cancel",
        );
    }

    /// Redeliver every unacknowledged message of this channel (`basic.recover`).
    pub fn basic_recover(&self, requeue: bool) -> Result<()> {
        let m = AMQPClass::Basic(basic::AMQPMethod::Recover(basic::Recover { requeue }));
        let r = self.rpc(m, "basic.recover-ok")?;
        expect_reply!(r, "basic.recover", AMQPClass::Basic(basic::AMQPMethod::RecoverOk(_)) => ())
    }

    /// Acknowledge by delivery tag (see also [`Delivery::ack`]).
    pub fn basic_ack(&self, delivery_tag: u64, multiple: bool) -> Result<()> {
        self.acker(delivery_tag).ack(multiple)
    }

    /// Negatively acknowledge by delivery tag.
    pub fn basic_nack(&self, delivery_tag: u64, multiple: bool, requeue: bool) -> Result<()> {
        self.acker(delivery_tag).nack(multiple, requeue)
    }

    /// Reject by delivery tag.
    pub fn basic_reject(&self, delivery_tag: u64, requeue: bool) -> Result<()> {
        self.acker(delivery_tag).reject(requeue)
    }

    fn acker(&self, delivery_tag: u64) -> Acker {
        Acker {
            channel: self.inner.shared.clone(),
            delivery_tag,
        }
    }

    /// A message the broker returned (mandatory publish with no route), waiting up to
    /// `timeout`. Up to 1024 returns are kept per channel; more are logged and dropped.
    pub fn recv_return(&self, timeout: Duration) -> Option<Returned> {
        match self.inner.shared.returns_rx.recv_timeout(timeout) {
            Ok(r) => Some(r),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => None,
        }
    }

    /// A returned message, if one is waiting.
    pub fn try_recv_return(&self) -> Option<Returned> {
        self.inner.shared.returns_rx.try_recv().ok()
    }

    // ---------------- confirms and transactions ----------------

    /// Put the channel in confirm mode (`confirm.select`).
    pub fn confirm_select(&self) -> Result<()> {
        if self.inner.shared.confirms.is_enabled() {
            return Ok(());
        }
        let m = AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
            nowait: false,
        }));
        let r = self.rpc(m, "confirm.select-ok")?;
        expect_reply!(r, "confirm.select", AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(_)) => ())?;
        self.inner.shared.confirms.enable();
        Ok(())
    }

    /// Wait until every message published so far is confirmed: `Ok(true)` if all were
    /// acked, `Ok(false)` if the broker nacked any since the last call.
    pub fn wait_for_confirms(&self) -> Result<bool> {
        if !self.inner.shared.confirms.is_enabled() {
            return Err(Error::NotInConfirmMode);
        }
        self.inner.shared.confirms.wait_all(self.deadline())
    }

    /// Published messages not yet confirmed.
    pub fn unconfirmed(&self) -> usize {
        self.inner.shared.confirms.outstanding()
    }

    /// Put the channel in transaction mode (`tx.select`).
    pub fn tx_select(&self) -> Result<()> {
        let r = self.rpc(
            AMQPClass::Tx(tx::AMQPMethod::Select(tx::Select {})),
            "tx.select-ok",
        )?;
        expect_reply!(r, "tx.select", AMQPClass::Tx(tx::AMQPMethod::SelectOk(_)) => ())
    }

    /// Commit the transaction.
    pub fn tx_commit(&self) -> Result<()> {
        let r = self.rpc(
            AMQPClass::Tx(tx::AMQPMethod::Commit(tx::Commit {})),
            "tx.commit-ok",
        )?;
        expect_reply!(r, "tx.commit", AMQPClass::Tx(tx::AMQPMethod::CommitOk(_)) => ())
    }

    /// Roll the transaction back.
    pub fn tx_rollback(&self) -> Result<()> {
        let r = self.rpc(
            AMQPClass::Tx(tx::AMQPMethod::Rollback(tx::Rollback {})),
            "tx.rollback-ok",
        )?;
        expect_reply!(r, "tx.rollback", AMQPClass::Tx(tx::AMQPMethod::RollbackOk(_)) => ())
    }

    // ---------------- close ----------------

    /// Close the channel and wait for `close-ok`. Its consumers end and later calls get
    /// [`Error::ChannelClosed`].
    pub fn close(&self) -> Result<()> {
        let shared = &self.inner.shared;
        if self.inner.closed_by_us.swap(true, Ordering::AcqRel) || shared.is_closed() {
            return Ok(());
        }
        let deadline = self.deadline();
        let mut bytes = Vec::with_capacity(48);
        put_method(&mut bytes, shared.id, close_method()).map_err(Error::InvalidArgument)?;
        shared.set_closed(Error::ChannelClosed(shared.id));
        let (tx, rx) = q::bounded(1);
        shared.conn.send(
            Command::CloseChannel {
                channel: shared.id,
                bytes,
                reply: Some(tx),
            },
            deadline,
            "room to send channel.close",
        )?;
        match shared.wait_reply(&rx, deadline, "channel.close-ok") {
            Ok(_) | Err(Error::ChannelClosed(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
