use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{IntoPyDict, PyDict};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::UNIX_EPOCH;

use super::{in_range, lifecycle_methods, parse_ip, parse_seconds, py_addr, to_py, Payload, Port};

/// The core's defaults, for the keyword arguments'.
const DEFAULTS: ServerConfig = ServerConfig::default_for(SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
    9998,
));
use crate::lifecycle::{Core, Slot};
use crate::registry::Limits;
use crate::server::{Server, ServerConfig, Stats, MAX_DATAGRAM};
use crate::worker::lock;

/// A UDP chat server: registers every sender, relays each message to every live client as
/// ``ack: {ip} {port}\n{payload}\n``, and drops clients silent for more than ``interval`` seconds.
#[pyclass(frozen, module = "udpchat._udpchat")]
pub struct ChatServerUdp {
    config: ServerConfig,
    ip: String,
    port: u16,
    interval: f64,
    core: Slot<Server>,
    /// The counters of the last server stopped, whose socket is closed.
    final_stats: Mutex<Stats>,
}

#[pymethods]
impl ChatServerUdp {
    #[new]
    #[pyo3(
        signature = (
            ip = "127.0.0.1", port = Port(9998), interval = 10.0, *, max_datagram = MAX_DATAGRAM,
            max_clients = DEFAULTS.limits.max_clients, max_per_ip = DEFAULTS.limits.max_per_ip,
            rate_limit = None, rcvbuf = None, validate = false, fanout_threads = 1
        ),
        text_signature = "(ip='127.0.0.1', port=9998, interval=10.0, *, max_datagram=65507, max_clients=100000, max_per_ip=1024, rate_limit=None, rcvbuf=None, validate=False, fanout_threads=1)"
    )]
    #[allow(clippy::too_many_arguments)] // Python's keyword arguments
    fn new(
        ip: &str,
        port: Port,
        interval: f64,
        max_datagram: usize,
        max_clients: usize,
        max_per_ip: usize,
        rate_limit: Option<f64>,
        rcvbuf: Option<usize>,
        validate: bool,
        fanout_threads: usize,
    ) -> PyResult<Self> {
        if let Some(rate) = rate_limit {
            if !(rate.is_finite() && rate > 0.0) {
                return Err(PyValueError::new_err(format!(
                    "rate_limit must be a positive number of datagrams per second, got {rate}"
                )));
            }
        }
        Ok(ChatServerUdp {
            config: ServerConfig {
                addr: SocketAddr::new(parse_ip(ip)?, port.0),
                interval: parse_seconds("interval", interval)?,
                max_datagram: in_range("max_datagram", max_datagram, 1, 65_535)?,
                fanout_threads: in_range("fanout_threads", fanout_threads, 1, 64)?,
                limits: Limits {
                    max_clients: in_range("max_clients", max_clients, 1, 100_000_000)?,
                    max_per_ip: in_range("max_per_ip", max_per_ip, 1, 100_000_000)?,
                },
                rate_limit,
                rcvbuf: rcvbuf
                    .map(|b| in_range("rcvbuf", b, 1024, 1 << 30))
                    .transpose()?,
                validate,
            },
            ip: ip.to_owned(),
            port: port.0,
            interval,
            core: Slot::default(),
            final_stats: Mutex::default(),
        })
    }

    /// Binds and starts serving. Raises OSError if the address cannot be bound, RuntimeError if
    /// the server is already running.
    fn start(&self, py: Python<'_>) -> PyResult<()> {
        let config = self.config.clone();
        super::start(py, &self.core, || Server::start(config))
    }

    /// Sends ``end`` to every live client, ends all threads and closes the socket. Idempotent.
    /// Raises RuntimeError if a server thread had panicked.
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        super::stop(py, &self.core, |core| {
            *lock(&self.final_stats) = core.stats()
        })
    }

    /// Sends ``msg`` to every live client, as a message from the server's own address.
    fn broadcast(&self, py: Python<'_>, msg: Payload) -> PyResult<()> {
        let core = self.core.running_core().map_err(to_py)?;
        py.detach(|| core.broadcast(msg.as_bytes())).map_err(to_py)
    }

    /// Counters since start (see the stub for each), the kernel's count of datagrams it dropped
    /// for want of buffer space, and the clients registered now. They outlive ``stop()``.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let stats = match self.core.get().map_err(to_py)? {
            Some(core) => core.stats(),
            None => lock(&self.final_stats).clone(),
        };
        stats.into_py_dict(py)
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
