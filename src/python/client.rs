use crossbeam_channel::RecvTimeoutError;
use pyo3::prelude::*;
use pyo3::IntoPyObjectExt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::args::{Arg, MAX_QUEUE};
use super::asyncio::{take_messages, MessageQueue, PendingSend};
use super::message::Message;
use super::queue::Queue;
use super::{lifecycle_methods, to_py};
use crate::client::{Client, ClientConfig};
use crate::lifecycle::{Core, Slot};
use crate::worker::lock;

/// A UDP chat client: registers with ``reg``, sends ``^hb^`` every ``interval`` seconds, and
/// delivers what the server sends through ``recv()`` or iteration.
#[pyclass(frozen, subclass, module = "udpchat._udpchat")]
pub struct ChatClientUdp {
    config: ClientConfig,
    ip: String,
    port: u16,
    interval: f64,
    core: Slot<Client>,
    /// `dropped` of the last client stopped, whose socket is closed.
    final_dropped: AtomicU64,
    /// The messages of the last client started: still readable once it has stopped.
    messages: Mutex<Option<Messages>>,
}

/// The datagrams from the server.
pub(super) type Messages = Queue<Vec<u8>>;

impl ChatClientUdp {
    /// Waits up to `timeout` (None: without end) for the next datagram: with the GIL released,
    /// in slices so Ctrl-C is seen promptly. Then the messages waiting behind it can be taken.
    fn wait(
        &self,
        py: Python<'_>,
        timeout: Option<Duration>,
    ) -> PyResult<Option<(Messages, Vec<u8>)>> {
        let core = self.core.get().map_err(to_py)?;
        let Some(queue) = lock(&self.messages).clone() else {
            return Ok(None);
        };
        // A thread that dies closes the queue: nothing more to watch.
        match queue.wait(py, timeout, || false)? {
            Ok(datagram) => Ok(Some((queue, datagram))),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            // Stopped, ended by the server, or a thread died: then this says so.
            Err(RecvTimeoutError::Disconnected) => {
                closed(py, core)?;
                Ok(None)
            }
        }
    }
}

/// The queue was found closed: `RuntimeError` if it was a thread's death that closed it.
pub(super) fn closed(py: Python<'_>, core: Option<Arc<Client>>) -> PyResult<()> {
    if let Some(core) = core {
        py.detach(|| core.workers().settle());
        core.failure().map_err(to_py)?;
    }
    Ok(())
}

#[pymethods]
impl ChatClientUdp {
    #[new]
    #[pyo3(
        signature = (ip = Arg::MISSING, port = Arg::MISSING, interval = Arg::MISSING, *, max_queue = Arg::MISSING),
        text_signature = "(ip='127.0.0.1', port=9998, interval=5.0, *, max_queue=4096)"
    )]
    fn new(ip: Arg<'_>, port: Arg<'_>, interval: Arg<'_>, max_queue: Arg<'_>) -> PyResult<Self> {
        let (ip, addr) = ip.ip("ip", "127.0.0.1")?;
        let port = port.int("port", 9998, 1, u16::MAX)?;
        let (given_interval, interval) = interval.interval("interval", 5.0)?;
        Ok(ChatClientUdp {
            config: ClientConfig {
                server: SocketAddr::new(addr, port),
                interval,
                max_queue: max_queue.int("max_queue", 4096, 1, MAX_QUEUE)?,
            },
            ip,
            port,
            interval: given_interval,
            core: Slot::default(),
            final_dropped: AtomicU64::new(0),
            messages: Mutex::default(),
        })
    }

    /// Registers with the server (``reg``) and starts the heartbeat and receiver threads.
    /// Raises OSError if no socket can be opened, RuntimeError if already running.
    fn start(&self, py: Python<'_>) -> PyResult<()> {
        let config = self.config.clone();
        super::start(py, &self.core, || Client::start(config))?;
        if let Some(core) = self.core.get().map_err(to_py)? {
            *lock(&self.messages) = Some(Queue::new(core.messages().clone(), core.wakeup()));
        }
        Ok(())
    }

    /// Sends ``quit``, ends all threads and closes the socket. Idempotent. Raises RuntimeError if a
    /// client thread had panicked.
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        super::stop(py, &self.core, |core| {
            self.final_dropped.store(core.dropped(), Ordering::Relaxed);
            if let Some(queue) = lock(&self.messages).as_mut() {
                queue.forget_wakeup();
            }
        })
    }

    /// Sends ``msg`` (str as UTF-8, or bytes) to the server. The default, ``'quit'``, is the
    /// tutorial's: the server forgets this client, until its next heartbeat registers it again.
    #[pyo3(signature = (msg = Arg::MISSING), text_signature = "($self, /, msg='quit')")]
    fn send(&self, py: Python<'_>, msg: Arg<'_>) -> PyResult<()> {
        let msg = msg.payload("msg", b"quit")?;
        let data = msg.as_bytes();
        let core = self.core.running_core().map_err(to_py)?;
        py.detach(|| core.send(data)).map_err(to_py)
    }

    /// The next message from the server, waiting up to ``timeout`` seconds (None: until one
    /// comes). Returns None on timeout, or once the client is stopped or closed by the server and
    /// every message that arrived before has been read (they can be read after ``stop()``).
    #[pyo3(signature = (timeout = Arg::MISSING), text_signature = "($self, /, timeout=None)")]
    fn recv(&self, py: Python<'_>, timeout: Arg<'_>) -> PyResult<Option<Message>> {
        Ok(self
            .wait(py, timeout.timeout("timeout")?)?
            .map(|(_, datagram)| Message::from_datagram(py, &datagram)))
    }

    /// Up to ``max`` messages: waits up to ``timeout`` seconds (None: until one comes) for the
    /// first, then takes those already waiting. Returns an empty list where ``recv`` returns None.
    #[pyo3(
        signature = (max = Arg::MISSING, timeout = Arg::MISSING),
        text_signature = "($self, /, max=1024, timeout=None)"
    )]
    fn recv_many(&self, py: Python<'_>, max: Arg<'_>, timeout: Arg<'_>) -> PyResult<Vec<Message>> {
        let max = max.int("max", 1024, 1, MAX_QUEUE)?;
        let timeout = timeout.timeout("timeout")?;
        let Some((queue, first)) = self.wait(py, timeout)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(max.min(queue.items.len() + 1));
        out.push(Message::from_datagram(py, &first));
        out.extend(
            queue
                .items
                .try_iter()
                .take(max - 1)
                .map(|d| Message::from_datagram(py, &d)),
        );
        Ok(out)
    }

    /// For the asyncio methods: up to ``max`` messages already waiting, without waiting; else
    /// this run's queue to wait on, its eventfd armed; None where ``recv`` returns None.
    #[pyo3(signature = (max))]
    fn _take<'py>(&self, py: Python<'py>, max: Arg<'py>) -> PyResult<Bound<'py, PyAny>> {
        let max = max.int("max", 1024, 1, MAX_QUEUE)?;
        let core = self.core.get().map_err(to_py)?;
        let Some(queue) = lock(&self.messages).clone() else {
            return Ok(py.None().into_bound(py));
        };
        take_messages(py, &queue, &core, max, |wakeup| {
            let (queue, core) = (queue.clone(), core.clone());
            MessageQueue {
                queue,
                core,
                wakeup,
            }
            .into_bound_py_any(py)
        })
    }

    /// For ``asend``: sends ``msg`` if the socket has room now (None), else gives back what to
    /// send once it is writable. Raises as ``send`` does.
    #[pyo3(signature = (msg))]
    fn _try_send(&self, msg: Arg<'_>) -> PyResult<Option<PendingSend>> {
        let msg = msg.payload("msg", b"quit")?;
        let core = self.core.running_core().map_err(to_py)?;
        let Some(datagram) = core.try_send(msg.as_bytes()).map_err(to_py)? else {
            return Ok(None);
        };
        PendingSend::new(core, datagram).map(Some)
    }

    fn __iter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    /// Blocks for the next message; iteration ends when the client stops or the server ends.
    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Message>> {
        Ok(self
            .wait(py, None)?
            .map(|(_, datagram)| Message::from_datagram(py, &datagram)))
    }

    /// When the server was last heard from (any datagram), as a Unix timestamp; None if never.
    #[getter]
    fn last_heard(&self) -> PyResult<Option<f64>> {
        let heard = self.core.get().map_err(to_py)?.and_then(|c| c.last_heard());
        Ok(heard.and_then(|h| Some(h.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs_f64())))
    }

    /// True once a validated-mode server has given this client its token.
    #[getter]
    fn validated(&self) -> PyResult<bool> {
        Ok(self
            .core
            .get()
            .map_err(to_py)?
            .is_some_and(|c| c.validated()))
    }

    /// Messages dropped because they arrived while ``max_queue`` messages were waiting unread.
    #[getter]
    fn dropped(&self) -> PyResult<u64> {
        Ok(match self.core.get().map_err(to_py)? {
            Some(core) => core.dropped(),
            None => self.final_dropped.load(Ordering::Relaxed),
        })
    }
}

lifecycle_methods!(ChatClientUdp);
