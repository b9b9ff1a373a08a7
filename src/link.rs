//! Single-flight recovery bookkeeping: which connection generation is current, whether
//! its failure is being recovered, and who starts the one recovery. Plain state behind
//! the connection's lock, so the model tests can drive it from racing threads.

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
