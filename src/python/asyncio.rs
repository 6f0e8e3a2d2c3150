//! What the asyncio methods (`python/udpchat/_asyncio.py`) are built on: a core's eventfd as a
//! Python object, and a send that waits for room in the event loop instead of a thread.

use pyo3::prelude::*;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;

use super::to_py;
use crate::client::Client;
use crate::wakeup;

/// A core's eventfd, readable when a queue an event loop waits for may have something, or has
/// closed. Held by the event loop's side while it watches the fd, so the fd cannot close (and
/// its number be reused) under the loop.
#[pyclass(frozen, module = "udpchat._udpchat", name = "_Wakeup")]
pub struct Wakeup(pub Arc<wakeup::Wakeup>);

#[pymethods]
impl Wakeup {
    fn fileno(&self) -> i32 {
        self.0.as_fd().as_raw_fd()
    }

    /// Resets the eventfd, before looking at the queue again.
    fn drain(&self) {
        self.0.drain();
    }
}

/// A message the socket had no room for: framed, to be sent as it is once the socket is
/// writable. `fileno()` is a duplicate of the client's socket, to wait on.
#[pyclass(frozen, module = "udpchat._udpchat", name = "_PendingSend")]
pub struct PendingSend {
    pub core: Arc<Client>,
    pub datagram: Vec<u8>,
    pub fd: OwnedFd,
}

#[pymethods]
impl PendingSend {
    fn fileno(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// Tries to send it again: False if there is still no room. RuntimeError if the client has
    /// stopped meanwhile.
    fn retry(&self) -> PyResult<bool> {
        self.core.send_again(&self.datagram).map_err(to_py)
    }
}
