//! The confirm tracker of a channel: sequence numbers, acks and nacks (single and
//! multiple) resolved by the I/O thread, waiting for everything outstanding, and what
//! happens to unconfirmed messages when the link is lost (kept for republishing, or
//! handed back). The per-publish handle, `Confirmation`, is in `confirm.rs`.

use std::collections::VecDeque;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::sync::{Arc, AtomicBool, AtomicU8, Condvar, CondvarExt, Mutex, MutexGuard, Ordering};

const PENDING: u8 = 0;
const ACKED: u8 = 1;
const NACKED: u8 = 2;
pub(crate) const FAILED: u8 = 3;
const HANDED_BACK: u8 = 4;

/// What the broker said about a published message.
///
/// ```no_run
/// use lepus::Confirm;
/// let conn = lepus::Connection::open("amqp://127.0.0.1")?;
/// let ch = conn.open_channel()?;
/// ch.confirm_select()?;
/// let c = ch.basic_publish_confirmed("", "jobs", b"x", &lepus::BasicProperties::new(), &Default::default())?;
/// match c.wait_outcome()? {
///     Confirm::Ack => {}
///     Confirm::Nack => println!("refused: {}", c.sequence()),
/// }
/// # Ok::<(), lepus::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirm {
    /// The broker took responsibility for the message.
    Ack,
    /// The broker could not take it (e.g. a queue's overflow policy rejected it).
    Nack,
}

/// An unconfirmed publish: its frames (to republish) and its handle's slot.
#[doc(hidden)]
pub struct Entry {
    seq: u64,
    slot: Option<Arc<AtomicU8>>,
    /// The frames of the publish, kept for recovery.
    pub bytes: Option<Arc<Vec<u8>>>,
}

impl Entry {
    /// Mark handed back: its waiter learns the message is with the application.
    pub fn hand_back(&self) {
        if let Some(slot) = &self.slot {
            slot.store(HANDED_BACK, Ordering::Release);
        }
    }
}

/// How many nacked sequence numbers the tracker keeps for the next `wait_all`; further
/// nacks are only counted. An application that never calls `Channel::wait_for_confirms`
/// (it waits per message, or uses `publish_reliably`) would otherwise grow the list
/// forever.
pub const NACKS_LISTED: usize = 1024;

/// The messages nacked since the last [`ConfirmTracker::wait_all`].
#[doc(hidden)]
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Nacks {
    /// The first [`NACKS_LISTED`] of their sequence numbers, in the order the broker
    /// nacked them.
    pub sequences: Vec<u64>,
    /// How many more were nacked beyond those listed.
    pub unlisted: u64,
}

impl Nacks {
    /// Nothing was nacked.
    pub fn is_empty(&self) -> bool {
        self.sequences.is_empty() && self.unlisted == 0
    }

    fn push(&mut self, seq: u64) {
        if self.sequences.len() < NACKS_LISTED {
            self.sequences.push(seq);
        } else {
            self.unlisted += 1;
        }
    }
}

#[derive(Default)]
struct State {
    next_seq: u64,
    pending: VecDeque<Entry>,
    /// Messages nacked since the last `wait_all` (reported, then cleared); bounded.
    nacked_since_wait: Nacks,
    failure: Option<Error>,
    /// The failure kept the unconfirmed messages (`fail`'s `keep`).
    kept: bool,
    /// Unconfirmed when the link was lost, kept for recovery to republish or hand back.
    in_doubt: Vec<Entry>,
    /// The threads asleep in `wait_slot` / `wait_all`, each on its own condvar.
    waiters: Vec<Waiter>,
}

/// A thread asleep on the tracker: what it waits for and the condvar it sleeps on (its
/// own, so that waking it wakes nobody else).
struct Waiter {
    /// The address of the awaited slot, or [`ALL`] for `wait_all`.
    key: usize,
    cv: Arc<Condvar>,
}

/// The key of a `wait_all` waiter (no slot has address 0).
const ALL: usize = 0;

fn key_of(slot: &AtomicU8) -> usize {
    slot as *const AtomicU8 as usize
}

impl State {
    /// Take out the waiters of `key` (a settled slot), to wake once the lock is released.
    fn take_waiters(&mut self, key: usize, wake: &mut Vec<Arc<Condvar>>) {
        let mut i = 0;
        while i < self.waiters.len() {
            if self.waiters[i].key == key {
                wake.push(self.waiters.swap_remove(i).cv);
            } else {
                i += 1;
            }
        }
    }

    /// Sleep on a condvar of one's own until woken (by a settle of `key`, a failure, or
    /// the end of the pending messages for [`ALL`]) or `deadline`; true if the deadline
    /// passed.
    fn sleep(s: &mut MutexGuard<'_, State>, key: usize, deadline: Instant) -> bool {
        let cv = Arc::new(Condvar::new());
        s.waiters.push(Waiter {
            key,
            cv: cv.clone(),
        });
        let timed_out = cv.wait_until_deadline(s, deadline);
        // Still registered if nobody woke it (deadline, spurious wake-up).
        if let Some(i) = s.waiters.iter().position(|w| Arc::ptr_eq(&w.cv, &cv)) {
            s.waiters.swap_remove(i);
        }
        timed_out
    }
}

/// Wake each taken waiter (with the tracker's lock released: a woken thread does not
/// block on it).
fn wake(waiters: Vec<Arc<Condvar>>) {
    for cv in waiters {
        cv.notify_one();
    }
}

/// Waiters whose confirms were settled, to wake later ([`ConfirmTracker::resolve_into`]).
#[doc(hidden)]
#[derive(Default)]
pub struct Wakes(Vec<Arc<Condvar>>);

impl Wakes {
    /// Wake every waiter collected so far.
    pub fn wake(&mut self) {
        for cv in self.0.drain(..) {
            cv.notify_one();
        }
    }
}

/// Confirm bookkeeping of one channel on one connection generation; the I/O thread
/// resolves, publishers wait.
#[doc(hidden)]
pub struct ConfirmTracker {
    enabled: AtomicBool,
    state: Mutex<State>,
}

impl Default for ConfirmTracker {
    fn default() -> Self {
        Self::new()
    }
}

impl ConfirmTracker {
    pub fn new() -> Self {
        ConfirmTracker {
            enabled: AtomicBool::new(false),
            state: Mutex::new(State {
                next_seq: 1,
                ..State::default()
            }),
        }
    }

    pub fn enable(&self) {
        self.enabled.store(true, Ordering::Release);
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Take the next sequence number. Call with the channel's publish lock held, so that
    /// numbers follow the order in which frames reach the I/O thread. `bytes` is kept
    /// until the broker confirms, for recovery.
    pub fn register(
        &self,
        want_handle: bool,
        bytes: Option<Arc<Vec<u8>>>,
    ) -> Option<(u64, Option<Arc<AtomicU8>>)> {
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
            bytes,
        });
        Some((seq, slot))
    }

    /// Undo the last registration when the publish could not be queued.
    pub fn unregister(&self, seq: u64) {
        let mut s = self.state.lock();
        if s.pending.back().is_some_and(|e| e.seq == seq) {
            s.pending.pop_back();
            s.next_seq = seq;
            if s.pending.is_empty() && !s.waiters.is_empty() {
                let mut woken = Vec::new();
                s.take_waiters(ALL, &mut woken);
                drop(s);
                wake(woken);
            }
        }
    }

    /// Take over the unconfirmed messages of the previous generation (recovery,
    /// republish policy): each gets a new sequence number and keeps its handle. Returns
    /// the frames to send, in order. Call with the publish lock held.
    pub fn adopt(&self, entries: Vec<Entry>) -> Vec<Arc<Vec<u8>>> {
        let mut s = self.state.lock();
        if s.failure.is_some() {
            // This generation failed already (during recovery): nothing to send; the
            // messages stay in doubt for the next attempt, as if they had been pending.
            if s.kept {
                s.in_doubt.extend(entries);
            } else {
                for e in &entries {
                    if let Some(slot) = &e.slot {
                        slot.store(FAILED, Ordering::Release);
                    }
                }
            }
            return Vec::new();
        }
        let mut out = Vec::with_capacity(entries.len());
        for mut e in entries {
            e.seq = s.next_seq;
            s.next_seq += 1;
            if let Some(b) = &e.bytes {
                out.push(b.clone());
            }
            s.pending.push_back(e);
        }
        out
    }

    /// The highest sequence number taken so far (0 before the first publish): the broker
    /// cannot confirm anything beyond it.
    pub fn last_seq(&self) -> u64 {
        self.state.lock().next_seq - 1
    }

    /// `basic.ack` / `basic.nack` from the broker; returns how many messages it settled.
    pub fn resolve(&self, tag: u64, multiple: bool, ack: bool) -> u64 {
        self.resolve_counted(tag, multiple, ack, |_| {})
    }

    /// [`ConfirmTracker::resolve`], telling `count` how many messages it settled before
    /// any waiter wakes (so a waiter that returns sees the connection's counters
    /// updated).
    pub fn resolve_counted(
        &self,
        tag: u64,
        multiple: bool,
        ack: bool,
        count: impl FnOnce(u64),
    ) -> u64 {
        let mut woken = Wakes::default();
        let settled = self.resolve_into(tag, multiple, ack, count, &mut woken);
        woken.wake();
        settled
    }

    /// [`ConfirmTracker::resolve_counted`], leaving the wake-ups to the caller: the
    /// waiters to wake are added to `woken`, for [`Wakes::wake`] once the caller is done
    /// (the I/O thread wakes publishers at the end of its turn, after it rested, so that
    /// a woken publisher finds the socket free to write its next message itself).
    pub fn resolve_into(
        &self,
        tag: u64,
        multiple: bool,
        ack: bool,
        count: impl FnOnce(u64),
        woken: &mut Wakes,
    ) -> u64 {
        let woken = &mut woken.0;
        let mut s = self.state.lock();
        let outcome = if ack { ACKED } else { NACKED };
        let mut settled = 0;
        // Only the waiters of the settled slots (and `wait_all`'s once nothing is
        // pending) are woken, each on its own condvar.
        let mut settle = |s: &mut State, e: Entry| {
            if !ack {
                s.nacked_since_wait.push(e.seq);
            }
            if let Some(slot) = e.slot {
                slot.store(outcome, Ordering::Release);
                if !s.waiters.is_empty() {
                    s.take_waiters(key_of(&slot), woken);
                }
            }
        };
        if multiple {
            while s.pending.front().is_some_and(|e| e.seq <= tag) {
                settled += 1;
                let e = s.pending.pop_front().expect("front checked");
                settle(&mut s, e);
            }
        } else if let Ok(i) = s.pending.binary_search_by_key(&tag, |e| e.seq) {
            settled = 1;
            let e = s.pending.remove(i).expect("index from search");
            settle(&mut s, e);
        } else {
            crate::trace::warn!("broker confirmed unknown delivery tag {tag}");
        }
        if s.pending.is_empty() && !s.waiters.is_empty() {
            s.take_waiters(ALL, woken);
        }
        count(settled);
        settled
    }

    /// The channel or connection ended: every waiter wakes with `err`. If `keep`, the
    /// unconfirmed messages are kept (their handles stay pending) for recovery to
    /// republish or hand back; otherwise their handles fail.
    pub fn fail(&self, err: Error, keep: bool) {
        let mut s = self.state.lock();
        if s.failure.is_some() {
            return;
        }
        let pending: Vec<Entry> = s.pending.drain(..).collect();
        if keep {
            s.in_doubt = pending;
        } else {
            for e in &pending {
                if let Some(slot) = &e.slot {
                    slot.store(FAILED, Ordering::Release);
                }
            }
        }
        s.failure = Some(err);
        s.kept = keep;
        // Every waiter wakes, whatever it waits for.
        let woken: Vec<_> = s.waiters.drain(..).map(|w| w.cv).collect();
        drop(s);
        wake(woken);
    }

    /// The messages kept at failure (empty unless `fail` was told to keep them).
    pub fn take_in_doubt(&self) -> Vec<Entry> {
        std::mem::take(&mut self.state.lock().in_doubt)
    }

    /// Published messages not yet confirmed (including those kept for recovery).
    pub fn outstanding(&self) -> usize {
        let s = self.state.lock();
        s.pending.len() + s.in_doubt.len()
    }

    /// Wait for one message's outcome; returns the tracker's failure if it fails first.
    pub fn wait_slot(&self, slot: &AtomicU8, deadline: Instant) -> Result<Option<Confirm>> {
        let mut s = self.state.lock();
        loop {
            match outcome(slot) {
                Ok(Some(c)) => return Ok(Some(c)),
                Ok(None) => {}
                // Failed with its channel: say why the channel ended.
                Err(e) if slot.load(Ordering::Acquire) == FAILED => {
                    return Err(s.failure.as_ref().map_or(e, Error::clone));
                }
                Err(e) => return Err(e),
            }
            if let Some(e) = &s.failure {
                return Err(e.clone());
            }
            if State::sleep(&mut s, key_of(slot), deadline)
                && slot.load(Ordering::Acquire) == PENDING
                && s.failure.is_none()
            {
                return Ok(None);
            }
        }
    }

    /// Wait until nothing is outstanding; returns the messages nacked since the last call
    /// (empty if all were acked): the first [`NACKS_LISTED`] sequence numbers in the
    /// order the broker nacked them, and how many more.
    pub fn wait_all(&self, deadline: Instant) -> Result<Nacks> {
        let mut s = self.state.lock();
        loop {
            if let Some(e) = &s.failure {
                return Err(e.clone());
            }
            if s.pending.is_empty() {
                return Ok(std::mem::take(&mut s.nacked_since_wait));
            }
            if State::sleep(&mut s, ALL, deadline) && !s.pending.is_empty() && s.failure.is_none() {
                return Err(Error::Timeout("publisher confirms"));
            }
        }
    }
}

/// The outcome recorded in a confirm slot, if any.
#[doc(hidden)]
pub fn outcome(slot: &AtomicU8) -> Result<Option<Confirm>> {
    match slot.load(Ordering::Acquire) {
        ACKED => Ok(Some(Confirm::Ack)),
        NACKED => Ok(Some(Confirm::Nack)),
        FAILED => Err(Error::ConnectionLost(
            "the link was lost before the broker confirmed this message".into(),
        )),
        HANDED_BACK => Err(Error::ConnectionLost(
            "the link was lost before the broker confirmed this message; it was handed \
             back (see Channel::take_unconfirmed)"
                .into(),
        )),
        _ => Ok(None),
    }
}

#[cfg(all(test, not(lepus_loom)))]
mod tests {
    use super::*;

    /// Recovery adopts unconfirmed messages into a generation that has failed already
    /// (it failed during the recovery): they stay in doubt for the next attempt.
    #[test]
    fn adopting_into_a_failed_tracker_keeps_the_messages_in_doubt() {
        let old = ConfirmTracker::new();
        old.enable();
        let (_, slot) = old.register(true, Some(Arc::new(vec![1, 2, 3]))).unwrap();
        old.fail(Error::ConnectionLost("gone".into()), true);
        let entries = old.take_in_doubt();
        assert_eq!(entries.len(), 1);

        let candidate = ConfirmTracker::new();
        candidate.enable();
        candidate.fail(Error::ConnectionLost("gone too".into()), true);
        assert!(candidate.adopt(entries).is_empty(), "nothing to send");
        let kept = candidate.take_in_doubt();
        assert_eq!(kept.len(), 1, "still in doubt for the next attempt");
        assert_eq!(slot.as_ref().unwrap().load(Ordering::Acquire), PENDING);

        // A tracker that failed for good (not kept) fails them instead.
        let closed = ConfirmTracker::new();
        closed.enable();
        closed.fail(Error::ConnectionClosed, false);
        assert!(closed.adopt(kept).is_empty());
        assert!(closed.take_in_doubt().is_empty());
        assert_eq!(slot.unwrap().load(Ordering::Acquire), FAILED);
    }

    /// A waiter whose deadline passes takes its registration with it: the next resolve
    /// finds nobody to wake, and a later waiter on the same slot is woken by the ack.
    #[test]
    fn a_timed_out_waiter_leaves_no_registration() {
        let t = Arc::new(ConfirmTracker::new());
        t.enable();
        let (seq, slot) = t.register(true, None).unwrap();
        let slot = slot.unwrap();
        let soon = Instant::now() + std::time::Duration::from_millis(20);
        assert_eq!(t.wait_slot(&slot, soon).unwrap(), None, "timed out");
        assert!(t.state.lock().waiters.is_empty());
        let waiter = {
            let (t, slot) = (t.clone(), slot.clone());
            std::thread::spawn(move || {
                t.wait_slot(&slot, Instant::now() + std::time::Duration::from_secs(5))
            })
        };
        let give_up = Instant::now() + std::time::Duration::from_secs(5);
        while t.state.lock().waiters.is_empty() {
            assert!(Instant::now() < give_up, "the waiter never slept");
            std::thread::yield_now();
        }
        t.resolve(seq, false, true);
        assert_eq!(waiter.join().unwrap().unwrap(), Some(Confirm::Ack));
        assert!(t.state.lock().waiters.is_empty());
    }

    /// A resolve says how many messages it settled (the connection's confirmed and
    /// nacked counters add it), and `wait_all` with messages still out returns at its
    /// deadline with a timeout.
    #[test]
    fn resolve_counts_what_it_settles_and_wait_all_times_out() {
        let t = ConfirmTracker::new();
        t.enable();
        for _ in 0..4 {
            t.register(false, None).unwrap();
        }
        let mut counted = 0;
        assert_eq!(t.resolve_counted(3, true, true, |n| counted += n), 3);
        assert_eq!(counted, 3);
        assert_eq!(t.resolve(3, false, true), 0, "settled already");
        let soon = Instant::now() + std::time::Duration::from_millis(20);
        assert!(
            matches!(t.wait_all(soon), Err(Error::Timeout(_))),
            "message 4 is out"
        );
        assert_eq!(t.resolve(4, false, false), 1);
        assert_eq!(t.wait_all(soon).unwrap().sequences, vec![4]);
    }

    /// `wait_all` names every nacked message once: single and multiple nacks, mixed
    /// with acks, in the order the broker sent them.
    #[test]
    fn wait_all_reports_each_nacked_sequence_number_once() {
        let t = ConfirmTracker::new();
        t.enable();
        for _ in 0..6 {
            t.register(false, None).unwrap();
        }
        t.resolve(2, false, false); // nack 2
        t.resolve(1, false, true); // ack 1
        t.resolve(4, true, false); // nack 3 and 4 (2 is settled already)
        t.resolve(6, true, true); // ack 5 and 6
        let far = Instant::now() + std::time::Duration::from_secs(5);
        assert_eq!(t.wait_all(far).unwrap().sequences, vec![2, 3, 4]);
        assert!(t.wait_all(far).unwrap().is_empty(), "reported once");
    }

    /// An application that waits per message and never calls `wait_all` does not make
    /// the tracker keep every nacked sequence number: the list stops at `NACKS_LISTED`
    /// and the rest are counted; the `wait_all` that finally comes names the first ones
    /// and counts the others.
    #[test]
    fn nacks_waited_per_message_keep_the_list_bounded() {
        let t = ConfirmTracker::new();
        t.enable();
        let far = Instant::now() + std::time::Duration::from_secs(5);
        let total = 3 * NACKS_LISTED as u64 + 7;
        for _ in 0..total {
            let (seq, slot) = t.register(true, None).unwrap();
            t.resolve(seq, false, false);
            assert_eq!(
                t.wait_slot(&slot.unwrap(), far).unwrap(),
                Some(Confirm::Nack)
            );
        }
        let s = t.state.lock();
        assert_eq!(s.nacked_since_wait.sequences.len(), NACKS_LISTED, "bounded");
        assert!(s.nacked_since_wait.sequences.capacity() <= 2 * NACKS_LISTED);
        drop(s);
        let nacks = t.wait_all(far).unwrap();
        assert_eq!(
            nacks.sequences,
            (1..=NACKS_LISTED as u64).collect::<Vec<_>>()
        );
        assert_eq!(nacks.unlisted, total - NACKS_LISTED as u64);
        assert!(t.wait_all(far).unwrap().is_empty(), "reported once");

        // A nack after the report is listed again, by its number.
        let (seq, _) = t.register(false, None).unwrap();
        t.resolve(seq, true, false);
        assert_eq!(
            t.wait_all(far).unwrap(),
            Nacks {
                sequences: vec![seq],
                unlisted: 0
            }
        );
    }
}
