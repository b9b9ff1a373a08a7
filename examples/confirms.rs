//! Publisher confirms: a handle per message, and waiting for a whole batch.
//!
//! Run: `cargo run --example confirms` (AMQP_URL overrides the broker address).

use lepus::{BasicProperties, Confirm, Connection, Error, PublishOptions, QueueDeclareOptions};

fn main() -> Result<(), Error> {
    let url = std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://127.0.0.1:5672".into());
    let conn = Connection::open(&url)?;
    let ch = conn.open_channel()?;
    let q = ch.queue_declare(
        "",
        &QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
    )?;
    ch.confirm_select()?;
    let props = BasicProperties::new().persistent();

    // One message, one confirmation.
    let confirmation =
        ch.basic_publish_confirmed("", &q.name, b"important", &props, PublishOptions::default())?;
    match confirmation.wait()? {
        Confirm::Ack => println!(
            "message {} is safe with the broker",
            confirmation.sequence()
        ),
        Confirm::Nack => println!("the broker refused message {}", confirmation.sequence()),
    }

    // A batch: publish 1,000, then wait for all of them.
    for i in 0..1_000u32 {
        ch.basic_publish(
            "",
            &q.name,
            &i.to_be_bytes(),
            &props,
            PublishOptions::default(),
        )?;
    }
    let all_acked = ch.wait_for_confirms()?;
    println!("batch of 1000 confirmed, all acked: {all_acked}");
    conn.close()
}
