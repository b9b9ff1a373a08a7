//! Credentials that expire (OAuth2 tokens and the like): what a provider gives, asked at
//! every connect and reconnect. The secret state of a connection is in secrets.rs, the
//! thread that renews it before it expires in refresher.rs.

use std::time::Duration;

use crate::sync::Arc;

/// A user name and a secret (password or token), with how long the secret stays valid.
///
/// ```no_run
/// use std::time::Duration;
/// use lepus::{ConnectionOptions, Credentials};
/// // A provider asked at every connect and reconnect, and again before the token expires.
/// let opts = ConnectionOptions::from_uri("amqp://rabbit.internal")?
///     .credentials_provider(|| -> Result<Credentials, String> {
///         let token = "eyJ..."; // fetched from your identity provider
///         Ok(Credentials::new("svc-billing", token).expires_in(Duration::from_secs(3600)))
///     });
/// let conn = lepus::Connection::open_with(opts)?;
/// # Ok::<(), lepus::Error>(())
/// ```
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
/// # fn fetch_token() -> Result<(String, u64), String> { Ok(("a-token".into(), 3600)) }
/// let opts = ConnectionOptions::new().credentials_provider(|| {
///     let (token, seconds) = fetch_token()?;
///     Ok(Credentials::new("app", token).expires_in(Duration::from_secs(seconds)))
/// });
/// let conn = lepus::Connection::open_with(opts)?;
/// # Ok::<(), lepus::Error>(())
/// ```
pub trait CredentialsProvider: Send + Sync + 'static {
    /// The credentials to use now. An `Err` fails a connect (with
    /// [`Error::AuthenticationFailed`](crate::Error::AuthenticationFailed)) or a refresh (reported and retried).
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
