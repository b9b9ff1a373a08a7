//! Small helpers of the broker tests (tests/connection.rs, topology.rs, publish.rs,
//! consume.rs, confirms.rs, channel.rs, dead_link.rs).

use std::thread;
use std::time::{Duration, Instant};

use lepus::{
    BasicProperties, Channel, Connection, ConsumeOptions, Error, FieldTable, FieldValue,
    PublishOptions, QueueDeclareOptions,
};

use super::amqp_url;

/// How long a message that should arrive may take.
pub const WAIT: Duration = Duration::from_secs(5);
/// How long we watch for something that must not happen.
pub const QUIET: Duration = Duration::from_millis(300);

pub fn exclusive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    }
}

pub fn passive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive: true,
        ..Default::default()
    }
}

pub fn args(pairs: &[(&str, FieldValue)]) -> FieldTable {
    pairs.iter().cloned().collect()
}

/// A server-named exclusive queue (deleted with its connection).
pub fn temp_queue(ch: &Channel) -> String {
    ch.queue_declare("", &exclusive())
        .expect("declare a server-named queue")
        .name
}

pub fn no_args() -> FieldTable {
    FieldTable::new()
}

pub fn publish(ch: &Channel, exchange: &str, routing_key: &str, body: &[u8]) {
    ch.basic_publish(
        exchange,
        routing_key,
        body,
        &BasicProperties::new(),
        &PublishOptions::default(),
    )
    .expect("publish");
}

/// The URI of the test broker with extra query options.
pub fn uri_with(query: &str) -> String {
    let base = amqp_url();
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}{query}")
}

/// Messages ready in `queue`, asked on a fresh channel (a passive declare).
pub fn ready_count(conn: &Connection, queue: &str) -> u32 {
    let ch = conn.open_channel().expect("open a channel");
    let n = ch
        .queue_declare(queue, &passive())
        .expect("passive declare")
        .message_count;
    ch.close().expect("close the channel");
    n
}

/// True if `queue` exists, asked on a fresh channel (a 404 closes that channel only).
pub fn queue_exists(conn: &Connection, queue: &str) -> bool {
    let ch = conn.open_channel().expect("open a channel");
    match ch.queue_declare(queue, &passive()) {
        Ok(_) => true,
        Err(Error::ServerClosedChannel { code: 404, .. }) => false,
        Err(e) => panic!("passive declare of {queue}: {e}"),
    }
}

/// Assert that `r` failed because the broker closed channel `channel` with `code`.
#[track_caller]
pub fn assert_channel_closed<T: std::fmt::Debug>(r: lepus::Result<T>, channel: u16, code: u16) {
    match r {
        Err(Error::ServerClosedChannel {
            channel: c,
            code: got,
            ..
        }) if c == channel && got == code => {}
        other => {
            panic!("expected channel {channel} closed by the broker with {code}, got {other:?}")
        }
    }
}

/// `basic.get` until a message is there (published on another channel, so it may take a
/// moment), for at most `WAIT`.
#[track_caller]
pub fn get_eventually(ch: &Channel, queue: &str, no_ack: bool) -> lepus::Delivery {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(d) = ch.basic_get(queue, no_ack).expect("basic.get") {
            return d;
        }
        assert!(
            Instant::now() < deadline,
            "no message in {queue} within {WAIT:?}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

pub fn recv_body(consumer: &lepus::Consumer) -> Vec<u8> {
    consumer
        .recv_timeout(WAIT)
        .expect("a delivery")
        .expect("a delivery in time")
        .into_body()
}

/// A consumer of `queue` on `ch` that needs no acks (`no_ack`).
pub fn no_ack_consumer(ch: &Channel, queue: &str) -> lepus::Consumer {
    ch.basic_consume(
        queue,
        &ConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
    )
    .expect("basic.consume")
}

/// Publish ids `ids` (4-byte big-endian bodies) to `queue` in confirm mode, and wait
/// until the broker confirmed them all.
pub fn publish_ids(ch: &Channel, queue: &str, ids: std::ops::Range<u32>) {
    ch.confirm_select().unwrap();
    for id in ids {
        ch.basic_publish(
            "",
            queue,
            &id.to_be_bytes(),
            &BasicProperties::new(),
            &PublishOptions::default(),
        )
        .unwrap();
    }
    ch.wait_for_confirms().expect("every publish confirmed");
}

/// The id of a body [`publish_ids`] published.
pub fn id_of(body: &[u8]) -> u32 {
    u32::from_be_bytes(body.try_into().expect("a 4-byte id"))
}
