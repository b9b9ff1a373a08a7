//! TLS options (`amqps://`): what to trust, which client certificate to show, which
//! server name to check; and RabbitMQ's URI parameters for them. The rustls
//! configuration is built from them in `io::tls_config`.

use std::path::PathBuf;

use crate::error::{Error, Result, TlsFailure};
use crate::sync::StdArc as Arc;

/// How a TLS connection is made: which certificates are trusted, which client
/// certificate is shown, which server name is checked.
///
/// The defaults verify the server's certificate against the bundled Mozilla roots
/// (feature `tls-webpki-roots`, on by default) and/or the system's roots (feature
/// `tls-native-roots`), and check that it names the host connected to.
///
/// ```no_run
/// # #[cfg(feature = "tls")] {
/// use lepus::{ConnectionOptions, TlsOptions};
/// let opts = ConnectionOptions::new()
///     .host("rabbit.example.com")
///     .port(5671)
///     .tls(
///         TlsOptions::new()
///             .ca_file("/etc/rabbitmq/ca.pem")
///             .client_cert_files("/etc/app/cert.pem", "/etc/app/key.pem"),
///     );
/// let conn = lepus::Connection::open_with(opts)?;
/// # }
/// # Ok::<(), lepus::Error>(())
/// ```
#[derive(Clone, Default)]
pub struct TlsOptions {
    pub(crate) enabled: bool,
    pub(crate) ca: Vec<Pem>,
    pub(crate) client: Option<(Pem, Pem)>,
    pub(crate) server_name: Option<String>,
    pub(crate) verify_none: bool,
    #[cfg(feature = "tls")]
    pub(crate) config: Option<Arc<rustls::ClientConfig>>,
}

/// PEM data, given in memory or read from a file when connecting (so a renewed file is
/// picked up by the next reconnect).
#[derive(Clone)]
pub(crate) enum Pem {
    File(PathBuf),
    Bytes(Arc<Vec<u8>>),
}

impl std::fmt::Debug for Pem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pem::File(p) => write!(f, "{}", p.display()),
            Pem::Bytes(b) => write!(f, "<{} bytes of PEM>", b.len()),
        }
    }
}

impl std::fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("TlsOptions");
        d.field("enabled", &self.enabled)
            .field("ca", &self.ca)
            .field("client_cert", &self.client.as_ref().map(|c| &c.0))
            .field("server_name", &self.server_name)
            .field("verify_none", &self.verify_none);
        #[cfg(feature = "tls")]
        d.field("custom_config", &self.config.is_some());
        d.finish()
    }
}

impl TlsOptions {
    /// TLS on, with the default roots and server-name check.
    pub fn new() -> Self {
        TlsOptions {
            enabled: true,
            ..Default::default()
        }
    }

    /// Trust the CA certificates in this PEM file (RabbitMQ's `cacertfile`) instead of
    /// the default roots. May be given more than once.
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca.push(Pem::File(path.into()));
        self
    }

    /// Trust the CA certificates in this PEM text instead of the default roots.
    pub fn ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca.push(Pem::Bytes(Arc::new(pem.into())));
        self
    }

    /// Show this client certificate chain and key (PEM files: RabbitMQ's `certfile` and
    /// `keyfile`) when the server asks for one.
    pub fn client_cert_files(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client = Some((Pem::File(cert.into()), Pem::File(key.into())));
        self
    }

    /// Show this client certificate chain and key (PEM text).
    pub fn client_cert_pem(mut self, cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Self {
        self.client = Some((
            Pem::Bytes(Arc::new(cert.into())),
            Pem::Bytes(Arc::new(key.into())),
        ));
        self
    }

    /// Send this name in SNI and check the server's certificate against it instead of
    /// the host connected to (RabbitMQ's `server_name_indication`).
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// **Unsafe: accept any server certificate** (RabbitMQ's `verify=verify_none`).
    ///
    /// The connection is encrypted but not authenticated: anyone on the path can pose
    /// as the broker and read every message and the credentials. For tests against a
    /// throw-away broker only; never in production.
    pub fn danger_accept_invalid_certs(mut self) -> Self {
        self.verify_none = true;
        self
    }

    /// Use this rustls configuration as it is (roots, client certificates, versions,
    /// ALPN...). The other settings of these options are then ignored, except
    /// [`TlsOptions::server_name`].
    #[cfg(feature = "tls")]
    pub fn client_config(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        self.config = Some(config);
        self
    }

    /// True when a client certificate is configured (in these options or in a given
    /// rustls configuration).
    pub(crate) fn has_client_cert(&self) -> bool {
        #[cfg(feature = "tls")]
        if let Some(c) = &self.config {
            return c.client_auth_cert_resolver.has_certs();
        }
        self.client.is_some()
    }
}

/// Apply one `amqps://` query parameter; `Ok(false)` when `key` is not a TLS parameter.
pub(crate) fn apply_query(tls: &mut TlsOptions, key: &str, value: &str) -> Result<bool> {
    let path = || PathBuf::from(value);
    match key {
        "cacertfile" => tls.ca.push(Pem::File(path())),
        "certfile" => {
            let key_file = match tls.client.take() {
                Some((_, k)) => k,
                None => Pem::File(PathBuf::new()),
            };
            tls.client = Some((Pem::File(path()), key_file));
        }
        "keyfile" => {
            let cert = match tls.client.take() {
                Some((c, _)) => c,
                None => Pem::File(PathBuf::new()),
            };
            tls.client = Some((cert, Pem::File(path())));
        }
        "verify" => {
            tls.verify_none = match value {
                "verify_peer" => false,
                "verify_none" => true,
                _ => {
                    return Err(Error::InvalidUri(format!(
                        "verify={value:?}: expected verify_peer or verify_none"
                    )));
                }
            }
        }
        "server_name_indication" => tls.server_name = Some(value.to_string()),
        _ => return Ok(false),
    }
    if !tls.enabled {
        return Err(Error::InvalidUri(format!(
            "{key} is a TLS option: use an amqps:// URI"
        )));
    }
    Ok(true)
}

/// Check what can be checked before connecting (both halves of a client certificate).
pub(crate) fn validate(tls: &TlsOptions) -> Result<()> {
    if let Some((Pem::File(c), Pem::File(k))) = &tls.client
        && (c.as_os_str().is_empty() || k.as_os_str().is_empty())
    {
        return Err(Error::InvalidUri(
            "certfile and keyfile must be given together".into(),
        ));
    }
    Ok(())
}

/// The error for `amqps://` in a build without TLS.
pub(crate) fn disabled() -> Error {
    Error::Tls {
        kind: TlsFailure::NotCompiledIn,
        detail: "lepus was built without its `tls` cargo feature; enable it to use amqps://".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_fill_the_options() {
        let mut t = TlsOptions::new();
        for (k, v) in [
            ("cacertfile", "/ca.pem"),
            ("certfile", "/c.pem"),
            ("keyfile", "/k.pem"),
            ("verify", "verify_none"),
            ("server_name_indication", "rabbit"),
        ] {
            assert!(apply_query(&mut t, k, v).unwrap(), "{k}");
        }
        assert!(!apply_query(&mut t, "heartbeat", "5").unwrap());
        assert!(t.verify_none);
        assert_eq!(t.server_name.as_deref(), Some("rabbit"));
        assert!(t.has_client_cert());
        assert!(validate(&t).is_ok());
        assert!(apply_query(&mut t, "verify", "sometimes").is_err());
    }

    #[test]
    fn half_a_client_certificate_is_refused() {
        let mut t = TlsOptions::new();
        apply_query(&mut t, "certfile", "/c.pem").unwrap();
        assert!(matches!(validate(&t), Err(Error::InvalidUri(_))));
    }

    #[test]
    fn tls_parameters_need_amqps() {
        let mut t = TlsOptions::default();
        assert!(matches!(
            apply_query(&mut t, "cacertfile", "/ca.pem"),
            Err(Error::InvalidUri(_))
        ));
    }

    #[cfg(feature = "tls")]
    use crate::io::tls_config::{build_config, prepare};

    #[cfg(not(feature = "tls"))]
    #[test]
    fn tls_options_without_the_feature_fail_clearly_at_connect() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let opts = crate::ConnectionOptions::new()
            .port(l.local_addr().unwrap().port())
            .tls(TlsOptions::new());
        match crate::io::handshake::connect(&opts) {
            Err(Error::Tls {
                kind: TlsFailure::NotCompiledIn,
                detail,
            }) => assert!(detail.contains("`tls` cargo feature"), "{detail}"),
            Err(other) => panic!("{other:?}"),
            Ok(_) => panic!("connected without TLS support"),
        }
    }

    #[cfg(feature = "tls")]
    #[test]
    fn bad_pem_is_a_configuration_error() {
        let t = TlsOptions::new().ca_pem("not pem");
        match build_config(&t) {
            Err(Error::Tls {
                kind: TlsFailure::Configuration,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        let t = TlsOptions::new().ca_file("/nonexistent/ca.pem");
        assert!(matches!(build_config(&t), Err(Error::Tls { .. })));
    }

    #[cfg(feature = "tls-webpki-roots")]
    #[test]
    fn default_config_builds_with_bundled_roots() {
        assert!(build_config(&TlsOptions::new()).is_ok());
        assert!(prepare(&TlsOptions::new(), "localhost").is_ok());
        assert!(prepare(&TlsOptions::new(), "127.0.0.1").is_ok());
    }
}
