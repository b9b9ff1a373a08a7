//! One builder per AMQP method that lepus sends from more than one place (a channel call
//! and the recovery replay), so that both send the same fields. Names and arguments are
//! checked by the caller (channel.rs) before they are recorded; encoding refuses what
//! still cannot be sent.

use amq_protocol::protocol::{AMQPClass, basic, confirm, exchange, queue};

use super::table::{FieldTable, table_to_amqp};

/// `exchange.declare`.
pub(crate) fn exchange_declare(
    name: &str,
    kind: &str,
    passive: bool,
    durable: bool,
    auto_delete: bool,
    internal: bool,
    arguments: &FieldTable,
) -> AMQPClass {
    AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
        exchange: name.into(),
        kind: kind.into(),
        passive,
        durable,
        auto_delete,
        internal,
        nowait: false,
        arguments: table_to_amqp(arguments),
    }))
}

/// `queue.declare`; an empty name asks the broker for one.
pub(crate) fn queue_declare(
    name: &str,
    passive: bool,
    durable: bool,
    exclusive: bool,
    auto_delete: bool,
    arguments: &FieldTable,
) -> AMQPClass {
    AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
        queue: name.into(),
        passive,
        durable,
        exclusive,
        auto_delete,
        nowait: false,
        arguments: table_to_amqp(arguments),
    }))
}

/// `exchange.bind` (exchange to exchange) or `queue.bind`.
pub(crate) fn bind(
    to_exchange: bool,
    destination: &str,
    source: &str,
    routing_key: &str,
    arguments: &FieldTable,
) -> AMQPClass {
    if to_exchange {
        AMQPClass::Exchange(exchange::AMQPMethod::Bind(exchange::Bind {
            destination: destination.into(),
            source: source.into(),
            routing_key: routing_key.into(),
            nowait: false,
            arguments: table_to_amqp(arguments),
        }))
    } else {
        AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
            queue: destination.into(),
            exchange: source.into(),
            routing_key: routing_key.into(),
            nowait: false,
            arguments: table_to_amqp(arguments),
        }))
    }
}

/// `basic.qos`.
pub(crate) fn qos(prefetch_count: u16, global: bool) -> AMQPClass {
    AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
        prefetch_count,
        global,
    }))
}

/// `basic.consume`; an empty tag asks the broker for one.
pub(crate) fn consume(
    queue: &str,
    consumer_tag: &str,
    no_local: bool,
    no_ack: bool,
    exclusive: bool,
    arguments: &FieldTable,
) -> AMQPClass {
    AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
        queue: queue.into(),
        consumer_tag: consumer_tag.into(),
        no_local,
        no_ack,
        exclusive,
        nowait: false,
        arguments: table_to_amqp(arguments),
    }))
}

/// `basic.cancel`, waiting for its `cancel-ok`.
pub(crate) fn cancel(consumer_tag: &str) -> AMQPClass {
    AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
        consumer_tag: consumer_tag.into(),
        nowait: false,
    }))
}

/// `confirm.select`.
pub(crate) fn confirm_select() -> AMQPClass {
    AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
        nowait: false,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::{FrameDecoder, put_method};
    use amq_protocol::protocol::parse_class;

    /// Each builder's method survives amq-protocol's encoder and parser unchanged.
    #[test]
    fn built_methods_round_trip_through_the_codec() {
        let mut args = FieldTable::new();
        args.insert("x-max-priority", 5i32);
        for m in [
            exchange_declare("ex", "topic", false, true, false, true, &args),
            queue_declare("", false, true, true, false, &args),
            bind(true, "dst", "src", "rk.#", &args),
            bind(false, "q", "ex", "rk", &FieldTable::new()),
            qos(10, false),
            consume("q", "tag-1", false, true, true, &args),
            confirm_select(),
        ] {
            let mut bytes = Vec::new();
            put_method(&mut bytes, 3, m.clone()).unwrap();
            let mut dec = FrameDecoder::new(4096);
            dec.feed(&bytes);
            let f = dec.next_frame().unwrap().unwrap();
            assert_eq!(f.channel, 3);
            let (rest, back) = parse_class(f.payload).unwrap();
            assert!(rest.is_empty());
            assert_eq!(back, m);
        }
    }
}
