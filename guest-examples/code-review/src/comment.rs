//! The state the bot keeps per pull request: the reviewed head and inline findings posted (in kv),
//! and its one summary comment, found again through a hidden marker and edited in place.

use serde_json::{json, Value};
use wasmflow::github::Request;
use wasmflow::kv;

use crate::decision::is_bot;
use crate::failure::{gh_ok, Failure};

/// Hidden in the summary comment so a later run finds it among the PR's comments.
pub const MARKER: &str = "<!-- wasmflow:code-review -->";
/// Inline-finding fingerprints kept per PR (the oldest are forgotten).
const MAX_POSTED: usize = 300;

/// The reviewed state of one PR, kept in kv.
#[derive(Default, Clone)]
pub struct PrState {
    /// The head commit last reviewed (empty before the first review).
    pub sha: String,
    /// The summary comment's id, once written.
    pub comment_id: Option<u64>,
    /// Fingerprints (`path:line:start of text`) of inline findings already posted.
    pub posted: Vec<String>,
}

/// kv is per flow, and one App serves many repositories: keys carry the repository.
fn pr_key(repo: &str, number: u64) -> String {
    format!("pr/{}/{}", repo.to_ascii_lowercase(), number)
}

impl PrState {
    /// The state of PR `number` of `repo`; an absent or unreadable record is a PR never reviewed.
    pub fn load(repo: &str, number: u64) -> PrState {
        let v: Value = kv::get_json(&pr_key(repo, number)).ok().flatten().unwrap_or(Value::Null);
        PrState {
            sha: v["sha"].as_str().unwrap_or("").to_string(),
            comment_id: v["comment_id"].as_u64(),
            posted: v["posted"].as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect()).unwrap_or_default(),
        }
    }

    /// Store the state, keeping the newest MAX_POSTED fingerprints.
    pub fn save(&self, repo: &str, number: u64) -> wasmflow::Result<()> {
        let mut posted = self.posted.clone();
        if posted.len() > MAX_POSTED {
            posted.drain(..posted.len() - MAX_POSTED);
        }
        kv::set_json(&pr_key(repo, number), &json!({"sha": self.sha, "comment_id": self.comment_id, "posted": posted}))
    }
}

/// The bot's summary comment on one PR.
pub struct SummaryComment {
    number: u64,
    bot_login: String,
    /// Its id, once found or written.
    pub id: Option<u64>,
}

fn is_summary(comment: &Value, bot_login: &str) -> bool {
    comment["body"].as_str().map(|b| b.contains(MARKER)).unwrap_or(false) && is_bot(&comment["user"], bot_login)
}

impl SummaryComment {
    /// The summary comment of PR `number`: from kv, else by its marker among the PR's comments.
    pub fn find(number: u64, state: &PrState, bot_login: &str) -> Result<SummaryComment, Failure> {
        let mut comment = SummaryComment { number, bot_login: bot_login.to_string(), id: state.comment_id };
        if comment.id.is_none() {
            let resp = Request::get(&format!("/repos/{{repo}}/issues/{}/comments", number)).paginate().send()?;
            let comments: Vec<Value> = gh_ok(resp, "listing comments")?.json()?;
            comment.id = comments.iter().find(|c| is_summary(c, bot_login)).and_then(|c| c["id"].as_u64());
        }
        Ok(comment)
    }

    fn update(id: u64, body: &str) -> Result<wasmflow::github::Response, Failure> {
        Ok(Request::patch(&format!("/repos/{{repo}}/issues/comments/{}", id)).json(&json!({"body": body})).send()?)
    }

    /// Write `body` (plus the marker) into the comment, creating it if there is none (or it was
    /// deleted); returns its id.
    pub fn set(&mut self, body: &str) -> Result<u64, Failure> {
        let body = format!("{}\n{}", body, MARKER);
        if let Some(id) = self.id {
            let resp = SummaryComment::update(id, &body)?;
            if resp.status != 404 {
                gh_ok(resp, "updating the review comment")?;
                return Ok(id);
            }
            // Deleted by someone: fall through and write a new one.
        }
        let resp = Request::post(&format!("/repos/{{repo}}/issues/{}/comments", self.number)).json(&json!({"body": body})).send()?;
        let created: Value = gh_ok(resp, "creating the review comment")?.json()?;
        let mut id = created["id"].as_u64().unwrap_or(0);
        // Two runs for one new PR (opened, then a quick push) may both have created a comment: the oldest
        // wins, and the other run deletes its own and carries on with the oldest.
        let resp = Request::get(&format!("/repos/{{repo}}/issues/{}/comments", self.number)).paginate().send()?;
        if resp.is_success() {
            let comments: Vec<Value> = resp.json()?;
            let oldest = comments.iter().filter(|c| is_summary(c, &self.bot_login)).filter_map(|c| c["id"].as_u64()).min();
            if let Some(oldest) = oldest {
                if oldest != id {
                    let _ = Request::delete(&format!("/repos/{{repo}}/issues/comments/{}", id)).send();
                    id = oldest;
                    gh_ok(SummaryComment::update(id, &body)?, "updating the review comment")?;
                }
            }
        }
        self.id = Some(id);
        Ok(id)
    }
}
