//! The event that started this run, and the run's identity.

use std::collections::HashMap;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::result::{call, into_string, string_map};
use crate::{sys, Result};

/// The event name: `pull_request`, `issue_comment`, `schedule`, `http`, or the name given to
/// `wasmflow run --event-name`.
pub fn name() -> Result<String> {
    call(|out| unsafe { sys::event_name(out) }).map(into_string)
}

/// The raw event body: JSON for GitHub and schedules, the request body for HTTP triggers.
pub fn body() -> Result<Vec<u8>> {
    call(|out| unsafe { sys::event_body(out) })
}

/// The event body parsed as JSON. An empty body is `null`, so HTTP triggers without a body work.
pub fn json() -> Result<serde_json::Value> {
    let body = body()?;
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(serde_json::Value::Null);
    }
    Ok(serde_json::from_slice(&body)?)
}

/// The event body deserialised into `T` (for example a struct of the GitHub payload fields you use).
pub fn parse<T: DeserializeOwned>() -> Result<T> {
    Ok(serde_json::from_slice(&body()?)?)
}

/// The event's headers, lower-case names. HTTP triggers also have `:method`, `:path` and `:query`.
pub fn headers() -> Result<HashMap<String, String>> {
    let bytes = call(|out| unsafe { sys::event_headers(out) })?;
    string_map(serde_json::from_slice(&bytes)?)
}

/// One header of the event (`name` in lower case), `None` if absent.
pub fn header(name: &str) -> Result<Option<String>> {
    Ok(headers()?.remove(name))
}

/// Who is running and why: see [`run_info`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct RunInfo {
    /// The flow's name in flows.yaml.
    pub flow: String,
    /// This run's id (also in the host's logs and `wasmflow runs`).
    pub run_id: String,
    /// 1 for the first attempt, 2 and up for retries of the same event.
    pub attempt: u32,
    /// 1, 2, ...: grows on every claim of the run, also when a shutdown or a lost worker gave it back
    /// and `attempt` stayed the same, so it tells two executions of one attempt apart.
    pub execution: u32,
    /// The same for every attempt at one event (GitHub delivery id, schedule tick, or the run id):
    /// key side effects on it so a retried run does not repeat them.
    pub idempotency_key: String,
    /// What started the run: `github`, `schedule`, `http`, `manual`, ...
    pub trigger: String,
}

/// The run's identity: flow, run id, attempt, idempotency key and trigger.
pub fn run_info() -> Result<RunInfo> {
    let bytes = call(|out| unsafe { sys::run_info(out) })?;
    Ok(serde_json::from_slice(&bytes)?)
}
