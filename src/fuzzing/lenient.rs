//! The `lenient` target: lepus's lenient decoding of content methods and closes against
//! amq-protocol's strict `parse_class`, on the same bytes.

use amq_protocol::protocol::{AMQPClass, basic, channel, connection, parse_class};

use crate::protocol::content::ContentMethod;
use crate::protocol::lenient::{LenientClose, decode_close, decode_content_method};
use crate::protocol::{decode_server_method, reply_code};

/// The methods lepus decodes itself, by the first input byte (any other value: the ids
/// come from the input too).
const IDS: [(u16, u16); 5] = [(60, 60), (60, 71), (60, 50), (10, 50), (20, 40)];

/// Harness: a method payload (ids chosen by the first byte, the rest as the input gives
/// it) through `decode_content_method` / `decode_close` and amq-protocol's `parse_class`.
///
/// Checks, where amq-protocol accepts the whole payload: lepus decodes the same fields
/// and reports no problem. Where amq-protocol accepts a prefix (trailing bytes): the same
/// fields, and a problem naming the trailing bytes. Where it refuses: lepus reports a
/// problem or an error, never a clean decode. lepus is deliberately more lenient in one
/// way only, which is the point of it: what amq-protocol refuses after the fields that
/// identify the message (delivery tag; reply code for a return or a close) costs that
/// message, with the identifying fields kept as they were on the wire; only a payload cut
/// before them is an error (502), and amq-protocol refuses those too. One refusal is not
/// even a problem for lepus: a close cut off before its class and method ids, which read
/// as 0 (see `ids_cut_off` below).
pub fn lenient(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let mut payload = Vec::with_capacity(data.len() + 4);
    match IDS.get(usize::from(first)) {
        Some(&(c, m)) => {
            payload.extend_from_slice(&c.to_be_bytes());
            payload.extend_from_slice(&m.to_be_bytes());
            payload.extend_from_slice(rest);
        }
        None => payload.extend_from_slice(rest),
    }
    let payload = &payload[..];
    let ids = (payload.len() >= 4).then(|| {
        (
            u16::from_be_bytes([payload[0], payload[1]]),
            u16::from_be_bytes([payload[2], payload[3]]),
        )
    });
    let strict = parse_class(payload)
        .ok()
        .map(|(rest, class)| (rest.len(), class));

    let content = decode_content_method(payload);
    let close = decode_close(payload);
    let ours_ids = ids.filter(|i| IDS.contains(i));
    assert_eq!(
        content.is_some() || close.is_some(),
        ours_ids.is_some(),
        "lenient decoding claimed the wrong methods ({ids:?})"
    );
    assert!(content.is_none() || close.is_none());

    // What the engine and the handshake do with any server method: the lenient result
    // turned into amq-protocol's types, which must hold it (its short strings panic past
    // 255 bytes, and lossy decoding makes a byte three).
    let whole = decode_server_method(payload, 8);
    if let Some(Ok((m, _))) = &content {
        let class = whole.as_ref().expect("a lenient decode refused as a whole");
        let tag = |m: &ContentMethod| match m {
            ContentMethod::Deliver { delivery_tag, .. }
            | ContentMethod::GetOk { delivery_tag, .. } => *delivery_tag,
            ContentMethod::Return { reply_code, .. } => u64::from(*reply_code),
        };
        assert_eq!(
            strict_content(class.clone()).as_ref().map(tag),
            Some(tag(m))
        );
    }
    if let Some(Ok(c)) = &close {
        let class = whole.as_ref().expect("a lenient close refused as a whole");
        assert_eq!(
            strict_close(class.clone()).map(|s| s.0),
            Some(c.reply_code),
            "the reply code lost on the way to amq-protocol's types"
        );
    }

    if let Some(r) = content {
        match r {
            Err(e) => {
                assert_eq!(e.code, reply_code::SYNTAX_ERROR);
                assert!(strict.is_none(), "lepus refused what amq-protocol accepts");
            }
            Ok((m, problem)) => {
                check_identity(&m, payload);
                match &strict {
                    Some((0, class)) => {
                        assert_eq!(problem, None, "a problem where amq-protocol found none");
                        assert_eq!(Some(m), strict_content(class.clone()), "fields differ");
                    }
                    Some((trailing, class)) => {
                        let p = problem.expect("trailing bytes not reported");
                        assert!(p.contains(&format!("{trailing} trailing bytes")), "{p}");
                        assert_eq!(Some(m), strict_content(class.clone()), "fields differ");
                    }
                    None => assert!(problem.is_some(), "amq-protocol refused, lepus did not"),
                }
            }
        }
    }
    if let Some(r) = close {
        match r {
            Err(e) => {
                assert_eq!(e.code, reply_code::SYNTAX_ERROR);
                assert!(payload.len() < 6, "a close with a reply code refused");
                assert!(strict.is_none(), "lepus refused what amq-protocol accepts");
            }
            Ok(c) => {
                assert_eq!(
                    c.reply_code,
                    u16::from_be_bytes([payload[4], payload[5]]),
                    "reply code lost"
                );
                let ours = (c.reply_code, c.reply_text.clone(), c.class_id, c.method_id);
                match &strict {
                    Some((0, class)) => {
                        assert_eq!(c.problem, None, "a problem where amq-protocol found none");
                        assert_eq!(Some(ours), strict_close(class.clone()), "fields differ");
                    }
                    Some((trailing, class)) => {
                        let p = c.problem.clone().expect("trailing bytes not reported");
                        assert!(p.contains(&format!("{trailing} trailing bytes")), "{p}");
                        assert_eq!(Some(ours), strict_close(class.clone()), "fields differ");
                    }
                    None => assert!(
                        c.problem.is_some() || ids_cut_off(payload),
                        "amq-protocol refused, lepus did not"
                    ),
                }
                check_close_text(&c, payload);
            }
        }
    }
}

/// A close whose text is whole and whose class and method ids are missing (both, or the
/// method id): lepus reads a missing id as 0 without noting a problem (documented in
/// `decode_close`: the ids only say which method caused the close), amq-protocol refuses.
/// Half an id is one trailing byte, noted as such.
fn ids_cut_off(payload: &[u8]) -> bool {
    let Some(&len) = payload.get(6) else {
        return false;
    };
    let ids_at = 7 + usize::from(len);
    matches!(payload.len().checked_sub(ids_at), Some(0 | 2))
}

/// The identifying fields are the bytes on the wire, whatever follows them.
fn check_identity(m: &ContentMethod, payload: &[u8]) {
    let u64_at = |i: usize| {
        let mut a = [0; 8];
        a.copy_from_slice(&payload[i..i + 8]);
        u64::from_be_bytes(a)
    };
    match m {
        ContentMethod::Deliver { delivery_tag, .. } => {
            let tag_len = usize::from(payload[4]);
            assert_eq!(*delivery_tag, u64_at(5 + tag_len));
        }
        ContentMethod::GetOk { delivery_tag, .. } => assert_eq!(*delivery_tag, u64_at(4)),
        ContentMethod::Return { reply_code, .. } => {
            assert_eq!(*reply_code, u16::from_be_bytes([payload[4], payload[5]]));
        }
    }
}

/// A text cut off by its length keeps the bytes that are there (lossily decoded).
fn check_close_text(c: &LenientClose, payload: &[u8]) {
    let Some(&len) = payload.get(6) else {
        assert!(c.reply_text.is_empty());
        return;
    };
    let have = &payload[7..];
    let text = &have[..usize::from(len).min(have.len())];
    assert_eq!(c.reply_text, String::from_utf8_lossy(text));
}

fn strict_content(class: AMQPClass) -> Option<ContentMethod> {
    use basic::AMQPMethod as B;
    Some(match class {
        AMQPClass::Basic(B::Deliver(d)) => ContentMethod::Deliver {
            consumer_tag: d.consumer_tag.to_string(),
            delivery_tag: d.delivery_tag,
            redelivered: d.redelivered,
            exchange: d.exchange.to_string(),
            routing_key: d.routing_key.to_string(),
        },
        AMQPClass::Basic(B::GetOk(g)) => ContentMethod::GetOk {
            delivery_tag: g.delivery_tag,
            redelivered: g.redelivered,
            exchange: g.exchange.to_string(),
            routing_key: g.routing_key.to_string(),
            message_count: g.message_count,
        },
        AMQPClass::Basic(B::Return(r)) => ContentMethod::Return {
            reply_code: r.reply_code,
            reply_text: r.reply_text.to_string(),
            exchange: r.exchange.to_string(),
            routing_key: r.routing_key.to_string(),
        },
        _ => return None,
    })
}

fn strict_close(class: AMQPClass) -> Option<(u16, String, u16, u16)> {
    match class {
        AMQPClass::Connection(connection::AMQPMethod::Close(c)) => Some((
            c.reply_code,
            c.reply_text.to_string(),
            c.class_id,
            c.method_id,
        )),
        AMQPClass::Channel(channel::AMQPMethod::Close(c)) => Some((
            c.reply_code,
            c.reply_text.to_string(),
            c.class_id,
            c.method_id,
        )),
        _ => None,
    }
}
