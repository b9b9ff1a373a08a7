//! The recovery procedure: jittered backoff over the address list, reconnecting, and
//! replaying the recorded topology (topology.rs) step by step.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use amq_protocol::protocol::{AMQPClass, queue};

use crate::addresses::Address;
use crate::connection_state::{ChannelSlot, ConnectionInner, Generation};
use crate::delivery::ConsumerSink;
use crate::entity_recovery::{each_on_own, entity_failed};
use crate::error::{Error, Result};
use crate::events::{RecoveryEventKind, TopologyEntity};
use crate::io::{ChannelShared, Command, ConnShared, Reply, ReplyRx};
use crate::options::{RecoveryOptions, UnconfirmedPolicy};
use crate::protocol::methods;
use crate::stats::Stats;
use crate::sync::{Arc, Ordering};
use crate::topology::{ChannelRecord, PendingTopology, Topology};

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

// ---------------- the procedure ----------------

/// Reconnect (with backoff, over the address list) and replay until it works, the
/// attempts run out, or the application closes the connection. Runs on its own thread;
/// only one runs per connection at a time.
///
/// Each pass tries every address once, starting after the one that failed (shuffled if
/// the options say so), each bounded by the connection timeout; passes are separated by
/// the jittered backoff, which starts again from its initial value whenever an address
/// accepts a connection (a node that answers is worth trying again soon).
pub(crate) fn run(inner: Arc<ConnectionInner>) {
    let _span = crate::trace::span!("lepus.recovery", generation = inner.current_generation());
    let opts = inner.opts.recovery.clone();
    let mut failed = Some(inner.current_address());
    let mut attempt: u32 = 0;
    let mut pass: u32 = 0;
    loop {
        if inner.is_closed() {
            inner.give_up(Error::ConnectionClosed);
            return;
        }
        let wait = backoff(&opts, pass);
        if !wait.is_zero() && inner.sleep_unless_closed(wait) {
            continue;
        }
        pass += 1;
        let order = match inner.opts.address_order(failed.as_ref()) {
            Ok(o) => o,
            Err(e) => {
                attempt += 1;
                inner.event(
                    0,
                    RecoveryEventKind::AttemptFailed {
                        attempt,
                        error: e.to_string(),
                    },
                );
                if gave_up(&inner, &opts, attempt) {
                    return;
                }
                continue;
            }
        };
        for addr in order {
            if inner.is_closed() || gave_up(&inner, &opts, attempt) {
                break;
            }
            attempt += 1;
            match try_address(&inner, &addr, attempt) {
                Tried::Recovered => return,
                Tried::Refused => failed = Some(addr),
                Tried::ReplayFailed => {
                    failed = Some(addr);
                    // The node answered: back off from the start, not from where the
                    // dead nodes left the backoff.
                    pass = 1;
                    break;
                }
            }
        }
    }
}

/// The attempts ran out: recovery is over (true).
fn gave_up(inner: &ConnectionInner, opts: &RecoveryOptions, attempt: u32) -> bool {
    if opts.max_attempts.is_none_or(|max| attempt < max) {
        return false;
    }
    let err = Error::ConnectionLost(format!("recovery gave up after {attempt} attempts"));
    inner.event(0, RecoveryEventKind::GaveUp(err.to_string()));
    inner.give_up(err);
    true
}

enum Tried {
    Recovered,
    /// No connection (refused, timed out, handshake failed).
    Refused,
    /// Connected, but restoring failed.
    ReplayFailed,
}

/// One attempt: connect to `addr` and replay there.
fn try_address(inner: &Arc<ConnectionInner>, addr: &Address, attempt: u32) -> Tried {
    let _span = crate::trace::span!("lepus.recovery.attempt", host = addr.host, port = addr.port, attempt = attempt);
    let (host, port) = (addr.host.as_str(), addr.port);
    let generation = inner.next_generation();
    let gen_ = match crate::connection_state::start_generation(inner, host, port, generation) {
        Ok(g) => g,
        Err(e) => {
            crate::trace::warn!("reconnect attempt {attempt} to {addr} failed: {e}");
            inner.event(
                generation,
                RecoveryEventKind::AttemptFailed {
                    attempt,
                    error: format!("{addr}: {e}"),
                },
            );
            return Tried::Refused;
        }
    };
    inner.event(
        generation,
        RecoveryEventKind::Connected {
            host: host.to_owned(),
            port,
        },
    );
    match replay(inner, &gen_) {
        Ok(()) => {
            inner.event(generation, RecoveryEventKind::Recovered);
            crate::trace::info!("connection recovered (generation {generation}, {addr})");
            Tried::Recovered
        }
        Err(e) => {
            crate::trace::warn!("recovery on {addr} failed while restoring: {e}");
            inner.event(
                generation,
                RecoveryEventKind::AttemptFailed {
                    attempt,
                    error: format!("{addr}: {e}"),
                },
            );
            gen_.abandon();
            Tried::ReplayFailed
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

/// One replay on a new connection generation: topology first (on a channel of its own),
/// then every channel under its old id with its qos, confirm mode and consumers, then the
/// unconfirmed messages; finally the generation becomes current.
fn replay(inner: &Arc<ConnectionInner>, gen_: &Arc<Generation>) -> Result<()> {
    let conn = gen_.shared();
    let channels = inner.live_channels();
    // Channels keep their ids: reserve them before the topology channel takes one.
    {
        let mut ids = conn.ids.lock();
        for c in &channels {
            ids.reserve(c.id());
        }
    }
    let TopologyOutcome {
        renamed,
        mut pending,
    } = replay_topology(inner, gen_)?;
    inner.event(gen_.number(), RecoveryEventKind::TopologyRecovered);

    // Channels: reopen all under their ids at once, then qos, confirm mode and consumers,
    // each a single round trip for all channels.
    let restored = reopen_channels(inner, conn, &channels)?;
    let records = channel_records(inner, &restored, &renamed, gen_.number());
    restore_qos_and_confirms(inner, &restored, &records)?;
    let started = restore_consumers(inner, conn, &restored, &records, &mut pending)?;
    let republished = settle_unconfirmed(inner, conn, &restored)?;
    Stats::add(&inner.stats.published, republished as u64);
    let consumers = started.len() - cancel_given_up_consumers(inner, &restored, &started)?;
    inner.notify();
    if !inner.install(gen_.clone()) {
        return Err(Error::ConnectionLost(
            "the new connection failed while it was being restored".into(),
        ));
    }
    inner.event(
        gen_.number(),
        RecoveryEventKind::ConsumersRestored {
            channels: restored.len(),
            consumers,
            republished,
        },
    );
    crate::entity_recovery::start(inner, pending);
    Ok(())
}

/// Each step gets the operation timeout (not the whole replay, whose length grows with
/// the round trip: one deadline for all of it could make recovery over a slow link time
/// out on every attempt, forever).
fn step_deadline(inner: &ConnectionInner) -> Instant {
    Instant::now() + inner.opts.operation_timeout
}

/// What the topology step restored and what it could not.
struct TopologyOutcome {
    renamed: HashMap<String, String>,
    pending: PendingTopology,
}

/// Declare the recorded exchanges and queues again, then the bindings, which may name a
/// renamed server-named queue. Each entity on its own: one that fails is reported and
/// left pending (with the bindings that need it) for the background retry.
fn replay_topology(
    inner: &Arc<ConnectionInner>,
    gen_: &Arc<Generation>,
) -> Result<TopologyOutcome> {
    let _span = crate::trace::span!("lepus.recovery.topology");
    let conn = gen_.shared();
    let opts = &inner.opts.recovery;
    let mut topology = inner.topology.lock().clone();
    let mut pending = PendingTopology::default();
    let exchanges: Vec<_> = topology
        .exchanges
        .iter()
        .filter(|(n, _)| opts.keeps(&TopologyEntity::Exchange(n.clone())))
        .cloned()
        .collect();
    let queues: Vec<_> = topology
        .queues
        .iter()
        .filter(|(n, _)| opts.keeps(&TopologyEntity::Queue(n.clone())))
        .cloned()
        .collect();
    let mut methods: Vec<AMQPClass> = exchanges.iter().map(|(n, r)| r.declare(n)).collect();
    methods.extend(queues.iter().map(|(n, r)| r.declare(n)));
    let replies = each_on_own(inner, conn, &methods, "declare-ok (recovery)")?;
    for ((name, _), r) in exchanges.iter().zip(&replies) {
        if let Err(e) = r {
            entity_failed(
                inner,
                gen_.number(),
                TopologyEntity::Exchange(name.clone()),
                e,
            );
            pending.exchanges.push(name.clone());
        }
    }
    let mut renamed: HashMap<String, String> = HashMap::new();
    for ((name, _), reply) in queues.iter().zip(&replies[exchanges.len()..]) {
        let new = match reply {
            Ok(Reply::Method(AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)))) => {
                ok.queue.to_string()
            }
            Ok(other) => {
                return Err(Error::UnexpectedReply {
                    operation: "queue.declare (recovery)",
                    got: format!("{other:?}"),
                });
            }
            Err(e) => {
                entity_failed(inner, gen_.number(), TopologyEntity::Queue(name.clone()), e);
                pending.queues.push(name.clone());
                continue;
            }
        };
        if &new != name {
            crate::trace::info!("server-named queue {name:?} is now {new:?}");
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
    replay_bindings(inner, gen_, &topology, &mut pending)?;
    if !renamed.is_empty() {
        let mut t = inner.topology.lock();
        for (old, new) in &renamed {
            t.rename_queue(old, new);
        }
    }
    Ok(TopologyOutcome { renamed, pending })
}

/// Bind again (names already follow renamed queues), each binding on its own; one whose
/// source or destination failed waits with it.
fn replay_bindings(
    inner: &ConnectionInner,
    gen_: &Arc<Generation>,
    topology: &Topology,
    pending: &mut PendingTopology,
) -> Result<()> {
    let _span = crate::trace::span!("lepus.recovery.bindings");
    let opts = &inner.opts.recovery;
    let mut todo = Vec::new();
    for b in &topology.bindings {
        if !opts.keeps(&b.entity()) {
            continue;
        }
        if pending.blocks(b) {
            pending.bindings.push(b.clone());
        } else {
            todo.push(b.clone());
        }
    }
    let methods: Vec<AMQPClass> = todo.iter().map(|b| b.bind()).collect();
    let replies = each_on_own(inner, gen_.shared(), &methods, "bind-ok (recovery)")?;
    for (b, r) in todo.into_iter().zip(replies) {
        if let Err(e) = r {
            entity_failed(inner, gen_.number(), b.entity(), &e);
            pending.bindings.push(b);
        }
    }
    Ok(())
}

pub(crate) type Restored = Vec<(Arc<dyn ChannelSlot>, Arc<ChannelShared>)>;

/// Reopen every channel under its old id: all `channel.open`s, then all replies.
fn reopen_channels(
    inner: &ConnectionInner,
    conn: &Arc<ConnShared>,
    channels: &[Arc<dyn ChannelSlot>],
) -> Result<Restored> {
    let _span = crate::trace::span!("lepus.recovery.channels");
    let d = step_deadline(inner);
    let mut opening = Vec::with_capacity(channels.len());
    for c in channels {
        conn.ids.lock().free(c.id());
        opening.push(conn.open_channel_start(Some(c.id()), d)?);
    }
    let mut restored = Vec::with_capacity(channels.len());
    for (c, (new, rx)) in channels.iter().zip(opening) {
        new.open_finish(&rx, d)?;
        restored.push((c.clone(), new));
    }
    Ok(restored)
}

/// Each channel's record, without its dropped consumers and with renamed queues.
/// A consumer the broker cancelled keeps its record (only the application's cancel, drop
/// or close forgets it); with `resubscribe_cancelled_consumers` it is restored (or left
/// pending) with the rest, its handle active again.
fn channel_records(
    inner: &ConnectionInner,
    restored: &Restored,
    renamed: &HashMap<String, String>,
    generation: u64,
) -> Vec<ChannelRecord> {
    let resubscribe = inner.opts.recovery.resubscribe_cancelled;
    restored
        .iter()
        .map(|(c, _)| {
            let mut rec = c.record().lock();
            rec.copied_for = rec.copied_for.max(generation);
            if resubscribe {
                for r in &rec.consumers {
                    r.sink.shared.active.store(true, Ordering::Release);
                }
            }
            rec.consumers.retain(|r| r.sink.is_active());
            for r in &mut rec.consumers {
                if let Some(n) = renamed.get(&r.queue) {
                    r.queue = n.clone();
                }
            }
            rec.clone()
        })
        .collect()
}

/// `basic.qos` and `confirm.select` on every channel that had them: one round trip.
pub(crate) fn restore_qos_and_confirms(
    inner: &ConnectionInner,
    restored: &Restored,
    records: &[ChannelRecord],
) -> Result<()> {
    let _span = crate::trace::span!("lepus.recovery.qos_confirms");
    let d = step_deadline(inner);
    let mut step = InFlight::new();
    for ((_, new), record) in restored.iter().zip(records) {
        if let Some((prefetch, global)) = record.qos {
            let m = methods::qos(prefetch, global);
            step.start(new, m, d, "basic.qos-ok (recovery)", None)?;
            new.prefetch.store(prefetch.into(), Ordering::Release);
        }
        if record.confirm {
            let m = methods::confirm_select();
            step.start(new, m, d, "confirm.select-ok (recovery)", None)?;
        }
        if record.tx {
            let m = crate::topology::tx_select();
            step.start(new, m, d, "tx.select-ok (recovery)", None)?;
        }
    }
    step.finish(d)?;
    Ok(())
}

/// Every consumer under its tag, feeding its old queue: one round trip. A consumer whose
/// queue failed to recover, or (for a queue declared elsewhere) does not answer a passive
/// declare, is left pending instead: a `basic.consume` on a missing queue would close its
/// channel and everything else on it. Returns the consumers subscribed again, as (index in
/// `restored`, tag).
pub(crate) fn restore_consumers(
    inner: &ConnectionInner,
    conn: &Arc<ConnShared>,
    restored: &Restored,
    records: &[ChannelRecord],
    pending: &mut PendingTopology,
) -> Result<Vec<(usize, String)>> {
    let _span = crate::trace::span!("lepus.recovery.consumers");
    let opts = &inner.opts.recovery;
    let declared: Vec<String> = inner
        .topology
        .lock()
        .queues
        .iter()
        .map(|(n, _)| n.clone())
        .collect();
    // Queues declared elsewhere: probe them, each on its own.
    let mut probe: Vec<String> = Vec::new();
    for record in records {
        for r in &record.consumers {
            if !declared.contains(&r.queue) && !probe.contains(&r.queue) {
                probe.push(r.queue.clone());
            }
        }
    }
    let methods: Vec<AMQPClass> = probe
        .iter()
        .map(|q| crate::topology::queue_probe(q))
        .collect();
    let replies = each_on_own(inner, conn, &methods, "queue.declare-ok (passive, recovery)")?;
    let mut missing: HashMap<String, Error> = HashMap::new();
    for (q, r) in probe.into_iter().zip(replies) {
        if let Err(e) = r {
            missing.insert(q, e);
        }
    }
    let d = step_deadline(inner);
    let mut step = InFlight::new();
    let mut started = Vec::new();
    for (i, ((_, new), record)) in restored.iter().zip(records).enumerate() {
        if record.confirm {
            new.confirms.enable();
        }
        for r in &record.consumers {
            let entity = TopologyEntity::Consumer {
                tag: r.tag.clone(),
                queue: r.queue.clone(),
                channel: new.id,
            };
            if !opts.keeps(&entity) {
                continue;
            }
            if pending.queues.contains(&r.queue) || missing.contains_key(&r.queue) {
                let e = missing.get(&r.queue).cloned().unwrap_or_else(|| {
                    Error::InvalidArgument(format!("its queue {:?} did not recover", r.queue))
                });
                entity_failed(inner, conn.generation, entity, &e);
                pending.consumers.push((new.id, r.tag.clone()));
                continue;
            }
            let m = r.consume();
            step.start(
                new,
                m,
                d,
                "basic.consume-ok (recovery)",
                // Under the queue's name now (a server-named queue was renamed).
                Some(r.sink.for_queue(&r.queue)),
            )?;
            started.push((i, r.tag.clone()));
        }
    }
    step.finish(d)?;
    Ok(started)
}

/// A consumer the application cancelled or dropped while the replay ran: its cancel found
/// the old, dead channel and could only forget the record, but the replay had taken its
/// snapshot before and subscribed it again. Now that the new channels are current (a
/// cancel from here on reaches the new connection), cancel every restored consumer whose
/// record is gone, so that the broker delivers nothing to a consumer nobody reads. One
/// round trip; returns how many were cancelled.
pub(crate) fn cancel_given_up_consumers(
    inner: &ConnectionInner,
    restored: &Restored,
    started: &[(usize, String)],
) -> Result<usize> {
    let d = step_deadline(inner);
    let mut step = InFlight::new();
    let mut cancelled = 0;
    for (i, tag) in started {
        let (c, new) = &restored[*i];
        let kept = c.record().lock().consumers.iter().any(|r| &r.tag == tag);
        if !kept {
            crate::trace::debug!("consumer {tag:?} was cancelled during recovery: cancelling it again");
            step.start(new, methods::cancel(tag), d, "basic.cancel-ok (recovery)", None)?;
            cancelled += 1;
        }
    }
    step.finish(d)?;
    Ok(cancelled)
}

/// Unconfirmed messages of the old channels (republished or handed back, by policy),
/// then make the new channels current. Returns how many were republished.
pub(crate) fn settle_unconfirmed(
    inner: &ConnectionInner,
    conn: &Arc<ConnShared>,
    restored: &Restored,
) -> Result<usize> {
    let _span = crate::trace::span!("lepus.recovery.unconfirmed");
    let mut republished = 0;
    for (c, new) in restored {
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
                        republished += 1;
                        conn.send(
                            Command::SendShared(bytes),
                            step_deadline(inner),
                            "republish",
                        )?;
                    }
                }
                _ => c.hand_back(entries),
            }
        }
        c.set_current(new.clone());
    }
    Ok(republished)
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
}
