//! Credentials that expire (OAuth2 tokens and the like): a provider asked at every
//! connect and reconnect, and a refresher thread that sends the broker a fresh secret
//! (`connection.update-secret`) before the current one expires.

use std::time::{Duration, Instant};

use crate::connection::ConnectionInner;
use crate::error::{Error, Result};
use crate::recovery::RecoveryEventKind;
use crate::sync::{Arc, Condvar, CondvarExt, Mutex, Weak};
use crate::uri::ConnectionOptions;

/// A user name and a secret (password or token), with how long the secret stays valid.
#[derive(Clone)]
pub struct Credentials {
    pub(crate) username: String,
    pub(crate) secret: String,
    pub(crate) expires_in: Option<Duration>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("secret", &"<hidden>")
            .field("expires_in", &self.expires_in)
            .finish()
    }
}

impl Credentials {
    /// Credentials that do not expire (as far as lepus knows).
    pub fn new(username: impl Into<String>, secret: impl Into<String>) -> Self {
        Credentials {
            username: username.into(),
            secret: secret.into(),
            expires_in: None,
        }
    }

    /// The secret expires this long from now: lepus asks the provider for a new one
    /// when 80 % of that time has passed, and sends it to the broker.
    pub fn expires_in(mut self, d: Duration) -> Self {
        self.expires_in = Some(d);
        self
    }
}

/// Where a connection gets its credentials: asked at every connect and reconnect, and
/// before the current secret expires (when it says it will).
///
/// A closure `Fn() -> Result<Credentials, String>` is a provider.
///
/// ```no_run
/// use std::time::Duration;
/// use lepus::{ConnectionOptions, Credentials};
/// # fn fetch_token() -> Result<(String, u64), String> { unimplemented!() }
/// let opts = ConnectionOptions::new().credentials_provider(|| {
///     let (token, seconds) = fetch_token()?;
///     Ok(Credentials::new("app", token).expires_in(Duration::from_secs(seconds)))
/// });
/// let conn = lepus::Connection::open_with(opts)?;
/// # Ok::<(), lepus::Error>(())
/// ```
pub trait CredentialsProvider: Send + Sync + 'static {
    /// The credentials to use now. An `Err` fails a connect (with
    /// [`Error::AuthenticationFailed`]) or a refresh (reported and retried).
    fn credentials(&self) -> std::result::Result<Credentials, String>;
}

impl<F> CredentialsProvider for F
where
    F: Fn() -> std::result::Result<Credentials, String> + Send + Sync + 'static,
{
    fn credentials(&self) -> std::result::Result<Credentials, String> {
        self()
    }
}

/// The provider as a field of the options.
#[derive(Clone)]
pub(crate) struct ProviderRef(pub(crate) Arc<dyn CredentialsProvider>);

impl std::fmt::Debug for ProviderRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CredentialsProvider")
    }
}

/// When the refresher first retries a failed refresh; it doubles up to a quarter of the
/// time left.
const RETRY_FIRST: Duration = Duration::from_millis(500);
/// Share of a secret's lifetime after which it is refreshed.
const REFRESH_AT: f64 = 0.8;

/// The secret state of one `Connection`, across its generations.
pub(crate) struct Secrets {
    provider: Option<ProviderRef>,
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

    fn schedule(&self, expires_in: Option<Duration>) {
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
    fn wait_due(&self) -> bool {
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

    fn retry_later(&self, delay: Duration) {
        let mut s = self.state.lock();
        s.refresh_at = Some(Instant::now() + delay);
    }

    fn time_left(&self) -> Option<Duration> {
        let s = self.state.lock();
        s.expires_at
            .map(|at| at.saturating_duration_since(Instant::now()))
    }
}

/// Start the refresher of a connection whose provider may report expiry. It holds the
/// connection weakly and ends when the connection is closed or dropped.
pub(crate) fn start_refresher(inner: &Arc<ConnectionInner>, secrets: Arc<Secrets>) {
    if secrets.provider.is_none() {
        return;
    }
    let weak = Arc::downgrade(inner);
    let spawned = std::thread::Builder::new()
        .name("lepus-credentials".into())
        .spawn(move || refresh_loop(&weak, &secrets));
    if let Err(e) = spawned {
        log::error!("could not start the credentials refresher: {e}");
    }
}

fn refresh_loop(weak: &Weak<ConnectionInner>, secrets: &Secrets) {
    let mut retry = RETRY_FIRST;
    while secrets.wait_due() {
        let Some(inner) = weak.upgrade() else {
            return;
        };
        match refresh_once(&inner, secrets) {
            Ok(expires_in) => {
                retry = RETRY_FIRST;
                inner.event(
                    inner.generation_number(),
                    RecoveryEventKind::SecretRefreshed { expires_in },
                );
            }
            Err(e) => {
                log::warn!("credentials refresh failed (retrying in {retry:?}): {e}");
                inner.event(
                    inner.generation_number(),
                    RecoveryEventKind::SecretRefreshFailed(e.to_string()),
                );
                // Retry soon, but not in a busy loop; never later than a quarter of the
                // time the current secret has left.
                let cap = secrets
                    .time_left()
                    .map(|d| (d / 4).max(Duration::from_millis(100)))
                    .unwrap_or(Duration::from_secs(30));
                secrets.retry_later(retry.min(cap));
                retry = (retry * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Ask the provider and send the new secret on the current connection.
fn refresh_once(inner: &ConnectionInner, secrets: &Secrets) -> Result<Option<Duration>> {
    let Some(p) = &secrets.provider else {
        return Ok(None);
    };
    let c =
        p.0.credentials()
            .map_err(|e| Error::AuthenticationFailed(format!("credentials provider: {e}")))?;
    let deadline = Instant::now() + inner.opts.operation_timeout;
    inner.update_secret(&c.secret, "lepus: scheduled credentials refresh", deadline)?;
    secrets.schedule(c.expires_in);
    log::info!(
        "credentials refreshed (valid for {:?})",
        c.expires_in.unwrap_or_default()
    );
    Ok(c.expires_in)
}
