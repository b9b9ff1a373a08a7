//! A fault-injection TCP proxy: in-process, on loopback, driven by the test while traffic flows.
//!
//! [`Proxy::start`] listens on `127.0.0.1:0` and forwards every accepted connection (a
//! [`Link`]) to the upstream address, usually a broker. Faults and impairments can be
//! switched at any time, on every link at once (the `Proxy` methods, which also apply to
//! links accepted later) or on one link (the [`Link`] methods):
//!
//! | fault | every link | one link |
//! |---|---|---|
//! | RST to both sides (`SO_LINGER` 0, then close) | [`Proxy::reset`] | [`Link::reset`] |
//! | FIN to both sides (orderly close) | [`Proxy::close`] | [`Link::close`] |
//! | partition: nothing read or forwarded either way, sockets stay open | [`Proxy::partition`] / [`Proxy::heal`] | [`Link::partition`] / [`Link::heal`] |
//! | stop reading one direction (the sender's buffers fill up) | [`Proxy::hold`] / [`Proxy::release`] | [`Link::hold`] / [`Link::release`] |
//! | latency `base ± jitter` per chunk, order kept | [`Proxy::set_latency`] | |
//! | bandwidth cap per direction | [`Proxy::set_bandwidth`] | |
//! | writes sliced into 1..=n bytes (frames cut anywhere) | [`Proxy::set_slicing`] | |
//! | new connections accepted and reset at once | [`Proxy::refuse`] | |
//! | RST when the client sends given bytes | [`Proxy::reset_when_client_sends`] | |
//!
//! What a partition does not model: a connection attempted during it still completes at
//! the TCP level (the kernel accepts it), but no byte passes until healed; held bytes are
//! delivered on healing, as TCP would retransmit them.
//!
//! [`Proxy::connections`] counts the links forwarded so far, so a test can assert that a
//! fault caused exactly one reconnect. [`Proxy::watch_downstream`] timestamps the first
//! time given bytes come from the server (e.g. the broker's `connection.close`), which
//! dates a fault the test cannot time itself.

mod link;

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::SockRef;

use link::{LinkCtl, Watch, wait_finished};

/// A direction of traffic through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the client to the server (upstream).
    ToServer = 0,
    /// From the server to the client (downstream).
    ToClient = 1,
}

#[derive(Debug, Clone, Copy, Default)]
struct Impairments {
    latency: Duration,
    jitter: Duration,
    bytes_per_sec: Option<u64>,
    /// Largest fragment and the pause after each.
    slicing: Option<(usize, Duration)>,
}

/// A poisoned lock only means a proxy thread panicked; the data is still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Shared {
    upstream: SocketAddr,
    stop: AtomicBool,
    /// Directions held on every link, indexed by [`Direction`].
    held: [AtomicBool; 2],
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

impl Shared {
    fn impairments(&self) -> Impairments {
        *lock(&self.imp)
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

    fn set_held(&self, dir: Direction, on: bool) {
        self.held[dir as usize].store(on, Ordering::SeqCst);
    }
}

/// The fault-injection proxy. Dropping it resets every link and stops listening.
///
/// ```no_run
/// use std::time::Duration;
/// use lepus_testkit::Proxy;
///
/// // Between the application under test and a broker on 127.0.0.1:5672.
/// let proxy = Proxy::start("127.0.0.1:5672")?;
/// let port = proxy.port(); // point the client at 127.0.0.1:port
/// // ... connect the client, start traffic ...
/// proxy.set_latency(Duration::from_millis(20), Duration::from_millis(5));
/// proxy.partition(); // the broker goes silent; heartbeats should notice
/// std::thread::sleep(Duration::from_secs(3));
/// proxy.heal();
/// let links = proxy.reset(); // RST on every connection
/// assert_eq!(links, 1);
/// // ... assert the client reconnected, exactly once:
/// assert_eq!(proxy.connections(), 2);
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listen on an ephemeral port of 127.0.0.1 and forward to `upstream` (its first
    /// address).
    pub fn start(upstream: impl ToSocketAddrs) -> io::Result<Proxy> {
        let upstream = upstream.to_socket_addrs()?.next().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "upstream resolves to nothing")
        })?;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            ^ (u64::from(addr.port()) << 32);
        let shared = Arc::new(Shared {
            upstream,
            stop: AtomicBool::new(false),
            held: [AtomicBool::new(false), AtomicBool::new(false)],
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
            .spawn(move || accept_loop(listener, st))?;
        Ok(Proxy {
            addr,
            shared,
            accept: Some(accept),
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The proxy's port (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Where the proxy forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
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
        lock(&self.shared.accept_times).clone()
    }

    /// Links still forwarding (or holding their sockets open).
    pub fn active(&self) -> usize {
        let mut links = lock(&self.shared.links);
        links.retain(|l| !l.finished());
        links.len()
    }

    /// The links still forwarding, oldest first, for faults on one connection.
    pub fn links(&self) -> Vec<Link> {
        let mut links = lock(&self.shared.links);
        links.retain(|l| !l.finished());
        links.iter().map(|l| Link(l.clone())).collect()
    }

    /// Back to plain forwarding: heal a partition (and every hold), no latency, no
    /// bandwidth limit, no slicing, accept connections.
    pub fn pass_through(&self) {
        *lock(&self.shared.imp) = Impairments::default();
        self.shared.refuse.store(false, Ordering::SeqCst);
        self.heal();
    }

    /// Delay every chunk by `base` ± `jitter` (uniform, `jitter` capped at `base`),
    /// keeping the byte order and without limiting throughput.
    pub fn set_latency(&self, base: Duration, jitter: Duration) {
        let mut imp = lock(&self.shared.imp);
        imp.latency = base;
        imp.jitter = jitter.min(base);
    }

    /// Limit each direction of each link to `bytes_per_sec` (`None`: unlimited).
    pub fn set_bandwidth(&self, bytes_per_sec: Option<u64>) {
        lock(&self.shared.imp).bytes_per_sec = bytes_per_sec.map(|b| b.max(1));
    }

    /// Forward in fragments of 1..=`max_fragment` bytes (random sizes), each written
    /// separately (TCP_NODELAY), with `pause` after each (`None`: whole chunks), so the
    /// peers see frames cut anywhere.
    pub fn set_slicing(&self, slicing: Option<(usize, Duration)>) {
        lock(&self.shared.imp).slicing = slicing.map(|(n, p)| (n.max(1), p));
    }

    /// Accept new connections and reset them at once (`true`), or forward them again.
    pub fn refuse(&self, on: bool) {
        self.shared.refuse.store(on, Ordering::SeqCst);
    }

    /// Stop forwarding in both directions on every link (new ones too); sockets stay
    /// open and nothing is read, so the senders' windows fill up as on a dead network.
    pub fn partition(&self) {
        self.hold(Direction::ToServer);
        self.hold(Direction::ToClient);
    }

    /// End a partition and every hold of the proxy; what was held back is delivered.
    /// (Holds set on one [`Link`] stay.)
    pub fn heal(&self) {
        self.release(Direction::ToServer);
        self.release(Direction::ToClient);
    }

    /// True while both directions are held on every link.
    pub fn is_partitioned(&self) -> bool {
        self.shared.held.iter().all(|h| h.load(Ordering::SeqCst))
    }

    /// Stop reading (and forwarding) `dir` on every link, new ones too: e.g. with
    /// [`Direction::ToServer`] the client's writes back up while the server still talks.
    pub fn hold(&self, dir: Direction) {
        self.shared.set_held(dir, true);
    }

    /// Forward `dir` again; what was held back is delivered.
    pub fn release(&self, dir: Direction) {
        self.shared.set_held(dir, false);
    }

    /// Watch what servers send for `pattern` (`None` matches any byte); forgets an
    /// earlier hit. See [`Proxy::watch_hit`].
    pub fn watch_downstream(&self, pattern: Vec<Option<u8>>) {
        *lock(&self.shared.watch) = Watch {
            pattern,
            seen: None,
            hold: Duration::ZERO,
        };
    }

    /// When the watched pattern first arrived from a server (read by the proxy, which
    /// forwards it at once unless impaired).
    pub fn watch_hit(&self) -> Option<Instant> {
        lock(&self.shared.watch).seen
    }

    /// Reset the link on which a client next sends `pattern` (`None` matches any byte):
    /// once the proxy reads it, that direction stops (nothing of the chunk is forwarded,
    /// nothing more is read, so the client's buffers fill up) for `hold`, then both sides
    /// get an RST. Fires once; [`Proxy::trigger_hit`] tells when.
    pub fn reset_when_client_sends(&self, pattern: Vec<Option<u8>>, hold: Duration) {
        *lock(&self.shared.trigger) = Watch {
            pattern,
            seen: None,
            hold,
        };
    }

    /// When the trigger of [`Proxy::reset_when_client_sends`] fired.
    pub fn trigger_hit(&self) -> Option<Instant> {
        lock(&self.shared.trigger).seen
    }

    /// Receive buffer of the proxy's client-side socket of links accepted from now on
    /// (`None`: the system's default), to make a client's writes back up sooner.
    pub fn set_client_recv_buffer(&self, bytes: Option<usize>) {
        *lock(&self.shared.client_rcvbuf) = bytes;
    }

    fn take_links(&self) -> Vec<Arc<LinkCtl>> {
        std::mem::take(&mut *lock(&self.shared.links))
            .into_iter()
            .filter(|l| !l.finished())
            .collect()
    }

    /// RST both sides of every link, and return once the resets have been sent. Returns
    /// how many links there were. New connections are accepted at once.
    ///
    /// # Panics
    ///
    /// If the links' threads do not end within 5 s (a bug of the proxy).
    pub fn reset(&self) -> usize {
        let links = self.take_links();
        for l in &links {
            l.abort();
        }
        wait_finished(&links);
        links.len()
    }

    /// FIN both sides of every link (what is held or queued is dropped); returns how
    /// many links there were.
    ///
    /// # Panics
    ///
    /// As [`Proxy::reset`].
    pub fn close(&self) -> usize {
        let links = self.take_links();
        for l in &links {
            l.close();
        }
        wait_finished(&links);
        links.len()
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

/// One forwarded connection, for faults on it alone. A handle: the link itself lives
/// until it is reset or closed, whether or not the handle is kept.
#[derive(Clone)]
pub struct Link(Arc<LinkCtl>);

impl Link {
    /// 0 for the first connection the proxy forwarded, 1 for the next...
    pub fn id(&self) -> usize {
        self.0.id
    }

    /// When the proxy accepted it.
    pub fn accepted_at(&self) -> Instant {
        self.0.accepted_at
    }

    /// False once its threads have ended (reset, closed, or both peers gone).
    pub fn is_open(&self) -> bool {
        !self.0.finished()
    }

    /// RST both sides of this link; returns once the resets have been sent.
    ///
    /// # Panics
    ///
    /// As [`Proxy::reset`].
    pub fn reset(&self) {
        self.0.abort();
        wait_finished(std::slice::from_ref(&self.0));
    }

    /// FIN both sides of this link.
    ///
    /// # Panics
    ///
    /// As [`Proxy::reset`].
    pub fn close(&self) {
        self.0.close();
        wait_finished(std::slice::from_ref(&self.0));
    }

    /// Stop reading and forwarding both directions of this link.
    pub fn partition(&self) {
        self.hold(Direction::ToServer);
        self.hold(Direction::ToClient);
    }

    /// End this link's partition and holds (the proxy's own still apply).
    pub fn heal(&self) {
        self.release(Direction::ToServer);
        self.release(Direction::ToClient);
    }

    /// Stop reading and forwarding `dir` on this link.
    pub fn hold(&self, dir: Direction) {
        self.0.held[dir as usize].store(true, Ordering::SeqCst);
    }

    /// Forward `dir` of this link again.
    pub fn release(&self, dir: Direction) {
        self.0.held[dir as usize].store(false, Ordering::SeqCst);
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
            // Upstream down: the client sees its connection reset, as a refused one.
            let _ = SockRef::from(&client).set_linger(Some(Duration::ZERO));
            continue;
        };
        let id = st.accepted.fetch_add(1, Ordering::SeqCst);
        lock(&st.accept_times).push(Instant::now());
        if let Err(e) = link::start(&st, id, client, server) {
            // Out of threads or descriptors: the half-made link is reset and the proxy
            // goes on.
            eprintln!("proxy: could not set up a link: {e}");
        }
    }
}

#[cfg(test)]
mod tests;
