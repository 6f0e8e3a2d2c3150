//! Clients the kernel reports unreachable: an ICMP error (port unreachable: the client's
//! process is gone) for a datagram the server sent, read from the socket's error queue by the
//! receiver. In open mode the client is dropped at once, with an `unreachable` leave: anyone
//! can already forge a `quit` for any address there, so this adds no weakness. In validated
//! mode an ICMP error can be forged by anyone who knows a member's address (every member learns
//! the others' from the `ack:` lines) while a `quit` needs the token, so it only pauses sends to
//! that client until its next valid datagram, for a second at most (see `Registry::pause`); one
//! that really died leaves by `timeout`.

use log::info;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use super::receive::Receive;
use super::{Reason, LOG_TARGET};
use crate::throttle::throttled;
use crate::worker::lock;

impl Receive<'_> {
    /// The kernel reported `to` unreachable (`error`): `net::Handler::unreachable`.
    pub(super) fn unreachable_reported(&mut self, to: SocketAddr, error: &io::Error) {
        let shared = self.shared;
        if !shared.config.drop_unreachable {
            return;
        }
        let mut presence = lock(&shared.presence);
        if shared.keys.is_some() {
            let paused = presence.registry.pause(to, Instant::now());
            drop(presence);
            if paused {
                throttled!(
                    self.warnings.paused,
                    debug,
                    target: LOG_TARGET,
                    "paused sends to {to} until it is heard from again: {error}"
                );
            }
            return;
        }
        let dropped = presence.registry.remove(to).is_some();
        if dropped {
            // Counted before the event is seen: whoever reads the event reads the count.
            shared.counters.dropped_unreachable.fetch_add(1, Relaxed);
            presence.emit(Reason::Unreachable, to);
        }
        drop(presence);
        if dropped {
            info!(target: LOG_TARGET, "{to} dropped: unreachable ({error})");
        }
    }
}
