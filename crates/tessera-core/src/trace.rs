//! Trace context carried by tasks, after W3C Trace Context
//! (<https://www.w3.org/TR/trace-context/>): a `traceparent` of version `00`, a 16-byte
//! trace id and an 8-byte parent span id, both lower-case hexadecimal, and flags `01`
//! (sampled): `00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`.
//!
//! A coordinator makes one trace per round (or server step, or swarm stage): its id is a
//! BLAKE3 hash of the run id and the round, so every task of a round shares it, and each
//! task's span id is a hash of its task id. The coordinator's and the node's `tracing`
//! spans carry both (`trace_id`, `span_id`), so one task is followed from dispatch, through
//! the node that ran it, to its reply, in the logs of every process and by any collector
//! that reads W3C ids.

use std::fmt;

/// A `traceparent`: which trace a task belongs to and the span that sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace: 16 bytes, not all zero.
    pub trace_id: [u8; 16],
    /// The sending span: 8 bytes, not all zero.
    pub parent_id: [u8; 8],
}

impl TraceParent {
    /// The trace of round `round` of run `run`, and the span of task `task_id` in it.
    pub fn for_task(run: &str, round: u32, task_id: &str) -> TraceParent {
        let mut trace = blake3::Hasher::new();
        trace.update(b"tessera trace\0");
        trace.update(run.as_bytes());
        trace.update(&round.to_le_bytes());
        let mut span = blake3::Hasher::new();
        span.update(b"tessera span\0");
        span.update(task_id.as_bytes());
        let (t, s) = (trace.finalize(), span.finalize());
        let mut trace_id = [0u8; 16];
        let mut parent_id = [0u8; 8];
        trace_id.copy_from_slice(&t.as_bytes()[..16]);
        parent_id.copy_from_slice(&s.as_bytes()[..8]);
        // All-zero ids are invalid in W3C Trace Context; a hash is never all zero in
        // practice, but the rule is kept.
        trace_id[15] |= u8::from(trace_id.iter().all(|b| *b == 0));
        parent_id[7] |= u8::from(parent_id.iter().all(|b| *b == 0));
        TraceParent { trace_id, parent_id }
    }

    /// Reads a `traceparent` header value; `None` when it is not one (wrong length or
    /// version, a character that is not lower-case hexadecimal, an all-zero id). Only
    /// version `00` is read.
    pub fn parse(text: &str) -> Option<TraceParent> {
        let b = text.as_bytes();
        if b.len() != 55 || &b[..3] != b"00-" || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut parent_id = [0u8; 8];
        hex_into(&b[3..35], &mut trace_id)?;
        hex_into(&b[36..52], &mut parent_id)?;
        let mut flags = [0u8; 1];
        hex_into(&b[53..55], &mut flags)?;
        if trace_id.iter().all(|x| *x == 0) || parent_id.iter().all(|x| *x == 0) {
            return None;
        }
        Some(TraceParent { trace_id, parent_id })
    }

    /// The trace id in hexadecimal (32 characters).
    pub fn trace_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// The parent span id in hexadecimal (16 characters).
    pub fn span_hex(&self) -> String {
        hex(&self.parent_id)
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00-{}-{}-01", self.trace_hex(), self.span_hex())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_into(b: &[u8], out: &mut [u8]) -> Option<()> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    if b.len() != out.len() * 2 {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = digit(b[2 * i])? << 4 | digit(b[2 * i + 1])?;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::TraceParent;

    #[test]
    fn a_round_is_one_trace_and_a_task_one_span() {
        let a = TraceParent::for_task("s-1", 3, "s-1-r3-node-0");
        let b = TraceParent::for_task("s-1", 3, "s-1-r3-node-1");
        let c = TraceParent::for_task("s-1", 4, "s-1-r4-node-0");
        assert_eq!(a.trace_id, b.trace_id);
        assert_ne!(a.parent_id, b.parent_id);
        assert_ne!(a.trace_id, c.trace_id);
        let text = a.to_string();
        assert_eq!(text.len(), 55);
        assert_eq!(TraceParent::parse(&text), Some(a));
        // The W3C example.
        let w3c = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(TraceParent::parse(w3c).unwrap().to_string(), w3c);
    }

    #[test]
    fn hostile_traceparents_are_not_read() {
        for bad in [
            "",
            "00",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0é",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
        // Multi-byte characters of the right total length are refused, not sliced.
        let wide = format!("00-{}-{}-01", "é".repeat(16), "ab".repeat(8));
        assert_eq!(wide.len(), 55);
        assert_eq!(TraceParent::parse(&wide), None);
    }
}
