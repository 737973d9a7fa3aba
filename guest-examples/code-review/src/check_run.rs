//! The review as a GitHub check run on the head commit (`checks: write`): in progress while the bot
//! works, then completed with a conclusion and a summary, so the PR's checks list says what happened:
//! a skipped PR shows a neutral check saying why (never a silent green), a failed run a failed one.
//!
//! A flow without `checks: write` in `allow.github` still reviews; it just makes no check calls (a
//! refused call would mark the run as denied).

use serde_json::{json, Value};
use wasmflow::github::Request;
use wasmflow::kv;

/// The check's name in the PR's checks list.
pub const NAME: &str = "wasmflow review";
/// GitHub's limit on a check run's summary.
const MAX_SUMMARY: usize = 60_000;

/// One check run (or none, when the flow may not create them).
pub struct CheckRun {
    pub id: Option<u64>,
}

fn clip(s: &str) -> String {
    if s.len() <= MAX_SUMMARY {
        return s.to_string();
    }
    let mut end = MAX_SUMMARY;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}\n\n_(cut at {} characters)_", &s[..end], MAX_SUMMARY)
}

fn send(req: Request, what: &str) -> Option<Value> {
    match req.send() {
        Ok(resp) if resp.is_success() => resp.json().ok(),
        Ok(resp) => {
            wasmflow::warn!("check run: GitHub answered {} to {}: {}", resp.status, what, resp.error_message());
            None
        }
        Err(e) => {
            wasmflow::warn!("check run: {} refused ({}); the review goes on without a check", what, e);
            None
        }
    }
}

/// May this flow write check runs (`checks: write` in its `allow.github`)?
pub fn allowed() -> bool {
    wasmflow::github::info().map(|i| i.permissions.get("checks").map(|p| p == "write").unwrap_or(false)).unwrap_or(false)
}

impl CheckRun {
    /// An in-progress check on `head_sha`, reusing the one an earlier attempt of this delivery made.
    pub fn start(head_sha: &str, delivery: &str) -> CheckRun {
        if !allowed() {
            return CheckRun { id: None };
        }
        let key = format!("check/{}", delivery);
        let known: Option<u64> = kv::get_str(&key).ok().flatten().and_then(|s| s.parse().ok());
        if let Some(id) = known {
            let again = Request::patch(&format!("/repos/{{repo}}/check-runs/{}", id))
                .json(&json!({"status": "in_progress", "output": {"title": "Reviewing", "summary": "wasmflow is reviewing this commit."}}));
            if send(again, "restarting the check").is_some() {
                return CheckRun { id: Some(id) };
            }
        }
        let body = json!({"name": NAME, "head_sha": head_sha, "status": "in_progress", "external_id": delivery,
                          "output": {"title": "Reviewing", "summary": "wasmflow is reviewing this commit."}});
        let id = send(Request::post("/repos/{repo}/check-runs").json(&body), "creating the check").and_then(|v| v["id"].as_u64());
        if let Some(id) = id {
            let _ = kv::set(&key, id.to_string());
        }
        CheckRun { id }
    }

    /// Complete it: `conclusion` is success, neutral or failure.
    pub fn complete(&self, conclusion: &str, title: &str, summary: &str) {
        if let Some(id) = self.id {
            let body = json!({"status": "completed", "conclusion": conclusion,
                              "output": {"title": title, "summary": clip(summary)}});
            send(Request::patch(&format!("/repos/{{repo}}/check-runs/{}", id)).json(&body), "completing the check");
        }
    }

    /// A completed neutral check saying why the bot did not review `head_sha`.
    pub fn neutral(head_sha: &str, reason: &str, prefix: &str) {
        if head_sha.is_empty() || !allowed() {
            return;
        }
        let summary = format!("wasmflow did not review this commit: {}.\n\nComment `{}review` on the pull request to review it anyway.", reason, prefix);
        let body = json!({"name": NAME, "head_sha": head_sha, "status": "completed", "conclusion": "neutral",
                          "output": {"title": format!("Skipped: {}", reason.chars().take(120).collect::<String>()), "summary": summary}});
        send(Request::post("/repos/{repo}/check-runs").json(&body), "creating the skipped check");
    }
}
