//! Deliveries of a channel not yet settled, with when they arrived: the early warning
//! before the broker's `consumer_timeout` closes the channel (406).
//!
//! The I/O thread notes each delivery it queues for a consumer that acknowledges (with
//! the time it already has for the frame), the acker removes it when the ack, nack or
//! reject is queued, and the I/O thread's timer asks for the ones past the threshold not
//! reported yet. Only built when the option is on.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::sync::Mutex;

/// A channel's unsettled deliveries, oldest first (delivery tags grow with arrival).
pub(crate) struct UnackedTracker {
    threshold: Duration,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    pending: VecDeque<(u64, Instant)>,
    /// Deliveries up to this tag have been reported already.
    reported_upto: u64,
}

impl UnackedTracker {
    pub(crate) fn new(threshold: Duration) -> Self {
        UnackedTracker {
            threshold,
            inner: Mutex::new(Inner::default()),
        }
    }

    pub(crate) fn threshold(&self) -> Duration {
        self.threshold
    }

    /// A delivery was queued for a consumer.
    pub(crate) fn arrived(&self, tag: u64, at: Instant) {
        self.inner.lock().pending.push_back((tag, at));
    }

    /// The lowest tag not settled yet (`None` when none is pending).
    pub(crate) fn lowest(&self) -> Option<u64> {
        self.inner.lock().pending.front().map(|&(t, _)| t)
    }

    /// The delivery `tag` (and with `multiple` every earlier one) was settled.
    pub(crate) fn settled(&self, tag: u64, multiple: bool) {
        let mut i = self.inner.lock();
        if multiple {
            while i.pending.front().is_some_and(|&(t, _)| t <= tag) {
                i.pending.pop_front();
            }
        } else if let Ok(pos) = i.pending.binary_search_by_key(&tag, |&(t, _)| t) {
            i.pending.remove(pos);
        }
    }

    /// Deliveries past the threshold at `now` that were not reported before, as
    /// (delivery tag, age), oldest first.
    pub(crate) fn overdue(&self, now: Instant) -> Vec<(u64, Duration)> {
        let mut i = self.inner.lock();
        let from = i.reported_upto;
        let found: Vec<(u64, Duration)> = i
            .pending
            .iter()
            .skip_while(|&&(t, _)| t <= from)
            .map(|&(t, at)| (t, now.saturating_duration_since(at)))
            .take_while(|&(_, age)| age >= self.threshold)
            .collect();
        if let Some(&(last, _)) = found.last() {
            i.reported_upto = last;
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_each_overdue_delivery_once_and_forgets_settled_ones() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let t = UnackedTracker::new(ms(100));
        for tag in 1..=5 {
            t.arrived(tag, t0 + ms(tag * 10));
        }
        t.settled(2, false);
        assert!(t.overdue(t0 + ms(50)).is_empty());
        let due: Vec<u64> = t.overdue(t0 + ms(130)).iter().map(|d| d.0).collect();
        assert_eq!(due, [1, 3]);
        // Reported once; 4 comes due later.
        let due: Vec<u64> = t.overdue(t0 + ms(145)).iter().map(|d| d.0).collect();
        assert_eq!(due, [4]);
        t.settled(4, true);
        let due: Vec<u64> = t.overdue(t0 + ms(500)).iter().map(|d| d.0).collect();
        assert_eq!(due, [5]);
        assert!(t.overdue(t0 + ms(900)).is_empty());
    }
}
