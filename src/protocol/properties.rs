//! Basic content properties: lepus's own type, its encoder and the checked decoder.

use amq_protocol::frame::parsing::parse_content_header;

use super::table::{
    FieldTable, TableError, encode_table, put_short_str, scan_table, table_from_amqp,
};

/// The properties of a message (AMQP `basic` content header).
///
/// ```
/// use lepus::{BasicProperties, FieldTable};
/// let props = BasicProperties::new()
///     .content_type("application/json")
///     .correlation_id("req-17")
///     .reply_to("amq.rabbitmq.reply-to")
///     .headers(FieldTable::new().with("tenant", "acme"))
///     .persistent();
/// assert_eq!(props.content_type.as_deref(), Some("application/json"));
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct BasicProperties {
    /// MIME content type.
    pub content_type: Option<String>,
    /// MIME content encoding.
    pub content_encoding: Option<String>,
    /// Application headers.
    pub headers: Option<FieldTable>,
    /// 1 = transient, 2 = persistent.
    pub delivery_mode: Option<u8>,
    /// Priority, 0 to 9.
    pub priority: Option<u8>,
    /// Correlation id (RPC).
    pub correlation_id: Option<String>,
    /// Reply-to queue (RPC).
    pub reply_to: Option<String>,
    /// Per-message TTL in milliseconds, as a string.
    pub expiration: Option<String>,
    /// Application message id.
    pub message_id: Option<String>,
    /// Seconds since the epoch.
    pub timestamp: Option<u64>,
    /// Message type name.
    pub kind: Option<String>,
    /// Creating user (validated by RabbitMQ).
    pub user_id: Option<String>,
    /// Creating application.
    pub app_id: Option<String>,
    /// Deprecated cluster id.
    pub cluster_id: Option<String>,
}

macro_rules! setters {
    ($($name:ident: $ty:ty),* $(,)?) => {
        $(
            #[doc = concat!("Set `", stringify!($name), "`.")]
            pub fn $name(mut self, v: impl Into<$ty>) -> Self {
                self.$name = Some(v.into());
                self
            }
        )*
    };
}

impl BasicProperties {
    /// Properties with nothing set.
    pub fn new() -> Self {
        Self::default()
    }
    setters!(
        content_type: String,
        content_encoding: String,
        headers: FieldTable,
        correlation_id: String,
        reply_to: String,
        expiration: String,
        message_id: String,
        kind: String,
        user_id: String,
        app_id: String,
        cluster_id: String,
    );
    /// Set `delivery_mode` (2 = persistent).
    pub fn delivery_mode(mut self, v: u8) -> Self {
        self.delivery_mode = Some(v);
        self
    }
    /// Mark the message persistent (`delivery_mode` 2).
    pub fn persistent(self) -> Self {
        self.delivery_mode(2)
    }
    /// Set `priority`.
    pub fn priority(mut self, v: u8) -> Self {
        self.priority = Some(v);
        self
    }
    /// Set `timestamp` (seconds since the epoch).
    pub fn timestamp(mut self, v: u64) -> Self {
        self.timestamp = Some(v);
        self
    }

    /// Append the property flags and list (the part of a content header after body_size).
    pub(crate) fn encode(&self, out: &mut Vec<u8>, max_depth: usize) -> Result<(), String> {
        let flags_at = out.len();
        out.extend_from_slice(&[0, 0]);
        let mut flags: u16 = 0;
        let mut bit = 15;
        let s = |out: &mut Vec<u8>, v: &Option<String>, bit: u16| -> Result<u16, String> {
            match v {
                Some(v) => {
                    put_short_str(out, v)?;
                    Ok(1 << bit)
                }
                None => Ok(0),
            }
        };
        flags |= s(out, &self.content_type, bit)?;
        bit -= 1;
        flags |= s(out, &self.content_encoding, bit)?;
        bit -= 1;
        if let Some(h) = &self.headers {
            encode_table(h, out, max_depth)?;
            flags |= 1 << bit;
        }
        bit -= 1;
        if let Some(v) = self.delivery_mode {
            out.push(v);
            flags |= 1 << bit;
        }
        bit -= 1;
        if let Some(v) = self.priority {
            out.push(v);
            flags |= 1 << bit;
        }
        bit -= 1;
        flags |= s(out, &self.correlation_id, bit)?;
        bit -= 1;
        flags |= s(out, &self.reply_to, bit)?;
        bit -= 1;
        flags |= s(out, &self.expiration, bit)?;
        bit -= 1;
        flags |= s(out, &self.message_id, bit)?;
        bit -= 1;
        if let Some(v) = self.timestamp {
            out.extend_from_slice(&v.to_be_bytes());
            flags |= 1 << bit;
        }
        bit -= 1;
        flags |= s(out, &self.kind, bit)?;
        bit -= 1;
        flags |= s(out, &self.user_id, bit)?;
        bit -= 1;
        flags |= s(out, &self.app_id, bit)?;
        bit -= 1;
        flags |= s(out, &self.cluster_id, bit)?;
        out[flags_at..flags_at + 2].copy_from_slice(&flags.to_be_bytes());
        Ok(())
    }
}

/// The fixed part of a content header frame, read without amq-protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderPrefix {
    /// Content class (60 for basic).
    pub class_id: u16,
    /// Total body size announced.
    pub body_size: u64,
}

/// Read class id and body size from a content header payload.
pub fn header_prefix(payload: &[u8]) -> Option<HeaderPrefix> {
    let b = payload.get(..12)?;
    Some(HeaderPrefix {
        class_id: u16::from_be_bytes([b[0], b[1]]),
        body_size: u64::from_be_bytes([b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11]]),
    })
}

/// Decode the properties of a content header payload: the headers table is depth- and
/// bounds-checked first, then amq-protocol parses the whole header.
pub fn decode_properties(payload: &[u8], max_depth: usize) -> Result<BasicProperties, String> {
    let flags = payload
        .get(12..14)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or("content header shorter than 14 bytes")?;
    if flags & 1 != 0 {
        return Err("property flags continuation is not supported".into());
    }
    if flags & (1 << 13) != 0 {
        let mut pos = 14;
        for bit in [15, 14] {
            if flags & (1 << bit) != 0 {
                let l = *payload.get(pos).ok_or("truncated content header")? as usize;
                pos += 1 + l;
            }
        }
        let rest = payload.get(pos..).ok_or("truncated content header")?;
        scan_table(rest, max_depth).map_err(|e| match e {
            TableError::TooDeep(_) | TableError::Malformed(_) => format!("headers: {e}"),
        })?;
    }
    let (_, h) = parse_content_header(payload)
        .map_err(|e| format!("content header could not be parsed: {e}"))?;
    let p = h.properties;
    let s = |v: &Option<amq_protocol::types::ShortString>| v.as_ref().map(|v| v.to_string());
    Ok(BasicProperties {
        content_type: s(p.content_type()),
        content_encoding: s(p.content_encoding()),
        headers: p.headers().clone().map(table_from_amqp),
        delivery_mode: *p.delivery_mode(),
        priority: *p.priority(),
        correlation_id: s(p.correlation_id()),
        reply_to: s(p.reply_to()),
        expiration: s(p.expiration()),
        message_id: s(p.message_id()),
        timestamp: *p.timestamp(),
        kind: s(p.kind()),
        user_id: s(p.user_id()),
        app_id: s(p.app_id()),
        cluster_id: s(p.cluster_id()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_payload(p: &BasicProperties, body: u64) -> Vec<u8> {
        let mut out = vec![0, 60, 0, 0];
        out.extend_from_slice(&body.to_be_bytes());
        p.encode(&mut out, 64).unwrap();
        out
    }

    #[test]
    fn properties_round_trip() {
        let p = BasicProperties::new()
            .content_type("text/plain")
            .headers(FieldTable::new().with("k", "v").with("n", 5))
            .persistent()
            .priority(3)
            .correlation_id("c")
            .reply_to("r")
            .expiration("1000")
            .message_id("m")
            .timestamp(17)
            .kind("t")
            .user_id("guest")
            .app_id("a")
            .cluster_id("x")
            .content_encoding("gzip");
        let payload = header_payload(&p, 42);
        assert_eq!(
            header_prefix(&payload),
            Some(HeaderPrefix {
                class_id: 60,
                body_size: 42
            })
        );
        assert_eq!(decode_properties(&payload, 64).unwrap(), p);
    }

    #[test]
    fn deep_headers_are_refused_before_parsing() {
        let mut t = FieldTable::new().with("leaf", 1);
        for _ in 1..100 {
            t = FieldTable::new().with("n", t);
        }
        let p = BasicProperties::new().headers(t);
        let mut out = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        p.encode(&mut out, 1000).unwrap();
        let err = decode_properties(&out, 64).unwrap_err();
        assert!(err.contains("deeper than 64"), "{err}");
    }
}
