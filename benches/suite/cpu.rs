//! Client CPU time from `getrusage`: user + system time of this process (or of one
//! thread), and its context switches, read before and after a measured interval. A
//! process's figure is exact for the calling thread and may lag by up to a scheduler
//! tick for another thread running at that instant: runs of a few ms of CPU are coarse.
//! Shared with benches/peers (included there by path), so that every client is
//! measured the same way, each in its own process.

// Shared by the suite, the peers and confirm_profile.rs; each uses a part of it.
#![allow(dead_code)]

use nix::sys::resource::{UsageWho, getrusage};

/// CPU time and context switches at one instant (cumulative since the process or thread
/// started).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// User time, µs.
    pub user_us: f64,
    /// System time, µs.
    pub sys_us: f64,
    /// Voluntary context switches (a thread blocked: a wake-up follows).
    pub vcsw: u64,
    /// Involuntary context switches (preempted).
    pub ivcsw: u64,
}

impl Usage {
    /// User + system time, µs.
    pub fn cpu_us(&self) -> f64 {
        self.user_us + self.sys_us
    }

    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &Usage) -> Usage {
        Usage {
            user_us: self.user_us - earlier.user_us,
            sys_us: self.sys_us - earlier.sys_us,
            vcsw: self.vcsw.saturating_sub(earlier.vcsw),
            ivcsw: self.ivcsw.saturating_sub(earlier.ivcsw),
        }
    }

    /// `self` and `other` together (threads of one client).
    pub fn plus(&self, other: &Usage) -> Usage {
        Usage {
            user_us: self.user_us + other.user_us,
            sys_us: self.sys_us + other.sys_us,
            vcsw: self.vcsw + other.vcsw,
            ivcsw: self.ivcsw + other.ivcsw,
        }
    }

    /// `self` less `other` (a helper thread's share of a process's figure).
    pub fn minus(&self, other: &Usage) -> Usage {
        Usage {
            user_us: (self.user_us - other.user_us).max(0.0),
            sys_us: (self.sys_us - other.sys_us).max(0.0),
            vcsw: self.vcsw.saturating_sub(other.vcsw),
            ivcsw: self.ivcsw.saturating_sub(other.ivcsw),
        }
    }
}

fn read(who: UsageWho) -> Usage {
    match getrusage(who) {
        Ok(u) => {
            let us = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 * 1e6 + t.tv_usec() as f64;
            Usage {
                user_us: us(u.user_time()),
                sys_us: us(u.system_time()),
                vcsw: u.voluntary_context_switches() as u64,
                ivcsw: u.involuntary_context_switches() as u64,
            }
        }
        // getrusage cannot fail for these arguments on Linux; a NaN shows up in the report
        // rather than a made-up zero.
        Err(_) => Usage {
            user_us: f64::NAN,
            sys_us: f64::NAN,
            vcsw: 0,
            ivcsw: 0,
        },
    }
}

/// This process, every thread (including those that have exited).
pub fn process() -> Usage {
    read(UsageWho::RUSAGE_SELF)
}

/// The calling thread only. The CPU time comes from `CLOCK_THREAD_CPUTIME_ID` (the
/// scheduler's runtime, brought up to date when read): `getrusage(RUSAGE_THREAD)` and
/// /proc/thread-self/schedstat leave out the calling thread's running slice, so a thread
/// that writes for a few ms without being descheduled reads the same before and after.
/// The user/system split is not known there: the whole time is in `user_us`, `sys_us` is
/// 0. Context switches are getrusage's.
pub fn thread() -> Usage {
    let mut u = read(UsageWho::RUSAGE_THREAD);
    if let Ok(t) = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID) {
        u.user_us = t.tv_sec() as f64 * 1e6 + t.tv_nsec() as f64 / 1e3;
        u.sys_us = 0.0;
    }
    u
}
