//! `connection.blocked` / `connection.unblocked` from a real broker under a memory alarm.
//!
//! This is its own test binary (so its own process, run after or before the others, never
//! alongside them): the alarm blocks every publishing connection of the broker. It raises
//! the alarm with `rabbitmqctl set_vm_memory_high_watermark` and always restores it.

mod support;

use std::time::{Duration, Instant};

use lepus::{BasicProperties, Error, PublishOptions};
use support::{connect, exclusive_queue, rabbitmqctl, wait_until};

/// The broker's normal watermark (RabbitMQ's default).
const NORMAL_WATERMARK: &str = "0.4";

/// Restores the watermark when dropped, also when the test fails.
struct RestoreWatermark;

impl Drop for RestoreWatermark {
    fn drop(&mut self) {
        let out = std::process::Command::new(
            std::env::var("RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".into()),
        )
        .args(["set_vm_memory_high_watermark", NORMAL_WATERMARK])
        .output();
        if !matches!(&out, Ok(o) if o.status.success()) {
            eprintln!("could not restore the memory watermark: {out:?}");
        }
    }
}

#[test]
fn memory_alarm_blocks_publishers_until_it_clears() {
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    let q = exclusive_queue(&ch);
    ch.confirm_select().unwrap();
    let publish = |ch: &lepus::Channel, body: &[u8]| {
        ch.basic_publish(
            "",
            &q,
            body,
            &BasicProperties::new(),
            &PublishOptions::default(),
        )
    };
    publish(&ch, b"before").unwrap();
    ch.wait_for_confirms().unwrap();
    assert_eq!(conn.blocked(), None);

    let restore = RestoreWatermark;
    rabbitmqctl(&["set_vm_memory_high_watermark", "0.000001"]);
    // The broker blocks a connection once it publishes during the alarm.
    publish(&ch, b"during").expect("a publish before the block is noticed is queued");
    assert!(
        wait_until(Duration::from_secs(15), || conn.blocked().is_some()),
        "connection.blocked never arrived"
    );
    let reason = conn.blocked().unwrap();
    assert!(reason.contains("memory"), "blocked reason: {reason:?}");

    // Publishers wait while blocked, within their deadline.
    let t = Instant::now();
    let r = publish(&ch.with_timeout(Duration::from_millis(300)), b"blocked");
    let waited = t.elapsed();
    assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "{waited:?}"
    );

    rabbitmqctl(&["set_vm_memory_high_watermark", NORMAL_WATERMARK]);
    assert!(
        wait_until(Duration::from_secs(15), || conn.blocked().is_none()),
        "connection.unblocked never arrived"
    );
    drop(restore);

    publish(&ch, b"after").unwrap();
    ch.wait_for_confirms().unwrap();
    let mut bodies = Vec::new();
    while let Some(d) = ch.basic_get(&q, true).unwrap() {
        bodies.push(d.into_body());
    }
    assert_eq!(
        bodies,
        vec![b"before".to_vec(), b"during".to_vec(), b"after".to_vec()]
    );
    conn.close().unwrap();
}
