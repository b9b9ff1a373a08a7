//! Connect over TLS (`amqps://`) with a client certificate, publish with a confirm,
//! consume; then time the TLS connection setup and publish rates (10 threads on one
//! connection, without confirms and confirming each message) against plaintext.
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

const THREADS: usize = 10;

/// Messages per second published by `THREADS` threads on one connection, each on its own
/// channel to its own queue: `per_thread` messages of 256 bytes, confirming each one or
/// none.
fn publish_rate(url: &str, per_thread: usize, confirm_each: bool) -> Result<f64, lepus::Error> {
    let conn = Connection::open(url)?;
    let body = vec![b'x'; 256];
    let t = Instant::now();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|_| {
                s.spawn(|| -> Result<(), lepus::Error> {
                    let ch = conn.open_channel()?;
                    let q = ch.queue_declare(
                        "",
                        &QueueDeclareOptions {
                            exclusive: true,
                            ..Default::default()
                        },
                    )?;
                    let props = BasicProperties::new();
                    if confirm_each {
                        ch.confirm_select()?;
                        for _ in 0..per_thread {
                            let c = ch.basic_publish_confirmed(
                                "",
                                &q.name,
                                &body,
                                &props,
                                &PublishOptions::default(),
                            )?;
                            c.wait()?; // a nack is an error
                        }
                    } else {
                        for _ in 0..per_thread {
                            ch.basic_publish(
                                "",
                                &q.name,
                                &body,
                                &props,
                                &PublishOptions::default(),
                            )?;
                        }
                        // Make sure everything reached the broker before the clock stops.
                        ch.queue_declare(
                            &q.name,
                            &QueueDeclareOptions {
                                passive: true,
                                ..Default::default()
                            },
                        )?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("publisher thread"))
    })?;
    let rate = (THREADS * per_thread) as f64 / t.elapsed().as_secs_f64();
    conn.close()?;
    Ok(rate)
}

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
        &PublishOptions::default(),
    )?
    .wait()?;
    let consumer = ch.basic_consume(&q.name, &ConsumeOptions::default())?;
    let d = consumer
        .recv_timeout(Duration::from_secs(5))?
        .ok_or(lepus::Error::Timeout("a delivery"))?;
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
        Err(e) => {
            println!("plaintext comparison skipped ({plain_url}): {e}");
            return Ok(());
        }
    }
    for (what, per_thread, confirm_each) in
        [("no confirms", 20_000, false), ("confirm each", 500, true)]
    {
        let tls = publish_rate(&tls_url, per_thread, confirm_each)?;
        let plain = publish_rate(&plain_url, per_thread, confirm_each)?;
        println!(
            "publish, {THREADS} threads, {what}: TLS {tls:.0} msg/s, plaintext {plain:.0} msg/s, \
             TLS/plaintext {:.2}",
            tls / plain
        );
    }
    Ok(())
}
