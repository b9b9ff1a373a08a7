//! Deadlines for the test's own side: a body that must finish in time, a blocked call
//! watched from another thread, a condition polled until it holds.

use std::panic::{self, AssertUnwindSafe};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Run `f` on its own thread and fail the test if it takes longer than `limit`. A panic
/// in `f` is raised again here.
pub fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::Builder::new()
        .name("test-body".into())
        .spawn(move || {
            let _ = tx.send(panic::catch_unwind(AssertUnwindSafe(f)));
        })
        .expect("spawn test body");
    match rx.recv_timeout(limit) {
        Ok(Ok(v)) => v,
        Ok(Err(p)) => panic::resume_unwind(p),
        Err(_) => panic!("test did not finish within {limit:?}"),
    }
}

/// A blocking call running on another thread, with the instant it returned.
pub struct Waiter<T> {
    rx: mpsc::Receiver<(T, Instant)>,
}

impl<T: Send + 'static> Waiter<T> {
    /// Start `f` on a new thread.
    pub fn spawn(f: impl FnOnce() -> T + Send + 'static) -> Self {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let v = f();
            let _ = tx.send((v, Instant::now()));
        });
        Waiter { rx }
    }

    /// The result and when it came; panics if it did not come within `timeout`.
    pub fn wait(self, timeout: Duration) -> (T, Instant) {
        self.rx
            .recv_timeout(timeout)
            .unwrap_or_else(|_| panic!("blocked call did not return within {timeout:?}"))
    }
}

/// Poll `f` every 10 ms until it is true or `timeout` passes; returns whether it became true.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiter_reports_the_value_and_when_it_came() {
        let start = Instant::now();
        let (v, at) = Waiter::spawn(|| {
            thread::sleep(Duration::from_millis(20));
            7
        })
        .wait(Duration::from_secs(5));
        assert_eq!(v, 7);
        assert!(at - start >= Duration::from_millis(20));
    }

    #[test]
    #[should_panic(expected = "did not finish within")]
    fn within_fails_a_body_that_overruns() {
        within(Duration::from_millis(20), || {
            thread::sleep(Duration::from_millis(500))
        });
    }

    #[test]
    fn wait_until_gives_up_at_its_deadline() {
        let start = Instant::now();
        assert!(!wait_until(Duration::from_millis(30), || false));
        assert!(start.elapsed() >= Duration::from_millis(30));
        assert!(wait_until(Duration::from_secs(1), || true));
    }
}
