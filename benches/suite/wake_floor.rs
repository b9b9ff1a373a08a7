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
#[path = "floor.rs"]
mod floor;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let threads = args.first().copied().unwrap_or(10).max(1);
    let per = args.get(1).copied().unwrap_or(10_000);
    let tcp = std::env::args().any(|a| a == "tcp");
    let f = floor::run(threads, per, tcp);
    let m = (threads * per) as f64;
    println!(
        "{} {threads} threads x {per}: {:.0} round trips/s; CPU {:.2} us/msg (user {:.2}, sys {:.2}); \
         voluntary switches {:.2}/msg, involuntary {:.2}/msg",
        if tcp { "tcp" } else { "unix" },
        m / f.secs,
        f.cpu.cpu_us() / m,
        f.cpu.user_us / m,
        f.cpu.sys_us / m,
        f.cpu.vcsw as f64 / m,
        f.cpu.ivcsw as f64 / m,
    );
}
