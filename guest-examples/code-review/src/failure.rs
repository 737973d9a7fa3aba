//! How a run fails: what to say in the pull request, and whether a retry may help.

use wasmflow::github;

/// A failure with what to say about it in the PR and whether a retry may help.
pub struct Failure {
    /// The sentence for the error note and the run's output.
    pub note: String,
    /// True when a retry may succeed (the platform retries runs that exit non-zero).
    pub transient: bool,
}

impl From<wasmflow::Error> for Failure {
    fn from(e: wasmflow::Error) -> Failure {
        Failure { note: e.to_string(), transient: e.is_transient() }
    }
}

/// `resp` if GitHub answered 2xx; otherwise a failure saying what GitHub answered to `what`.
pub fn gh_ok(resp: github::Response, what: &str) -> Result<github::Response, Failure> {
    if resp.is_success() {
        return Ok(resp);
    }
    Err(Failure {
        note: format!("GitHub answered {} to {}: {}", resp.status, what, resp.error_message()),
        transient: resp.status >= 500 || resp.status == 429,
    })
}
