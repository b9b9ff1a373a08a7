//! Publisher confirms: a handle per message, and waiting for a whole batch.
//!
//! Run: `cargo run --example confirms` (AMQP_URL overrides the broker address).

use lepus::{BasicProperties, Connection, Error, PublishOptions, QueueDeclareOptions};

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

    // One message, one confirmation: `wait` is Ok only for an ack; a nack is
    // Err(Error::Nacked), so `?` cannot let a refused message pass unnoticed.
    let confirmation = ch.basic_publish_confirmed(
        "",
        &q.name,
        b"important",
        &props,
        &PublishOptions::default(),
    )?;
    match confirmation.wait() {
        Ok(()) => println!(
            "message {} is safe with the broker",
            confirmation.sequence()
        ),
        Err(Error::Nacked { .. }) => {
            println!("the broker refused message {}", confirmation.sequence())
        }
        Err(e) => return Err(e),
    }

    // A batch: publish 1,000, then wait for all of them. A nack names the messages by
    // their sequence numbers, counted from `next_publish_sequence` before the batch.
    let first = ch.next_publish_sequence();
    for i in 0..1_000u32 {
        ch.basic_publish(
            "",
            &q.name,
            &i.to_be_bytes(),
            &props,
            &PublishOptions::default(),
        )?;
    }
    match ch.wait_for_confirms() {
        Ok(()) => println!("batch of 1000 confirmed, all acked"),
        Err(Error::Nacked { sequences, .. }) => {
            let refused: Vec<u64> = sequences.iter().map(|s| s - first).collect();
            println!("the broker refused messages {refused:?} of the batch: publish them again");
        }
        Err(e) => return Err(e),
    }
    conn.close()
}
