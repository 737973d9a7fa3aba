//! The flow's `config:` values from flows.yaml.
//!
//! The host passes every value as text (a string as itself, anything else as its JSON text), so the
//! typed getters here parse it once, the same way for every guest. Each returns `Ok(None)` when the
//! flow does not set the key (or sets it to an empty string) and [`ErrorKind::Invalid`] with a message
//! naming the key, the expected type and the value when the value is of the wrong type:
//!
//! ```no_run
//! # fn main() -> wasmflow::Result<()> {
//! use wasmflow::config;
//! let max_calls = config::get_u64("max_calls")?.unwrap_or(4);
//! let drafts = config::get_bool("review_drafts")?.unwrap_or(false);
//! let labels = config::get_list("skip_labels")?.unwrap_or_default();
//! # Ok(()) }
//! ```

use crate::result::{into_string, lookup};
use crate::{sys, Error, ErrorKind, Result};

/// The value of `config.<key>` as a string (non-string values as their JSON text), `None` if the
/// flow does not set it.
pub fn get(key: &str) -> Result<Option<String>> {
    Ok(lookup(|out| unsafe { sys::config_get(key.as_ptr(), key.len(), out) })?.map(into_string))
}

/// The value of `config.<key>`, or `default` when the flow does not set it.
pub fn get_or(key: &str, default: &str) -> Result<String> {
    Ok(get(key)?.unwrap_or_else(|| default.to_string()))
}

/// The value of `config.<key>` with surrounding white space removed; `None` if unset or empty.
pub fn get_trimmed(key: &str) -> Result<Option<String>> {
    Ok(get(key)?.map(|v| v.trim().to_string()).filter(|v| !v.is_empty()))
}

fn wrong(key: &str, expected: &str, value: &str) -> Error {
    let shown: String = value.chars().take(80).collect();
    Error::new(ErrorKind::Invalid, format!("config.{}: expected {}, got {:?}", key, expected, shown))
}

/// `config.<key>` as a whole number (`700`, `"700"`); `-1`, `1.5` or `many` are invalid.
pub fn get_u64(key: &str) -> Result<Option<u64>> {
    match get_trimmed(key)? {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| wrong(key, "a whole number (0 or more)", &v)),
    }
}

/// `config.<key>` as a number (`0.2`, `3`).
pub fn get_f64(key: &str) -> Result<Option<f64>> {
    match get_trimmed(key)? {
        None => Ok(None),
        Some(v) => match v.parse::<f64>() {
            Ok(x) if x.is_finite() => Ok(Some(x)),
            _ => Err(wrong(key, "a number", &v)),
        },
    }
}

/// `config.<key>` as a flag: `true`/`yes`/`on`/`1` or `false`/`no`/`off`/`0`, any case.
pub fn get_bool(key: &str) -> Result<Option<bool>> {
    match get_trimmed(key)? {
        None => Ok(None),
        Some(v) => match v.to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "1" => Ok(Some(true)),
            "false" | "no" | "off" | "0" => Ok(Some(false)),
            _ => Err(wrong(key, "true or false", &v)),
        },
    }
}

/// `config.<key>` as a list of strings: a YAML list (`[a, b]`, which arrives as a JSON array) or
/// one comma-separated string (`"a, b"`; text that is not a JSON array, such as `[skip review]`, is
/// read this way). Items are trimmed and empty items dropped; an array holding anything but strings
/// and numbers is invalid.
pub fn get_list(key: &str) -> Result<Option<Vec<String>>> {
    let raw = match get_trimmed(key)? {
        None => return Ok(None),
        Some(raw) => raw,
    };
    let items: Vec<String> = match serde_json::from_str::<Vec<serde_json::Value>>(&raw) {
        Ok(values) => values
            .into_iter()
            .map(|value| match value {
                serde_json::Value::String(s) => Ok(s.trim().to_string()),
                serde_json::Value::Number(n) => Ok(n.to_string()),
                _ => Err(wrong(key, "a list of strings", &raw)),
            })
            .collect::<Result<Vec<String>>>()?,
        Err(_) => raw.split(',').map(|s| s.trim().to_string()).collect(),
    };
    Ok(Some(items.into_iter().filter(|s| !s.is_empty()).collect()))
}

/// `config.<key>` deserialised from its JSON text into `T` (a YAML mapping or list in flows.yaml
/// arrives as JSON): for structured settings such as `labels: {bug: [crash, panic]}`.
pub fn get_json<T: serde::de::DeserializeOwned>(key: &str) -> Result<Option<T>> {
    match get_trimmed(key)? {
        None => Ok(None),
        Some(raw) => serde_json::from_str(&raw)
            .map(Some)
            .map_err(|err| Error::new(ErrorKind::Invalid, format!("config.{}: {}", key, err))),
    }
}
