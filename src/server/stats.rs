//! The server's counters: atomics bumped on the hot paths, read together by `stats()`.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;

/// The server's counters by name, in a fixed order; all monotonic but `clients`.
pub type Stats = Vec<(&'static str, u64)>;

/// Declares the counters once: the struct of atomics and the names `stats()` reports them by.
macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident,)*) => {
        #[derive(Default)]
        pub(super) struct Counters {
            $($(#[doc = $doc])* pub(super) $name: AtomicU64,)*
        }

        impl Counters {
            pub(super) fn snapshot(&self) -> Stats {
                vec![$((stringify!($name), self.$name.load(Relaxed)),)*]
            }
        }
    };
}

counters! {
    /// Datagrams read from the socket.
    received,
    /// Messages relayed (each once, however many clients it went to).
    broadcasts,
    /// Datagrams sent to clients by broadcasts.
    deliveries,
    /// Deliveries that failed.
    send_errors,
    /// Longer than `max_datagram`, or a message whose broadcast would be longer than
    /// `protocol::MAX_BROADCAST`.
    dropped_oversize,
    /// From a new client while `max_clients` or `max_per_ip` were reached.
    dropped_over_cap,
    /// Over a source's `rate_limit`.
    dropped_rate_limited,
    /// Validated mode: a cookie or token that is not valid for its source.
    dropped_unvalidated,
    /// Validated mode: neither a handshake step nor a tokened datagram.
    dropped_malformed,
    /// From port 0, or an unspecified, broadcast or multicast address: forged.
    dropped_bad_source,
    /// From one of the server's own addresses, or another server's output (`ack:`, `end`, a
    /// challenge, a welcome): answering could start a loop.
    dropped_loop,
    /// Validated mode: challenges sent.
    challenges,
    /// Validated mode: challenges and welcomes not sent, over the reply limits.
    replies_limited,
    /// Clients dropped for silence.
    expired,
    /// Open mode: clients dropped because the kernel reported them unreachable (ICMP).
    dropped_unreachable,
    /// Validated mode: sends skipped to clients paused since the kernel reported them
    /// unreachable.
    paused_unreachable,
}
