//! Outbound HTTP, limited to the origins in the flow's `allow.http`.
//!
//! ```no_run
//! # fn main() -> wasmflow::Result<()> {
//! use wasmflow::http::Request;
//! let resp = Request::get("https://api.example.com/items")
//!     .header("accept", "application/json")
//!     .timeout_ms(5_000)
//!     .send()?;
//! if resp.is_success() {
//!     let items: serde_json::Value = resp.json()?;
//! }
//! # Ok(()) }
//! ```
//!
//! A 4xx or 5xx answer is a [`Response`], not an error: check [`Response::status`]. Errors are for
//! requests that got no answer ([`crate::ErrorKind::Upstream`], [`crate::ErrorKind::Timeout`]) or were
//! refused ([`crate::ErrorKind::Denied`] for an origin the flow does not allow).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::result::{call_n, into_string, response_head};
use crate::{sys, Error, Result};

/// An HTTP method, for [`Request::new`] here and in [`crate::github::Request::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// `GET`
    Get,
    /// `HEAD`
    Head,
    /// `POST`
    Post,
    /// `PUT`
    Put,
    /// `PATCH`
    Patch,
    /// `DELETE`
    Delete,
    /// `OPTIONS`
    Options,
}

impl Method {
    /// The method's name as it goes on the wire (`"GET"`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
            Method::Options => "OPTIONS",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An HTTP request, built step by step and sent with [`Request::send`].
///
/// The builder style is the same as [`crate::github::Request`]'s: a constructor per method (or
/// [`Request::new`] with a [`Method`]), then chained setters, then `send`. A body that fails to
/// serialise in [`Request::json`] is reported by `send`, so the chain never breaks.
#[derive(Debug, Clone)]
pub struct Request {
    method: Method,
    url: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
    timeout_ms: Option<u64>,
    pending: Option<Error>,
}

impl Request {
    /// A request with any method.
    pub fn new(method: Method, url: &str) -> Request {
        Request {
            method,
            url: url.to_string(),
            headers: BTreeMap::new(),
            body: Vec::new(),
            timeout_ms: None,
            pending: None,
        }
    }

    /// A GET request.
    pub fn get(url: &str) -> Request {
        Request::new(Method::Get, url)
    }

    /// A POST request.
    pub fn post(url: &str) -> Request {
        Request::new(Method::Post, url)
    }

    /// A PUT request.
    pub fn put(url: &str) -> Request {
        Request::new(Method::Put, url)
    }

    /// A PATCH request.
    pub fn patch(url: &str) -> Request {
        Request::new(Method::Patch, url)
    }

    /// A DELETE request.
    pub fn delete(url: &str) -> Request {
        Request::new(Method::Delete, url)
    }

    /// Change the method.
    pub fn method(mut self, method: Method) -> Request {
        self.method = method;
        self
    }

    /// Change the URL.
    pub fn url(mut self, url: &str) -> Request {
        self.url = url.to_string();
        self
    }

    /// Set a header (a later value for the same name replaces the earlier one).
    pub fn header(mut self, name: &str, value: &str) -> Request {
        self.headers.insert(name.to_ascii_lowercase(), value.to_string());
        self
    }

    /// Set the body (bytes or a string).
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Request {
        self.body = body.into();
        self
    }

    /// Set the body to `value` as JSON and `content-type: application/json`.
    pub fn json<T: Serialize + ?Sized>(mut self, value: &T) -> Request {
        match serde_json::to_vec(value) {
            Ok(body) => self.body = body,
            Err(err) => self.pending = Some(err.into()),
        }
        self.header("content-type", "application/json")
    }

    /// Give up after this long; the host also stops at the run's own deadline, whichever is first.
    pub fn timeout(self, timeout: Duration) -> Request {
        let ms = timeout.as_millis().min(u128::from(u64::MAX)) as u64;
        self.timeout_ms(ms)
    }

    /// [`Request::timeout`] in milliseconds.
    pub fn timeout_ms(mut self, ms: u64) -> Request {
        self.timeout_ms = Some(ms);
        self
    }

    /// Send the request and wait for the whole response.
    pub fn send(&self) -> Result<Response> {
        if let Some(err) = &self.pending {
            return Err(err.clone());
        }
        let mut spec = serde_json::json!({
            "method": self.method.as_str(),
            "url": self.url,
            "headers": self.headers,
        });
        if let Some(ms) = self.timeout_ms {
            spec["timeout_ms"] = ms.into();
        }
        let spec = serde_json::to_vec(&spec)?;
        let mut results = call_n(2, |out| unsafe {
            sys::http_request(spec.as_ptr(), spec.len(), self.body.as_ptr(), self.body.len(), out)
        })?;
        let body = results.pop().unwrap_or_default();
        let (status, headers, _) = response_head(&results.pop().unwrap_or_default())?;
        Ok(Response { status, headers, body })
    }
}

/// A complete HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Headers with lower-case names.
    pub headers: HashMap<String, String>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// True for a 2xx status.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// A header by name (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(&name.to_ascii_lowercase()).map(String::as_str)
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        into_string(self.body.clone())
    }

    /// The body deserialised from JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        Ok(serde_json::from_slice(&self.body)?)
    }
}
