//! Publisher confirms: sequence numbers, acks and nacks (single and multiple), per-publish
//! handles and waiting for everything outstanding.

use std::collections::VecDeque;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::io::ChannelShared;
use crate::sync::{Arc, AtomicBool, AtomicU8, Condvar, Mutex, Ordering};

const PENDING: u8 = 0;
const ACKED: u8 = 1;
const NACKED: u8 = 2;
const FAILED: u8 = 3;

/// What the broker said about a published message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirm {
    /// The broker took responsibility for the message.
    Ack,
    /// The broker could not take it (e.g. a queue's overflow policy rejected it).
    Nack,
}

struct Entry {
    seq: u64,
    slot: Option<Arc<AtomicU8>>,
}

#[derive(Default)]
struct State {
    next_seq: u64,
    pending: VecDeque<Entry>,
    nacked_since_wait: bool,
    failure: Option<Error>,
}

/// Confirm bookkeeping of one channel; the I/O thread resolves, publishers wait.
pub(crate) struct ConfirmTracker {
    enabled: AtomicBool,
    state: Mutex<State>,
    cv: Condvar,
}

impl ConfirmTracker {
    pub(crate) fn new() -> Self {
        ConfirmTracker {
            enabled: AtomicBool::new(false),
            state: Mutex::new(State {
                next_seq: 1,
                ..State::default()
            }),
            cv: Condvar::new(),
        }
    }

    pub(crate) fn enable(&self) {
        self.enabled.store(true, Ordering::Release);
    }

    pub(crate) fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Take the next sequence number. Call with the channel's publish lock held, so that
    /// numbers follow the order in which frames reach the I/O thread.
    pub(crate) fn register(&self, want_handle: bool) -> Option<(u64, Option<Arc<AtomicU8>>)> {
        if !self.is_enabled() {
            return None;
        }
        let mut s = self.state.lock();
        let seq = s.next_seq;
        s.next_seq += 1;
        let slot = want_handle.then(|| Arc::new(AtomicU8::new(PENDING)));
        s.pending.push_back(Entry {
            seq,
            slot: slot.clone(),
        });
        Some((seq, slot))
    }

    /// Undo the last registration when the publish could not be queued.
    pub(crate) fn unregister(&self, seq: u64) {
        let mut s = self.state.lock();
        if s.pending.back().is_some_and(|e| e.seq == seq) {
            s.pending.pop_back();
            s.next_seq = seq;
        }
    }

    /// `basic.ack` / `basic.nack` from the broker.
    pub(crate) fn resolve(&self, tag: u64, multiple: bool, ack: bool) {
        let mut s = self.state.lock();
        let outcome = if ack { ACKED } else { NACKED };
        if !ack {
            s.nacked_since_wait = true;
        }
        if multiple {
            while s.pending.front().is_some_and(|e| e.seq <= tag) {
                let e = s.pending.pop_front().expect("front checked");
                if let Some(slot) = e.slot {
                    slot.store(outcome, Ordering::Release);
                }
            }
        } else if let Ok(i) = s.pending.binary_search_by_key(&tag, |e| e.seq) {
            let e = s.pending.remove(i).expect("index from search");
            if let Some(slot) = e.slot {
                slot.store(outcome, Ordering::Release);
            }
        } else {
            log::warn!("broker confirmed unknown delivery tag {tag}");
        }
        drop(s);
        self.cv.notify_all();
    }

    /// The channel or connection ended: every waiter gets `err`.
    pub(crate) fn fail(&self, err: Error) {
        let mut s = self.state.lock();
        for e in s.pending.drain(..) {
            if let Some(slot) = e.slot {
                slot.store(FAILED, Ordering::Release);
            }
        }
        if s.failure.is_none() {
            s.failure = Some(err);
        }
        drop(s);
        self.cv.notify_all();
    }

    /// Number of published messages not yet confirmed.
    pub(crate) fn outstanding(&self) -> usize {
        self.state.lock().pending.len()
    }

    fn wait_slot(&self, slot: &AtomicU8, deadline: Instant) -> Result<Confirm> {
        let mut s = self.state.lock();
        loop {
            match slot.load(Ordering::Acquire) {
                ACKED => return Ok(Confirm::Ack),
                NACKED => return Ok(Confirm::Nack),
                FAILED => {
                    return Err(s
                        .failure
                        .as_ref()
                        .map(Error::duplicate)
                        .unwrap_or(Error::ConnectionLost("channel ended".into())));
                }
                _ => {}
            }
            if self.cv.wait_until(&mut s, deadline).timed_out()
                && slot.load(Ordering::Acquire) == PENDING
            {
                return Err(Error::Timeout("a publisher confirm"));
            }
        }
    }

    /// Wait until nothing is outstanding: `Ok(true)` if all were acked since the last
    /// call, `Ok(false)` if any was nacked.
    pub(crate) fn wait_all(&self, deadline: Instant) -> Result<bool> {
        let mut s = self.state.lock();
        loop {
            if s.pending.is_empty() {
                return Ok(!std::mem::take(&mut s.nacked_since_wait));
            }
            if let Some(e) = &s.failure {
                return Err(e.duplicate());
            }
            if self.cv.wait_until(&mut s, deadline).timed_out() && !s.pending.is_empty() {
                return Err(Error::Timeout("publisher confirms"));
            }
        }
    }
}

/// The confirmation of one published message; wait on it from any thread.
pub struct Confirmation {
    seq: u64,
    slot: Arc<AtomicU8>,
    channel: Arc<ChannelShared>,
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
    pub(crate) fn new(seq: u64, slot: Arc<AtomicU8>, channel: Arc<ChannelShared>) -> Self {
        Confirmation { seq, slot, channel }
    }

    /// The publish sequence number (the delivery tag the broker confirms).
    pub fn sequence(&self) -> u64 {
        self.seq
    }

    /// The outcome if the broker has answered already.
    pub fn try_get(&self) -> Option<Confirm> {
        match self.slot.load(Ordering::Acquire) {
            ACKED => Some(Confirm::Ack),
            NACKED => Some(Confirm::Nack),
            _ => None,
        }
    }

    /// Wait for the broker's answer until the channel's default operation timeout.
    pub fn wait(&self) -> Result<Confirm> {
        self.wait_until(Instant::now() + self.channel.conn.opts.operation_timeout)
    }

    /// Wait for the broker's answer until `deadline`.
    pub fn wait_until(&self, deadline: Instant) -> Result<Confirm> {
        self.channel.confirms.wait_slot(&self.slot, deadline)
    }
}
