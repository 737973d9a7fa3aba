//! The flow's `config:` values from flows.yaml.

use crate::result::{into_string, lookup};
use crate::{sys, Result};

/// The value of `config.<key>` as a string (non-string values as their JSON text), `None` if the
/// flow does not set it.
pub fn get(key: &str) -> Result<Option<String>> {
    Ok(lookup(|out| unsafe { sys::config_get(key.as_ptr(), key.len(), out) })?.map(into_string))
}

/// The value of `config.<key>`, or `default` when the flow does not set it.
pub fn get_or(key: &str, default: &str) -> Result<String> {
    Ok(get(key)?.unwrap_or_else(|| default.to_string()))
}
