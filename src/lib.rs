//! udpchat: group chat and fan-out over UDP with heartbeat liveness.
//!
//! The core (`protocol` → `registry` → `server` / `client`) is plain Rust with no Python in it;
//! `python` is the PyO3 layer that converts types and maps errors.

pub mod client;
pub mod error;
mod net;
pub mod protocol;
pub mod registry;
pub mod server;
mod throttle;
pub(crate) mod worker;

mod python;
