//! Request/reply over RabbitMQ's direct reply-to (`amq.rabbitmq.reply-to`): a server
//! thread answers requests on a queue; the client consumes its replies without declaring
//! a reply queue.
//!
//! Run: `cargo run --example rpc` (AMQP_URL overrides the broker address).

use std::thread;
use std::time::Duration;

use lepus::{
    BasicProperties, Connection, ConsumeOptions, Error, PublishOptions, QueueDeclareOptions,
};

fn main() -> Result<(), Error> {
    let url = std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://127.0.0.1:5672".into());
    let conn = Connection::open(&url)?;
    let queue = format!("lepus-rpc-{}", std::process::id());
    let opts = QueueDeclareOptions {
        auto_delete: true,
        ..Default::default()
    };
    conn.open_channel()?.queue_declare(&queue, &opts)?;

    // The server: squares the number in each request.
    let server = {
        let (conn, queue) = (conn.clone(), queue.clone());
        let ch = conn.open_channel()?;
        let requests = ch.basic_consume(&queue, &ConsumeOptions::default())?;
        thread::spawn(move || -> Result<(), Error> {
            for req in requests.iter().take(5) {
                let req = req?;
                let n: u64 = String::from_utf8_lossy(req.body()).parse().unwrap_or(0);
                let props = req.properties();
                if let Some(reply_to) = &props.reply_to {
                    let mut answer = BasicProperties::new();
                    answer.correlation_id = props.correlation_id.clone();
                    let body = (n * n).to_string();
                    ch.basic_publish(
                        "",
                        reply_to,
                        body.as_bytes(),
                        &answer,
                        &PublishOptions::default(),
                    )?;
                }
                req.ack()?;
            }
            Ok(())
        })
    };

    // The client: consume replies first (no_ack is required by direct reply-to).
    let ch = conn.open_channel()?;
    let replies = ch.basic_consume(
        "amq.rabbitmq.reply-to",
        &ConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
    )?;
    for n in 1..=5u64 {
        let id = format!("req-{n}");
        let props = BasicProperties::new()
            .reply_to("amq.rabbitmq.reply-to")
            .correlation_id(id.clone());
        ch.basic_publish(
            "",
            &queue,
            n.to_string().as_bytes(),
            &props,
            &PublishOptions::default(),
        )?;
        let reply = replies
            .recv_timeout(Duration::from_secs(5))?
            .ok_or(lepus::Error::Timeout("the reply"))?;
        assert_eq!(
            reply.properties().correlation_id.as_deref(),
            Some(id.as_str())
        );
        println!("{n}^2 = {}", String::from_utf8_lossy(reply.body()));
    }
    server.join().expect("server thread")?;
    conn.close()
}
