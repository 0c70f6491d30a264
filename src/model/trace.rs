//! W3C Trace Context (`traceparent`, version 00): how one run is followed across processes. A run
//! has one trace id from its trigger (the producer's, when it sent a `traceparent`) to its last
//! step; every hop — the admission, each handled delivery — is a span of its own with a fresh span
//! id, and the messages it sends carry that span id as their parent. The envelope carries the
//! value, and the RabbitMQ bus copies it into each stage message's `traceparent` header.

use std::fmt;

use uuid::Uuid;

/// A parsed `traceparent`: `00-{trace id: 32 hex}-{parent span id: 16 hex}-{flags: 2 hex}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    trace_id: String,
    parent_id: String,
    flags: u8,
}

impl TraceParent {
    /// A new trace (sampled), as for a run that nobody started a trace for.
    pub fn new() -> TraceParent {
        TraceParent {
            trace_id: Uuid::new_v4().simple().to_string(),
            parent_id: new_span_id(),
            flags: 1,
        }
    }

    /// Reads a header value as the W3C recommendation says: version 00 exactly; a later version
    /// by its first four fields; lower-case hex; all-zero ids and version `ff` are invalid. `None`
    /// for anything else — the caller then starts a new trace.
    pub fn parse(text: &str) -> Option<TraceParent> {
        let text = text.trim();
        let mut parts = text.split('-');
        let (version, trace_id, parent_id, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
        if !hex(version, 2) || version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        if !hex(trace_id, 32) || !hex(parent_id, 16) || !hex(flags, 2) {
            return None;
        }
        if trace_id.bytes().all(|c| c == b'0') || parent_id.bytes().all(|c| c == b'0') {
            return None;
        }
        Some(TraceParent {
            trace_id: trace_id.to_string(),
            parent_id: parent_id.to_string(),
            flags: u8::from_str_radix(flags, 16).ok()?,
        })
    }

    /// The next hop: the same trace and flags, a new span id (the span of the work done now,
    /// which becomes the parent of what it sends).
    pub fn hop(&self) -> TraceParent {
        TraceParent {
            trace_id: self.trace_id.clone(),
            parent_id: new_span_id(),
            flags: self.flags,
        }
    }

    pub fn trace_id(&self) -> &str {
        &self.trace_id
    }

    /// The span id this value names as the parent.
    pub fn span_id(&self) -> &str {
        &self.parent_id
    }
}

impl Default for TraceParent {
    fn default() -> Self {
        TraceParent::new()
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00-{}-{}-{:02x}", self.trace_id, self.parent_id, self.flags)
    }
}

/// A random, non-zero 8-byte span id in hex.
fn new_span_id() -> String {
    loop {
        let id = Uuid::new_v4().simple().to_string()[..16].to_string();
        if id.bytes().any(|c| c != b'0') {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn parses_and_prints_the_w3c_example() {
        let parsed = TraceParent::parse(EXAMPLE).unwrap();
        assert_eq!(parsed.trace_id(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(parsed.span_id(), "b7ad6b7169203331");
        assert_eq!(parsed.to_string(), EXAMPLE);
        // A later version is read by its first four fields and written as 00.
        let future = TraceParent::parse(&format!("cc-{}-extra", &EXAMPLE[3..])).unwrap();
        assert_eq!(future.to_string(), EXAMPLE);
    }

    #[test]
    fn refuses_what_the_recommendation_calls_invalid() {
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-0af7651916cd43dd8448eb211c8031-b7ad6b7169203331-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_hop_keeps_the_trace_and_flags_with_a_new_span() {
        let parent = TraceParent::parse(EXAMPLE).unwrap();
        let hop = parent.hop();
        assert_eq!(hop.trace_id(), parent.trace_id());
        assert_ne!(hop.span_id(), parent.span_id());
        assert!(hop.to_string().ends_with("-01"));
        assert_eq!(TraceParent::parse(&hop.to_string()), Some(hop));
        let fresh = TraceParent::new();
        assert_ne!(fresh.trace_id(), parent.trace_id());
        assert_eq!(TraceParent::parse(&fresh.to_string()), Some(fresh));
    }
}
