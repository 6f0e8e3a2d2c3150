//! The cluster option: one chat across several servers through a Redis pub/sub channel. Each
//! server publishes every message it relays for its own clients (and every `broadcast()`) once,
//! and fans out what the other servers publish to its own clients, as the Socket.IO Redis
//! adapter does.
//!
//! Two threads of their own talk to Redis, so that the receive and fan-out paths never wait for
//! it: a publisher, fed by the receiver through a bounded queue it never blocks on, that sends
//! what is queued in pipelined batches; and a subscriber that hands each envelope of another
//! server to the fan-out. While a connection is down, both retry with backoff and the server
//! goes on serving its own clients; publications are dropped and counted, never kept to be sent
//! late (at most once, as Redis pub/sub itself).

use crossbeam_channel::{after, select, Receiver, Sender, TrySendError};
use log::{debug, info, warn};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::fanout::Job;
use super::stats::Stats;
use crate::envelope;
use crate::error::{Error, Result};
use crate::protocol;
use crate::throttle::{throttled, Throttle};
use crate::worker::{lock, Stop};

/// Python's logger for the cluster's records: `udpchat.cluster`.
const LOG_TARGET: &str = "udpchat::cluster";

/// The channel servers share unless told otherwise.
pub const DEFAULT_CHANNEL: &str = "udpchat";

/// Batches of envelopes (one per received batch) waiting for the publisher, at most, and
/// their bytes at most. When Redis is slower than the chat, what does not fit is dropped and
/// counted: the publisher is never more than a few milliseconds of a fast link behind.
const PUBLISH_QUEUE: usize = 256;
const PUBLISH_QUEUE_BYTES: usize = 4 << 20;
/// A pipeline takes queued batches until it holds this many envelopes or bytes.
const PIPELINE: usize = 256;
const PIPELINE_BYTES: usize = 1 << 20;
/// The first wait before connecting again, doubled after each failure up to `MAX_BACKOFF`,
/// and back to the first only after a connection that stayed up for `STABLE`: one that fails
/// as soon as it is made (a subscriber Redis keeps dropping, a user refused PUBLISH) is not
/// made again ten times a second.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
const STABLE: Duration = Duration::from_secs(10);
/// How long a connection attempt, or a command on a connection, may take before the connection
/// counts as down.
const IO_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the subscriber, waiting for a message, looks at the stop signal: the most a stop
/// waits for it.
const POLL: Duration = Duration::from_millis(20);
/// How long a connection may be quiet before its thread pings Redis: a Redis that froze, a
/// network that broke without a word, or an idle connection Redis or a NAT closed, is found out
/// then rather than by the next message.
const KEEPALIVE: Duration = Duration::from_secs(1);

/// Where the cluster meets: a Redis server and a channel.
#[derive(Clone)]
pub struct ClusterConfig {
    client: redis::Client,
    /// The URL without its password, for logs.
    shown: String,
    channel: String,
}

impl ClusterConfig {
    /// `Err(Error::Invalid)` for a URL the Redis client cannot use or an empty channel.
    pub fn new(url: &str, channel: &str) -> Result<ClusterConfig> {
        if channel.is_empty() {
            return Err(Error::Invalid("cluster_channel must not be empty".into()));
        }
        let shown = without_password(url);
        let invalid = |e: redis::RedisError| {
            Error::Invalid(format!(
                "cluster {shown:?} is not a Redis URL this build can use: {e}"
            ))
        };
        let info = redis::IntoConnectionInfo::into_connection_info(url).map_err(invalid)?;
        // Pub/sub ignores the database, so none is selected (`/99` works as `/0`), and the
        // subscriber reads RESP2's messages, whatever `?protocol=` says.
        let settings = info.redis_settings().clone().set_db(0);
        let settings = settings.set_protocol(redis::ProtocolVersion::RESP2);
        let client = redis::Client::open(info.set_redis_settings(settings)).map_err(invalid)?;
        if let redis::ConnectionAddr::TcpTls { insecure, .. } = client.get_connection_info().addr()
        {
            // `rediss://...#insecure` asks for no certificate checks, which this build does not
            // have (no `tls-rustls-insecure`): refused here rather than at every connection.
            if *insecure {
                return Err(Error::Invalid(format!(
                    "cluster {shown:?}: TLS without certificate checks (#insecure) is not \
                     supported; trust the server's CA with SSL_CERT_FILE instead"
                )));
            }
            install_crypto_provider();
        }
        Ok(ClusterConfig {
            client,
            shown,
            channel: channel.to_owned(),
        })
    }
}

impl fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} channel {:?}", self.shown, self.channel)
    }
}

/// Makes ring rustls's crypto for this process (this module's copy of rustls), so that the
/// Redis client's TLS connections never depend on which of rustls's providers were compiled in.
fn install_crypto_provider() {
    // Err: a provider is already installed, ring by an earlier call.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// `url` with its passwords replaced by `***`: the user information's, and the query's `pass`
/// or `password` (as `unix:` URLs give it).
fn without_password(url: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((head, query)) => (head, Some(query)),
        None => (url, None),
    };
    let start = head.find("://").map_or(0, |i| i + 3);
    let end = head[start..].find('/').map_or(head.len(), |i| start + i);
    let mut shown = match head[start..end].rfind('@') {
        Some(at) => {
            // With no colon, what there is may be a password too.
            let user = head[start..start + at]
                .split_once(':')
                .map(|(user, _)| user);
            let hidden = user.map_or("***".to_owned(), |user| format!("{user}:***"));
            format!("{}{hidden}{}", &head[..start], &head[start + at..])
        }
        None => head.to_owned(),
    };
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((key, _)) if ["pass", "password"].contains(&key) => format!("{key}=***"),
                _ => param.to_owned(),
            })
            .collect();
        shown = format!("{shown}?{}", params.join("&"));
    }
    shown
}

/// Envelopes from one received batch, published together.
pub(super) type Batch = Vec<Vec<u8>>;

#[derive(Default)]
struct Counters {
    published: AtomicU64,
    received: AtomicU64,
    dropped: AtomicU64,
    malformed: AtomicU64,
    errors: AtomicU64,
}

/// The two connections to Redis.
#[derive(Debug, Clone, Copy)]
enum Side {
    Publishing,
    Subscribed,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Publishing => "publishing",
            Side::Subscribed => "subscribed",
        })
    }
}

/// What the server's threads share of the cluster.
pub(super) struct Cluster {
    config: ClusterConfig,
    /// This run's id, in every envelope it publishes: the subscriber skips its own.
    id: u64,
    queue: Sender<Batch>,
    /// Whether each connection is up now: publications are queued only while the publishing
    /// one is, so none waits through an outage to be sent late.
    publishing: AtomicBool,
    subscribed: AtomicBool,
    /// Set at the server's stop.
    stopped: AtomicBool,
    /// The bytes of the envelopes queued for the publisher.
    queued_bytes: AtomicUsize,
    /// How many times the subscribed connection failed: the publisher, which finds a dead
    /// connection only by writing to it, reconnects when this changes.
    losses: AtomicU64,
    /// `cluster_connected` as last logged (None until the first connection or failure): each
    /// change is logged once.
    logged: Mutex<Option<bool>>,
    counters: Counters,
}

impl Cluster {
    /// The cluster's state for a new server run, and the publisher's end of its queue.
    pub(super) fn new(config: ClusterConfig) -> Result<(Cluster, Receiver<Batch>)> {
        let mut id = [0u8; 8];
        getrandom::fill(&mut id)
            .map_err(|e| Error::io("cannot make a cluster id", std::io::Error::other(e)))?;
        let (queue, publications) = crossbeam_channel::bounded(PUBLISH_QUEUE);
        let cluster = Cluster {
            config,
            id: u64::from_ne_bytes(id),
            queue,
            publishing: AtomicBool::new(false),
            subscribed: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            losses: AtomicU64::new(0),
            queued_bytes: AtomicUsize::new(0),
            logged: Mutex::new(None),
            counters: Counters::default(),
        };
        Ok((cluster, publications))
    }

    /// The envelope of a message from `origin`.
    pub(super) fn envelope(&self, origin: SocketAddr, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        envelope::write(&mut out, self.id, origin, payload);
        out
    }

    /// Hands `batch` to the publisher without waiting: dropped and counted if the publishing
    /// connection is down or the queue is full.
    pub(super) fn publish(&self, batch: Batch) {
        let n = batch.len() as u64;
        if !self.publishing.load(Acquire) {
            self.counters.dropped.fetch_add(n, Relaxed);
            return;
        }
        let bytes = bytes(&batch);
        if self.queued_bytes.fetch_add(bytes, Relaxed) + bytes > PUBLISH_QUEUE_BYTES {
            self.queued_bytes.fetch_sub(bytes, Relaxed);
            self.counters.dropped.fetch_add(n, Relaxed);
            return;
        }
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.queue.try_send(batch)
        {
            self.queued_bytes.fetch_sub(bytes, Relaxed);
            self.counters.dropped.fetch_add(n, Relaxed);
        }
    }

    /// `batch`, taken from the queue by the publisher.
    fn taken(&self, batch: Batch) -> Batch {
        self.queued_bytes.fetch_sub(bytes(&batch), Relaxed);
        batch
    }

    /// Drops (and counts) `batch`, taken from the queue.
    fn discard(&self, batch: Batch) {
        let batch = self.taken(batch);
        self.counters.dropped.fetch_add(batch.len() as u64, Relaxed);
    }

    /// At stop: `cluster_connected` is false from then on, whatever a thread still ending does.
    pub(super) fn disconnected(&self) {
        *lock(&self.logged) = Some(false);
        self.stopped.store(true, Release);
    }

    fn connected(&self) -> bool {
        let up = self.publishing.load(Acquire) && self.subscribed.load(Acquire);
        up && !self.stopped.load(Acquire)
    }

    /// Appends the cluster's counters and state to `stats`.
    pub(super) fn stats(&self, stats: &mut Stats) {
        let c = &self.counters;
        stats.extend([
            ("cluster_published", c.published.load(Relaxed)),
            ("cluster_received", c.received.load(Relaxed)),
            ("cluster_dropped", c.dropped.load(Relaxed)),
            ("cluster_malformed", c.malformed.load(Relaxed)),
            ("cluster_errors", c.errors.load(Relaxed)),
            ("cluster_connected", u64::from(self.connected())),
        ]);
    }

    fn flag(&self, side: Side) -> &AtomicBool {
        match side {
            Side::Publishing => &self.publishing,
            Side::Subscribed => &self.subscribed,
        }
    }

    fn connect(&self) -> redis::RedisResult<redis::Connection> {
        let con = self.config.client.get_connection_with_timeout(IO_TIMEOUT)?;
        con.set_write_timeout(Some(IO_TIMEOUT))?;
        con.set_read_timeout(Some(IO_TIMEOUT))?;
        Ok(con)
    }

    fn up(&self, side: Side) {
        self.flag(side).store(true, Release);
        self.log_change(None);
    }

    /// `side`'s connection failed, or could not be made: counted, and logged if the cluster
    /// was connected (or at the first failure since the server started).
    fn down(&self, side: Side, error: &redis::RedisError) {
        self.flag(side).store(false, Release);
        if let Side::Subscribed = side {
            self.losses.fetch_add(1, Release);
        }
        self.counters.errors.fetch_add(1, Relaxed);
        self.log_change(Some((side, error)));
    }

    fn log_change(&self, failure: Option<(Side, &redis::RedisError)>) {
        let (shown, channel) = (&self.config.shown, &self.config.channel);
        let mut logged = lock(&self.logged);
        let connected = self.connected();
        if failure.is_none() && !connected {
            return; // one connection up, the other not yet: nothing has changed
        }
        if *logged == Some(connected) {
            if let Some((side, e)) = failure {
                debug!(target: LOG_TARGET, "{side} connection to {shown}: {e}");
            }
            return;
        }
        let first = logged.replace(connected).is_none();
        drop(logged);
        // A failure leaves the cluster disconnected: its side's flag is down.
        match failure {
            None => info!(
                target: LOG_TARGET,
                "connected to {shown}, channel {channel:?}, as server {:016x}", self.id
            ),
            Some((side, e)) if first => warn!(
                target: LOG_TARGET,
                "cannot reach Redis at {shown} ({side} connection: {e}); serving this server's \
                 clients only, and retrying"
            ),
            Some((side, e)) => warn!(
                target: LOG_TARGET,
                "lost Redis at {shown} ({side} connection: {e}); serving this server's clients \
                 only, and reconnecting"
            ),
        }
    }

    /// Drops (and counts) every batch queued for the publisher.
    fn drop_queued(&self, queue: &Receiver<Batch>) {
        queue.try_iter().for_each(|batch| self.discard(batch));
    }
}

fn bytes(batch: &Batch) -> usize {
    batch.iter().map(Vec::len).sum()
}

/// The waits between connection attempts: 0.1 s, doubling after each failure, up to 2 s; back
/// to 0.1 s once a connection has stayed up for `STABLE`.
struct Backoff {
    wait: Duration,
    up_since: Option<Instant>,
}

impl Backoff {
    fn new() -> Self {
        Backoff {
            wait: MIN_BACKOFF,
            up_since: None,
        }
    }

    /// A connection is up, from `now`.
    fn up(&mut self, now: Instant) {
        self.up_since = Some(now);
    }

    /// The wait before the next attempt, after a failure at `now`.
    fn next(&mut self, now: Instant) -> Duration {
        if let Some(since) = self.up_since.take() {
            if now.saturating_duration_since(since) >= STABLE {
                self.wait = MIN_BACKOFF;
            }
        }
        let wait = self.wait;
        self.wait = (wait * 2).min(MAX_BACKOFF);
        wait
    }
}

/// The publisher thread: connects, then sends each queued batch, with whatever else is queued
/// by then, as one pipeline of PUBLISH commands. When the connection fails, the batch it was
/// sending and every batch queued are dropped and counted; so is every batch queued while it
/// waits to connect again.
pub(super) fn publish(cluster: &Cluster, stop: &Stop, queue: &Receiver<Batch>) {
    let channel = cluster.config.channel.as_bytes();
    let mut backoff = Backoff::new();
    let mut pipeline = Vec::new();
    loop {
        // A command answered, not only a connection made: a Redis that wants a password the
        // URL does not give accepts the connection and refuses every command.
        let ready = cluster.connect().and_then(|mut con| {
            redis::cmd("PING").query::<()>(&mut con)?;
            Ok(con)
        });
        let failed = match ready {
            Ok(mut con) => {
                // Nothing queued before this connection is sent late.
                cluster.drop_queued(queue);
                cluster.up(Side::Publishing);
                backoff.up(Instant::now());
                let e = send_batches(cluster, stop, queue, &mut con, &mut pipeline, channel);
                cluster.publishing.store(false, Release);
                e
            }
            Err(e) => e,
        };
        if stop.fired() {
            return;
        }
        cluster.down(Side::Publishing, &failed);
        cluster.drop_queued(queue);
        let retry = after(backoff.next(Instant::now()));
        loop {
            select! {
                recv(queue) -> batch => match batch {
                    Ok(batch) => cluster.discard(batch),
                    Err(_) => return,
                },
                recv(retry) -> _ => break,
                recv(stop.channel()) -> _ => return,
            }
        }
    }
}

/// Publishes batches from `queue` until the connection fails or the server stops; returns why.
fn send_batches(
    cluster: &Cluster,
    stop: &Stop,
    queue: &Receiver<Batch>,
    con: &mut redis::Connection,
    pipeline: &mut Vec<u8>,
    channel: &[u8],
) -> redis::RedisError {
    let mut losses = cluster.losses.load(Acquire);
    loop {
        let first = select! {
            recv(queue) -> batch => batch.map(|batch| cluster.taken(batch)),
            recv(stop.channel()) -> _ => Err(crossbeam_channel::RecvError),
            default(KEEPALIVE) => match redis::cmd("PING").query::<()>(con) {
                Ok(()) => continue,
                Err(e) => return e,
            },
        };
        let Ok(first) = first else {
            return redis::RedisError::from(std::io::Error::other("stopped"));
        };
        // The subscribed connection failed since this one was made: Redis may have restarted,
        // and this connection died with it unseen. A new one carries the batch, rather than the
        // batch finding out.
        if cluster.losses.load(Acquire) != losses {
            losses = cluster.losses.load(Acquire);
            match cluster.connect() {
                Ok(new) => *con = new,
                Err(e) => {
                    cluster
                        .counters
                        .dropped
                        .fetch_add(first.len() as u64, Relaxed);
                    return e;
                }
            }
        }
        // The buffer keeps what one pipeline needs, not what the largest ever took.
        pipeline.clear();
        pipeline.shrink_to(PIPELINE_BYTES);
        let mut n = 0;
        let mut batch = first;
        loop {
            for envelope in &batch {
                write_publish(pipeline, channel, envelope);
            }
            n += batch.len();
            if n >= PIPELINE || pipeline.len() >= PIPELINE_BYTES {
                break;
            }
            match queue.try_recv() {
                Ok(more) => batch = cluster.taken(more),
                Err(_) => break,
            }
        }
        match exec(con, pipeline, n) {
            Ok(()) => cluster.counters.published.fetch_add(n as u64, Relaxed),
            Err(e) => {
                cluster.counters.dropped.fetch_add(n as u64, Relaxed);
                return e;
            }
        };
    }
}

/// Appends `PUBLISH channel message` to `out`, as the Redis protocol (RESP) writes a command.
fn write_publish(out: &mut Vec<u8>, channel: &[u8], message: &[u8]) {
    use std::io::Write;
    // Writing into a Vec cannot fail.
    let _ = write!(out, "*3\r\n$7\r\nPUBLISH\r\n${}\r\n", channel.len());
    out.extend_from_slice(channel);
    let _ = write!(out, "\r\n${}\r\n", message.len());
    out.extend_from_slice(message);
    out.extend_from_slice(b"\r\n");
}

/// Sends `count` commands packed in `pipeline` and reads their replies, failing at the first
/// error or once `IO_TIMEOUT` has passed (the crate's own pipelines wait a timeout for each
/// reply, and go on after an error, so a Redis that stops answering would hold the publisher
/// for a second per command).
fn exec(con: &mut redis::Connection, pipeline: &[u8], count: usize) -> redis::RedisResult<()> {
    let deadline = Instant::now() + IO_TIMEOUT;
    con.send_packed_command(pipeline)?;
    for _ in 0..count {
        con.recv_response()?.extract_error()?;
        if Instant::now() > deadline {
            return Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into());
        }
    }
    Ok(())
}

/// The subscriber thread: connects and subscribes, then hands each envelope from another
/// server to the fan-out as its `ack:` datagram. Looks at the stop signal every `POLL`.
pub(super) fn subscribe(cluster: &Cluster, stop: &Stop, fanout: &Sender<Job>) {
    let mut backoff = Backoff::new();
    let mut malformed = Throttle::default();
    while !stop.fired() {
        let failed = match cluster.connect() {
            Ok(mut con) => {
                let e = receive(
                    cluster,
                    stop,
                    fanout,
                    &mut con,
                    &mut backoff,
                    &mut malformed,
                );
                cluster.subscribed.store(false, Release);
                e
            }
            Err(e) => e,
        };
        if stop.fired() {
            return;
        }
        cluster.down(Side::Subscribed, &failed);
        select! {
            recv(after(backoff.next(Instant::now()))) -> _ => {},
            recv(stop.channel()) -> _ => return,
        }
    }
}

/// Subscribes on `con` and fans out what comes, until the connection fails or the server stops.
fn receive(
    cluster: &Cluster,
    stop: &Stop,
    fanout: &Sender<Job>,
    con: &mut redis::Connection,
    backoff: &mut Backoff,
    malformed: &mut Throttle,
) -> redis::RedisError {
    // Subscribed by hand: the crate's `PubSub::subscribe` takes an error reply (NOAUTH, NOPERM)
    // for a subscription.
    let subscribe = redis::cmd("SUBSCRIBE")
        .arg(&cluster.config.channel)
        .query::<redis::Value>(con);
    if let Err(e) = subscribe {
        return e;
    }
    let mut pubsub = con.as_pubsub();
    let e = listen(cluster, stop, fanout, &mut pubsub, backoff, malformed);
    // The connection is not used again: dropping `pubsub` unsubscribes, and need not wait for
    // the answer of a Redis that may be gone.
    let _ = pubsub.set_read_timeout(Some(Duration::from_millis(1)));
    e
}

/// Fans out what comes on the subscribed connection until it fails or the server stops.
fn listen(
    cluster: &Cluster,
    stop: &Stop,
    fanout: &Sender<Job>,
    pubsub: &mut redis::PubSub<'_>,
    backoff: &mut Backoff,
    malformed: &mut Throttle,
) -> redis::RedisError {
    if let Err(e) = pubsub.set_read_timeout(Some(POLL)) {
        return e;
    }
    cluster.up(Side::Subscribed);
    backoff.up(Instant::now());
    let mut heard = Instant::now();
    while !stop.fired() {
        let message = match pubsub.get_message() {
            Ok(message) => message,
            Err(e) if e.is_timeout() => {
                if heard.elapsed() >= KEEPALIVE {
                    if let Err(e) = ping(pubsub) {
                        return e;
                    }
                    heard = Instant::now();
                }
                continue;
            }
            Err(e) => return e,
        };
        heard = Instant::now();
        let data = message.get_payload_bytes();
        let envelope = match envelope::read(data) {
            Ok(envelope) => envelope,
            Err(why) => {
                cluster.counters.malformed.fetch_add(1, Relaxed);
                throttled!(
                    malformed,
                    warn,
                    target: LOG_TARGET,
                    "dropped a message on channel {:?} that is not a udpchat envelope ({why:?}, \
                     {} bytes)",
                    cluster.config.channel,
                    data.len()
                );
                continue;
            }
        };
        if envelope.server == cluster.id {
            continue; // this server's own: its clients have had it
        }
        let mut datagram = Vec::new();
        protocol::write_ack(&mut datagram, envelope.origin, envelope.payload);
        select! {
            send(fanout, vec![datagram]) -> sent => if sent.is_err() { break },
            recv(stop.channel()) -> _ => break,
        }
        cluster.counters.received.fetch_add(1, Relaxed);
    }
    redis::RedisError::from(std::io::Error::other("stopped"))
}

/// Asks a quiet Redis whether it is still there, waiting up to `IO_TIMEOUT` for the answer: a
/// Redis that froze, or a network that broke without a word, would otherwise leave the
/// subscriber waiting for messages that never come, and `cluster_connected` true.
fn ping(pubsub: &mut redis::PubSub<'_>) -> redis::RedisResult<()> {
    pubsub.set_read_timeout(Some(IO_TIMEOUT))?;
    // Messages that come first are kept for `get_message`.
    pubsub.ping::<redis::Value>()?;
    pubsub.set_read_timeout(Some(POLL))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_never_show_a_password() {
        let cases = [
            ("redis://:secret@host:6379/0", "redis://:***@host:6379/0"),
            ("redis://user:secret@host", "redis://user:***@host"),
            ("rediss://user@host", "rediss://***@host"),
            ("redis://host:6379", "redis://host:6379"),
            ("redis://a:b@c@host/0", "redis://a:***@host/0"),
            (
                "unix:///run/redis.sock?pass=secret",
                "unix:///run/redis.sock?pass=***",
            ),
            (
                "redis+unix:///s?db=1&password=p@ss&x=1",
                "redis+unix:///s?db=1&password=***&x=1",
            ),
            (
                "redis://:pw@host/0?password=pw",
                "redis://:***@host/0?password=***",
            ),
        ];
        for (url, shown) in cases {
            assert_eq!(without_password(url), shown, "{url}");
        }
    }

    #[test]
    fn urls_the_client_cannot_use_are_refused() {
        for url in ["http://host", "redis://:notaport", "", "redis://host:99999"] {
            assert!(
                matches!(ClusterConfig::new(url, "c"), Err(Error::Invalid(_))),
                "{url}"
            );
        }
        assert!(ClusterConfig::new("redis://127.0.0.1:6379/1", "c").is_ok());
        // TLS, with the certificate checked: only `#insecure` (no checks) is refused, and any
        // other fragment, as the client does.
        for url in [
            "rediss://127.0.0.1:6380",
            "rediss://:pw@redis.example:6380/2",
        ] {
            assert!(ClusterConfig::new(url, "c").is_ok(), "{url}");
        }
        for url in ["rediss://127.0.0.1:6380#insecure", "rediss://host#other"] {
            assert!(
                matches!(ClusterConfig::new(url, "c"), Err(Error::Invalid(_))),
                "{url}"
            );
        }
        assert!(matches!(
            ClusterConfig::new("redis://127.0.0.1", ""),
            Err(Error::Invalid(_))
        ));
    }

    #[test]
    fn a_publish_is_packed_as_the_redis_client_packs_it() {
        let mut out = Vec::new();
        write_publish(&mut out, b"udpchat", b"\x01 \r\n");
        write_publish(&mut out, b"", b"");
        let mut expected = redis::cmd("PUBLISH")
            .arg(&b"udpchat"[..])
            .arg(&b"\x01 \r\n"[..])
            .get_packed_command();
        expected.extend(redis::cmd("PUBLISH").arg("").arg("").get_packed_command());
        assert_eq!(out, expected);
    }

    #[test]
    fn tls_configurations_can_be_built() {
        // What the Redis client does at each TLS connection: a config from the process's
        // provider (a panic if none could be chosen) with the system's roots.
        ClusterConfig::new("rediss://127.0.0.1:6380", "c").unwrap();
        let provider = rustls::crypto::CryptoProvider::get_default().expect("a provider");
        assert!(!provider.cipher_suites.is_empty());
        let roots = rustls::RootCertStore::empty();
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        assert!(config.enable_sni);
        // TLS 1.2 as well as 1.3, for the Redis servers that offer only 1.2.
        assert!(rustls::DEFAULT_VERSIONS.contains(&&rustls::version::TLS12));
    }

    #[test]
    fn backoff_doubles_to_two_seconds_until_a_connection_stays_up() {
        let t0 = Instant::now();
        let ms = |b: &mut Backoff, at: Duration| b.next(t0 + at).as_millis() as u64;
        let mut b = Backoff::new();
        let waits: Vec<u64> = (0..7).map(|_| ms(&mut b, Duration::ZERO)).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 2000, 2000]);
        // Up, and lost at once: still 2 s.
        b.up(t0);
        assert_eq!(ms(&mut b, Duration::from_secs(1)), 2000);
        // Up for STABLE: from 0.1 s again.
        b.up(t0);
        assert_eq!(ms(&mut b, STABLE), 100);
        assert_eq!(ms(&mut b, STABLE), 200);
    }
}
