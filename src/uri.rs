//! `amqp://` URIs and [`ConnectionOptions`].

use std::time::Duration;

use crate::credentials::{CredentialsProvider, ProviderRef};
use crate::error::{Error, Result};
use crate::protocol::table::{DEFAULT_MAX_TABLE_DEPTH, FieldTable, MAX_TABLE_DEPTH_CAP};
use crate::recovery::RecoveryOptions;
use crate::tls::{self, TlsOptions};

/// SASL mechanism used to log in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum AuthMechanism {
    /// `PLAIN` (the default).
    #[default]
    Plain,
    /// `AMQPLAIN`.
    AmqPlain,
    /// `EXTERNAL`: the broker takes the identity from the TLS client certificate
    /// (RabbitMQ's `rabbitmq_auth_mechanism_ssl` plugin; the user is the certificate's
    /// CN by default). User name and password are not sent.
    External,
}

impl AuthMechanism {
    pub(crate) fn name(self) -> &'static str {
        match self {
            AuthMechanism::Plain => "PLAIN",
            AuthMechanism::AmqPlain => "AMQPLAIN",
            AuthMechanism::External => "EXTERNAL",
        }
    }
}

/// Everything a connection is opened with. Build it with [`ConnectionOptions::new`] and
/// the setters, or parse it from a URI with [`ConnectionOptions::from_uri`].
#[derive(Debug, Clone)]
pub struct ConnectionOptions {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) vhost: String,
    pub(crate) username: String,
    pub(crate) password: String,
    pub(crate) auth: AuthMechanism,
    pub(crate) heartbeat: u16,
    pub(crate) frame_max: u32,
    pub(crate) channel_max: u16,
    pub(crate) connection_timeout: Duration,
    pub(crate) connection_name: Option<String>,
    pub(crate) client_properties: FieldTable,
    pub(crate) operation_timeout: Duration,
    pub(crate) max_message_size: u64,
    pub(crate) max_table_depth: usize,
    pub(crate) close_timeout: Duration,
    pub(crate) more_addresses: Vec<(String, u16)>,
    pub(crate) recovery: RecoveryOptions,
    pub(crate) tls: TlsOptions,
    pub(crate) credentials_provider: Option<ProviderRef>,
    /// SASL mechanisms in order of preference; empty: `auth` alone.
    pub(crate) auth_mechanisms: Vec<AuthMechanism>,
}

impl Default for ConnectionOptions {
    fn default() -> Self {
        ConnectionOptions {
            host: "127.0.0.1".into(),
            port: 5672,
            vhost: "/".into(),
            username: "guest".into(),
            password: "guest".into(),
            auth: AuthMechanism::Plain,
            heartbeat: 60,
            frame_max: 131_072,
            channel_max: 2047,
            connection_timeout: Duration::from_secs(10),
            connection_name: None,
            client_properties: FieldTable::new(),
            operation_timeout: Duration::from_secs(30),
            max_message_size: 128 * 1024 * 1024,
            max_table_depth: DEFAULT_MAX_TABLE_DEPTH,
            close_timeout: Duration::from_secs(5),
            more_addresses: Vec::new(),
            recovery: RecoveryOptions::default(),
            tls: TlsOptions::default(),
            credentials_provider: None,
            auth_mechanisms: Vec::new(),
        }
    }
}

impl ConnectionOptions {
    /// Defaults: `amqp://guest:guest@127.0.0.1:5672/`, heartbeat 60 s, frame_max 128 KiB,
    /// channel_max 2047, connection timeout 10 s, operation timeout 30 s, maximum message
    /// size 128 MiB, field tables at most 64 levels deep.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parse `amqp://user:pass@host:port/vhost?heartbeat=..&frame_max=..&channel_max=..
    /// &connection_timeout=..&connection_name=..&auth_mechanism=..`. User, password and
    /// vhost are percent-decoded; `connection_timeout` is in milliseconds, `heartbeat` in
    /// seconds. Unknown query keys are refused so that a typo does not go unnoticed.
    ///
    /// `amqps://` (port 5671 by default) connects with TLS and takes RabbitMQ's TLS
    /// parameters: `cacertfile`, `certfile`, `keyfile` (PEM files), `verify`
    /// (`verify_peer`, the default, or `verify_none`, which is unsafe: see
    /// [`TlsOptions::danger_accept_invalid_certs`]), `server_name_indication`, and
    /// `auth_mechanism=external` to log in with the client certificate.
    pub fn from_uri(uri: &str) -> Result<Self> {
        parse_uri(uri)
    }

    /// Broker host name or address.
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.host = host.into();
        self
    }
    /// Broker port.
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }
    /// Virtual host.
    pub fn vhost(mut self, vhost: impl Into<String>) -> Self {
        self.vhost = vhost.into();
        self
    }
    /// User name and password.
    pub fn credentials(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.username = user.into();
        self.password = password.into();
        self
    }
    /// SASL mechanism.
    pub fn auth_mechanism(mut self, m: AuthMechanism) -> Self {
        self.auth = m;
        self.auth_mechanisms.clear();
        self
    }
    /// SASL mechanisms in order of preference: the first one the broker offers is used
    /// (e.g. `[External, Plain]`: the client certificate where the broker takes it, else
    /// user and password). None in common is a clear error naming both lists.
    pub fn auth_mechanisms(mut self, preference: &[AuthMechanism]) -> Self {
        self.auth_mechanisms = preference.to_vec();
        if let Some(&first) = preference.first() {
            self.auth = first;
        }
        self
    }
    /// Heartbeat interval in seconds asked for (0: no heartbeats). The broker's value
    /// wins where it is lower.
    pub fn heartbeat(mut self, seconds: u16) -> Self {
        self.heartbeat = seconds;
        self
    }
    /// Largest frame asked for (0: no limit from our side; the broker's value is used).
    pub fn frame_max(mut self, bytes: u32) -> Self {
        self.frame_max = bytes;
        self
    }
    /// Most channels asked for (0: no limit from our side, i.e. 65535).
    pub fn channel_max(mut self, n: u16) -> Self {
        self.channel_max = n;
        self
    }
    /// Deadline for the whole connection attempt: TCP connect and AMQP handshake.
    pub fn connection_timeout(mut self, t: Duration) -> Self {
        self.connection_timeout = t;
        self
    }
    /// Name shown in the management UI.
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = Some(name.into());
        self
    }
    /// Extra client properties sent in `connection.start-ok`.
    pub fn client_property(
        mut self,
        key: impl Into<String>,
        value: impl Into<crate::FieldValue>,
    ) -> Self {
        self.client_properties.insert(key, value);
        self
    }
    /// Default deadline of every blocking call that is not given its own.
    pub fn operation_timeout(mut self, t: Duration) -> Self {
        self.operation_timeout = t;
        self
    }
    /// Largest message body accepted from the broker; a larger delivery is skipped
    /// unbuffered and reported with its delivery tag. Also the largest body published.
    pub fn max_message_size(mut self, bytes: u64) -> Self {
        self.max_message_size = bytes;
        self
    }
    /// Deepest nesting of field tables and arrays accepted (at most 128).
    pub fn max_table_depth(mut self, depth: usize) -> Self {
        self.max_table_depth = depth.clamp(1, MAX_TABLE_DEPTH_CAP);
        self
    }
    /// Another broker address to fail over to (tried after the URI's host, in order,
    /// when connecting and when recovering).
    pub fn address(mut self, host: impl Into<String>, port: u16) -> Self {
        self.more_addresses.push((host.into(), port));
        self
    }
    /// Automatic recovery settings ([`RecoveryOptions::disabled`] turns it off).
    pub fn recovery(mut self, r: RecoveryOptions) -> Self {
        self.recovery = r;
        self
    }
    /// Connect with TLS (as `amqps://` does); see [`TlsOptions`]. Set the port too
    /// (RabbitMQ's TLS port is 5671).
    pub fn tls(mut self, tls: TlsOptions) -> Self {
        self.tls = tls;
        self.tls.enabled = true;
        self
    }
    /// Take user name and secret from `provider`, asked at every connect and reconnect;
    /// when it says the secret expires, lepus asks again before it does and sends the
    /// new secret to the broker (`connection.update-secret`) on a thread of its own.
    /// Failures are logged, reported as recovery events and retried. Overrides
    /// [`ConnectionOptions::credentials`].
    pub fn credentials_provider(mut self, provider: impl CredentialsProvider) -> Self {
        self.credentials_provider = Some(ProviderRef(crate::sync::Arc::new(provider)));
        self
    }
    /// Every address, the primary first.
    pub(crate) fn addresses(&self) -> Vec<(String, u16)> {
        let mut v = vec![(self.host.clone(), self.port)];
        v.extend(self.more_addresses.iter().cloned());
        v
    }
    /// How long `close()` waits for the broker's `close-ok`.
    pub fn close_timeout(mut self, t: Duration) -> Self {
        self.close_timeout = t;
        self
    }
}

fn percent_decode(s: &str) -> Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| Error::InvalidUri(format!("bad percent-escape in {s:?}")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| Error::InvalidUri(format!("{s:?} is not UTF-8 once decoded")))
}

fn num<T: std::str::FromStr>(key: &str, v: &str) -> Result<T> {
    v.parse()
        .map_err(|_| Error::InvalidUri(format!("{key}={v:?} is not a valid number")))
}

fn parse_uri(uri: &str) -> Result<ConnectionOptions> {
    let bad = |why: &str| Error::InvalidUri(format!("{why}: {uri:?}"));
    let mut o = ConnectionOptions::default();
    let rest = match uri.split_once("://") {
        Some(("amqp", rest)) => rest,
        Some(("amqps", rest)) => {
            if cfg!(not(feature = "tls")) {
                return Err(tls::disabled());
            }
            o.tls = TlsOptions::new();
            o.port = 5671;
            rest
        }
        _ => return Err(bad("expected a URI starting with amqp:// or amqps://")),
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let hostport = match authority.rsplit_once('@') {
        Some((userinfo, hp)) => {
            let (u, p) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            o.username = percent_decode(u)?;
            o.password = percent_decode(p)?;
            hp
        }
        None => authority,
    };
    let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
        let (h, after) = h.split_once(']').ok_or_else(|| bad("unclosed [ in host"))?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ]"))?),
        };
        (h, port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if !host.is_empty() {
        o.host = percent_decode(host)?;
    }
    if let Some(p) = port {
        o.port = p.parse().map_err(|_| bad("invalid port"))?;
    }
    if let Some(path) = path {
        if path.contains('/') {
            return Err(bad("vhost must be one path segment (encode '/' as %2f)"));
        }
        if !path.is_empty() {
            o.vhost = percent_decode(path)?;
        }
    }
    for pair in query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v)?;
        match k {
            "heartbeat" => o.heartbeat = num(k, &v)?,
            "frame_max" => o.frame_max = num(k, &v)?,
            "channel_max" => o.channel_max = num(k, &v)?,
            "connection_timeout" => o.connection_timeout = Duration::from_millis(num(k, &v)?),
            "connection_name" => o.connection_name = Some(v),
            "auth_mechanism" => {
                o.auth = match v.to_ascii_lowercase().as_str() {
                    "plain" => AuthMechanism::Plain,
                    "amqplain" => AuthMechanism::AmqPlain,
                    "external" => AuthMechanism::External,
                    _ => {
                        return Err(Error::InvalidUri(format!(
                            "unsupported auth_mechanism {v:?}"
                        )));
                    }
                }
            }
            _ if tls::apply_query(&mut o.tls, k, &v)? => {}
            _ => return Err(Error::InvalidUri(format!("unknown URI option {k:?}"))),
        }
    }
    tls::validate(&o.tls)?;
    if o.frame_max != 0 && o.frame_max < crate::protocol::frame::FRAME_MIN_SIZE {
        return Err(Error::InvalidUri(format!(
            "frame_max {} is below the protocol minimum of 4096",
            o.frame_max
        )));
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_uri() {
        let o = ConnectionOptions::from_uri(
            "amqp://us%40r:p%3Ass@rabbit.local:5673/my%2fvh?heartbeat=5&frame_max=8192&channel_max=10&connection_timeout=1500&connection_name=app%201&auth_mechanism=AMQPLAIN",
        )
        .unwrap();
        assert_eq!(o.username, "us@r");
        assert_eq!(o.password, "p:ss");
        assert_eq!(o.host, "rabbit.local");
        assert_eq!(o.port, 5673);
        assert_eq!(o.vhost, "my/vh");
        assert_eq!(o.heartbeat, 5);
        assert_eq!(o.frame_max, 8192);
        assert_eq!(o.channel_max, 10);
        assert_eq!(o.connection_timeout, Duration::from_millis(1500));
        assert_eq!(o.connection_name.as_deref(), Some("app 1"));
        assert_eq!(o.auth, AuthMechanism::AmqPlain);
    }

    #[test]
    fn defaults_and_ipv6() {
        let o = ConnectionOptions::from_uri("amqp://[::1]").unwrap();
        assert_eq!(
            (o.host.as_str(), o.port, o.vhost.as_str()),
            ("::1", 5672, "/")
        );
        let o = ConnectionOptions::from_uri("amqp://h/").unwrap();
        assert_eq!(o.vhost, "/");
        assert_eq!(o.username, "guest");
    }

    #[test]
    fn amqps_defaults_to_5671_and_takes_tls_parameters() {
        let r = ConnectionOptions::from_uri(
            "amqps://h?cacertfile=%2Ftmp%2Fca.pem&certfile=/c.pem&keyfile=/k.pem&verify=verify_peer&server_name_indication=rabbit&auth_mechanism=external",
        );
        #[cfg(feature = "tls")]
        {
            let o = r.unwrap();
            assert_eq!(o.port, 5671);
            assert!(o.tls.enabled);
            assert!(o.tls.has_client_cert());
            assert_eq!(o.tls.server_name.as_deref(), Some("rabbit"));
            assert_eq!(o.auth, AuthMechanism::External);
            assert_eq!(
                ConnectionOptions::from_uri("amqps://h:1234").unwrap().port,
                1234
            );
            assert!(!ConnectionOptions::from_uri("amqp://h").unwrap().tls.enabled);
        }
        #[cfg(not(feature = "tls"))]
        match r {
            Err(Error::Tls { kind, detail }) => {
                assert_eq!(kind, crate::TlsFailure::NotCompiledIn);
                assert!(detail.contains("`tls` cargo feature"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_uris_are_refused() {
        for u in [
            "http://h",
            "amqp://h?cacertfile=/ca.pem",
            #[cfg(feature = "tls")]
            "amqps://h?certfile=/c.pem",
            #[cfg(feature = "tls")]
            "amqps://h?verify=maybe",
            "amqp://h:notaport",
            "amqp://h/a/b",
            "amqp://h?heartbeat=x",
            "amqp://h?bogus=1",
            "amqp://h/%zz",
            "amqp://h/%+f",
            "amqp://[::1",
            "amqp://h?frame_max=100",
        ] {
            assert!(
                matches!(ConnectionOptions::from_uri(u), Err(Error::InvalidUri(_))),
                "{u}"
            );
        }
    }
}
