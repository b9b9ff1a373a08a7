//! Single-flight recovery bookkeeping: which connection generation is current, whether
//! its failure is being recovered, and who starts the one recovery (`LinkState`, plain
//! state), and the connection's lock and wake-ups around it that every handle waits on
//! (`LinkCell`: current / wait_for / install / give_up / close). Generic over the
//! generation, so the model tests run this code with loom.

use std::time::{Duration, Instant};

use crate::sync::{AtomicBool, Condvar, CondvarExt, Mutex, MutexGuard, Ordering};

/// What the end of a generation's I/O thread leads to.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Start the recovery (exactly one caller per failure gets this).
    StartRecovery,
    /// No recovery: the connection is dead (or closed).
    Terminal,
    /// Nothing to do: an old generation, a recovery candidate, or already started.
    Nothing,
}

/// The single-flight state of one connection.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    current: u64,
    recovering: bool,
    recovery_started: bool,
    failed_candidate: u64,
    terminal: bool,
}

impl Default for LinkState {
    fn default() -> Self {
        Self::new()
    }
}

impl LinkState {
    /// Generation 1 is current and healthy.
    pub fn new() -> Self {
        LinkState {
            current: 1,
            recovering: false,
            recovery_started: false,
            failed_candidate: 0,
            terminal: false,
        }
    }

    /// The installed generation.
    pub fn current(&self) -> u64 {
        self.current
    }

    /// A failure of the installed generation is being recovered.
    pub fn is_recovering(&self) -> bool {
        self.recovering
    }

    /// Nothing will recover any more.
    pub fn is_terminal(&self) -> bool {
        self.terminal
    }

    /// Generation `g` is failing; `recoverable` says whether this kind of failure is
    /// recovered (and recovery is on and nobody closed the connection). Returns true if
    /// a recovery will follow, so that waiters hear a recoverable error.
    pub fn failing(&mut self, g: u64, recoverable: bool) -> bool {
        if g > self.current {
            // A candidate opened by the running recovery: that recovery carries on.
            self.failed_candidate = self.failed_candidate.max(g);
            return recoverable;
        }
        if !recoverable || g < self.current || self.terminal {
            return false;
        }
        self.recovering = true;
        true
    }

    /// The I/O thread of generation `g` has ended.
    pub fn ended(&mut self, g: u64, closed: bool) -> Ended {
        if g != self.current {
            return Ended::Nothing;
        }
        if !self.recovering || closed {
            self.terminal = true;
            return Ended::Terminal;
        }
        if self.recovery_started {
            return Ended::Nothing;
        }
        self.recovery_started = true;
        Ended::StartRecovery
    }

    /// The recovery wants to make generation `g` current; refused if `g` failed
    /// meanwhile (`failed_now` or recorded by [`LinkState::failing`]).
    pub fn install(&mut self, g: u64, failed_now: bool) -> bool {
        if failed_now || self.failed_candidate >= g || g <= self.current || self.terminal {
            return false;
        }
        self.current = g;
        self.recovering = false;
        self.recovery_started = false;
        true
    }

    /// The recovery gave up.
    pub fn give_up(&mut self) {
        self.recovering = false;
        self.terminal = true;
    }
}

/// What the connection's lock needs of one generation (a TCP connection and its I/O
/// thread).
#[doc(hidden)]
pub trait LinkGen: Clone {
    /// Why a generation or the connection ended.
    type Error: Clone;
    /// Its number (1, 2, ...).
    fn number(&self) -> u64;
    /// Its link failed. Set only after the owner heard of the failure (and decided
    /// whether a recovery follows), so that `will_recover` is right once this is true.
    fn is_failed(&self) -> bool;
    /// Its failure will be followed by a recovery.
    fn will_recover(&self) -> bool;
    /// Why it failed.
    fn error(&self) -> Self::Error;
}

/// The state under the connection's lock.
#[doc(hidden)]
pub struct Link<G, E> {
    /// The installed generation.
    pub current: G,
    /// Single-flight recovery bookkeeping (numbers and flags only).
    pub flight: LinkState,
    /// Why the connection is dead for good, once it is.
    pub terminal: Option<E>,
}

/// The connection's lock, its condition variable and its closed / dead flags: where
/// handles wait through a recovery and what wakes them.
#[doc(hidden)]
pub struct LinkCell<G: LinkGen> {
    link: Mutex<Link<G, G::Error>>,
    cv: Condvar,
    closed: AtomicBool,
    /// Mirrors `terminal.is_some()`, so that hot paths (a pool checking its channels
    /// under its own lock) need not take the link lock.
    dead: AtomicBool,
}

impl<G: LinkGen> LinkCell<G> {
    /// Generation `current` (number 1) is installed and healthy.
    pub fn new(current: G) -> Self {
        LinkCell {
            link: Mutex::new(Link {
                current,
                flight: LinkState::new(),
                terminal: None,
            }),
            cv: Condvar::new(),
            closed: AtomicBool::new(false),
            dead: AtomicBool::new(false),
        }
    }

    /// The state under the lock.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Link<G, G::Error>> {
        self.link.lock()
    }

    /// Closed by the application.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Closed, or lost for good: nothing on it will work again.
    pub fn is_dead(&self) -> bool {
        self.is_closed() || self.dead.load(Ordering::Acquire)
    }

    /// The usable generation, waiting for a recovery in progress until `deadline`;
    /// `closed` is the error once the connection is closed.
    pub fn current(&self, deadline: Instant, closed: G::Error) -> Result<G, G::Error> {
        let mut link = self.link.lock();
        loop {
            if self.is_closed() {
                return Err(closed);
            }
            if let Some(t) = &link.terminal {
                return Err(t.clone());
            }
            let g = link.current.clone();
            if !g.is_failed() {
                return Ok(g);
            }
            // Right only because the owner heard of the failure before the flag was
            // set (`LinkGen::is_failed`): else a recovering link looks dead here.
            if !g.will_recover() {
                return Err(g.error());
            }
            if self.cv.wait_until_deadline(&mut link, deadline) {
                return Err(g.error());
            }
        }
    }

    /// Wait until `done()` holds, or the connection is closed (`closed`) or dead, or
    /// `deadline` (`lost()`). Whoever makes `done()` true calls [`LinkCell::notify`].
    pub fn wait_for(
        &self,
        done: impl Fn() -> bool,
        deadline: Instant,
        lost: impl Fn() -> G::Error,
        closed: G::Error,
    ) -> Result<(), G::Error> {
        let mut link = self.link.lock();
        loop {
            if done() {
                return Ok(());
            }
            if self.is_closed() {
                return Err(closed);
            }
            if let Some(t) = &link.terminal {
                return Err(t.clone());
            }
            if self.cv.wait_until_deadline(&mut link, deadline) {
                return if done() { Ok(()) } else { Err(lost()) };
            }
        }
    }

    /// Wake every waiter to look again. Taking the lock orders the wake-up after a
    /// waiter's check: without it the wake-up can fall between check and wait.
    pub fn notify(&self) {
        let _l = self.link.lock();
        self.cv.notify_all();
    }

    /// Sleep for `d` unless the connection is closed meanwhile (then true).
    pub fn sleep_unless_closed(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut link = self.link.lock();
        while !self.is_closed() {
            if self.cv.wait_until_deadline(&mut link, deadline) {
                break;
            }
        }
        self.is_closed()
    }

    /// Make a recovered generation current. Refused (false) if it failed meanwhile, or
    /// if the connection was closed: `close` took the generation current then to close
    /// it, so nobody would close this one (the recovery closes a refused candidate).
    pub fn install(&self, g: G) -> bool {
        let mut link = self.link.lock();
        if self.is_closed() || !link.flight.install(g.number(), g.is_failed()) {
            return false;
        }
        link.current = g;
        self.cv.notify_all();
        true
    }

    /// Recovery is over without a connection: the connection is dead with `err`.
    pub fn give_up(&self, err: G::Error) {
        let mut link = self.link.lock();
        link.flight.give_up();
        if link.terminal.is_none() {
            link.terminal = Some(err);
            self.dead.store(true, Ordering::Release);
        }
        self.cv.notify_all();
    }

    /// Mark the connection closed and wake every waiter; the generation to close, or
    /// `None` if it was closed already.
    pub fn close(&self) -> Option<G> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return None;
        }
        self.notify();
        Some(self.link.lock().current.clone())
    }

    /// Generation `g` is failing; `recoverable`: this kind of failure is recovered (and
    /// recovery is on). `None` if no recovery follows, else whether `g` is a candidate
    /// of the running recovery (not yet installed).
    pub fn failing(&self, g: u64, recoverable: bool) -> Option<bool> {
        let recoverable = recoverable && !self.is_closed();
        let mut link = self.link.lock();
        let candidate = g > link.flight.current();
        link.flight.failing(g, recoverable).then_some(candidate)
    }

    /// A failure of the installed generation is being recovered.
    pub fn is_recovering(&self) -> bool {
        self.link.lock().flight.is_recovering()
    }

    /// The I/O thread of generation `g` ended with `err`: true if the caller must start
    /// the recovery (exactly one caller per failure); a terminal end wakes every waiter.
    pub fn ended(&self, g: u64, err: G::Error) -> bool {
        let mut link = self.link.lock();
        match link.flight.ended(g, self.is_closed()) {
            Ended::Nothing => false,
            Ended::Terminal => {
                if link.terminal.is_none() && !self.is_closed() {
                    link.terminal = Some(err);
                    self.dead.store(true, Ordering::Release);
                }
                self.cv.notify_all();
                false
            }
            Ended::StartRecovery => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_failure_starts_one_recovery_and_a_new_failure_another() {
        let mut l = LinkState::new();
        assert!(l.failing(1, true));
        assert!(l.failing(1, true));
        assert_eq!(l.ended(1, false), Ended::StartRecovery);
        assert_eq!(l.ended(1, false), Ended::Nothing);
        // the candidate fails before it is installed: not confused with generation 1
        assert!(l.failing(2, true));
        assert_eq!(l.ended(2, false), Ended::Nothing);
        assert!(!l.install(2, false));
        assert!(l.install(3, false));
        assert!(l.failing(3, true));
        assert!(!l.failing(1, true), "a stale generation is ignored");
        assert_eq!(l.ended(3, false), Ended::StartRecovery);
    }

    #[test]
    fn unrecoverable_or_closed_is_terminal() {
        let mut l = LinkState::new();
        assert!(!l.failing(1, false));
        assert_eq!(l.ended(1, false), Ended::Terminal);
        let mut l = LinkState::new();
        assert!(l.failing(1, true));
        assert_eq!(l.ended(1, true), Ended::Terminal);
    }
}
