//! The `opentelemetry` feature: the W3C trace context (`traceparent`, `tracestate`) in
//! message headers, so that one trace spans a publisher and its consumers across the
//! broker. Opt-in per publish: only properties made with
//! [`BasicProperties::with_trace_context`] carry it.

use std::str::FromStr;

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};

use crate::delivery::Delivery;
use crate::protocol::properties::BasicProperties;
use crate::protocol::table::{FieldTable, FieldValue};

/// The W3C header names.
const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// Writes string headers into a message's header table, for any OpenTelemetry
/// propagator (e.g. the one set with `opentelemetry::global::set_text_map_propagator`).
///
/// ```
/// use lepus::{FieldTable, HeaderInjector};
/// use opentelemetry::propagation::Injector;
/// let mut headers = FieldTable::new();
/// HeaderInjector::new(&mut headers).set("baggage", "k=v".into());
/// assert_eq!(headers.get("baggage").and_then(|v| v.as_str()), Some("k=v"));
/// ```
pub struct HeaderInjector<'a> {
    headers: &'a mut FieldTable,
}

impl<'a> HeaderInjector<'a> {
    /// Inject into `headers`.
    pub fn new(headers: &'a mut FieldTable) -> Self {
        HeaderInjector { headers }
    }
}

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.headers
            .insert(key, FieldValue::LongString(value.into_bytes()));
    }
}

/// Reads string headers (UTF-8 long strings) of a message, for any OpenTelemetry
/// propagator.
///
/// ```
/// use lepus::{FieldTable, FieldValue, HeaderExtractor};
/// use opentelemetry::propagation::Extractor;
/// let headers = FieldTable::new().with("baggage", FieldValue::LongString(b"k=v".to_vec()));
/// assert_eq!(HeaderExtractor::new(&headers).get("baggage"), Some("k=v"));
/// ```
pub struct HeaderExtractor<'a> {
    headers: &'a FieldTable,
}

impl<'a> HeaderExtractor<'a> {
    /// Extract from `headers`.
    pub fn new(headers: &'a FieldTable) -> Self {
        HeaderExtractor { headers }
    }
}

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.headers.get(key).and_then(FieldValue::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.headers.iter().map(|(k, _)| k).collect()
    }
}

/// Write `cx`'s span context as W3C `traceparent` (and `tracestate` when not empty);
/// nothing if `cx` has no valid span context.
pub(crate) fn inject(cx: &Context, out: &mut dyn Injector) {
    let span = cx.span();
    let sc = span.span_context();
    if !sc.is_valid() {
        return;
    }
    let flags = sc.trace_flags() & TraceFlags::SAMPLED;
    out.set(
        TRACEPARENT,
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            flags.to_u8()
        ),
    );
    let state = sc.trace_state().header();
    if !state.is_empty() {
        out.set(TRACESTATE, state);
    }
}

/// The remote span context in W3C headers, if they hold a valid one.
pub(crate) fn extract(from: &dyn Extractor) -> Option<SpanContext> {
    let parent = from.get(TRACEPARENT)?.trim();
    let parts: Vec<&str> = parent.split('-').collect();
    let [version, trace, span, flags, rest @ ..] = parts.as_slice() else {
        return None;
    };
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    // Version 00 has exactly four fields; a later version may add more (W3C §3.2.4).
    if !hex(version, 2) || *version == "ff" || (*version == "00" && !rest.is_empty()) {
        return None;
    }
    if !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()?) & TraceFlags::SAMPLED;
    let state = from
        .get(TRACESTATE)
        .and_then(|s| TraceState::from_str(s).ok())
        .unwrap_or_default();
    let sc = SpanContext::new(trace_id, span_id, flags, true, state);
    sc.is_valid().then_some(sc)
}

impl BasicProperties {
    /// These properties with the current OpenTelemetry context's trace context in their
    /// headers (`traceparent`, `tracestate`; other headers kept), so that a consumer's
    /// [`Delivery::trace_context`] continues the trace. Unchanged when no span is
    /// current. Needs the `opentelemetry` feature.
    ///
    /// ```no_run
    /// # let conn = lepus::Connection::open("amqp://127.0.0.1")?;
    /// # let ch = conn.open_channel()?;
    /// let props = lepus::BasicProperties::new().with_trace_context();
    /// ch.basic_publish("", "orders", b"{}", &props, &Default::default())?;
    /// # Ok::<(), lepus::Error>(())
    /// ```
    pub fn with_trace_context(self) -> Self {
        self.with_context(&Context::current())
    }

    /// These properties with `cx`'s trace context in their headers (see
    /// [`BasicProperties::with_trace_context`]).
    pub fn with_context(mut self, cx: &Context) -> Self {
        let mut headers = self.headers.take().unwrap_or_default();
        inject(cx, &mut HeaderInjector::new(&mut headers));
        self.headers = (!headers.is_empty()).then_some(headers);
        self
    }

    /// The current context with the remote span context these headers carry (as a W3C
    /// propagator extracts it); the current context unchanged when they carry none.
    pub fn trace_context(&self) -> Context {
        let sc = self
            .headers
            .as_ref()
            .and_then(|h| extract(&HeaderExtractor::new(h)));
        match sc {
            Some(sc) => Context::current().with_remote_span_context(sc),
            None => Context::current(),
        }
    }
}

impl Delivery {
    /// The trace context the publisher put in this message's headers (see
    /// [`BasicProperties::with_trace_context`]): make it the parent of the span that
    /// processes the message. Needs the `opentelemetry` feature.
    ///
    /// ```no_run
    /// use opentelemetry::trace::TraceContextExt;
    /// # let conn = lepus::Connection::open("amqp://127.0.0.1")?;
    /// # let ch = conn.open_channel()?;
    /// # let consumer = ch.basic_consume("orders", &Default::default())?;
    /// let d = consumer.recv()?;
    /// let cx = d.trace_context();
    /// println!("trace {}", cx.span().span_context().trace_id());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn trace_context(&self) -> Context {
        self.properties().trace_context()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sc(state: &str) -> SpanContext {
        SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            false,
            TraceState::from_str(state).unwrap(),
        )
    }

    #[test]
    fn inject_writes_w3c_headers_and_extract_reads_them_back() {
        let cx = Context::new().with_remote_span_context(sc("vendor=x"));
        let props = BasicProperties::new()
            .headers(FieldTable::new().with("other", 1i32))
            .with_context(&cx);
        let h = props.headers.as_ref().unwrap();
        assert_eq!(
            h.get("traceparent").and_then(FieldValue::as_str),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        assert_eq!(h.get("tracestate").and_then(FieldValue::as_str), Some("vendor=x"));
        assert!(h.get("other").is_some());
        let back = extract(&HeaderExtractor::new(h)).unwrap();
        assert_eq!(back.trace_id(), sc("").trace_id());
        assert_eq!(back.span_id(), sc("").span_id());
        assert!(back.is_remote() && back.is_sampled());
        assert_eq!(back.trace_state().header(), "vendor=x");
    }

    #[test]
    fn no_span_no_headers_and_bad_headers_no_context() {
        let props = BasicProperties::new().with_context(&Context::new());
        assert!(props.headers.is_none());
        for bad in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            let t = FieldTable::new().with("traceparent", FieldValue::LongString(bad.into()));
            assert!(extract(&HeaderExtractor::new(&t)).is_none(), "{bad}");
        }
    }
}
