//! What a decoded message costs in memory, to bound queues in bytes. A content header is
//! small on the wire but may decode much larger (an array of 10,000 void values is 10 KB
//! on the wire and a few hundred KB decoded), so the cost is counted on the decoded form.

use std::mem::size_of;

use super::properties::BasicProperties;
use super::table::{FieldTable, FieldValue};

/// Per-entry overhead of a `BTreeMap` node, roughly (keys and values are counted apart).
const MAP_ENTRY_OVERHEAD: usize = 16;

/// Heap bytes held by a field value (not counting the value itself).
fn value_heap(v: &FieldValue) -> usize {
    match v {
        FieldValue::LongString(b) | FieldValue::Bytes(b) => b.capacity(),
        FieldValue::Array(a) => {
            a.capacity() * size_of::<FieldValue>() + a.iter().map(value_heap).sum::<usize>()
        }
        FieldValue::Table(t) => table_size(t),
        _ => 0,
    }
}

/// Bytes held by a decoded field table.
pub fn table_size(t: &FieldTable) -> usize {
    t.iter()
        .map(|(k, v)| {
            size_of::<String>()
                + k.len()
                + size_of::<FieldValue>()
                + value_heap(v)
                + MAP_ENTRY_OVERHEAD
        })
        .sum()
}

/// Heap bytes held by decoded properties (the struct itself not counted).
pub fn properties_heap(p: &BasicProperties) -> usize {
    let s = |s: &Option<String>| s.as_ref().map_or(0, String::capacity);
    s(&p.content_type)
        + s(&p.content_encoding)
        + p.headers.as_ref().map_or(0, table_size)
        + s(&p.correlation_id)
        + s(&p.reply_to)
        + s(&p.expiration)
        + s(&p.message_id)
        + s(&p.kind)
        + s(&p.user_id)
        + s(&p.app_id)
        + s(&p.cluster_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn voids_in_an_array_cost_more_than_their_wire_size() {
        let t = FieldTable::new().with("a", FieldValue::Array(vec![FieldValue::Void; 10_000]));
        let size = table_size(&t);
        // 10,000 bytes on the wire (one type octet each).
        assert!(size >= 10_000 * size_of::<FieldValue>(), "{size}");
        let p = BasicProperties {
            headers: Some(t),
            ..Default::default()
        };
        assert!(properties_heap(&p) >= size);
        assert_eq!(properties_heap(&BasicProperties::default()), 0);
    }
}
