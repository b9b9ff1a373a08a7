//! Helpers shared by the integration tests that talk to a real RabbitMQ broker.
//!
//! The broker address comes from `AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`).
//! Only add functions here: several test files use this module.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lepus::{BasicProperties, Channel, Confirm, Connection, ConnectionOptions, PublishOptions};

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

/// Run `rabbitmqctl` with `args`; panics (with its output) unless it succeeds.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let bin = std::env::var("RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".into());
    let out = Command::new(&bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {bin} {args:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{bin} {args:?} failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
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
                let _ = ch.queue_delete(&q, Default::default());
            }
        }
        for e in exchanges {
            if let Ok(ch) = conn.open_channel() {
                let _ = ch.exchange_delete(&e, false);
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
            PublishOptions::default(),
        )
        .expect("publish");
    assert_eq!(c.wait().expect("confirm"), Confirm::Ack);
}

/// Poll `f` every 10 ms until it is true or `timeout` passes; returns whether it became true.
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

pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
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

/// A TCP forwarder between lepus and the broker that the test controls: it can hold
/// traffic back (`pause`) and cut every link at once (`kill`: both directions of both
/// sockets of every connection are shut down).
pub struct Forwarder {
    addr: SocketAddr,
    state: Arc<FwdState>,
    accept: Option<JoinHandle<()>>,
}

struct FwdState {
    upstream: SocketAddr,
    sockets: Mutex<Vec<TcpStream>>,
    paused: AtomicBool,
    killed: AtomicBool,
    relays: Mutex<Vec<JoinHandle<()>>>,
}

impl Forwarder {
    /// Listen on an ephemeral port of 127.0.0.1 and forward to the test broker.
    pub fn start() -> Forwarder {
        Self::start_to(broker_addr())
    }

    /// Listen on an ephemeral port of 127.0.0.1 and forward to `upstream`.
    pub fn start_to(upstream: SocketAddr) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the forwarder");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let addr = listener.local_addr().expect("forwarder address");
        let state = Arc::new(FwdState {
            upstream,
            sockets: Mutex::new(Vec::new()),
            paused: AtomicBool::new(false),
            killed: AtomicBool::new(false),
            relays: Mutex::new(Vec::new()),
        });
        let st = state.clone();
        let accept = std::thread::Builder::new()
            .name("forwarder-accept".into())
            .spawn(move || accept_loop(listener, st))
            .expect("spawn the forwarder");
        Forwarder {
            addr,
            state,
            accept: Some(accept),
        }
    }

    /// The port lepus should connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Connection options for the test broker, through this forwarder.
    pub fn options(&self) -> ConnectionOptions {
        test_options().host("127.0.0.1").port(self.port())
    }

    /// Hold back all traffic in both directions (bytes already read wait in the relay).
    pub fn pause(&self) {
        self.state.paused.store(true, Ordering::SeqCst);
    }

    /// Let traffic flow again.
    pub fn resume(&self) {
        self.state.paused.store(false, Ordering::SeqCst);
    }

    /// Cut every forwarded connection (shutdown both ways of both sockets) and stop
    /// accepting new ones.
    pub fn kill(&self) {
        self.state.killed.store(true, Ordering::SeqCst);
        for s in self.state.sockets.lock().unwrap().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.sockets.lock().unwrap().len() / 2
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.kill();
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let relays = std::mem::take(&mut *self.state.relays.lock().unwrap());
        for t in relays {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, st: Arc<FwdState>) {
    while !st.killed.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                let _ = client.set_nonblocking(false);
                let Ok(server) = TcpStream::connect_timeout(&st.upstream, Duration::from_secs(5))
                else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
                    client.try_clone(),
                    server.try_clone(),
                    client.try_clone(),
                    server.try_clone(),
                ) else {
                    continue;
                };
                {
                    let mut socks = st.sockets.lock().unwrap();
                    socks.push(c3);
                    socks.push(s3);
                }
                if st.killed.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    let _ = server.shutdown(Shutdown::Both);
                    return;
                }
                let (a, b) = (st.clone(), st.clone());
                let up = std::thread::spawn(move || relay(client, s2, a));
                let down = std::thread::spawn(move || relay(server, c2, b));
                st.relays.lock().unwrap().extend([up, down]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn relay(mut from: TcpStream, mut to: TcpStream, st: Arc<FwdState>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while st.paused.load(Ordering::SeqCst) && !st.killed.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(2));
        }
        if st.killed.load(Ordering::SeqCst) || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// A scripted fake broker for hostile-input tests (tests/hostile.rs).
pub mod fake_broker;
/// A fault-injection TCP proxy for the recovery and pool tests (tests/recovery.rs, tests/pool.rs).
pub mod proxy;
/// A raw-socket publisher for what lepus refuses to encode (tests/hostile.rs).
pub mod raw_amqp;
