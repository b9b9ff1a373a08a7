//! Content assembly: a content-bearing method, then its header, then body frames, per
//! channel. Sizes are checked before anything is buffered.

use super::frame::FrameError;
use super::properties::{BasicProperties, decode_properties, header_prefix};
use super::reply_code;

/// The method that announced a content.
#[derive(Debug, Clone, PartialEq)]
pub enum ContentMethod {
    /// `basic.deliver`
    Deliver {
        /// Consumer tag.
        consumer_tag: String,
        /// Delivery tag.
        delivery_tag: u64,
        /// Redelivered flag.
        redelivered: bool,
        /// Exchange.
        exchange: String,
        /// Routing key.
        routing_key: String,
    },
    /// `basic.get-ok`
    GetOk {
        /// Delivery tag.
        delivery_tag: u64,
        /// Redelivered flag.
        redelivered: bool,
        /// Exchange.
        exchange: String,
        /// Routing key.
        routing_key: String,
        /// Messages left in the queue.
        message_count: u32,
    },
    /// `basic.return`
    Return {
        /// Reply code (312 no route, ...).
        reply_code: u16,
        /// Reply text.
        reply_text: String,
        /// Exchange.
        exchange: String,
        /// Routing key.
        routing_key: String,
    },
}

/// Why a content could not be handed over as a normal message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentProblem {
    /// The properties could not be decoded (malformed or nested too deep).
    Undecodable(String),
    /// The body is larger than the maximum message size; it was skipped, not buffered.
    TooLarge {
        /// Announced size.
        size: u64,
        /// Configured maximum.
        max: u64,
    },
}

/// A whole content.
#[derive(Debug)]
pub struct Content {
    /// The announcing method.
    pub method: ContentMethod,
    /// Properties, or what was wrong with them / the size.
    pub properties: Result<BasicProperties, ContentProblem>,
    /// The body (empty when too large).
    pub body: Vec<u8>,
}

// One per channel. What a content in progress holds (its method, decoded properties:
// ~400 bytes) lives in `Parts`, boxed at the channel's first content and reused for every
// later one: an idle channel, most of a connection's channels, carries a pointer instead,
// and a busy one allocates nothing more per message.
#[derive(Debug, Default)]
enum State {
    #[default]
    Idle,
    /// The method (in `Parts`) arrived; its header is next.
    Header,
    Body {
        body: Vec<u8>,
        expected: u64,
        received: u64,
    },
    /// The body of a too-large content, already reported: counted, not buffered.
    Skip { expected: u64, received: u64 },
}

/// The content in progress, besides its body.
#[derive(Debug, Default)]
struct Parts {
    method: Option<ContentMethod>,
    /// Why its message is bad already (a non-UTF-8 routing key...).
    problem: Option<String>,
    properties: Option<Result<BasicProperties, ContentProblem>>,
}

/// Per-channel assembler.
#[derive(Debug, Default)]
pub struct Assembler {
    state: State,
    parts: Option<Box<Parts>>,
}

const PREALLOC_CAP: u64 = 4 * 1024 * 1024;

fn no_method() -> FrameError {
    FrameError::new(
        reply_code::UNEXPECTED_FRAME,
        "content header frame without a content method",
    )
}

impl Assembler {
    /// True when no content is in progress (a method frame is acceptable).
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Idle)
    }

    /// A content-bearing method arrived.
    pub fn start(&mut self, method: ContentMethod) -> Result<(), FrameError> {
        self.start_flagged(method, None)
    }

    /// A content-bearing method arrived whose own fields make its message undecodable
    /// (`problem`): the content is still assembled (its frames must be read anyway) and
    /// comes out with `Err(Undecodable(problem))` as its properties.
    pub fn start_flagged(
        &mut self,
        method: ContentMethod,
        problem: Option<String>,
    ) -> Result<(), FrameError> {
        if !self.is_idle() {
            return Err(FrameError::new(
                reply_code::UNEXPECTED_FRAME,
                "content method received while a content was in progress",
            ));
        }
        let parts = self.parts.get_or_insert_with(Box::default);
        parts.method = Some(method);
        parts.problem = problem;
        parts.properties = None;
        self.state = State::Header;
        Ok(())
    }

    /// A content header frame arrived. Returns the content if its body is empty, or at
    /// once, without its body, if it is larger than `max_message_size` (the body frames
    /// are then counted and dropped: a peer may announce 2^64 - 1 bytes and never send
    /// them, and the consumer must not wait for them to learn of the delivery).
    pub fn header(
        &mut self,
        payload: &[u8],
        max_message_size: u64,
        max_depth: usize,
    ) -> Result<Option<Content>, FrameError> {
        if !matches!(self.state, State::Header) {
            return Err(no_method());
        }
        self.state = State::Idle;
        let parts = self.parts.as_deref_mut().ok_or_else(no_method)?;
        let problem = parts.problem.take();
        let prefix = header_prefix(payload).ok_or_else(|| {
            FrameError::new(
                reply_code::FRAME_ERROR,
                "content header shorter than 12 bytes",
            )
        })?;
        if prefix.class_id != 60 {
            return Err(FrameError::new(
                reply_code::FRAME_ERROR,
                format!("content header for class {}, expected 60", prefix.class_id),
            ));
        }
        let method = parts.method.take().ok_or_else(no_method)?;
        let expected = prefix.body_size;
        if expected > max_message_size {
            self.state = State::Skip {
                expected,
                received: 0,
            };
            return Ok(Some(Content {
                method,
                properties: Err(ContentProblem::TooLarge {
                    size: expected,
                    max: max_message_size,
                }),
                body: Vec::new(),
            }));
        }
        let properties = match problem {
            Some(p) => Err(ContentProblem::Undecodable(p)),
            None => decode_properties(payload, max_depth).map_err(ContentProblem::Undecodable),
        };
        // The body's room is taken at its first frame: one allocation, of its exact size
        // when it comes in one frame (most do), where taking it here and then copying a
        // one-frame body into a fresh vector allocated twice per message.
        let body = Vec::new();
        if expected == 0 {
            return Ok(Some(Content {
                method,
                properties,
                body,
            }));
        }
        parts.method = Some(method);
        parts.properties = Some(properties);
        self.state = State::Body {
            body,
            expected,
            received: 0,
        };
        Ok(None)
    }

    /// A body frame arrived. Returns the content when its last byte is in.
    pub fn body(&mut self, payload: &[u8]) -> Result<Option<Content>, FrameError> {
        match &mut self.state {
            State::Skip { expected, received } => {
                *received += payload.len() as u64;
                if *received > *expected {
                    return Err(FrameError::new(
                        reply_code::FRAME_ERROR,
                        format!(
                            "body of {received}+ bytes is longer than the {expected} announced"
                        ),
                    ));
                }
                if *received == *expected {
                    self.state = State::Idle;
                }
                return Ok(None);
            }
            State::Body {
                body,
                expected,
                received,
            } => {
                *received += payload.len() as u64;
                if *received > *expected {
                    return Err(FrameError::new(
                        reply_code::FRAME_ERROR,
                        format!(
                            "body of {received}+ bytes is longer than the {expected} announced"
                        ),
                    ));
                }
                if body.capacity() == 0 {
                    if payload.len() as u64 == *expected {
                        *body = payload.to_vec();
                    } else {
                        body.reserve_exact((*expected).min(PREALLOC_CAP) as usize);
                        body.extend_from_slice(payload);
                    }
                } else {
                    body.extend_from_slice(payload);
                }
                if *received < *expected {
                    return Ok(None);
                }
            }
            _ => {
                return Err(FrameError::new(
                    reply_code::UNEXPECTED_FRAME,
                    "content body frame without a content header",
                ));
            }
        }
        // The state was `Body` with its parts stored (checked above; no frame leads here
        // otherwise): the fallbacks only keep this function free of panics.
        let lost = || FrameError::new(reply_code::INTERNAL_ERROR, "content state lost");
        let State::Body { body, .. } = std::mem::take(&mut self.state) else {
            return Err(lost());
        };
        let parts = self.parts.as_deref_mut().ok_or_else(lost)?;
        match (parts.method.take(), parts.properties.take()) {
            (Some(method), Some(properties)) => Ok(Some(Content {
                method,
                properties,
                body,
            })),
            _ => Err(lost()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deliver() -> ContentMethod {
        ContentMethod::Deliver {
            consumer_tag: "c".into(),
            delivery_tag: 1,
            redelivered: false,
            exchange: String::new(),
            routing_key: "q".into(),
        }
    }

    fn header(body: u64) -> Vec<u8> {
        let mut out = vec![0, 60, 0, 0];
        out.extend_from_slice(&body.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        out
    }

    #[test]
    fn assembles_multi_frame_bodies() {
        let mut a = Assembler::default();
        a.start(deliver()).unwrap();
        assert!(a.header(&header(5), 100, 8).unwrap().is_none());
        assert!(a.body(b"ab").unwrap().is_none());
        let c = a.body(b"cde").unwrap().unwrap();
        assert_eq!(c.body, b"abcde");
        assert!(a.is_idle());
    }

    /// A body's room is taken once, at its first frame and of its announced size (up
    /// to the preallocation cap): none at the header, none again at later frames.
    #[test]
    fn body_room_is_taken_once_at_the_first_frame() {
        let mut a = Assembler::default();
        a.start(deliver()).unwrap();
        assert!(a.header(&header(5), 100, 8).unwrap().is_none());
        assert!(
            matches!(&a.state, State::Body { body, .. } if body.capacity() == 0),
            "nothing allocated at the header"
        );
        assert!(a.body(b"ab").unwrap().is_none());
        let first = match &a.state {
            State::Body { body, .. } => (body.capacity(), body.as_ptr()),
            _ => panic!("in the body"),
        };
        assert_eq!(first.0, 5, "room for the whole announced body");
        let c = a.body(b"cde").unwrap().unwrap();
        assert_eq!(
            (c.body.capacity(), c.body.as_ptr()),
            first,
            "no reallocation"
        );
        a.start(deliver()).unwrap();
        assert!(a.header(&header(3), 100, 8).unwrap().is_none());
        let c = a.body(b"xyz").unwrap().unwrap();
        assert_eq!((c.body.as_slice(), c.body.capacity()), (&b"xyz"[..], 3));
    }

    #[test]
    fn too_large_body_is_reported_at_once_then_counted_not_buffered() {
        let mut a = Assembler::default();
        a.start(deliver()).unwrap();
        let c = a.header(&header(1 << 63), 1000, 8).unwrap().unwrap();
        assert_eq!(
            c.properties,
            Err(ContentProblem::TooLarge {
                size: 1 << 63,
                max: 1000
            })
        );
        for _ in 0..10 {
            assert!(a.body(&[0; 1000]).unwrap().is_none());
        }
        assert!(!a.is_idle());
        let mut a = Assembler::default();
        a.start(deliver()).unwrap();
        let c = a.header(&header(2000), 1000, 8).unwrap().unwrap();
        assert!(c.body.is_empty());
        assert!(a.body(&[0; 1000]).unwrap().is_none());
        assert!(!a.is_idle());
        assert!(a.body(&[0; 1000]).unwrap().is_none());
        assert!(a.is_idle());
        a.start(deliver()).unwrap();
        a.header(&header(5), 1000, 8).unwrap();
        assert_eq!(a.body(b"12345").unwrap().unwrap().body, b"12345");
        // Longer than announced is still a frame error.
        let mut a = Assembler::default();
        a.start(deliver()).unwrap();
        a.header(&header(2000), 1000, 8).unwrap();
        assert_eq!(
            a.body(&[0; 2001]).unwrap_err().code,
            reply_code::FRAME_ERROR
        );
    }

    #[test]
    fn out_of_order_frames_are_errors() {
        let mut a = Assembler::default();
        assert_eq!(a.body(b"x").unwrap_err().code, reply_code::UNEXPECTED_FRAME);
        assert_eq!(
            a.header(&header(1), 10, 8).unwrap_err().code,
            reply_code::UNEXPECTED_FRAME
        );
        let mut a = Assembler::default();
        a.start(deliver()).unwrap();
        assert!(a.start(deliver()).is_err());
        let mut a = Assembler::default();
        a.start(deliver()).unwrap();
        a.header(&header(1), 10, 8).unwrap();
        assert_eq!(a.body(b"xy").unwrap_err().code, reply_code::FRAME_ERROR);
    }
}
