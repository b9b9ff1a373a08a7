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
            &PublishOptions::default()
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
                &PublishOptions::default(),
            )
            .unwrap()
        })
        .collect();
    let seqs: Vec<u64> = handles.iter().map(|c| c.sequence()).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    for c in &handles {
        c.wait().unwrap();
        assert_eq!(c.try_get(), Some(Confirm::Ack));
    }
    for i in 0..100 {
        publish(&ch, "", &q, format!("u{i}").as_bytes());
    }
    ch.wait_for_confirms().unwrap();
    assert_eq!(ch.unconfirmed(), 0);
    ch.wait_for_confirms().expect("nothing outstanding");
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
            &PublishOptions::default(),
        )
        .unwrap()
    };
    let first = p(b"fits");
    let second = p(b"overflows");
    first.wait().unwrap();
    // `wait` makes the nack an error, with the message's sequence number ...
    match second.wait() {
        Err(Error::Nacked {
            channel, sequences, ..
        }) => {
            assert_eq!(channel, ch.id());
            assert_eq!(sequences, vec![second.sequence()]);
        }
        other => panic!("expected Error::Nacked, got {other:?}"),
    }
    // ... and the detailed outcome is still there.
    assert_eq!(second.wait_outcome().unwrap(), Confirm::Nack);
    assert_eq!(second.try_get(), Some(Confirm::Nack));
    match ch.wait_for_confirms() {
        Err(Error::Nacked { sequences, .. }) => assert_eq!(sequences, vec![2]),
        other => panic!("expected the nack since the last wait, got {other:?}"),
    }
    ch.wait_for_confirms().expect("the nack was reported once");

    // Untracked publishes: wait_for_confirms names the nacked ones among them.
    assert_eq!(ch.next_publish_sequence(), 3);
    publish(&ch, "", &q, b"overflows too");
    publish(&ch, "", &q, b"overflows as well");
    match ch.wait_for_confirms() {
        Err(Error::Nacked { sequences, .. }) => assert_eq!(sequences, vec![3, 4]),
        other => panic!("expected two nacks, got {other:?}"),
    }

    assert_eq!(ch.queue_purge(&q).unwrap(), 1);
    publish(&ch, "", &q, b"fits again");
    ch.wait_for_confirms().unwrap();
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
                                &PublishOptions::default(),
                            )
                            .unwrap();
                        (id, c)
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|(id, c)| (id, c.sequence(), c.wait_outcome().unwrap()))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let outcomes: Vec<(String, u64, Confirm)> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let nacked: HashSet<u64> = outcomes
        .iter()
        .filter(|(_, _, c)| *c == Confirm::Nack)
        .map(|(_, seq, _)| *seq)
        .collect();
    match ch.wait_for_confirms() {
        // Exactly the handles that saw a nack, each once.
        Err(Error::Nacked { sequences, .. }) => {
            assert_eq!(sequences.len(), nacked.len());
            assert_eq!(sequences.into_iter().collect::<HashSet<_>>(), nacked);
        }
        other => panic!("expected some nacks, got {other:?}"),
    }
    let acked: HashSet<String> = outcomes
        .iter()
        .filter(|(_, _, c)| *c == Confirm::Ack)
        .map(|(id, _, _)| id.clone())
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
