//! The `Confirmation` handle: the broker's answer to one published message, waited on
//! from any thread.

use std::time::Instant;

use crate::channel::Channel;
use crate::confirm_tracker::{Confirm, FAILED, outcome};
use crate::error::{Error, Result};
use crate::options::PublishOptions;
use crate::protocol::properties::BasicProperties;
use crate::sync::{Arc, AtomicU8, Ordering};

// A confirmation comes from a channel's publish; the method lives with the handle it
// creates, so that imports point one way (confirm -> channel).
impl Channel {
    /// Publish in confirm mode and get the message's [`Confirmation`].
    pub fn basic_publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: &BasicProperties,
        opts: PublishOptions,
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
/// If the connection is lost while the message is unconfirmed, a waiter gets
/// [`Error::ConnectionLost`]. With automatic recovery and the republish policy, waiting
/// again waits for the recovered connection and the republished copy's confirmation.
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

    /// Wait for the broker's answer until the channel's default operation timeout.
    pub fn wait(&self) -> Result<Confirm> {
        self.wait_until(self.channel.deadline())
    }

    /// Wait for the broker's answer until `deadline`.
    pub fn wait_until(&self, deadline: Instant) -> Result<Confirm> {
        match outcome(&self.slot) {
            Ok(Some(c)) => return Ok(c),
            Ok(None) => {}
            // Failed with its channel (no recovery follows): say why the channel ended,
            // e.g. closed by the broker or by the application, rather than "lost".
            Err(_) if self.slot.load(Ordering::Acquire) == FAILED => {
                return Err(self.channel.shared().error());
            }
            Err(e) => return Err(e),
        }
        let shared = self.channel.usable(deadline)?;
        match shared.confirms.wait_slot(&self.slot, deadline)? {
            Some(c) => Ok(c),
            None => Err(Error::Timeout("a publisher confirm")),
        }
    }
}
