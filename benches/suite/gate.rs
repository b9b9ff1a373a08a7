//! A gate that threads wait at until it opens (once), used by the suite and the peers'
//! binary alike: started consumer threads wait here until every consumer has started,
//! since threads polling while the others still start would be the harness's CPU,
//! counted as startup.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a thread waits at most: a gate never opened (a harness that failed) lets
/// its threads go rather than hang the run.
const MOST: Duration = Duration::from_secs(300);

#[derive(Default)]
pub struct Gate {
    open: Mutex<bool>,
    cv: Condvar,
}

impl Gate {
    /// Wait until the gate opens (or [`MOST`] passed).
    pub fn wait(&self) {
        let until = Instant::now() + MOST;
        let mut open = self.open.lock().expect("gate");
        while !*open {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            open = self.cv.wait_timeout(open, left).expect("gate").0;
        }
    }

    /// Open the gate: every waiting thread goes on, and later ones do not wait.
    pub fn open(&self) {
        *self.open.lock().expect("gate") = true;
        self.cv.notify_all();
    }
}
