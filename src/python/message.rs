use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::OnceLock;

use super::args::Arg;
use super::py_addr;
use crate::protocol;

/// The `ack:` line of a message: its sender, and where its payload lies in the datagram.
struct Parsed {
    sender: Option<SocketAddr>,
    payload: Range<usize>,
}

/// One datagram received from the server. Parsed on first use, so a loop that only wants
/// `raw` pays nothing for it.
#[pyclass(frozen, module = "udpchat._udpchat")]
pub struct Message {
    raw: Py<PyBytes>,
    parsed: OnceLock<Parsed>,
}

impl Message {
    pub fn from_datagram(py: Python<'_>, datagram: &[u8]) -> Message {
        Message {
            raw: PyBytes::new(py, datagram).unbind(),
            parsed: OnceLock::new(),
        }
    }

    fn parsed(&self, py: Python<'_>) -> &Parsed {
        self.parsed.get_or_init(|| {
            let datagram = self.raw.as_bytes(py);
            match protocol::parse_ack(datagram) {
                Some(ack) => {
                    let start = ack.payload.as_ptr() as usize - datagram.as_ptr() as usize;
                    Parsed {
                        sender: Some(ack.sender),
                        payload: start..start + ack.payload.len(),
                    }
                }
                None => Parsed {
                    sender: None,
                    payload: 0..datagram.len(),
                },
            }
        })
    }

    fn payload_bytes<'a>(&'a self, py: Python<'a>) -> &'a [u8] {
        &self.raw.as_bytes(py)[self.parsed(py).payload.clone()]
    }
}

#[pymethods]
impl Message {
    #[new]
    fn new(raw: Arg<'_>) -> PyResult<Message> {
        Ok(Message {
            raw: raw.bytes("raw")?.unbind(),
            parsed: OnceLock::new(),
        })
    }

    #[getter]
    fn sender(&self, py: Python<'_>) -> Option<(String, u16)> {
        self.parsed(py).sender.map(py_addr)
    }

    #[getter]
    fn payload<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.payload_bytes(py))
    }

    #[getter]
    fn text(&self, py: Python<'_>) -> String {
        String::from_utf8_lossy(self.payload_bytes(py)).into_owned()
    }

    #[getter]
    fn raw(&self, py: Python<'_>) -> Py<PyBytes> {
        self.raw.clone_ref(py)
    }

    fn __eq__(&self, py: Python<'_>, other: &Bound<'_, PyAny>) -> bool {
        other
            .cast::<Message>()
            .is_ok_and(|o| o.get().raw.as_bytes(py) == self.raw.as_bytes(py))
    }

    fn __hash__(&self, py: Python<'_>) -> PyResult<isize> {
        self.raw.bind(py).hash()
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let sender = self.sender(py).into_pyobject(py)?.repr()?;
        let text = PyString::new(py, &self.text(py)).repr()?;
        Ok(format!("Message(sender={sender}, text={text})"))
    }
}
