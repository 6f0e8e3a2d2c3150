//! Presence as Python sees it: `Event` and `Peer`, immutable values converted from the core's.

use pyo3::prelude::*;
use std::hash::{Hash, Hasher};
use std::time::{SystemTime, UNIX_EPOCH};

use super::py_addr;
use crate::registry;
use crate::server;

/// Unix seconds.
fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// A client joined, left, or was refused. ``kind`` is ``'join'``, ``'leave'`` or
/// ``'refused'``; ``reason`` says why (see the README); ``seq`` counts from 1 in each server run,
/// and a gap means events were dropped while the queue was full.
#[pyclass(frozen, eq, hash, module = "udpchat._udpchat")]
#[derive(PartialEq)]
pub struct Event {
    #[pyo3(get)]
    kind: &'static str,
    #[pyo3(get)]
    addr: (String, u16),
    #[pyo3(get)]
    reason: &'static str,
    #[pyo3(get)]
    time: f64,
    #[pyo3(get)]
    seq: u64,
}

// By hand for the times: equal values (never NaN, never -0.0) have equal bits.
impl Hash for Event {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (self.seq, self.kind, &self.addr, self.reason).hash(state);
        self.time.to_bits().hash(state);
    }
}

impl From<server::Event> for Event {
    fn from(e: server::Event) -> Event {
        Event {
            kind: e.reason.kind().name(),
            addr: py_addr(e.addr),
            reason: e.reason.name(),
            time: unix(e.time),
            seq: e.seq,
        }
    }
}

#[pymethods]
impl Event {
    fn __repr__(&self) -> String {
        format!(
            "Event(seq={}, kind='{}', addr=('{}', {}), reason='{}', time={})",
            self.seq, self.kind, self.addr.0, self.addr.1, self.reason, self.time
        )
    }
}

/// One registered client's figures: when it joined and was last heard from (Unix seconds), the
/// chat messages it sent and their payloads' bytes as relayed, its heartbeats, and whether it
/// proved its address (validated mode).
#[pyclass(frozen, eq, hash, module = "udpchat._udpchat")]
#[derive(PartialEq)]
pub struct Peer {
    #[pyo3(get)]
    joined: f64,
    #[pyo3(get)]
    last_seen: f64,
    #[pyo3(get)]
    messages: u64,
    #[pyo3(get)]
    bytes: u64,
    #[pyo3(get)]
    heartbeats: u64,
    #[pyo3(get)]
    validated: bool,
}

impl Hash for Peer {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (self.joined.to_bits(), self.last_seen.to_bits()).hash(state);
        (self.messages, self.bytes, self.heartbeats, self.validated).hash(state);
    }
}

impl Peer {
    pub fn new(
        peer: &registry::Peer,
        joined: SystemTime,
        seen: SystemTime,
        validated: bool,
    ) -> Peer {
        Peer {
            joined: unix(joined),
            last_seen: unix(seen),
            messages: peer.messages,
            bytes: peer.bytes,
            heartbeats: peer.heartbeats,
            validated,
        }
    }
}

#[pymethods]
impl Peer {
    fn __repr__(&self) -> String {
        format!(
            "Peer(joined={}, last_seen={}, messages={}, bytes={}, heartbeats={}, validated={})",
            self.joined,
            self.last_seen,
            self.messages,
            self.bytes,
            self.heartbeats,
            if self.validated { "True" } else { "False" }
        )
    }
}
