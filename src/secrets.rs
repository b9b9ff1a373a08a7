//! The secret state of one connection across its generations: the credentials each
//! connect logs in with (from the provider, or the secret last updated) and when the
//! current secret is to be refreshed (refresher.rs does it).

use std::time::{Duration, Instant};

use crate::credentials::ProviderRef;
use crate::error::{Error, Result};
use crate::options::ConnectionOptions;
use crate::sync::{Arc, Condvar, CondvarExt, Mutex};

/// Share of a secret's lifetime after which it is refreshed.
const REFRESH_AT: f64 = 0.8;

/// The secret state of one `Connection`, across its generations.
pub(crate) struct Secrets {
    pub(crate) provider: Option<ProviderRef>,
    state: Mutex<State>,
    cv: Condvar,
}

struct State {
    /// The secret last sent with `update-secret`: used by reconnects without a provider.
    latest: Option<String>,
    /// When the current secret expires and when to refresh it.
    expires_at: Option<Instant>,
    refresh_at: Option<Instant>,
    stopped: bool,
}

impl Secrets {
    pub(crate) fn new(opts: &ConnectionOptions) -> Arc<Secrets> {
        Arc::new(Secrets {
            provider: opts.credentials_provider.clone(),
            state: Mutex::new(State {
                latest: None,
                expires_at: None,
                refresh_at: None,
                stopped: false,
            }),
            cv: Condvar::new(),
        })
    }

    /// The options to connect with now: the provider's credentials, or the secret last
    /// updated.
    pub(crate) fn resolve(&self, opts: &ConnectionOptions) -> Result<ConnectionOptions> {
        let mut opts = opts.clone();
        match &self.provider {
            Some(p) => {
                let c = p.0.credentials().map_err(|e| {
                    Error::AuthenticationFailed(format!("the credentials provider failed: {e}"))
                })?;
                if c.expires_in.is_some_and(|d| d.is_zero()) {
                    return Err(Error::AuthenticationFailed(format!(
                        "the credentials provider gave a secret for {:?} that has already expired",
                        c.username
                    )));
                }
                opts.username = c.username;
                opts.password = c.secret;
                self.schedule(c.expires_in);
            }
            None => {
                if let Some(s) = &self.state.lock().latest {
                    opts.password = s.clone();
                }
            }
        }
        Ok(opts)
    }

    /// Remember a secret the broker accepted.
    pub(crate) fn updated(&self, secret: &str) {
        self.state.lock().latest = Some(secret.to_string());
    }

    pub(crate) fn schedule(&self, expires_in: Option<Duration>) {
        let now = Instant::now();
        let mut s = self.state.lock();
        s.expires_at = expires_in.map(|d| now + d);
        s.refresh_at = expires_in.map(|d| now + d.mul_f64(REFRESH_AT));
        self.cv.notify_all();
    }

    /// No more refreshes (the connection is closed).
    pub(crate) fn stop(&self) {
        self.state.lock().stopped = true;
        self.cv.notify_all();
    }

    /// Wait until a refresh is due; false when stopped.
    pub(crate) fn wait_due(&self) -> bool {
        let mut s = self.state.lock();
        loop {
            if s.stopped {
                return false;
            }
            match s.refresh_at {
                Some(at) if Instant::now() >= at => return true,
                Some(at) => {
                    self.cv.wait_until_deadline(&mut s, at);
                }
                None => self.cv.wait(&mut s),
            }
        }
    }

    pub(crate) fn retry_later(&self, delay: Duration) {
        let mut s = self.state.lock();
        s.refresh_at = Some(Instant::now() + delay);
    }

    pub(crate) fn time_left(&self) -> Option<Duration> {
        let s = self.state.lock();
        s.expires_at
            .map(|at| at.saturating_duration_since(Instant::now()))
    }
}
