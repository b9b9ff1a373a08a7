//! A stream: declared with typed retention, 5,000 events appended, then read from the
//! first offset by a consumer that records each event's offset. A stream consumer needs a
//! prefetch and manual acks (credit only: the stream keeps its messages). If the link
//! drops meanwhile, lepus resubscribes the consumer after the last offset it received,
//! so the loop below sees each offset once.
//!
//! Run: `scripts/with-rabbitmq cargo run --example stream_consumer` (AMQP_URL overrides).

use std::time::Duration;

use lepus::{
    BasicProperties, Connection, ConsumeOptions, Error, PublishOptions, QueueDeleteOptions,
    StreamArgs, StreamOffset,
};

const EVENTS: u64 = 5_000;

fn main() -> Result<(), Error> {
    let url = std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://127.0.0.1:5672".into());
    let conn = Connection::open(&url)?;
    let ch = conn.open_channel()?;
    let stream = format!("lepus-example-events-{}", std::process::id());
    let retention = StreamArgs::new()
        .max_length_bytes(100_000_000)
        .max_age(Duration::from_secs(24 * 3600))
        .max_segment_size_bytes(10_000_000);
    ch.stream_declare(&stream, &retention)?;

    ch.confirm_select()?;
    for i in 0..EVENTS {
        let body = format!("event {i}");
        ch.basic_publish(
            "",
            &stream,
            body.as_bytes(),
            &BasicProperties::new(),
            &PublishOptions::default(),
        )?;
    }
    ch.wait_for_confirms()?;

    let reader = conn.open_channel()?;
    reader.basic_qos(500, false)?;
    let consumer =
        reader.stream_consume(&stream, StreamOffset::First, &ConsumeOptions::default())?;
    let (mut next, mut count) = (0u64, 0u64);
    while count < EVENTS {
        let d = match consumer.recv_timeout(Duration::from_secs(5)) {
            Ok(Some(d)) => d,
            Ok(None) => return Err(Error::Timeout("the next event")),
            // A lost link: recovery resubscribes after the last offset received.
            Err(e) if e.is_connection_lost() => continue,
            Err(e) => return Err(e.into()),
        };
        let offset = d.stream_offset().expect("a stream delivery has an offset");
        assert_eq!(offset, next, "each offset once, in order");
        next = offset + 1;
        count += 1;
        d.ack()?; // credit for the next ones
    }
    println!("read {count} events, offsets 0..{next}");

    // From an offset in the middle, and only what is new.
    let again = conn.open_channel()?;
    again.basic_qos(10, false)?;
    let middle = again.stream_consume(
        &stream,
        StreamOffset::Offset(4_990),
        &ConsumeOptions::default(),
    )?;
    let d = middle
        .recv_timeout(Duration::from_secs(5))?
        .ok_or(Error::Timeout("an event"))?;
    println!("from offset 4990: first is {:?}", d.stream_offset());
    d.ack()?;

    ch.queue_delete(&stream, &QueueDeleteOptions::default())?;
    conn.close()
}
