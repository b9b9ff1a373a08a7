//! Receiving deliveries in batches and settling a batch in one go.

use std::time::{Duration, Instant};

use crate::consumer::Consumer;
use crate::delivery::{BadDelivery, Delivery, RecvError};
use crate::error::Result;
use crate::protocol::frame::{put_ack, put_nack};

impl Consumer {
    /// Up to `max` deliveries: waits at most `timeout` for the first one, then takes what
    /// is already queued locally, without waiting again, up to `max` in all. `Ok(None)`
    /// when nothing came within `timeout`.
    ///
    /// So a batch is never held back to fill up: under load it is `max` long, when the
    /// queue runs dry it is what there was. Bad deliveries met on the way go into
    /// [`Batch::bad`] (they still need settling: the batch's acks and nacks cover them).
    /// An error ends the batch early: the deliveries taken so far are returned and the
    /// error comes from the next call if the consumer ended; a lost link that recovery
    /// restores is not repeated (the batch's acks then fail: its deliveries belong to the
    /// lost channel and come again).
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
        let mut batch = Batch::default();
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
/// tag. A multiple ack covers **every** earlier unacknowledged delivery of the channel,
/// not only this batch's: use it when one thread receives from a channel with one
/// consumer. When tags outside the batch may be unacknowledged (several threads receive
/// from the consumer, several consumers share the channel), use [`Batch::ack_each`]: one
/// ack per delivery, still written to the socket in one go. `ack_all` checks what it can
/// (the batch's tags are consecutive, so nothing between them belongs to someone else)
/// and falls back to `ack_each` otherwise; earlier tags it cannot see.
#[derive(Debug, Default)]
pub struct Batch {
    deliveries: Vec<Delivery>,
    bad: Vec<BadDelivery>,
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

    /// The delivery tags of the batch, sorted.
    fn tags(&self) -> Vec<u64> {
        let mut tags: Vec<u64> = self
            .deliveries
            .iter()
            .map(|d| d.acker.delivery_tag)
            .chain(self.bad.iter().map(|b| b.acker.delivery_tag))
            .collect();
        tags.sort_unstable();
        tags
    }

    fn consecutive(tags: &[u64]) -> bool {
        tags.windows(2).all(|w| w[1] == w[0] + 1)
    }

    fn acker(&self) -> Option<&crate::delivery::Acker> {
        self.deliveries
            .first()
            .map(|d| &d.acker)
            .or_else(|| self.bad.first().map(|b| &b.acker))
    }

    /// Acknowledge the batch with one multiple ack of its highest tag (see the type's
    /// docs for what else that covers); [`Batch::ack_each`] when the tags are not
    /// consecutive.
    pub fn ack_all(&self) -> Result<()> {
        let tags = self.tags();
        let (Some(acker), Some(&last)) = (self.acker(), tags.last()) else {
            return Ok(());
        };
        if !Self::consecutive(&tags) {
            return self.ack_each();
        }
        let mut bytes = Vec::with_capacity(21);
        put_ack(&mut bytes, acker.channel_id(), last, true);
        acker.channel.send_frames(bytes, "room to send basic.ack")?;
        acker.channel.settled(last, true);
        Ok(())
    }

    /// Negatively acknowledge the batch with one multiple nack (`requeue` puts them
    /// back); the same caveat and fallback as [`Batch::ack_all`].
    pub fn nack_all(&self, requeue: bool) -> Result<()> {
        let tags = self.tags();
        let (Some(acker), Some(&last)) = (self.acker(), tags.last()) else {
            return Ok(());
        };
        if !Self::consecutive(&tags) {
            return self.nack_each(requeue);
        }
        let mut bytes = Vec::with_capacity(22);
        put_nack(&mut bytes, acker.channel_id(), last, true, requeue);
        acker.channel.send_frames(bytes, "room to send basic.nack")?;
        acker.channel.settled(last, true);
        Ok(())
    }

    /// Acknowledge each delivery of the batch on its own (safe whoever else receives on
    /// the channel); the acks go to the I/O thread as one write.
    pub fn ack_each(&self) -> Result<()> {
        self.each(|bytes, ch, tag| put_ack(bytes, ch, tag, false))
    }

    /// Negatively acknowledge each delivery on its own, in one write.
    pub fn nack_each(&self, requeue: bool) -> Result<()> {
        self.each(|bytes, ch, tag| put_nack(bytes, ch, tag, false, requeue))
    }

    fn each(&self, put: impl Fn(&mut Vec<u8>, u16, u64)) -> Result<()> {
        let Some(acker) = self.acker() else {
            return Ok(());
        };
        let ch = acker.channel_id();
        let tags = self.tags();
        let mut bytes = Vec::with_capacity(22 * tags.len());
        for &tag in &tags {
            put(&mut bytes, ch, tag);
        }
        acker.channel.send_frames(bytes, "room to send acknowledgements")?;
        for tag in tags {
            acker.channel.settled(tag, false);
        }
        Ok(())
    }
}

impl IntoIterator for Batch {
    type Item = Delivery;
    type IntoIter = std::vec::IntoIter<Delivery>;
    fn into_iter(self) -> Self::IntoIter {
        self.deliveries.into_iter()
    }
}
