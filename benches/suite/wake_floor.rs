//! Prints the floor under lepus's confirm-each CPU per message (issue 16): what a
//! publisher thread that writes its publish and blocks until its confirm costs, with no
//! broker and no protocol (`floor.rs` says how it is measured; the suite runs the same
//! code in its confirm-each rounds). The process's CPU time and context switches per
//! message (getrusage); results in benches/results/wake-floor.md. Over a Unix socket
//! pair by default, over loopback TCP (TCP_NODELAY, as lepus's socket) with `tcp`.
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
