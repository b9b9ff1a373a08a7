//! Our own decoding of the server methods whose strings come from someone else: the
//! routing key and exchange name of `basic.deliver`, `basic.return` and `basic.get-ok`
//! (any publisher chooses them, and RabbitMQ forwards bytes that are not UTF-8) and the
//! reply text of `connection.close` and `channel.close`. amq-protocol refuses a short
//! string that is not UTF-8, which would cost the whole connection for one message, or
//! the broker's reply code for a garbled text. Here every read is bounds-checked, strings
//! are decoded lossily, and what was wrong is reported beside the value.

use std::fmt::Write as _;

use super::content::ContentMethod;
use super::frame::FrameError;
use super::reply_code;

/// A content method, and why the message it announces cannot be handed over as a normal
/// delivery (`None` when it was well formed).
pub type LenientContent = (ContentMethod, Option<String>);

/// A `connection.close` or `channel.close`: the reply code is kept whatever follows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LenientClose {
    /// The reply code.
    pub reply_code: u16,
    /// The reply text, decoded lossily (empty if it was cut off).
    pub reply_text: String,
    /// The class of the method that caused the close (0 if absent).
    pub class_id: u16,
    /// The method that caused the close (0 if absent).
    pub method_id: u16,
    /// What was malformed after the reply code, if anything.
    pub problem: Option<String>,
}

struct Reader<'a> {
    bytes: &'a [u8],
    problems: Vec<String>,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.bytes.len() < n {
            return None;
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| {
            let mut a = [0; 8];
            a.copy_from_slice(b);
            u64::from_be_bytes(a)
        })
    }
    /// A short string, lossily decoded; a non-UTF-8 one is noted as a problem.
    fn short(&mut self, what: &str) -> Option<String> {
        let len = self.u8()? as usize;
        let raw = self.take(len)?;
        Some(match std::str::from_utf8(raw) {
            Ok(s) => s.to_owned(),
            Err(_) => {
                self.problems
                    .push(format!("{what} is not UTF-8: {}", escaped(raw)));
                String::from_utf8_lossy(raw).into_owned()
            }
        })
    }
    /// Call at the end: trailing bytes become a problem.
    fn finish(mut self, method: &str) -> Option<String> {
        if !self.bytes.is_empty() {
            self.problems
                .push(format!("{method} has {} trailing bytes", self.bytes.len()));
        }
        (!self.problems.is_empty()).then(|| self.problems.join("; "))
    }
}

/// The bytes with everything but printable ASCII escaped, at most 64 of them shown.
fn escaped(raw: &[u8]) -> String {
    let mut s = String::from("b\"");
    for &b in raw.iter().take(64) {
        if b.is_ascii_graphic() || b == b' ' {
            s.push(b as char);
        } else {
            let _ = write!(s, "\\x{b:02x}");
        }
    }
    if raw.len() > 64 {
        s.push_str("...");
    }
    s.push('"');
    s
}

fn truncated(method: &str) -> FrameError {
    FrameError::new(
        reply_code::SYNTAX_ERROR,
        format!("{method} truncated before its delivery tag"),
    )
}

/// Decode `basic.deliver` (60.60), `basic.return` (60.50) or `basic.get-ok` (60.71) from
/// a whole method payload (ids included). `None` for any other method. Only a method cut
/// off before the fields that identify the message (delivery tag; reply code for a
/// return) is a connection error: anything wrong after them costs only that message.
pub fn decode_content_method(payload: &[u8]) -> Option<Result<LenientContent, FrameError>> {
    let ids = payload.get(..4)?;
    let ids = (
        u16::from_be_bytes([ids[0], ids[1]]),
        u16::from_be_bytes([ids[2], ids[3]]),
    );
    let mut r = Reader {
        bytes: &payload[4..],
        problems: Vec::new(),
    };
    let cut = |what: &str| format!("{what} truncated");
    Some(match ids {
        (60, 60) => (|| {
            let consumer_tag = r
                .short("consumer tag")
                .ok_or_else(|| truncated("basic.deliver"))?;
            let delivery_tag = r.u64().ok_or_else(|| truncated("basic.deliver"))?;
            let mut rest = || -> Option<(bool, String, String)> {
                Some((
                    r.u8()? & 1 != 0,
                    r.short("exchange")?,
                    r.short("routing key")?,
                ))
            };
            let (redelivered, exchange, routing_key, short) = match rest() {
                Some((red, ex, rk)) => (red, ex, rk, false),
                None => (false, String::new(), String::new(), true),
            };
            let mut problem = r.finish("basic.deliver");
            if short {
                problem = Some(cut("basic.deliver"));
            }
            Ok((
                ContentMethod::Deliver {
                    consumer_tag,
                    delivery_tag,
                    redelivered,
                    exchange,
                    routing_key,
                },
                problem,
            ))
        })(),
        (60, 71) => (|| {
            let delivery_tag = r.u64().ok_or_else(|| truncated("basic.get-ok"))?;
            let mut rest = || -> Option<(bool, String, String, u32)> {
                Some((
                    r.u8()? & 1 != 0,
                    r.short("exchange")?,
                    r.short("routing key")?,
                    r.u32()?,
                ))
            };
            let (redelivered, exchange, routing_key, message_count, short) = match rest() {
                Some((red, ex, rk, n)) => (red, ex, rk, n, false),
                None => (false, String::new(), String::new(), 0, true),
            };
            let mut problem = r.finish("basic.get-ok");
            if short {
                problem = Some(cut("basic.get-ok"));
            }
            Ok((
                ContentMethod::GetOk {
                    delivery_tag,
                    redelivered,
                    exchange,
                    routing_key,
                    message_count,
                },
                problem,
            ))
        })(),
        (60, 50) => (|| {
            let reply_code = r.u16().ok_or_else(|| {
                FrameError::new(
                    reply_code::SYNTAX_ERROR,
                    "basic.return truncated before its reply code",
                )
            })?;
            let mut rest = || -> Option<(String, String, String)> {
                Some((
                    r.short("reply text")?,
                    r.short("exchange")?,
                    r.short("routing key")?,
                ))
            };
            let (reply_text, exchange, routing_key, short) = match rest() {
                Some((t, ex, rk)) => (t, ex, rk, false),
                None => (String::new(), String::new(), String::new(), true),
            };
            let mut problem = r.finish("basic.return");
            if short {
                problem = Some(cut("basic.return"));
            }
            Ok((
                ContentMethod::Return {
                    reply_code,
                    reply_text,
                    exchange,
                    routing_key,
                },
                problem,
            ))
        })(),
        _ => return None,
    })
}

/// Decode `connection.close` (10.50) or `channel.close` (20.40); `None` for any other
/// method. Only a payload without a reply code is an error: the text is decoded
/// lossily, a missing class/method id reads as 0, trailing bytes are ignored (and noted).
pub fn decode_close(payload: &[u8]) -> Option<Result<LenientClose, FrameError>> {
    let ids = payload.get(..4)?;
    let name = match (
        u16::from_be_bytes([ids[0], ids[1]]),
        u16::from_be_bytes([ids[2], ids[3]]),
    ) {
        (10, 50) => "connection.close",
        (20, 40) => "channel.close",
        _ => return None,
    };
    let mut r = Reader {
        bytes: &payload[4..],
        problems: Vec::new(),
    };
    let Some(reply_code) = r.u16() else {
        return Some(Err(FrameError::new(
            reply_code::SYNTAX_ERROR,
            format!("{name} without a reply code"),
        )));
    };
    let reply_text = match r.short("reply text") {
        Some(t) => t,
        None => {
            // Cut off inside the text (its length byte was read): keep what is there.
            let text = std::mem::take(&mut r.bytes);
            r.problems.push(format!("{name} reply text truncated"));
            String::from_utf8_lossy(text).into_owned()
        }
    };
    let class_id = r.u16().unwrap_or(0);
    let method_id = r.u16().unwrap_or(0);
    let problem = r.finish(name);
    Some(Ok(LenientClose {
        reply_code,
        reply_text,
        class_id,
        method_id,
        problem,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn short(out: &mut Vec<u8>, s: &[u8]) {
        out.push(s.len() as u8);
        out.extend_from_slice(s);
    }

    fn deliver(rk: &[u8], ex: &[u8]) -> Vec<u8> {
        let mut p = vec![0, 60, 0, 60];
        short(&mut p, b"ctag");
        p.extend_from_slice(&7u64.to_be_bytes());
        p.push(1);
        short(&mut p, ex);
        short(&mut p, rk);
        p
    }

    #[test]
    fn well_formed_deliver_has_no_problem() {
        let (m, problem) = decode_content_method(&deliver(b"rk", b"ex"))
            .unwrap()
            .unwrap();
        assert_eq!(problem, None);
        assert_eq!(
            m,
            ContentMethod::Deliver {
                consumer_tag: "ctag".into(),
                delivery_tag: 7,
                redelivered: true,
                exchange: "ex".into(),
                routing_key: "rk".into(),
            }
        );
    }

    #[test]
    fn non_utf8_routing_key_and_exchange_keep_the_tag_and_say_why() {
        let (m, problem) = decode_content_method(&deliver(b"r\xffk", b"\xc3"))
            .unwrap()
            .unwrap();
        let problem = problem.unwrap();
        assert!(
            problem.contains("routing key is not UTF-8: b\"r\\xffk\""),
            "{problem}"
        );
        assert!(problem.contains("exchange is not UTF-8"), "{problem}");
        match m {
            ContentMethod::Deliver {
                delivery_tag,
                routing_key,
                ..
            } => {
                assert_eq!(delivery_tag, 7);
                assert_eq!(routing_key, "r\u{fffd}k");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn trailing_bytes_and_truncation_after_the_tag_cost_only_the_message() {
        let mut p = deliver(b"rk", b"");
        p.extend_from_slice(b"xyz");
        let (_, problem) = decode_content_method(&p).unwrap().unwrap();
        assert!(problem.unwrap().contains("3 trailing bytes"));
        let p = deliver(b"rk", b"");
        let (m, problem) = decode_content_method(&p[..p.len() - 2]).unwrap().unwrap();
        assert!(problem.unwrap().contains("truncated"));
        assert!(matches!(
            m,
            ContentMethod::Deliver {
                delivery_tag: 7,
                ..
            }
        ));
        // Before the tag: nothing to reject, a connection error.
        let e = decode_content_method(&p[..10]).unwrap().unwrap_err();
        assert_eq!(e.code, reply_code::SYNTAX_ERROR);
        // A length byte pointing past the end.
        let e = decode_content_method(&[0, 60, 0, 60, 200, b'a'])
            .unwrap()
            .unwrap_err();
        assert_eq!(e.code, reply_code::SYNTAX_ERROR);
    }

    #[test]
    fn return_and_get_ok_decode_leniently() {
        let mut p = vec![0, 60, 0, 50, 1, 56];
        short(&mut p, b"NO_ROUTE");
        short(&mut p, b"ex");
        short(&mut p, b"\xfe");
        let (m, problem) = decode_content_method(&p).unwrap().unwrap();
        assert!(problem.unwrap().contains("routing key"));
        assert!(matches!(
            m,
            ContentMethod::Return {
                reply_code: 312,
                ..
            }
        ));
        let mut p = vec![0, 60, 0, 71];
        p.extend_from_slice(&3u64.to_be_bytes());
        p.push(0);
        short(&mut p, b"\xff");
        short(&mut p, b"rk");
        p.extend_from_slice(&5u32.to_be_bytes());
        let (m, problem) = decode_content_method(&p).unwrap().unwrap();
        assert!(problem.unwrap().contains("exchange"));
        assert!(matches!(
            m,
            ContentMethod::GetOk {
                delivery_tag: 3,
                message_count: 5,
                ..
            }
        ));
        assert!(decode_content_method(&[0, 60, 0, 80, 0]).is_none());
    }

    #[test]
    fn close_keeps_its_code_whatever_follows() {
        let mut p = vec![0, 10, 0, 50, 1, 64];
        short(&mut p, b"ACCESS_REFUSED \xff");
        p.extend_from_slice(&[0, 60, 0, 40, 9, 9]);
        let c = decode_close(&p).unwrap().unwrap();
        assert_eq!((c.reply_code, c.class_id, c.method_id), (320, 60, 40));
        assert_eq!(c.reply_text, "ACCESS_REFUSED \u{fffd}");
        assert!(c.problem.unwrap().contains("2 trailing bytes"));
        // Text length past the end: what is there is kept.
        let c = decode_close(&[0, 20, 0, 40, 1, 147, 255, b'n', b'o'])
            .unwrap()
            .unwrap();
        assert_eq!((c.reply_code, c.reply_text.as_str()), (403, "no"));
        assert_eq!((c.class_id, c.method_id), (0, 0));
        assert!(decode_close(&[0, 20, 0, 40, 1]).unwrap().is_err());
        assert!(decode_close(&[0, 20, 0, 41]).is_none());
    }
}
