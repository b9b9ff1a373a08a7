//! The `content` target: content frames on a few channels into `Assembler`, against a model.

use super::{Input, gen_properties, header_payload, header_prefix_bytes, properties_bytes};
use crate::error::reply_code;
use crate::protocol::content::{Assembler, Content, ContentMethod, ContentProblem};
use crate::protocol::properties::{BasicProperties, decode_properties};

fn gen_content_method(inp: &mut Input<'_>) -> ContentMethod {
    match inp.u8() % 3 {
        0 => ContentMethod::Deliver {
            consumer_tag: inp.string(8),
            delivery_tag: inp.u64(),
            redelivered: inp.bool(),
            exchange: inp.string(8),
            routing_key: inp.string(8),
        },
        1 => ContentMethod::GetOk {
            delivery_tag: inp.u64(),
            redelivered: inp.bool(),
            exchange: inp.string(8),
            routing_key: inp.string(8),
            message_count: inp.u32(),
        },
        _ => ContentMethod::Return {
            reply_code: inp.u16(),
            reply_text: inp.string(8),
            exchange: inp.string(8),
            routing_key: inp.string(8),
        },
    }
}

/// Check properties decoded from any payload: within the depth limit, and canonical.
fn check_decoded_properties(p: &BasicProperties, max_depth: usize) {
    if let Some(h) = &p.headers {
        assert!(
            h.depth() <= max_depth,
            "headers deeper than the limit decoded"
        );
    }
    let enc = header_payload(p, 0);
    let again = decode_properties(&enc, max_depth).expect("re-encoded properties refused");
    assert_eq!(properties_bytes(&again), properties_bytes(p));
}

enum Model {
    Idle,
    Header(ContentMethod),
    Body {
        method: ContentMethod,
        properties: Result<Vec<u8>, ContentProblem>,
        expected: u64,
        received: u64,
        body: Vec<u8>,
    },
    /// The body of a too-large content, already handed over: counted, not buffered.
    Skip {
        expected: u64,
        received: u64,
    },
}

fn check_content(
    c: &Content,
    method: &ContentMethod,
    properties: &Result<Vec<u8>, ContentProblem>,
    body: &[u8],
    max_message_size: u64,
) {
    assert_eq!(&c.method, method);
    match (&c.properties, properties) {
        (Ok(p), Ok(want)) => assert_eq!(&properties_bytes(p), want),
        (Err(p), Err(want)) => assert_eq!(p, want),
        (got, want) => panic!("properties {got:?}, expected {want:?}"),
    }
    assert!(c.body.len() as u64 <= max_message_size);
    if matches!(c.properties, Err(ContentProblem::TooLarge { .. })) {
        assert!(
            c.body.is_empty() && c.body.capacity() == 0,
            "too large body buffered"
        );
    } else {
        assert_eq!(c.body, body);
    }
}

/// Harness: arbitrary sequences of content methods, content headers and body frames on
/// a few channels, fed to one [`Assembler`] per channel and to a model of the protocol.
///
/// Checks: each call succeeds or fails exactly as the model says (505 for a frame out of
/// order, 501 for a short header, a wrong class or an overlong body); completed contents
/// carry the announced method, the properties that were encoded (or `TooLarge` /
/// `Undecodable` as due) and the concatenated body; a too-large body is never buffered.
pub fn content(data: &[u8]) {
    const CHANNELS: usize = 3;
    let mut inp = Input::new(data);
    let max_message_size = match inp.u8() % 4 {
        0 => 0,
        1 => u64::from(inp.u8()),
        2 => u64::from(inp.u16()),
        _ => 1 << 20,
    };
    let max_depth = 1 + inp.below(64);
    let mut asm: Vec<Assembler> = (0..CHANNELS).map(|_| Assembler::default()).collect();
    let mut model: Vec<Model> = (0..CHANNELS).map(|_| Model::Idle).collect();
    let mut steps = 0;
    while !inp.is_empty() && steps < 4096 {
        steps += 1;
        let op = inp.u8();
        let ch = (op >> 4) as usize % CHANNELS;
        let a = &mut asm[ch];
        let m = &mut model[ch];
        let failed = match op % 8 {
            0 | 1 => {
                let method = gen_content_method(&mut inp);
                let r = a.start(method.clone());
                match m {
                    Model::Idle => {
                        r.expect("start on an idle channel");
                        *m = Model::Header(method);
                        false
                    }
                    _ => {
                        assert_eq!(r.unwrap_err().code, reply_code::UNEXPECTED_FRAME);
                        true
                    }
                }
            }
            2..=4 => {
                let (payload, want_props) = match inp.u8() % 4 {
                    0 => (inp.some_bytes(600).to_vec(), None),
                    1 => {
                        let mut p = header_prefix_bytes(inp.u64());
                        p.extend_from_slice(inp.some_bytes(600));
                        (p, None)
                    }
                    _ => {
                        let size = match inp.u8() % 4 {
                            0 => 0,
                            1 => u64::from(inp.u8()),
                            2 => max_message_size + u64::from(inp.u8() % 3),
                            _ => inp.u64(),
                        };
                        let p = gen_properties(&mut inp, max_depth);
                        (header_payload(&p, size), Some(p))
                    }
                };
                let r = a.header(&payload, max_message_size, max_depth);
                match std::mem::replace(m, Model::Idle) {
                    Model::Header(method) => {
                        if payload.len() < 12 || payload[..2] != [0, 60] {
                            assert_eq!(r.unwrap_err().code, reply_code::FRAME_ERROR);
                            true
                        } else {
                            let size = u64::from_be_bytes(payload[4..12].try_into().unwrap());
                            if size > max_message_size {
                                // Reported at once, without waiting for a body that may
                                // never come; the body frames are then counted.
                                let c = r
                                    .expect("a well-formed header in order")
                                    .expect("a too-large content is reported at its header");
                                let too_large = Err(ContentProblem::TooLarge {
                                    size,
                                    max: max_message_size,
                                });
                                check_content(&c, &method, &too_large, &[], max_message_size);
                                *m = Model::Skip {
                                    expected: size,
                                    received: 0,
                                };
                                false
                            } else {
                                let d = decode_properties(&payload, max_depth);
                                if let Ok(p) = &d {
                                    check_decoded_properties(p, max_depth);
                                }
                                match (&d, &want_props) {
                                    (Ok(got), Some(want)) => {
                                        assert_eq!(properties_bytes(got), properties_bytes(want))
                                    }
                                    (Err(e), Some(want)) => {
                                        let deep = want.headers.as_ref().unwrap().depth();
                                        assert!(deep > max_depth, "valid properties refused: {e}");
                                        assert!(e.contains("deeper than"), "{e}");
                                    }
                                    _ => {}
                                }
                                let properties = d
                                    .map(|p| properties_bytes(&p))
                                    .map_err(ContentProblem::Undecodable);
                                let r = r.expect("a well-formed header in order");
                                if size == 0 {
                                    let c = r.expect("empty body completes at the header");
                                    check_content(&c, &method, &properties, &[], max_message_size);
                                } else {
                                    assert!(r.is_none());
                                    *m = Model::Body {
                                        method,
                                        properties,
                                        expected: size,
                                        received: 0,
                                        body: Vec::new(),
                                    };
                                }
                                false
                            }
                        }
                    }
                    other => {
                        *m = other;
                        assert_eq!(r.unwrap_err().code, reply_code::UNEXPECTED_FRAME);
                        true
                    }
                }
            }
            _ => {
                let fill;
                let chunk: &[u8] = if inp.bool() {
                    inp.some_bytes(300)
                } else {
                    fill = vec![inp.u8(); inp.u16() as usize];
                    &fill
                };
                let r = a.body(chunk);
                match m {
                    Model::Body {
                        method,
                        properties,
                        expected,
                        received,
                        body,
                    } => {
                        if *received + chunk.len() as u64 > *expected {
                            assert_eq!(r.unwrap_err().code, reply_code::FRAME_ERROR);
                            true
                        } else {
                            *received += chunk.len() as u64;
                            body.extend_from_slice(chunk);
                            let r = r.expect("a body frame in order");
                            if received == expected {
                                let c = r.expect("the last body frame completes the content");
                                check_content(&c, method, properties, body, max_message_size);
                                *m = Model::Idle;
                            } else {
                                assert!(r.is_none());
                            }
                            false
                        }
                    }
                    Model::Skip { expected, received } => {
                        if *received + chunk.len() as u64 > *expected {
                            assert_eq!(r.unwrap_err().code, reply_code::FRAME_ERROR);
                            true
                        } else {
                            *received += chunk.len() as u64;
                            assert!(r.expect("a skipped body frame in order").is_none());
                            if received == expected {
                                *m = Model::Idle;
                            }
                            false
                        }
                    }
                    _ => {
                        assert_eq!(r.unwrap_err().code, reply_code::UNEXPECTED_FRAME);
                        true
                    }
                }
            }
        };
        // After a violation the connection closes: that channel's assembler is not used
        // again. Model a new connection.
        if failed {
            asm[ch] = Assembler::default();
            model[ch] = Model::Idle;
        }
        for (a, m) in asm.iter().zip(&model) {
            assert_eq!(a.is_idle(), matches!(m, Model::Idle));
        }
    }
}
