//! Key-value storage private to the flow, kept across runs and restarts.
//!
//! Keys are up to 512 bytes, values up to 1 MiB ([`crate::Error::TooLarge`]).

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
