//! Reopening one closed channel on the live connection, under its id and handle: what a
//! connection recovery does for every channel, done for one (a consumer's channel the
//! broker closed, a publisher's channel the broker keeps nacking).

use std::time::Instant;

use crate::connection_state::{ChannelSlot, ConnectionInner};
use crate::error::Result;
use crate::events::{RecoveryEventKind, TopologyEntity};
use crate::recovery::{
    Restored, cancel_given_up_consumers, restore_consumers, restore_qos_and_confirms,
    settle_unconfirmed,
};
use crate::sync::Arc;
use crate::topology::PendingTopology;

/// Reopen `slot`'s channel, closed by the broker or by [`crate::Channel`]'s renewal (never
/// one the application closed), on the current connection under the same id: qos, confirm
/// and transaction mode again, its active consumers subscribed again under their tags
/// (one whose queue does not answer is left to the background retry), unconfirmed
/// messages the close kept republished. Returns the tags subscribed again.
pub(crate) fn reopen_channel(
    inner: &Arc<ConnectionInner>,
    slot: &Arc<dyn ChannelSlot>,
    d: Instant,
) -> Result<Vec<String>> {
    let conn = inner.current(d)?;
    let old = slot.current_shared();
    if !old.is_channel_closed() {
        // Open (reopened meanwhile), or only its connection is gone: recovery's part.
        return Ok(Vec::new());
    }
    // Under its own id: the handle, its deliveries' acks and its published frames name
    // it. If the application took the id meanwhile, this fails (NoFreeChannel) and the
    // caller reports it.
    let new = conn.open_channel(Some(slot.id()), d)?;
    let restored: Restored = vec![(slot.clone(), new)];
    let mut record = slot.record().lock().clone();
    // Consumers the close ended stay ended: their handles have seen the end.
    record.consumers.retain(|r| r.sink.is_active());
    let records = [record];
    restore_qos_and_confirms(inner, &restored, &records)?;
    let mut pending = PendingTopology::default();
    let started = restore_consumers(inner, &conn, &restored, &records, &mut pending)?;
    settle_unconfirmed(inner, &conn, &restored)?;
    cancel_given_up_consumers(inner, &restored, &started)?;
    crate::trace::info!(
        "channel {} reopened ({} consumer(s) subscribed again)",
        slot.id(),
        started.len()
    );
    let tags: Vec<String> = started.into_iter().map(|(_, t)| t).collect();
    for r in &records[0].consumers {
        if tags.contains(&r.tag) {
            inner.event(
                conn.generation,
                RecoveryEventKind::EntityRecovered(TopologyEntity::Consumer {
                    tag: r.tag.clone(),
                    queue: r.queue.clone(),
                    channel: slot.id(),
                }),
            );
        }
    }
    if !pending.consumers.is_empty() {
        let mut all = inner.pending.lock().clone();
        for c in pending.consumers {
            if !all.consumers.contains(&c) {
                all.consumers.push(c);
            }
        }
        crate::entity_recovery::start(inner, all);
    }
    Ok(tags)
}
