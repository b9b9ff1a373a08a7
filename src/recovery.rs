//! Automatic recovery: options, the recorded topology, events with timestamps, jittered
//! backoff, and the procedure that reconnects and replays everything.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use amq_protocol::protocol::{AMQPClass, basic, confirm, exchange, queue};

use crate::channel::{ChannelInner, ConsumeOptions, ExchangeDeclareOptions, QueueDeclareOptions};
use crate::connection::{ConnectionInner, Generation};
use crate::delivery::ConsumerSink;
use crate::error::{Error, Result};
use crate::io::{ChannelShared, Command, Reply, ReplyRx};
use crate::protocol::table::{FieldTable, table_to_amqp};
use crate::sync::{Arc, Ordering};

/// What happens to messages published in confirm mode but not yet confirmed when the
/// link is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum UnconfirmedPolicy {
    /// Publish them again on the recovered channel (at-least-once; the broker may see a
    /// message twice). Their [`crate::Confirmation`]s follow the new copies.
    #[default]
    Republish,
    /// Keep them for the application: [`crate::Channel::take_unconfirmed`] returns them
    /// and their confirmations fail.
    HandBack,
}

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
}

/// One recovery event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryEvent {
    /// When it happened.
    pub at: Instant,
    /// The connection generation it concerns (1 is the first connection).
    pub generation: u64,
    /// What happened.
    pub kind: RecoveryEventKind,
}

/// Called for each recovery event, on the thread where it happens: keep it short.
pub type RecoveryListener = Arc<dyn Fn(&RecoveryEvent) + Send + Sync>;

/// Automatic recovery settings (on by default).
#[derive(Clone)]
pub struct RecoveryOptions {
    pub(crate) enabled: bool,
    pub(crate) max_attempts: Option<u32>,
    pub(crate) initial_backoff: Duration,
    pub(crate) max_backoff: Duration,
    pub(crate) unconfirmed: UnconfirmedPolicy,
    pub(crate) listener: Option<RecoveryListener>,
}

impl std::fmt::Debug for RecoveryOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecoveryOptions")
            .field("enabled", &self.enabled)
            .field("max_attempts", &self.max_attempts)
            .field("initial_backoff", &self.initial_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("unconfirmed", &self.unconfirmed)
            .field("listener", &self.listener.is_some())
            .finish()
    }
}

impl Default for RecoveryOptions {
    fn default() -> Self {
        RecoveryOptions {
            enabled: true,
            max_attempts: None,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            unconfirmed: UnconfirmedPolicy::Republish,
            listener: None,
        }
    }
}

impl RecoveryOptions {
    /// Recovery on, unbounded attempts, backoff from 100 ms doubling to 10 s (jittered),
    /// unconfirmed messages republished.
    pub fn new() -> Self {
        Self::default()
    }
    /// No recovery: a lost link is final and every waiter gets the raw failure.
    pub fn disabled() -> Self {
        RecoveryOptions {
            enabled: false,
            ..Self::default()
        }
    }
    /// Give up after this many failed reconnection attempts (`None`: never give up).
    pub fn max_attempts(mut self, n: Option<u32>) -> Self {
        self.max_attempts = n;
        self
    }
    /// Backoff before the second attempt (the first is immediate), doubling up to `max`.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max.max(initial);
        self
    }
    /// What to do with unconfirmed messages.
    pub fn unconfirmed(mut self, policy: UnconfirmedPolicy) -> Self {
        self.unconfirmed = policy;
        self
    }
    /// Hear every recovery event.
    pub fn listener(mut self, f: impl Fn(&RecoveryEvent) + Send + Sync + 'static) -> Self {
        self.listener = Some(Arc::new(f));
        self
    }
}

/// Delay before attempt `n` (0-based; attempt 0 is immediate): exponential with ±25 %
/// jitter, so that many clients of a restarted broker do not reconnect in lockstep.
pub(crate) fn backoff(opts: &RecoveryOptions, attempt: u32) -> Duration {
    if attempt == 0 {
        return Duration::ZERO;
    }
    let base = opts
        .initial_backoff
        .saturating_mul(1u32 << (attempt - 1).min(20))
        .min(opts.max_backoff);
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        ^ attempt.wrapping_mul(0x9E37_79B9);
    let mut x = seed | 1;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    let jitter = 0.75 + (x % 1000) as f64 / 2000.0; // 0.75 ..= 1.25
    base.mul_f64(jitter)
}

// ---------------- topology records ----------------

#[derive(Clone, Debug)]
pub(crate) struct ExchangeRecord {
    pub(crate) kind: String,
    pub(crate) opts: ExchangeDeclareOptions,
}

#[derive(Clone, Debug)]
pub(crate) struct QueueRecord {
    pub(crate) server_named: bool,
    pub(crate) opts: QueueDeclareOptions,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct BindingRecord {
    pub(crate) to_exchange: bool,
    pub(crate) destination: String,
    pub(crate) source: String,
    pub(crate) routing_key: String,
    pub(crate) arguments: FieldTable,
}

/// Everything declared through a connection, to declare again after a reconnect.
#[derive(Clone, Debug, Default)]
pub(crate) struct Topology {
    pub(crate) exchanges: Vec<(String, ExchangeRecord)>,
    pub(crate) queues: Vec<(String, QueueRecord)>,
    pub(crate) bindings: Vec<BindingRecord>,
}

impl Topology {
    pub(crate) fn add_exchange(&mut self, name: &str, rec: ExchangeRecord) {
        self.exchanges.retain(|(n, _)| n != name);
        self.exchanges.push((name.to_owned(), rec));
    }
    pub(crate) fn remove_exchange(&mut self, name: &str) {
        self.exchanges.retain(|(n, _)| n != name);
        self.bindings
            .retain(|b| b.source != name && !(b.to_exchange && b.destination == name));
    }
    pub(crate) fn add_queue(&mut self, name: &str, rec: QueueRecord) {
        self.queues.retain(|(n, _)| n != name);
        self.queues.push((name.to_owned(), rec));
    }
    pub(crate) fn remove_queue(&mut self, name: &str) {
        self.queues.retain(|(n, _)| n != name);
        self.bindings
            .retain(|b| b.to_exchange || b.destination != name);
    }
    pub(crate) fn add_binding(&mut self, b: BindingRecord) {
        if !self.bindings.contains(&b) {
            self.bindings.push(b);
        }
    }
    pub(crate) fn remove_binding(&mut self, b: &BindingRecord) {
        self.bindings.retain(|x| x != b);
    }
    fn rename_queue(&mut self, old: &str, new: &str) {
        for (n, _) in &mut self.queues {
            if n == old {
                *n = new.to_owned();
            }
        }
        for b in &mut self.bindings {
            if !b.to_exchange && b.destination == old {
                b.destination = new.to_owned();
            }
        }
    }
}

/// A consumer to restore on the recovered channel.
#[derive(Clone)]
pub(crate) struct ConsumerRecord {
    pub(crate) tag: String,
    pub(crate) queue: String,
    pub(crate) opts: ConsumeOptions,
    pub(crate) sink: ConsumerSink,
}

/// Per-channel state to restore.
#[derive(Clone, Default)]
pub(crate) struct ChannelRecord {
    pub(crate) qos: Option<(u16, bool)>,
    pub(crate) confirm: bool,
    pub(crate) consumers: Vec<ConsumerRecord>,
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

// ---------------- the procedure ----------------

/// Reconnect (with backoff, over the address list) and replay until it works, the
/// attempts run out, or the application closes the connection. Runs on its own thread;
/// only one runs per connection at a time.
pub(crate) fn run(inner: Arc<ConnectionInner>) {
    let opts = inner.opts.recovery.clone();
    let addresses = inner.opts.addresses();
    let mut attempt: u32 = 0;
    loop {
        if inner.is_closed() {
            inner.give_up(Error::ConnectionClosed);
            return;
        }
        if opts.max_attempts.is_some_and(|max| attempt >= max) {
            let err = Error::ConnectionLost(format!("recovery gave up after {attempt} attempts"));
            inner.event(0, RecoveryEventKind::GaveUp(err.to_string()));
            inner.give_up(err);
            return;
        }
        let wait = backoff(&opts, attempt);
        if !wait.is_zero() && inner.sleep_unless_closed(wait) {
            continue;
        }
        let (host, port) = addresses[attempt as usize % addresses.len()].clone();
        attempt += 1;
        let generation = inner.next_generation();
        let gen_ = match crate::connection::start_generation(&inner, &host, port, generation) {
            Ok(g) => g,
            Err(e) => {
                log::warn!("reconnect attempt {attempt} to {host}:{port} failed: {e}");
                inner.event(
                    generation,
                    RecoveryEventKind::AttemptFailed {
                        attempt,
                        error: e.to_string(),
                    },
                );
                continue;
            }
        };
        inner.event(
            generation,
            RecoveryEventKind::Connected {
                host: host.clone(),
                port,
            },
        );
        match replay(&inner, &gen_) {
            Ok(()) => {
                inner.event(generation, RecoveryEventKind::Recovered);
                log::info!("connection recovered (generation {generation}, {host}:{port})");
                return;
            }
            Err(e) => {
                log::warn!("recovery on {host}:{port} failed while restoring: {e}");
                inner.event(
                    generation,
                    RecoveryEventKind::AttemptFailed {
                        attempt,
                        error: e.to_string(),
                    },
                );
                gen_.abandon();
            }
        }
    }
}

/// Requests in flight during a replay step: all sent at once, then every reply awaited,
/// so a step costs one round trip whatever the number of channels or entities.
struct InFlight {
    waits: Vec<(Arc<ChannelShared>, ReplyRx, &'static str)>,
}

impl InFlight {
    fn new() -> Self {
        InFlight { waits: Vec::new() }
    }
    fn start(
        &mut self,
        ch: &Arc<ChannelShared>,
        m: AMQPClass,
        deadline: Instant,
        what: &'static str,
        consumer: Option<ConsumerSink>,
    ) -> Result<()> {
        let rx = ch.rpc_start(m, deadline, what, consumer)?;
        self.waits.push((ch.clone(), rx, what));
        Ok(())
    }
    fn finish(self, deadline: Instant) -> Result<Vec<Reply>> {
        self.waits
            .into_iter()
            .map(|(ch, rx, what)| ch.wait_reply(&rx, deadline, what))
            .collect()
    }
}

fn replay(inner: &Arc<ConnectionInner>, gen_: &Arc<Generation>) -> Result<()> {
    let conn = gen_.shared();
    // Each step gets the operation timeout (not the whole replay, whose length grows with
    // the round trip: one deadline for all of it could make recovery over a slow link
    // time out on every attempt, forever).
    let deadline = || Instant::now() + inner.opts.operation_timeout;
    let channels = inner.live_channels();
    // Channels keep their ids: reserve them before the topology channel takes one.
    {
        let mut ids = conn.ids.lock();
        for c in &channels {
            ids.reserve(c.id());
        }
    }
    let topo_ch = conn.open_channel(None, deadline())?;
    let mut topology = inner.topology.lock().clone();

    // Exchanges and queues in one round trip; bindings (which may name a renamed
    // server-named queue) in the next.
    let d = deadline();
    let mut step = InFlight::new();
    for (name, rec) in &topology.exchanges {
        let m = AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
            exchange: name.as_str().into(),
            kind: rec.kind.as_str().into(),
            passive: false,
            durable: rec.opts.durable,
            auto_delete: rec.opts.auto_delete,
            internal: rec.opts.internal,
            nowait: false,
            arguments: table_to_amqp(&rec.opts.arguments),
        }));
        step.start(&topo_ch, m, d, "exchange.declare-ok (recovery)", None)?;
    }
    let queues = topology.queues.clone();
    for (name, rec) in &queues {
        let m = AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: if rec.server_named {
                "".into()
            } else {
                name.as_str().into()
            },
            passive: false,
            durable: rec.opts.durable,
            exclusive: rec.opts.exclusive,
            auto_delete: rec.opts.auto_delete,
            nowait: false,
            arguments: table_to_amqp(&rec.opts.arguments),
        }));
        step.start(&topo_ch, m, d, "queue.declare-ok (recovery)", None)?;
    }
    let replies = step.finish(d)?;
    let mut renamed: HashMap<String, String> = HashMap::new();
    for ((name, _), reply) in queues.iter().zip(&replies[topology.exchanges.len()..]) {
        match reply {
            Reply::Method(AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok))) => {
                let new = ok.queue.to_string();
                if &new != name {
                    log::info!("server-named queue {name:?} is now {new:?}");
                    inner.event(
                        gen_.number(),
                        RecoveryEventKind::QueueRenamed {
                            old: name.clone(),
                            new: new.clone(),
                        },
                    );
                    topology.rename_queue(name, &new);
                    renamed.insert(name.clone(), new);
                }
            }
            other => {
                return Err(Error::UnexpectedReply {
                    operation: "queue.declare (recovery)",
                    got: format!("{other:?}"),
                });
            }
        }
    }
    let d = deadline();
    let mut step = InFlight::new();
    for b in &topology.bindings {
        let m = if b.to_exchange {
            AMQPClass::Exchange(exchange::AMQPMethod::Bind(exchange::Bind {
                destination: b.destination.as_str().into(),
                source: b.source.as_str().into(),
                routing_key: b.routing_key.as_str().into(),
                nowait: false,
                arguments: table_to_amqp(&b.arguments),
            }))
        } else {
            AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
                queue: b.destination.as_str().into(),
                exchange: b.source.as_str().into(),
                routing_key: b.routing_key.as_str().into(),
                nowait: false,
                arguments: table_to_amqp(&b.arguments),
            }))
        };
        step.start(&topo_ch, m, d, "bind-ok (recovery)", None)?;
    }
    step.finish(d)?;
    topo_ch.close_nowait();
    if !renamed.is_empty() {
        let mut t = inner.topology.lock();
        for (old, new) in &renamed {
            t.rename_queue(old, new);
        }
    }
    inner.event(gen_.number(), RecoveryEventKind::TopologyRecovered);

    // Channels: reopen all under their ids at once, then qos, confirm mode and consumers,
    // each a single round trip for all channels.
    let d = deadline();
    let mut opening = Vec::with_capacity(channels.len());
    for c in &channels {
        conn.ids.lock().free(c.id());
        opening.push(conn.open_channel_start(Some(c.id()), d)?);
    }
    let mut restored: Vec<(Arc<ChannelInner>, Arc<ChannelShared>)> = Vec::new();
    for (c, (new, rx)) in channels.iter().zip(opening) {
        new.open_finish(&rx, d)?;
        restored.push((c.clone(), new));
    }
    let records: Vec<ChannelRecord> = restored
        .iter()
        .map(|(c, _)| {
            let mut rec = c.record.lock();
            rec.consumers.retain(|r| r.sink.is_active());
            for r in &mut rec.consumers {
                if let Some(n) = renamed.get(&r.queue) {
                    r.queue = n.clone();
                }
            }
            rec.clone()
        })
        .collect();
    let d = deadline();
    let mut step = InFlight::new();
    for ((_, new), record) in restored.iter().zip(&records) {
        if let Some((prefetch, global)) = record.qos {
            let m = AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                prefetch_count: prefetch,
                global,
            }));
            step.start(new, m, d, "basic.qos-ok (recovery)", None)?;
            new.prefetch.store(prefetch.into(), Ordering::Release);
        }
        if record.confirm {
            let m = AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
                nowait: false,
            }));
            step.start(new, m, d, "confirm.select-ok (recovery)", None)?;
        }
    }
    step.finish(d)?;
    let d = deadline();
    let mut step = InFlight::new();
    let mut counts = (restored.len(), 0, 0);
    for ((_, new), record) in restored.iter().zip(&records) {
        if record.confirm {
            new.confirms.enable();
        }
        for r in &record.consumers {
            let m = AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
                queue: r.queue.as_str().into(),
                consumer_tag: r.tag.as_str().into(),
                no_local: r.opts.no_local,
                no_ack: r.opts.no_ack,
                exclusive: r.opts.exclusive,
                nowait: false,
                arguments: table_to_amqp(&r.opts.arguments),
            }));
            step.start(
                new,
                m,
                d,
                "basic.consume-ok (recovery)",
                Some(r.sink.clone()),
            )?;
            counts.1 += 1;
        }
    }
    step.finish(d)?;
    // Unconfirmed messages of the old channels, then make the new channels current.
    for (c, new) in &restored {
        let old = c.current_shared();
        let entries = old.confirms.take_in_doubt();
        if !entries.is_empty() {
            match inner.opts.recovery.unconfirmed {
                UnconfirmedPolicy::Republish if new.confirms.is_enabled() => {
                    let _order = new.publish_lock.lock();
                    let frames = new.confirms.adopt(entries);
                    // The messages belong to the new channel now: make it current before
                    // sending, so that if this connection fails too (the send below
                    // fails), the next attempt finds them in doubt there, not on the old
                    // channel whose list was just emptied.
                    c.set_current(new.clone());
                    for bytes in frames {
                        counts.2 += 1;
                        conn.send(Command::SendShared(bytes), deadline(), "republish")?;
                    }
                }
                _ => c.hand_back(entries),
            }
        }
        c.set_current(new.clone());
    }
    inner.notify();
    if !inner.install(gen_.clone()) {
        return Err(Error::ConnectionLost(
            "the new connection failed while it was being restored".into(),
        ));
    }
    inner.event(
        gen_.number(),
        RecoveryEventKind::ConsumersRestored {
            channels: counts.0,
            consumers: counts.1,
            republished: counts.2,
        },
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let o = RecoveryOptions::new().backoff(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(backoff(&o, 0), Duration::ZERO);
        for attempt in 1..30 {
            let b = backoff(&o, attempt);
            let base = Duration::from_millis(100 * (1u64 << (attempt - 1).min(20)))
                .min(Duration::from_secs(1));
            assert!(
                b >= base.mul_f64(0.75) && b <= base.mul_f64(1.25),
                "{attempt}: {b:?}"
            );
        }
    }

    #[test]
    fn renaming_a_server_named_queue_moves_its_bindings() {
        let mut t = Topology::default();
        t.add_queue(
            "amq.gen_-1",
            QueueRecord {
                server_named: true,
                opts: QueueDeclareOptions::default(),
            },
        );
        t.add_binding(BindingRecord {
            to_exchange: false,
            destination: "amq.gen_-1".into(),
            source: "ex".into(),
            routing_key: "k".into(),
            arguments: FieldTable::new(),
        });
        t.rename_queue("amq.gen_-1", "amq.gen_-2");
        assert_eq!(t.queues[0].0, "amq.gen_-2");
        assert_eq!(t.bindings[0].destination, "amq.gen_-2");
        t.remove_queue("amq.gen_-2");
        assert!(t.bindings.is_empty());
    }
}
