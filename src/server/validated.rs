//! Validated mode: a source registers only after echoing a stateless cookie (proving it
//! receives at its address), and every datagram it sends after that carries its token.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use super::receive::Receive;
use super::LOG_TARGET;
use crate::auth::Keys;
use crate::net;
use crate::protocol::{self, Datagram, Validated};
use crate::registry::Activity;
use crate::throttle::throttled;

/// Where a reply goes: the client's address, and the local address it wrote to.
type Reply = (SocketAddr, Option<IpAddr>);

impl Receive<'_> {
    /// A datagram to a validated-mode server, from `from` to `local` (which replies go out
    /// from).
    pub(super) fn validated(
        &mut self,
        keys: &Keys,
        data: &[u8],
        from: SocketAddr,
        local: Option<IpAddr>,
        now: Instant,
    ) {
        let to = (from, local);
        match protocol::classify_validated(data) {
            Validated::Hello => self.challenge(keys, data.len(), to, now),
            Validated::Answer(cookie) if keys.check_cookie(from, cookie, now) => {
                if self.touch(from, local, now, Activity::Validated) {
                    self.reply.clear();
                    protocol::write_keyed(&mut self.reply, protocol::WELCOME, &keys.token(from));
                    self.send_reply(to, now);
                }
            }
            Validated::Tokened { token, body } if keys.check_token(from, token) => {
                self.open(body, from, local, now)
            }
            Validated::Other => {
                self.shared.counters.dropped_malformed.fetch_add(1, Relaxed);
                // A client that has no token yet (its `reg` or the challenge was lost) sends
                // padded heartbeats: it gets a challenge. Nothing else that is not a handshake
                // step or tokened is answered: a service that answers everything (chargen, an
                // echo with a prefix) would otherwise keep a loop going, one challenge per reply.
                if protocol::classify(data) == Datagram::Heartbeat {
                    self.challenge(keys, data.len(), to, now);
                }
            }
            Validated::Answer(_) | Validated::Tokened { .. } => {
                self.shared
                    .counters
                    .dropped_unvalidated
                    .fetch_add(1, Relaxed);
                // A client whose cookie expired, or whose token is stale (the server restarted),
                // learns so and registers again.
                self.challenge(keys, data.len(), to, now);
            }
        }
    }

    /// Sends a challenge, keeping no state, and only in reply to at least as many bytes (never
    /// more than came in).
    fn challenge(&mut self, keys: &Keys, received: usize, to: Reply, now: Instant) {
        if received < protocol::CHALLENGE_LEN {
            return;
        }
        self.reply.clear();
        protocol::write_keyed(
            &mut self.reply,
            protocol::CHALLENGE,
            &keys.cookie(to.0, now),
        );
        if self.send_reply(to, now) {
            self.shared.counters.challenges.fetch_add(1, Relaxed);
        }
    }

    /// Sends `reply` to `to.0`, from the local address `to.1` it wrote to, if the reply limits
    /// allow; false if they did not.
    fn send_reply(&mut self, (to, local): Reply, now: Instant) -> bool {
        let counters = &self.shared.counters;
        if !self.replies.allow(to, now) {
            counters.replies_limited.fetch_add(1, Relaxed);
            return false;
        }
        let until = net::Until {
            stop: Some(self.stop),
            deadline: None,
        };
        let (socket, reply) = (&self.shared.socket, [(&self.reply[..], to, local)]);
        let warnings = &mut self.warnings.unanswered;
        let sent = net::send_each(socket, &mut self.outbox, reply, until, |to, e| {
            throttled!(warnings, warn, target: LOG_TARGET, "cannot answer {to}: {e}");
        });
        counters.send_errors.fetch_add(sent.failed, Relaxed);
        true
    }
}
