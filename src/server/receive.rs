//! The receiver: classifies each datagram, keeps the client table, and hands each batch's
//! broadcasts on, sending a small one itself when nothing is queued ahead of it.

use crossbeam_channel::{select, Sender};
use log::info;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use super::cluster::Batch;
use super::fanout::Job;
use super::loops::{Loop, LoopGuard, ReplyLimit};
use super::Reason;
use super::{Shared, LOG_TARGET};
use crate::net;
use crate::protocol::{self, Datagram};
use crate::ratelimit::RateLimiter;
use crate::registry::{Activity, Touch};
use crate::throttle::{throttled, Throttle};
use crate::worker::{lock, Stop};

/// Datagrams read per `recvmmsg` call.
pub(super) const RECV_BATCH: usize = 32;
/// Deliveries (broadcasts times live clients) the receiver sends itself rather than hand over.
/// Handing a small fan-out to the other thread costs more in wake-ups than the send (on 2 cores,
/// about a quarter of the message rate).
const INLINE_FANOUT: usize = 256;

/// Refused addresses told apart at most (see `Receive::refusals`), whatever `event_queue` is:
/// a flood of new sources then queues at most this many refusals, not one per source up to a
/// queue of millions.
const MAX_REFUSALS: usize = 65_536;

/// The receiver's state: control words update the table; each batch's messages go to the
/// fan-out as one job, their broadcast datagrams built once.
pub(super) struct Receive<'a> {
    pub(super) shared: &'a Shared,
    pub(super) stop: &'a Stop,
    fanout: &'a Sender<Job>,
    job: Job,
    /// This batch's messages as cluster envelopes, for the publisher.
    publications: Batch,
    /// The per-source rate limiter (`rate_limit`).
    limiter: Option<RateLimiter<IpAddr>>,
    /// At most one `refused` event per address per interval.
    refusals: RateLimiter<SocketAddr>,
    /// When the rate limiters were last swept.
    swept: Instant,
    guard: LoopGuard,
    /// Validated mode's replies, built here, the buffers they are sent through, and their budget.
    pub(super) reply: Vec<u8>,
    pub(super) outbox: net::Outbox,
    pub(super) replies: ReplyLimit,
    pub(super) warnings: Warnings,
}

/// One throttle for each kind of warning the receiver logs, so a flood of one kind cannot hide
/// the others: each kind at most once a second, with a count of the rest.
#[derive(Default)]
pub(super) struct Warnings {
    bad_source: Throttle,
    looped: Throttle,
    oversize: Throttle,
    refused: Throttle,
    pub(super) unanswered: Throttle,
    pub(super) paused: Throttle,
}

impl<'a> Receive<'a> {
    pub(super) fn new(shared: &'a Shared, stop: &'a Stop, fanout: &'a Sender<Job>) -> Self {
        Receive {
            shared,
            stop,
            fanout,
            job: Job::new(),
            publications: Batch::new(),
            limiter: shared.config.rate_limit.map(|rate| {
                let sources = shared.config.limits.max_clients.max(1024);
                RateLimiter::new(rate, sources)
            }),
            refusals: {
                let interval = shared.config.interval.as_secs_f64().max(1e-3);
                let addresses = shared.config.event_queue.clamp(1024, MAX_REFUSALS);
                RateLimiter::with_burst(1.0 / interval, 1.0, addresses)
            },
            swept: Instant::now(),
            guard: LoopGuard::new(shared.local),
            reply: Vec::new(),
            outbox: net::Outbox::default(),
            replies: ReplyLimit::new(Instant::now()),
            warnings: Warnings::default(),
        }
    }

    /// A datagram in the open protocol (or the body of a tokened one), from `from` to `local`.
    pub(super) fn open(
        &mut self,
        data: &[u8],
        from: SocketAddr,
        local: Option<IpAddr>,
        now: Instant,
    ) {
        match protocol::classify(data) {
            Datagram::Empty => {}
            Datagram::Register => {
                self.touch(from, local, now, Activity::Register);
            }
            Datagram::Heartbeat => {
                self.touch(from, local, now, Activity::Heartbeat);
            }
            Datagram::Quit => {
                let left = {
                    let mut presence = lock(&self.shared.presence);
                    let left = presence.registry.remove(from).is_some();
                    if left {
                        presence.emit(Reason::Quit, from);
                    }
                    left
                };
                if left {
                    info!(target: LOG_TARGET, "{from} left");
                }
            }
            Datagram::Message(payload) => {
                // Refused here, once, rather than failing at every client's send.
                if protocol::ack_len(from, payload.len()) > protocol::MAX_BROADCAST {
                    self.shared.counters.dropped_oversize.fetch_add(1, Relaxed);
                    throttled!(
                        self.warnings.oversize,
                        warn,
                        target: LOG_TARGET,
                        "dropped a message from {from}: {} bytes, too long to relay (a broadcast \
                         can be at most {} bytes with its `ack:` line)",
                        payload.len(),
                        protocol::MAX_BROADCAST
                    );
                    return;
                }
                // A source the table turns away is not relayed either.
                let activity = Activity::Message {
                    bytes: payload.len(),
                };
                if self.touch(from, local, now, activity) {
                    let mut datagram = Vec::new();
                    protocol::write_ack(&mut datagram, from, payload);
                    self.job.push(datagram);
                    if let Some(cluster) = &self.shared.cluster {
                        self.publications.push(cluster.envelope(from, payload));
                    }
                }
            }
        }
    }

    /// Marks `from` alive (replies to it go out from `local`) having done `activity`,
    /// registering it if the limits allow; false if they did not. A join, and a refusal (once
    /// per address per interval), is an event.
    pub(super) fn touch(
        &mut self,
        from: SocketAddr,
        local: Option<IpAddr>,
        now: Instant,
        activity: Activity,
    ) -> bool {
        let touch = {
            let mut presence = lock(&self.shared.presence);
            let touch = presence.registry.touch(from, local, now, activity);
            let reason = match touch {
                Touch::Refreshed => None,
                Touch::Joined if self.shared.keys.is_some() => Some(Reason::Validated),
                Touch::Joined => Some(match activity {
                    Activity::Register => Reason::Reg,
                    Activity::Heartbeat => Reason::Heartbeat,
                    Activity::Message { .. } => Reason::Message,
                    Activity::Validated => Reason::Validated,
                }),
                Touch::Full => Some(Reason::MaxClients),
                Touch::IpFull => Some(Reason::MaxPerIp),
            };
            match reason {
                Some(refused @ (Reason::MaxClients | Reason::MaxPerIp)) => {
                    match self.refusals.allow(from, now) {
                        Some(true) => presence.emit(refused, from),
                        Some(false) => {} // refused once already this interval
                        // So many addresses refused this interval that they are no longer told
                        // apart: dropped, as from a full queue, so that one address retrying
                        // cannot fill the queue either.
                        None => presence.drop_event(),
                    }
                }
                Some(reason) => presence.emit(reason, from),
                None => {}
            }
            touch
        };
        match touch {
            Touch::Refreshed => true,
            Touch::Joined => {
                info!(target: LOG_TARGET, "{from} joined");
                true
            }
            Touch::Full | Touch::IpFull => {
                self.shared.counters.dropped_over_cap.fetch_add(1, Relaxed);
                let limits = self.shared.config.limits;
                let why = match touch {
                    Touch::Full => format!("max_clients ({}) reached", limits.max_clients),
                    _ => format!(
                        "max_per_ip ({}) reached for {}",
                        limits.max_per_ip,
                        from.ip()
                    ),
                };
                throttled!(self.warnings.refused, warn, target: LOG_TARGET, "refused {from}: {why}");
                false
            }
        }
    }
}

impl net::Handler for Receive<'_> {
    fn datagram(&mut self, data: &[u8], from: SocketAddr, local: Option<IpAddr>, cut: bool) {
        let shared = self.shared;
        let counters = &shared.counters;
        counters.received.fetch_add(1, Relaxed);
        if !protocol::is_valid_peer(from) {
            counters.dropped_bad_source.fetch_add(1, Relaxed);
            throttled!(
                self.warnings.bad_source,
                warn,
                target: LOG_TARGET,
                "dropped a datagram from {from}: not an address to answer"
            );
            return;
        }
        let now = Instant::now();
        if let Some(why) = self.guard.check(data, from, now) {
            counters.dropped_loop.fetch_add(1, Relaxed);
            let why = match why {
                Loop::Own => "its source is this server's own address",
                Loop::ServerOutput => "it is a server's output, never a client's",
            };
            throttled!(
                self.warnings.looped,
                warn,
                target: LOG_TARGET,
                "dropped a datagram from {from}: {why}"
            );
            return;
        }
        if let Some(limiter) = &mut self.limiter {
            // A new source past the table's bound is refused: a flood of spoofed sources cannot
            // buy room.
            if limiter.allow(from.ip(), now) != Some(true) {
                counters.dropped_rate_limited.fetch_add(1, Relaxed);
                return;
            }
        }
        if cut {
            counters.dropped_oversize.fetch_add(1, Relaxed);
            let max = shared.config.max_datagram;
            throttled!(
                self.warnings.oversize,
                warn,
                target: LOG_TARGET,
                "dropped a datagram from {from}: more than {max} bytes"
            );
            return;
        }
        match &shared.keys {
            None => self.open(protocol::open_body(data), from, local, now),
            Some(keys) => self.validated(keys, data, from, local, now),
        }
    }

    fn batch_done(&mut self) {
        if self.swept.elapsed() >= Duration::from_secs(1) {
            self.swept = Instant::now();
            if let Some(limiter) = &mut self.limiter {
                limiter.sweep(self.swept);
            }
            self.refusals.sweep(self.swept);
            self.replies.sweep(self.swept);
        }
        if let Some(cluster) = &self.shared.cluster {
            if !self.publications.is_empty() {
                cluster.publish(std::mem::take(&mut self.publications));
            }
        }
        if self.job.is_empty() {
            return;
        }
        let shared = self.shared;
        let small = self.job.len() * lock(&shared.presence).registry.len() <= INLINE_FANOUT;
        if small && self.fanout.is_empty() {
            if let Ok(mut sending) = shared.sending.try_lock() {
                // Checked again under the lock: the fan-out thread empties the queue only while
                // holding it, so nothing queued can be overtaken.
                if self.fanout.is_empty() {
                    shared.fan_out(&mut sending, &mut self.job, self.stop);
                    return;
                }
            }
        }
        let job = std::mem::take(&mut self.job);
        // Blocks while the fan-out queue is full (the kernel then queues and drops new
        // datagrams, and counts them), but never past stop.
        select! {
            send(self.fanout, job) -> _ => {},
            recv(self.stop.channel()) -> _ => {},
        }
    }

    fn unreachable(&mut self, to: SocketAddr, error: &std::io::Error) {
        self.unreachable_reported(to, error);
    }
}
