//! The core's error type. The PyO3 layer maps it to Python exceptions; nothing else does.

use std::fmt;
use std::io;

#[derive(Debug)]
pub enum Error {
    /// A socket call failed; `context` says which and on what address.
    Io { context: String, source: io::Error },
    /// The server or client (named) is not running: never started, stopped, or closed by the
    /// server's `end`.
    NotRunning(&'static str),
    /// `start` on a server or client (named) that is running.
    AlreadyRunning(&'static str),
    /// A server or client (named) started by a parent process, used in a forked child.
    Forked(&'static str),
    /// A core thread panicked; the message is the panic's.
    Panicked(String),
    /// A message that can never be relayed: its broadcast would be longer than UDP carries.
    /// The text says the limit.
    TooLong(String),
    /// A setting the core cannot use (a cluster URL); the text says why.
    Invalid(String),
}

impl Error {
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { context, source } => write!(f, "{context}: {source}"),
            Error::NotRunning(what) => write!(f, "{what} is not running"),
            Error::AlreadyRunning(what) => write!(f, "{what} is already running"),
            Error::Forked(what) => write!(
                f,
                "this {what} was started in the parent process before fork(); it belongs to \
                 the parent: start a new one here"
            ),
            Error::Panicked(msg) => write!(f, "a udpchat thread panicked: {msg}"),
            Error::TooLong(msg) | Error::Invalid(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
