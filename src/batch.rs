//! Receiving deliveries in batches and settling a batch in one go.

use std::time::{Duration, Instant};

use crate::consumer::Consumer;
use crate::delivery::{Acker, BadDelivery, Delivery, RecvError};
use crate::error::{Error, Result};
use crate::protocol::frame::{put_ack, put_nack};

impl Consumer {
    /// Up to `max` deliveries: waits at most `timeout` for the first one, then takes what
    /// is already queued locally, without waiting again, up to `max` in all. `Ok(None)`
    /// when nothing came within `timeout`.
    ///
    /// So a batch is never held back to fill up: under load it is `max` long, when the
    /// queue runs dry it is what there was. Bad deliveries met on the way go into
    /// [`Batch::bad`] (they still need settling: the batch's acks and nacks cover those not
    /// settled on their own already).
    /// An error ends the batch early: the deliveries taken so far are returned and the
    /// error comes from the next call if the consumer ended; a lost link that recovery
    /// restores is not repeated (the batch's acks then fail: its deliveries belong to the
    /// lost channel; a classic or quorum queue delivers them again, a stream consumer's
    /// recovery resumes after the last offset queued locally, so on a stream they do not
    /// come again).
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # fn f(consumer: &lepus::Consumer) -> Result<(), Box<dyn std::error::Error>> {
    /// while let Some(batch) = consumer.recv_batch(100, Duration::from_secs(1))? {
    ///     for d in batch.deliveries() {
    ///         println!("{} bytes", d.body().len());
    ///     }
    ///     batch.ack_all()?; // one basic.ack with multiple
    /// }
    /// # Ok(()) }
    /// ```
    pub fn recv_batch(&self, max: usize, timeout: Duration) -> Result<Option<Batch>, RecvError> {
        self.recv_batch_deadline(max, Instant::now() + timeout)
    }

    /// Like [`Consumer::recv_batch`] with a deadline.
    pub fn recv_batch_deadline(
        &self,
        max: usize,
        deadline: Instant,
    ) -> Result<Option<Batch>, RecvError> {
        let mut batch = Batch {
            sole: self.sole_acking_consumer(),
            ..Batch::default()
        };
        if max == 0 {
            return Ok(None);
        }
        match self.recv_deadline(deadline) {
            Ok(Some(d)) => batch.deliveries.push(d),
            Ok(None) => return Ok(None),
            Err(RecvError::Bad(b)) => batch.bad.push(*b),
            Err(e) => return Err(e),
        }
        while batch.len() < max {
            match self.try_recv() {
                Ok(Some(d)) => batch.deliveries.push(d),
                Ok(None) => break,
                Err(RecvError::Bad(b)) => batch.bad.push(*b),
                Err(_) => break,
            }
        }
        Ok(Some(batch))
    }
}

/// Deliveries received together by [`Consumer::recv_batch`], in delivery order.
///
/// [`Batch::ack_all`] sends one `basic.ack` with `multiple` set for the highest delivery
/// tag when that provably covers only this batch: the consumer was the only one of its
/// channel that acknowledges (when the batch was received), the batch's tags are
/// consecutive, none of its deliveries was settled on its own and, when the channel
/// tracks its unsettled deliveries
/// ([`unacked_warning`](crate::ConnectionOptions::unacked_warning) on), none older than
/// the batch is pending. Otherwise it falls
/// back to [`Batch::ack_each`]: one ack per delivery, still written to the socket in one
/// go. What it cannot see: several threads receiving from the same consumer, or
/// deliveries of `basic.get` on the channel still unacknowledged — use `ack_each` then.
///
/// Each delivery is settled at most once: settling the batch skips the deliveries (and
/// bad deliveries) already settled on their own, and settling it again, when all are
/// settled, is [`Error::AlreadySettled`](crate::Error::AlreadySettled) with nothing sent.
/// The connection's [`acked`](crate::ConnectionStats) and `rejected` counters count
/// each delivery a batch settles (a multiple ack of 10 deliveries counts 10).
#[derive(Debug, Default)]
pub struct Batch {
    deliveries: Vec<Delivery>,
    bad: Vec<BadDelivery>,
    /// The consumer was the only acknowledging consumer of its channel.
    sole: bool,
}

/// How a batch is settled.
#[derive(Clone, Copy)]
pub(crate) enum Settle {
    Ack,
    Nack(bool),
}

impl Batch {
    /// The deliveries.
    pub fn deliveries(&self) -> &[Delivery] {
        &self.deliveries
    }

    /// Take the deliveries out (to settle them one by one).
    pub fn into_deliveries(self) -> Vec<Delivery> {
        self.deliveries
    }

    /// Bad deliveries met while filling the batch.
    pub fn bad(&self) -> &[BadDelivery] {
        &self.bad
    }

    /// Deliveries and bad deliveries.
    pub fn len(&self) -> usize {
        self.deliveries.len() + self.bad.len()
    }

    /// True when it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every acknowledgement handle of the batch, sorted by tag.
    fn ackers(&self) -> Vec<&Acker> {
        let mut all: Vec<&Acker> = self
            .deliveries
            .iter()
            .map(|d| &d.acker)
            .chain(self.bad.iter().map(|b| &*b.acker))
            .collect();
        all.sort_unstable_by_key(|a| a.delivery_tag);
        all
    }

    fn consecutive(ackers: &[&Acker]) -> bool {
        ackers
            .windows(2)
            .all(|w| w[1].delivery_tag == w[0].delivery_tag + 1)
    }

    /// Acknowledge the batch: one multiple ack of its highest tag when that covers only
    /// the batch (see the type's docs), else [`Batch::ack_each`].
    pub fn ack_all(&self) -> Result<()> {
        self.settle(Settle::Ack, true).map(drop)
    }

    /// Negatively acknowledge the batch (`requeue` puts them back): one multiple nack
    /// under the same conditions as [`Batch::ack_all`], else [`Batch::nack_each`].
    pub fn nack_all(&self, requeue: bool) -> Result<()> {
        self.settle(Settle::Nack(requeue), true).map(drop)
    }

    /// Acknowledge each delivery of the batch on its own (safe whoever else receives on
    /// the channel); the acks go to the I/O thread as one write.
    pub fn ack_each(&self) -> Result<()> {
        self.settle(Settle::Ack, false).map(drop)
    }

    /// Negatively acknowledge each delivery on its own, in one write.
    pub fn nack_each(&self, requeue: bool) -> Result<()> {
        self.settle(Settle::Nack(requeue), false).map(drop)
    }

    /// Settle the deliveries not settled yet, with one multiple frame if `multiple` is
    /// allowed and provably safe; how many it settled.
    pub(crate) fn settle(&self, how: Settle, multiple: bool) -> Result<u64> {
        let all = self.ackers();
        let Some(first) = all.first() else {
            return Ok(0);
        };
        let claimed: Vec<&Acker> = all.iter().copied().filter(|a| a.claim().is_ok()).collect();
        let Some(last) = claimed.last() else {
            return Err(Error::AlreadySettled {
                delivery_tag: first.delivery_tag,
            });
        };
        let ch = first.channel_id();
        let multiple = multiple
            && self.sole
            && claimed.len() == all.len()
            && Self::consecutive(&claimed)
            // Where the channel knows its lowest unsettled tag, nothing below the batch
            // may be pending (another thread's delivery of the same consumer).
            && first
                .channel
                .lowest_unsettled()
                .is_none_or(|low| low >= first.delivery_tag);
        let put = |bytes: &mut Vec<u8>, tag: u64, multiple: bool| match how {
            Settle::Ack => put_ack(bytes, ch, tag, multiple),
            Settle::Nack(requeue) => put_nack(bytes, ch, tag, multiple, requeue),
        };
        let mut bytes = Vec::with_capacity(22 * if multiple { 1 } else { claimed.len() });
        if multiple {
            put(&mut bytes, last.delivery_tag, true);
        } else {
            for a in &claimed {
                put(&mut bytes, a.delivery_tag, false);
            }
        }
        if let Err(e) = first.channel.send_frames(bytes, "room to send acknowledgements") {
            claimed.iter().for_each(|a| a.unclaim());
            return Err(e);
        }
        let n = claimed.len() as u64;
        match how {
            Settle::Ack => first.count_n(|s| &s.acked, n),
            Settle::Nack(_) => first.count_n(|s| &s.rejected, n),
        }
        if multiple {
            first.channel.settled(last.delivery_tag, true);
        } else {
            claimed.iter().for_each(|a| first.channel.settled(a.delivery_tag, false));
        }
        Ok(n)
    }

    /// Reject (without requeue) the bad deliveries not settled yet; how many.
    pub(crate) fn reject_bad(&self) -> (u64, u64) {
        let (mut done, mut failed) = (0, 0);
        for b in &self.bad {
            match b.reject(false) {
                Ok(()) => done += 1,
                Err(Error::AlreadySettled { .. }) => {}
                Err(_) => failed += 1,
            }
        }
        (done, failed)
    }
}

impl IntoIterator for Batch {
    type Item = Delivery;
    type IntoIter = std::vec::IntoIter<Delivery>;
    fn into_iter(self) -> Self::IntoIter {
        self.deliveries.into_iter()
    }
}
