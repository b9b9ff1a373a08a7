//! Connect over TLS (`amqps://`) with a client certificate, publish with a confirm,
//! consume, and time the TLS connection setup against a plaintext one.
//!
//! Run against the test node of `scripts/tls-node` (amqps on 5671, amqp on 5670):
//!
//! ```text
//! scripts/with-rabbitmq scripts/tls-node start
//! cargo run --release --example tls
//! ```
//!
//! `AMQPS_URL` overrides the TLS address, e.g.
//! `amqps://user:pass@rabbit.example.com/%2f?cacertfile=/etc/ssl/ca.pem`;
//! `AMQP_URL` the plaintext one used for the comparison.

use std::time::{Duration, Instant};

use lepus::{BasicProperties, Connection, ConsumeOptions, PublishOptions, QueueDeclareOptions};

fn main() -> Result<(), lepus::Error> {
    let dir = std::env::var("LEPUS_TLS_DIR").unwrap_or_else(|_| "/tmp/lepus-tls".into());
    let tls_url = std::env::var("AMQPS_URL").unwrap_or_else(|_| {
        format!(
            "amqps://guest:guest@localhost:5671/%2f?cacertfile={dir}/certs/ca.pem\
             &certfile={dir}/certs/client.pem&keyfile={dir}/certs/client.key"
        )
    });
    let plain_url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5670/%2f".into());

    let conn = Connection::open(&tls_url)?;
    let ch = conn.open_channel()?;
    let q = ch.queue_declare(
        "",
        &QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
    )?;
    ch.confirm_select()?;
    let props = BasicProperties::new().content_type("text/plain");
    ch.basic_publish_confirmed(
        "",
        &q.name,
        b"hello over TLS",
        &props,
        PublishOptions::default(),
    )?
    .wait()?;
    let consumer = ch.basic_consume(&q.name, &ConsumeOptions::default())?;
    let d = consumer.recv_timeout(Duration::from_secs(5))?;
    println!("received {:?}", String::from_utf8_lossy(d.body()));
    d.ack()?;
    conn.close()?;

    // Connection setup (TCP + TLS + AMQP handshake), median of 20, next to plaintext.
    let median = |url: &str| -> Result<Duration, lepus::Error> {
        let mut times = Vec::new();
        for _ in 0..20 {
            let t = Instant::now();
            let c = Connection::open(url)?;
            times.push(t.elapsed());
            c.close()?;
        }
        times.sort();
        Ok(times[times.len() / 2])
    };
    let tls = median(&tls_url)?;
    println!("connect + handshake, median of 20: TLS {tls:?}");
    match median(&plain_url) {
        Ok(plain) => println!("connect + handshake, median of 20: plaintext {plain:?}"),
        Err(e) => println!("plaintext comparison skipped ({plain_url}): {e}"),
    }
    Ok(())
}
