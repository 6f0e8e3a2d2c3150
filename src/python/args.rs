//! Arguments from Python, checked in udpchat's own words. Each method takes its arguments as
//! [`Arg`]s and converts them in its body, where the argument's name is known, so that every
//! error names it: a wrong type is a `TypeError` ("port must be an int, not bool"), a value out
//! of its range a `ValueError` ("max_queue must be in 1..10000000, got 1099511627776"), never an
//! `OverflowError` or a message about PyO3's own types.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{
    PyBool, PyByteArray, PyBytes, PyFloat, PyInt, PyList, PyMemoryView, PyString, PyTuple,
};
use std::fmt::Display;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// Seconds between a client's heartbeats, or of silence before a server drops a client: 10 ms
/// (100 heartbeats a second) to one day.
pub const MIN_INTERVAL: f64 = 0.01;
pub const MAX_INTERVAL: f64 = 86_400.0;
/// The most messages a client holds unread, and the most one `recv_many` returns.
pub const MAX_QUEUE: usize = 10_000_000;

/// An argument as the caller gave it, or [`Arg::MISSING`] where it was left out (its default
/// applies then). Extracting it never fails: the method's body converts it with a name.
pub struct Arg<'py>(Option<Bound<'py, PyAny>>);

impl<'a, 'py> FromPyObject<'a, 'py> for Arg<'py> {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        Ok(Arg(Some(obj.to_owned())))
    }
}

/// The name of `obj`'s type, for messages.
fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map_or_else(|_| "an unknown type".to_owned(), |n| n.to_string())
}

/// `obj` as Python's `repr` writes it, for messages; shortened if long.
fn show(obj: &Bound<'_, PyAny>) -> String {
    const MAX: usize = 60;
    match obj.repr() {
        Ok(repr) => {
            let repr = repr.to_string_lossy();
            match repr.char_indices().nth(MAX) {
                Some((cut, _)) => {
                    format!("{}... ({} characters)", &repr[..cut], repr.chars().count())
                }
                None => repr.into_owned(),
            }
        }
        // An int too long for `repr` (over 4,300 digits).
        Err(_) => format!("{} too large to show", type_name(obj)),
    }
}

impl<'py> Arg<'py> {
    pub const MISSING: Arg<'static> = Arg(None);

    /// The object given, unless it was left out or is None.
    fn given(&self) -> Option<&Bound<'py, PyAny>> {
        self.0.as_ref().filter(|obj| !obj.is_none())
    }

    /// An `int` (or an object with `__index__`, as numpy's integers), never a `bool`.
    fn as_int(name: &str, obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyInt>> {
        let wrong =
            || PyTypeError::new_err(format!("{name} must be an int, not {}", type_name(obj)));
        if obj.is_instance_of::<PyBool>() {
            return Err(wrong());
        }
        if let Ok(int) = obj.cast::<PyInt>() {
            return Ok(int.clone());
        }
        if obj.get_type().hasattr("__index__").unwrap_or(false) {
            if let Ok(index) = obj.call_method0("__index__") {
                if let Ok(int) = index.cast_into::<PyInt>() {
                    if !int.is_instance_of::<PyBool>() {
                        return Ok(int);
                    }
                }
            }
        }
        Err(wrong())
    }

    /// A number: an `int` or a `float` (or an object with `__index__`), never a `bool`. An int
    /// too large for a float is infinite, so a range check refuses it.
    fn as_number(name: &str, obj: &Bound<'py, PyAny>) -> PyResult<f64> {
        if let Ok(float) = obj.cast::<PyFloat>() {
            return Ok(float.value());
        }
        let int = Self::as_int(name, obj).map_err(|_| {
            PyTypeError::new_err(format!(
                "{name} must be a number (int or float), not {}",
                type_name(obj)
            ))
        })?;
        Ok(int.extract::<f64>().unwrap_or_else(|_| {
            if int.lt(0).unwrap_or(false) {
                f64::NEG_INFINITY
            } else {
                f64::INFINITY
            }
        }))
    }

    /// An integer in `lo..=hi`, or `default` if left out.
    pub fn int<T>(&self, name: &str, default: T, lo: T, hi: T) -> PyResult<T>
    where
        T: Copy + Display + PartialOrd + TryFrom<i128>,
    {
        match &self.0 {
            None => Ok(default),
            Some(obj) => Self::int_in(name, obj, lo, hi),
        }
    }

    /// An integer in `lo..=hi`; None if left out or None.
    pub fn optional_int<T>(&self, name: &str, lo: T, hi: T) -> PyResult<Option<T>>
    where
        T: Copy + Display + PartialOrd + TryFrom<i128>,
    {
        self.given()
            .map(|obj| Self::int_in(name, obj, lo, hi))
            .transpose()
    }

    /// A `str`; None if left out or None.
    pub fn optional_str(&self, name: &str) -> PyResult<Option<String>> {
        let Some(obj) = self.given() else {
            return Ok(None);
        };
        let text = obj.cast::<PyString>().map_err(|_| {
            PyTypeError::new_err(format!("{name} must be a str, not {}", type_name(obj)))
        })?;
        match text.to_str() {
            Ok(text) => Ok(Some(text.to_owned())),
            Err(_) => Err(PyValueError::new_err(format!(
                "{name} must be text that UTF-8 can encode, got {}",
                show(obj)
            ))),
        }
    }

    fn int_in<T>(name: &str, obj: &Bound<'py, PyAny>, lo: T, hi: T) -> PyResult<T>
    where
        T: Copy + Display + PartialOrd + TryFrom<i128>,
    {
        let int = Self::as_int(name, obj)?;
        int.extract::<i128>()
            .ok()
            .and_then(|v| T::try_from(v).ok())
            .filter(|v| lo <= *v && *v <= hi)
            .ok_or_else(|| {
                PyValueError::new_err(format!("{name} must be in {lo}..{hi}, got {}", show(obj)))
            })
    }

    /// A number in `lo..=hi` (NaN never is); None if left out or None.
    pub fn optional_number(&self, name: &str, lo: f64, hi: f64) -> PyResult<Option<f64>> {
        let Some(obj) = self.given() else {
            return Ok(None);
        };
        let value = Self::as_number(name, obj)?;
        if lo <= value && value <= hi {
            Ok(Some(value))
        } else {
            Err(PyValueError::new_err(format!(
                "{name} must be in {lo}..{hi}, got {}",
                show(obj)
            )))
        }
    }

    /// An interval in seconds, [`MIN_INTERVAL`] to [`MAX_INTERVAL`], or `default` if left out:
    /// as given, and as a `Duration`.
    pub fn interval(&self, name: &str, default: f64) -> PyResult<(f64, Duration)> {
        let Some(obj) = &self.0 else {
            return Ok((default, Duration::from_secs_f64(default)));
        };
        let seconds = Self::as_number(name, obj)?;
        if (MIN_INTERVAL..=MAX_INTERVAL).contains(&seconds) {
            Ok((seconds, Duration::from_secs_f64(seconds)))
        } else {
            Err(PyValueError::new_err(format!(
                "{name} must be a positive number of seconds in {MIN_INTERVAL}..{MAX_INTERVAL}, \
                 got {}",
                show(obj)
            )))
        }
    }

    /// A timeout: None (or left out) waits without end; else a number of seconds >= 0. One
    /// longer than a `Duration` holds (`float('inf')`) waits without end too.
    pub fn timeout(&self, name: &str) -> PyResult<Option<Duration>> {
        let Some(obj) = self.given() else {
            return Ok(None);
        };
        let seconds = Self::as_number(name, obj)?;
        if seconds.is_nan() || seconds < 0.0 {
            return Err(PyValueError::new_err(format!(
                "{name} must be None or a number of seconds >= 0, got {}",
                show(obj)
            )));
        }
        Ok(Duration::try_from_secs_f64(seconds).ok())
    }

    /// `True` or `False` (nothing else: not 0 or 1), or `default` if left out.
    pub fn flag(&self, name: &str, default: bool) -> PyResult<bool> {
        match &self.0 {
            None => Ok(default),
            Some(obj) => obj.cast::<PyBool>().map(|b| b.is_true()).map_err(|_| {
                PyTypeError::new_err(format!(
                    "{name} must be True or False, not {}",
                    type_name(obj)
                ))
            }),
        }
    }

    /// An IP address given as a `str` (never resolved: `'localhost'` is not one), or `default`.
    pub fn ip(&self, name: &str, default: &str) -> PyResult<(String, IpAddr)> {
        let text = match &self.0 {
            None => default.to_owned(),
            Some(obj) => obj
                .cast::<PyString>()
                .map_err(|_| {
                    PyTypeError::new_err(format!("{name} must be a str, not {}", type_name(obj)))
                })?
                .to_string_lossy()
                .into_owned(),
        };
        match text.parse() {
            Ok(ip) => Ok((text, ip)),
            Err(_) => Err(PyValueError::new_err(format!(
                "{name} must be an IPv4 or IPv6 address, got {text:?}"
            ))),
        }
    }

    /// A socket address given as `(ip, port)` (a tuple or list of a `str` and an `int`), as
    /// `clients` and `peers()` show them.
    pub fn addr(&self, name: &str) -> PyResult<SocketAddr> {
        let wrong = |what: String| {
            PyTypeError::new_err(format!("{name} must be an (ip, port) tuple, not {what}"))
        };
        let obj = self.0.as_ref().ok_or_else(|| wrong("nothing".to_owned()))?;
        let items: Vec<Bound<'py, PyAny>> = if let Ok(t) = obj.cast::<PyTuple>() {
            t.iter().collect()
        } else if let Ok(l) = obj.cast::<PyList>() {
            l.iter().collect()
        } else {
            return Err(wrong(type_name(obj)));
        };
        let [ip, port] = <[_; 2]>::try_from(items).map_err(|items| {
            PyValueError::new_err(format!(
                "{name} must be an (ip, port) pair, got {} items",
                items.len()
            ))
        })?;
        let (_, ip) = Arg(Some(ip)).ip(&format!("{name}[0]"), "")?;
        let port = Arg(Some(port)).int(&format!("{name}[1]"), 0, 0, u16::MAX)?;
        Ok(SocketAddr::new(ip, port))
    }

    /// Bytes to send: a `str` (sent as UTF-8) or a bytes-like object (`bytes`, `bytearray`,
    /// `memoryview`), or `default` if left out.
    pub fn payload(&self, name: &str, default: &'static [u8]) -> PyResult<Payload<'py>> {
        let Some(obj) = &self.0 else {
            return Ok(Payload::Static(default));
        };
        if let Ok(text) = obj.cast::<PyString>() {
            return match text.to_str() {
                Ok(_) => Ok(Payload::Text(text.clone())),
                Err(_) => Err(PyValueError::new_err(format!(
                    "{name} is a str that cannot be encoded as UTF-8 (it holds a lone \
                     surrogate, as text decoded with errors='surrogateescape' can): send bytes"
                ))),
            };
        }
        Self::bytes_like(obj).map(Payload::Bytes).ok_or_else(|| {
            PyTypeError::new_err(format!(
                "{name} must be str or bytes, not {}",
                type_name(obj)
            ))
        })
    }

    /// A bytes-like object (`bytes`, `bytearray`, `memoryview`) as `bytes`; `str` is not one.
    pub fn bytes(&self, name: &str) -> PyResult<Bound<'py, PyBytes>> {
        let wrong =
            |what: String| PyTypeError::new_err(format!("{name} must be bytes, not {what}"));
        let obj = self.0.as_ref().ok_or_else(|| wrong("nothing".to_owned()))?;
        Self::bytes_like(obj).ok_or_else(|| wrong(type_name(obj)))
    }

    fn bytes_like(obj: &Bound<'py, PyAny>) -> Option<Bound<'py, PyBytes>> {
        let py = obj.py();
        if let Ok(bytes) = obj.cast::<PyBytes>() {
            return Some(if obj.is_exact_instance_of::<PyBytes>() {
                bytes.clone()
            } else {
                PyBytes::new(py, bytes.as_bytes())
            });
        }
        if let Ok(array) = obj.cast::<PyByteArray>() {
            return Some(PyBytes::new(py, &array.to_vec()));
        }
        if obj.is_instance_of::<PyMemoryView>() {
            let bytes = obj.call_method0("tobytes").ok()?;
            return bytes.cast_into::<PyBytes>().ok();
        }
        None
    }
}

/// Bytes to send, held without a copy where Python has them already (a `str` known to encode).
pub enum Payload<'py> {
    Text(Bound<'py, PyString>),
    Bytes(Bound<'py, PyBytes>),
    Static(&'static [u8]),
}

impl Payload<'_> {
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            // `Arg::payload` made sure it encodes.
            Payload::Text(text) => text.to_str().map(str::as_bytes).unwrap_or_default(),
            Payload::Bytes(bytes) => bytes.as_bytes(),
            Payload::Static(bytes) => bytes,
        }
    }
}
