//! The fan-out: every broadcast to every live client through `sendmmsg`, each from the local
//! address the client sends to; the thread that sends queued broadcasts and sweeps out silent
//! clients; and the helper threads that share a large fan-out (`fanout_threads`), started with
//! the server and joined at its stop.
//!
//! Every fan-out runs under one lock, `Shared::sending`, held across the `sendmmsg` calls by
//! whichever thread sends (this thread, or the receiver for a small fan-out with nothing queued
//! ahead of it) and until every helper has sent its part: that lock is what keeps broadcasts in
//! the order their messages arrived.

use crossbeam_channel::{select, Receiver, Select, Sender};
use log::info;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use super::{Reason, Shared, LOG_TARGET};
use crate::error::Result;
use crate::net;
use crate::registry::{Clock, Member, Members};
use crate::throttle::{throttled, Throttle};
use crate::worker::{lock, Stop, Workers};

/// Broadcast datagrams, built once, in the order their messages arrived.
pub(super) type Job = Vec<Vec<u8>>;

/// Jobs (one per received batch) waiting for the fan-out thread. When it falls this far behind,
/// the receiver waits, and new datagrams queue in the kernel (which drops and counts them)
/// instead of in memory.
pub(super) const FANOUT_QUEUE: usize = 64;
/// Jobs sent out together in one round of `sendmmsg` calls.
const FANOUT_ROUND: usize = 16;
/// Deliveries in one round worth splitting between `fanout_threads` threads.
const PARALLEL_FANOUT: usize = 1024;

/// What one sending thread keeps from one fan-out to the next: its `sendmmsg` buffers and its
/// error log's throttle.
#[derive(Default)]
pub(super) struct Batch {
    outbox: net::Outbox,
    errors: Throttle,
}

/// What a fan-out needs besides the socket: the sending thread's batch, and the helpers it
/// shares a large fan-out with (none with `fanout_threads = 1`).
#[derive(Default)]
pub(super) struct Sending {
    batch: Batch,
    helpers: Option<Helpers>,
}

impl Sending {
    /// Buffers for a send made between fan-outs (a kick's `end`).
    pub(super) fn outbox(&mut self) -> &mut net::Outbox {
        &mut self.batch.outbox
    }
}

/// The fan-out's ends of the channels to its helper threads.
struct Helpers {
    parts: Sender<Part>,
    done: Receiver<()>,
    count: usize,
}

/// One helper's share of a round: every datagram to a range of the members.
struct Part {
    datagrams: Arc<Job>,
    members: Members,
    range: Range<usize>,
    clock: Clock,
    now: u64,
}

/// Starts the `fanout_threads - 1` helper threads and hands them to the fan-out. Each waits
/// for a part of a large fan-out, sends it, says so, and ends when the server stops.
pub(super) fn start_helpers(shared: &Arc<Shared>, workers: &Workers) -> Result<()> {
    let count = shared.config.fanout_threads.saturating_sub(1);
    if count == 0 {
        return Ok(());
    }
    let (parts, parts_rx) = crossbeam_channel::unbounded::<Part>();
    let (done_tx, done) = crossbeam_channel::unbounded();
    for i in 0..count {
        let (shared, stop) = (Arc::clone(shared), Arc::clone(workers.stop()));
        let (parts, done) = (parts_rx.clone(), done_tx.clone());
        workers.spawn(&format!("udpchat-srv-tx{}", i + 2), move || {
            let mut batch = Batch::default();
            loop {
                select! {
                    recv(parts) -> part => {
                        let Ok(part) = part else { return };
                        let members = &part.members[part.range.clone()];
                        let live = (part.clock, part.now);
                        shared.send_to_part(&mut batch, &part.datagrams, members, live, &stop);
                        drop(part);
                        let _ = done.send(());
                    },
                    recv(stop.channel()) -> _ => return,
                }
            }
        })?;
    }
    lock(&shared.sending).helpers = Some(Helpers { parts, done, count });
    Ok(())
}

impl Shared {
    /// Sends every datagram of `datagrams` to every live client, and empties it. Expiry applies
    /// here, per member, even between sweeps. Call it holding `sending`. A large round is split
    /// between the helpers by client, so each client still gets its datagrams in order.
    pub(super) fn fan_out(&self, sending: &mut Sending, datagrams: &mut Job, stop: &Stop) {
        let (members, clock) = {
            let registry = &mut lock(&self.presence).registry;
            (registry.members(), registry.clock())
        };
        self.counters
            .broadcasts
            .fetch_add(datagrams.len() as u64, Relaxed);
        let now = clock.stamp(Instant::now());
        let helpers = match &sending.helpers {
            Some(helpers) if members.len() * datagrams.len() >= PARALLEL_FANOUT => helpers,
            _ => {
                self.send_to_part(&mut sending.batch, datagrams, &members, (clock, now), stop);
                datagrams.clear();
                return;
            }
        };
        let datagrams = Arc::new(std::mem::take(datagrams));
        let share = members.len().div_ceil(helpers.count + 1);
        let mut handed = 0;
        for start in (share..members.len()).step_by(share) {
            let part = Part {
                datagrams: Arc::clone(&datagrams),
                members: Arc::clone(&members),
                range: start..(start + share).min(members.len()),
                clock,
                now,
            };
            // Fails only if the helpers are gone: a thread panicked, and the server is stopping.
            handed += usize::from(helpers.parts.send(part).is_ok());
        }
        let first = &members[..share.min(members.len())];
        self.send_to_part(&mut sending.batch, &datagrams, first, (clock, now), stop);
        for _ in 0..handed {
            select! {
                recv(helpers.done) -> done => if done.is_err() { break },
                recv(stop.channel()) -> _ => break,
            }
        }
    }

    fn send_to_part(
        &self,
        batch: &mut Batch,
        datagrams: &[Vec<u8>],
        part: &[Arc<Member>],
        (clock, now): (Clock, u64),
        stop: &Stop,
    ) {
        let paused = std::cell::Cell::new(0);
        let paused = &paused;
        let pairs = datagrams.iter().flat_map(|d| {
            part.iter()
                .filter(move |m| {
                    let live = clock.is_live(m, now);
                    let skip = live && m.is_paused(now);
                    paused.set(paused.get() + u64::from(skip));
                    live && !skip
                })
                .map(move |m| (d.as_slice(), m.addr, m.local))
        });
        let until = net::Until {
            stop: Some(stop),
            deadline: None,
        };
        let errors = &mut batch.errors;
        let sent = net::send_each(&self.socket, &mut batch.outbox, pairs, until, |addr, e| {
            throttled!(errors, warn, target: LOG_TARGET, "cannot send to {addr}: {e}");
        });
        self.counters.deliveries.fetch_add(sent.delivered, Relaxed);
        self.counters.send_errors.fetch_add(sent.failed, Relaxed);
        if paused.get() > 0 {
            self.counters
                .paused_unreachable
                .fetch_add(paused.get(), Relaxed);
        }
    }

    /// Drops silent clients, each with a `timeout` leave, and logs them. The lock is released
    /// before logging: a log record may wait for the GIL, and a Python thread holding the GIL
    /// may be waiting for this lock.
    pub(super) fn expire(&self, now: Instant, expired: &mut Vec<SocketAddr>) {
        expired.clear();
        {
            let mut presence = lock(&self.presence);
            presence.registry.expire(now, expired);
            // Counted before the events are seen: whoever reads one reads the count.
            self.counters
                .expired
                .fetch_add(expired.len() as u64, Relaxed);
            for &addr in expired.iter() {
                presence.emit(Reason::Timeout, addr);
            }
        }
        for addr in expired.iter() {
            info!(target: LOG_TARGET, "{addr} expired after {:?} of silence", self.config.interval);
        }
    }
}

/// The fan-out thread: sends each broadcast to every live client and sweeps out silent ones.
pub(super) fn run(shared: &Shared, stop: &Stop, jobs: &Receiver<Job>) {
    let sweep = crossbeam_channel::tick(shared.config.sweep_period());
    let mut round = Job::new();
    let mut expired = Vec::new();
    let mut select = Select::new();
    let (on_jobs, on_sweep) = (select.recv(jobs), select.recv(&sweep));
    select.recv(stop.channel());
    loop {
        // Wait without taking: jobs are taken under the sending lock, which keeps their order
        // against the receiver's own sends.
        match select.ready() {
            i if i == on_jobs => {
                let mut sending = lock(&shared.sending);
                match jobs.try_recv() {
                    Ok(job) => round.extend(job),
                    Err(e) if e.is_disconnected() => return,
                    Err(_) => continue,
                }
                // Whatever else is already queued goes out in the same system calls.
                round.extend(jobs.try_iter().take(FANOUT_ROUND).flatten());
                shared.fan_out(&mut sending, &mut round, stop);
            }
            i if i == on_sweep => {
                let _ = sweep.try_recv();
                shared.expire(Instant::now(), &mut expired);
            }
            _ => return, // stop
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::ServerConfig;
    use super::*;
    use std::net::UdpSocket;
    use std::time::Duration;

    #[test]
    fn helpers_share_a_large_fan_out_and_every_client_gets_it_in_order() {
        let mut config = ServerConfig {
            fanout_threads: 3,
            ..ServerConfig::default_for("127.0.0.1:0".parse().unwrap())
        };
        config.limits.max_per_ip = 10_000;
        let shared = Arc::new(Shared::bind(config).unwrap().0);
        let workers =
            Workers::new("server", Arc::new(crate::wakeup::Wakeup::new().unwrap())).unwrap();
        start_helpers(&shared, &workers).unwrap();
        // Enough clients that one datagram is a parallel round on its own.
        let peers: Vec<UdpSocket> = (0..PARALLEL_FANOUT + 76)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        for peer in &peers {
            let addr = peer.local_addr().unwrap();
            let activity = crate::registry::Activity::Register;
            lock(&shared.presence)
                .registry
                .touch(addr, None, Instant::now(), activity);
        }
        let stop = Arc::clone(workers.stop());
        for round in 0..3u8 {
            let mut datagrams: Job = (0..2).map(|i| vec![round, i]).collect();
            shared.fan_out(&mut lock(&shared.sending), &mut datagrams, &stop);
            assert!(datagrams.is_empty());
        }
        let stat = |name: &str| {
            let stats = shared.counters.snapshot();
            stats.into_iter().find(|(n, _)| *n == name).unwrap().1
        };
        assert_eq!(stat("deliveries"), 6 * peers.len() as u64);
        assert_eq!(stat("send_errors"), 0);
        for peer in &peers {
            peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4];
            for _ in 0..6 {
                let n = peer.recv(&mut buf).unwrap();
                got.push(buf[..n].to_vec());
            }
            let expected: Vec<Vec<u8>> = (0..3u8)
                .flat_map(|r| (0..2).map(move |i| vec![r, i]))
                .collect();
            assert_eq!(got, expected);
        }
        // The helpers were started once and end with the server.
        assert!(workers.stop_and_join());
    }
}
