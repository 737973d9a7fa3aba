//! Key-value storage private to the flow, kept across runs and restarts.
//!
//! Keys are up to 512 bytes, values up to 1 MiB ([`crate::ErrorKind::TooLarge`]).
//!
//! Runs of a flow may execute at the same time, so a `get` followed by a `set` can lose another
//! run's write. Use [`increment`] for counters and [`compare_and_set`] for anything else that must
//! not lose updates; both are atomic in the host's database.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::check;
use crate::result::{call, into_string, lookup};
use crate::{sys, Result};

/// The value of `key`, `None` if absent.
pub fn get(key: &str) -> Result<Option<Vec<u8>>> {
    lookup(|out| unsafe { sys::kv_get(key.as_ptr(), key.len(), out) })
}

/// The value of `key` as a string, `None` if absent.
pub fn get_str(key: &str) -> Result<Option<String>> {
    Ok(get(key)?.map(into_string))
}

/// The value of `key` deserialised from JSON, `None` if absent.
pub fn get_json<T: DeserializeOwned>(key: &str) -> Result<Option<T>> {
    match get(key)? {
        Some(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
        None => Ok(None),
    }
}

/// Store `value` under `key` (bytes or a string).
pub fn set(key: &str, value: impl AsRef<[u8]>) -> Result<()> {
    let value = value.as_ref();
    check(unsafe { sys::kv_set(key.as_ptr(), key.len(), value.as_ptr(), value.len()) })
}

/// Store `value` as JSON under `key`.
pub fn set_json<T: Serialize + ?Sized>(key: &str, value: &T) -> Result<()> {
    set(key, serde_json::to_vec(value)?)
}

/// Delete `key`; deleting an absent key is not an error.
pub fn delete(key: &str) -> Result<()> {
    check(unsafe { sys::kv_delete(key.as_ptr(), key.len()) })
}

/// The flow's keys that start with `prefix` (`""` for all), sorted, at most 1,000.
pub fn keys(prefix: &str) -> Result<Vec<String>> {
    let bytes = call(|out| unsafe { sys::kv_keys(prefix.as_ptr(), prefix.len(), out) })?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// Add `delta` to the counter under `key` (absent counts as 0) and return the new value, atomically.
///
/// The counter is stored as decimal text (`"42"`), so [`get_str`] reads it too. A value that is not
/// a decimal integer, or a sum outside the `i64` range, is [`crate::ErrorKind::Invalid`] (nothing changes).
pub fn increment(key: &str, delta: i64) -> Result<i64> {
    let mut value: i64 = 0;
    check(unsafe { sys::kv_increment(key.as_ptr(), key.len(), delta, &mut value) })?;
    Ok(value)
}

/// Set `key` to `value` only if it currently holds exactly `expected` (`None`: only if it is
/// absent), atomically. Returns whether the value was set; on `false`, read it again and retry.
///
/// ```no_run
/// # fn main() -> wasmflow::Result<()> {
/// use wasmflow::kv;
/// loop {
///     let seen = kv::get("list")?;
///     let mut next = seen.clone().unwrap_or_default();
///     next.extend_from_slice(b"item\n");
///     if kv::compare_and_set("list", seen.as_deref(), &next)? {
///         break;
///     }
/// }
/// # Ok(()) }
/// ```
pub fn compare_and_set(key: &str, expected: Option<&[u8]>, value: impl AsRef<[u8]>) -> Result<bool> {
    let value = value.as_ref();
    let (expected_ptr, expected_len) = match expected {
        Some(bytes) => (bytes.as_ptr(), bytes.len()),
        None => (std::ptr::null(), usize::MAX),
    };
    let mut swapped: u32 = 0;
    check(unsafe {
        sys::kv_cas(key.as_ptr(), key.len(), expected_ptr, expected_len, value.as_ptr(), value.len(), &mut swapped)
    })?;
    Ok(swapped == 1)
}
