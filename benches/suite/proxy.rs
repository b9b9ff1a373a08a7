//! An in-process TCP fault proxy between lepus and the broker: reset every link (RST, by
//! closing with SO_LINGER 0), partition (hold all bytes, accept nothing, until healed),
//! add latency, cap bandwidth. Two relay threads per link; faults apply to live links
//! and to links accepted later.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::SockRef;

pub struct Proxy {
    addr: SocketAddr,
    state: Arc<State>,
    accept: Option<JoinHandle<()>>,
}

struct State {
    upstream: SocketAddr,
    links: Mutex<Vec<Arc<Link>>>,
    partitioned: AtomicBool,
    latency_us: AtomicU64,
    /// Bytes per second per direction of each link; 0 = unlimited.
    rate: AtomicU64,
    stop: AtomicBool,
    accepted: AtomicU64,
    resets: AtomicU64,
}

struct Link {
    client: TcpStream,
    server: TcpStream,
    dead: AtomicBool,
    /// Relay directions that ended normally.
    ended: AtomicU64,
}

impl Proxy {
    /// Listen on an ephemeral port of 127.0.0.1, forwarding to `upstream`.
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(State {
            upstream,
            links: Mutex::new(Vec::new()),
            partitioned: AtomicBool::new(false),
            latency_us: AtomicU64::new(0),
            rate: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
            resets: AtomicU64::new(0),
        });
        let st = state.clone();
        let accept = std::thread::Builder::new()
            .name("proxy-accept".into())
            .spawn(move || accept_loop(listener, st))
            .expect("spawn the proxy");
        Proxy {
            addr,
            state,
            accept: Some(accept),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Reset every live link (RST to both ends); returns the instant the first reset was
    /// issued and how many links were reset. New connections are accepted at once.
    pub fn reset_all(&self) -> (Instant, usize) {
        let links: Vec<Arc<Link>> = std::mem::take(&mut *self.state.links.lock().unwrap());
        let at = Instant::now();
        let mut n = 0;
        for l in &links {
            if l.dead.swap(true, Ordering::SeqCst) {
                continue;
            }
            n += 1;
            for s in [&l.client, &l.server] {
                let _ = SockRef::from(s).set_linger(Some(Duration::ZERO));
                // Wakes the relay blocked in read without sending anything; the last
                // handle closed then sends the RST (linger 0).
                let _ = s.shutdown(Shutdown::Read);
            }
        }
        self.state.resets.fetch_add(n as u64, Ordering::Relaxed);
        (at, n)
    }

    /// Hold every byte in both directions and accept no new link, until [`Proxy::heal`].
    pub fn partition(&self) -> Instant {
        self.state.partitioned.store(true, Ordering::SeqCst);
        Instant::now()
    }

    pub fn heal(&self) {
        self.state.partitioned.store(false, Ordering::SeqCst);
    }

    /// Delay every chunk relayed by `d` (0 to stop).
    pub fn set_latency(&self, d: Duration) {
        self.state
            .latency_us
            .store(d.as_micros() as u64, Ordering::SeqCst);
    }

    /// Cap each direction of each link at `bytes_per_sec` (0: no cap).
    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.state.rate.store(bytes_per_sec, Ordering::SeqCst);
    }

    /// Links accepted so far.
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        self.heal();
        self.reset_all();
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, st: Arc<State>) {
    while !st.stop.load(Ordering::SeqCst) {
        if st.partitioned.load(Ordering::SeqCst) {
            // Connection attempts wait in the backlog: no bytes come back until healed.
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        match listener.accept() {
            Ok((client, _)) => {
                let _ = client.set_nonblocking(false);
                let Ok(server) = TcpStream::connect_timeout(&st.upstream, Duration::from_secs(5))
                else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let link = Arc::new(Link {
                    client,
                    server,
                    dead: AtomicBool::new(false),
                    ended: AtomicU64::new(0),
                });
                st.links.lock().unwrap().push(link.clone());
                st.accepted.fetch_add(1, Ordering::SeqCst);
                for upstream in [true, false] {
                    let (l, s) = (link.clone(), st.clone());
                    let _ = std::thread::Builder::new()
                        .name("proxy-relay".into())
                        .stack_size(128 * 1024)
                        .spawn(move || relay(l, upstream, s));
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

fn relay(link: Arc<Link>, upstream: bool, st: Arc<State>) {
    let (mut from, mut to) = if upstream {
        (&link.client, &link.server)
    } else {
        (&link.server, &link.client)
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        // A partition holds everything, the end of the stream included.
        while st.partitioned.load(Ordering::SeqCst) && !link.dead.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        if link.dead.load(Ordering::SeqCst) {
            return;
        }
        if n == 0 {
            break;
        }
        let lat = st.latency_us.load(Ordering::SeqCst);
        if lat > 0 {
            std::thread::sleep(Duration::from_micros(lat));
        }
        let rate = st.rate.load(Ordering::SeqCst);
        if rate > 0 {
            // Pace in pieces so that a cap applies within a large chunk too.
            for piece in buf[..n].chunks(4096) {
                std::thread::sleep(Duration::from_secs_f64(piece.len() as f64 / rate as f64));
                if link.dead.load(Ordering::SeqCst) || to.write_all(piece).is_err() {
                    return;
                }
            }
            continue;
        }
        if link.dead.load(Ordering::SeqCst) || to.write_all(&buf[..n]).is_err() {
            return;
        }
    }
    // The peer closed its side: pass the end on (FIN), unless the link was reset.
    if !link.dead.load(Ordering::SeqCst) {
        let _ = to.shutdown(Shutdown::Write);
    }
    // Both directions over: forget the link.
    if link.ended.fetch_add(1, Ordering::SeqCst) == 1 {
        st.links.lock().unwrap().retain(|l| !Arc::ptr_eq(l, &link));
    }
}
