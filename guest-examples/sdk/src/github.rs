//! GitHub API calls, made by the host as the flow's GitHub App installation.
//!
//! The guest never holds a token: it names a path and the host adds the installation's token, after
//! checking that the path belongs to the event's repository and that the flow's `allow.github`
//! grants the permission (`GET` needs `read`, anything else `write`). `{repo}` in a path stands for
//! the event's repository (`owner/name`).
//!
//! ```no_run
//! # fn main() -> wasmflow::Result<()> {
//! use wasmflow::github::Request;
//! let files = Request::get("/repos/{repo}/pulls/7/files").paginate().send()?;
//! let diff = Request::get("/repos/{repo}/pulls/7").accept("diff").send()?.text();
//! Request::post("/repos/{repo}/issues/7/comments")
//!     .json(&serde_json::json!({"body": "Thanks!"}))
//!     .send()?;
//! # Ok(()) }
//! ```
//!
//! A 4xx or 5xx answer is a [`Response`] (check [`Response::status`]); errors are for calls the host
//! refused ([`crate::ErrorKind::Denied`]), could not make ([`crate::ErrorKind::Upstream`], including a rate
//! limit that does not fit in the run) or that ran past the deadline ([`crate::ErrorKind::Timeout`]).

use std::collections::{BTreeMap, HashMap};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::http::Method;
use crate::result::{call, call_n, into_string, response_head};
use crate::{sys, Error, Result};

/// A GitHub API request, built step by step and sent with [`Request::send`], in the same style as
/// [`crate::http::Request`] (a constructor per [`Method`], chained setters, `send`).
#[derive(Debug, Clone)]
pub struct Request {
    method: Method,
    path: String,
    query: BTreeMap<String, serde_json::Value>,
    accept: Option<String>,
    body: Option<Vec<u8>>,
    paginate: bool,
    max_pages: Option<u32>,
    pending: Option<Error>,
}

impl Request {
    /// A request with any method to a path such as `/repos/{repo}/pulls/1`.
    pub fn new(method: Method, path: &str) -> Request {
        Request {
            method,
            path: path.to_string(),
            query: BTreeMap::new(),
            accept: None,
            body: None,
            paginate: false,
            max_pages: None,
            pending: None,
        }
    }

    /// A GET request.
    pub fn get(path: &str) -> Request {
        Request::new(Method::Get, path)
    }

    /// A POST request.
    pub fn post(path: &str) -> Request {
        Request::new(Method::Post, path)
    }

    /// A PATCH request.
    pub fn patch(path: &str) -> Request {
        Request::new(Method::Patch, path)
    }

    /// A PUT request.
    pub fn put(path: &str) -> Request {
        Request::new(Method::Put, path)
    }

    /// A DELETE request.
    pub fn delete(path: &str) -> Request {
        Request::new(Method::Delete, path)
    }

    /// Change the method.
    pub fn method(mut self, method: Method) -> Request {
        self.method = method;
        self
    }

    /// Add a query parameter (`per_page`, `state`, `q`, ...).
    pub fn query(mut self, name: &str, value: impl Into<serde_json::Value>) -> Request {
        self.query.insert(name.to_string(), value.into());
        self
    }

    /// The media type: `json` (default), `diff`, `patch`, `raw`, `text`, `full`, or a full
    /// `application/vnd.github...` type.
    pub fn accept(mut self, media: &str) -> Request {
        self.accept = Some(media.to_string());
        self
    }

    /// The JSON body.
    pub fn json<T: Serialize + ?Sized>(mut self, value: &T) -> Request {
        match serde_json::to_vec(value) {
            Ok(body) => self.body = Some(body),
            Err(err) => self.pending = Some(err.into()),
        }
        self
    }

    /// Follow `Link: rel="next"` and return every page as one JSON array (or one `items` array for
    /// search results). `per_page` defaults to 100.
    pub fn paginate(mut self) -> Request {
        self.paginate = true;
        self
    }

    /// At most this many pages when paginating (default 10, host maximum 30); the response's
    /// [`Response::truncated`] says whether more were left.
    pub fn max_pages(mut self, pages: u32) -> Request {
        self.max_pages = Some(pages);
        self
    }

    /// Send the request; the host makes it, with rate-limit waits that fit in the run's deadline.
    pub fn send(&self) -> Result<Response> {
        if let Some(err) = &self.pending {
            return Err(err.clone());
        }
        let mut spec = serde_json::json!({"method": self.method.as_str(), "path": self.path, "paginate": self.paginate});
        if !self.query.is_empty() {
            spec["query"] = serde_json::to_value(&self.query)?;
        }
        if let Some(accept) = &self.accept {
            spec["accept"] = accept.clone().into();
        }
        if let Some(pages) = self.max_pages {
            spec["max_pages"] = pages.into();
        }
        let spec = serde_json::to_vec(&spec)?;
        let empty: Vec<u8> = Vec::new();
        let body = self.body.as_ref().unwrap_or(&empty);
        let mut results = call_n(2, |out| unsafe {
            sys::github_request(spec.as_ptr(), spec.len(), body.as_ptr(), body.len(), out)
        })?;
        let body = results.pop().unwrap_or_default();
        let (status, headers, head) = response_head(&results.pop().unwrap_or_default())?;
        Ok(Response {
            status,
            headers,
            pages: head.get("pages").and_then(|p| p.as_u64()).unwrap_or(1) as u32,
            truncated: head.get("truncated").and_then(|t| t.as_bool()).unwrap_or(false),
            body,
        })
    }
}

/// A GitHub API response.
#[derive(Debug, Clone)]
pub struct Response {
    /// The HTTP status (of the first page when paginating).
    pub status: u16,
    /// Selected headers, lower-case names: `link`, `etag`, `x-ratelimit-*`, `content-type`...
    pub headers: HashMap<String, String>,
    /// How many pages were fetched.
    pub pages: u32,
    /// True if pagination stopped at `max_pages` with more pages left.
    pub truncated: bool,
    /// The body (JSON, or diff text for `accept("diff")`).
    pub body: Vec<u8>,
}

impl Response {
    /// True for a 2xx status.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as text.
    pub fn text(&self) -> String {
        into_string(self.body.clone())
    }

    /// The body deserialised from JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        Ok(serde_json::from_slice(&self.body)?)
    }

    /// GitHub's `message` for an error response (or the start of the body).
    pub fn error_message(&self) -> String {
        match serde_json::from_slice::<serde_json::Value>(&self.body) {
            Ok(v) => match v.get("message").and_then(|m| m.as_str()) {
                Some(m) => m.to_string(),
                None => v.to_string().chars().take(200).collect(),
            },
            Err(_) => self.text().chars().take(200).collect(),
        }
    }
}

/// What the host knows about this run's GitHub context.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Info {
    /// The event's repository, `owner/name`.
    pub repository: Option<String>,
    /// The App installation that received the event.
    pub installation_id: Option<u64>,
    /// The App's id.
    pub app_id: Option<String>,
    /// The App's bot account, e.g. `my-app[bot]`: comments it wrote are the agent's own.
    pub bot_login: Option<String>,
    /// The API base URL.
    pub api_url: Option<String>,
    /// The flow's `allow.github` permissions.
    pub permissions: BTreeMap<String, String>,
}

/// The run's GitHub context: repository, installation, the App's bot login.
pub fn info() -> Result<Info> {
    let bytes = call(|out| unsafe { sys::github_info(out) })?;
    Ok(serde_json::from_slice(&bytes)?)
}
