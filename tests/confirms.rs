//! Publisher confirms against the real broker: acks, nacks on overflow, concurrent publishers on one confirm channel.

mod support;

use std::collections::HashSet;
use std::thread;

use lepus::{BasicProperties, Confirm, Error, FieldValue, PublishOptions, QueueDeclareOptions};
use support::connect;
use support::fixtures::*;

#[test]
fn confirms_ack_and_wait_for_confirms() {
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    let q = temp_queue(&ch);
    // Not in confirm mode yet.
    assert!(matches!(
        ch.basic_publish_confirmed(
            "",
            &q,
            b"x",
            &BasicProperties::new(),
            PublishOptions::default()
        ),
        Err(Error::NotInConfirmMode)
    ));
    assert!(matches!(
        ch.wait_for_confirms(),
        Err(Error::NotInConfirmMode)
    ));

    ch.confirm_select().unwrap();
    ch.confirm_select().unwrap(); // idempotent
    let handles: Vec<_> = (0..5)
        .map(|i| {
            ch.basic_publish_confirmed(
                "",
                &q,
                format!("c{i}").as_bytes(),
                &BasicProperties::new(),
                PublishOptions::default(),
            )
            .unwrap()
        })
        .collect();
    let seqs: Vec<u64> = handles.iter().map(|c| c.sequence()).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    for c in &handles {
        assert_eq!(c.wait().unwrap(), Confirm::Ack);
        assert_eq!(c.try_get(), Some(Confirm::Ack));
    }
    for i in 0..100 {
        publish(&ch, "", &q, format!("u{i}").as_bytes());
    }
    assert!(ch.wait_for_confirms().unwrap());
    assert_eq!(ch.unconfirmed(), 0);
    assert!(ch.wait_for_confirms().unwrap(), "nothing outstanding");
    assert_eq!(ready_count(&conn, &q), 105);
    conn.close().unwrap();
}

#[test]
fn confirms_nack_on_reject_publish_overflow() {
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    let q = ch
        .queue_declare(
            "",
            &QueueDeclareOptions {
                exclusive: true,
                arguments: args(&[
                    ("x-max-length", FieldValue::I32(1)),
                    ("x-overflow", "reject-publish".into()),
                ]),
                ..Default::default()
            },
        )
        .unwrap()
        .name;
    ch.confirm_select().unwrap();
    let p = |body: &[u8]| {
        ch.basic_publish_confirmed(
            "",
            &q,
            body,
            &BasicProperties::new(),
            PublishOptions::default(),
        )
        .unwrap()
    };
    let first = p(b"fits");
    let second = p(b"overflows");
    assert_eq!(first.wait().unwrap(), Confirm::Ack);
    assert_eq!(second.wait().unwrap(), Confirm::Nack);
    assert!(
        !ch.wait_for_confirms().unwrap(),
        "a nack since the last wait"
    );
    assert!(
        ch.wait_for_confirms().unwrap(),
        "the nack was reported once"
    );

    // Untracked publishes: wait_for_confirms sees the nack as well.
    publish(&ch, "", &q, b"overflows too");
    assert!(!ch.wait_for_confirms().unwrap());

    assert_eq!(ch.queue_purge(&q).unwrap(), 1);
    publish(&ch, "", &q, b"fits again");
    assert!(ch.wait_for_confirms().unwrap());
    let d = ch.basic_get(&q, true).unwrap().unwrap();
    assert_eq!(d.body(), b"fits again");
    conn.close().unwrap();
}

#[test]
fn concurrent_publishers_on_one_confirm_channel_get_their_own_confirms() {
    const THREADS: usize = 8;
    const PER_THREAD: usize = 100;
    const ROOM: u32 = 300;
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    let q = ch
        .queue_declare(
            "",
            &QueueDeclareOptions {
                exclusive: true,
                arguments: args(&[
                    ("x-max-length", FieldValue::I32(ROOM as i32)),
                    ("x-overflow", "reject-publish".into()),
                ]),
                ..Default::default()
            },
        )
        .unwrap()
        .name;
    ch.confirm_select().unwrap();
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (ch, q) = (ch.clone(), q.clone());
            thread::spawn(move || {
                let handles: Vec<_> = (0..PER_THREAD)
                    .map(|i| {
                        let id = format!("{t}:{i}");
                        let c = ch
                            .basic_publish_confirmed(
                                "",
                                &q,
                                id.as_bytes(),
                                &BasicProperties::new(),
                                PublishOptions::default(),
                            )
                            .unwrap();
                        (id, c)
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|(id, c)| (id, c.wait().unwrap()))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let outcomes: Vec<(String, Confirm)> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert!(!ch.wait_for_confirms().unwrap(), "some were nacked");
    let acked: HashSet<String> = outcomes
        .iter()
        .filter(|(_, c)| *c == Confirm::Ack)
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(acked.len(), ROOM as usize);
    let mut queued = HashSet::new();
    while let Some(d) = ch.basic_get(&q, true).unwrap() {
        queued.insert(String::from_utf8(d.into_body()).unwrap());
    }
    // Each handle resolved with its own message's outcome.
    assert_eq!(queued, acked);
    conn.close().unwrap();
}
