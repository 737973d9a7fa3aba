//! The two-step result protocol, in one place.
//!
//! A call whose result has an unknown size writes descriptors (`u32 handle, u32 len`, little-endian)
//! at `out`; the guest then allocates `len` bytes and calls `result_read`, which copies the bytes and
//! frees the handle. Every module of the SDK goes through [`call`] so the protocol is written once.

use std::collections::HashMap;

use crate::error::{check, Result};
use crate::{sys, Error, ErrorKind};

/// The ABI's `NOT_FOUND`.
const NOT_FOUND: i32 = 1;

/// Bytes per descriptor: `u32 handle, u32 len`.
const DESCRIPTOR: usize = 8;

/// Run `f` with room for `count` descriptors, then read every result it described.
///
/// All handles are read even if one read fails, so none stays outstanding (the host allows 64).
pub(crate) fn call_n(count: usize, f: impl FnOnce(*mut u8) -> i32) -> Result<Vec<Vec<u8>>> {
    let mut descriptors = vec![0u8; DESCRIPTOR * count];
    check(f(descriptors.as_mut_ptr()))?;
    read_all(&descriptors)
}

/// Read (and so free) every result `descriptors` names.
fn read_all(descriptors: &[u8]) -> Result<Vec<Vec<u8>>> {
    let count = descriptors.len() / DESCRIPTOR;
    let mut results = Vec::with_capacity(count);
    let mut first_error = None;
    for d in descriptors.chunks_exact(DESCRIPTOR) {
        let handle = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
        let len = u32::from_le_bytes([d[4], d[5], d[6], d[7]]) as usize;
        let mut buf = vec![0u8; len];
        match check(unsafe { sys::result_read(handle, buf.as_mut_ptr(), len) }) {
            Ok(()) => results.push(buf),
            Err(err) => {
                first_error.get_or_insert(err);
            }
        }
    }
    match first_error {
        Some(err) => Err(err),
        None => Ok(results),
    }
}

/// [`call_n`] for the usual single result.
pub(crate) fn call(f: impl FnOnce(*mut u8) -> i32) -> Result<Vec<u8>> {
    let mut results = call_n(1, f)?;
    Ok(results.pop().unwrap_or_default())
}

/// Like [`call`], but `NOT_FOUND` is `Ok(None)`: for lookups where absence is an ordinary answer (and
/// costs no second host call for a message nobody reads).
pub(crate) fn lookup(f: impl FnOnce(*mut u8) -> i32) -> Result<Option<Vec<u8>>> {
    let mut descriptor = [0u8; DESCRIPTOR];
    match f(descriptor.as_mut_ptr()) {
        NOT_FOUND => Ok(None),
        code => {
            check(code)?;
            Ok(read_all(&descriptor)?.pop())
        }
    }
}

/// Bytes from the host as a `String`. The host sends UTF-8; a stray invalid byte is replaced rather
/// than failing the whole call.
pub(crate) fn into_string(bytes: Vec<u8>) -> String {
    match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(err) => String::from_utf8_lossy(err.as_bytes()).into_owned(),
    }
}

/// A JSON object of strings (headers) as a map; non-string values keep their JSON text.
pub(crate) fn string_map(value: serde_json::Value) -> Result<HashMap<String, String>> {
    match value {
        serde_json::Value::Object(map) => Ok(map
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect()),
        other => Err(Error::new(ErrorKind::Json, format!("expected a JSON object, got {}", other))),
    }
}

/// The head of an HTTP or GitHub response (`{"status": 200, "headers": {...}, ...}`): its status,
/// its headers, and the whole object for fields only one of them has.
pub(crate) fn response_head(bytes: &[u8]) -> Result<(u16, HashMap<String, String>, serde_json::Value)> {
    let head: serde_json::Value = serde_json::from_slice(bytes)?;
    let status = head
        .get("status")
        .and_then(|s| s.as_u64())
        .and_then(|s| u16::try_from(s).ok())
        .ok_or_else(|| Error::new(ErrorKind::Json, "response head has no status"))?;
    let headers = match head.get("headers") {
        Some(h) => string_map(h.clone())?,
        None => HashMap::new(),
    };
    Ok((status, headers, head))
}
