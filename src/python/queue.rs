//! A core's outgoing queue (a client's messages, a server's events) as its Python object keeps
//! it: still readable after the core has stopped, waited for by the blocking methods with the
//! GIL released, or taken from without waiting by the asyncio methods, which then wait on the
//! queue's eventfd in their event loop.

use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use pyo3::prelude::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::wakeup::Wakeup;

/// How long a blocking wait runs with the GIL released before it checks for Ctrl-C.
const SIGNAL_CHECK: Duration = Duration::from_millis(50);

/// The queue of the last core started and the eventfd its producer writes, until it stops:
/// then the queue is closed and the eventfd of no more use (`forget_wakeup`), and a stopped
/// object keeps no descriptor open.
pub struct Queue<T> {
    pub items: Receiver<T>,
    wakeup: Option<Arc<Wakeup>>,
}

impl<T> Clone for Queue<T> {
    fn clone(&self) -> Self {
        Queue {
            items: self.items.clone(),
            wakeup: self.wakeup.clone(),
        }
    }
}

/// What a look at the queue without waiting found.
pub enum Taken<T> {
    /// The first item, and up to `max - 1` more that were waiting.
    Items(Vec<T>),
    /// Nothing yet: the eventfd, armed, to wait on.
    Empty(Arc<Wakeup>),
    /// Closed, and every item read; or its producer died.
    Closed,
}

impl<T> Queue<T> {
    pub fn new(items: Receiver<T>, wakeup: &Arc<Wakeup>) -> Queue<T> {
        Queue {
            items,
            wakeup: Some(Arc::clone(wakeup)),
        }
    }

    /// For a stopped core's queue, closed: readers find that without its eventfd.
    pub fn forget_wakeup(&mut self) {
        self.wakeup = None;
    }
}

impl<T: Send> Queue<T> {
    /// Waits up to `timeout` (None: without end) for the next item, with the GIL released, in
    /// slices so Ctrl-C is seen promptly. `Err(Timeout)` on timeout, `Err(Disconnected)` once
    /// the queue is closed and empty, or once `dead()` says its producer died without closing
    /// it and it is empty.
    pub fn wait(
        &self,
        py: Python<'_>,
        timeout: Option<Duration>,
        dead: impl Fn() -> bool,
    ) -> PyResult<Result<T, RecvTimeoutError>> {
        let queue = &self.items;
        // An item already waiting is taken without releasing the GIL at all.
        match queue.try_recv() {
            Ok(item) => return Ok(Ok(item)),
            Err(TryRecvError::Disconnected) => return Ok(Err(RecvTimeoutError::Disconnected)),
            Err(TryRecvError::Empty) => {}
        }
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        loop {
            let slice = deadline.map_or(SIGNAL_CHECK, |d| {
                d.saturating_duration_since(Instant::now())
                    .min(SIGNAL_CHECK)
            });
            match py.detach(|| queue.recv_timeout(slice)) {
                Err(RecvTimeoutError::Timeout) => {
                    py.check_signals()?;
                    if dead() {
                        return Ok(queue.try_recv().map_err(|_| RecvTimeoutError::Disconnected));
                    }
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Ok(Err(RecvTimeoutError::Timeout));
                    }
                }
                received => return Ok(received),
            }
        }
    }

    /// Up to `max` items already waiting, without waiting. When there are none, it arms the
    /// eventfd before its last look, so an item queued after that look writes it.
    pub fn take(&self, max: usize, dead: impl Fn() -> bool) -> Taken<T> {
        let mut armed = false;
        loop {
            match self.items.try_recv() {
                Ok(first) => {
                    let mut items = Vec::with_capacity(max.min(self.items.len() + 1));
                    items.push(first);
                    items.extend(self.items.try_iter().take(max - 1));
                    return Taken::Items(items);
                }
                Err(TryRecvError::Disconnected) => return Taken::Closed,
                Err(TryRecvError::Empty) if dead() => return Taken::Closed,
                Err(TryRecvError::Empty) => match &self.wakeup {
                    Some(wakeup) if armed => return Taken::Empty(Arc::clone(wakeup)),
                    Some(wakeup) => {
                        wakeup.arm();
                        armed = true;
                    }
                    None => return Taken::Closed,
                },
            }
        }
    }
}
