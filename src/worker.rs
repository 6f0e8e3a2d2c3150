//! The threads of a server or client: one stop signal they all watch, panics caught and kept.

use crossbeam_channel::{Receiver, Sender};
use std::io::{PipeReader, PipeWriter};
use std::os::fd::{AsFd, BorrowedFd};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::wakeup::Wakeup;

/// Fired once, seen by every kind of wait a core thread does: `poll` sees the pipe hang up,
/// `select!` sees the channel disconnect, and loops between system calls read the flag.
pub struct Stop {
    fired: AtomicBool,
    pipe: PipeReader,
    senders: Mutex<Option<(PipeWriter, Sender<()>)>>,
    channel: Receiver<()>,
}

impl Stop {
    pub fn new() -> std::io::Result<Self> {
        let (pipe, writer) = std::io::pipe()?;
        let (tx, channel) = crossbeam_channel::bounded(0);
        Ok(Stop {
            fired: AtomicBool::new(false),
            pipe,
            senders: Mutex::new(Some((writer, tx))),
            channel,
        })
    }

    /// Wakes every thread; idempotent.
    pub fn fire(&self) {
        self.fired.store(true, Ordering::Release);
        // Dropping the write end and the sender is the wake-up.
        drop(lock(&self.senders).take());
    }

    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    /// Readable (hung up) once fired: for `poll`.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.pipe.as_fd()
    }

    /// Disconnected once fired: for `select!`.
    pub fn channel(&self) -> &Receiver<()> {
        &self.channel
    }
}

/// Locks a mutex whose data stays consistent even if a holder panicked (every critical section
/// here is a single update), so a panic in one thread never cascades into the others.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The threads of one server or client and what became of them.
pub struct Workers {
    /// "server" or "client", for errors.
    name: &'static str,
    stop: Arc<Stop>,
    /// Set by `inject_panic`: each thread panics as it ends.
    injected: Arc<AtomicBool>,
    failure: Arc<Mutex<Option<String>>>,
    /// Threads that have not yet finished, panic kept: a thread's channels close as it unwinds,
    /// before its panic is kept and the stop fired, so whoever sees one close `settle()`s first.
    unfinished: Arc<(Mutex<usize>, Condvar)>,
    /// Each thread, and whether it lingers (see `spawn_lingering`).
    handles: Mutex<Vec<(JoinHandle<()>, bool)>>,
    /// Written as each thread ends, once its panic (if any) is kept: an event loop waiting for
    /// the core's queue then finds it closed, or the core dead.
    wakeup: Arc<Wakeup>,
}

/// How long `failure()` waits, once stopped, for threads still ending (they end within one
/// wake-up, and never wait for the GIL).
const SETTLE: Duration = Duration::from_secs(1);

/// How long `stop_and_join` waits for a lingering thread before it leaves it to end on its own.
const LINGER: Duration = Duration::from_millis(25);

impl Workers {
    pub fn new(name: &'static str, wakeup: Arc<Wakeup>) -> Result<Self> {
        Ok(Workers {
            name,
            stop: Arc::new(Stop::new().map_err(|e| Error::io("cannot create stop pipe", e))?),
            injected: Arc::default(),
            unfinished: Arc::default(),
            failure: Arc::default(),
            handles: Mutex::default(),
            wakeup,
        })
    }

    pub fn stop(&self) -> &Arc<Stop> {
        &self.stop
    }

    /// Runs `body` on a named thread. A panic is logged, kept for [`Workers::check`], and fires
    /// the stop signal so the other threads end too: nothing hangs half-alive.
    pub fn spawn(&self, name: &str, body: impl FnOnce() + Send + 'static) -> Result<()> {
        self.spawn_thread(name, false, body)
    }

    /// As `spawn`, for a thread that may be blocked for a while in a call it cannot interrupt
    /// (a connection to another server): a stop waits `LINGER` for it, then leaves it to end on
    /// its own, and `settle` does not wait for it. It must hold nothing a new run needs (a bound
    /// socket) and must not report a failure once the stop has fired.
    pub fn spawn_lingering(&self, name: &str, body: impl FnOnce() + Send + 'static) -> Result<()> {
        self.spawn_thread(name, true, body)
    }

    fn spawn_thread(
        &self,
        name: &str,
        lingering: bool,
        body: impl FnOnce() + Send + 'static,
    ) -> Result<()> {
        let stop = Arc::clone(&self.stop);
        let failure = Arc::clone(&self.failure);
        let injected = Arc::clone(&self.injected);
        let unfinished = Arc::clone(&self.unfinished);
        let wakeup = Arc::clone(&self.wakeup);
        let counted = !lingering;
        *lock(&unfinished.0) += usize::from(counted);
        let thread_name = name.to_owned();
        let handle = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let body = move || {
                    body();
                    if injected.load(Ordering::Acquire) {
                        panic!("a panic injected by a test");
                    }
                };
                if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(body)) {
                    let msg = payload
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".to_owned());
                    log::error!("thread {thread_name} panicked: {msg}; stopping");
                    lock(&failure).get_or_insert(format!("{thread_name}: {msg}"));
                    stop.fire();
                }
                *lock(&unfinished.0) -= usize::from(counted);
                unfinished.1.notify_all();
                wakeup.wake();
            })
            .map_err(|e| {
                *lock(&self.unfinished.0) -= usize::from(counted);
                Error::io(format!("cannot spawn thread {name}"), e)
            })?;
        lock(&self.handles).push((handle, lingering));
        Ok(())
    }

    /// Makes every thread end and panic as it does, as a bug would, and waits until they have:
    /// for tests of what a panic does to the object around it, which nothing else can make
    /// happen on purpose. Call it with the GIL released.
    pub fn inject_panic(&self) {
        self.injected.store(true, Ordering::Release);
        self.stop_and_join();
    }

    /// True until stopped or until a thread panicked.
    pub fn running(&self) -> bool {
        !self.stop.fired()
    }

    /// Whether a thread has panicked (it may still be unwinding).
    pub fn panicked(&self) -> bool {
        lock(&self.failure).is_some()
    }

    /// Waits (up to `SETTLE`) until every thread has finished, its panic kept if it had one.
    /// For whoever saw a thread's channel close: the thread may still be unwinding.
    pub fn settle(&self) {
        let (count, finished) = &*self.unfinished;
        let _ = finished
            .wait_timeout_while(lock(count), SETTLE, |n| *n > 0)
            .unwrap_or_else(PoisonError::into_inner);
    }

    /// `Err(Panicked)` if a thread panicked. Once stopped, it settles first, so a panic that is
    /// still unwinding is not missed.
    pub fn failure(&self) -> Result<()> {
        if self.stop.fired() {
            self.settle();
        }
        match lock(&self.failure).clone() {
            Some(msg) => Err(Error::Panicked(msg)),
            None => Ok(()),
        }
    }

    /// `Err(Panicked)` if a thread panicked, `Err(NotRunning)` if stopped, else `Ok`.
    pub fn check(&self) -> Result<()> {
        self.failure()?;
        if self.stop.fired() {
            return Err(Error::NotRunning(self.name));
        }
        Ok(())
    }

    /// Fires the stop signal and joins every thread. Returns false if another caller already
    /// joined them. Call it with the GIL released: a thread may be logging into Python.
    pub fn stop_and_join(&self) -> bool {
        self.stop.fire();
        let handles = std::mem::take(&mut *lock(&self.handles));
        let joined_any = !handles.is_empty();
        let (lingering, others): (Vec<_>, Vec<_>) = handles.into_iter().partition(|h| h.1);
        for (handle, _) in others {
            // The body's panic was caught inside the thread, so join cannot fail.
            let _ = handle.join();
        }
        let deadline = Instant::now() + LINGER;
        for (handle, _) in lingering {
            while !handle.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            if handle.is_finished() {
                let _ = handle.join();
            }
        }
        joined_any
    }
}

impl Drop for Workers {
    /// An object dropped without `stop()` still ends its threads (they notice within one wake-up);
    /// it does not join them, since a drop may run with the GIL held.
    fn drop(&mut self) {
        self.stop.fire();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_panic_is_kept_and_stops_the_other_threads() {
        let workers = Workers::new("test", Arc::new(Wakeup::new().unwrap())).unwrap();
        let stop = Arc::clone(workers.stop());
        workers
            .spawn("waiter", move || {
                let _ = stop.channel().recv();
            })
            .unwrap();
        workers.spawn("bomb", || panic!("boom")).unwrap();
        // The waiter only returns because the panic fired the stop signal.
        assert!(workers.stop_and_join());
        match workers.check() {
            Err(Error::Panicked(msg)) => assert_eq!(msg, "bomb: boom"),
            other => panic!("expected Panicked, got {other:?}"),
        }
        assert!(!workers.running());
    }

    #[test]
    fn a_panic_seen_as_a_closed_channel_is_kept_once_settled() {
        /// Closes the channel as the thread unwinds, well before the panic can be kept.
        struct SlowDrop(Option<Sender<()>>);
        impl Drop for SlowDrop {
            fn drop(&mut self) {
                drop(self.0.take());
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        let workers = Workers::new("test", Arc::new(Wakeup::new().unwrap())).unwrap();
        let (tx, rx) = crossbeam_channel::bounded::<()>(0);
        workers
            .spawn("unwinder", move || {
                let _guard = SlowDrop(Some(tx));
                panic!("boom");
            })
            .unwrap();
        assert!(rx.recv().is_err()); // closed while unwinding
        workers.settle();
        assert!(matches!(workers.failure(), Err(Error::Panicked(_))));
        workers.stop_and_join();
    }

    #[test]
    fn stop_wakes_poll_and_select_and_is_idempotent() {
        let workers = Workers::new("test", Arc::new(Wakeup::new().unwrap())).unwrap();
        let stop = Arc::clone(workers.stop());
        workers
            .spawn("poller", move || {
                let mut fds = [libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&stop.fd()),
                    events: libc::POLLIN,
                    revents: 0,
                }];
                // SAFETY: one valid pollfd, length 1.
                let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 10_000) };
                assert_eq!(n, 1);
            })
            .unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(workers.check().is_ok());
        assert!(workers.stop_and_join());
        assert!(!workers.stop_and_join());
        assert!(matches!(workers.check(), Err(Error::NotRunning(_))));
    }
}
