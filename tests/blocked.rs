//! `connection.blocked` / `connection.unblocked` from a real broker under a memory alarm.
//!
//! This is its own test binary (so its own process, run after or before the others, never
//! alongside them): the alarm blocks every publishing connection of the broker. It raises
//! the alarm with `rabbitmqctl set_vm_memory_high_watermark` and always restores the
//! watermark it found (read with `rabbitmqctl eval`), also when the test fails. Without a
//! usable rabbitmqctl (not root) it is skipped with a message, or fails under CI.

mod support;

use std::time::{Duration, Instant};

use lepus::{BasicProperties, ConnectionEventKind, Error, PublishOptions};
use support::{
    exclusive_queue, rabbitmqctl, rabbitmqctl_command, rabbitmqctl_or_skip, test_options,
    wait_until,
};

/// The broker's memory watermark now, as the arguments of `set_vm_memory_high_watermark`
/// that set it back: a fraction (`0.4`) or `absolute <bytes>`.
fn current_watermark() -> Vec<String> {
    let out = rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."]);
    watermark_args(out.trim())
        .unwrap_or_else(|| panic!("cannot read the memory watermark from {out:?}"))
}

/// `0.4` -> ["0.4"]; `{absolute,1073741824}` -> ["absolute", "1073741824"];
/// `{relative,0.4}` -> ["0.4"].
fn watermark_args(v: &str) -> Option<Vec<String>> {
    if v.parse::<f64>().is_ok() {
        return Some(vec![v.to_owned()]);
    }
    let inner = v.strip_prefix('{')?.strip_suffix('}')?;
    let (kind, value) = inner.split_once(',')?;
    let value = value.trim().trim_matches('"').to_owned();
    match kind.trim() {
        "absolute" => Some(vec!["absolute".into(), value]),
        "relative" => Some(vec![value]),
        _ => None,
    }
}

#[test]
fn watermark_values_read_back_as_arguments() {
    assert_eq!(watermark_args("0.4").unwrap(), ["0.4"]);
    assert_eq!(
        watermark_args("{absolute,1073741824}").unwrap(),
        ["absolute", "1073741824"]
    );
    assert_eq!(watermark_args("{relative,0.6}").unwrap(), ["0.6"]);
    assert!(watermark_args("nonsense").is_none());
}

/// Restores the watermark found before the test when dropped, also when the test fails.
struct RestoreWatermark(Vec<String>);

impl Drop for RestoreWatermark {
    fn drop(&mut self) {
        let cmd = rabbitmqctl_command();
        let out = std::process::Command::new(&cmd[0])
            .args(&cmd[1..])
            .arg("set_vm_memory_high_watermark")
            .args(&self.0)
            .output();
        if !matches!(&out, Ok(o) if o.status.success()) {
            eprintln!(
                "could not restore the memory watermark to {:?}: {out:?}",
                self.0
            );
        }
    }
}

#[test]
fn memory_alarm_blocks_publishers_until_it_clears() {
    if !rabbitmqctl_or_skip("memory_alarm_blocks_publishers_until_it_clears") {
        return;
    }
    // The listener hears what the log keeps: blocked (with the broker's reason), then
    // unblocked.
    let heard = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let h = heard.clone();
    let conn = lepus::Connection::open_with(
        test_options().event_listener(move |e| h.lock().unwrap().push(e.kind.clone())),
    )
    .expect("connect");
    let ch = conn.open_channel().unwrap();
    let q = exclusive_queue(&ch);
    ch.confirm_select().unwrap();
    let publish = |ch: &lepus::Channel, body: &[u8]| {
        ch.basic_publish(
            "",
            &q,
            body,
            &BasicProperties::new(),
            &PublishOptions::default(),
        )
    };
    publish(&ch, b"before").unwrap();
    ch.wait_for_confirms().unwrap();
    assert_eq!(conn.blocked(), None);

    let found = current_watermark();
    let restore = RestoreWatermark(found.clone());
    rabbitmqctl(&["set_vm_memory_high_watermark", "0.000001"]);
    // The broker blocks a connection once it publishes during the alarm.
    publish(&ch, b"during").expect("a publish before the block is noticed is queued");
    assert!(
        wait_until(Duration::from_secs(15), || conn.blocked().is_some()),
        "connection.blocked never arrived"
    );
    let reason = conn.blocked().unwrap();
    assert!(reason.contains("memory"), "blocked reason: {reason:?}");

    // Publishers wait while blocked, within their deadline.
    let t = Instant::now();
    let r = publish(&ch.with_timeout(Duration::from_millis(300)), b"blocked");
    let waited = t.elapsed();
    assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "{waited:?}"
    );

    let mut set_back = vec!["set_vm_memory_high_watermark"];
    set_back.extend(found.iter().map(String::as_str));
    rabbitmqctl(&set_back);
    assert!(
        wait_until(Duration::from_secs(15), || conn.blocked().is_none()),
        "connection.unblocked never arrived"
    );
    drop(restore);
    let expected = vec![
        ConnectionEventKind::Blocked {
            reason: reason.clone(),
        },
        ConnectionEventKind::Unblocked,
    ];
    let logged: Vec<_> = conn.events().into_iter().map(|e| e.kind).collect();
    assert_eq!(logged, expected);
    assert!(
        wait_until(Duration::from_secs(5), || heard.lock().unwrap().len() == 2),
        "the listener heard {:?}",
        heard.lock().unwrap()
    );
    assert_eq!(*heard.lock().unwrap(), expected);

    publish(&ch, b"after").unwrap();
    ch.wait_for_confirms().unwrap();
    let mut bodies = Vec::new();
    while let Some(d) = ch.basic_get(&q, true).unwrap() {
        bodies.push(d.into_body());
    }
    assert_eq!(
        bodies,
        vec![b"before".to_vec(), b"during".to_vec(), b"after".to_vec()]
    );
    conn.close().unwrap();
}
