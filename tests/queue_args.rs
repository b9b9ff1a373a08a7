//! Typed queue and consumer arguments against the real broker: each is accepted and shows
//! on its queue (`rabbitmqctl list_queues name arguments`, read-only), and max length with
//! reject-publish behaves so.

mod support;

use std::time::Duration;

use lepus::{
    BasicProperties, Confirm, ConsumeOptions, Overflow, PublishOptions, QueueArgs, StreamArgs,
};
use support::{Cleanup, connect, rabbitmqctl, unique};

/// The `arguments` column of `rabbitmqctl list_queues` for `queue`.
fn listed_arguments(queue: &str) -> String {
    let out = rabbitmqctl(&["-q", "list_queues", "name", "arguments"]);
    out.lines()
        .find(|l| l.split('\t').next() == Some(queue))
        .unwrap_or_else(|| panic!("{queue} not listed in:\n{out}"))
        .to_owned()
}

fn assert_listed(queue: &str, expected: &[&str]) {
    // The declares above ran (the broker took the arguments); reading them back needs
    // rabbitmqctl.
    if !support::rabbitmqctl_or_skip("reading queue arguments back") {
        return;
    }
    let line = listed_arguments(queue);
    for e in expected {
        assert!(line.contains(e), "{e} missing from {line}");
    }
}

#[test]
fn quorum_arguments_are_accepted_and_listed() {
    let clean = Cleanup::new();
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    let q = clean.queue(&unique("qa-quorum"));
    let opts = QueueArgs::quorum()
        .delivery_limit(3)
        .dead_letter_exchange("amq.direct")
        .dead_letter_routing_key("dead")
        .dead_letter_at_least_once()
        .message_ttl(Duration::from_secs(60))
        .max_length(100)
        .max_length_bytes(1_000_000)
        .single_active_consumer(true)
        .declare_options();
    ch.queue_declare(&q, &opts).unwrap();
    // Declaring again with the same arguments is accepted (a different value would be a
    // 406): the broker holds exactly these.
    ch.queue_declare(&q, &opts).unwrap();
    assert_listed(
        &q,
        &[
            "{\"x-queue-type\",\"quorum\"}",
            "{\"x-delivery-limit\",3}",
            "{\"x-dead-letter-exchange\",\"amq.direct\"}",
            "{\"x-dead-letter-routing-key\",\"dead\"}",
            "{\"x-dead-letter-strategy\",\"at-least-once\"}",
            "{\"x-overflow\",\"reject-publish\"}",
            "{\"x-message-ttl\",60000}",
            "{\"x-max-length\",100}",
            "{\"x-max-length-bytes\",1000000}",
            "{\"x-single-active-consumer\",true}",
        ],
    );
    conn.close().unwrap();
}

#[test]
fn classic_arguments_are_accepted_and_listed() {
    let clean = Cleanup::new();
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    let q = clean.queue(&unique("qa-classic"));
    let opts = QueueArgs::new()
        .lazy()
        .max_priority(5)
        .expires(Duration::from_secs(600))
        .overflow(Overflow::RejectPublishDlx)
        .dead_letter_exchange("")
        .raw("x-custom", "kept")
        .declare_options();
    assert!(!opts.durable);
    ch.queue_declare(&q, &opts).unwrap();
    assert_listed(
        &q,
        &[
            "{\"x-queue-mode\",\"lazy\"}",
            "{\"x-max-priority\",5}",
            "{\"x-expires\",600000}",
            "{\"x-overflow\",\"reject-publish-dlx\"}",
            "{\"x-custom\",\"kept\"}",
        ],
    );
    conn.close().unwrap();
}

#[test]
fn stream_arguments_are_accepted_and_listed() {
    let clean = Cleanup::new();
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    let q = clean.queue(&unique("qa-stream"));
    let args = StreamArgs::new()
        .max_length_bytes(20_000_000)
        .max_age(Duration::from_secs(3600))
        .max_segment_size_bytes(1_000_000);
    ch.stream_declare(&q, &args).unwrap();
    assert_listed(
        &q,
        &[
            "{\"x-queue-type\",\"stream\"}",
            "{\"x-max-length-bytes\",20000000}",
            "{\"x-max-age\",\"3600s\"}",
            "{\"x-stream-max-segment-size-bytes\",1000000}",
        ],
    );
    conn.close().unwrap();
}

#[test]
fn consumer_priority_is_listed_on_the_consumer() {
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    let q = support::exclusive_queue(&ch);
    let c = ch
        .basic_consume(&q, &ConsumeOptions::default().priority(7))
        .unwrap();
    if !support::rabbitmqctl_or_skip("reading consumer arguments back") {
        return conn.close().unwrap();
    }
    let out = rabbitmqctl(&[
        "-q",
        "list_consumers",
        "queue_name",
        "consumer_tag",
        "arguments",
    ]);
    let line = out
        .lines()
        .find(|l| l.contains(c.tag()))
        .unwrap_or_else(|| panic!("consumer {} not listed in:\n{out}", c.tag()));
    assert!(line.contains("{\"x-priority\",7}"), "{line}");
    conn.close().unwrap();
}

#[test]
fn max_length_with_reject_publish_nacks_the_overflow() {
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    ch.confirm_select().unwrap();
    let mut opts = QueueArgs::new()
        .max_length(2)
        .overflow(Overflow::RejectPublish)
        .declare_options();
    opts.exclusive = true;
    let q = ch.queue_declare("", &opts).unwrap().name;
    let outcomes: Vec<Confirm> = (0..3)
        .map(|i| {
            ch.basic_publish_confirmed(
                "",
                &q,
                format!("m{i}").as_bytes(),
                &BasicProperties::new(),
                &PublishOptions::default(),
            )
            .unwrap()
            .wait_outcome()
            .unwrap()
        })
        .collect();
    assert_eq!(outcomes[..2], [Confirm::Ack, Confirm::Ack]);
    assert_eq!(outcomes[2], Confirm::Nack, "{outcomes:?}");
    conn.close().unwrap();
}

#[test]
fn quorum_delivery_limit_dead_letters_a_message_requeued_too_often() {
    let clean = Cleanup::new();
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    ch.confirm_select().unwrap();
    let dlq = support::exclusive_queue(&ch);
    let q = clean.queue(&unique("qa-limit"));
    let opts = QueueArgs::quorum()
        .delivery_limit(1)
        .dead_letter_exchange("")
        .dead_letter_routing_key(&dlq)
        .declare_options();
    ch.queue_declare(&q, &opts).unwrap();
    support::publish_confirmed(&ch, "", &q, b"poison");
    // Delivered, requeued, delivered again, requeued: past the limit it goes to the DLQ.
    for _ in 0..2 {
        let d = support::fixtures::get_eventually(&ch, &q, false);
        assert_eq!(d.body(), b"poison");
        d.reject(true).unwrap();
    }
    let dead = support::fixtures::get_eventually(&ch, &dlq, true);
    assert_eq!(dead.body(), b"poison");
    assert!(ch.basic_get(&q, true).unwrap().is_none());
    conn.close().unwrap();
}
