//! The HTTP response, for flows started by an HTTP trigger (`POST /flows/<name>`).
//!
//! For other triggers these calls succeed and have no effect on anything but the stored run.

use crate::error::check;
use crate::{sys, Result};

/// Set the status code (100..=599, else [`crate::ErrorKind::Invalid`]).
pub fn status(code: u16) -> Result<()> {
    check(unsafe { sys::set_response_status(u32::from(code)) })
}

/// Append a header. The name must be an HTTP token and the value free of CR/LF
/// ([`crate::ErrorKind::Invalid`] otherwise).
pub fn header(name: &str, value: &str) -> Result<()> {
    check(unsafe { sys::set_response_header(name.as_ptr(), name.len(), value.as_ptr(), value.len()) })
}

/// Set the body (at most 8 MiB). Accepts `&str`, `String`, `&[u8]` or `Vec<u8>`.
pub fn body(bytes: impl AsRef<[u8]>) -> Result<()> {
    let bytes = bytes.as_ref();
    check(unsafe { sys::set_response_body(bytes.as_ptr(), bytes.len()) })
}

/// Set the body to `value` as JSON and add `content-type: application/json`.
pub fn json<T: serde::Serialize + ?Sized>(value: &T) -> Result<()> {
    let bytes = serde_json::to_vec(value)?;
    header("content-type", "application/json")?;
    body(bytes)
}
