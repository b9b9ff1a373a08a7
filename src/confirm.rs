//! The `Confirmation` handle: the broker's answer to one published message, waited on
//! from any thread.

use std::time::{Duration, Instant};

use crate::channel::Channel;
use crate::confirm_tracker::{Confirm, FAILED, outcome};
use crate::error::{Error, Result};
use crate::options::PublishOptions;
use crate::protocol::properties::BasicProperties;
use crate::sync::{Arc, AtomicU8, Ordering};

// A confirmation comes from a channel's publish; the method lives with the handle it
// creates, so that imports point one way (confirm -> channel).
impl Channel {
    /// Publish in confirm mode and get the message's [`Confirmation`]; the channel must
    /// be in confirm mode ([`Channel::confirm_select`]).
    ///
    /// ```no_run
    /// # fn main() -> lepus::Result<()> {
    /// let conn = lepus::Connection::open("amqp://127.0.0.1")?;
    /// let ch = conn.open_channel()?;
    /// ch.confirm_select()?;
    /// let props = lepus::BasicProperties::new();
    /// let confirm = ch.basic_publish_confirmed("", "jobs", b"x", &props, &Default::default())?;
    /// confirm.wait()?; // a nack is Err(Error::Nacked { .. })
    /// # Ok(()) }
    /// ```
    pub fn basic_publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: &BasicProperties,
        opts: &PublishOptions,
    ) -> Result<Confirmation> {
        if !self.record().lock().confirm {
            return Err(Error::NotInConfirmMode);
        }
        let (seq, slot) = self
            .publish(exchange, routing_key, body, properties, opts, true)?
            .ok_or(Error::NotInConfirmMode)?;
        Ok(Confirmation::new(seq, slot, self.clone()))
    }
}

/// The confirmation of one published message; wait on it from any thread.
///
/// [`wait`](Confirmation::wait), [`wait_timeout`](Confirmation::wait_timeout) and
/// [`wait_until`](Confirmation::wait_until) return `Ok(())` only when the broker acked
/// the message: a nack is [`Error::Nacked`], so `confirm.wait()?` cannot let a nacked
/// message pass unnoticed. The `wait_outcome*` methods return the broker's answer as a
/// [`Confirm`] instead, for code that handles nacks itself.
///
/// If the connection is lost while the message is unconfirmed and recovery republishes
/// it (the default policy), a waiter keeps waiting, within its deadline, for the
/// republished copy's confirmation; under the hand-back policy, or once recovery gives
/// up, it gets [`Error::ConnectionLost`]. See [`Confirmation::wait_outcome_until`] for
/// the at-least-once contract.
///
/// ```no_run
/// # fn main() -> lepus::Result<()> {
/// use std::time::Duration;
/// let conn = lepus::Connection::open("amqp://127.0.0.1")?;
/// let ch = conn.open_channel()?;
/// ch.confirm_select()?;
/// let props = lepus::BasicProperties::new();
/// let confirm = ch.basic_publish_confirmed("", "jobs", b"x", &props, &Default::default())?;
/// match confirm.wait_timeout(Duration::from_secs(5)) {
///     Ok(()) => println!("the broker has message {}", confirm.sequence()),
///     Err(lepus::Error::Nacked { .. }) => println!("refused: publish it again or give up"),
///     Err(e) => return Err(e), // timed out, channel closed, connection lost ...
/// }
/// # Ok(()) }
/// ```
pub struct Confirmation {
    seq: u64,
    slot: Arc<AtomicU8>,
    channel: Channel,
}

impl std::fmt::Debug for Confirmation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Confirmation")
            .field("seq", &self.seq)
            .field("state", &self.slot.load(Ordering::Acquire))
            .finish()
    }
}

impl Confirmation {
    fn new(seq: u64, slot: Arc<AtomicU8>, channel: Channel) -> Self {
        Confirmation { seq, slot, channel }
    }

    /// The publish sequence number (the delivery tag the broker confirms) at the time of
    /// publishing.
    pub fn sequence(&self) -> u64 {
        self.seq
    }

    /// The outcome if the broker has answered already.
    pub fn try_get(&self) -> Option<Confirm> {
        outcome(&self.slot).ok().flatten()
    }

    /// Wait, until the channel's operation timeout, for the broker to ack the message:
    /// `Ok(())` on an ack, [`Error::Nacked`] on a nack, another error if no answer came
    /// (see [`Confirmation::wait_outcome_until`]).
    pub fn wait(&self) -> Result<()> {
        self.acked(self.wait_outcome())
    }

    /// Like [`Confirmation::wait`], waiting at most `timeout`.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<()> {
        self.acked(self.wait_outcome_timeout(timeout))
    }

    /// Like [`Confirmation::wait`], waiting until `deadline`.
    pub fn wait_until(&self, deadline: Instant) -> Result<()> {
        self.acked(self.wait_outcome_until(deadline))
    }

    fn acked(&self, outcome: Result<Confirm>) -> Result<()> {
        match outcome? {
            Confirm::Ack => Ok(()),
            Confirm::Nack => Err(Error::Nacked {
                channel: self.channel.id(),
                sequences: vec![self.seq],
                unlisted: 0,
            }),
        }
    }

    /// The broker's answer ([`Confirm::Ack`] or [`Confirm::Nack`]), waiting until the
    /// channel's operation timeout.
    pub fn wait_outcome(&self) -> Result<Confirm> {
        self.wait_outcome_until(self.channel.deadline())
    }

    /// The broker's answer, waiting at most `timeout`.
    pub fn wait_outcome_timeout(&self, timeout: Duration) -> Result<Confirm> {
        self.wait_outcome_until(Instant::now() + timeout)
    }

    /// The broker's answer, waiting until `deadline`.
    ///
    /// Across a recovery (with [`crate::UnconfirmedPolicy::Republish`], the default) this
    /// keeps waiting: the message is republished on the recovered channel and its
    /// outcome is the republished copy's. It fails only if the deadline passes, recovery
    /// gives up, the channel or connection is closed, or the message was handed back.
    /// That is an at-least-once contract: an `Ack` means the broker has the message (a
    /// copy published before the failure may have reached it too, so consumers may see
    /// it twice); an error after a link loss means the broker may or may not have it.
    pub fn wait_outcome_until(&self, deadline: Instant) -> Result<Confirm> {
        loop {
            match outcome(&self.slot) {
                Ok(Some(c)) => return Ok(c),
                Ok(None) => {}
                // Failed with its channel (no recovery follows): say why the channel
                // ended, e.g. closed by the broker or by the application, rather than "lost".
                Err(_) if self.slot.load(Ordering::Acquire) == FAILED => {
                    return Err(self.channel.shared().error());
                }
                Err(e) => return Err(e),
            }
            let shared = match self.channel.usable(deadline) {
                Ok(s) => s,
                // The deadline passed while recovery ran: a timeout, not a loss (the
                // message will still be republished and may yet be confirmed).
                Err(e) if e.is_connection_lost() && Instant::now() >= deadline => {
                    return Err(Error::Timeout("a publisher confirm"));
                }
                Err(e) => return Err(e),
            };
            match shared.confirms.wait_slot(&self.slot, deadline) {
                Ok(Some(c)) => return Ok(c),
                Ok(None) => return Err(Error::Timeout("a publisher confirm")),
                // The link was lost with the message unconfirmed and recovery will
                // republish it: wait for the recovered channel (`usable` above) and the
                // new copy's outcome, within the same deadline.
                Err(_) if follows_recovery(&shared, &self.slot) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// The message's confirmation follows recovery: its link was lost, recovery runs and
/// will republish it, and it is still pending.
pub(crate) fn follows_recovery(shared: &crate::io::ChannelShared, slot: &AtomicU8) -> bool {
    shared.conn.is_failed()
        && shared.conn.will_recover()
        && shared.conn.opts.recovery.unconfirmed == crate::UnconfirmedPolicy::Republish
        && matches!(outcome(slot), Ok(None))
}
