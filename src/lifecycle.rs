//! The start/stop state of a server or client object: at most one core at a time, replaced by a
//! new `start`, taken out by `stop`. No Python here; the binding layer calls `start` and `stop`
//! with the GIL released, since both block and core threads may be logging into Python.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::worker::{lock, Workers};

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

/// The core of one object. The mutex is held only to clone or swap the `Arc`, never across a
/// call that could wait (for the GIL or anything else), so it is safe to take with the GIL held.
pub struct Slot<T>(Mutex<Option<Arc<T>>>);

impl<T: Core> Default for Slot<T> {
    fn default() -> Self {
        Slot(Mutex::new(None))
    }
}

impl<T: Core> Slot<T> {
    /// The last core started, running or not.
    pub fn get(&self) -> Option<Arc<T>> {
        lock(&self.0).clone()
    }

    pub fn running(&self) -> bool {
        self.get().is_some_and(|c| c.running())
    }

    /// The core if it is running; else `NotRunning`, or `Panicked` if one of its threads died.
    pub fn running_core(&self) -> Result<Arc<T>> {
        match self.get() {
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
        let core = Arc::new(start()?);
        let old = lock(&self.0).replace(core);
        if let Some(old) = old {
            // One that ended by itself (the server's `end`, a panic) still has threads to join.
            old.stop();
        }
        Ok(())
    }

    /// Stops and takes out the core, if any: its socket closes once the last reference goes.
    /// `keep` sees it stopped, to save what should outlive it. `Panicked` if one of its threads
    /// had died. Blocks.
    pub fn stop(&self, keep: impl FnOnce(&T)) -> Result<()> {
        let core = lock(&self.0).take();
        if let Some(core) = core {
            core.stop();
            keep(&core);
            core.failure()?;
        }
        Ok(())
    }
}
