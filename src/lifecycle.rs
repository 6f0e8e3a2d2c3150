//! The start/stop state of a server or client object: at most one core at a time, replaced by a
//! new `start`, taken out by `stop`. No Python here; the binding layer calls `start` and `stop`
//! with the GIL released, since both block.
//!
//! A core belongs to the process that started it. After `fork()` the child has a copy of the
//! object but none of its threads, and its socket is shared with the parent: there the object
//! is not running, `stop()` forgets it without a word on the wire, and every other use is
//! `Error::Forked`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Once};

use crate::error::{Error, Result};
use crate::worker::{lock, Workers};

/// This process's id, 0 until read. Every use of an object compares it with its starter's, so
/// it is cached (`getpid` is a system call) and forgotten in a child of `fork()`.
static PID: AtomicU32 = AtomicU32::new(0);

extern "C" fn forget_pid() {
    PID.store(0, Ordering::Relaxed);
}

/// This process's id, as `std::process::id()`, without a system call once read.
pub fn pid() -> u32 {
    match PID.load(Ordering::Relaxed) {
        0 => {
            static AT_FORK: Once = Once::new();
            // SAFETY: registers a handler that only stores to an atomic, as the child of a fork
            // may. It runs in the child of every fork() the C library makes (Python's
            // os.fork() included), before the child goes on.
            AT_FORK.call_once(|| unsafe {
                libc::pthread_atfork(None, None, Some(forget_pid));
            });
            let pid = std::process::id();
            PID.store(pid, Ordering::Relaxed);
            pid
        }
        pid => pid,
    }
}

/// What a server and a client have in common: threads, an address, a way to stop.
pub trait Core: Send + Sync + 'static {
    /// "server" or "client", for messages.
    const NAME: &'static str;

    fn workers(&self) -> &Workers;

    /// The bound address.
    fn local_addr(&self) -> SocketAddr;

    /// Ends the threads and says goodbye on the wire (`end` or `quit`). Idempotent; blocks.
    fn stop(&self);

    /// True until stopped, ended by the peer, or a thread panicked.
    fn running(&self) -> bool {
        self.workers().running()
    }

    /// `Err` if a core thread panicked.
    fn failure(&self) -> Result<()> {
        self.workers().failure()
    }
}

/// A core and the process that started it.
struct Started<T> {
    core: Arc<T>,
    pid: u32,
}

/// The core of one object. The mutex is held only to clone or swap the `Arc`, never across a
/// call that could wait (for the GIL or anything else), so it is safe to take with the GIL held.
pub struct Slot<T>(Mutex<Option<Started<T>>>);

impl<T: Core> Default for Slot<T> {
    fn default() -> Self {
        Slot(Mutex::new(None))
    }
}

impl<T: Core> Slot<T> {
    /// The last core started, running or not; `Forked` if it was started by a parent process.
    pub fn get(&self) -> Result<Option<Arc<T>>> {
        match &*lock(&self.0) {
            Some(started) if started.pid != pid() => Err(Error::Forked(T::NAME)),
            started => Ok(started.as_ref().map(|s| Arc::clone(&s.core))),
        }
    }

    /// False if stopped, ended, or started by a parent process.
    pub fn running(&self) -> bool {
        self.get().ok().flatten().is_some_and(|c| c.running())
    }

    /// The core if it is running; else `NotRunning`, or `Panicked` if one of its threads died.
    pub fn running_core(&self) -> Result<Arc<T>> {
        match self.get()? {
            Some(core) if core.running() => return Ok(core),
            Some(core) => core.failure()?,
            None => {}
        }
        Err(Error::NotRunning(T::NAME))
    }

    /// Starts a new core; `AlreadyRunning` if one is running. Blocks.
    pub fn start(&self, start: impl FnOnce() -> Result<T>) -> Result<()> {
        if self.running() {
            return Err(Error::AlreadyRunning(T::NAME));
        }
        let started = Started {
            core: Arc::new(start()?),
            pid: pid(),
        };
        let old = lock(&self.0).replace(started);
        if let Some(old) = old {
            old.retire();
        }
        Ok(())
    }

    /// Stops and takes out the core, if any: its socket closes once the last reference goes.
    /// `keep` sees it stopped, to save what should outlive it. `Panicked` if one of its threads
    /// had died. Blocks.
    pub fn stop(&self, keep: impl FnOnce(&T)) -> Result<()> {
        let started = lock(&self.0).take();
        if let Some(core) = started.and_then(Started::retire) {
            keep(&core);
            core.failure()?;
        }
        Ok(())
    }
}

impl<T> Drop for Slot<T> {
    fn drop(&mut self) {
        let started = self
            .0
            .get_mut()
            .map(Option::take)
            .unwrap_or_else(|e| e.into_inner().take());
        if let Some(started) = started.filter(|s| s.pid != pid()) {
            std::mem::forget(started.core); // see `Started::retire`
        }
    }
}

impl<T: Core> Started<T> {
    /// Stops the core (one that ended by itself still has threads to join) and gives it back;
    /// in a forked child, forgets it instead: its threads are the parent's, and so is the socket
    /// `end` or `quit` would go out on. Forgotten, not dropped: a lock the parent's threads held
    /// at the fork stays locked in the child, and dropping could wait on one.
    fn retire(self) -> Option<Arc<T>> {
        if self.pid != pid() {
            std::mem::forget(self.core);
            return None;
        }
        self.core.stop();
        Some(self.core)
    }
}
