//! Rate-limited logging for hot loops: a flood of bad datagrams or ICMP errors must not become
//! a flood of log records (each one takes the GIL once it reaches Python).

use std::time::{Duration, Instant};

const PERIOD: Duration = Duration::from_secs(1);

/// Lets one event through per second and counts the ones it held back.
#[derive(Debug, Default)]
pub struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// Returns `Some(n)` when this event should be logged, `n` being how many were suppressed
    /// since the last one that was; `None` when it should be dropped.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < PERIOD => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// Logs through a [`Throttle`], appending how many similar records were suppressed.
macro_rules! throttled {
    ($throttle:expr, $level:ident, target: $target:expr, $($arg:tt)+) => {
        if let Some(suppressed) = $throttle.allow(::std::time::Instant::now()) {
            if suppressed == 0 {
                ::log::$level!(target: $target, $($arg)+);
            } else {
                ::log::$level!(
                    target: $target,
                    "{} ({} similar suppressed)",
                    format_args!($($arg)+),
                    suppressed
                );
            }
        }
    };
    ($throttle:expr, $level:ident, $($arg:tt)+) => {
        throttled!($throttle, $level, target: module_path!(), $($arg)+)
    };
}
pub(crate) use throttled;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_event_per_period_with_a_count_of_the_rest() {
        let t0 = Instant::now();
        let mut t = Throttle::default();
        assert_eq!(t.allow(t0), Some(0));
        assert_eq!(t.allow(t0 + Duration::from_millis(10)), None);
        assert_eq!(t.allow(t0 + Duration::from_millis(999)), None);
        assert_eq!(t.allow(t0 + PERIOD), Some(2));
        assert_eq!(t.allow(t0 + PERIOD * 3), Some(0));
    }
}
