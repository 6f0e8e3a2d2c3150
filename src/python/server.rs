use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{IntoPyDict, PyDict};
use pyo3::IntoPyObjectExt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::UNIX_EPOCH;

use super::args::{Arg, MAX_QUEUE};
use super::asyncio::{take_events, EventQueue};
use super::presence::{Event, Peer};
use super::queue::Queue;
use super::{lifecycle_methods, py_addr, to_py};

/// The core's defaults, for the keyword arguments'.
const DEFAULTS: ServerConfig = ServerConfig::default_for(SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
    9998,
));
use crate::lifecycle::{Core, Slot};
use crate::registry::Limits;
use crate::server::{self, ClusterConfig, Server, ServerConfig, Stats, MAX_DATAGRAM};
use crate::worker::lock;

/// The most clients, in all and from one IP address, that `max_clients` and `max_per_ip` allow.
const MAX_CAP: usize = 100_000_000;
const MAX_FANOUT_THREADS: usize = 64;
/// `rate_limit`'s range, in datagrams a second: one every 100 s to a billion.
const MIN_RATE: f64 = 0.01;
const MAX_RATE: f64 = 1e9;
/// `rcvbuf`'s range, in bytes: 1 KiB to 1 GiB (the kernel caps it at `net.core.rmem_max`).
const MIN_RCVBUF: usize = 1024;
const MAX_RCVBUF: usize = 1 << 30;

/// A UDP chat server: registers every sender, relays each message to every live client as
/// ``ack: {ip} {port}\n{payload}\n``, and drops clients silent for more than ``interval`` seconds.
#[pyclass(frozen, subclass, module = "udpchat._udpchat")]
pub struct ChatServerUdp {
    config: ServerConfig,
    ip: String,
    port: u16,
    interval: f64,
    core: Slot<Server>,
    /// The counters of the last server stopped, whose socket is closed.
    final_stats: Mutex<Stats>,
    /// The events of the last server started: still readable once it has stopped.
    events: Mutex<Option<Queue<server::Event>>>,
}

/// Whether a thread of `core` panicked: nothing closes its events queue until `stop()`, so
/// readers stop at the end of what is queued.
pub(super) fn dead(core: &Option<Arc<Server>>) -> bool {
    core.as_ref().is_some_and(|c| c.workers().panicked())
}

/// The next event of `events`, waiting up to `timeout`; None on timeout, once the queue is
/// closed (the server stopped), or once a thread of `core` panicked, and every event before has
/// been read.
fn wait_for_event(
    py: Python<'_>,
    events: &Queue<server::Event>,
    timeout: Option<std::time::Duration>,
    core: Option<Arc<Server>>,
) -> PyResult<Option<server::Event>> {
    Ok(events.wait(py, timeout, || dead(&core))?.ok())
}

/// `cluster` and `cluster_channel` checked: a URL the Redis client can use, a channel that is
/// not empty, and no channel without a URL.
fn cluster_config(url: Arg<'_>, channel: Arg<'_>) -> PyResult<Option<ClusterConfig>> {
    let channel = channel.optional_str("cluster_channel")?;
    let Some(url) = url.optional_str("cluster")? else {
        return match channel {
            Some(_) => Err(PyValueError::new_err(
                "cluster_channel is the channel of a cluster: give cluster, a Redis URL, too",
            )),
            None => Ok(None),
        };
    };
    let channel = channel.as_deref().unwrap_or(server::DEFAULT_CHANNEL);
    ClusterConfig::new(&url, channel).map(Some).map_err(to_py)
}

#[pymethods]
impl ChatServerUdp {
    #[new]
    #[pyo3(
        signature = (
            ip = Arg::MISSING, port = Arg::MISSING, interval = Arg::MISSING, *,
            max_datagram = Arg::MISSING, max_clients = Arg::MISSING, max_per_ip = Arg::MISSING,
            rate_limit = Arg::MISSING, rcvbuf = Arg::MISSING, validate = Arg::MISSING,
            fanout_threads = Arg::MISSING, event_queue = Arg::MISSING,
            drop_unreachable = Arg::MISSING, cluster = Arg::MISSING, cluster_channel = Arg::MISSING
        ),
        text_signature = "(ip='127.0.0.1', port=9998, interval=10.0, *, max_datagram=65507, max_clients=100000, max_per_ip=1024, rate_limit=None, rcvbuf=None, validate=False, fanout_threads=1, event_queue=4096, drop_unreachable=True, cluster=None, cluster_channel='udpchat')"
    )]
    #[allow(clippy::too_many_arguments)] // Python's keyword arguments
    fn new(
        ip: Arg<'_>,
        port: Arg<'_>,
        interval: Arg<'_>,
        max_datagram: Arg<'_>,
        max_clients: Arg<'_>,
        max_per_ip: Arg<'_>,
        rate_limit: Arg<'_>,
        rcvbuf: Arg<'_>,
        validate: Arg<'_>,
        fanout_threads: Arg<'_>,
        event_queue: Arg<'_>,
        drop_unreachable: Arg<'_>,
        cluster: Arg<'_>,
        cluster_channel: Arg<'_>,
    ) -> PyResult<Self> {
        let (ip, addr) = ip.ip("ip", "127.0.0.1")?;
        let port = port.int("port", DEFAULTS.addr.port(), 0, u16::MAX)?;
        let (given_interval, interval) = interval.interval("interval", 10.0)?;
        let limits = Limits {
            max_clients: max_clients.int("max_clients", DEFAULTS.limits.max_clients, 1, MAX_CAP)?,
            max_per_ip: max_per_ip.int("max_per_ip", DEFAULTS.limits.max_per_ip, 1, MAX_CAP)?,
        };
        Ok(ChatServerUdp {
            config: ServerConfig {
                addr: SocketAddr::new(addr, port),
                interval,
                max_datagram: max_datagram.int("max_datagram", MAX_DATAGRAM, 1, 65_535)?,
                fanout_threads: fanout_threads.int("fanout_threads", 1, 1, MAX_FANOUT_THREADS)?,
                limits,
                rate_limit: rate_limit.optional_number("rate_limit", MIN_RATE, MAX_RATE)?,
                rcvbuf: rcvbuf.optional_int("rcvbuf", MIN_RCVBUF, MAX_RCVBUF)?,
                validate: validate.flag("validate", false)?,
                event_queue: event_queue.int("event_queue", DEFAULTS.event_queue, 1, MAX_QUEUE)?,
                drop_unreachable: drop_unreachable.flag("drop_unreachable", true)?,
                cluster: cluster_config(cluster, cluster_channel)?,
            },
            ip,
            port,
            interval: given_interval,
            core: Slot::default(),
            final_stats: Mutex::default(),
            events: Mutex::default(),
        })
    }

    /// Binds and starts serving. Raises OSError if the address cannot be bound, RuntimeError if
    /// the server is already running.
    fn start(&self, py: Python<'_>) -> PyResult<()> {
        let config = self.config.clone();
        super::start(py, &self.core, || Server::start(config))?;
        if let Some(core) = self.core.get().map_err(to_py)? {
            *lock(&self.events) = Some(Queue::new(core.events().clone(), core.wakeup()));
        }
        Ok(())
    }

    /// Sends ``end`` to every live client, ends all threads and closes the socket. Idempotent.
    /// Raises RuntimeError if a server thread had panicked.
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        super::stop(py, &self.core, |core| {
            *lock(&self.final_stats) = core.stats();
            if let Some(events) = lock(&self.events).as_mut() {
                events.forget_wakeup();
            }
        })
    }

    /// Sends ``msg`` to every live client, as a message from the server's own address.
    fn broadcast(&self, py: Python<'_>, msg: Arg<'_>) -> PyResult<()> {
        let msg = msg.payload("msg", b"")?;
        let data = msg.as_bytes();
        let core = self.core.running_core().map_err(to_py)?;
        py.detach(|| core.broadcast(data)).map_err(to_py)
    }

    /// Counters since start (see the stub for each), the kernel's count of datagrams it dropped
    /// for want of buffer space, and the clients registered now. They outlive ``stop()``.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let stats = match self.core.get().map_err(to_py)? {
            Some(core) => core.stats(),
            None => lock(&self.final_stats).clone(),
        };
        let dict = stats.into_py_dict(py)?;
        if let Some(connected) = dict.get_item("cluster_connected")? {
            dict.set_item("cluster_connected", connected.is_truthy()?)?;
        }
        Ok(dict)
    }

    /// ``{(ip, port): last_seen_unix_timestamp}`` of the live clients; empty when not running.
    #[getter]
    fn clients<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        if let Some(core) = self.core.get().map_err(to_py)?.filter(|c| c.running()) {
            for (addr, seen) in core.clients() {
                let stamp = seen
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64();
                dict.set_item(py_addr(addr), stamp)?;
            }
        }
        Ok(dict)
    }

    /// The next presence event, waiting up to ``timeout`` seconds (None: until one comes).
    /// Returns None on timeout, or once the server has stopped and every event queued before
    /// has been read.
    #[pyo3(signature = (timeout = Arg::MISSING), text_signature = "($self, /, timeout=None)")]
    fn next_event(&self, py: Python<'_>, timeout: Arg<'_>) -> PyResult<Option<Event>> {
        let timeout = timeout.timeout("timeout")?;
        let core = self.core.get().map_err(to_py)?;
        let Some(events) = lock(&self.events).clone() else {
            return Ok(None);
        };
        Ok(wait_for_event(py, &events, timeout, core)?.map(Event::from))
    }

    /// Up to ``max`` events: waits up to ``timeout`` seconds (None: until one comes) for the
    /// first, then takes those already queued. Returns an empty list where ``next_event``
    /// returns None.
    #[pyo3(
        signature = (max = Arg::MISSING, timeout = Arg::MISSING),
        text_signature = "($self, /, max=1024, timeout=None)"
    )]
    fn events(&self, py: Python<'_>, max: Arg<'_>, timeout: Arg<'_>) -> PyResult<Vec<Event>> {
        let max = max.int("max", 1024, 1, MAX_QUEUE)?;
        let timeout = timeout.timeout("timeout")?;
        let core = self.core.get().map_err(to_py)?;
        let Some(events) = lock(&self.events).clone() else {
            return Ok(Vec::new());
        };
        let Some(first) = wait_for_event(py, &events, timeout, core)? else {
            return Ok(Vec::new());
        };
        let rest = events.items.try_iter().take(max - 1);
        Ok(std::iter::once(first)
            .chain(rest)
            .map(Event::from)
            .collect())
    }

    /// For the asyncio methods: up to ``max`` events already queued, without waiting; else this
    /// run's queue to wait on, its eventfd armed; None where ``next_event`` returns None.
    #[pyo3(signature = (max))]
    fn _take_events<'py>(&self, py: Python<'py>, max: Arg<'py>) -> PyResult<Bound<'py, PyAny>> {
        let max = max.int("max", 1024, 1, MAX_QUEUE)?;
        let core = self.core.get().map_err(to_py)?;
        let Some(queue) = lock(&self.events).clone() else {
            return Ok(py.None().into_bound(py));
        };
        take_events(py, &queue, &core, max, |wakeup| {
            let (queue, core) = (queue.clone(), core.clone());
            EventQueue {
                queue,
                core,
                wakeup,
            }
            .into_bound_py_any(py)
        })
    }

    /// ``{(ip, port): Peer}`` for every live client, in one consistent snapshot; empty when not
    /// running.
    fn peers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        if let Some(core) = self.core.get().map_err(to_py)?.filter(|c| c.running()) {
            for (peer, joined, seen) in core.peers() {
                let value = Peer::new(&peer, joined, seen, self.config.validate);
                dict.set_item(py_addr(peer.addr), value)?;
            }
        }
        Ok(dict)
    }

    /// Removes the client at ``addr`` (an ``(ip, port)`` as ``clients`` shows it) now and sends
    /// it ``end``: a ``'leave'`` event with reason ``'kicked'``. Returns False if it was not
    /// registered. It may register again by sending again. RuntimeError if not running.
    fn kick(&self, py: Python<'_>, addr: Arg<'_>) -> PyResult<bool> {
        let addr = addr.addr("addr")?;
        let core = self.core.running_core().map_err(to_py)?;
        let kicked = py.detach(|| core.kick(addr)).map_err(to_py);
        super::logging::flush(py);
        kicked
    }

    #[getter]
    fn max_datagram(&self) -> usize {
        self.config.max_datagram
    }

    /// True in validated mode.
    #[getter]
    fn validate(&self) -> bool {
        self.config.validate
    }
}

lifecycle_methods!(ChatServerUdp);
