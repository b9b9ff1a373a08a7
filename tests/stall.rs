//! A consumer whose full queue stopped the I/O thread resumes within milliseconds of a
//! take, with the I/O thread's 20 ms re-poll of stalled queues turned off: a wake-up lost
//! between the consumer and the I/O thread shows here as a stall, not as a delay. (Its
//! own test binary: the switch is process-wide.)

mod support;

use std::time::{Duration, Instant};

use support::fixtures::*;
use support::{connect, wait_until};

/// A consumer's queue bound without a prefetch limit.
const BOUND: usize = 1024;
/// Take-and-resume cycles measured.
const ROUNDS: usize = 300;

#[test]
fn a_stalled_consumer_resumes_within_milliseconds_of_a_take() {
    lepus::internal::set_stall_repoll(false);
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    let q = temp_queue(&ch);
    let pubch = conn.open_channel().unwrap();
    pubch.confirm_select().unwrap();
    for i in 0..BOUND + ROUNDS + 100 {
        publish(&pubch, "", &q, i.to_string().as_bytes());
    }
    pubch.wait_for_confirms().unwrap();
    // No prefetch limit and no acks: the broker pushes everything, the local queue fills
    // to its bound and the I/O thread stalls on it.
    let consumer = no_ack_consumer(&ch, &q);
    assert!(wait_until(Duration::from_secs(10), || consumer.queued() >= BOUND));
    let mut resumed = Vec::with_capacity(ROUNDS);
    for i in 0..ROUNDS {
        let d = consumer
            .recv_timeout(Duration::from_secs(5))
            .unwrap()
            .expect("a delivery in time");
        assert_eq!(d.body(), i.to_string().as_bytes());
        let took = Instant::now();
        // Nothing but the take's wake-up can make the I/O thread read again.
        while consumer.queued() < BOUND {
            assert!(
                took.elapsed() < Duration::from_secs(2),
                "round {i}: the stalled consumer did not resume after a take"
            );
            std::thread::sleep(Duration::from_micros(50));
        }
        resumed.push(took.elapsed());
    }
    resumed.sort();
    let median = resumed[ROUNDS / 2];
    let p99 = resumed[ROUNDS * 99 / 100];
    eprintln!(
        "resumed after a take: median {median:?}, p99 {p99:?}, max {:?} ({ROUNDS} takes)",
        resumed[ROUNDS - 1]
    );
    // Well under the 20 ms re-poll the I/O thread would otherwise fall back on.
    assert!(median < Duration::from_millis(5), "median {median:?}");
    conn.close().unwrap();
}
