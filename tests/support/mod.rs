//! lepus-specific helpers shared by the integration tests; the generic tools (fault
//! proxy, fake broker, frames) are in the `lepus-testkit` crate.
//!
//! The broker address comes from `AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`).
//! Only add functions here: several test files use this module.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lepus::{BasicProperties, Channel, Connection, ConnectionOptions, PublishOptions};
use lepus_testkit::{FakeBroker, Proxy};

// Not every test binary polls.
#[allow(unused_imports)]
pub use lepus_testkit::wait_until;

/// The broker URI used by the tests.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Options for the test broker with short deadlines, so that nothing waits for long.
pub fn test_options() -> ConnectionOptions {
    ConnectionOptions::from_uri(&amqp_url())
        .expect("AMQP_URL parses")
        .connection_timeout(Duration::from_secs(5))
        .operation_timeout(Duration::from_secs(15))
        .close_timeout(Duration::from_secs(3))
}

/// A connection to the test broker with short deadlines.
pub fn connect() -> Connection {
    Connection::open_with(test_options()).expect("connect to the test broker")
}

/// `host:port` of the test broker.
pub fn broker_addr() -> SocketAddr {
    let o = amqp_url();
    let rest = o.split_once("://").map(|(_, r)| r).unwrap_or(&o);
    let rest = rest.split(['/', '?']).next().unwrap_or(rest);
    let hostport = rest.rsplit_once('@').map(|(_, h)| h).unwrap_or(rest);
    let hostport = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:5672")
    };
    hostport
        .to_socket_addrs()
        .expect("resolve the broker address")
        .next()
        .expect("the broker address resolves")
}

/// A name no other test (in this or any concurrent process) uses.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("lepus-test.{prefix}.{}.{n}.{nanos:x}", std::process::id())
}

/// A TCP port on 127.0.0.1 that nothing listens on (bound, then released).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    let port = l.local_addr().expect("local addr").port();
    drop(l);
    port
}

/// The rabbitmqctl command: `RABBITMQCTL` if set (split on spaces, so that
/// `RABBITMQCTL="sudo -n rabbitmqctl"` works for a developer who is not root), else
/// `rabbitmqctl` on PATH, else `/usr/sbin/rabbitmqctl` (Debian's place, often not on a
/// normal user's PATH).
pub fn rabbitmqctl_command() -> Vec<String> {
    if let Ok(v) = std::env::var("RABBITMQCTL") {
        let words: Vec<String> = v.split_whitespace().map(str::to_owned).collect();
        if !words.is_empty() {
            return words;
        }
    }
    let on_path = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("rabbitmqctl").is_file()));
    let bin = if !on_path && std::path::Path::new("/usr/sbin/rabbitmqctl").is_file() {
        "/usr/sbin/rabbitmqctl"
    } else {
        "rabbitmqctl"
    };
    vec![bin.to_owned()]
}

/// Run `rabbitmqctl` with `args`; panics (with its output) unless it succeeds.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let cmd = rabbitmqctl_command();
    let out = Command::new(&cmd[0])
        .args(&cmd[1..])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?} {args:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} {args:?} failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Whether rabbitmqctl can talk to the test broker from this account (it needs the
/// broker's Erlang cookie: root or the rabbitmq user, or sudo through `RABBITMQCTL`);
/// the reason if not. Asked once per test binary.
pub fn rabbitmqctl_usable() -> Result<(), String> {
    static USABLE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    USABLE
        .get_or_init(|| {
            let cmd = rabbitmqctl_command();
            let out = Command::new(&cmd[0])
                .args(&cmd[1..])
                .args(["-q", "eval", "ok."])
                .stdin(std::process::Stdio::null())
                .output()
                .map_err(|e| format!("{cmd:?} cannot be run: {e}"))?;
            if out.status.success() {
                return Ok(());
            }
            let why: String = String::from_utf8_lossy(&out.stderr)
                .lines()
                .chain(String::from_utf8_lossy(&out.stdout).lines())
                .filter(|l| !l.trim().is_empty())
                .take(3)
                .collect::<Vec<_>>()
                .join(" / ");
            Err(format!("{cmd:?} failed ({}): {why}", out.status))
        })
        .clone()
}

/// For a test (or part of one) that needs rabbitmqctl: true when it can run. When
/// rabbitmqctl cannot be used here, says so on stderr and returns false, so that the
/// caller skips that part; under CI (`CI` set and not "false") it fails instead, so that
/// CI never passes a test that did not run.
pub fn rabbitmqctl_or_skip(what: &str) -> bool {
    let Err(why) = rabbitmqctl_usable() else {
        return true;
    };
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
    assert!(
        !ci,
        "{what} needs rabbitmqctl, which cannot be used here: {why}"
    );
    eprintln!(
        "SKIPPED {what}: it needs rabbitmqctl, which cannot be used here: {why}. Run the \
         tests as root (or as the rabbitmq user), or with RABBITMQCTL=\"sudo -n rabbitmqctl\"."
    );
    false
}

/// Deletes the named queues and exchanges on drop (also when the test panics), over a
/// fresh connection. Errors (already deleted, broker gone) are ignored.
#[derive(Default)]
pub struct Cleanup {
    queues: Mutex<Vec<String>>,
    exchanges: Mutex<Vec<String>>,
}

impl Cleanup {
    pub fn new() -> Self {
        Self::default()
    }
    /// Remember a queue to delete; returns its name for convenience.
    pub fn queue(&self, name: &str) -> String {
        self.queues.lock().unwrap().push(name.to_string());
        name.to_string()
    }
    /// Remember an exchange to delete; returns its name for convenience.
    pub fn exchange(&self, name: &str) -> String {
        self.exchanges.lock().unwrap().push(name.to_string());
        name.to_string()
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut *self.queues.lock().unwrap_or_else(|e| e.into_inner()));
        let exchanges =
            std::mem::take(&mut *self.exchanges.lock().unwrap_or_else(|e| e.into_inner()));
        if queues.is_empty() && exchanges.is_empty() {
            return;
        }
        let Ok(conn) = Connection::open_with(
            test_options()
                .operation_timeout(Duration::from_secs(5))
                .connection_timeout(Duration::from_secs(3)),
        ) else {
            return;
        };
        // A failed delete closes the channel: use a fresh one for each.
        for q in queues {
            if let Ok(ch) = conn.open_channel() {
                let _ = ch.queue_delete(&q, &Default::default());
            }
        }
        for e in exchanges {
            if let Ok(ch) = conn.open_channel() {
                let _ = ch.exchange_delete(&e, &Default::default());
            }
        }
        let _ = conn.close();
    }
}

/// Publish on a channel in confirm mode and assert that the broker acked it: once this
/// returns, the message has been routed (or dropped as unroutable).
pub fn publish_confirmed(ch: &Channel, exchange: &str, routing_key: &str, body: &[u8]) {
    let c = ch
        .basic_publish_confirmed(
            exchange,
            routing_key,
            body,
            &BasicProperties::new(),
            &PublishOptions::default(),
        )
        .expect("publish");
    c.wait().expect("acked");
}

/// Declare a server-named exclusive queue on `ch` and return its name.
pub fn exclusive_queue(ch: &Channel) -> String {
    ch.queue_declare(
        "",
        &lepus::QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
    )
    .unwrap()
    .name
}

/// Deterministic pseudo-random bytes (xorshift64*), for large bodies.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A fault proxy in front of the test broker.
pub fn start_proxy() -> Proxy {
    Proxy::start(broker_addr()).expect("start the fault proxy")
}

/// lepus connection options for a kit's listener.
pub trait ClientOptions {
    /// Options that connect lepus to this listener.
    fn options(&self) -> ConnectionOptions;
}

impl ClientOptions for Proxy {
    /// Test options (short deadlines) that connect through this proxy.
    fn options(&self) -> ConnectionOptions {
        test_options().host("127.0.0.1").port(self.port())
    }
}

impl<R: Send + 'static> ClientOptions for FakeBroker<R> {
    /// Client options for this broker: no heartbeats, short timeouts. Automatic recovery
    /// stays on (the default); a test of a lost link must turn it off, since the fake
    /// broker serves one connection only.
    fn options(&self) -> ConnectionOptions {
        ConnectionOptions::new()
            .host("127.0.0.1")
            .port(self.port())
            .heartbeat(0)
            .connection_timeout(Duration::from_secs(3))
            .operation_timeout(Duration::from_secs(5))
            .close_timeout(Duration::from_secs(2))
    }
}

/// Small helpers of the broker tests split by topic.
pub mod fixtures;
pub mod largest_alloc;
