//! __NAME__: a GitHub bot. It thanks whoever opens an issue or a pull request, labels new issues
//! `triage`, and answers a comment containing `/ping`.
//!
//! GitHub calls are made by the host as the flow's GitHub App; `{repo}` stands for the event's
//! repository. Try it without GitHub: `wasmflow run __NAME__ --event fixtures/__NAME__.json
//! --event-name issues --github-fixtures fixtures/github`.
use wasmflow::github::Request;
use wasmflow::serde_json::{json, Value};
use wasmflow::{event, info, output};

/// Marks this bot's comments, so a retried or replayed run does not comment twice.
const MARKER: &str = "<!-- __NAME__ -->";

/// Comment once: skipped when an earlier comment of this bot (with the marker) is already there.
fn comment(number: u64, body: &str) -> wasmflow::Result<bool> {
    let path = format!("/repos/{{repo}}/issues/{}/comments", number);
    let existing: Vec<Value> = Request::get(&path).paginate().send()?.json().unwrap_or_default();
    if existing.iter().any(|c| c["body"].as_str().map_or(false, |b| b.contains(MARKER) && b.contains(body))) {
        info!("already commented on #{}", number);
        return Ok(false);
    }
    let resp = Request::post(&path).json(&json!({ "body": format!("{}\n{}", body, MARKER) })).send()?;
    if !resp.is_success() {
        return Err(wasmflow::Error::new(wasmflow::ErrorKind::Upstream, resp.error_message()));
    }
    Ok(true)
}

fn run() -> wasmflow::Result<()> {
    let name = event::name()?;
    let body = event::json()?;
    let action = body["action"].as_str().unwrap_or("");
    let who = body["sender"]["login"].as_str().unwrap_or("there").to_string();
    let mut did: Vec<&str> = Vec::new();
    match (name.as_str(), action) {
        ("issues", "opened") => {
            let number = body["issue"]["number"].as_u64().unwrap_or(0);
            if comment(number, &format!("Thanks for the issue, @{}! A maintainer will look at it soon.", who))? {
                did.push("comment");
            }
            Request::post(&format!("/repos/{{repo}}/issues/{}/labels", number))
                .json(&json!({ "labels": ["triage"] }))
                .send()?;
            did.push("label");
        }
        ("pull_request", "opened") => {
            let number = body["pull_request"]["number"].as_u64().unwrap_or(0);
            if comment(number, &format!("Thanks for the pull request, @{}!", who))? {
                did.push("comment");
            }
        }
        ("issue_comment", "created") => {
            let text = body["comment"]["body"].as_str().unwrap_or("");
            if text.contains("/ping") && body["comment"]["user"]["type"].as_str() != Some("Bot") {
                let number = body["issue"]["number"].as_u64().unwrap_or(0);
                if comment(number, "pong")? {
                    did.push("comment");
                }
            }
        }
        _ => {}
    }
    info!("{}.{} from {}: {}", name, action, who, if did.is_empty() { "nothing to do".to_string() } else { did.join(", ") });
    output::set_json(&json!({ "event": name, "action": action, "did": did, "sender": Value::from(who) }))
}

fn main() {
    if let Err(err) = run() {
        wasmflow::error!("__NAME__ failed: {}", err);
        std::process::exit(1);
    }
}
