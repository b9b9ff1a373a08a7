//! TLS options (`amqps://`), the rustls client configuration built from them, and the
//! translation of rustls failures into lepus errors.

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
    ca: Vec<Pem>,
    client: Option<(Pem, Pem)>,
    pub(crate) server_name: Option<String>,
    verify_none: bool,
    #[cfg(feature = "tls")]
    config: Option<Arc<rustls::ClientConfig>>,
}

/// PEM data, given in memory or read from a file when connecting (so a renewed file is
/// picked up by the next reconnect).
#[derive(Clone)]
enum Pem {
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
    if let Some((Pem::File(c), Pem::File(k))) = &tls.client {
        if c.as_os_str().is_empty() || k.as_os_str().is_empty() {
            return Err(Error::InvalidUri(
                "certfile and keyfile must be given together".into(),
            ));
        }
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

#[cfg(feature = "tls")]
fn config_error(detail: String) -> Error {
    Error::Tls {
        kind: TlsFailure::Configuration,
        detail,
    }
}

#[cfg(feature = "tls")]
pub(crate) use with_rustls::*;

#[cfg(feature = "tls")]
mod with_rustls {
    use std::sync::atomic::{AtomicBool, Ordering};

    use rustls::client::ResolvesClientCert;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
    use rustls::{
        AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore,
        SignatureScheme,
    };

    use super::*;

    /// What one connection attempt needs: the configuration and what it tells later.
    pub(crate) struct Prepared {
        pub(crate) config: Arc<ClientConfig>,
        pub(crate) server_name: ServerName<'static>,
        /// Set when the server asked for a client certificate we do not have.
        pub(crate) cert_requested: Arc<AtomicBool>,
    }

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn certs(pem: &Pem, what: &str) -> Result<Vec<CertificateDer<'static>>> {
        let parsed: std::result::Result<Vec<_>, _> = match pem {
            Pem::File(p) => CertificateDer::pem_file_iter(p)
                .map_err(|e| config_error(format!("{what} {}: {e}", p.display())))?
                .collect(),
            Pem::Bytes(b) => CertificateDer::pem_slice_iter(b).collect(),
        };
        let v = parsed.map_err(|e| config_error(format!("{what} {pem:?}: {e}")))?;
        if v.is_empty() {
            return Err(config_error(format!("{what} {pem:?} holds no certificate")));
        }
        Ok(v)
    }

    fn key(pem: &Pem) -> Result<PrivateKeyDer<'static>> {
        match pem {
            Pem::File(p) => PrivateKeyDer::from_pem_file(p),
            Pem::Bytes(b) => PrivateKeyDer::from_pem_slice(b),
        }
        .map_err(|e| config_error(format!("client key {pem:?}: {e}")))
    }

    fn roots(tls: &TlsOptions) -> Result<RootCertStore> {
        let mut store = RootCertStore::empty();
        for pem in &tls.ca {
            for c in certs(pem, "CA file")? {
                store
                    .add(c)
                    .map_err(|e| config_error(format!("CA file {pem:?}: {e}")))?;
            }
        }
        if !tls.ca.is_empty() {
            return Ok(store);
        }
        #[cfg(feature = "tls-webpki-roots")]
        store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        #[cfg(feature = "tls-native-roots")]
        {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                log::warn!("system root certificates: {e}");
            }
            let (added, ignored) = store.add_parsable_certificates(found.certs);
            log::debug!("system roots: {added} added, {ignored} ignored");
        }
        if store.is_empty() {
            return Err(config_error(
                "no root certificates: give a CA file or enable the tls-webpki-roots or \
                 tls-native-roots feature"
                    .into(),
            ));
        }
        Ok(store)
    }

    /// The configuration from the options (files are read now, at each connect).
    pub(crate) fn build_config(tls: &TlsOptions) -> Result<Arc<ClientConfig>> {
        if let Some(c) = &tls.config {
            return Ok(c.clone());
        }
        validate(tls)?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| config_error(e.to_string()))?;
        let builder = if tls.verify_none {
            log::warn!(
                "TLS certificate verification is OFF (verify_none): the broker is not authenticated"
            );
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(
                    provider().signature_verification_algorithms,
                )))
        } else {
            builder.with_root_certificates(roots(tls)?)
        };
        let config = match &tls.client {
            Some((c, k)) => builder
                .with_client_auth_cert(certs(c, "client certificate")?, key(k)?)
                .map_err(|e| config_error(format!("client certificate and key: {e}")))?,
            None => builder.with_no_client_auth(),
        };
        Ok(Arc::new(config))
    }

    /// Everything one connection attempt to `host` needs.
    pub(crate) fn prepare(tls: &TlsOptions, host: &str) -> Result<Prepared> {
        let base = build_config(tls)?;
        let name = tls.server_name.as_deref().unwrap_or(host);
        let server_name = ServerName::try_from(name.to_string())
            .map_err(|e| config_error(format!("server name {name:?}: {e}")))?;
        let cert_requested = Arc::new(AtomicBool::new(false));
        let config = if base.client_auth_cert_resolver.has_certs() {
            base
        } else {
            // Without a certificate of our own, note whether the server asks for one, so
            // that its refusal can be told apart from other failures.
            let mut c = (*base).clone();
            c.client_auth_cert_resolver = Arc::new(NoCertificate(cert_requested.clone()));
            Arc::new(c)
        };
        Ok(Prepared {
            config,
            server_name,
            cert_requested,
        })
    }

    #[derive(Debug)]
    struct NoCertificate(Arc<AtomicBool>);

    impl ResolvesClientCert for NoCertificate {
        fn resolve(
            &self,
            _hints: &[&[u8]],
            _schemes: &[SignatureScheme],
        ) -> Option<Arc<rustls::sign::CertifiedKey>> {
            self.0.store(true, Ordering::Relaxed);
            None
        }
        fn has_certs(&self) -> bool {
            false
        }
    }

    /// `verify_none`: every certificate is accepted; signatures are still checked so
    /// that the handshake itself is sound.
    #[derive(Debug)]
    struct AcceptAnyCert(WebPkiSupportedAlgorithms);

    impl ServerCertVerifier for AcceptAnyCert {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp: &[u8],
            _now: UnixTime,
        ) -> std::result::Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.supported_schemes()
        }
    }

    /// The lepus error for a rustls failure; `cert_requested` says whether the server
    /// asked for a client certificate we did not have.
    pub(crate) fn classify(e: &rustls::Error, cert_requested: bool, host: &str) -> Error {
        use rustls::Error as R;
        let (kind, detail) = match e {
            R::InvalidCertificate(c) => match c {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => (
                    TlsFailure::UnknownCa,
                    format!(
                        "the broker's certificate is not signed by a trusted CA ({e}); give \
                         the broker's CA with cacertfile / TlsOptions::ca_file"
                    ),
                ),
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => (
                    TlsFailure::HostnameMismatch,
                    format!("the broker's certificate is not valid for {host:?} ({e})"),
                ),
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => (
                    TlsFailure::CertificateExpired,
                    format!("the broker's certificate has expired ({e})"),
                ),
                _ => (
                    TlsFailure::InvalidCertificate,
                    format!("the broker's certificate was refused: {e}"),
                ),
            },
            R::AlertReceived(AlertDescription::CertificateRequired) => (
                TlsFailure::ClientCertificateRequired,
                "the broker requires a client certificate and none was given (certfile / \
                 keyfile, TlsOptions::client_cert_files)"
                    .into(),
            ),
            R::AlertReceived(
                a @ (AlertDescription::CertificateExpired
                | AlertDescription::UnknownCA
                | AlertDescription::BadCertificate
                | AlertDescription::CertificateRevoked
                | AlertDescription::CertificateUnknown
                | AlertDescription::AccessDenied),
            ) => (
                TlsFailure::ClientCertificateRefused,
                format!("the broker refused our client certificate (alert {a:?})"),
            ),
            R::AlertReceived(a) if cert_requested => (
                TlsFailure::ClientCertificateRequired,
                format!(
                    "the broker asked for a client certificate, none was given, and it \
                     ended the handshake (alert {a:?})"
                ),
            ),
            R::InvalidMessage(_) | R::InappropriateMessage { .. } => (
                TlsFailure::NotTlsServer,
                format!("the peer does not speak TLS ({e}); is this a plaintext port?"),
            ),
            _ => (TlsFailure::Other, e.to_string()),
        };
        Error::Tls { kind, detail }
    }

    /// The peer closed the connection during or right after the TLS handshake.
    pub(crate) fn classify_eof(cert_requested: bool) -> Error {
        if cert_requested {
            Error::Tls {
                kind: TlsFailure::ClientCertificateRequired,
                detail: "the broker asked for a client certificate, none was given, and it \
                         closed the connection"
                    .into(),
            }
        } else {
            Error::Tls {
                kind: TlsFailure::Other,
                detail: "the peer closed the connection during the TLS handshake".into(),
            }
        }
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
