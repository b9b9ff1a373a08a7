//! The wake-up floor of a blocking confirm per message (see wake_floor.rs, the example
//! that prints it, and benches/results/wake-floor.md): T publisher threads and one
//! reader on the two ends of one socket; a publisher writes its id and sleeps until the
//! reader, woken by the socket, wakes it. Shared by the example and the suite (by path).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Barrier, Condvar, Mutex};
use std::time::Instant;

use super::cpu::{self, Usage};

/// One run: the process's CPU time over it and its length.
pub struct Floor {
    pub cpu: Usage,
    pub secs: f64,
}

/// Either kind of socket: an id written by any publisher thread, read by the reader.
trait Stream: Read + Send + Sync {
    fn send(&self, id: [u8; 2]);
}

impl Stream for UnixStream {
    fn send(&self, id: [u8; 2]) {
        let mut s: &UnixStream = self;
        s.write_all(&id).expect("write");
    }
}

impl Stream for TcpStream {
    fn send(&self, id: [u8; 2]) {
        let mut s: &TcpStream = self;
        s.write_all(&id).expect("write");
    }
}

/// One publisher's wait: set by the reader, taken by the publisher.
#[derive(Default)]
struct Slot {
    done: Mutex<bool>,
    cv: Condvar,
}

/// `threads` (at most 65,535) publishers, `per` round trips each, over loopback TCP
/// with TCP_NODELAY (`tcp`) or a Unix socket pair. The figures count from the release of
/// the publishers until the last one is joined (its exit included, as the suite's
/// publish figures include lepus's threads' exits).
pub fn run(threads: usize, per: usize, tcp: bool) -> Floor {
    let threads = threads.clamp(1, usize::from(u16::MAX));
    let (a, mut b): (Box<dyn Stream>, Box<dyn Stream>) = if tcp {
        let l = TcpListener::bind("127.0.0.1:0").expect("listen");
        let a = TcpStream::connect(l.local_addr().expect("address")).expect("connect");
        let (b, _) = l.accept().expect("accept");
        a.set_nodelay(true).expect("TCP_NODELAY");
        b.set_nodelay(true).expect("TCP_NODELAY");
        (Box::new(a), Box::new(b))
    } else {
        let (a, b) = UnixStream::pair().expect("socket pair");
        (Box::new(a), Box::new(b))
    };
    let a: Arc<dyn Stream> = Arc::from(a);
    let slots: Arc<Vec<Slot>> = Arc::new((0..threads).map(|_| Slot::default()).collect());
    let total = threads * per;

    // The reader: read what came, wake each id's publisher. An id split between two
    // reads waits in `half` for its second byte.
    let reader = {
        let slots = slots.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut half: Option<u8> = None;
            let mut seen = 0;
            while seen < total {
                let n = b.read(&mut buf).expect("read");
                assert!(n > 0, "the publishers' end closed early");
                for &byte in &buf[..n] {
                    let Some(hi) = half.take() else {
                        half = Some(byte);
                        continue;
                    };
                    let s = &slots[usize::from(u16::from_be_bytes([hi, byte]))];
                    *s.done.lock().unwrap() = true;
                    s.cv.notify_one();
                    seen += 1;
                }
            }
        })
    };

    let start = Arc::new(Barrier::new(threads + 1));
    let publishers: Vec<_> = (0..threads)
        .map(|i| {
            let (a, slots, start) = (a.clone(), slots.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                let s = &slots[i];
                let id = (i as u16).to_be_bytes();
                for _ in 0..per {
                    a.send(id);
                    let mut done = s.done.lock().unwrap();
                    while !*done {
                        done = s.cv.wait(done).unwrap();
                    }
                    *done = false;
                }
            })
        })
        .collect();

    let before = cpu::process();
    let t0 = Instant::now();
    start.wait();
    for p in publishers {
        p.join().expect("publisher");
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu::process().since(&before);
    reader.join().expect("reader");
    Floor { cpu, secs }
}
