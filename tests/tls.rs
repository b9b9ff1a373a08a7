//! TLS (`amqps://`) against a real RabbitMQ node with a TLS listener, started by
//! `scripts/tls-node start` (once per test binary; a running node is reused): round
//! trips, each TLS failure with its own error within the connection deadline, SASL
//! EXTERNAL with a client certificate, recovery over TLS after an RST through the fault
//! proxy, and the frame-size bound over TLS (a fake broker behind a TLS front).
//!
//! ```text
//! scripts/with-rabbitmq cargo test --test tls -- --nocapture
//! ```
#![cfg(feature = "tls")]

mod support;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use lepus::{
    AuthMechanism, BasicProperties, ConnectionOptions, ConsumeOptions, Error, HandshakeStage,
    PublishOptions, QueueDeclareOptions, RecoveryOptions, TlsFailure, TlsOptions, reply_code,
};
use lepus_testkit::{FakeBroker, Proxy, Tune};
use support::ClientOptions;

// ---------------------------------------------------------------------------------------
// The largest single allocation made by this test process (for the frame-size bound).
// ---------------------------------------------------------------------------------------

#[global_allocator]
static ALLOC: support::largest_alloc::LargestAlloc = support::largest_alloc::LargestAlloc;

// ---------------------------------------------------------------------------------------
// The TLS node
// ---------------------------------------------------------------------------------------

/// Paths and ports printed by `scripts/tls-node env`.
pub struct Node {
    vars: HashMap<String, String>,
}

impl Node {
    fn var(&self, k: &str) -> &str {
        self.vars
            .get(k)
            .unwrap_or_else(|| panic!("scripts/tls-node env does not set {k}"))
    }
    fn path(&self, k: &str) -> PathBuf {
        PathBuf::from(self.var(k))
    }
    fn tls_port(&self) -> u16 {
        self.var("LEPUS_TLS_PORT").parse().unwrap()
    }
    fn plain_port(&self) -> u16 {
        self.var("LEPUS_TLS_PLAIN_PORT").parse().unwrap()
    }
    /// Trust the test CA and show the known user's certificate.
    fn tls(&self) -> TlsOptions {
        TlsOptions::new()
            .ca_file(self.path("LEPUS_TLS_CA"))
            .client_cert_files(
                self.path("LEPUS_TLS_CLIENT_CERT"),
                self.path("LEPUS_TLS_CLIENT_KEY"),
            )
    }
    /// Options for the node's TLS port with `tls`, short deadlines.
    fn options(&self, tls: TlsOptions) -> ConnectionOptions {
        ConnectionOptions::new()
            .host("localhost")
            .port(self.tls_port())
            .tls(tls)
            .connection_timeout(DEADLINE)
            .operation_timeout(Duration::from_secs(10))
            .close_timeout(Duration::from_secs(3))
    }
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/tls-node")
}

/// Start the node once for this test binary (or reuse the running one).
fn node() -> &'static Node {
    static NODE: OnceLock<Node> = OnceLock::new();
    NODE.get_or_init(|| {
        let st = Command::new(script())
            .arg("start")
            .status()
            .expect("run scripts/tls-node start");
        assert!(st.success(), "scripts/tls-node start failed: {st}");
        let out = Command::new(script())
            .arg("env")
            .output()
            .expect("run scripts/tls-node env");
        let vars = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Node { vars }
    })
}

fn node_ctl(args: &[&str]) -> String {
    let out = Command::new(script())
        .arg("ctl")
        .args(args)
        .output()
        .expect("run scripts/tls-node ctl");
    assert!(
        out.status.success(),
        "tls-node ctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The connection deadline of every test here; each failure must come well within it.
const DEADLINE: Duration = Duration::from_secs(5);

/// Connect with `opts`, expecting a TLS failure of `kind` within the deadline; returns
/// the error text (printed, for the record).
fn expect_tls_failure(case: &str, opts: ConnectionOptions, kind: TlsFailure) -> String {
    let t = Instant::now();
    let r = lepus::Connection::open_with(opts);
    let took = t.elapsed();
    let err = match r {
        Err(e) => e,
        Ok(_) => panic!("{case}: connected"),
    };
    println!("{case}: {took:?}: {err}");
    match &err {
        Error::Tls { kind: k, .. } if *k == kind => {}
        other => panic!("{case}: expected a TLS {kind:?} error, got {other:?}"),
    }
    assert!(took < DEADLINE, "{case}: took {took:?}");
    err.to_string()
}

// ---------------------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------------------

#[test]
fn publish_consume_confirm_round_trip_over_tls() {
    let n = node();
    let t = Instant::now();
    let conn = lepus::Connection::open_with(n.options(n.tls())).expect("connect over TLS");
    println!("TLS connect + AMQP handshake: {:?}", t.elapsed());
    let ch = conn.open_channel().unwrap();
    let q = support::exclusive_queue(&ch);
    ch.confirm_select().unwrap();
    // Small and large bodies: the large ones span many TLS records and frames.
    let bodies: Vec<Vec<u8>> = (0..40)
        .map(|i| support::pattern(if i % 10 == 0 { 1 << 20 } else { 100 + i }, i as u64))
        .collect();
    for b in &bodies {
        let c = ch
            .basic_publish_confirmed(
                "",
                &q,
                b,
                &BasicProperties::new(),
                &PublishOptions::default(),
            )
            .unwrap();
        c.wait().unwrap();
    }
    let consumer = ch.basic_consume(&q, &ConsumeOptions::default()).unwrap();
    for (i, b) in bodies.iter().enumerate() {
        let d = consumer
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("delivery {i}: {e}"))
            .unwrap_or_else(|| panic!("delivery {i} in time"));
        assert_eq!(d.body(), &b[..], "delivery {i}");
        d.ack().unwrap();
    }
    conn.close().unwrap();
}

#[test]
fn amqps_uri_with_rabbitmq_parameters_connects() {
    let n = node();
    let uri = format!(
        "amqps://guest:guest@localhost:{}/%2f?cacertfile={}&certfile={}&keyfile={}&verify=verify_peer&server_name_indication=localhost&connection_timeout=5000",
        n.tls_port(),
        n.var("LEPUS_TLS_CA"),
        n.var("LEPUS_TLS_CLIENT_CERT"),
        n.var("LEPUS_TLS_CLIENT_KEY"),
    );
    let conn = lepus::Connection::open(&uri).expect("connect with the URI");
    let ch = conn.open_channel().unwrap();
    support::exclusive_queue(&ch);
    conn.close().unwrap();
}

#[test]
fn verify_none_connects_without_the_ca() {
    let n = node();
    let tls = TlsOptions::new()
        .client_cert_files(
            n.path("LEPUS_TLS_CLIENT_CERT"),
            n.path("LEPUS_TLS_CLIENT_KEY"),
        )
        .danger_accept_invalid_certs();
    let conn = lepus::Connection::open_with(n.options(tls)).expect("connect, unverified");
    conn.close().unwrap();
}

#[test]
fn a_whole_rustls_client_config_can_be_given() {
    use lepus::rustls;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let n = node();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(n.path("LEPUS_TLS_CA")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let certs: Vec<_> = CertificateDer::pem_file_iter(n.path("LEPUS_TLS_CLIENT_CERT"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(n.path("LEPUS_TLS_CLIENT_KEY")).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(certs, key)
    .unwrap();
    let opts = n.options(TlsOptions::new().client_config(Arc::new(config)));
    let conn = lepus::Connection::open_with(opts).expect("connect with TLS 1.2 only");
    conn.close().unwrap();
}

// ---------------------------------------------------------------------------------------
// Each TLS failure: its own error, within the deadline
// ---------------------------------------------------------------------------------------

#[test]
fn unknown_ca_is_refused() {
    let n = node();
    // The bundled Mozilla roots do not include the test CA.
    let tls = TlsOptions::new().client_cert_files(
        n.path("LEPUS_TLS_CLIENT_CERT"),
        n.path("LEPUS_TLS_CLIENT_KEY"),
    );
    let text = expect_tls_failure("unknown CA", n.options(tls), TlsFailure::UnknownCa);
    assert!(text.contains("not signed by a trusted CA"), "{text}");
}

#[test]
fn hostname_mismatch_is_refused() {
    let n = node();
    let tls = n.tls().server_name("wrong.example");
    let text = expect_tls_failure(
        "hostname mismatch",
        n.options(tls),
        TlsFailure::HostnameMismatch,
    );
    assert!(text.contains("wrong.example"), "{text}");
}

#[test]
fn expired_server_certificate_is_refused() {
    let n = node();
    let front = TlsFront::start(
        &n.path("LEPUS_TLS_EXPIRED_SERVER_CERT"),
        &n.path("LEPUS_TLS_EXPIRED_SERVER_KEY"),
        n.plain_port(),
    );
    let opts = n.options(n.tls()).port(front.port);
    let text = expect_tls_failure(
        "expired server certificate",
        opts,
        TlsFailure::CertificateExpired,
    );
    assert!(text.contains("expired"), "{text}");
}

#[test]
fn missing_client_certificate_is_refused_clearly() {
    let n = node();
    let tls = TlsOptions::new().ca_file(n.path("LEPUS_TLS_CA"));
    let text = expect_tls_failure(
        "no client certificate",
        n.options(tls),
        TlsFailure::ClientCertificateRequired,
    );
    assert!(text.contains("client certificate"), "{text}");
}

#[test]
fn expired_client_certificate_is_refused() {
    let n = node();
    let tls = TlsOptions::new()
        .ca_file(n.path("LEPUS_TLS_CA"))
        .client_cert_files(
            n.path("LEPUS_TLS_EXPIRED_CLIENT_CERT"),
            n.path("LEPUS_TLS_EXPIRED_CLIENT_KEY"),
        );
    expect_tls_failure(
        "expired client certificate",
        n.options(tls),
        TlsFailure::ClientCertificateRefused,
    );
}

#[test]
fn plaintext_amqp_server_on_the_tls_port_is_named() {
    let n = node();
    let opts = n.options(n.tls()).port(n.plain_port());
    let text = expect_tls_failure(
        "plaintext AMQP server on an amqps:// URI",
        opts,
        TlsFailure::NotTlsServer,
    );
    assert!(text.contains("plaintext AMQP"), "{text}");
}

#[test]
fn tls_server_on_a_plaintext_uri_is_named() {
    let n = node();
    let opts = ConnectionOptions::new()
        .host("localhost")
        .port(n.tls_port())
        .connection_timeout(DEADLINE);
    let text = expect_tls_failure(
        "TLS server on an amqp:// URI",
        opts,
        TlsFailure::TlsServerOnPlainPort,
    );
    assert!(text.contains("amqps://"), "{text}");
}

#[test]
fn silent_server_times_out_in_the_tls_handshake_within_the_deadline() {
    let n = node();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let opts = n
        .options(n.tls())
        .port(port)
        .connection_timeout(Duration::from_millis(700));
    let t = Instant::now();
    let err = lepus::Connection::open_with(opts).unwrap_err();
    let took = t.elapsed();
    println!("silent TLS server: {took:?}: {err}");
    assert!(
        matches!(
            err,
            Error::ConnectTimeout {
                stage: HandshakeStage::Tls,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(took >= Duration::from_millis(650) && took < Duration::from_millis(1500));
    drop(l);
}

#[test]
fn unreadable_ca_file_is_a_configuration_error() {
    let n = node();
    let tls = TlsOptions::new().ca_file("/nonexistent/ca.pem");
    let text = expect_tls_failure("missing CA file", n.options(tls), TlsFailure::Configuration);
    assert!(text.contains("/nonexistent/ca.pem"), "{text}");
}

// ---------------------------------------------------------------------------------------
// SASL EXTERNAL
// ---------------------------------------------------------------------------------------

#[test]
fn external_authenticates_as_the_certificate_user() {
    let n = node();
    let name = support::unique("external");
    let opts = n
        .options(n.tls())
        .credentials("ignored", "ignored")
        .auth_mechanism(AuthMechanism::External)
        .connection_name(name.clone());
    let conn = lepus::Connection::open_with(opts).expect("EXTERNAL login");
    let ch = conn.open_channel().unwrap();
    support::exclusive_queue(&ch);
    let listed = node_ctl(&[
        "list_connections",
        "client_properties",
        "user",
        "auth_mechanism",
    ]);
    let line = listed
        .lines()
        .find(|l| l.contains(&name))
        .unwrap_or_else(|| panic!("connection {name} not listed:\n{listed}"));
    let user = n.var("LEPUS_TLS_EXTERNAL_USER");
    assert!(line.contains(user), "not logged in as {user}: {line}");
    assert!(line.contains("EXTERNAL"), "{line}");
    conn.close().unwrap();
}

#[test]
fn mechanism_preference_follows_the_brokers_offer() {
    let n = node();
    let prefs = [AuthMechanism::External, AuthMechanism::Plain];
    // Over TLS the broker offers EXTERNAL: the certificate's user logs in.
    let name = support::unique("prefer-external");
    let conn = lepus::Connection::open_with(
        n.options(n.tls())
            .credentials("guest", "guest")
            .auth_mechanisms(&prefs)
            .connection_name(name.clone()),
    )
    .unwrap();
    let listed = node_ctl(&[
        "list_connections",
        "client_properties",
        "user",
        "auth_mechanism",
    ]);
    let line = listed.lines().find(|l| l.contains(&name)).unwrap();
    assert!(line.contains("EXTERNAL"), "{line}");
    conn.close().unwrap();
    // On the plaintext port it does not: PLAIN with guest.
    let conn = lepus::Connection::open_with(
        ConnectionOptions::new()
            .host("127.0.0.1")
            .port(n.plain_port())
            .auth_mechanisms(&prefs)
            .connection_timeout(DEADLINE),
    )
    .unwrap();
    conn.close().unwrap();
}

#[test]
fn external_without_the_broker_offering_it_is_a_clear_error() {
    let n = node();
    // The plaintext port offers PLAIN and AMQPLAIN only (EXTERNAL needs TLS).
    let opts = ConnectionOptions::new()
        .host("127.0.0.1")
        .port(n.plain_port())
        .auth_mechanism(AuthMechanism::External)
        .connection_timeout(DEADLINE);
    let err = lepus::Connection::open_with(opts).unwrap_err();
    println!("EXTERNAL not offered: {err}");
    match &err {
        Error::AuthenticationFailed(t) => {
            assert!(t.contains("no SASL mechanism in common"), "{t}");
            assert!(t.contains("EXTERNAL"), "{t}");
        }
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Recovery over TLS
// ---------------------------------------------------------------------------------------

#[test]
fn recovery_over_tls_after_a_reset_through_the_proxy() {
    let n = node();
    let proxy = Proxy::start(("127.0.0.1", n.tls_port())).expect("start the fault proxy");
    let opts = n
        .options(n.tls())
        .port(proxy.port())
        .heartbeat(5)
        .recovery(RecoveryOptions::default());
    let conn = lepus::Connection::open_with(opts).expect("connect through the proxy");
    let ch = conn.open_channel().unwrap();
    ch.confirm_select().unwrap();
    let q = ch
        .queue_declare(
            &support::unique("tls-recovery"),
            &QueueDeclareOptions {
                auto_delete: false,
                ..Default::default()
            },
        )
        .unwrap()
        .name;
    let cleanup = Cleanup(n, q.clone());
    let publish = |body: &[u8]| {
        ch.basic_publish_confirmed(
            "",
            &q,
            body,
            &BasicProperties::new(),
            &PublishOptions::default(),
        )
        .and_then(|c| c.wait())
    };
    publish(b"before").expect("acked");
    assert_eq!(conn.generation(), 1);
    let t = Instant::now();
    assert_eq!(proxy.reset(), 1, "one TLS link to reset");
    assert!(
        support::wait_until(Duration::from_secs(15), || conn.generation() == 2
            && conn.is_open()),
        "no recovery over TLS"
    );
    // The first successful operation on the new connection.
    let mut after = None;
    for _ in 0..200 {
        if publish(b"after").is_ok() {
            after = Some(t.elapsed());
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let after = after.expect("publish after the recovery");
    println!("TLS recovery: reset to first confirmed publish {after:?}");
    assert_eq!(
        proxy.connections(),
        2,
        "exactly one new TCP (TLS) connection"
    );
    let consumer = ch.basic_consume(&q, &ConsumeOptions::default()).unwrap();
    let mut got = Vec::new();
    while let Ok(Some(d)) = consumer.recv_timeout(Duration::from_secs(2)) {
        got.push(d.body().to_vec());
        d.ack().unwrap();
    }
    assert!(got.contains(&b"before".to_vec()) && got.contains(&b"after".to_vec()));
    conn.close().unwrap();
    drop(cleanup);
}

#[test]
fn missed_heartbeats_over_tls_are_detected_and_recovered() {
    let n = node();
    let proxy = Proxy::start(("127.0.0.1", n.tls_port())).expect("start the fault proxy");
    let opts = n.options(n.tls()).port(proxy.port()).heartbeat(1);
    let conn = lepus::Connection::open_with(opts).expect("connect through the proxy");
    let ch = conn.open_channel().unwrap();
    support::exclusive_queue(&ch);
    let t = Instant::now();
    proxy.partition();
    assert!(
        support::wait_until(Duration::from_secs(6), || !conn.is_open()),
        "silence over TLS not detected"
    );
    let detected = t.elapsed();
    println!("TLS partition detected by heartbeats after {detected:?}");
    assert!(
        detected >= Duration::from_millis(1500) && detected < Duration::from_secs(4),
        "{detected:?}"
    );
    assert!(conn.recovery_events().iter().any(|e| matches!(
        &e.kind,
        lepus::RecoveryEventKind::FailureDetected(why) if why.contains("heartbeat")
    )));
    proxy.heal();
    assert!(
        support::wait_until(Duration::from_secs(15), || conn.generation() == 2
            && conn.is_open()),
        "no recovery after the partition healed"
    );
    support::exclusive_queue(&ch);
    conn.close().unwrap();
}

/// Deletes a durable test queue on the TLS node.
struct Cleanup<'a>(&'a Node, String);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if let Ok(c) = lepus::Connection::open_with(self.0.options(self.0.tls())) {
            if let Ok(ch) = c.open_channel() {
                let _ = ch.queue_delete(&self.1, &Default::default());
            }
            let _ = c.close();
        }
    }
}

// ---------------------------------------------------------------------------------------
// The frame-size bound holds after decryption
// ---------------------------------------------------------------------------------------

#[test]
fn huge_frame_header_over_tls_is_refused_before_buffering() {
    let n = node();
    let broker = FakeBroker::start(|p| {
        p.handshake(Tune::default());
        let ch = p.serve_channel_open();
        // A body frame announcing 4 GiB - 1, and nothing after it: a client that
        // buffered before checking would wait (or allocate) instead of refusing.
        let mut hostile = vec![3u8];
        hostile.extend_from_slice(&ch.to_be_bytes());
        hostile.extend_from_slice(&u32::MAX.to_be_bytes());
        p.send(&hostile);
        let close = p.expect_connection_close();
        (close.reply_code, close.reply_text.to_string())
    });
    let front = TlsFront::start(
        &n.path("LEPUS_TLS_SERVER_CERT"),
        &n.path("LEPUS_TLS_SERVER_KEY"),
        broker.port(),
    );
    let opts = broker
        .options()
        .host("localhost")
        .port(front.port)
        .tls(TlsOptions::new().ca_file(n.path("LEPUS_TLS_CA")))
        .recovery(RecoveryOptions::disabled());
    let conn = lepus::Connection::open_with(opts).expect("connect to the fake broker over TLS");
    let _ch = conn.open_channel().unwrap();
    let (code, text) = broker.finish();
    assert_eq!(code, reply_code::FRAME_ERROR, "{text}");
    assert!(text.contains("exceeds frame_max"), "{text}");
    assert!(support::wait_until(Duration::from_secs(5), || !conn.is_open()));
    match conn.close_reason() {
        Some(Error::Protocol { code, .. }) => assert_eq!(code, reply_code::FRAME_ERROR),
        other => panic!("{other:?}"),
    }
    let largest = support::largest_alloc::largest();
    assert!(largest < 64 << 20, "an allocation of {largest} bytes");
}

// ---------------------------------------------------------------------------------------
// A TLS front: terminates TLS with a given certificate and forwards plaintext to a port
// ---------------------------------------------------------------------------------------

struct TlsFront {
    port: u16,
}

impl TlsFront {
    /// Serve one TLS client on an ephemeral port (for at most 20 s).
    fn start(cert: &std::path::Path, key: &std::path::Path, upstream: u16) -> TlsFront {
        use lepus::rustls;
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<_> = CertificateDer::pem_file_iter(cert)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        thread::spawn(move || {
            let Ok((mut client, _)) = listener.accept() else {
                return;
            };
            let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                return;
            };
            let mut tls = rustls::ServerConnection::new(Arc::new(config)).unwrap();
            client.set_nonblocking(true).unwrap();
            up.set_nonblocking(true).unwrap();
            let until = Instant::now() + Duration::from_secs(20);
            let mut buf = vec![0u8; 64 * 1024];
            while Instant::now() < until {
                let mut idle = true;
                match tls.read_tls(&mut client) {
                    Ok(0) => return,
                    Ok(_) => {
                        idle = false;
                        if tls.process_new_packets().is_err() {
                            let _ = tls.write_tls(&mut client);
                            return;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
                loop {
                    match tls.reader().read(&mut buf) {
                        Ok(0) => return,
                        Ok(k) => {
                            if up.write_all(&buf[..k]).is_err() {
                                return;
                            }
                        }
                        Err(_) => break,
                    }
                }
                if !tls.is_handshaking() {
                    match up.read(&mut buf) {
                        Ok(0) => {
                            tls.send_close_notify();
                            let _ = tls.write_tls(&mut client);
                            return;
                        }
                        Ok(k) => {
                            idle = false;
                            tls.writer().write_all(&buf[..k]).unwrap();
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                        Err(_) => return,
                    }
                }
                while tls.wants_write() {
                    match tls.write_tls(&mut client) {
                        Ok(_) => idle = false,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(_) => return,
                    }
                }
                if idle {
                    thread::sleep(Duration::from_millis(1));
                }
            }
        });
        TlsFront { port }
    }
}

// ---------------------------------------------------------------------------------------
// Credentials that expire: OAuth2 tokens (HS256 JWTs signed with the node's test key)
// ---------------------------------------------------------------------------------------

fn base64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

const TOKEN_USER: &str = "lepus-token-user";

/// A JWT for `TOKEN_USER` with full rights on every vhost, expiring `valid_for` seconds
/// from now (negative: already expired).
fn mint_token(n: &Node, valid_for: i64) -> String {
    let key = std::fs::read_to_string(n.path("LEPUS_JWT_KEY_FILE")).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let header = r#"{"alg":"HS256","typ":"JWT","kid":"lepus-hs256"}"#;
    let claims = format!(
        r#"{{"sub":"{TOKEN_USER}","aud":["lepus"],"scope":"lepus.configure:*/* lepus.read:*/* lepus.write:*/*","iat":{now},"exp":{}}}"#,
        now + valid_for
    );
    let signing_input = format!(
        "{}.{}",
        base64url(header.as_bytes()),
        base64url(claims.as_bytes())
    );
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.trim().as_bytes());
    let sig = ring::hmac::sign(&k, signing_input.as_bytes());
    format!("{signing_input}.{}", base64url(sig.as_ref()))
}

/// Options for the node's TLS port logging in with `token`.
fn token_options(n: &Node, token: &str) -> ConnectionOptions {
    n.options(n.tls()).credentials(TOKEN_USER, token)
}

/// Declare (and drop) a server-named queue on a fresh channel: needs a valid token.
fn declare_works(conn: &lepus::Connection) -> Result<(), Error> {
    let ch = conn.open_channel()?;
    ch.queue_declare(
        "",
        &QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
    )?;
    Ok(())
}

#[test]
fn base64url_matches_known_vectors() {
    assert_eq!(base64url(b""), "");
    assert_eq!(base64url(b"f"), "Zg");
    assert_eq!(base64url(b"fo"), "Zm8");
    assert_eq!(base64url(b"foo"), "Zm9v");
    assert_eq!(base64url(b"foob"), "Zm9vYg");
    assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
}

#[test]
fn a_valid_token_logs_in() {
    let n = node();
    let conn = lepus::Connection::open_with(token_options(n, &mint_token(n, 60)))
        .expect("log in with a JWT");
    declare_works(&conn).unwrap();
    conn.close().unwrap();
}

#[test]
fn an_expired_token_is_refused_at_connect() {
    let n = node();
    let t = Instant::now();
    let err = lepus::Connection::open_with(token_options(n, &mint_token(n, -60))).unwrap_err();
    println!("expired token: {:?}: {err}", t.elapsed());
    assert!(matches!(err, Error::AuthenticationFailed(_)), "{err:?}");
    assert!(t.elapsed() < DEADLINE);
    // A provider that says so is refused before connecting.
    let opts = n.options(n.tls()).credentials_provider(|| {
        Ok(lepus::Credentials::new(TOKEN_USER, "x").expires_in(Duration::ZERO))
    });
    let err = lepus::Connection::open_with(opts).unwrap_err();
    println!("provider's expired secret: {err}");
    match err {
        Error::AuthenticationFailed(t) => assert!(t.contains("already expired"), "{t}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn update_secret_keeps_the_connection_working_past_the_old_tokens_expiry() {
    let n = node();
    // Two connections with a token valid for 3 s; only one gets a fresh token.
    let short = mint_token(n, 3);
    let updated = lepus::Connection::open_with(token_options(n, &short)).unwrap();
    let control = lepus::Connection::open_with(token_options(n, &short)).unwrap();
    let t = Instant::now();
    updated
        .update_secret(&mint_token(n, 120), "token refreshed")
        .expect("update-secret");
    println!("update-secret round trip: {:?}", t.elapsed());
    thread::sleep(Duration::from_secs(5));
    declare_works(&updated).expect("the updated connection works past the old expiry");
    let refused = declare_works(&control).expect_err("the control's token has expired");
    println!("control after expiry: {refused}");
    assert!(
        matches!(
            &refused,
            Error::ServerClosedChannel { code, .. } | Error::ServerClosedConnection { code, .. }
                if *code == reply_code::ACCESS_REFUSED
        ),
        "{refused:?}"
    );
    updated.close().unwrap();
    let _ = control.close();
}

#[test]
fn update_secret_with_an_invalid_token_is_refused_by_the_broker() {
    let n = node();
    let conn = lepus::Connection::open_with(token_options(n, &mint_token(n, 60))).unwrap();
    let err = conn.update_secret("not a token", "garbage").unwrap_err();
    println!("update-secret with garbage: {err}");
    assert!(
        matches!(err, Error::ServerClosedConnection { code, .. } if code == reply_code::NOT_ALLOWED),
        "{err:?}"
    );
    assert!(!conn.is_open());
}

#[test]
fn the_provider_refreshes_the_token_before_it_expires() {
    let n = node();
    let calls = Arc::new(AtomicUsize::new(0));
    let node_ref: &'static Node = n;
    let c = calls.clone();
    let opts = n.options(n.tls()).credentials_provider(move || {
        c.fetch_add(1, Ordering::SeqCst);
        // `exp` has whole seconds: a token minted for 3 s is valid for 2 s at least.
        Ok(lepus::Credentials::new(TOKEN_USER, mint_token(node_ref, 3))
            .expires_in(Duration::from_secs(2)))
    });
    let conn = lepus::Connection::open_with(opts).expect("log in with the provider's token");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // Over two lifetimes of the first token: refreshes at 1.6 s, 3.2 s, 4.8 s...
    thread::sleep(Duration::from_secs(6));
    declare_works(&conn).expect("works on refreshed tokens");
    let refreshes: Vec<_> = conn
        .recovery_events()
        .into_iter()
        .filter(|e| matches!(e.kind, lepus::RecoveryEventKind::SecretRefreshed { .. }))
        .collect();
    println!(
        "provider calls {}, refreshes {}",
        calls.load(Ordering::SeqCst),
        refreshes.len()
    );
    assert!(refreshes.len() >= 3, "{refreshes:?}");
    assert!(calls.load(Ordering::SeqCst) >= 3);
    assert!(
        !conn
            .recovery_events()
            .iter()
            .any(|e| matches!(e.kind, lepus::RecoveryEventKind::SecretRefreshFailed(_)))
    );
    assert_eq!(conn.generation(), 1, "refreshed without reconnecting");
    conn.close().unwrap();
}

#[test]
fn a_failing_provider_is_reported_and_retried() {
    let n = node();
    let calls = Arc::new(AtomicUsize::new(0));
    let node_ref: &'static Node = n;
    let c = calls.clone();
    let opts = n.options(n.tls()).credentials_provider(move || {
        // The first refresh fails; the one after succeeds.
        match c.fetch_add(1, Ordering::SeqCst) {
            1 => Err("identity provider unavailable".to_string()),
            _ => Ok(lepus::Credentials::new(TOKEN_USER, mint_token(node_ref, 4))
                .expires_in(Duration::from_secs(3))),
        }
    });
    let conn = lepus::Connection::open_with(opts).unwrap();
    thread::sleep(Duration::from_secs(5));
    let events = conn.recovery_events();
    let failed = events.iter().position(|e| {
        matches!(&e.kind, lepus::RecoveryEventKind::SecretRefreshFailed(t) if t.contains("identity provider unavailable"))
    });
    let refreshed = events
        .iter()
        .position(|e| matches!(e.kind, lepus::RecoveryEventKind::SecretRefreshed { .. }));
    assert!(
        matches!((failed, refreshed), (Some(f), Some(r)) if f < r),
        "{events:?}"
    );
    declare_works(&conn).expect("works after the retried refresh");
    conn.close().unwrap();
}
