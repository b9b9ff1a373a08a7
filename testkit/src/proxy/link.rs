//! One forwarded connection of the proxy: its control block and its four relay threads.
//!
//! A reader and a writer per direction, joined by a bounded queue of chunks, so that
//! latency delays chunks without reordering them or limiting throughput.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use socket2::SockRef;

use super::{Direction, Shared, lock};

/// How often idle proxy threads look at the control flags.
pub(super) const POLL: Duration = Duration::from_millis(10);
/// Bytes read at once.
const CHUNK: usize = 16 * 1024;
/// Chunks queued between the reader and the writer of one direction.
const QUEUE: usize = 64;

/// Bytes to look for in one direction (`None` matches any byte), and when they were
/// first seen.
#[derive(Default)]
pub(super) struct Watch {
    pub(super) pattern: Vec<Option<u8>>,
    pub(super) seen: Option<Instant>,
    /// For a trigger: how long the link stops reading before it is reset.
    pub(super) hold: Duration,
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

/// Control block of one forwarded connection.
pub(super) struct LinkCtl {
    pub(super) id: usize,
    pub(super) accepted_at: Instant,
    /// Stop at once and drop whatever is queued (reset).
    abort: AtomicBool,
    /// Orderly close in progress: write errors are expected, no RST.
    closing: AtomicBool,
    /// Directions held on this link only (the proxy's own holds apply too).
    pub(super) held: [AtomicBool; 2],
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

    /// Reset or closed: nothing more to forward.
    fn stopped(&self) -> bool {
        self.aborted() || self.closing.load(Ordering::SeqCst)
    }

    pub(super) fn finished(&self) -> bool {
        self.live.load(Ordering::SeqCst) == 0
    }

    /// Make both sockets send RST when closed, and wake the readers. Nothing more is
    /// written after this.
    pub(super) fn abort(&self) {
        self.abort.store(true, Ordering::SeqCst);
        if let Some((c, s)) = &*lock(&self.socks) {
            for sock in [c, s] {
                let _ = SockRef::from(sock).set_linger(Some(Duration::ZERO));
                // Wakes a blocked read (it returns 0) without sending anything.
                let _ = sock.shutdown(Shutdown::Read);
            }
        }
    }

    /// FIN to both sides; what is still queued or held is dropped.
    pub(super) fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        if let Some((c, s)) = &*lock(&self.socks) {
            let _ = c.shutdown(Shutdown::Both);
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn held(&self, st: &Shared, dir: Direction) -> bool {
        st.held[dir as usize].load(Ordering::SeqCst)
            || self.held[dir as usize].load(Ordering::SeqCst)
    }
}

/// Wait (at most 5 s) until every thread of `links` has ended, so their sockets are closed.
///
/// # Panics
///
/// If a link is still running after 5 s (a bug of the proxy).
pub(super) fn wait_finished(links: &[Arc<LinkCtl>]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while links.iter().any(|l| !l.finished()) {
        assert!(
            Instant::now() < deadline,
            "proxy links did not stop within 5 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Decrements the link's live count when its thread ends; the last one closes the
/// sockets. Declared before the thread's socket clone, so it runs after that is dropped.
struct ExitGuard(Arc<LinkCtl>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::SeqCst) == 1 {
            let socks = lock(&self.0.socks).take();
            drop(socks);
        }
    }
}

/// The body of one relay thread.
type Job = Box<dyn FnOnce() + Send>;

enum Chunk {
    Data { due: Instant, bytes: Vec<u8> },
    Eof,
}

/// Set up the sockets of a new link and start its four threads.
pub(super) fn start(
    st: &Arc<Shared>,
    id: usize,
    client: TcpStream,
    server: TcpStream,
) -> std::io::Result<()> {
    if let Some(n) = *lock(&st.client_rcvbuf) {
        SockRef::from(&client).set_recv_buffer_size(n)?;
    }
    for s in [&client, &server] {
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(POLL))?;
        s.set_write_timeout(Some(POLL))?;
    }
    let ctl = Arc::new(LinkCtl {
        id,
        accepted_at: Instant::now(),
        abort: AtomicBool::new(false),
        closing: AtomicBool::new(false),
        held: [AtomicBool::new(false), AtomicBool::new(false)],
        socks: Mutex::new(Some((client.try_clone()?, server.try_clone()?))),
        live: AtomicUsize::new(4),
    });
    // Listed before its threads start, so a reset issued meanwhile reaches it.
    lock(&st.links).push(ctl.clone());
    let (up_tx, up_rx) = mpsc::sync_channel(QUEUE);
    let (down_tx, down_rx) = mpsc::sync_channel(QUEUE);
    let (c_read, c_write, s_read, s_write) =
        (client.try_clone()?, client, server.try_clone()?, server);
    let (up, down) = (Direction::ToServer, Direction::ToClient);
    let (a, b, c, d) = (ctl.clone(), ctl.clone(), ctl.clone(), ctl.clone());
    let (s1, s2, s3, s4) = (st.clone(), st.clone(), st.clone(), st.clone());
    let threads: [(&str, Job); 4] = [
        (
            "proxy-read-up",
            Box::new(move || reader(c_read, up_tx, a, s1, up)),
        ),
        (
            "proxy-write-up",
            Box::new(move || writer(s_write, up_rx, b, s2, up)),
        ),
        (
            "proxy-read-down",
            Box::new(move || reader(s_read, down_tx, c, s3, down)),
        ),
        (
            "proxy-write-down",
            Box::new(move || writer(c_write, down_rx, d, s4, down)),
        ),
    ];
    for (started, (name, f)) in threads.into_iter().enumerate() {
        let g = ExitGuard(ctl.clone());
        let spawned = std::thread::Builder::new()
            .name(name.into())
            .stack_size(256 * 1024)
            .spawn(move || {
                let _g = g;
                f();
            });
        if let Err(e) = spawned {
            // The guard went with the closure; the threads never started count down
            // here, so the link can finish.
            ctl.abort();
            ctl.live.fetch_sub(3 - started, Ordering::SeqCst);
            return Err(e);
        }
    }
    Ok(())
}

fn reader(
    mut from: TcpStream,
    tx: SyncSender<Chunk>,
    ctl: Arc<LinkCtl>,
    st: Arc<Shared>,
    dir: Direction,
) {
    let mut last_due = Instant::now();
    // The end of the previous chunk, for watched patterns cut between two chunks.
    let mut tail: Vec<u8> = Vec::new();
    loop {
        if ctl.stopped() {
            return;
        }
        if ctl.held(&st, dir) {
            // Not even reading: the sender's window fills up, as on a dead network.
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let mut buf = vec![0u8; CHUNK];
        match from.read(&mut buf) {
            Ok(0) => {
                if !ctl.stopped() {
                    let _ = tx.send(Chunk::Eof);
                }
                return;
            }
            Ok(n) => {
                buf.truncate(n);
                if watch(&st, &ctl, dir, &mut tail, &buf) {
                    return;
                }
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
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => {
                // The peer reset (or the socket broke): pass the reset on.
                if !ctl.stopped() {
                    ctl.abort();
                }
                return;
            }
        }
    }
}

/// Look for the watched pattern of this direction in `chunk`. Returns true when a
/// client-side trigger fired: the link has been held for the trigger's time and reset.
fn watch(st: &Shared, ctl: &LinkCtl, dir: Direction, tail: &mut Vec<u8>, chunk: &[u8]) -> bool {
    let from_server = dir == Direction::ToClient;
    let watch = if from_server { &st.watch } else { &st.trigger };
    let mut w = lock(watch);
    if w.pattern.is_empty() || w.seen.is_some() {
        return false;
    }
    w.check(tail, chunk);
    if w.seen.is_some() && !from_server {
        let hold = w.hold;
        drop(w);
        std::thread::sleep(hold);
        ctl.abort();
        return true;
    }
    let keep = w.pattern.len().saturating_sub(1).min(chunk.len());
    *tail = chunk[chunk.len() - keep..].to_vec();
    false
}

fn writer(
    mut to: TcpStream,
    rx: Receiver<Chunk>,
    ctl: Arc<LinkCtl>,
    st: Arc<Shared>,
    dir: Direction,
) {
    loop {
        if ctl.stopped() {
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
                    if ctl.stopped() {
                        return;
                    }
                    let now = Instant::now();
                    if ctl.held(&st, dir) {
                        std::thread::sleep(Duration::from_millis(1));
                    } else if now < due {
                        std::thread::sleep((due - now).min(POLL));
                    } else {
                        break;
                    }
                }
                if !write_impaired(&mut to, &bytes, &ctl, &st, dir) {
                    if !ctl.stopped() {
                        ctl.abort();
                    }
                    return;
                }
            }
        }
    }
}

/// Write `bytes`, sliced and rate-limited as configured; false if the link ended.
fn write_impaired(
    to: &mut TcpStream,
    bytes: &[u8],
    ctl: &LinkCtl,
    st: &Shared,
    dir: Direction,
) -> bool {
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
        if !write_all(to, &bytes[pos..pos + piece], ctl, st, dir) {
            return false;
        }
        pos += piece;
        if let Some((_, pause)) = imp.slicing
            && !pause.is_zero()
        {
            std::thread::sleep(pause);
        }
        if let Some(rate) = imp.bytes_per_sec {
            std::thread::sleep(Duration::from_secs_f64(piece as f64 / rate as f64));
        }
    }
    true
}

fn write_all(
    to: &mut TcpStream,
    mut bytes: &[u8],
    ctl: &LinkCtl,
    st: &Shared,
    dir: Direction,
) -> bool {
    while !bytes.is_empty() {
        if ctl.stopped() {
            return false;
        }
        if ctl.held(st, dir) {
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
