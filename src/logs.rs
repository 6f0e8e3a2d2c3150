//! Log records leave the core through one bounded channel, so that no thread of the core ever
//! waits for the GIL to log: the binding layer's logging thread alone hands them to Python. A
//! record that finds the channel full (Python has not taken the last thousands) is dropped and
//! counted. Levels are filtered before a record is made, by `log::max_level()`, which whoever
//! drains the channel keeps equal to the most verbose level any of its loggers wants.

use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Records waiting for the logging thread at most.
const CAPACITY: usize = 4096;

/// A log record, owned, so it can cross to another thread.
#[derive(Debug)]
pub struct Record {
    pub level: log::Level,
    pub target: String,
    pub message: String,
    pub module_path: Option<&'static str>,
    pub file: Option<&'static str>,
    pub line: Option<u32>,
}

impl Record {
    /// Hands this record to `logger` as a `log::Record`.
    pub fn log_to(&self, logger: &dyn log::Log) {
        logger.log(
            &log::Record::builder()
                .level(self.level)
                .target(&self.target)
                .args(format_args!("{}", self.message))
                .module_path_static(self.module_path)
                .file_static(self.file)
                .line(self.line)
                .build(),
        );
    }
}

/// What travels through the channel.
#[derive(Debug)]
pub enum Item {
    Record(Record),
    /// Answered once every item sent before it has been handled.
    Flush(Sender<()>),
}

struct ChannelLogger {
    /// Swapped for a new channel by `open()`: after `fork()` the child has no thread draining
    /// the old one.
    tx: ArcSwap<Sender<Item>>,
    dropped: AtomicU64,
}

impl log::Log for ChannelLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let item = Item::Record(Record {
            level: record.level(),
            target: record.target().to_owned(),
            message: record.args().to_string(),
            module_path: record.module_path_static(),
            file: record.file_static(),
            line: record.line(),
        });
        if let Err(TrySendError::Full(_)) = self.tx.load().try_send(item) {
            self.dropped.fetch_add(1, Relaxed);
        }
    }

    fn flush(&self) {}
}

static LOGGER: OnceLock<ChannelLogger> = OnceLock::new();

/// Makes the channel the `log` crate's logger (the first time) and gives a new receiving end:
/// records logged from now on go to it. The previous receiver gets nothing more.
pub fn open() -> Receiver<Item> {
    let (tx, rx) = crossbeam_channel::bounded(CAPACITY);
    let mut fresh = Some(tx);
    let logger = LOGGER.get_or_init(|| ChannelLogger {
        tx: ArcSwap::from_pointee(fresh.take().expect("taken once")),
        dropped: AtomicU64::new(0),
    });
    match fresh {
        // After fork: the parent's channel is forgotten, not dropped (dropping the last sender
        // takes a lock inside the channel that a parent thread may have held at the fork).
        Some(tx) => std::mem::forget(logger.tx.swap(Arc::new(tx))),
        // Fails only if another logger was installed first; the records then go to that one.
        None => {
            let _ = log::set_logger(logger);
        }
    }
    rx
}

/// Records dropped for a full channel since the last call.
pub fn take_dropped() -> u64 {
    LOGGER.get().map_or(0, |l| l.dropped.swap(0, Relaxed))
}

/// Waits up to `timeout` until every record logged before this call has been handled; false if
/// it was not (nobody drains the channel, or it is full).
pub fn flush(timeout: Duration) -> bool {
    let Some(logger) = LOGGER.get() else {
        return true;
    };
    let (done, handled) = crossbeam_channel::bounded(1);
    logger.tx.load().try_send(Item::Flush(done)).is_ok() && handled.recv_timeout(timeout).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_cross_in_order_and_a_full_channel_drops_and_counts() {
        let rx = open();
        log::set_max_level(log::LevelFilter::Info);
        log::debug!(target: "udpchat::test", "filtered out");
        for i in 0..CAPACITY + 10 {
            log::info!(target: "udpchat::test", "record {i}");
        }
        let got: Vec<String> = rx
            .try_iter()
            .filter_map(|item| match item {
                Item::Record(r) if r.target == "udpchat::test" => Some(r.message),
                _ => None,
            })
            .collect();
        // Other tests log into the same channel meanwhile: what got through is a prefix, in order.
        assert!(
            got.len() <= CAPACITY && got.len() > CAPACITY / 2,
            "{}",
            got.len()
        );
        assert!(got
            .iter()
            .enumerate()
            .all(|(i, m)| *m == format!("record {i}")));
        assert!(take_dropped() >= 10);
        assert!(
            !flush(Duration::from_millis(10)),
            "nobody drains: the flush times out"
        );
        // A second `open` (as after fork) takes the records from now on.
        let rx2 = open();
        log::warn!(target: "udpchat::test", "after");
        let after = |item: Item| matches!(item, Item::Record(r) if r.message == "after");
        assert!(!rx.try_iter().any(after));
        assert!(rx2.try_iter().any(after));
    }
}
