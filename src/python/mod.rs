//! The PyO3 layer: argument checks, type conversion and error mapping. No networking here.

mod client;
mod message;
mod server;

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::MutexExt;
use pyo3::types::PyInt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use crate::error::Error;

/// The core's errors as Python exceptions: socket failures as `OSError` with the errno (so
/// Python picks the subclass, e.g. `PermissionError`), the rest as `RuntimeError`.
fn to_py(err: Error) -> PyErr {
    match &err {
        Error::Io { source, .. } => match source.raw_os_error() {
            Some(errno) => PyOSError::new_err((errno, err.to_string())),
            None => PyOSError::new_err(err.to_string()),
        },
        Error::NotRunning | Error::Panicked(_) => PyRuntimeError::new_err(err.to_string()),
    }
}

fn parse_ip(ip: &str) -> PyResult<IpAddr> {
    ip.parse().map_err(|_| {
        PyValueError::new_err(format!("ip must be an IPv4 or IPv6 address, got {ip:?}"))
    })
}

/// A port argument: any `int`, checked to be in 0..65535 (ValueError, never OverflowError).
struct Port(u16);

impl<'a, 'py> FromPyObject<'a, 'py> for Port {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let int = obj.cast::<PyInt>()?.to_owned();
        int.extract::<u16>()
            .map(Port)
            .map_err(|_| PyValueError::new_err(format!("port must be in 0..65535, got {int}")))
    }
}

fn parse_seconds(name: &str, seconds: f64) -> PyResult<Duration> {
    match Duration::try_from_secs_f64(seconds) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err(PyValueError::new_err(format!(
            "{name} must be a positive number of seconds, got {seconds}"
        ))),
    }
}

/// `value` if it lies in `lo..=hi`, else a ValueError naming the argument.
fn in_range<T: PartialOrd + std::fmt::Display>(name: &str, value: T, lo: T, hi: T) -> PyResult<T> {
    if lo <= value && value <= hi {
        Ok(value)
    } else {
        Err(PyValueError::new_err(format!(
            "{name} must be in {lo}..{hi}, got {value}"
        )))
    }
}

fn py_addr(addr: SocketAddr) -> (String, u16) {
    (addr.ip().to_string(), addr.port())
}

/// A payload from Python: `str` is sent as UTF-8, `bytes` as is.
#[derive(FromPyObject)]
enum Payload {
    Text(String),
    Bytes(Vec<u8>),
}

impl Payload {
    fn as_bytes(&self) -> &[u8] {
        match self {
            Payload::Text(s) => s.as_bytes(),
            Payload::Bytes(b) => b,
        }
    }
}

/// What the Python classes need of a core: the server and the client alike.
trait Core: Send + Sync + 'static {
    /// "server" or "client", for messages.
    const NAME: &'static str;
    fn running(&self) -> bool;
    /// Ends the threads; blocks, so call it with the GIL released.
    fn stop(&self);
    fn failure(&self) -> crate::error::Result<()>;
}

impl Core for crate::server::Server {
    const NAME: &'static str = "server";
    fn running(&self) -> bool {
        self.running()
    }
    fn stop(&self) {
        self.stop()
    }
    fn failure(&self) -> crate::error::Result<()> {
        self.failure()
    }
}

impl Core for crate::client::Client {
    const NAME: &'static str = "client";
    fn running(&self) -> bool {
        self.running()
    }
    fn stop(&self) {
        self.stop()
    }
    fn failure(&self) -> crate::error::Result<()> {
        self.failure()
    }
}

/// The running core of a Python object. The mutex is held only to read or swap the `Arc`, and is
/// taken with the GIL released while waiting, so it can never take part in a GIL deadlock.
struct Slot<T>(Mutex<Option<Arc<T>>>);

impl<T: Core> Slot<T> {
    fn new() -> Self {
        Slot(Mutex::new(None))
    }

    fn get(&self, py: Python<'_>) -> Option<Arc<T>> {
        self.0
            .lock_py_attached(py)
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn running(&self, py: Python<'_>) -> bool {
        self.get(py).is_some_and(|c| c.running())
    }

    /// The core if it is running; else RuntimeError, with the panic if a thread died.
    fn running_core(&self, py: Python<'_>) -> PyResult<Arc<T>> {
        match self.get(py) {
            Some(core) if core.running() => return Ok(core),
            Some(core) => core.failure().map_err(to_py)?,
            None => {}
        }
        Err(PyRuntimeError::new_err(format!(
            "{} is not running",
            T::NAME
        )))
    }

    /// Starts a new core with the GIL released; RuntimeError if one is running.
    fn start(
        &self,
        py: Python<'_>,
        start: impl FnOnce() -> crate::error::Result<T> + Send,
    ) -> PyResult<()> {
        if self.running(py) {
            return Err(PyRuntimeError::new_err(format!(
                "{} is already running",
                T::NAME
            )));
        }
        let core = Arc::new(py.detach(start).map_err(to_py)?);
        let old = self
            .0
            .lock_py_attached(py)
            .unwrap_or_else(PoisonError::into_inner)
            .replace(core);
        if let Some(old) = old {
            // One that ended by itself (the server's `end`, a panic) still has threads to join.
            py.detach(|| old.stop());
        }
        Ok(())
    }

    /// Stops and takes out the core, if any: its socket closes once the last reference goes.
    /// RuntimeError if one of its threads had panicked.
    fn stop(&self, py: Python<'_>, keep: impl FnOnce(&T)) -> PyResult<()> {
        let core = self
            .0
            .lock_py_attached(py)
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(core) = core {
            py.detach(|| core.stop());
            keep(&core);
            core.failure().map_err(to_py)?;
        }
        Ok(())
    }
}

static LOG_RESET: OnceLock<pyo3_log::ResetHandle> = OnceLock::new();

/// Makes udpchat re-read the levels of its `udpchat.*` loggers. udpchat caches them so that a
/// disabled level costs nothing on the hot path; call this after changing them at run time.
#[pyfunction]
fn reset_log_cache() {
    if let Some(handle) = LOG_RESET.get() {
        handle.reset();
    }
}

#[pymodule]
fn _udpchat(m: &Bound<'_, PyModule>) -> PyResult<()> {
    if let Ok(handle) =
        pyo3_log::Logger::new(m.py(), pyo3_log::Caching::LoggersAndLevels)?.install()
    {
        let _ = LOG_RESET.set(handle);
    }
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("MAX_DATAGRAM", crate::server::MAX_DATAGRAM)?;
    m.add_class::<server::ChatServerUdp>()?;
    m.add_class::<client::ChatClientUdp>()?;
    m.add_class::<message::Message>()?;
    m.add_function(wrap_pyfunction!(reset_log_cache, m)?)?;
    Ok(())
}
