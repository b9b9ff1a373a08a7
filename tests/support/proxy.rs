//! A fault-injection TCP proxy for recovery tests: in-process, on loopback, driven by the
//! test while traffic flows.
//!
//! [`Proxy::start`] listens on `127.0.0.1:0` and forwards every accepted connection to
//! the broker. Each forwarded connection (a "link") has four threads: a reader and a
//! writer per direction, joined by a bounded queue of chunks, so that latency delays
//! chunks without reordering them or limiting throughput.
//!
//! Faults and impairments, all switchable at any time:
//! - pass-through ([`Proxy::pass_through`] clears everything below);
//! - [`Proxy::reset`]: RST to both sides of every link (`SO_LINGER` 0, then close);
//! - [`Proxy::close`]: FIN to both sides of every link (orderly shutdown);
//! - [`Proxy::partition`] / [`Proxy::heal`]: nothing is forwarded in either direction
//!   (nor read, so the senders' windows fill up), on every link, new ones included, while
//!   every socket stays open; healing delivers what was held back, like TCP would;
//! - [`Proxy::set_latency`]: every chunk is delayed by `base ± jitter`;
//! - [`Proxy::set_bandwidth`]: at most so many bytes per second per direction;
//! - [`Proxy::set_slicing`]: forward in fragments of 1..=n bytes, each its own write
//!   (TCP_NODELAY), with a pause between, so the peers see frames cut anywhere;
//! - [`Proxy::refuse`]: new connections are accepted and reset at once.
//!
//! [`Proxy::connections`] counts the links forwarded so far, so a test can assert that a
//! fault caused exactly one reconnect. [`Proxy::watch_downstream`] timestamps the first
//! time given bytes come from the server (e.g. the broker's `connection.close`), which
//! dates a fault the test cannot time itself.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lepus::ConnectionOptions;
use socket2::SockRef;

/// How often idle proxy threads look at the control flags.
const POLL: Duration = Duration::from_millis(10);
/// Bytes read at once.
const CHUNK: usize = 16 * 1024;
/// Chunks queued between the reader and the writer of one direction.
const QUEUE: usize = 64;

#[derive(Debug, Clone, Copy, Default)]
struct Impairments {
    latency: Duration,
    jitter: Duration,
    bytes_per_sec: Option<u64>,
    /// Largest fragment and the pause after each.
    slicing: Option<(usize, Duration)>,
}

struct Shared {
    upstream: SocketAddr,
    stop: AtomicBool,
    partitioned: AtomicBool,
    refuse: AtomicBool,
    imp: Mutex<Impairments>,
    accepted: AtomicUsize,
    refused: AtomicUsize,
    accept_times: Mutex<Vec<Instant>>,
    links: Mutex<Vec<Arc<LinkCtl>>>,
    rng: AtomicU64,
    watch: Mutex<Watch>,
    /// Reset the link on which a client sends this (once).
    trigger: Mutex<Watch>,
    client_rcvbuf: Mutex<Option<usize>>,
}

/// Bytes to look for in what the server sends (`None` matches any byte), and when they
/// were first seen.
#[derive(Default)]
struct Watch {
    pattern: Vec<Option<u8>>,
    seen: Option<Instant>,
    /// For a trigger: how long the link stops reading before it is reset.
    hold: Duration,
}

impl Watch {
    fn check(&mut self, tail: &[u8], chunk: &[u8]) {
        if self.pattern.is_empty() || self.seen.is_some() {
            return;
        }
        let hay: Vec<u8> = tail.iter().chain(chunk).copied().collect();
        let p = &self.pattern;
        if hay.len() >= p.len()
            && hay.windows(p.len()).any(|w| {
                w.iter()
                    .zip(p)
                    .all(|(b, want)| want.is_none_or(|x| x == *b))
            })
        {
            self.seen = Some(Instant::now());
        }
    }
}

impl Shared {
    fn impairments(&self) -> Impairments {
        *self.imp.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// xorshift64*: good enough for jitter and fragment sizes.
    fn random(&self) -> u64 {
        let mut x = self.rng.load(Ordering::Relaxed);
        loop {
            let mut y = x;
            y ^= y >> 12;
            y ^= y << 25;
            y ^= y >> 27;
            match self
                .rng
                .compare_exchange_weak(x, y, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return y.wrapping_mul(0x2545_f491_4f6c_dd1d),
                Err(now) => x = now,
            }
        }
    }

    fn partitioned(&self) -> bool {
        self.partitioned.load(Ordering::SeqCst)
    }
}

/// Control block of one forwarded connection.
struct LinkCtl {
    /// Stop at once and drop whatever is queued (reset).
    abort: AtomicBool,
    /// Orderly close in progress: write errors are expected, no RST.
    closing: AtomicBool,
    /// The proxy's two sockets; the last thread of the link to end drops them (the
    /// threads hold clones, and a socket closes when its last descriptor does).
    socks: Mutex<Option<(TcpStream, TcpStream)>>,
    /// Threads of this link still running.
    live: AtomicUsize,
}

impl LinkCtl {
    fn aborted(&self) -> bool {
        self.abort.load(Ordering::SeqCst)
    }

    fn finished(&self) -> bool {
        self.live.load(Ordering::SeqCst) == 0
    }

    /// Make both sockets send RST when closed, and wake the readers. Nothing more is
    /// written after this.
    fn abort(&self) {
        self.abort.store(true, Ordering::SeqCst);
        if let Some((c, s)) = &*self.socks.lock().unwrap_or_else(|e| e.into_inner()) {
            for sock in [c, s] {
                let _ = SockRef::from(sock).set_linger(Some(Duration::ZERO));
                // Wakes a blocked read (it returns 0) without sending anything.
                let _ = sock.shutdown(Shutdown::Read);
            }
        }
    }

    /// FIN to both sides.
    fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        if let Some((c, s)) = &*self.socks.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = c.shutdown(Shutdown::Both);
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Decrements the link's live count when its thread ends; the last one closes the
/// sockets. Declared before the thread's socket clone, so it runs after that is dropped.
struct ExitGuard(Arc<LinkCtl>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::SeqCst) == 1 {
            let socks = self
                .0
                .socks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            drop(socks);
        }
    }
}

enum Chunk {
    Data { due: Instant, bytes: Vec<u8> },
    Eof,
}

/// The fault-injection proxy. Dropping it resets every link and stops listening.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    /// A proxy to the test broker.
    pub fn start() -> Proxy {
        Self::start_to(super::broker_addr())
    }

    /// A proxy to `upstream`.
    pub fn start_to(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            ^ (u64::from(addr.port()) << 32);
        let shared = Arc::new(Shared {
            upstream,
            stop: AtomicBool::new(false),
            partitioned: AtomicBool::new(false),
            refuse: AtomicBool::new(false),
            imp: Mutex::new(Impairments::default()),
            accepted: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
            accept_times: Mutex::new(Vec::new()),
            links: Mutex::new(Vec::new()),
            rng: AtomicU64::new(seed | 1),
            watch: Mutex::new(Watch::default()),
            trigger: Mutex::new(Watch::default()),
            client_rcvbuf: Mutex::new(None),
        });
        let st = shared.clone();
        let accept = std::thread::Builder::new()
            .name("proxy-accept".into())
            .spawn(move || accept_loop(listener, st))
            .expect("spawn the proxy");
        Proxy {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Test options (short deadlines) that connect through this proxy.
    pub fn options(&self) -> ConnectionOptions {
        super::test_options().host("127.0.0.1").port(self.port())
    }

    /// Connections accepted and forwarded so far (refused ones not included).
    pub fn connections(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections refused (accepted and reset at once) so far.
    pub fn refused(&self) -> usize {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// When each forwarded connection was accepted, oldest first.
    pub fn accept_times(&self) -> Vec<Instant> {
        self.shared
            .accept_times
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Links still forwarding (or holding their sockets open).
    pub fn active(&self) -> usize {
        let mut links = self.shared.links.lock().unwrap_or_else(|e| e.into_inner());
        links.retain(|l| !l.finished());
        links.len()
    }

    /// Back to plain forwarding: heal a partition, no latency, no bandwidth limit, no
    /// slicing, accept connections.
    pub fn pass_through(&self) {
        *self.shared.imp.lock().unwrap_or_else(|e| e.into_inner()) = Impairments::default();
        self.shared.refuse.store(false, Ordering::SeqCst);
        self.heal();
    }

    /// Delay every chunk by `base` ± `jitter` (uniform), keeping the byte order.
    pub fn set_latency(&self, base: Duration, jitter: Duration) {
        let mut imp = self.shared.imp.lock().unwrap_or_else(|e| e.into_inner());
        imp.latency = base;
        imp.jitter = jitter.min(base);
    }

    /// Limit each direction of each link to `bytes_per_sec` (`None`: unlimited).
    pub fn set_bandwidth(&self, bytes_per_sec: Option<u64>) {
        self.shared
            .imp
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bytes_per_sec = bytes_per_sec.map(|b| b.max(1));
    }

    /// Forward in fragments of 1..=`max_fragment` bytes (random sizes), each written
    /// separately, with `pause` after each (`None`: whole chunks).
    pub fn set_slicing(&self, slicing: Option<(usize, Duration)>) {
        self.shared
            .imp
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .slicing = slicing.map(|(n, p)| (n.max(1), p));
    }

    /// Accept new connections and reset them at once (`true`), or forward them again.
    pub fn refuse(&self, on: bool) {
        self.shared.refuse.store(on, Ordering::SeqCst);
    }

    /// Stop forwarding in both directions on every link (new ones too); sockets stay open.
    pub fn partition(&self) {
        self.shared.partitioned.store(true, Ordering::SeqCst);
    }

    /// Forward again; what was held back is delivered.
    pub fn heal(&self) {
        self.shared.partitioned.store(false, Ordering::SeqCst);
    }

    /// True while partitioned.
    pub fn is_partitioned(&self) -> bool {
        self.shared.partitioned()
    }

    /// Watch what servers send for `pattern` (`None` matches any byte); forgets an
    /// earlier hit. See [`Proxy::watch_hit`].
    pub fn watch_downstream(&self, pattern: Vec<Option<u8>>) {
        *self.shared.watch.lock().unwrap_or_else(|e| e.into_inner()) = Watch {
            pattern,
            seen: None,
            hold: Duration::ZERO,
        };
    }

    /// When the watched pattern first arrived from a server (read by the proxy, which
    /// forwards it at once unless impaired).
    pub fn watch_hit(&self) -> Option<Instant> {
        self.shared
            .watch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .seen
    }

    /// Reset the link on which a client next sends `pattern` (`None` matches any byte):
    /// once the proxy reads it, that direction stops (nothing of the chunk is forwarded,
    /// nothing more is read, so the client's buffers fill up) for `hold`, then both sides
    /// get an RST. Fires once; [`Proxy::trigger_hit`] tells when.
    pub fn reset_when_client_sends(&self, pattern: Vec<Option<u8>>, hold: Duration) {
        *self
            .shared
            .trigger
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Watch {
            pattern,
            seen: None,
            hold,
        };
    }

    /// Receive buffer of the proxy's client-side socket of links accepted from now on
    /// (`None`: the system's default), to make a client's writes back up sooner.
    pub fn set_client_recv_buffer(&self, bytes: Option<usize>) {
        *self
            .shared
            .client_rcvbuf
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = bytes;
    }

    /// When the trigger of [`Proxy::reset_when_client_sends`] fired.
    pub fn trigger_hit(&self) -> Option<Instant> {
        self.shared
            .trigger
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .seen
    }

    fn take_links(&self) -> Vec<Arc<LinkCtl>> {
        let mut links = self.shared.links.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *links)
            .into_iter()
            .filter(|l| !l.finished())
            .collect()
    }

    /// RST both sides of every link, and return once the resets have been sent. Returns
    /// how many links there were.
    pub fn reset(&self) -> usize {
        let links = self.take_links();
        for l in &links {
            l.abort();
        }
        wait_finished(&links);
        links.len()
    }

    /// FIN both sides of every link; returns how many links there were.
    pub fn close(&self) -> usize {
        let links = self.take_links();
        for l in &links {
            l.close();
        }
        wait_finished(&links);
        links.len()
    }
}

fn wait_finished(links: &[Arc<LinkCtl>]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while links.iter().any(|l| !l.finished()) {
        assert!(
            Instant::now() < deadline,
            "proxy links did not stop within 5 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        self.heal();
        self.reset();
    }
}

fn accept_loop(listener: TcpListener, st: Arc<Shared>) {
    loop {
        let accepted = listener.accept();
        if st.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok((client, _)) = accepted else {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        };
        if st.refuse.load(Ordering::SeqCst) {
            st.refused.fetch_add(1, Ordering::SeqCst);
            let _ = SockRef::from(&client).set_linger(Some(Duration::ZERO));
            drop(client);
            continue;
        }
        let Ok(server) = TcpStream::connect_timeout(&st.upstream, Duration::from_secs(5)) else {
            let _ = SockRef::from(&client).set_linger(Some(Duration::ZERO));
            continue;
        };
        st.accepted.fetch_add(1, Ordering::SeqCst);
        st.accept_times
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Instant::now());
        if let Err(e) = start_link(&st, client, server) {
            panic!("proxy: could not set up a link: {e}");
        }
    }
}

fn start_link(st: &Arc<Shared>, client: TcpStream, server: TcpStream) -> std::io::Result<()> {
    if let Some(n) = *st.client_rcvbuf.lock().unwrap_or_else(|e| e.into_inner()) {
        SockRef::from(&client).set_recv_buffer_size(n)?;
    }
    for s in [&client, &server] {
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(POLL))?;
        s.set_write_timeout(Some(POLL))?;
    }
    let ctl = Arc::new(LinkCtl {
        abort: AtomicBool::new(false),
        closing: AtomicBool::new(false),
        socks: Mutex::new(Some((client.try_clone()?, server.try_clone()?))),
        live: AtomicUsize::new(4),
    });
    st.links
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(ctl.clone());
    let (up_tx, up_rx) = mpsc::sync_channel(QUEUE);
    let (down_tx, down_rx) = mpsc::sync_channel(QUEUE);
    let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
        let g = ExitGuard(ctl.clone());
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let _g = g;
                f();
            })
            .map(|_| ())
    };
    let (c_read, c_write, s_read, s_write) =
        (client.try_clone()?, client, server.try_clone()?, server);
    let (a, b, c, d) = (ctl.clone(), ctl.clone(), ctl.clone(), ctl.clone());
    let (s1, s2, s3, s4) = (st.clone(), st.clone(), st.clone(), st.clone());
    spawn(
        "proxy-read-up",
        Box::new(move || reader(c_read, up_tx, a, s1, false)),
    )?;
    spawn(
        "proxy-write-up",
        Box::new(move || writer(s_write, up_rx, b, s2)),
    )?;
    spawn(
        "proxy-read-down",
        Box::new(move || reader(s_read, down_tx, c, s3, true)),
    )?;
    spawn(
        "proxy-write-down",
        Box::new(move || writer(c_write, down_rx, d, s4)),
    )?;
    Ok(())
}

fn reader(
    mut from: TcpStream,
    tx: SyncSender<Chunk>,
    ctl: Arc<LinkCtl>,
    st: Arc<Shared>,
    from_server: bool,
) {
    let mut last_due = Instant::now();
    // The end of the previous chunk, for watched patterns cut between two chunks.
    let mut tail: Vec<u8> = Vec::new();
    loop {
        if ctl.aborted() {
            return;
        }
        if st.partitioned() {
            // Not even reading: the sender's window fills up, as on a dead network.
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let mut buf = vec![0u8; CHUNK];
        match from.read(&mut buf) {
            Ok(0) => {
                if !ctl.aborted() {
                    let _ = tx.send(Chunk::Eof);
                }
                return;
            }
            Ok(n) => {
                buf.truncate(n);
                let watch = if from_server { &st.watch } else { &st.trigger };
                let mut w = watch.lock().unwrap_or_else(|e| e.into_inner());
                if !w.pattern.is_empty() && w.seen.is_none() {
                    w.check(&tail, &buf);
                    if w.seen.is_some() && !from_server {
                        let hold = w.hold;
                        drop(w);
                        std::thread::sleep(hold);
                        ctl.abort();
                        return;
                    }
                    let keep = w.pattern.len().saturating_sub(1).min(buf.len());
                    tail = buf[buf.len() - keep..].to_vec();
                }
                drop(w);
                let imp = st.impairments();
                let mut delay = imp.latency;
                if !imp.jitter.is_zero() {
                    let span = imp.jitter.as_nanos() as u64 * 2 + 1;
                    delay = delay + Duration::from_nanos(st.random() % span) - imp.jitter;
                }
                // Never reorder: a chunk is due no earlier than the one before it.
                let due = (Instant::now() + delay).max(last_due);
                last_due = due;
                if tx.send(Chunk::Data { due, bytes: buf }).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => {
                // The peer reset (or the socket broke): pass the reset on.
                if !ctl.closing.load(Ordering::SeqCst) {
                    ctl.abort();
                }
                return;
            }
        }
    }
}

fn writer(mut to: TcpStream, rx: Receiver<Chunk>, ctl: Arc<LinkCtl>, st: Arc<Shared>) {
    loop {
        if ctl.aborted() {
            return;
        }
        let chunk = match rx.recv_timeout(POLL) {
            Ok(c) => c,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        match chunk {
            Chunk::Eof => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Chunk::Data { due, bytes } => {
                // Latency, then a partition holds it back.
                loop {
                    if ctl.aborted() {
                        return;
                    }
                    let now = Instant::now();
                    if st.partitioned() {
                        std::thread::sleep(Duration::from_millis(1));
                    } else if now < due {
                        std::thread::sleep((due - now).min(POLL));
                    } else {
                        break;
                    }
                }
                if !write_impaired(&mut to, &bytes, &ctl, &st) {
                    if !ctl.closing.load(Ordering::SeqCst) {
                        ctl.abort();
                    }
                    return;
                }
            }
        }
    }
}

/// Write `bytes`, sliced and rate-limited as configured; false if the link ended.
fn write_impaired(to: &mut TcpStream, bytes: &[u8], ctl: &LinkCtl, st: &Shared) -> bool {
    let mut pos = 0;
    while pos < bytes.len() {
        let imp = st.impairments();
        let mut piece = bytes.len() - pos;
        if let Some((max, _)) = imp.slicing {
            piece = piece.min(1 + (st.random() % max as u64) as usize);
        }
        if let Some(rate) = imp.bytes_per_sec {
            // About 10 ms worth at a time.
            piece = piece.min((rate / 100).max(1) as usize);
        }
        if !write_all(to, &bytes[pos..pos + piece], ctl, st) {
            return false;
        }
        pos += piece;
        if let Some((_, pause)) = imp.slicing {
            if !pause.is_zero() {
                std::thread::sleep(pause);
            }
        }
        if let Some(rate) = imp.bytes_per_sec {
            std::thread::sleep(Duration::from_secs_f64(piece as f64 / rate as f64));
        }
    }
    true
}

fn write_all(to: &mut TcpStream, mut bytes: &[u8], ctl: &LinkCtl, st: &Shared) -> bool {
    while !bytes.is_empty() {
        if ctl.aborted() {
            return false;
        }
        if st.partitioned() {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        match to.write(bytes) {
            Ok(0) => return false,
            Ok(n) => bytes = &bytes[n..],
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => return false,
        }
    }
    true
}
