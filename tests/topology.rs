//! Exchanges and queues against the real broker: declare (passive, server-named, exclusive, auto-delete, arguments), bind, unbind, purge, delete.

mod support;

use lepus::{
    BasicProperties, ConsumeOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, FieldValue,
    PublishOptions, QueueDeclareOptions, QueueDeleteOptions, reply_code,
};
use support::fixtures::*;
use support::{Cleanup, connect, publish_confirmed, unique, wait_until};

#[test]
fn exchange_declare_passive_delete_and_exchange_to_exchange_bindings() {
    let clean = Cleanup::new();
    let src = clean.exchange(&unique("ex-src"));
    let dst = clean.exchange(&unique("ex-dst"));
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    ch.confirm_select().unwrap();

    ch.exchange_declare(&src, "direct", &ExchangeDeclareOptions::default())
        .unwrap();
    let internal = ExchangeDeclareOptions {
        internal: true,
        ..Default::default()
    };
    ch.exchange_declare(&dst, "fanout", &internal).unwrap();
    let passive_x = ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    ch.exchange_declare(&src, "direct", &passive_x)
        .expect("passive declare of an existing exchange");
    ch.exchange_declare(&dst, "fanout", &internal)
        .expect("an equivalent redeclare");

    // Redeclaring with another type is refused: 406 on that channel only.
    let other = conn.open_channel().unwrap();
    assert_channel_closed(
        other.exchange_declare(&src, "fanout", &ExchangeDeclareOptions::default()),
        other.id(),
        reply_code::PRECONDITION_FAILED,
    );

    let q = temp_queue(&ch);
    ch.queue_bind(&q, &dst, "", &no_args()).unwrap();
    ch.exchange_bind(&dst, &src, "rk", &no_args()).unwrap();

    publish_confirmed(&ch, &src, "rk", b"through e2e");
    publish_confirmed(&ch, &src, "other-key", b"no binding for this key");
    let d = ch
        .basic_get(&q, true)
        .unwrap()
        .expect("routed through the exchange-to-exchange binding");
    assert_eq!(d.body(), b"through e2e");
    assert_eq!(d.exchange(), src);
    assert_eq!(d.routing_key(), "rk");
    assert!(ch.basic_get(&q, true).unwrap().is_none());

    // The source has a binding: delete if_unused is refused.
    let other = conn.open_channel().unwrap();
    assert_channel_closed(
        other.exchange_delete(&src, &ExchangeDeleteOptions { if_unused: true }),
        other.id(),
        reply_code::PRECONDITION_FAILED,
    );

    ch.exchange_unbind(&dst, &src, "rk", &no_args()).unwrap();
    publish_confirmed(&ch, &src, "rk", b"after unbind");
    assert!(
        ch.basic_get(&q, true).unwrap().is_none(),
        "routed after unbind"
    );

    // An internal exchange takes no direct publishes: 403 closes the publishing channel,
    // which fails the publish's confirmation.
    let direct = conn.open_channel().unwrap();
    direct.confirm_select().unwrap();
    let c = direct
        .basic_publish_confirmed(
            &dst,
            "",
            b"direct",
            &BasicProperties::new(),
            &PublishOptions::default(),
        )
        .unwrap();
    assert_channel_closed(c.wait(), direct.id(), reply_code::ACCESS_REFUSED);
    assert!(!direct.is_open());

    ch.exchange_delete(&dst, &Default::default()).unwrap();
    ch.exchange_delete(&src, &Default::default()).unwrap();
    for x in [&src, &dst] {
        let probe = conn.open_channel().unwrap();
        assert_channel_closed(
            probe.exchange_declare(x, "direct", &passive_x),
            probe.id(),
            reply_code::NOT_FOUND,
        );
    }
    assert!(ch.is_open());
    conn.close().unwrap();
}

#[test]
fn queue_declare_server_named_passive_and_exclusive() {
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    let info = ch.queue_declare("", &exclusive()).unwrap();
    assert!(info.name.starts_with("amq.gen-"), "{}", info.name);
    assert_eq!((info.message_count, info.consumer_count), (0, 0));

    // An exclusive named queue: usable from its own connection only.
    let name = unique("exclusive");
    ch.queue_declare(&name, &exclusive()).unwrap();
    ch.confirm_select().unwrap();
    for _ in 0..3 {
        publish_confirmed(&ch, "", &name, b"m");
    }
    let consumer = ch.basic_consume(&name, &ConsumeOptions::default()).unwrap();
    let again = ch.queue_declare(&name, &passive()).unwrap();
    assert_eq!(again.name, name);
    assert_eq!(again.consumer_count, 1);

    let other = connect();
    let och = other.open_channel().unwrap();
    assert_channel_closed(
        och.queue_declare(&name, &passive()),
        och.id(),
        reply_code::RESOURCE_LOCKED,
    );
    drop(consumer);
    conn.close().unwrap();
    // Gone with its connection.
    assert!(
        wait_until(WAIT, || !queue_exists(&other, &name)),
        "exclusive queue outlived its connection"
    );
    other.close().unwrap();
}

#[test]
fn queue_auto_delete_goes_with_its_last_consumer() {
    let clean = Cleanup::new();
    let name = clean.queue(&unique("auto-delete"));
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    let opts = QueueDeclareOptions {
        auto_delete: true,
        ..Default::default()
    };
    ch.queue_declare(&name, &opts).unwrap();
    let consumer = ch.basic_consume(&name, &ConsumeOptions::default()).unwrap();
    assert!(queue_exists(&conn, &name));
    consumer.cancel().unwrap();
    assert!(
        wait_until(WAIT, || !queue_exists(&conn, &name)),
        "auto-delete queue survived its last consumer"
    );
    conn.close().unwrap();
}

#[test]
fn queue_arguments_ttl_and_max_length_take_effect() {
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    ch.confirm_select().unwrap();

    // x-max-length: the oldest messages are dropped.
    let capped = unique("max-length");
    let capped_args = args(&[("x-max-length", FieldValue::I32(2))]);
    ch.queue_declare(
        &capped,
        &QueueDeclareOptions {
            exclusive: true,
            arguments: capped_args.clone(),
            ..Default::default()
        },
    )
    .unwrap();
    for i in 0..5 {
        publish_confirmed(&ch, "", &capped, format!("m{i}").as_bytes());
    }
    assert_eq!(
        ch.queue_declare(&capped, &passive()).unwrap().message_count,
        2
    );
    let first = ch.basic_get(&capped, true).unwrap().unwrap();
    assert_eq!(first.body(), b"m3");
    assert_eq!(first.message_count(), Some(1));
    assert_eq!(ch.basic_get(&capped, true).unwrap().unwrap().body(), b"m4");
    assert!(ch.basic_get(&capped, true).unwrap().is_none());

    // Redeclaring with different arguments is refused (406).
    let other = conn.open_channel().unwrap();
    assert_channel_closed(
        other.queue_declare(
            &capped,
            &QueueDeclareOptions {
                exclusive: true,
                arguments: args(&[("x-max-length", FieldValue::I32(3))]),
                ..Default::default()
            },
        ),
        other.id(),
        reply_code::PRECONDITION_FAILED,
    );

    // x-message-ttl: messages expire.
    let ttl = unique("ttl");
    ch.queue_declare(
        &ttl,
        &QueueDeclareOptions {
            exclusive: true,
            arguments: args(&[("x-message-ttl", FieldValue::I32(100))]),
            ..Default::default()
        },
    )
    .unwrap();
    publish_confirmed(&ch, "", &ttl, b"short-lived");
    assert!(
        wait_until(WAIT, || ch
            .queue_declare(&ttl, &passive())
            .unwrap()
            .message_count
            == 0),
        "message did not expire"
    );
    assert!(ch.basic_get(&ttl, true).unwrap().is_none());
    conn.close().unwrap();
}

#[test]
fn queue_bind_unbind_purge_and_delete_counts() {
    let clean = Cleanup::new();
    let q = clean.queue(&unique("bind"));
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    ch.confirm_select().unwrap();
    ch.queue_declare(&q, &QueueDeclareOptions::default())
        .unwrap();
    let key = unique("key");
    ch.queue_bind(&q, "amq.direct", &key, &no_args()).unwrap();
    ch.queue_bind(&q, "amq.topic", "lepus.*.x", &no_args())
        .unwrap();

    publish_confirmed(&ch, "amq.direct", &key, b"1");
    publish_confirmed(&ch, "amq.topic", "lepus.any.x", b"2");
    publish_confirmed(&ch, "amq.topic", "lepus.any.y", b"not matched");
    publish_confirmed(&ch, "", &q, b"3");
    assert_eq!(ready_count(&conn, &q), 3);
    assert_eq!(ch.queue_purge(&q).unwrap(), 3);
    assert_eq!(ready_count(&conn, &q), 0);
    assert_eq!(ch.queue_purge(&q).unwrap(), 0);

    ch.queue_unbind(&q, "amq.direct", &key, &no_args()).unwrap();
    ch.queue_unbind(&q, "amq.topic", "lepus.*.x", &no_args())
        .unwrap();
    publish_confirmed(&ch, "amq.direct", &key, b"after unbind");
    publish_confirmed(&ch, "amq.topic", "lepus.any.x", b"after unbind");
    assert_eq!(ready_count(&conn, &q), 0, "routed after unbind");

    publish_confirmed(&ch, "", &q, b"a");
    publish_confirmed(&ch, "", &q, b"b");

    // if_empty / if_unused are honoured (406 on that channel only).
    let other = conn.open_channel().unwrap();
    assert_channel_closed(
        other.queue_delete(
            &q,
            &QueueDeleteOptions {
                if_empty: true,
                ..Default::default()
            },
        ),
        other.id(),
        reply_code::PRECONDITION_FAILED,
    );
    let consumer_ch = conn.open_channel().unwrap();
    consumer_ch.basic_qos(1, false).unwrap();
    let consumer = consumer_ch
        .basic_consume(&q, &ConsumeOptions::default())
        .unwrap();
    let held = consumer
        .recv_timeout(WAIT)
        .unwrap()
        .expect("a delivery in time"); // one unacked, one ready
    let other = conn.open_channel().unwrap();
    assert_channel_closed(
        other.queue_delete(
            &q,
            &QueueDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
        ),
        other.id(),
        reply_code::PRECONDITION_FAILED,
    );
    drop(held);
    consumer_ch.close().unwrap(); // the unacked message goes back
    drop(consumer);
    assert!(wait_until(WAIT, || ready_count(&conn, &q) == 2));

    assert_eq!(
        ch.queue_delete(&q, &QueueDeleteOptions::default()).unwrap(),
        2
    );
    assert!(!queue_exists(&conn, &q));
    conn.close().unwrap();
}
