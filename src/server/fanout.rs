//! The fan-out: every broadcast to every live client through `sendmmsg`, each from the local
//! address the client sends to, and the thread that sends queued broadcasts and sweeps out
//! silent clients.
//!
//! Every fan-out runs under one lock, `Shared::sending`, held across the `sendmmsg` calls by
//! whichever thread sends (this thread, or the receiver for a small fan-out with nothing queued
//! ahead of it): that lock is what keeps broadcasts in the order their messages arrived.

use crossbeam_channel::{Receiver, Select};
use log::info;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use super::{Shared, LOG_TARGET};
use crate::net;
use crate::registry::{Clock, Member};
use crate::throttle::{throttled, Throttle};
use crate::worker::{lock, Stop};

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

/// What a fan-out needs besides the socket: reused `sendmmsg` buffers, the error log's throttle.
#[derive(Default)]
pub(super) struct Sending {
    outbox: net::Outbox,
    errors: Throttle,
}

impl Shared {
    /// Sends every datagram of `jobs` to every live client. Expiry applies here, per member,
    /// even between sweeps. Call it holding `sending`. A large round is split between
    /// `fanout_threads` threads by client, so each client still gets its datagrams in order.
    pub(super) fn fan_out<'a>(
        &self,
        sending: &mut Sending,
        jobs: impl Iterator<Item = &'a Vec<u8>>,
        stop: &Stop,
    ) {
        let (members, clock) = {
            let mut registry = lock(&self.registry);
            (registry.members(), registry.clock())
        };
        let datagrams: Vec<&[u8]> = jobs.map(Vec::as_slice).collect();
        self.counters
            .broadcasts
            .fetch_add(datagrams.len() as u64, Relaxed);
        let now = clock.stamp(Instant::now());
        let threads = self.config.fanout_threads;
        if threads < 2 || members.len() * datagrams.len() < PARALLEL_FANOUT {
            return self.send_to_part(sending, &datagrams, &members, (clock, now), stop);
        }
        let mut parts = members.chunks(members.len().div_ceil(threads));
        let first = parts.next().unwrap_or_default();
        std::thread::scope(|scope| {
            for part in parts {
                let datagrams = &datagrams;
                scope.spawn(move || {
                    self.send_to_part(&mut Sending::default(), datagrams, part, (clock, now), stop)
                });
            }
            self.send_to_part(sending, &datagrams, first, (clock, now), stop);
        });
    }

    fn send_to_part(
        &self,
        sending: &mut Sending,
        datagrams: &[&[u8]],
        part: &[Arc<Member>],
        (clock, now): (Clock, u64),
        stop: &Stop,
    ) {
        let pairs = datagrams.iter().flat_map(|d| {
            part.iter()
                .filter(move |m| clock.is_live(m, now))
                .map(move |m| (*d, m.addr, m.local))
        });
        let until = net::Until {
            stop: Some(stop),
            deadline: None,
        };
        let errors = &mut sending.errors;
        let sent = net::send_each(
            &self.socket,
            &mut sending.outbox,
            pairs,
            until,
            |addr, e| {
                throttled!(errors, warn, target: LOG_TARGET, "cannot send to {addr}: {e}");
            },
        );
        self.counters.deliveries.fetch_add(sent.delivered, Relaxed);
        self.counters.send_errors.fetch_add(sent.failed, Relaxed);
    }

    /// Drops silent clients and logs them. The lock is released before logging: a log record
    /// may wait for the GIL, and a Python thread holding the GIL may be waiting for this lock.
    fn expire(&self, now: Instant, expired: &mut Vec<SocketAddr>) {
        expired.clear();
        lock(&self.registry).expire(now, expired);
        self.counters
            .expired
            .fetch_add(expired.len() as u64, Relaxed);
        for addr in expired.iter() {
            info!(target: LOG_TARGET, "{addr} expired after {:?} of silence", self.config.interval);
        }
    }
}

/// The fan-out thread: sends each broadcast to every live client and sweeps out silent ones.
pub(super) fn run(shared: &Shared, stop: &Stop, jobs: &Receiver<Job>) {
    let sweep = crossbeam_channel::tick(shared.config.sweep_period());
    let mut round: Vec<Job> = Vec::new();
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
                    Ok(job) => round.push(job),
                    Err(e) if e.is_disconnected() => return,
                    Err(_) => continue,
                }
                // Whatever else is already queued goes out in the same system calls.
                round.extend(jobs.try_iter().take(FANOUT_ROUND));
                shared.fan_out(&mut sending, round.iter().flatten(), stop);
                round.clear();
            }
            i if i == on_sweep => {
                let _ = sweep.try_recv();
                shared.expire(Instant::now(), &mut expired);
            }
            _ => return, // stop
        }
    }
}
