//! Recovery entity by entity: sending each declaration so that one failure costs only
//! its own entity, reporting what failed, and retrying it in the background (with
//! backoff, on the current connection) while the rest of the connection serves traffic.

use std::time::{Duration, Instant};

use amq_protocol::protocol::{AMQPClass, queue};

use crate::connection_state::ConnectionInner;
use crate::error::{Error, Result};
use crate::events::{RecoveryEventKind, TopologyEntity};
use crate::io::{ConnShared, Reply};
use crate::sync::{Arc, Weak};
use crate::topology::{PendingTopology, queue_probe};

/// One result per method: the reply, or why that entity failed.
pub(crate) type EachResult = Vec<std::result::Result<Reply, Error>>;

fn deadline(inner: &ConnectionInner) -> Instant {
    Instant::now() + inner.opts.operation_timeout
}

/// Send `methods` on a scratch channel, each for an entity of its own. All go at once
/// (one round trip) while they succeed; from the first failure on (the broker closes the
/// channel on a failed declare or bind), the rest go one at a time, each failure on a
/// fresh channel, so one bad entity costs only itself. Only a failure of the connection
/// itself is an error of the whole step.
pub(crate) fn each_on_own(
    inner: &ConnectionInner,
    conn: &Arc<ConnShared>,
    methods: &[AMQPClass],
    what: &'static str,
) -> Result<EachResult> {
    let mut out = Vec::with_capacity(methods.len());
    if methods.is_empty() {
        return Ok(out);
    }
    let d = deadline(inner);
    let mut ch = conn.open_channel(None, d)?;
    let sent: Vec<_> = methods
        .iter()
        .map(|m| ch.rpc_start(m.clone(), d, what, None))
        .collect();
    for rx in sent {
        let r = rx.and_then(|rx| ch.wait_reply(&rx, d, what));
        if conn.is_failed() {
            return Err(conn.error());
        }
        let failed = r.is_err();
        out.push(r);
        if failed {
            break;
        }
    }
    for m in &methods[out.len()..] {
        if ch.is_closed() {
            ch = conn.open_channel(None, deadline(inner))?;
        }
        let r = ch.rpc(m.clone(), deadline(inner), what, None);
        if conn.is_failed() {
            return Err(conn.error());
        }
        out.push(r);
    }
    if !ch.is_closed() {
        ch.close_nowait();
    }
    Ok(out)
}

/// Report `entity` as failed (it will be retried).
pub(crate) fn entity_failed(
    inner: &ConnectionInner,
    generation: u64,
    entity: TopologyEntity,
    e: &Error,
) {
    crate::trace::warn!("recovery could not restore {entity}: {e}; retrying it in the background");
    inner.event(
        generation,
        RecoveryEventKind::EntityFailed {
            entity,
            error: e.to_string(),
        },
    );
}

/// Make `pending` what is left to restore, and start the background retry if something
/// is and no retry runs yet.
pub(crate) fn start(inner: &Arc<ConnectionInner>, pending: PendingTopology) {
    let mut p = inner.pending.lock();
    let retrying = p.retrying;
    *p = PendingTopology {
        retrying,
        ..pending
    };
    if p.is_empty() || p.retrying {
        return;
    }
    p.retrying = true;
    drop(p);
    let weak = Arc::downgrade(inner);
    if let Err(e) = std::thread::Builder::new()
        .name("lepus-topology-retry".into())
        .spawn(move || run(weak))
    {
        crate::trace::error!("could not start the topology retry thread: {e}");
        inner.pending.lock().retrying = false;
    }
}

/// A consumer the broker cancelled: keep it pending (its handle stays active) and start
/// the retry that subscribes it again once its queue answers.
pub(crate) fn resubscribe_later(
    inner: &Arc<ConnectionInner>,
    channel: u16,
    tag: &str,
    queue: &str,
) {
    inner.event(
        inner.current_generation(),
        RecoveryEventKind::EntityFailed {
            entity: TopologyEntity::Consumer {
                tag: tag.to_owned(),
                queue: queue.to_owned(),
                channel,
            },
            error: "cancelled by the broker (queue deleted or its node down)".into(),
        },
    );
    let mut pending = inner.pending.lock().clone();
    if !pending
        .consumers
        .iter()
        .any(|(c, t)| *c == channel && t == tag)
    {
        pending.consumers.push((channel, tag.to_owned()));
    }
    start(inner, pending);
}

/// Sleep `d` in short slices, holding the connection only weakly (a retry must not keep
/// a dropped connection alive). False if the connection is gone or closed.
fn sleep_weak(weak: &Weak<ConnectionInner>, d: Duration) -> bool {
    let end = Instant::now() + d;
    loop {
        match weak.upgrade() {
            Some(i) if !i.is_dead() => {}
            _ => return false,
        }
        let now = Instant::now();
        if now >= end {
            return true;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

fn run(weak: Weak<ConnectionInner>) {
    let mut attempt: u32 = 0;
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let o = &inner.opts.recovery;
        let wait = o
            .initial_backoff
            .saturating_mul(1u32 << attempt.min(16))
            .min(o.max_backoff);
        drop(inner);
        attempt += 1;
        if !sleep_weak(&weak, wait) {
            return;
        }
        let Some(inner) = weak.upgrade() else { return };
        if let Err(e) = retry_once(&inner) {
            crate::trace::debug!("topology retry: {e}");
        }
        let mut p = inner.pending.lock();
        if p.is_empty() {
            p.retrying = false;
            return;
        }
    }
}

/// One pass over what is pending, on the current connection.
fn retry_once(inner: &Arc<ConnectionInner>) -> Result<()> {
    let conn = inner.current(deadline(inner))?;
    let generation = conn.generation;
    let snapshot = inner.pending.lock().clone();
    let topology = inner.topology.lock().clone();
    let mut done: Vec<TopologyEntity> = Vec::new();

    // Exchanges and queues the application still has (it may have deleted some).
    let exchanges: Vec<_> = topology
        .exchanges
        .iter()
        .filter(|(n, _)| snapshot.exchanges.contains(n))
        .cloned()
        .collect();
    let queues: Vec<_> = topology
        .queues
        .iter()
        .filter(|(n, _)| snapshot.queues.contains(n))
        .cloned()
        .collect();
    let mut methods: Vec<AMQPClass> = exchanges.iter().map(|(n, r)| r.declare(n)).collect();
    methods.extend(queues.iter().map(|(n, r)| r.declare(n)));
    let replies = each_on_own(inner, &conn, &methods, "declare-ok (topology retry)")?;
    let names = exchanges
        .iter()
        .map(|(n, _)| TopologyEntity::Exchange(n.clone()))
        .chain(queues.iter().map(|(n, _)| TopologyEntity::Queue(n.clone())));
    for (entity, r) in names.zip(&replies) {
        match r {
            Ok(Reply::Method(AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)))) => {
                if let TopologyEntity::Queue(old) = &entity
                    && ok.queue.as_str() != old
                {
                    inner.topology.lock().rename_queue(old, ok.queue.as_str());
                }
                done.push(entity);
            }
            Ok(_) => done.push(entity),
            Err(_) => {}
        }
    }
    let mut p = inner.pending.lock();
    for e in &done {
        match e {
            TopologyEntity::Exchange(n) => p.exchanges.retain(|x| x != n),
            TopologyEntity::Queue(n) => p.queues.retain(|x| x != n),
            _ => {}
        }
    }
    // Forget what the application deleted meanwhile.
    p.exchanges
        .retain(|n| topology.exchanges.iter().any(|(x, _)| x == n));
    p.queues
        .retain(|n| topology.queues.iter().any(|(x, _)| x == n));
    let bindings: Vec<_> = p
        .bindings
        .iter()
        .filter(|b| !p.blocks(b) && topology.bindings.contains(b))
        .cloned()
        .collect();
    p.bindings.retain(|b| topology.bindings.contains(b));
    let queues_pending = p.queues.clone();
    drop(p);

    let methods: Vec<AMQPClass> = bindings.iter().map(|b| b.bind()).collect();
    let replies = each_on_own(inner, &conn, &methods, "bind-ok (topology retry)")?;
    let mut bound = Vec::new();
    for (b, r) in bindings.into_iter().zip(replies) {
        if r.is_ok() {
            done.push(b.entity());
            bound.push(b);
        }
    }
    inner.pending.lock().bindings.retain(|b| !bound.contains(b));

    retry_consumers(inner, &conn, &snapshot, &queues_pending, &mut done)?;
    for e in done {
        crate::trace::info!("topology retry restored {e}");
        inner.event(generation, RecoveryEventKind::EntityRecovered(e));
    }
    Ok(())
}

/// Consumers whose queue answers again: subscribe them on their own channel, under their
/// tag, feeding the same handle.
fn retry_consumers(
    inner: &Arc<ConnectionInner>,
    conn: &Arc<ConnShared>,
    snapshot: &PendingTopology,
    queues_pending: &[String],
    done: &mut Vec<TopologyEntity>,
) -> Result<()> {
    // A broker-closed channel too (a 404 on an earlier re-subscribe closes it): it is
    // reopened below.
    let channels = inner.app_channels();
    let mut candidates = Vec::new();
    let mut gone = Vec::new();
    for (id, tag) in &snapshot.consumers {
        let found = channels.iter().find(|c| c.id() == *id).and_then(|c| {
            let rec = c.record().lock();
            rec.consumers
                .iter()
                .find(|r| &r.tag == tag && r.sink.is_active())
                .cloned()
                .map(|r| (c.clone(), r))
        });
        match found {
            Some((c, r)) if !queues_pending.contains(&r.queue) => candidates.push((c, r)),
            Some(_) => {}
            None => gone.push((*id, tag.clone())),
        }
    }
    let probes: Vec<AMQPClass> = candidates
        .iter()
        .map(|(_, r)| queue_probe(&r.queue))
        .collect();
    let answers = each_on_own(inner, conn, &probes, "queue.declare-ok (passive, retry)")?;
    let mut restored: Vec<(u16, String)> = Vec::new();
    for ((c, r), probe) in candidates.into_iter().zip(answers) {
        if probe.is_err() || restored.contains(&(c.id(), r.tag.clone())) {
            continue;
        }
        let ch = c.current_shared();
        if ch.is_channel_closed() {
            // Reopened under its id with every active consumer of it, this one included.
            match inner.reopen_channel(&c, Instant::now() + inner.opts.operation_timeout) {
                Ok(tags) => restored.extend(tags.into_iter().map(|t| (c.id(), t))),
                Err(e) => crate::trace::warn!("could not reopen channel {}: {e}", c.id()),
            }
            continue;
        }
        if ch.is_closed() || !Arc::ptr_eq(&ch.conn, conn) {
            continue;
        }
        let reply = ch.rpc(
            r.consume(),
            deadline(inner),
            "basic.consume-ok (topology retry)",
            Some(r.sink.for_queue(&r.queue)),
        );
        if reply.is_ok() {
            done.push(TopologyEntity::Consumer {
                tag: r.tag.clone(),
                queue: r.queue.clone(),
                channel: c.id(),
            });
            restored.push((c.id(), r.tag.clone()));
        }
    }
    inner
        .pending
        .lock()
        .consumers
        .retain(|k| !restored.contains(k) && !gone.contains(k));
    Ok(())
}
