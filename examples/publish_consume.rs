//! Publish a few messages to a server-named queue and consume them.
//!
//! Run: `cargo run --example publish_consume` (AMQP_URL overrides the broker address).

use std::time::Duration;

use lepus::{BasicProperties, Connection, ConsumeOptions, PublishOptions, QueueDeclareOptions};

fn main() -> Result<(), lepus::Error> {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let conn = Connection::open(&url)?;
    let ch = conn.open_channel()?;
    let q = ch.queue_declare(
        "",
        &QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
    )?;
    for i in 0..5 {
        let body = format!("message {i}");
        let props = BasicProperties::new().content_type("text/plain");
        ch.basic_publish(
            "",
            &q.name,
            body.as_bytes(),
            &props,
            &PublishOptions::default(),
        )?;
    }
    let consumer = ch.basic_consume(&q.name, &ConsumeOptions::default())?;
    for _ in 0..5 {
        let d = consumer
            .recv_timeout(Duration::from_secs(5))?
            .ok_or(lepus::Error::Timeout("a delivery"))?;
        println!(
            "received {:?} (tag {})",
            String::from_utf8_lossy(d.body()),
            d.delivery_tag()
        );
        d.ack()?;
    }
    conn.close()?;
    println!("done");
    Ok(())
}
