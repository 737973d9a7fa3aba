//! The ABI's error codes as a Rust error type.

use std::fmt;

/// What went wrong in a call to the host. One variant per ABI error code, plus [`Error::Json`] for
/// data that arrived fine but did not decode as the caller asked.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// `1`: no such key, config value, secret, header or result handle.
    NotFound,
    /// `2`: the flow was not granted this capability (a host outside `allow.http`, an undeclared secret).
    Denied,
    /// `3`: a malformed argument (bad UTF-8, bad JSON, unknown level, bad URL, bad status code).
    Invalid,
    /// `4`: a pointer/length pair outside the guest's memory. Safe code of this crate never causes it.
    BadPointer,
    /// `5`: over a size limit (kv value, output, request or response body, log line).
    TooLarge,
    /// `6`: the remote side failed: connection refused, DNS, TLS or its own time-out.
    Upstream,
    /// `7`: a count limit was reached (outstanding handles, requests per run, log lines).
    Limit,
    /// `8`: a fault in the host; it logged the details with the run id.
    Internal,
    /// `9`: the run's deadline passed during the call.
    Timeout,
    /// A code this version of the SDK does not know (a newer host).
    Unknown(i32),
    /// Not an ABI code: the host answered, but the bytes were not the JSON the caller expected
    /// (or a value could not be serialised). The message is serde_json's.
    Json(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The error for an ABI code, or `None` for `0` (OK).
    pub fn from_code(code: i32) -> Option<Error> {
        Some(match code {
            0 => return None,
            1 => Error::NotFound,
            2 => Error::Denied,
            3 => Error::Invalid,
            4 => Error::BadPointer,
            5 => Error::TooLarge,
            6 => Error::Upstream,
            7 => Error::Limit,
            8 => Error::Internal,
            9 => Error::Timeout,
            other => Error::Unknown(other),
        })
    }

    /// The ABI code of this error (`-1` for [`Error::Json`], which has none).
    pub fn code(&self) -> i32 {
        match self {
            Error::NotFound => 1,
            Error::Denied => 2,
            Error::Invalid => 3,
            Error::BadPointer => 4,
            Error::TooLarge => 5,
            Error::Upstream => 6,
            Error::Limit => 7,
            Error::Internal => 8,
            Error::Timeout => 9,
            Error::Unknown(code) => *code,
            Error::Json(_) => -1,
        }
    }
}

/// `Ok(())` for code 0, the matching [`Error`] otherwise.
pub(crate) fn check(code: i32) -> Result<()> {
    match Error::from_code(code) {
        None => Ok(()),
        Some(err) => Err(err),
    }
}

impl From<serde_json::Error> for Error {
    fn from(err: serde_json::Error) -> Self {
        Error::Json(err.to_string())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotFound => f.write_str("not found"),
            Error::Denied => f.write_str("denied: the flow was not granted this capability"),
            Error::Invalid => f.write_str("invalid argument"),
            Error::BadPointer => f.write_str("bad pointer: range outside the guest's memory"),
            Error::TooLarge => f.write_str("too large: over a size limit"),
            Error::Upstream => f.write_str("upstream failure"),
            Error::Limit => f.write_str("limit reached"),
            Error::Internal => f.write_str("internal host error"),
            Error::Timeout => f.write_str("the run's deadline passed"),
            Error::Unknown(code) => write!(f, "unknown error code {}", code),
            Error::Json(msg) => write!(f, "JSON: {}", msg),
        }
    }
}

impl std::error::Error for Error {}
