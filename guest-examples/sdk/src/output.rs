//! The run's output: shown by `wasmflow run`, stored with the run. Each call replaces the last.

use serde::Serialize;

use crate::error::check;
use crate::{sys, Result};

/// Set the output to these bytes (at most 1 MiB, else [`crate::ErrorKind::TooLarge`]).
pub fn set(bytes: impl AsRef<[u8]>) -> Result<()> {
    let bytes = bytes.as_ref();
    check(unsafe { sys::set_output(bytes.as_ptr(), bytes.len()) })
}

/// Set the output to a string.
pub fn set_str(text: &str) -> Result<()> {
    set(text.as_bytes())
}

/// Set the output to `value` serialised as JSON.
pub fn set_json<T: Serialize + ?Sized>(value: &T) -> Result<()> {
    set(serde_json::to_vec(value)?)
}
