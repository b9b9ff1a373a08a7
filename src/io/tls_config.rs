//! The rustls client configuration built from [`TlsOptions`], and the translation of
//! rustls failures into lepus errors.

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

use crate::error::{Error, Result, TlsFailure};
use crate::sync::StdArc as Arc;
use crate::tls::{Pem, TlsOptions, validate};

fn config_error(detail: String) -> Error {
    Error::Tls {
        kind: TlsFailure::Configuration,
        detail,
    }
}

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
            crate::trace::warn!("system root certificates: {e}");
        }
        let (added, ignored) = store.add_parsable_certificates(found.certs);
        crate::trace::debug!("system roots: {added} added, {ignored} ignored");
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
        crate::trace::warn!(
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
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                (
                    TlsFailure::HostnameMismatch,
                    format!("the broker's certificate is not valid for {host:?} ({e})"),
                )
            }
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
