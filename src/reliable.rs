//! The reliable publish: publish, wait for the broker's confirmation, and retry nacks
//! and lost links with backoff until a deadline: the loop every confirm-mode publisher
//! otherwise writes by hand.

use std::time::{Duration, Instant};

use crate::channel::Channel;
use crate::confirm_tracker::Confirm;
use crate::error::{Error, Result};
use crate::options::PublishOptions;
use crate::protocol::properties::BasicProperties;

/// First pause after a nack or a lost link; doubles up to `MAX_PAUSE`.
const FIRST_PAUSE: Duration = Duration::from_millis(20);
/// A quorum queue's leader election nacks for a few seconds: retrying faster than this
/// only adds load to a cluster that is busy electing.
const MAX_PAUSE: Duration = Duration::from_secs(1);
/// Nothing but nacks on one channel for this long: renew the channel (see
/// `Channel::renew`); the interval doubles up to `MAX_RENEW_AFTER` within one call.
const RENEW_AFTER: Duration = Duration::from_secs(1);
const MAX_RENEW_AFTER: Duration = Duration::from_secs(8);

impl Channel {
    /// Publish one message and return only once the broker has confirmed it (the channel
    /// must be in confirm mode), retrying until `deadline`: a nack (e.g. a quorum queue
    /// electing a new leader) is published again after a pause that doubles from 20 ms
    /// to 1 s; a lost link waits for the recovery, whose republished copy settles it (see
    /// [`crate::Confirmation::wait_outcome_until`]). Returns how many publishes it took.
    ///
    /// A channel that has nacked every publish for a second (then 2, 4, 8 s) is renewed
    /// (closed and reopened under its id, confirm mode and qos restored) when nothing
    /// else uses it (no consumer, no other unconfirmed message): a RabbitMQ 3.10 channel
    /// can keep nacking publishes to a quorum queue whose leader died until the old
    /// leader's node is back, and only a new channel gets past that. The renewal is a
    /// real close: another thread in an RPC on this same channel at that moment gets
    /// `ChannelClosed` (so give `publish_reliably` a channel of its own, as the
    /// one-channel-per-thread model does anyway). The renewal's own waits end by
    /// `deadline` too.
    ///
    /// At-least-once: a retried message may reach the broker more than once (a nacked
    /// copy is not routed, but one whose confirmation was lost with the link may be).
    /// Errors: [`Error::Timeout`] when the deadline passes unconfirmed; at once, an error
    /// that retrying cannot mend (the broker closed the channel, e.g. a missing exchange;
    /// the connection closed or recovery gave up; not in confirm mode).
    ///
    /// ```no_run
    /// # fn main() -> lepus::Result<()> {
    /// use std::time::{Duration, Instant};
    /// let conn = lepus::Connection::open("amqp://guest:guest@127.0.0.1:5672/%2f")?;
    /// let ch = conn.open_channel()?;
    /// ch.confirm_select()?;
    /// let deadline = Instant::now() + Duration::from_secs(30);
    /// let attempts = ch.publish_reliably(
    ///     "", "orders", b"order 17", &lepus::BasicProperties::default(),
    ///     &lepus::PublishOptions::default(), deadline,
    /// )?;
    /// println!("confirmed after {attempts} publish(es)");
    /// # Ok(()) }
    /// ```
    pub fn publish_reliably(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: &BasicProperties,
        opts: &PublishOptions,
        deadline: Instant,
    ) -> Result<u32> {
        let mut attempts: u32 = 0;
        let mut pause = FIRST_PAUSE;
        // Nacks in a row since this instant; past `renew_after`, the channel is renewed.
        let mut nacking_since: Option<Instant> = None;
        let mut renew_after = RENEW_AFTER;
        loop {
            attempts += 1;
            let outcome = self
                .basic_publish_confirmed(exchange, routing_key, body, properties, opts)
                .and_then(|c| c.wait_outcome_until(deadline));
            let why = match outcome {
                Ok(Confirm::Ack) => return Ok(attempts),
                Ok(Confirm::Nack) => "nacked".to_string(),
                // `pool_usable`: the channel lives and its connection lives or recovers.
                Err(e) if retryable(&e) && self.pool_usable() => e.to_string(),
                Err(e) => return Err(e),
            };
            if why == "nacked" {
                let since = *nacking_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= renew_after {
                    match self.renew(deadline) {
                        Ok(true) => {
                            crate::trace::info!(
                                "reliable publish: channel {} nacked everything for {:?}; renewed",
                                self.id(),
                                since.elapsed()
                            );
                            // A new channel: worth trying at once.
                            pause = FIRST_PAUSE;
                        }
                        Ok(false) => {}
                        Err(e) => crate::trace::warn!("reliable publish: renewing channel {}: {e}", self.id()),
                    }
                    nacking_since = None;
                    renew_after = (renew_after * 2).min(MAX_RENEW_AFTER);
                }
            } else {
                nacking_since = None;
            }
            let now = Instant::now();
            if now + pause >= deadline {
                crate::trace::debug!("reliable publish: giving up after {attempts} attempt(s): {why}");
                return Err(Error::Timeout("a confirmed publish"));
            }
            crate::trace::debug!("reliable publish attempt {attempts}: {why}; again in {pause:?}");
            std::thread::sleep(pause);
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }

    /// Close this channel and open it again under its id (confirm mode, qos and the rest
    /// restored), if nothing else uses it: no consumer and no other unconfirmed message.
    /// True if it was renewed.
    ///
    /// Why: RabbitMQ 3.10's channel keeps, per quorum queue, the member it sends to; a
    /// channel whose first publish to the queue comes while the queue's leader has just
    /// died (before the new leader is recorded) keeps asking the dead node, and nacks
    /// every publish to that queue, at once, until that node is back. A new channel asks
    /// the live leader. (Found with the cluster test's node kill: the 20 channels
    /// reopened by recovery nacked every republish for 30 s in about one run in ten.)
    fn renew(&self, deadline: Instant) -> Result<bool> {
        let shared = self.usable(deadline)?;
        {
            let _order = shared
                .publish_lock
                .try_lock_until(deadline)
                .ok_or(Error::Timeout("the channel's publish lock"))?;
            if !self.record().lock().consumers.is_empty() || shared.confirms.outstanding() > 0 {
                return Ok(false);
            }
            crate::channel::close_shared(&shared, deadline)?;
        }
        self.connection_inner()
            .reopen_channel(&self.slot(), deadline)?;
        Ok(true)
    }
}

/// Worth publishing again: the link was lost (recovery runs) or a wait ran out before
/// the caller's deadline (the loop checks that deadline).
fn retryable(e: &Error) -> bool {
    e.is_connection_lost() || matches!(e, Error::Timeout(_))
}
