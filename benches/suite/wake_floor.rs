//! What a blocking confirm per message costs a thread-per-publisher client before any
//! AMQP work: the floor under lepus's confirm-each CPU per message (issue 16). No broker,
//! no protocol: T publisher threads and one "I/O" thread on a Unix socket pair, the
//! shape of one confirmed publish with nothing else in it:
//!
//! - a publisher writes one byte to the socket (lepus: its publish, written by the
//!   calling thread) and sleeps on its own condition variable (lepus: waiting for the
//!   confirm);
//! - the I/O thread sleeps in a blocking read of the other end (lepus: `epoll_wait`,
//!   then the read of the acks), and wakes the publisher of each byte it read (lepus: the
//!   confirm resolved, its waiter woken).
//!
//! Each message therefore costs what lepus's cannot do without while a publisher thread
//! blocks until its confirm: a socket write, a sleeping reader woken by the socket (its
//! reads batch what came meanwhile), and one thread woken through a futex and switched
//! to. Prints the process's CPU time per message and context switches per message
//! (getrusage), to set beside the suite's confirm-each CPU per message of lepus and its
//! peers (benches/results/wake-floor.md).
//!
//! With `tcp` the pair is a loopback TCP connection (TCP_NODELAY) instead, as lepus's
//! socket is: a write then also runs the receiving side's TCP work.
//!
//! ```text
//! cargo build --profile bench -p lepus-bench-suite --example wake-floor
//! target/release/examples/wake-floor [threads] [per_thread] [tcp]
//! ```

#[path = "cpu.rs"]
mod cpu;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Barrier, Condvar, Mutex};
use std::time::Instant;

/// Either kind of socket: one byte written by any publisher thread, read by the I/O
/// thread.
trait Stream: Read + Send + Sync {
    fn send(&self, byte: u8);
}

impl Stream for UnixStream {
    fn send(&self, byte: u8) {
        let mut s: &UnixStream = self;
        s.write_all(&[byte]).expect("write");
    }
}

impl Stream for TcpStream {
    fn send(&self, byte: u8) {
        let mut s: &TcpStream = self;
        s.write_all(&[byte]).expect("write");
    }
}

/// One publisher's wait: set by the I/O thread, taken by the publisher.
#[derive(Default)]
struct Slot {
    done: Mutex<bool>,
    cv: Condvar,
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let threads = args.first().copied().unwrap_or(10).clamp(1, 255);
    let per = args.get(1).copied().unwrap_or(10_000);
    let tcp = std::env::args().any(|a| a == "tcp");
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

    // The I/O thread: read what came, wake each byte's publisher.
    let io = {
        let slots = slots.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut seen = 0;
            while seen < total {
                let n = b.read(&mut buf).expect("read");
                assert!(n > 0, "the publishers' end closed early");
                for &i in &buf[..n] {
                    let s = &slots[i as usize];
                    *s.done.lock().unwrap() = true;
                    s.cv.notify_one();
                }
                seen += n;
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
                for _ in 0..per {
                    a.send(i as u8);
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
    let used = cpu::process().since(&before);
    io.join().expect("I/O thread");
    let m = total as f64;
    println!(
        "{} {threads} threads x {per}: {:.0} round trips/s; CPU {:.2} us/msg (user {:.2}, sys {:.2}); \
         voluntary switches {:.2}/msg, involuntary {:.2}/msg",
        if tcp { "tcp" } else { "unix" },
        m / secs,
        used.cpu_us() / m,
        used.user_us / m,
        used.sys_us / m,
        used.vcsw as f64 / m,
        used.ivcsw as f64 / m,
    );
}
