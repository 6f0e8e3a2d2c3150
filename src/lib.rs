//! udpchat: group chat and fan-out over UDP with heartbeat liveness.
//!
//! The core (`protocol` → `registry` → `server` / `client`) is plain Rust with no Python in it;
//! `python` is the PyO3 layer that converts types and maps errors.

// The receive and fan-out paths are built on recvmmsg/sendmmsg and poll(2).
#[cfg(not(target_os = "linux"))]
compile_error!("udpchat runs on Linux: its core uses recvmmsg and sendmmsg");

mod auth;
pub mod client;
pub mod envelope;
pub mod error;
pub mod lifecycle;
pub mod logs;
mod net;
pub mod protocol;
mod ratelimit;
pub mod registry;
pub mod server;
mod throttle;
pub mod wakeup;
pub(crate) mod worker;

mod python;
