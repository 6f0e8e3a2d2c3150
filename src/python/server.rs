use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::UNIX_EPOCH;

use super::{parse_ip, parse_seconds, py_addr, to_py, Payload, Port, Slot};
use crate::server::{Server, ServerConfig, Stats, MAX_DATAGRAM};
use crate::worker::lock;

/// A UDP chat server: registers every sender, relays each message to every live client as
/// ``ack: {ip} {port}\n{payload}\n``, and drops clients silent for more than ``interval`` seconds.
#[pyclass(frozen, module = "udpchat._udpchat")]
pub struct ChatServerUdp {
    config: ServerConfig,
    ip: String,
    interval: f64,
    core: Slot<Server>,
    /// The counters of the last server stopped, whose socket is closed.
    final_stats: Mutex<Stats>,
}

impl ChatServerUdp {
    fn running_core(&self, py: Python<'_>) -> PyResult<std::sync::Arc<Server>> {
        match self.core.get(py) {
            Some(core) if core.running() => Ok(core),
            Some(core) => Err(core
                .failure()
                .err()
                .map_or_else(|| PyRuntimeError::new_err("server is not running"), to_py)),
            None => Err(PyRuntimeError::new_err("server is not running")),
        }
    }
}

#[pymethods]
impl ChatServerUdp {
    #[new]
    #[pyo3(
        signature = (ip = "127.0.0.1", port = Port(9998), interval = 10.0, *, max_datagram = MAX_DATAGRAM, fanout_threads = 1),
        text_signature = "(ip='127.0.0.1', port=9998, interval=10.0, *, max_datagram=65507, fanout_threads=1)"
    )]
    fn new(
        ip: &str,
        port: Port,
        interval: f64,
        max_datagram: usize,
        fanout_threads: usize,
    ) -> PyResult<Self> {
        if !(1..=64).contains(&fanout_threads) {
            return Err(PyValueError::new_err(format!(
                "fanout_threads must be in 1..64, got {fanout_threads}"
            )));
        }
        if !(1..=65_535).contains(&max_datagram) {
            return Err(PyValueError::new_err(format!(
                "max_datagram must be in 1..65535, got {max_datagram}"
            )));
        }
        Ok(ChatServerUdp {
            config: ServerConfig {
                addr: SocketAddr::new(parse_ip(ip)?, port.0),
                interval: parse_seconds("interval", interval)?,
                max_datagram,
                fanout_threads,
            },
            ip: ip.to_owned(),
            interval,
            core: Slot::new(),
            final_stats: Mutex::default(),
        })
    }

    /// Binds and starts serving. Raises OSError if the address cannot be bound, RuntimeError if
    /// the server is already running.
    fn start(&self, py: Python<'_>) -> PyResult<()> {
        if self.core.get(py).is_some_and(|c| c.running()) {
            return Err(PyRuntimeError::new_err("server is already running"));
        }
        let config = self.config.clone();
        let core = py.detach(|| Server::start(config)).map_err(to_py)?;
        if let Some(old) = self.core.replace(py, core) {
            // A server that stopped itself (a thread panicked) still has threads to join.
            py.detach(|| old.stop());
        }
        Ok(())
    }

    /// Sends ``end`` to every live client, ends all threads and closes the socket. Idempotent.
    /// Raises RuntimeError if a server thread had panicked.
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        if let Some(core) = self.core.take(py) {
            py.detach(|| core.stop());
            *lock(&self.final_stats) = core.stats();
            core.failure().map_err(to_py)?;
        }
        Ok(())
    }

    /// Sends ``msg`` to every live client, as a message from the server's own address.
    fn broadcast(&self, py: Python<'_>, msg: Payload) -> PyResult<()> {
        let core = self.running_core(py)?;
        py.detach(|| core.broadcast(msg.as_bytes())).map_err(to_py)
    }

    /// Counters since start: datagrams received, broadcasts, deliveries, send errors, datagrams
    /// dropped for being longer than ``max_datagram``, clients expired, and clients registered now.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = match self.core.get(py) {
            Some(core) => core.stats(),
            None => lock(&self.final_stats).clone(),
        };
        let dict = PyDict::new(py);
        dict.set_item("received", s.received)?;
        dict.set_item("broadcasts", s.broadcasts)?;
        dict.set_item("deliveries", s.deliveries)?;
        dict.set_item("send_errors", s.send_errors)?;
        dict.set_item("dropped_oversize", s.dropped_oversize)?;
        dict.set_item("expired", s.expired)?;
        dict.set_item("clients", s.clients)?;
        Ok(dict)
    }

    /// ``{(ip, port): last_seen_unix_timestamp}`` of the live clients; empty when not running.
    #[getter]
    fn clients<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        if let Some(core) = self.core.get(py).filter(|c| c.running()) {
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

    /// The ``(ip, port)`` actually bound while running (``port=0`` picks a free one), else None.
    #[getter]
    fn address(&self, py: Python<'_>) -> Option<(String, u16)> {
        self.core
            .get(py)
            .filter(|c| c.running())
            .map(|c| py_addr(c.local_addr()))
    }

    #[getter]
    fn ip(&self) -> &str {
        &self.ip
    }

    #[getter]
    fn port(&self) -> u16 {
        self.config.addr.port()
    }

    #[getter]
    fn interval(&self) -> f64 {
        self.interval
    }

    #[getter]
    fn max_datagram(&self) -> usize {
        self.config.max_datagram
    }

    /// True between ``start()`` and ``stop()``; False if a server thread died.
    #[getter]
    fn running(&self, py: Python<'_>) -> bool {
        self.core.get(py).is_some_and(|c| c.running())
    }

    fn __enter__(slf: Bound<'_, Self>) -> PyResult<Bound<'_, Self>> {
        slf.get().start(slf.py())?;
        Ok(slf)
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<()> {
        self.stop(py)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let state = match self.address(py) {
            Some((ip, port)) => format!("serving on {ip}:{port}"),
            None => "stopped".to_owned(),
        };
        format!(
            "<ChatServerUdp ip={:?} port={} interval={} {state}>",
            self.ip,
            self.config.addr.port(),
            self.interval
        )
    }
}
