//! What one acquire/release pair of the channel pool costs: T threads (default 1) each
//! take a channel from one warm `ChannelPool` and drop the guard, N times (default
//! 100,000), and the program prints pairs per second. Under callgrind, with one thread,
//! the difference of two runs' instruction totals divided by the difference of their N is
//! the instructions per pair, a figure that a loaded machine does not blur:
//!
//! ```text
//! cargo bench --bench pool_pairs --no-run
//! target/release/deps/pool_pairs-* 200000 100      # pairs/s at 100 threads
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/a.cg target/release/deps/pool_pairs-* 10000
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/b.cg target/release/deps/pool_pairs-* 110000
//! ```
//! (against the broker of `AMQP_URL`; (summary of b - summary of a) / 100,000).

use std::sync::{Arc, Barrier};
use std::time::Instant;

fn main() {
    // `cargo bench` passes `--bench`; the numbers are N, then T.
    let nums: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let n = nums.first().copied().unwrap_or(100_000);
    let threads = nums.get(1).copied().unwrap_or(1).max(1);
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let conn = lepus::Connection::open(&url).expect("connect");
    let pool = lepus::ChannelPool::new(&conn);
    // Every channel the threads can hold at once is opened first: the steady state.
    let warm: Vec<_> = (0..threads.min(pool.max()))
        .map(|_| pool.acquire().expect("warm the pool"))
        .collect();
    drop(warm);
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (pool, barrier) = (pool.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                for _ in 0..n {
                    drop(pool.acquire().expect("acquire"));
                }
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for h in handles {
        h.join().expect("pool thread");
    }
    let secs = start.elapsed().as_secs_f64();
    let s = pool.stats();
    assert_eq!(s.acquired, s.released, "{s:?}");
    println!(
        "{threads} threads x {n} pairs: {:.0} pairs/s ({secs:.3} s); {s:?}",
        (threads * n) as f64 / secs
    );
    conn.close().expect("close");
}
