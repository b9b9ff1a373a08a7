//! The recorded topology: exchanges, queues and bindings declared through a connection,
//! and per channel its qos, confirm mode and consumers, to declare again after a
//! reconnect. Plain data: the recovery procedure (recovery.rs) replays it.

use crate::delivery::ConsumerSink;
use crate::options::{ConsumeOptions, ExchangeDeclareOptions, QueueDeclareOptions};
use crate::protocol::methods;
use crate::protocol::table::{FieldTable, FieldValue};
use crate::sync::Ordering;

use amq_protocol::protocol::AMQPClass;

#[derive(Clone, Debug)]
pub(crate) struct ExchangeRecord {
    pub(crate) kind: String,
    pub(crate) opts: ExchangeDeclareOptions,
}

#[derive(Clone, Debug)]
pub(crate) struct QueueRecord {
    pub(crate) server_named: bool,
    pub(crate) opts: QueueDeclareOptions,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct BindingRecord {
    pub(crate) to_exchange: bool,
    pub(crate) destination: String,
    pub(crate) source: String,
    pub(crate) routing_key: String,
    pub(crate) arguments: FieldTable,
}

/// Everything declared through a connection, to declare again after a reconnect.
#[derive(Clone, Debug, Default)]
pub(crate) struct Topology {
    pub(crate) exchanges: Vec<(String, ExchangeRecord)>,
    pub(crate) queues: Vec<(String, QueueRecord)>,
    pub(crate) bindings: Vec<BindingRecord>,
}

impl Topology {
    pub(crate) fn add_exchange(&mut self, name: &str, rec: ExchangeRecord) {
        self.exchanges.retain(|(n, _)| n != name);
        self.exchanges.push((name.to_owned(), rec));
    }
    pub(crate) fn remove_exchange(&mut self, name: &str) {
        self.exchanges.retain(|(n, _)| n != name);
        self.bindings
            .retain(|b| b.source != name && !(b.to_exchange && b.destination == name));
    }
    pub(crate) fn add_queue(&mut self, name: &str, rec: QueueRecord) {
        self.queues.retain(|(n, _)| n != name);
        self.queues.push((name.to_owned(), rec));
    }
    pub(crate) fn remove_queue(&mut self, name: &str) {
        self.queues.retain(|(n, _)| n != name);
        self.bindings
            .retain(|b| b.to_exchange || b.destination != name);
    }
    pub(crate) fn add_binding(&mut self, b: BindingRecord) {
        if !self.bindings.contains(&b) {
            self.bindings.push(b);
        }
    }
    pub(crate) fn remove_binding(&mut self, b: &BindingRecord) {
        self.bindings.retain(|x| x != b);
    }
    pub(crate) fn rename_queue(&mut self, old: &str, new: &str) {
        for (n, _) in &mut self.queues {
            if n == old {
                *n = new.to_owned();
            }
        }
        for b in &mut self.bindings {
            if !b.to_exchange && b.destination == old {
                b.destination = new.to_owned();
            }
        }
    }
}

/// A consumer to restore on the recovered channel.
#[derive(Clone)]
pub(crate) struct ConsumerRecord {
    pub(crate) tag: String,
    pub(crate) queue: String,
    pub(crate) opts: ConsumeOptions,
    pub(crate) sink: ConsumerSink,
}

/// Per-channel state to restore.
#[derive(Clone, Default)]
pub(crate) struct ChannelRecord {
    pub(crate) qos: Option<(u16, bool)>,
    pub(crate) confirm: bool,
    /// In transaction mode (`tx.select`).
    pub(crate) tx: bool,
    pub(crate) consumers: Vec<ConsumerRecord>,
    /// The connection generation a recovery last copied this record for: a setting
    /// recorded after that copy by an RPC of an older generation is not on the new
    /// connection (see `Channel::record_for`).
    pub(crate) copied_for: u64,
}

/// The `tx.select` that puts a channel (again) in transaction mode.
pub(crate) fn tx_select() -> AMQPClass {
    AMQPClass::Tx(amq_protocol::protocol::tx::AMQPMethod::Select(
        amq_protocol::protocol::tx::Select {},
    ))
}

/// A passive `queue.declare`: does the queue exist (and is its node up)?
pub(crate) fn queue_probe(name: &str) -> AMQPClass {
    methods::queue_declare(name, true, false, false, false, &FieldTable::new())
}

/// Entities a recovery could not restore, retried in the background until they are (or
/// the application deletes them). Names are current names (after renames).
#[derive(Clone, Debug, Default)]
pub(crate) struct PendingTopology {
    pub(crate) exchanges: Vec<String>,
    pub(crate) queues: Vec<String>,
    pub(crate) bindings: Vec<BindingRecord>,
    /// (channel id, consumer tag)
    pub(crate) consumers: Vec<(u16, String)>,
    /// A retry thread is running for this connection.
    pub(crate) retrying: bool,
}

impl PendingTopology {
    pub(crate) fn is_empty(&self) -> bool {
        self.exchanges.is_empty()
            && self.queues.is_empty()
            && self.bindings.is_empty()
            && self.consumers.is_empty()
    }
    /// A binding must wait for its source and destination.
    pub(crate) fn blocks(&self, b: &BindingRecord) -> bool {
        self.exchanges.contains(&b.source)
            || (b.to_exchange && self.exchanges.contains(&b.destination))
            || (!b.to_exchange && self.queues.contains(&b.destination))
    }
}

impl ExchangeRecord {
    /// The `exchange.declare` that declares it again.
    pub(crate) fn declare(&self, name: &str) -> AMQPClass {
        let o = &self.opts;
        methods::exchange_declare(
            name,
            &self.kind,
            false,
            o.durable,
            o.auto_delete,
            o.internal,
            &o.arguments,
        )
    }
}

impl QueueRecord {
    /// The `queue.declare` that declares it again (a server-named queue gets a new name).
    pub(crate) fn declare(&self, name: &str) -> AMQPClass {
        let o = &self.opts;
        let name = if self.server_named { "" } else { name };
        methods::queue_declare(
            name,
            false,
            o.durable,
            o.exclusive,
            o.auto_delete,
            &o.arguments,
        )
    }
}

impl ConsumerRecord {
    /// The `basic.consume` that restores it under its tag.
    pub(crate) fn consume(&self) -> AMQPClass {
        let o = &self.opts;
        let resumed;
        let mut arguments = &o.arguments;
        if let Some(next) = self.stream_resume() {
            // A stream consumer resumes after the last delivery queued to it, not from
            // its original offset specification (which would deliver it all again).
            resumed = arguments
                .clone()
                .with("x-stream-offset", FieldValue::I64(next));
            arguments = &resumed;
        }
        methods::consume(
            &self.queue,
            &self.tag,
            o.no_local,
            o.no_ack,
            o.exclusive,
            arguments,
        )
    }

    /// For a stream consumer that received something: the offset to resume from.
    pub(crate) fn stream_resume(&self) -> Option<i64> {
        let s = &self.sink.shared;
        if !s.stream.load(Ordering::Acquire) {
            return None;
        }
        match s.stream_next.load(Ordering::Acquire) {
            0 => None,
            n => i64::try_from(n).ok(),
        }
    }
}

impl BindingRecord {
    /// How recovery names it.
    pub(crate) fn entity(&self) -> crate::events::TopologyEntity {
        crate::events::TopologyEntity::Binding {
            source: self.source.clone(),
            destination: self.destination.clone(),
            routing_key: self.routing_key.clone(),
            to_exchange: self.to_exchange,
        }
    }

    /// The `exchange.bind` or `queue.bind` that binds it again.
    pub(crate) fn bind(&self) -> AMQPClass {
        methods::bind(
            self.to_exchange,
            &self.destination,
            &self.source,
            &self.routing_key,
            &self.arguments,
        )
    }

    pub(crate) fn new(
        to_exchange: bool,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Self {
        BindingRecord {
            to_exchange,
            destination: destination.to_owned(),
            source: source.to_owned(),
            routing_key: routing_key.to_owned(),
            arguments: arguments.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renaming_a_server_named_queue_moves_its_bindings() {
        let mut t = Topology::default();
        t.add_queue(
            "amq.gen_-1",
            QueueRecord {
                server_named: true,
                opts: QueueDeclareOptions::default(),
            },
        );
        t.add_binding(BindingRecord {
            to_exchange: false,
            destination: "amq.gen_-1".into(),
            source: "ex".into(),
            routing_key: "k".into(),
            arguments: FieldTable::new(),
        });
        t.rename_queue("amq.gen_-1", "amq.gen_-2");
        assert_eq!(t.queues[0].0, "amq.gen_-2");
        assert_eq!(t.bindings[0].destination, "amq.gen_-2");
        t.remove_queue("amq.gen_-2");
        assert!(t.bindings.is_empty());
    }
}
