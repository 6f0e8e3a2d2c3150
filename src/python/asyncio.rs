//! What the asyncio methods (`python/udpchat/_asyncio.py`) are built on: a take that never
//! waits, one run's queue and its eventfd as a Python object to wait on, and a send that waits
//! for room in the event loop instead of a thread.

use pyo3::prelude::*;
use pyo3::IntoPyObjectExt;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use super::client::{closed, Messages};
use super::message::Message;
use super::presence::Event;
use super::queue::{Queue, Taken};
use super::server::dead;
use super::to_py;
use crate::client::Client;
use crate::server::{self, Server};
use crate::wakeup::Wakeup;

/// Up to `max` messages of one client run's queue, without waiting; else `waiting(wakeup)`: what
/// to wait on, the eventfd armed; None once the queue is closed and read. `RuntimeError` if a
/// thread's death closed it.
pub fn take_messages<'py>(
    py: Python<'py>,
    queue: &Messages,
    core: &Option<Arc<Client>>,
    max: usize,
    waiting: impl FnOnce(Arc<Wakeup>) -> PyResult<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    match queue.take(max, || false) {
        Taken::Items(items) => items
            .iter()
            .map(|d| Message::from_datagram(py, d))
            .collect::<Vec<_>>()
            .into_bound_py_any(py),
        Taken::Empty(wakeup) => waiting(wakeup),
        Taken::Closed => {
            closed(py, core.clone())?;
            Ok(py.None().into_bound(py))
        }
    }
}

/// Up to `max` events of one server run's queue, as [`take_messages`] takes messages; None also
/// once a thread of `core` panicked and every event queued has been read.
pub fn take_events<'py>(
    py: Python<'py>,
    queue: &Queue<server::Event>,
    core: &Option<Arc<Server>>,
    max: usize,
    waiting: impl FnOnce(Arc<Wakeup>) -> PyResult<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    match queue.take(max, || dead(core)) {
        Taken::Items(items) => items
            .into_iter()
            .map(Event::from)
            .collect::<Vec<_>>()
            .into_bound_py_any(py),
        Taken::Empty(wakeup) => waiting(wakeup),
        Taken::Closed => Ok(py.None().into_bound(py)),
    }
}

/// A run's eventfd alone: what the event loop holds while it watches the fd, so the fd cannot
/// close (and its number be reused) under the loop, without keeping the run's socket open.
#[pyclass(frozen, module = "udpchat._udpchat", name = "_Wakeup")]
pub struct WakeupFd(Arc<Wakeup>);

#[pymethods]
impl WakeupFd {
    fn fileno(&self) -> i32 {
        self.0.as_fd().as_raw_fd()
    }

    /// Resets the eventfd, before looking at the queue again.
    fn drain(&self) {
        self.0.drain();
    }
}

/// One client run's message queue, for a coroutine to wait on: its eventfd to watch, and `take`
/// to go on taking from that run only, so a waiter sees its run end (None) even if the client
/// is restarted meanwhile.
#[pyclass(frozen, module = "udpchat._udpchat", name = "_MessageQueue")]
pub struct MessageQueue {
    pub queue: Messages,
    pub core: Option<Arc<Client>>,
    pub wakeup: Arc<Wakeup>,
}

#[pymethods]
impl MessageQueue {
    fn fileno(&self) -> i32 {
        self.wakeup.as_fd().as_raw_fd()
    }

    /// Its eventfd alone, for the event loop to hold while it watches it.
    fn wakeup(&self) -> WakeupFd {
        WakeupFd(Arc::clone(&self.wakeup))
    }

    /// Up to ``max`` messages already waiting; else this queue, its eventfd armed; None once it
    /// is closed and read.
    fn take<'py>(slf: &Bound<'py, Self>, max: usize) -> PyResult<Bound<'py, PyAny>> {
        let this = slf.get();
        take_messages(slf.py(), &this.queue, &this.core, max, |_| {
            Ok(slf.clone().into_any())
        })
    }
}

/// One server run's events queue, for a coroutine to wait on, as [`MessageQueue`].
#[pyclass(frozen, module = "udpchat._udpchat", name = "_EventQueue")]
pub struct EventQueue {
    pub queue: Queue<server::Event>,
    pub core: Option<Arc<Server>>,
    pub wakeup: Arc<Wakeup>,
}

#[pymethods]
impl EventQueue {
    fn fileno(&self) -> i32 {
        self.wakeup.as_fd().as_raw_fd()
    }

    /// Its eventfd alone, for the event loop to hold while it watches it.
    fn wakeup(&self) -> WakeupFd {
        WakeupFd(Arc::clone(&self.wakeup))
    }

    /// Up to ``max`` events already queued; else this queue, its eventfd armed; None once it is
    /// closed and read, or its server died.
    fn take<'py>(slf: &Bound<'py, Self>, max: usize) -> PyResult<Bound<'py, PyAny>> {
        let this = slf.get();
        take_events(slf.py(), &this.queue, &this.core, max, |_| {
            Ok(slf.clone().into_any())
        })
    }
}

/// A message the socket had no room for: framed, to be sent as it is once the socket is
/// writable, for as long as a blocking `send()` would wait. `fileno()` is a duplicate of the
/// client's socket, to wait on for writing; `stop_fileno()` a duplicate of its stop signal,
/// readable once the client has stopped.
#[pyclass(frozen, module = "udpchat._udpchat", name = "_PendingSend")]
pub struct PendingSend {
    core: Arc<Client>,
    datagram: Vec<u8>,
    socket: OwnedFd,
    stop: OwnedFd,
    deadline: Instant,
}

impl PendingSend {
    pub fn new(core: Arc<Client>, datagram: Vec<u8>) -> PyResult<PendingSend> {
        let (socket, stop) = core.wait_fds().map_err(to_py)?;
        Ok(PendingSend {
            core,
            datagram,
            socket,
            stop,
            deadline: Instant::now() + Client::SEND_WAIT,
        })
    }
}

#[pymethods]
impl PendingSend {
    fn fileno(&self) -> i32 {
        self.socket.as_raw_fd()
    }

    fn stop_fileno(&self) -> i32 {
        self.stop.as_raw_fd()
    }

    /// Seconds left before a retry that finds no room gives up.
    fn left(&self) -> f64 {
        self.deadline
            .saturating_duration_since(Instant::now())
            .as_secs_f64()
    }

    /// Tries to send it again: False if there is still no room. Raises as ``send`` does:
    /// RuntimeError if the client has stopped meanwhile, OSError (EAGAIN) once ``left()`` is 0.
    fn retry(&self) -> PyResult<bool> {
        self.core
            .send_again(&self.datagram, self.deadline)
            .map_err(to_py)
    }
}
