//! The wire layer: frames, field tables, properties, content assembly, and a method
//! decoder that only lets amq-protocol parse what a server may send and what is checked.

pub mod content;
pub mod frame;
pub mod lenient;
pub(crate) mod methods;
pub mod properties;
pub mod reply_code;
pub(crate) mod size;
pub mod table;

use amq_protocol::protocol::{AMQPClass, parse_class};

use frame::FrameError;

/// Methods a server may send to a client: (class id, method id).
const SERVER_METHODS: &[(u16, u16)] = &[
    (10, 10),  // connection.start
    (10, 20),  // connection.secure
    (10, 30),  // connection.tune
    (10, 41),  // connection.open-ok
    (10, 50),  // connection.close
    (10, 51),  // connection.close-ok
    (10, 60),  // connection.blocked
    (10, 61),  // connection.unblocked
    (10, 71),  // connection.update-secret-ok
    (20, 11),  // channel.open-ok
    (20, 20),  // channel.flow
    (20, 21),  // channel.flow-ok
    (20, 40),  // channel.close
    (20, 41),  // channel.close-ok
    (40, 11),  // exchange.declare-ok
    (40, 21),  // exchange.delete-ok
    (40, 31),  // exchange.bind-ok
    (40, 51),  // exchange.unbind-ok
    (50, 11),  // queue.declare-ok
    (50, 21),  // queue.bind-ok
    (50, 31),  // queue.purge-ok
    (50, 41),  // queue.delete-ok
    (50, 51),  // queue.unbind-ok
    (60, 11),  // basic.qos-ok
    (60, 21),  // basic.consume-ok
    (60, 30),  // basic.cancel (consumer cancel notification)
    (60, 31),  // basic.cancel-ok
    (60, 50),  // basic.return
    (60, 60),  // basic.deliver
    (60, 71),  // basic.get-ok
    (60, 72),  // basic.get-empty
    (60, 80),  // basic.ack (confirms)
    (60, 111), // basic.recover-ok
    (60, 120), // basic.nack (confirms)
    (85, 11),  // confirm.select-ok
    (90, 11),  // tx.select-ok
    (90, 21),  // tx.commit-ok
    (90, 31),  // tx.rollback-ok
];

/// Decode a method frame payload sent by a server. Methods a server never sends are
/// refused without parsing; the one server method with a field table
/// (`connection.start`) has its table depth-checked first.
pub fn decode_server_method(payload: &[u8], max_depth: usize) -> Result<AMQPClass, FrameError> {
    let ids = payload
        .get(..4)
        .map(|b| {
            (
                u16::from_be_bytes([b[0], b[1]]),
                u16::from_be_bytes([b[2], b[3]]),
            )
        })
        .ok_or_else(|| {
            FrameError::new(reply_code::FRAME_ERROR, "method frame shorter than 4 bytes")
        })?;
    if !SERVER_METHODS.contains(&ids) {
        return Err(FrameError::new(
            reply_code::COMMAND_INVALID,
            format!("method {}.{} is not one a server sends", ids.0, ids.1),
        ));
    }
    // Strings another party chose, and close reasons, are decoded leniently (see
    // `lenient`): amq-protocol would refuse the whole method for one non-UTF-8 byte.
    if let Some(close) = lenient::decode_close(payload) {
        return close.map(|c| close_class(ids.0, c));
    }
    if let Some(content) = lenient::decode_content_method(payload) {
        return content.map(|(m, _)| content_class(m));
    }
    if ids == (10, 10) {
        let table = payload.get(6..).ok_or_else(|| {
            FrameError::new(reply_code::SYNTAX_ERROR, "connection.start truncated")
        })?;
        table::scan_table(table, max_depth).map_err(|e| {
            FrameError::new(reply_code::SYNTAX_ERROR, format!("connection.start: {e}"))
        })?;
    }
    match parse_class(payload) {
        Ok((&[], class)) => Ok(class),
        Ok((rest, _)) => Err(FrameError::new(
            reply_code::SYNTAX_ERROR,
            format!(
                "method {}.{} has {} trailing bytes",
                ids.0,
                ids.1,
                rest.len()
            ),
        )),
        Err(e) => Err(FrameError::new(
            reply_code::SYNTAX_ERROR,
            format!("method {}.{} could not be decoded: {e}", ids.0, ids.1),
        )),
    }
}

/// A leniently decoded string as an amq-protocol short string: lossy decoding turns each
/// invalid byte into a 3-byte U+FFFD (and a close's cut-off text keeps what follows), so
/// it may be longer than the 255 bytes `ShortString` holds, whose `From` panics then.
fn short_lossy(mut s: String) -> amq_protocol::types::ShortString {
    if s.len() > 255 {
        let mut n = 255;
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        s.truncate(n);
    }
    s.into()
}

fn close_class(class: u16, c: lenient::LenientClose) -> AMQPClass {
    use amq_protocol::protocol::{channel, connection};
    if class == 10 {
        AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
            reply_code: c.reply_code,
            reply_text: short_lossy(c.reply_text),
            class_id: c.class_id,
            method_id: c.method_id,
        }))
    } else {
        AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
            reply_code: c.reply_code,
            reply_text: short_lossy(c.reply_text),
            class_id: c.class_id,
            method_id: c.method_id,
        }))
    }
}

fn content_class(m: content::ContentMethod) -> AMQPClass {
    use amq_protocol::protocol::basic::{AMQPMethod as B, Deliver, GetOk, Return};
    use content::ContentMethod as M;
    AMQPClass::Basic(match m {
        M::Deliver {
            consumer_tag,
            delivery_tag,
            redelivered,
            exchange,
            routing_key,
        } => B::Deliver(Deliver {
            consumer_tag: short_lossy(consumer_tag),
            delivery_tag,
            redelivered,
            exchange: short_lossy(exchange),
            routing_key: short_lossy(routing_key),
        }),
        M::GetOk {
            delivery_tag,
            redelivered,
            exchange,
            routing_key,
            message_count,
        } => B::GetOk(GetOk {
            delivery_tag,
            redelivered,
            exchange: short_lossy(exchange),
            routing_key: short_lossy(routing_key),
            message_count,
        }),
        M::Return {
            reply_code,
            reply_text,
            exchange,
            routing_key,
        } => B::Return(Return {
            reply_code,
            reply_text: short_lossy(reply_text),
            exchange: short_lossy(exchange),
            routing_key: short_lossy(routing_key),
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_only_methods_are_refused_unparsed() {
        // queue.declare (50.10) with garbage after the ids
        let err = decode_server_method(&[0, 50, 0, 10, 0xFF, 0xFF], 8).unwrap_err();
        assert_eq!(err.code, reply_code::COMMAND_INVALID);
        let err = decode_server_method(&[0, 60], 8).unwrap_err();
        assert_eq!(err.code, reply_code::FRAME_ERROR);
    }

    #[test]
    fn truncated_server_method_is_a_syntax_error() {
        // basic.deliver with nothing after the ids
        let err = decode_server_method(&[0, 60, 0, 60], 8).unwrap_err();
        assert_eq!(err.code, reply_code::SYNTAX_ERROR);
    }
}
