//! What the always-on counters cost, by instruction counts: one workload (N publishes
//! without confirms, N confirmed in windows of 100, 2N consumed and acked, on one
//! connection) run under callgrind in a normal build and in one built with
//! `--cfg lepus_bench_no_counters` (where every counter add is compiled out). The
//! difference of the two totals, per message, is the counters' cost.
//!
//! ```text
//! cargo bench --bench counters --no-run                        # with counters
//! RUSTFLAGS="--cfg lepus_bench_no_counters" CARGO_TARGET_DIR=target/no-counters \
//!     cargo bench --bench counters --no-run                    # without
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/with.cg  target/release/deps/counters-* 20000
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/without.cg \
//!     target/no-counters/release/deps/counters-* 20000
//! ```
//! (each against the broker of `AMQP_URL`; compare the `summary:` lines of the two files,
//! divided by the 80,000 messages that crossed the client).

use std::time::Duration;

use lepus::{BasicProperties, ConsumeOptions, PublishOptions, QueueDeclareOptions};

fn main() {
    // `cargo bench` passes `--bench`; a number is the message count.
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(20_000);
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let conn = lepus::Connection::open(&url).expect("connect");
    let ch = conn.open_channel().expect("channel");
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    };
    let q = ch.queue_declare("", &exclusive).expect("declare").name;
    let (body, props) = ([7u8; 64], BasicProperties::new());
    let publish = || {
        ch.basic_publish("", &q, &body, &props, &PublishOptions::default())
            .expect("publish")
    };
    for _ in 0..n {
        publish();
    }
    ch.confirm_select().expect("confirm.select");
    for i in 0..n {
        publish();
        if i % 100 == 99 || i + 1 == n {
            ch.wait_for_confirms().expect("every publish acked");
        }
    }
    let cch = conn.open_channel().expect("channel");
    cch.basic_qos(200, false).expect("qos");
    let consumer = cch
        .basic_consume(&q, &ConsumeOptions::default())
        .expect("consume");
    for _ in 0..2 * n {
        let d = consumer
            .recv_timeout(Duration::from_secs(30))
            .expect("the consumer works")
            .expect("a delivery within 30 s");
        d.ack().expect("ack");
    }
    eprintln!("{} messages; {:?}", 4 * n, conn.stats());
    conn.close().expect("close");
}
