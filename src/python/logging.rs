//! The logging thread: the one thread that takes the GIL to hand the core's log records to
//! Python's `logging` (through pyo3-log), so no core thread ever waits for Python. It also keeps
//! `log::max_level()` equal to the most verbose level a `udpchat` logger wants, re-read a few
//! times a second, so levels the application sets take effect without its help and a disabled
//! level costs the core one atomic load.

use arc_swap::ArcSwapOption;
use crossbeam_channel::{select, tick, Receiver};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::logs::{self, Item};

/// How often levels are read again, and dropped records reported.
const REFRESH: Duration = Duration::from_millis(200);
/// How long `start()` and `stop()` wait for their records to reach Python.
const FLUSH_WAIT: Duration = Duration::from_secs(1);
const THREAD_NAME: &str = "udpchat-log";

/// The process whose logging thread runs; after `fork()` the child has none, and starts its own.
/// 0 once the thread has been shut down at exit.
static THREAD_PID: AtomicU32 = AtomicU32::new(0);
static THREAD: Mutex<Option<JoinHandle<()>>> = Mutex::new(None);
/// Set at interpreter exit: the thread ends once it has handled what was logged before.
static SHUTDOWN: AtomicBool = AtomicBool::new(false);
/// The cache of the pyo3-log logger the thread hands records to; swapped without a lock, as
/// a forked child starts a logger of its own.
static RESET: LazyLock<ArcSwapOption<pyo3_log::ResetHandle>> = LazyLock::new(ArcSwapOption::empty);

/// Reads the levels now, and starts this process's logging thread if it has none.
pub fn prepare(py: Python<'_>) -> PyResult<()> {
    let pid = crate::lifecycle::pid();
    if THREAD_PID.swap(pid, Ordering::AcqRel) == pid {
        return refresh_levels(py);
    }
    let logger = pyo3_log::Logger::new(py, pyo3_log::Caching::LoggersAndLevels)?;
    RESET.store(Some(Arc::new(logger.reset_handle())));
    refresh_levels(py)?;
    let records = logs::open();
    let thread = std::thread::Builder::new()
        .name(THREAD_NAME.to_owned())
        .spawn(move || forward(&records, &logger))
        .map_err(|e| {
            pyo3::exceptions::PyOSError::new_err(format!("cannot start {THREAD_NAME}: {e}"))
        })?;
    // After fork, the parent's handle is forgotten: its thread is not in this process.
    std::mem::forget(crate::worker::lock(&THREAD).replace(thread));
    Ok(())
}

/// Registered with `atexit`: lets the logging thread hand over what was logged, then ends and
/// joins it, before the interpreter finalizes. A thread still inside Python then would be ended
/// by the interpreter with `pthread_exit`, which cannot unwind through Rust and aborts.
#[pyfunction]
pub fn shutdown_logging(py: Python<'_>) {
    if THREAD_PID.load(Ordering::Acquire) != crate::lifecycle::pid() {
        return;
    }
    SHUTDOWN.store(true, Ordering::Release);
    let handed_over = py.detach(|| logs::flush(FLUSH_WAIT));
    THREAD_PID.store(0, Ordering::Release);
    let thread = crate::worker::lock(&THREAD).take();
    if let (true, Some(thread)) = (handed_over, thread) {
        // It has answered the flush and returns without entering Python again.
        let _ = py.detach(|| thread.join());
    }
}

/// Waits, with the GIL released, up to a second until the records logged so far have reached
/// Python: so that a call's own records are there when it returns. Not on the logging thread
/// itself (a handler calling `stop()`), which would wait for itself, nor where this process has
/// no logging thread (a forked child that started nothing, or after exit began).
pub fn flush(py: Python<'_>) {
    let ours = THREAD_PID.load(Ordering::Acquire) == crate::lifecycle::pid();
    if ours && std::thread::current().name() != Some(THREAD_NAME) {
        py.detach(|| logs::flush(FLUSH_WAIT));
    }
}

fn forward(records: &Receiver<Item>, logger: &pyo3_log::Logger) {
    let refresh = tick(REFRESH);
    loop {
        let attached = select! {
            recv(records) -> item => match item {
                Ok(Item::Record(record)) => Python::try_attach(|py| {
                    record.log_to(logger);
                    // A handler that raised must not take the thread down, nor be lost.
                    if let Some(e) = PyErr::take(py) {
                        e.write_unraisable(py, None);
                    }
                }),
                Ok(Item::Flush(done)) => {
                    let _ = done.send(());
                    if SHUTDOWN.load(Ordering::Acquire) {
                        return;
                    }
                    Some(())
                }
                Err(_) => return, // replaced after fork
            },
            recv(refresh) -> _ => Python::try_attach(|py| {
                if let Err(e) = refresh_levels(py) {
                    e.write_unraisable(py, None);
                }
                report_dropped(logger);
            }),
        };
        if attached.is_none() {
            return; // the interpreter is shutting down
        }
    }
}

/// Sets `log::max_level()` to the most verbose level enabled for `udpchat` or any of its
/// children that exist, and makes pyo3-log read each logger's level again.
pub fn refresh_levels(py: Python<'_>) -> PyResult<()> {
    let logging = py.import("logging")?;
    let mut names = vec![PyString::new(py, "udpchat").into_any()];
    let existing = logging
        .getattr("Logger")?
        .getattr("manager")?
        .getattr("loggerDict")?
        .cast_into::<PyDict>()?;
    for name in existing.keys() {
        if name.extract::<&str>()?.starts_with("udpchat.") {
            names.push(name);
        }
    }
    let mut most = usize::MAX;
    for name in names {
        let level: usize = logging
            .call_method1("getLogger", (name,))?
            .call_method0("getEffectiveLevel")?
            .extract()?;
        most = most.min(level);
    }
    // Python's levels: 10 DEBUG, 20 INFO, 30 WARNING, 40 ERROR, 50 CRITICAL; 0 (NOTSET) on
    // the root only, where it means everything.
    log::set_max_level(match most {
        0..=9 => log::LevelFilter::Trace,
        10..=19 => log::LevelFilter::Debug,
        20..=29 => log::LevelFilter::Info,
        30..=39 => log::LevelFilter::Warn,
        40..=49 => log::LevelFilter::Error,
        _ => log::LevelFilter::Off,
    });
    if let Some(reset) = &*RESET.load() {
        reset.reset();
    }
    Ok(())
}

fn report_dropped(logger: &pyo3_log::Logger) {
    let dropped = logs::take_dropped();
    if dropped > 0 {
        logs::Record {
            level: log::Level::Warn,
            target: "udpchat".to_owned(),
            message: format!("{dropped} log records dropped: Python did not take them in time"),
            module_path: Some(module_path!()),
            file: Some(file!()),
            line: Some(line!()),
        }
        .log_to(logger);
    }
}
