//! The ABI's error codes, with the host's message, as a Rust error type.

use std::fmt;

use crate::nn;
use crate::sys;

/// What kind of failure: one variant per ABI error code, plus [`ErrorKind::Json`] for data that
/// arrived fine but did not decode as the caller asked and [`ErrorKind::Nn`] for WASI-NN calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// `1`: no such key, config value, secret, header or result handle.
    NotFound,
    /// `2`: the flow was not granted this capability (a host outside `allow.http`, an undeclared secret).
    Denied,
    /// `3`: a malformed argument (bad UTF-8, bad JSON, unknown level, bad URL, bad status code), or a
    /// config value of the wrong type ([`crate::config::get_u64`] and friends).
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
    /// Not an ABI code: the host answered, but the bytes were not the JSON the caller expected (or a
    /// value could not be serialised). The message is serde_json's.
    Json,
    /// A WASI-NN call failed (converted from [`nn::Error`]); the backend code, if the host sent one.
    Nn(Option<nn::BackendError>),
}

impl ErrorKind {
    /// The kind of an ABI code, or `None` for `0` (OK).
    pub fn from_code(code: i32) -> Option<ErrorKind> {
        Some(match code {
            0 => return None,
            1 => ErrorKind::NotFound,
            2 => ErrorKind::Denied,
            3 => ErrorKind::Invalid,
            4 => ErrorKind::BadPointer,
            5 => ErrorKind::TooLarge,
            6 => ErrorKind::Upstream,
            7 => ErrorKind::Limit,
            8 => ErrorKind::Internal,
            9 => ErrorKind::Timeout,
            other => ErrorKind::Unknown(other),
        })
    }

    /// The ABI code (`-1` for [`ErrorKind::Json`] and [`ErrorKind::Nn`], which have none).
    pub fn code(&self) -> i32 {
        match self {
            ErrorKind::NotFound => 1,
            ErrorKind::Denied => 2,
            ErrorKind::Invalid => 3,
            ErrorKind::BadPointer => 4,
            ErrorKind::TooLarge => 5,
            ErrorKind::Upstream => 6,
            ErrorKind::Limit => 7,
            ErrorKind::Internal => 8,
            ErrorKind::Timeout => 9,
            ErrorKind::Unknown(code) => *code,
            ErrorKind::Json | ErrorKind::Nn(_) => -1,
        }
    }

    /// Might the same call succeed later (a remote failure, the deadline, a limit, a host fault)?
    pub fn is_transient(&self) -> bool {
        matches!(self, ErrorKind::Upstream | ErrorKind::Timeout | ErrorKind::Limit | ErrorKind::Internal)
    }

    fn describe(&self) -> String {
        match self {
            ErrorKind::NotFound => "not found".to_string(),
            ErrorKind::Denied => "denied: the flow was not granted this capability".to_string(),
            ErrorKind::Invalid => "invalid argument".to_string(),
            ErrorKind::BadPointer => "bad pointer: range outside the guest's memory".to_string(),
            ErrorKind::TooLarge => "too large: over a size limit".to_string(),
            ErrorKind::Upstream => "upstream failure".to_string(),
            ErrorKind::Limit => "limit reached".to_string(),
            ErrorKind::Internal => "internal host error".to_string(),
            ErrorKind::Timeout => "the run's deadline passed".to_string(),
            ErrorKind::Unknown(code) => format!("unknown error code {}", code),
            ErrorKind::Json => "JSON".to_string(),
            ErrorKind::Nn(_) => "wasi-nn".to_string(),
        }
    }
}

/// A failed call: its [`ErrorKind`] and, when there is one, the host's (or decoder's) message saying
/// why, e.g. `wasmflow::http_request: https://evil.example is not in allow.http`.
///
/// Compare kinds with [`Error::kind`]; `Display` shows the code's meaning and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    message: Option<String>,
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An error of `kind` with a message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error { kind, message: Some(message.into()) }
    }

    /// The error for an ABI code, without a message, or `None` for `0` (OK).
    pub fn from_code(code: i32) -> Option<Error> {
        ErrorKind::from_code(code).map(Error::from)
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The ABI code of this error (`-1` for JSON and WASI-NN errors, which have none).
    pub fn code(&self) -> i32 {
        self.kind.code()
    }

    /// Why it failed, as the host (or the JSON decoder) said, if it said.
    pub fn message(&self) -> Option<&str> {
        self.message.as_deref()
    }

    /// See [`ErrorKind::is_transient`].
    pub fn is_transient(&self) -> bool {
        self.kind.is_transient()
    }
}

impl From<ErrorKind> for Error {
    fn from(kind: ErrorKind) -> Error {
        Error { kind, message: None }
    }
}

/// The host's message for the call that just failed (`last_error`), read at once so no other call
/// replaces it. `None` if the host has none (or is older than `last_error`).
fn host_message() -> Option<String> {
    let mut descriptor = [0u8; 8];
    if unsafe { sys::last_error(descriptor.as_mut_ptr()) } != sys::OK {
        return None;
    }
    let handle = u32::from_le_bytes([descriptor[0], descriptor[1], descriptor[2], descriptor[3]]);
    let len = u32::from_le_bytes([descriptor[4], descriptor[5], descriptor[6], descriptor[7]]) as usize;
    let mut buf = vec![0u8; len];
    if unsafe { sys::result_read(handle, buf.as_mut_ptr(), len) } != sys::OK {
        return None;
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// `Ok(())` for code 0; otherwise the matching [`Error`], carrying the host's message.
pub(crate) fn check(code: i32) -> Result<()> {
    match ErrorKind::from_code(code) {
        None => Ok(()),
        Some(kind) => Err(Error { kind, message: host_message() }),
    }
}

impl From<serde_json::Error> for Error {
    fn from(err: serde_json::Error) -> Self {
        Error::new(ErrorKind::Json, err.to_string())
    }
}

/// So `?` works on WASI-NN calls in a function returning [`Result`].
impl From<nn::Error> for Error {
    fn from(err: nn::Error) -> Self {
        Error::new(ErrorKind::Nn(err.backend()), err.to_string())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.kind, &self.message) {
            (ErrorKind::Json, Some(message)) => write!(f, "JSON: {}", message),
            (ErrorKind::Nn(_), Some(message)) => f.write_str(message),
            (kind, Some(message)) => write!(f, "{} (code {}): {}", kind.describe(), kind.code(), message),
            (kind, None) => write!(f, "{} (code {})", kind.describe(), kind.code()),
        }
    }
}

impl std::error::Error for Error {}
