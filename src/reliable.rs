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

impl Channel {
    /// Publish one message and return only once the broker has confirmed it (the channel
    /// must be in confirm mode), retrying until `deadline`: a nack (e.g. a quorum queue
    /// electing a new leader) is published again after a pause that doubles from 20 ms
    /// to 1 s; a lost link waits for the recovery, whose republished copy settles it (see
    /// [`crate::Confirmation::wait_outcome_until`]). Returns how many publishes it took.
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
            let now = Instant::now();
            if now + pause >= deadline {
                log::debug!("reliable publish: giving up after {attempts} attempt(s): {why}");
                return Err(Error::Timeout("a confirmed publish"));
            }
            log::debug!("reliable publish attempt {attempts}: {why}; again in {pause:?}");
            std::thread::sleep(pause);
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }
}

/// Worth publishing again: the link was lost (recovery runs) or a wait ran out before
/// the caller's deadline (the loop checks that deadline).
fn retryable(e: &Error) -> bool {
    e.is_connection_lost() || matches!(e, Error::Timeout(_))
}
