//! W3C trace context (`traceparent`) carried in AMQP headers, so one trace follows a
//! journey across processes: from the upstream command, through every task request, and
//! back with each agent's reply.
//!
//! Only the header format lives here (pure); logging spans carry the trace id as a field.

/// The AMQP header name, as in HTTP.
pub const HEADER: &str = "traceparent";

/// A parsed `traceparent`: version 00, 16-byte trace id, 8-byte parent span id, flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: String,
    pub span_id: String,
    pub sampled: bool,
}

impl TraceParent {
    /// Parses a header value; anything malformed (or all-zero ids) is `None`.
    pub fn parse(s: &str) -> Option<Self> {
        let mut it = s.trim().split('-');
        let (v, t, p, f) = (it.next()?, it.next()?, it.next()?, it.next()?);
        if it.next().is_some() || v != "00" {
            return None;
        }
        let hex = |x: &str, n: usize| {
            x.len() == n
                && x.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !hex(t, 32) || !hex(p, 16) || !hex(f, 2) {
            return None;
        }
        if t.bytes().all(|b| b == b'0') || p.bytes().all(|b| b == b'0') {
            return None;
        }
        Some(Self {
            trace_id: t.to_string(),
            span_id: p.to_string(),
            sampled: u8::from_str_radix(f, 16).ok()? & 1 == 1,
        })
    }

    /// A new trace (a journey started without one).
    pub fn new_root() -> Self {
        Self {
            trace_id: random_hex(16),
            span_id: random_hex(8),
            sampled: true,
        }
    }

    /// A child span in the same trace: what the next hop carries.
    pub fn child(&self) -> Self {
        Self {
            trace_id: self.trace_id.clone(),
            span_id: random_hex(8),
            sampled: self.sampled,
        }
    }

    /// A child of the trace `trace_id` (as stored with a journey).
    pub fn child_of(trace_id: &str) -> Self {
        Self {
            trace_id: trace_id.to_string(),
            span_id: random_hex(8),
            sampled: true,
        }
    }

    pub fn header(&self) -> String {
        format!(
            "00-{}-{}-{}",
            self.trace_id,
            self.span_id,
            if self.sampled { "01" } else { "00" }
        )
    }
}

fn random_hex(bytes: usize) -> String {
    let mut v = vec![0u8; bytes];
    loop {
        rand::fill(&mut v[..]);
        if v.iter().any(|b| *b != 0) {
            return hex::encode(&v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_valid_and_refuses_malformed() {
        let t =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(t.sampled);
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn children_keep_the_trace_and_change_the_span() {
        let root = TraceParent::new_root();
        let child = root.child();
        assert_eq!(child.trace_id, root.trace_id);
        assert_ne!(child.span_id, root.span_id);
        assert_eq!(TraceParent::parse(&child.header()), Some(child));
    }
}
