//! Presence events: who joined, who left and why, who was refused. Made under the client
//! table's lock by whichever thread changed the table, so each address's events are queued in
//! the order they happened and `seq` grows in queue order; read by the application from a
//! bounded queue, never by a callback on a core thread.

use crossbeam_channel::{Receiver, Sender};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use crate::registry::Registry;
use crate::wakeup::Wakeup;

/// What happened to an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Join,
    Leave,
    Refused,
}

/// Why: the datagram that registered a client, what ended its membership, or the limit that
/// turned it away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Joined by `reg`.
    Reg,
    /// Joined by a heartbeat.
    Heartbeat,
    /// Joined by a chat message (the tutorial registers a sender on any datagram).
    Message,
    /// Joined in validated mode, by completing the handshake or with a valid token.
    Validated,
    /// Left by `quit`.
    Quit,
    /// Silent for more than `interval`.
    Timeout,
    /// Removed by `kick()`.
    Kicked,
    /// The kernel reported its address unreachable (ICMP), in open mode.
    Unreachable,
    /// The server stopped (after sending it `end`).
    Stop,
    /// Refused: `max_clients` reached.
    MaxClients,
    /// Refused: `max_per_ip` reached for its IP address.
    MaxPerIp,
}

impl Reason {
    pub fn kind(self) -> Kind {
        match self {
            Reason::Reg | Reason::Heartbeat | Reason::Message | Reason::Validated => Kind::Join,
            Reason::Quit
            | Reason::Timeout
            | Reason::Kicked
            | Reason::Unreachable
            | Reason::Stop => Kind::Leave,
            Reason::MaxClients | Reason::MaxPerIp => Kind::Refused,
        }
    }

    /// The name applications see (`Event.reason`).
    pub fn name(self) -> &'static str {
        match self {
            Reason::Reg => "reg",
            Reason::Heartbeat => "heartbeat",
            Reason::Message => "message",
            Reason::Validated => "validated",
            Reason::Quit => "quit",
            Reason::Timeout => "timeout",
            Reason::Kicked => "kicked",
            Reason::Unreachable => "unreachable",
            Reason::Stop => "stop",
            Reason::MaxClients => "max_clients",
            Reason::MaxPerIp => "max_per_ip",
        }
    }
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Join => "join",
            Kind::Leave => "leave",
            Kind::Refused => "refused",
        }
    }
}

/// One event. `seq` counts from 1 in each server run; a gap means events were dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub seq: u64,
    pub reason: Reason,
    pub addr: SocketAddr,
    pub time: SystemTime,
}

/// The client table and the events its changes make, under one lock.
pub(super) struct Presence {
    pub(super) registry: Registry,
    /// None once the server has stopped: readers then get what is queued, then nothing.
    /// Unbounded as a channel (a bounded one takes memory for its bound at once); `capacity`
    /// bounds it, checked under this lock, the only place events are queued.
    queue: Option<Sender<Event>>,
    capacity: usize,
    /// Written when an event is queued for an event loop that waits, and when the queue closes.
    wakeup: Arc<Wakeup>,
    seq: u64,
    /// Events not queued because the queue was full.
    pub(super) dropped: u64,
}

impl Presence {
    /// The table, and a queue of `capacity` events with the end applications read from.
    pub(super) fn new(
        registry: Registry,
        capacity: usize,
        wakeup: Arc<Wakeup>,
    ) -> (Presence, Receiver<Event>) {
        let (queue, events) = crossbeam_channel::unbounded();
        let presence = Presence {
            registry,
            queue: Some(queue),
            capacity,
            wakeup,
            seq: 0,
            dropped: 0,
        };
        (presence, events)
    }

    /// Queues an event, or counts it dropped if the queue is full; its `seq` is taken either
    /// way, so a reader sees the gap.
    pub(super) fn emit(&mut self, reason: Reason, addr: SocketAddr) {
        let Some(queue) = &self.queue else { return };
        self.seq += 1;
        let event = Event {
            seq: self.seq,
            reason,
            addr,
            time: SystemTime::now(),
        };
        // Fails only once every reader is gone (the server object with them): nobody to tell.
        if queue.len() >= self.capacity || queue.send(event).is_err() {
            self.dropped += 1;
        } else {
            self.wakeup.notify();
        }
    }

    /// Counts an event dropped without queueing it, its `seq` taken.
    pub(super) fn drop_event(&mut self) {
        if self.queue.is_some() {
            self.seq += 1;
            self.dropped += 1;
        }
    }

    /// No event after this one: readers drain the queue, then find it closed.
    pub(super) fn close(&mut self) {
        self.queue = None;
        self.wakeup.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Limits;
    use std::time::Duration;

    fn presence(capacity: usize) -> (Presence, Receiver<Event>) {
        let limits = Limits {
            max_clients: 10,
            max_per_ip: 10,
        };
        let wakeup = Arc::new(Wakeup::new().unwrap());
        Presence::new(
            Registry::new(Duration::from_secs(1), limits),
            capacity,
            wakeup,
        )
    }

    #[test]
    fn a_full_queue_drops_and_counts_and_seq_shows_the_gap() {
        let (mut p, events) = presence(2);
        let a = SocketAddr::from(([127, 0, 0, 1], 1));
        for reason in [Reason::Reg, Reason::Quit, Reason::Message, Reason::Timeout] {
            p.emit(reason, a);
        }
        assert_eq!(p.dropped, 2);
        let got: Vec<(u64, Reason)> = events.try_iter().map(|e| (e.seq, e.reason)).collect();
        assert_eq!(got, [(1, Reason::Reg), (2, Reason::Quit)]);
        p.emit(Reason::Heartbeat, a);
        assert_eq!(events.try_recv().unwrap().seq, 5);
        // Closed: what is queued can be read, then the queue says it is closed.
        p.emit(Reason::Stop, a);
        p.close();
        p.emit(Reason::Reg, a);
        assert_eq!(events.try_recv().unwrap().reason, Reason::Stop);
        assert!(events.try_recv().unwrap_err().is_disconnected());
    }

    #[test]
    fn every_reason_has_its_kind_and_name() {
        use Reason::*;
        let all = [
            Reg,
            Heartbeat,
            Message,
            Validated,
            Quit,
            Timeout,
            Kicked,
            Unreachable,
            Stop,
            MaxClients,
            MaxPerIp,
        ];
        let named: Vec<String> = all
            .iter()
            .map(|r| format!("{}:{}", r.kind().name(), r.name()))
            .collect();
        assert_eq!(
            named.join(" "),
            "join:reg join:heartbeat join:message join:validated leave:quit leave:timeout \
             leave:kicked leave:unreachable leave:stop refused:max_clients refused:max_per_ip"
        );
    }
}
