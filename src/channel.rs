//! The `Channel` handle: every AMQP method a client sends, each blocking with a deadline.

use std::time::{Duration, Instant};

use amq_protocol::protocol::{AMQPClass, basic, channel as chan, confirm, exchange, queue, tx};
use amq_protocol::types::ShortString;

use crate::connection::Connection;
use crate::connection_state::ChannelSlot;
use crate::delivery::{Acker, BadDelivery, ConsumerSink, Delivery, RecvError, Returned};
use crate::error::{Error, Result, reply_code};
use crate::io::{ChannelShared, Command, Reply};
use crate::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, PublishOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use crate::protocol::content::ContentMethod;
use crate::protocol::frame::{decode_publish, put_method, put_publish};
use crate::protocol::methods;
use crate::protocol::properties::BasicProperties;
use crate::protocol::table::{FieldTable, table_to_amqp};
use crate::sync::oneshot;
use crate::sync::queue::RecvTimeoutError;
use crate::stats::Stats;
use crate::sync::{Arc, AtomicBool, AtomicU8, Mutex, Ordering, Weak};
use crate::topology::{BindingRecord, ChannelRecord, ExchangeRecord, QueueRecord, Topology};

/// What `queue.declare` answered.
///
/// ```no_run
/// let conn = lepus::Connection::open("amqp://127.0.0.1")?;
/// let ch = conn.open_channel()?;
/// let q = ch.queue_declare("jobs", &lepus::QueueDeclareOptions::default())?;
/// println!("{}: {} ready, {} consumers", q.name, q.message_count, q.consumer_count);
/// # Ok::<(), lepus::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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
/// channels carry on. When the connection is lost, calls in flight fail with
/// [`Error::ConnectionLost`]; with recovery on, the same handle is reopened on the new
/// connection (same id, qos, confirm mode and consumers) and later calls wait for that,
/// within their deadline.
///
/// ```no_run
/// use std::time::Duration;
/// use lepus::{BasicProperties, Connection, ExchangeDeclareOptions, FieldTable, PublishOptions, QueueDeclareOptions};
///
/// let conn = Connection::open("amqp://127.0.0.1")?;
/// let ch = conn.open_channel()?;
/// ch.exchange_declare("orders", "topic", &ExchangeDeclareOptions { durable: true, ..Default::default() })?;
/// let q = ch.queue_declare("orders.eu", &QueueDeclareOptions { durable: true, ..Default::default() })?;
/// ch.queue_bind(&q.name, "orders", "eu.#", &FieldTable::new())?;
/// ch.basic_publish("orders", "eu.fr", b"{}", &BasicProperties::new().persistent(), &PublishOptions::default())?;
/// // A call through this handle waits at most 200 ms.
/// let quick = ch.with_timeout(Duration::from_millis(200));
/// quick.queue_declare("orders.eu", &QueueDeclareOptions { passive: true, ..Default::default() })?;
/// # Ok::<(), lepus::Error>(())
/// ```
#[derive(Clone)]
pub struct Channel {
    inner: Arc<ChannelInner>,
    timeout: Option<Duration>,
}

/// The lasting state of one channel handle, across connection generations.
pub(crate) struct ChannelInner {
    id: u16,
    conn: Connection,
    current: Mutex<Arc<ChannelShared>>,
    closed_by_us: AtomicBool,
    pub(crate) record: Mutex<ChannelRecord>,
    handed_back: Mutex<Vec<Arc<Vec<u8>>>>,
}

impl ChannelSlot for ChannelInner {
    fn id(&self) -> u16 {
        self.id
    }
    fn current_shared(&self) -> Arc<ChannelShared> {
        self.current.lock().clone()
    }
    fn set_current(&self, new: Arc<ChannelShared>) {
        *self.current.lock() = new;
    }
    fn wants_recovery(&self) -> bool {
        !self.closed_by_us.load(Ordering::Acquire) && !self.current_shared().is_channel_closed()
    }
    fn closed_by_app(&self) -> bool {
        self.closed_by_us.load(Ordering::Acquire)
    }
    fn record(&self) -> &Mutex<ChannelRecord> {
        &self.record
    }
    fn hand_back(&self, entries: Vec<crate::confirm_tracker::Entry>) {
        let mut v = self.handed_back.lock();
        for e in entries {
            e.hand_back();
            if let Some(b) = e.bytes {
                v.push(b);
            }
        }
    }
    fn end_consumers(&self, err: &Error) {
        for r in self.record.lock().consumers.drain(..) {
            r.sink.end(err.clone());
        }
    }
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("id", &self.inner.id)
            .field("open", &self.is_open())
            .finish()
    }
}

impl Drop for ChannelInner {
    fn drop(&mut self) {
        self.conn
            .inner()
            .unregister_channel(self.id, self as *const ChannelInner as *const ());
        let shared = self.current.get_mut().clone();
        if self.closed_by_us.load(Ordering::Acquire) || shared.is_closed() {
            return;
        }
        shared.close_nowait();
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

/// An arguments table no deeper than `max` (the broker and lepus's own decoder refuse
/// deeper ones).
pub(crate) fn check_depth(t: &FieldTable, max: usize) -> Result<()> {
    let d = t.depth();
    if d > max {
        return Err(Error::InvalidArgument(format!(
            "arguments table nested {d} levels deep; the limit is {max}"
        )));
    }
    Ok(())
}

pub(crate) fn short(what: &str, s: &str) -> Result<ShortString> {
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

// Channels are opened from a connection; the method lives with the handle it creates, so
// that imports point one way (channel -> connection).
impl Connection {
    /// Open a new channel, waiting up to the operation timeout (and for a recovery in
    /// progress to finish, within that time).
    pub fn open_channel(&self) -> Result<Channel> {
        self.open_channel_until(Instant::now() + self.inner().opts.operation_timeout)
    }

    /// Open a new channel, waiting until `deadline`.
    pub fn open_channel_until(&self, deadline: Instant) -> Result<Channel> {
        let shared = self.inner().current(deadline)?;
        let ch = shared.open_channel(None, deadline)?;
        Ok(Channel::new(ch, self.clone()))
    }
}

impl Channel {
    pub(crate) fn new(shared: Arc<ChannelShared>, conn: Connection) -> Self {
        let inner = Arc::new(ChannelInner {
            id: shared.id,
            conn,
            current: Mutex::new(shared),
            closed_by_us: AtomicBool::new(false),
            record: Mutex::new(ChannelRecord::default()),
            handed_back: Mutex::new(Vec::new()),
        });
        let slot: Weak<dyn ChannelSlot> = Arc::downgrade(&inner) as Weak<ChannelInner>;
        inner.conn.inner().register_channel(inner.id, slot);
        Channel {
            inner,
            timeout: None,
        }
    }

    /// Deliveries the broker sent on this channel for no consumer of ours (a tag we never
    /// had, or one already cancelled), since the channel was last (re)opened. lepus
    /// rejects them with requeue, so that they go to another consumer instead of staying
    /// unacknowledged until the channel closes.
    pub fn orphan_deliveries(&self) -> u64 {
        self.shared().orphan_deliveries.load(Ordering::Relaxed) as u64
    }

    /// This handle as the connection tracks it (for reopening it).
    pub(crate) fn slot(&self) -> Arc<dyn ChannelSlot> {
        self.inner.clone()
    }

    /// The channel state of the current connection generation.
    pub(crate) fn shared(&self) -> Arc<ChannelShared> {
        self.inner.current_shared()
    }

    /// The current channel state if usable; waits (until `deadline`) for a recovery in
    /// progress to reopen it.
    pub(crate) fn usable(&self, deadline: Instant) -> Result<Arc<ChannelShared>> {
        loop {
            let cur = self.inner.current_shared();
            if !cur.is_closed() {
                return Ok(cur);
            }
            if self.inner.closed_by_us.load(Ordering::Acquire)
                || cur.is_channel_closed()
                || !cur.conn.will_recover()
            {
                return Err(cur.error());
            }
            let inner = &self.inner;
            self.inner.conn.inner().wait_for(
                || !Arc::ptr_eq(&inner.current_shared(), &cur),
                deadline,
                || cur.error(),
            )?;
        }
    }

    /// Worth keeping in a pool: not closed by itself, on a connection that lives or
    /// will recover.
    pub(crate) fn pool_usable(&self) -> bool {
        // Called by the pool under its lock, for every release and (when the pool is
        // full) for every leased channel: atomics and one short lock only.
        if self.inner.closed_by_us.load(Ordering::Acquire) || self.inner.conn.inner().is_dead() {
            return false;
        }
        let s = self.inner.current.lock();
        !s.is_channel_closed() && (!s.conn.is_failed() || s.conn.will_recover())
    }

    /// The channel id.
    pub fn id(&self) -> u16 {
        self.inner.id
    }

    /// True while the channel can be used now (open, and its connection too).
    pub fn is_open(&self) -> bool {
        !self.shared().is_closed()
    }

    /// Why the channel cannot be used now, if it cannot.
    pub fn close_reason(&self) -> Option<Error> {
        let s = self.shared();
        s.is_closed().then(|| s.error())
    }

    /// The connection this channel belongs to.
    pub fn connection(&self) -> &Connection {
        &self.inner.conn
    }

    /// The same channel, with `timeout` as the deadline of every call made through it:
    /// `ch.with_timeout(Duration::from_millis(200)).queue_declare(..)`.
    pub fn with_timeout(&self, timeout: Duration) -> Channel {
        Channel {
            inner: self.inner.clone(),
            timeout: Some(timeout),
        }
    }

    pub(crate) fn deadline(&self) -> Instant {
        Instant::now()
            + self
                .timeout
                .unwrap_or(self.inner.conn.inner().opts.operation_timeout)
    }

    fn max_depth(&self) -> usize {
        self.inner.conn.inner().opts.max_table_depth
    }

    fn topology(&self) -> crate::sync::MutexGuard<'_, Topology> {
        self.inner.conn.inner().topology.lock()
    }

    pub(crate) fn check_args(&self, t: &FieldTable) -> Result<()> {
        check_depth(t, self.max_depth())
    }

    fn args(&self, t: &FieldTable) -> Result<amq_protocol::types::FieldTable> {
        self.check_args(t)?;
        Ok(table_to_amqp(t))
    }

    fn rpc_with(
        &self,
        m: AMQPClass,
        what: &'static str,
        consumer: Option<ConsumerSink>,
    ) -> Result<Reply> {
        let deadline = self.deadline();
        self.usable(deadline)?.rpc(m, deadline, what, consumer)
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
        short("exchange name", name)?;
        short("exchange type", kind)?;
        self.check_args(&opts.arguments)?;
        let m = methods::exchange_declare(
            name,
            kind,
            opts.passive,
            opts.durable,
            opts.auto_delete,
            opts.internal,
            &opts.arguments,
        );
        let r = self.rpc(m, "exchange.declare-ok")?;
        expect_reply!(r, "exchange.declare", AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(_)) => ())?;
        if !opts.passive {
            self.topology().add_exchange(
                name,
                ExchangeRecord {
                    kind: kind.to_owned(),
                    opts: opts.clone(),
                },
            );
        }
        Ok(())
    }

    /// Delete an exchange.
    pub fn exchange_delete(&self, name: &str, opts: &ExchangeDeleteOptions) -> Result<()> {
        let m = AMQPClass::Exchange(exchange::AMQPMethod::Delete(exchange::Delete {
            exchange: short("exchange name", name)?,
            if_unused: opts.if_unused,
            nowait: false,
        }));
        let r = self.rpc(m, "exchange.delete-ok")?;
        expect_reply!(r, "exchange.delete", AMQPClass::Exchange(exchange::AMQPMethod::DeleteOk(_)) => ())?;
        self.topology().remove_exchange(name);
        Ok(())
    }

    /// Bind exchange `destination` to exchange `source` (exchange-to-exchange binding).
    pub fn exchange_bind(
        &self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<()> {
        short("destination", destination)?;
        short("source", source)?;
        short("routing key", routing_key)?;
        self.check_args(arguments)?;
        let m = methods::bind(true, destination, source, routing_key, arguments);
        let r = self.rpc(m, "exchange.bind-ok")?;
        expect_reply!(r, "exchange.bind", AMQPClass::Exchange(exchange::AMQPMethod::BindOk(_)) => ())?;
        self.topology().add_binding(BindingRecord::new(
            true,
            destination,
            source,
            routing_key,
            arguments,
        ));
        Ok(())
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
        expect_reply!(r, "exchange.unbind", AMQPClass::Exchange(exchange::AMQPMethod::UnbindOk(_)) => ())?;
        self.topology().remove_binding(&BindingRecord::new(
            true,
            destination,
            source,
            routing_key,
            arguments,
        ));
        Ok(())
    }

    // ---------------- queues ----------------

    /// Declare a queue; an empty `name` asks the broker to choose one.
    pub fn queue_declare(&self, name: &str, opts: &QueueDeclareOptions) -> Result<QueueInfo> {
        short("queue name", name)?;
        self.check_args(&opts.arguments)?;
        let m = methods::queue_declare(
            name,
            opts.passive,
            opts.durable,
            opts.exclusive,
            opts.auto_delete,
            &opts.arguments,
        );
        let r = self.rpc(m, "queue.declare-ok")?;
        let info = expect_reply!(r, "queue.declare", AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)) => QueueInfo {
            name: ok.queue.to_string(),
            message_count: ok.message_count,
            consumer_count: ok.consumer_count,
        })?;
        if !opts.passive {
            self.topology().add_queue(
                &info.name,
                QueueRecord {
                    server_named: name.is_empty(),
                    opts: opts.clone(),
                },
            );
        }
        Ok(info)
    }

    /// Bind a queue to an exchange.
    pub fn queue_bind(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<()> {
        short("queue name", queue)?;
        short("exchange name", exchange)?;
        short("routing key", routing_key)?;
        self.check_args(arguments)?;
        let m = methods::bind(false, queue, exchange, routing_key, arguments);
        let r = self.rpc(m, "queue.bind-ok")?;
        expect_reply!(r, "queue.bind", AMQPClass::Queue(queue::AMQPMethod::BindOk(_)) => ())?;
        self.topology().add_binding(BindingRecord::new(
            false,
            queue,
            exchange,
            routing_key,
            arguments,
        ));
        Ok(())
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
        expect_reply!(r, "queue.unbind", AMQPClass::Queue(queue::AMQPMethod::UnbindOk(_)) => ())?;
        self.topology().remove_binding(&BindingRecord::new(
            false,
            queue,
            exchange,
            routing_key,
            arguments,
        ));
        Ok(())
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
    pub fn queue_delete(&self, queue: &str, opts: &QueueDeleteOptions) -> Result<u32> {
        let m = AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
            queue: short("queue name", queue)?,
            if_unused: opts.if_unused,
            if_empty: opts.if_empty,
            nowait: false,
        }));
        let r = self.rpc(m, "queue.delete-ok")?;
        let n = expect_reply!(r, "queue.delete", AMQPClass::Queue(queue::AMQPMethod::DeleteOk(ok)) => ok.message_count)?;
        self.topology().remove_queue(queue);
        Ok(n)
    }

    // ---------------- basic ----------------

    /// Limit unacknowledged deliveries (per consumer, or per channel if `global`). Also
    /// sizes the local queue of consumers started afterwards.
    pub fn basic_qos(&self, prefetch_count: u16, global: bool) -> Result<()> {
        let m = methods::qos(prefetch_count, global);
        let deadline = self.deadline();
        let shared = self.usable(deadline)?;
        let r = shared.rpc(m, deadline, "basic.qos-ok", None)?;
        self.qos_finish(&shared, r, prefetch_count, global)
    }

    /// Take `basic.qos`'s reply: the prefetch bounds later consumers' queues, and the
    /// record replays it on recovery.
    pub(crate) fn qos_finish(
        &self,
        shared: &ChannelShared,
        reply: Reply,
        prefetch_count: u16,
        global: bool,
    ) -> Result<()> {
        expect_reply!(reply, "basic.qos", AMQPClass::Basic(basic::AMQPMethod::QosOk(_)) => ())?;
        let mut record = self.record_for(shared, "basic.qos")?;
        shared
            .prefetch
            .store(prefetch_count.into(), Ordering::Release);
        record.qos = Some((prefetch_count, global));
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
        opts: &PublishOptions,
    ) -> Result<()> {
        self.publish(exchange, routing_key, body, properties, opts, false)
            .map(|_| ())
    }

    /// Publish; in confirm mode with `want_handle`, returns the sequence number and the
    /// slot its confirmation is recorded in (confirm.rs makes the handle).
    #[allow(clippy::type_complexity)]
    pub(crate) fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: &BasicProperties,
        opts: &PublishOptions,
        want_handle: bool,
    ) -> Result<Option<(u64, Arc<AtomicU8>)>> {
        let deadline = self.deadline();
        let shared = self.usable(deadline)?;
        let conn = &shared.conn;
        if body.len() as u64 > conn.opts.max_message_size {
            return Err(Error::MessageTooLarge {
                size: body.len() as u64,
                max: conn.opts.max_message_size,
            });
        }
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
            Stats::add(&conn.stats.published, 1);
            return Ok(None);
        }
        // Sequence numbers must follow the order in which publishes reach the I/O thread.
        let _order = shared
            .publish_lock
            .try_lock_until(deadline)
            .ok_or(Error::Timeout("the channel's publish lock"))?;
        // Kept until confirmed, so that recovery can republish or hand it back; shared
        // with the I/O thread rather than copied.
        let (cmd, keep) = if conn.opts.recovery.enabled {
            let b = Arc::new(bytes);
            (Command::SendShared(b.clone()), Some(b))
        } else {
            (Command::Send(bytes), None)
        };
        let (seq, slot) = match shared.confirms.register(want_handle, keep) {
            Some(r) => r,
            None => return Err(Error::NotInConfirmMode),
        };
        if let Err(e) =
            shared.send_command(cmd, deadline, "room in the I/O thread's queue to publish")
        {
            shared.confirms.unregister(seq);
            return Err(e);
        }
        Stats::add(&conn.stats.published, 1);
        Ok(slot.map(|s| (seq, s)))
    }

    /// Fetch one message (`basic.get`); `Ok(None)` if the queue is empty,
    /// [`RecvError::Bad`] for a message that could not be decoded (ack or reject it).
    pub fn basic_get(&self, queue: &str, no_ack: bool) -> Result<Option<Delivery>, RecvError> {
        let m = AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
            queue: short("queue name", queue)?,
            no_ack,
        }));
        let deadline = self.deadline();
        let shared = self.usable(deadline)?;
        let content = match shared.rpc(m, deadline, "basic.get-ok", None)? {
            Reply::Get(Some(c)) => c,
            Reply::Get(None) => return Ok(None),
            other => {
                return Err(Error::UnexpectedReply {
                    operation: "basic.get",
                    got: format!("{other:?}"),
                }
                .into());
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
            }
            .into());
        };
        let acker = Acker::new(shared, delivery_tag);
        match content.properties {
            Ok(properties) => Ok(Some(Delivery {
                body: content.body,
                properties,
                exchange,
                routing_key,
                redelivered,
                message_count: Some(message_count),
                acker,
                charge: Default::default(),
            })),
            Err(p) => Err(RecvError::Bad(Box::new(BadDelivery {
                kind: p.into(),
                body: content.body,
                exchange,
                routing_key,
                redelivered,
                acker: Arc::new(acker),
                charge: Default::default(),
            }))),
        }
    }

    /// Cancel a consumer by tag and wait for `cancel-ok`.
    pub fn basic_cancel(&self, consumer_tag: &str) -> Result<()> {
        let m = AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
            consumer_tag: short("consumer tag", consumer_tag)?,
            nowait: false,
        }));
        self.forget_consumer(consumer_tag);
        let r = self.rpc(m, "basic.cancel-ok")?;
        expect_reply!(r, "basic.cancel", AMQPClass::Basic(basic::AMQPMethod::CancelOk(_)) => ())
    }

    /// Send `basic.cancel` for `consumer_tag` without waiting for the `cancel-ok`: the
    /// handle to wait on with [`Channel::cancel_finish`] (many cancels in flight at once).
    pub(crate) fn cancel_start(
        &self,
        consumer_tag: &str,
        deadline: Instant,
    ) -> Result<(Arc<ChannelShared>, crate::io::ReplyRx)> {
        let m = AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
            consumer_tag: short("consumer tag", consumer_tag)?,
            nowait: false,
        }));
        self.forget_consumer(consumer_tag);
        let shared = self.usable(deadline)?;
        let rx = shared.rpc_start(m, deadline, "basic.cancel-ok", None)?;
        Ok((shared, rx))
    }

    /// Wait until `deadline` for the `cancel-ok` of [`Channel::cancel_start`].
    pub(crate) fn cancel_finish(
        shared: &ChannelShared,
        rx: &crate::io::ReplyRx,
        deadline: Instant,
    ) -> Result<()> {
        let r = shared.wait_reply(rx, deadline, "basic.cancel-ok")?;
        expect_reply!(r, "basic.cancel", AMQPClass::Basic(basic::AMQPMethod::CancelOk(_)) => ())
    }

    /// What recovery restores on this channel.
    pub(crate) fn record(&self) -> &Mutex<ChannelRecord> {
        &self.inner.record
    }

    /// The record, to add what an RPC on `shared`'s connection set up: an error if a
    /// recovery copied the record for a newer connection in between (the RPC's reply came
    /// before the link failed, the record was replayed without it), so that the caller
    /// does it again instead of believing it is in place.
    pub(crate) fn record_for(
        &self,
        shared: &ChannelShared,
        what: &str,
    ) -> Result<crate::sync::MutexGuard<'_, ChannelRecord>> {
        let record = self.inner.record.lock();
        if record.copied_for > shared.conn.generation {
            return Err(Error::ConnectionLost(format!(
                "the connection was recovered while {what} was being set up on channel {}: \
                 it is not on the new connection; do it again",
                self.inner.id
            )));
        }
        Ok(record)
    }

    /// The state of the connection this channel belongs to.
    pub(crate) fn connection_inner(&self) -> &Arc<crate::connection_state::ConnectionInner> {
        self.inner.conn.inner()
    }

    /// Stop restoring a consumer after recovery.
    pub(crate) fn forget_consumer(&self, consumer_tag: &str) {
        let mut queue = None;
        self.inner.record.lock().consumers.retain(|r| {
            if r.tag == consumer_tag {
                queue = Some(r.queue.clone());
            }
            r.tag != consumer_tag
        });
        // As the Java client: an auto-delete queue whose last consumer is cancelled is
        // deleted by the broker, so recovery must not declare it again.
        if let Some(q) = queue {
            self.inner.conn.inner().forget_auto_delete_queue(&q);
        }
    }

    /// Send `basic.cancel` without waiting (used when a consumer is dropped).
    pub(crate) fn cancel_nowait(&self, consumer_tag: &str) {
        self.forget_consumer(consumer_tag);
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
        let (tx, _rx) = oneshot::channel();
        let shared = self.shared();
        let _ = shared.conn.send(
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

    /// Acknowledge by delivery tag (see also [`Delivery::ack`]). Settling by tag does not
    /// know the [`Delivery`]: it neither marks it settled nor refuses a tag settled
    /// before (a second settle of a tag closes the channel, 406); prefer the delivery's
    /// own methods, which settle it at most once.
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
        Acker::new(self.shared(), delivery_tag)
    }

    /// A message the broker returned (mandatory publish with no route), waiting up to
    /// `timeout`: `Ok(None)` if none came, an error if the channel is closed (by the
    /// broker or the application) or its connection is closed or lost for good. Returns
    /// queued before the channel closed are still handed out first. A waiting thread is
    /// woken at once when the channel closes or the link fails (it does not poll). While
    /// a recovery runs it waits for the reopened channel, within `timeout`. Up to 1024
    /// returns, and
    /// up to [`consumer_queue_bytes`](crate::ConnectionOptions::consumer_queue_bytes) of
    /// them, are kept per channel; more are logged, counted and dropped.
    ///
    /// ```no_run
    /// # fn main() -> lepus::Result<()> {
    /// use std::time::Duration;
    /// let conn = lepus::Connection::open("amqp://127.0.0.1")?;
    /// let ch = conn.open_channel()?;
    /// let mandatory = lepus::PublishOptions { mandatory: true };
    /// ch.basic_publish("", "no-such-queue", b"x", &lepus::BasicProperties::new(), &mandatory)?;
    /// if let Some(r) = ch.recv_return(Duration::from_secs(1))? {
    ///     println!("returned: {} {}", r.reply_code, r.reply_text);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn recv_return(&self, timeout: Duration) -> Result<Option<Returned>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.try_recv_return_now() {
                return Ok(Some(r));
            }
            let shared = match self.usable(deadline) {
                Ok(s) => s,
                Err(e) if e.is_connection_lost() && Instant::now() >= deadline => {
                    return Ok(None);
                }
                Err(e) => return Err(e),
            };
            if Instant::now() >= deadline {
                return Ok(None);
            }
            // The queue ends when its channel closes or its link fails (after either shows
            // in `usable`): the wait wakes then, and the next round says why or waits for
            // the recovered channel.
            let rx = shared.returns.receiver();
            match rx.recv_deadline(deadline) {
                Ok(r) => {
                    shared.returns_bytes.fetch_sub(r.cost(), Ordering::AcqRel);
                    return Ok(Some(r));
                }
                Err(RecvTimeoutError::Disconnected) if !shared.is_closed() => {
                    // Not expected (the queue ends only after its channel shows closed);
                    // wait the rest of the deadline rather than spin.
                    debug_assert!(false, "returns ended on an open channel");
                    let left = deadline.saturating_duration_since(Instant::now());
                    std::thread::sleep(left.min(Duration::from_millis(20)));
                }
                Err(_) => {}
            }
        }
    }

    /// A returned message if one is waiting (`Ok(None)` if none); an error if none is
    /// waiting and the channel cannot be used (see [`Channel::recv_return`]). Never
    /// blocks, even during a recovery (then `Ok(None)`).
    pub fn try_recv_return(&self) -> Result<Option<Returned>> {
        if let Some(r) = self.try_recv_return_now() {
            return Ok(Some(r));
        }
        let cur = self.shared();
        if cur.is_closed()
            && (self.inner.closed_by_us.load(Ordering::Acquire)
                || cur.is_channel_closed()
                || !cur.conn.will_recover())
        {
            return Err(cur.error());
        }
        Ok(None)
    }

    fn try_recv_return_now(&self) -> Option<Returned> {
        let shared = self.shared();
        let r = shared.returns.try_recv()?;
        shared.returns_bytes.fetch_sub(r.cost(), Ordering::AcqRel);
        Some(r)
    }

    // ---------------- confirms and transactions ----------------

    /// Put the channel in confirm mode (`confirm.select`).
    pub fn confirm_select(&self) -> Result<()> {
        let deadline = self.deadline();
        let shared = self.usable(deadline)?;
        if shared.confirms.is_enabled() {
            return Ok(());
        }
        let m = methods::confirm_select();
        let r = shared.rpc(m, deadline, "confirm.select-ok", None)?;
        expect_reply!(r, "confirm.select", AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(_)) => ())?;
        let mut record = self.record_for(&shared, "confirm.select")?;
        shared.confirms.enable();
        record.confirm = true;
        Ok(())
    }

    /// Wait, until the channel's operation timeout, for every message published so far
    /// to be confirmed: `Ok(())` if the broker acked every one since the last call,
    /// [`Error::Nacked`] listing the sequence numbers of those it nacked (each nack is
    /// reported once; the channel keeps at most the first 1,024 between calls and counts
    /// the rest in `unlisted`, so an application that waits per message and never calls
    /// this does not grow that list). Keeps waiting through a recovery that republishes them (see
    /// [`crate::Confirmation::wait_outcome_until`]).
    ///
    /// ```no_run
    /// # fn main() -> lepus::Result<()> {
    /// let conn = lepus::Connection::open("amqp://127.0.0.1")?;
    /// let ch = conn.open_channel()?;
    /// ch.confirm_select()?;
    /// let first = ch.next_publish_sequence();
    /// for i in 0..100u32 {
    ///     let body = i.to_string();
    ///     ch.basic_publish("", "jobs", body.as_bytes(), &lepus::BasicProperties::new(), &Default::default())?;
    /// }
    /// match ch.wait_for_confirms() {
    ///     Ok(()) => {}
    ///     Err(lepus::Error::Nacked { sequences, .. }) => {
    ///         // message i had sequence number first + i
    ///         println!("nacked: {:?}", sequences.iter().map(|s| s - first).collect::<Vec<_>>());
    ///     }
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok(()) }
    /// ```
    pub fn wait_for_confirms(&self) -> Result<()> {
        if !self.inner.record.lock().confirm {
            return Err(Error::NotInConfirmMode);
        }
        let deadline = self.deadline();
        loop {
            let shared = match self.usable(deadline) {
                Ok(s) => s,
                Err(e) if e.is_connection_lost() && Instant::now() >= deadline => {
                    return Err(Error::Timeout("publisher confirms"));
                }
                Err(e) => return Err(e),
            };
            match shared.confirms.wait_all(deadline) {
                Ok(nacked) if nacked.is_empty() => return Ok(()),
                Ok(nacked) => {
                    return Err(Error::Nacked {
                        channel: self.id(),
                        sequences: nacked.sequences,
                        unlisted: nacked.unlisted,
                    });
                }
                // Lost with messages outstanding that recovery republishes: wait for the
                // recovered channel and their new copies (see `Confirmation::wait_outcome_until`).
                Err(_)
                    if shared.conn.is_failed()
                        && shared.conn.will_recover()
                        && shared.conn.opts.recovery.unconfirmed
                            == crate::UnconfirmedPolicy::Republish => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The sequence number the next publish in confirm mode will get (1 for the first
    /// after [`Channel::confirm_select`]; 0 when not in confirm mode). The broker's acks
    /// and nacks, and [`Error::Nacked`], name messages by it. Numbering starts again at
    /// 1 on a recovered channel (messages recovery republishes are numbered again, in
    /// publish order, before any new one).
    pub fn next_publish_sequence(&self) -> u64 {
        let shared = self.shared();
        if shared.confirms.is_enabled() {
            shared.confirms.last_seq() + 1
        } else {
            0
        }
    }

    /// Published messages not yet confirmed.
    pub fn unconfirmed(&self) -> usize {
        self.shared().confirms.outstanding()
    }

    /// Messages handed back after a connection loss (see
    /// [`crate::UnconfirmedPolicy::HandBack`]): published in confirm mode, never
    /// confirmed. Taking them empties the list.
    pub fn take_unconfirmed(&self) -> Vec<UnconfirmedMessage> {
        let raw = std::mem::take(&mut *self.inner.handed_back.lock());
        raw.iter()
            .filter_map(|b| UnconfirmedMessage::decode(b))
            .collect()
    }

    /// Put the channel in transaction mode (`tx.select`).
    /// Recovery puts the reopened channel in transaction mode again (a transaction open
    /// at the failure is lost: the broker rolled it back; commit fails with the error).
    pub fn tx_select(&self) -> Result<()> {
        let deadline = self.deadline();
        let shared = self.usable(deadline)?;
        let r = shared.rpc(crate::topology::tx_select(), deadline, "tx.select-ok", None)?;
        expect_reply!(r, "tx.select", AMQPClass::Tx(tx::AMQPMethod::SelectOk(_)) => ())?;
        self.record_for(&shared, "tx.select")?.tx = true;
        Ok(())
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

    /// Close without waiting for `close-ok` (the pool discarding a channel that came
    /// back changed, or whose set-up failed); its consumers end as with [`Channel::close`].
    pub(crate) fn close_nowait(&self) {
        if self.inner.closed_by_us.swap(true, Ordering::AcqRel) {
            return;
        }
        self.inner.record.lock().consumers.clear();
        let shared = self.shared();
        if !shared.is_closed() {
            shared.close_nowait();
        }
    }

    /// Close the channel and wait for `close-ok`. Its consumers end and later calls get
    /// [`Error::ChannelClosed`].
    pub fn close(&self) -> Result<()> {
        if self.inner.closed_by_us.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let shared = self.shared();
        self.inner.record.lock().consumers.clear();
        if shared.is_closed() {
            return Ok(());
        }
        close_shared(&shared, self.deadline())
    }
}

/// Close this generation's channel: `channel.close`, then wait for its close-ok until
/// `deadline`. Its waiters wake with [`Error::ChannelClosed`].
pub(crate) fn close_shared(shared: &ChannelShared, deadline: Instant) -> Result<()> {
    let mut bytes = Vec::with_capacity(48);
    put_method(&mut bytes, shared.id, close_method()).map_err(Error::InvalidArgument)?;
    shared.set_closed(Error::ChannelClosed(shared.id));
    let (tx, rx) = oneshot::channel();
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

/// A message published in confirm mode and handed back unconfirmed after a connection
/// loss.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct UnconfirmedMessage {
    /// Exchange it was published to.
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// Mandatory flag.
    pub mandatory: bool,
    /// Properties.
    pub properties: BasicProperties,
    /// Body.
    pub body: Vec<u8>,
}

impl UnconfirmedMessage {
    /// Read back a publish unit that lepus itself encoded.
    fn decode(bytes: &[u8]) -> Option<Self> {
        let p = decode_publish(bytes)?;
        Some(UnconfirmedMessage {
            exchange: p.exchange,
            routing_key: p.routing_key,
            mandatory: p.mandatory,
            properties: p.properties,
            body: p.body,
        })
    }
}
