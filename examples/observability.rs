//! Observability: a small workload (publish with confirms, some nacked by a full queue,
//! an unroutable mandatory message, consume with acks and rejects, a channel the broker
//! closes, a consumer it cancels), then the connection's counters and the events its
//! listener heard.
//!
//! Run: `cargo run --example observability` (AMQP_URL overrides the broker address).
//! With `--features metrics` or `tracing` the same connection also reports through the
//! `metrics` facade or emits `tracing` spans (install a recorder or a subscriber to see
//! them).

use std::time::Duration;

use lepus::{
    BasicProperties, Connection, ConnectionOptions, ConsumeOptions, Error, FieldTable,
    PublishOptions, QueueDeclareOptions,
};

fn main() -> Result<(), Error> {
    let url = std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://127.0.0.1:5672".into());
    // The listener runs on the connection's event thread, never on the I/O thread.
    let opts = ConnectionOptions::from_uri(&url)?
        .connection_name("observability-example")
        .event_listener(|e| println!("[listener] generation {}: {:?}", e.generation, e.kind));
    let started = std::time::Instant::now();
    let conn = Connection::open_with(opts)?;

    let ch = conn.open_channel()?;
    ch.confirm_select()?;
    // A queue that takes 5 messages and nacks the rest (overflow reject-publish).
    let q = ch
        .queue_declare(
            "",
            &QueueDeclareOptions {
                exclusive: true,
                arguments: FieldTable::new()
                    .with("x-max-length", 5i32)
                    .with("x-overflow", "reject-publish"),
                ..Default::default()
            },
        )?
        .name;
    let props = BasicProperties::new();
    for i in 0..8u32 {
        ch.basic_publish("", &q, &i.to_be_bytes(), &props, &PublishOptions::default())?;
    }
    match ch.wait_for_confirms() {
        Ok(()) => println!("all 8 confirmed"),
        Err(Error::Nacked { sequences, .. }) => {
            println!("the queue holds 5; the broker nacked {sequences:?}")
        }
        Err(e) => return Err(e),
    }
    // Unroutable and mandatory: the broker returns it.
    ch.basic_publish(
        "",
        "no-such-queue",
        b"lost?",
        &props,
        &PublishOptions { mandatory: true },
    )?;
    ch.wait_for_confirms()?;
    if let Some(r) = ch.recv_return(Duration::from_secs(5))? {
        println!("returned: {} {}", r.reply_code, r.reply_text);
    }

    // Consume the 5: ack 4, reject 1.
    let consumer = conn
        .open_channel()?
        .basic_consume(&q, &ConsumeOptions::default())?;
    for i in 0..5 {
        let d = consumer
            .recv_timeout(Duration::from_secs(5))?
            .ok_or(Error::Timeout("a delivery"))?;
        if i < 4 { d.ack()? } else { d.reject(false)? }
    }

    // A passive declare of a missing queue: the broker closes that channel (404).
    let probe = conn.open_channel()?;
    let missing = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let _ = probe.queue_declare("observability-example-missing", &missing);

    // Deleting a queue under a consumer: the broker cancels it.
    let doomed = ch
        .queue_declare(
            "observability-example-doomed",
            &QueueDeclareOptions::default(),
        )?
        .name;
    let _cancelled = conn
        .open_channel()?
        .basic_consume(&doomed, &ConsumeOptions::default())?;
    ch.queue_delete(&doomed, &Default::default())?;

    // Settle the consumer's acks before reading the counters.
    ch.queue_declare(
        &q,
        &QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
    )?;
    println!("\n{:#?}", conn.stats());
    println!("\nthe event log:");
    for e in conn.events() {
        println!("  +{:?} {:?}", e.at.duration_since(started), e.kind);
    }
    conn.close()
}
