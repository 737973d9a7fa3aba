//! Secrets the flow declares in `secrets:`, read from the host's environment.

use crate::result::{into_string, lookup};
use crate::{sys, Result};

/// The secret's value; `None` if declared but unset on the host, [`crate::ErrorKind::Denied`] if the flow
/// does not declare it.
pub fn get(name: &str) -> Result<Option<String>> {
    Ok(lookup(|out| unsafe { sys::secret_get(name.as_ptr(), name.len(), out) })?.map(into_string))
}
