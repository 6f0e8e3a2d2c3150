//! The PyO3 layer: argument checks, type conversion and error mapping. No networking here.

mod args;
mod asyncio;
mod client;
mod logging;
mod message;
mod presence;
mod queue;
mod server;

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use std::net::SocketAddr;

use crate::error::Error;
use crate::lifecycle::{Core, Slot};

/// The core's errors as Python exceptions: socket failures as `OSError` with the errno (so
/// Python picks the subclass, e.g. `PermissionError`), a message too long to relay as
/// `ValueError`, the rest as `RuntimeError`.
fn to_py(err: Error) -> PyErr {
    match &err {
        Error::Io { source, .. } => match source.raw_os_error() {
            Some(errno) => PyOSError::new_err((errno, err.to_string())),
            None => PyOSError::new_err(err.to_string()),
        },
        Error::NotRunning(_) | Error::AlreadyRunning(_) | Error::Forked(_) | Error::Panicked(_) => {
            PyRuntimeError::new_err(err.to_string())
        }
        Error::TooLong(_) | Error::Invalid(_) => PyValueError::new_err(err.to_string()),
    }
}

fn py_addr(addr: SocketAddr) -> (String, u16) {
    (addr.ip().to_string(), addr.port())
}

/// Starts `slot`'s core with the GIL released; its first records reach Python before it returns.
fn start<T: Core>(
    py: Python<'_>,
    slot: &Slot<T>,
    start: impl FnOnce() -> crate::error::Result<T> + Send,
) -> PyResult<()> {
    logging::prepare(py)?;
    let started = py.detach(|| slot.start(start)).map_err(to_py);
    logging::flush(py);
    started
}

/// Stops `slot`'s core with the GIL released (`keep` sees it stopped); its last records reach
/// Python before this returns.
fn stop<T: Core>(py: Python<'_>, slot: &Slot<T>, keep: impl FnOnce(&T) + Send) -> PyResult<()> {
    let stopped = py.detach(|| slot.stop(keep)).map_err(to_py);
    logging::flush(py);
    stopped
}

/// The methods both classes share, from the fields each has (`core: Slot<_>`, and `ip`, `port`,
/// `interval` as given) and the `start` and `stop` each defines: the arguments' getters,
/// `running`, `address`, the context manager and `__repr__`.
macro_rules! lifecycle_methods {
    ($class:ident) => {
        #[pymethods]
        impl $class {
            #[getter]
            fn ip(&self) -> &str {
                &self.ip
            }

            #[getter]
            fn port(&self) -> u16 {
                self.port
            }

            #[getter]
            fn interval(&self) -> f64 {
                self.interval
            }

            /// True between ``start()`` and ``stop()``; False once a thread died, or for a client
            /// once the server ended the chat.
            #[getter]
            fn running(&self) -> bool {
                self.core.running()
            }

            /// The bound ``(ip, port)`` while running, else None.
            #[getter]
            fn address(&self) -> Option<(String, u16)> {
                use crate::lifecycle::Core;
                self.core
                    .get()
                    .ok()
                    .flatten()
                    .filter(|c| c.running())
                    .map(|c| $crate::python::py_addr(c.local_addr()))
            }

            /// For tests: makes every thread of the running core panic, as a bug would.
            fn _inject_panic(&self, py: Python<'_>) -> PyResult<()> {
                use crate::lifecycle::Core;
                let core = self.core.running_core().map_err(to_py)?;
                // It joins the threads: with the GIL released, as every join here is.
                py.detach(|| core.workers().inject_panic());
                Ok(())
            }

            fn __enter__(slf: Bound<'_, Self>) -> PyResult<Bound<'_, Self>> {
                slf.get().start(slf.py())?;
                Ok(slf)
            }

            #[pyo3(signature = (*_exc))]
            fn __exit__(
                &self,
                py: Python<'_>,
                _exc: &Bound<'_, pyo3::types::PyTuple>,
            ) -> PyResult<()> {
                self.stop(py)
            }

            fn __repr__(&self) -> String {
                let state = match self.address() {
                    Some((ip, port)) => format!("running on {ip}:{port}"),
                    None => "stopped".to_owned(),
                };
                format!(
                    "<{} ip={:?} port={} interval={} {state}>",
                    stringify!($class),
                    self.ip,
                    self.port,
                    self.interval
                )
            }
        }
    };
}
use lifecycle_methods;

/// Makes udpchat read the levels of its `udpchat.*` loggers now. It reads them again by itself a
/// few times a second; this is for a change that must take effect at once.
#[pyfunction]
fn reset_log_cache(py: Python<'_>) -> PyResult<()> {
    logging::refresh_levels(py)
}

/// ``timeout`` checked as the blocking methods check it: seconds, or None for no end (also for
/// a timeout too large to keep). For the asyncio methods, which take the same arguments.
#[pyfunction]
#[pyo3(signature = (timeout))]
fn _seconds(timeout: args::Arg<'_>) -> PyResult<Option<f64>> {
    Ok(timeout.timeout("timeout")?.map(|t| t.as_secs_f64()))
}

#[pymodule]
fn _udpchat(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Read once now, at import, so its fork handler is in place before any thread could fork.
    crate::lifecycle::pid();
    logging::prepare(m.py())?;
    let shutdown = wrap_pyfunction!(logging::shutdown_logging, m)?;
    m.py()
        .import("atexit")?
        .call_method1("register", (shutdown,))?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("MAX_DATAGRAM", crate::server::MAX_DATAGRAM)?;
    m.add("MAX_MESSAGE", crate::protocol::MAX_MESSAGE)?;
    m.add_class::<server::ChatServerUdp>()?;
    m.add_class::<client::ChatClientUdp>()?;
    m.add_class::<message::Message>()?;
    m.add_class::<presence::Event>()?;
    m.add_class::<presence::Peer>()?;
    m.add_class::<asyncio::WakeupFd>()?;
    m.add_class::<asyncio::MessageQueue>()?;
    m.add_class::<asyncio::EventQueue>()?;
    m.add_class::<asyncio::PendingSend>()?;
    m.add_function(wrap_pyfunction!(reset_log_cache, m)?)?;
    m.add_function(wrap_pyfunction!(_seconds, m)?)?;
    Ok(())
}
