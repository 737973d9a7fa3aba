//! code-review: a GitHub App agent that reviews pull requests with an LLM and deterministic checks.
//!
//! Triggers: `pull_request` opened / reopened / synchronize / ready_for_review (drafts skipped unless
//! `review_drafts`), and `issue_comment` starting with the trigger phrase (`/review` by default, any
//! case) on a pull request. Comments on plain issues, the bot's own comments and (unless
//! `review_bot_prs`) PRs opened by bots are skipped with a reason in the run's output.
//!
//! Output: one summary comment per PR (found again through a hidden marker, edited in place), one
//! GitHub review carrying the inline findings, and an error note in place of the placeholder when the
//! run fails. Redelivery changes nothing: the delivery id and the reviewed head sha are kept in kv.
//!
//! Config (flows.yaml `config:`): trigger_phrase, review_drafts, review_bot_prs, ignore (globs, replace
//! the defaults), extra_ignore (globs, added), max_patch_tokens (total diff budget), chunk_tokens (per
//! LLM call), max_calls, max_findings, answer_tokens, language, skip_labels, skip_branches (globs),
//! skip_title_prefixes (default `[skip review]`).

mod checks;
mod diff;
mod glob;
mod render;
mod review;

use serde_json::{json, Value};
use wasmflow::github::{self, Request};
use wasmflow::{config, event, kv, output, Error};

const MARKER: &str = "<!-- wasmflow:code-review -->";
const DEFAULT_IGNORE: &[&str] = &[
    "*.lock", "package-lock.json", "pnpm-lock.yaml", "yarn.lock", "go.sum", "poetry.lock", "Pipfile.lock",
    "composer.lock", "Gemfile.lock", "vendor/", "third_party/", "node_modules/", "dist/", "*.min.js", "*.min.css",
    "*.map", "**/generated/**", "*.generated.*", "*_generated.*", "*.pb.go", "*_pb2.py", "*.snap", "*.svg",
];

/// The flow's settings, with defaults that suit a mid-size hosted model.
pub struct Config {
    pub trigger_phrase: String,
    pub review_drafts: bool,
    pub review_bot_prs: bool,
    pub ignore: Vec<String>,
    pub budget: diff::Budget,
    pub max_findings: usize,
    pub answer_tokens: u32,
    pub language: Option<String>,
    /// PRs not reviewed automatically (a `/review` command still reviews them).
    pub skip_labels: Vec<String>,
    pub skip_branches: Vec<String>,
    pub skip_title_prefixes: Vec<String>,
}

fn cfg_str(key: &str) -> Option<String> {
    config::get(key).ok().flatten().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

fn cfg_bool(key: &str, default: bool) -> bool {
    match cfg_str(key) {
        Some(v) => matches!(v.to_ascii_lowercase().as_str(), "true" | "yes" | "1" | "on"),
        None => default,
    }
}

fn cfg_num(key: &str, default: usize) -> usize {
    cfg_str(key).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn cfg_list(key: &str) -> Option<Vec<String>> {
    let raw = cfg_str(key)?;
    match serde_json::from_str::<Vec<String>>(&raw) {
        Ok(list) => Some(list),
        Err(_) => Some(raw.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()),
    }
}

impl Config {
    fn load() -> Config {
        let mut ignore: Vec<String> = cfg_list("ignore").unwrap_or_else(|| DEFAULT_IGNORE.iter().map(|s| s.to_string()).collect());
        ignore.extend(cfg_list("extra_ignore").unwrap_or_default());
        // Size each call to the model's context when the host knows it (local models), leaving room
        // for the instructions and the answer.
        let context = wasmflow::llm::info().ok().and_then(|i| i.chat).and_then(|c| c.context).map(|c| c as usize);
        let answer_tokens = cfg_num("answer_tokens", 700) as u32;
        let default_chunk = match context {
            Some(ctx) => ctx.saturating_sub(answer_tokens as usize + 700).max(256).min(12_000),
            None => 12_000,
        };
        let chunk_tokens = cfg_num("chunk_tokens", default_chunk).min(default_chunk.max(256));
        Config {
            trigger_phrase: cfg_str("trigger_phrase").unwrap_or_else(|| "/review".to_string()),
            review_drafts: cfg_bool("review_drafts", false),
            review_bot_prs: cfg_bool("review_bot_prs", false),
            ignore,
            budget: diff::Budget {
                total_tokens: cfg_num("max_patch_tokens", 24_000),
                chunk_tokens,
                max_chunks: cfg_num("max_calls", 4).max(1),
            },
            max_findings: cfg_num("max_findings", 10),
            answer_tokens,
            language: cfg_str("language"),
            skip_labels: cfg_list("skip_labels").unwrap_or_default(),
            skip_branches: cfg_list("skip_branches").unwrap_or_default(),
            skip_title_prefixes: cfg_list("skip_title_prefixes").unwrap_or_else(|| vec!["[skip review]".to_string()]),
        }
    }
}

/// Why this run reviews, or why it does nothing.
enum Decision {
    Skip(String),
    Review { number: u64, command: bool, comment_id: Option<u64>, pr: Option<Value> },
}

fn is_bot(user: &Value, bot_login: &str) -> bool {
    let login = user["login"].as_str().unwrap_or("");
    (!bot_login.is_empty() && login.eq_ignore_ascii_case(bot_login)) || user["type"].as_str() == Some("Bot") || login.ends_with("[bot]")
}

fn decide(name: &str, payload: &Value, cfg: &Config, bot_login: &str) -> Decision {
    let action = payload["action"].as_str().unwrap_or("");
    match name {
        "pull_request" => {
            if !["opened", "reopened", "synchronize", "ready_for_review"].contains(&action) {
                return Decision::Skip(format!("pull_request.{} is not reviewed", action));
            }
            let pr = &payload["pull_request"];
            if pr["draft"].as_bool().unwrap_or(false) && !cfg.review_drafts {
                return Decision::Skip("draft pull request (set review_drafts: true to review drafts)".to_string());
            }
            if is_bot(&pr["user"], bot_login) && !cfg.review_bot_prs {
                return Decision::Skip(format!(
                    "pull request opened by bot {} (set review_bot_prs: true to review them)",
                    pr["user"]["login"].as_str().unwrap_or("?")
                ));
            }
            let title = pr["title"].as_str().unwrap_or("").to_lowercase();
            if let Some(prefix) = cfg.skip_title_prefixes.iter().find(|p| !p.is_empty() && title.starts_with(&p.to_lowercase())) {
                return Decision::Skip(format!("title starts with {:?} (skip_title_prefixes)", prefix));
            }
            let labels: Vec<&str> = pr["labels"].as_array().map(|a| a.iter().filter_map(|l| l["name"].as_str()).collect()).unwrap_or_default();
            if let Some(label) = cfg.skip_labels.iter().find(|l| labels.iter().any(|x| x.eq_ignore_ascii_case(l))) {
                return Decision::Skip(format!("labelled {} (skip_labels)", label));
            }
            let branch = pr["head"]["ref"].as_str().unwrap_or("");
            if let Some(pattern) = cfg.skip_branches.iter().find(|g| glob::matches(g, branch)) {
                return Decision::Skip(format!("branch {} matches {} (skip_branches)", branch, pattern));
            }
            match pr["number"].as_u64() {
                Some(number) => Decision::Review { number, command: false, comment_id: None, pr: Some(pr.clone()) },
                None => Decision::Skip("payload has no pull_request.number".to_string()),
            }
        }
        "issue_comment" => {
            if action != "created" {
                return Decision::Skip(format!("issue_comment.{} is not a command", action));
            }
            let comment = &payload["comment"];
            if is_bot(&comment["user"], bot_login) {
                return Decision::Skip("comment written by a bot (never a trigger)".to_string());
            }
            let body = comment["body"].as_str().unwrap_or("").trim_start();
            let phrase = cfg.trigger_phrase.to_lowercase();
            let head: String = body.chars().take(phrase.chars().count()).collect();
            if head.to_lowercase() != phrase {
                return Decision::Skip("comment does not start with the trigger phrase".to_string());
            }
            if payload["issue"]["pull_request"].is_null() {
                return Decision::Skip("comment is on an issue, not a pull request".to_string());
            }
            match payload["issue"]["number"].as_u64() {
                Some(number) => Decision::Review { number, command: true, comment_id: comment["id"].as_u64(), pr: None },
                None => Decision::Skip("payload has no issue.number".to_string()),
            }
        }
        other => Decision::Skip(format!("event {} is not handled", other)),
    }
}

/// The reviewed state of one PR, kept in kv.
#[derive(Default, Clone)]
struct PrState {
    sha: String,
    comment_id: Option<u64>,
    posted: Vec<String>,
}

/// kv is per flow, and one App serves many repositories: keys carry the repository.
fn pr_key(repo: &str, number: u64) -> String {
    format!("pr/{}/{}", repo.to_ascii_lowercase(), number)
}

impl PrState {
    fn load(repo: &str, number: u64) -> PrState {
        let v: Value = kv::get_json(&pr_key(repo, number)).ok().flatten().unwrap_or(Value::Null);
        PrState {
            sha: v["sha"].as_str().unwrap_or("").to_string(),
            comment_id: v["comment_id"].as_u64(),
            posted: v["posted"].as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect()).unwrap_or_default(),
        }
    }

    fn save(&self, repo: &str, number: u64) -> wasmflow::Result<()> {
        let mut posted = self.posted.clone();
        if posted.len() > 300 {
            posted.drain(..posted.len() - 300);
        }
        kv::set_json(&pr_key(repo, number), &json!({"sha": self.sha, "comment_id": self.comment_id, "posted": posted}))
    }
}

/// A failure with what to say about it in the PR and whether a retry may help.
struct Failure {
    note: String,
    transient: bool,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        let transient = matches!(e, Error::Upstream | Error::Timeout | Error::Limit | Error::Internal);
        Failure { note: e.to_string(), transient }
    }
}

fn gh_ok(resp: github::Response, what: &str) -> Result<github::Response, Failure> {
    if resp.is_success() {
        return Ok(resp);
    }
    Err(Failure {
        note: format!("GitHub answered {} to {}: {}", resp.status, what, resp.error_message()),
        transient: resp.status >= 500 || resp.status == 429,
    })
}

struct Ctx {
    number: u64,
    head_sha: String,
    delivery: String,
    attempt: u32,
    comment_id: Option<u64>,
    bot_login: String,
    repo: String,
    /// The reviewed head recorded in kv when this run started.
    started_sha: String,
    /// The deterministic checks, rendered as soon as they exist, so an error note still carries them.
    checks_md: String,
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(7)]
}

fn set_comment(ctx: &mut Ctx, body: &str) -> Result<u64, Failure> {
    let body = format!("{}\n{}", body, MARKER);
    if let Some(id) = ctx.comment_id {
        let resp = Request::patch(&format!("/repos/{{repo}}/issues/comments/{}", id)).json(&json!({"body": body})).send()?;
        if resp.status != 404 {
            gh_ok(resp, "updating the review comment")?;
            return Ok(id);
        }
        // Deleted by someone: fall through and write a new one.
    }
    let resp = Request::post(&format!("/repos/{{repo}}/issues/{}/comments", ctx.number)).json(&json!({"body": body})).send()?;
    let created: Value = gh_ok(resp, "creating the review comment")?.json()?;
    let mut id = created["id"].as_u64().unwrap_or(0);
    // Two runs for one new PR (opened, then a quick push) may both have created a comment: the oldest
    // wins, and the other run deletes its own and carries on with the oldest.
    let resp = Request::get(&format!("/repos/{{repo}}/issues/{}/comments", ctx.number)).paginate().send()?;
    if resp.is_success() {
        let comments: Vec<Value> = resp.json()?;
        let oldest = comments
            .iter()
            .filter(|c| c["body"].as_str().map(|b| b.contains(MARKER)).unwrap_or(false) && is_bot(&c["user"], &ctx.bot_login))
            .filter_map(|c| c["id"].as_u64())
            .min();
        if let Some(oldest) = oldest {
            if oldest != id {
                let _ = Request::delete(&format!("/repos/{{repo}}/issues/comments/{}", id)).send();
                id = oldest;
                let resp = Request::patch(&format!("/repos/{{repo}}/issues/comments/{}", id)).json(&json!({"body": body})).send()?;
                gh_ok(resp, "updating the review comment")?;
            }
        }
    }
    ctx.comment_id = Some(id);
    Ok(id)
}

/// The bot's summary comment on the PR: from kv, else by its hidden marker among the PR's comments.
fn find_comment(number: u64, state: &PrState, bot_login: &str) -> Result<Option<u64>, Failure> {
    if state.comment_id.is_some() {
        return Ok(state.comment_id);
    }
    let resp = Request::get(&format!("/repos/{{repo}}/issues/{}/comments", number)).paginate().send()?;
    let comments: Vec<Value> = gh_ok(resp, "listing comments")?.json()?;
    Ok(comments
        .iter()
        .find(|c| c["body"].as_str().map(|b| b.contains(MARKER)).unwrap_or(false) && is_bot(&c["user"], bot_login))
        .and_then(|c| c["id"].as_u64()))
}

fn main() {
    match run() {
        Ok(summary) => {
            let _ = output::set_json(&summary);
        }
        Err(f) => {
            wasmflow::error!("review failed: {}", f.note);
            let _ = output::set_json(&json!({"action": "failed", "error": f.note, "transient": f.transient}));
            // Exit non-zero only when a retry may help: the platform retries runs that end in error.
            std::process::exit(if f.transient { 1 } else { 0 });
        }
    }
}

fn run() -> Result<Value, Failure> {
    let name = event::name()?;
    let payload = event::json()?;
    let info = wasmflow::run_info()?;
    let gh = github::info()?;
    let bot_login = gh.bot_login.clone().unwrap_or_default();
    let cfg = Config::load();

    let (number, command, command_comment, pr_payload) = match decide(&name, &payload, &cfg, &bot_login) {
        Decision::Skip(reason) => {
            wasmflow::info!("skipped: {}", reason);
            return Ok(json!({"action": "skipped", "reason": reason}));
        }
        Decision::Review { number, command, comment_id, pr } => (number, command, comment_id, pr),
    };
    let delivery = info.idempotency_key.clone();
    let delivery_key = format!("delivery/{}", delivery);
    if kv::get(&delivery_key)?.is_some() {
        return Ok(json!({"action": "skipped", "reason": "delivery already handled", "delivery": delivery}));
    }
    if command {
        if let Some(id) = command_comment {
            // Acknowledge the command at once; a failure here is cosmetic.
            let _ = Request::post(&format!("/repos/{{repo}}/issues/comments/{}/reactions", id)).json(&json!({"content": "eyes"})).send();
        }
    }
    // The pull request as it is now, not as the delivery saw it: deliveries queue, and a newer push may
    // already be there. A run for a head that is no longer the head leaves the review to the newer run.
    let pr: Value = gh_ok(Request::get(&format!("/repos/{{repo}}/pulls/{}", number)).send()?, "reading the pull request")?.json()?;
    let head_sha = pr["head"]["sha"].as_str().unwrap_or("").to_string();
    if let Some(event_pr) = &pr_payload {
        let event_sha = event_pr["head"]["sha"].as_str().unwrap_or("");
        if !event_sha.is_empty() && event_sha != head_sha {
            kv::set(&delivery_key, "superseded")?;
            return Ok(json!({"action": "skipped", "reason": "superseded by a newer push", "sha": event_sha, "head": head_sha}));
        }
    }
    let repo = gh.repository.clone().unwrap_or_default();
    let mut state = PrState::load(&repo, number);
    if !command && state.sha == head_sha && !head_sha.is_empty() {
        kv::set(&delivery_key, "skipped")?;
        return Ok(json!({"action": "skipped", "reason": "this head commit was already reviewed", "sha": head_sha}));
    }
    let mut ctx = Ctx { number, head_sha: head_sha.clone(), delivery: delivery.clone(), attempt: info.attempt, comment_id: None, bot_login: bot_login.clone(),
                        repo: repo.clone(), started_sha: state.sha.clone(), checks_md: String::new() };
    ctx.comment_id = find_comment(number, &state, &bot_login)?;
    let previous_sha = state.sha.clone();

    // The placeholder: visible at once, and always replaced below (by the review or an error note).
    let placeholder = if previous_sha.is_empty() || ctx.comment_id.is_none() {
        format!("⏳ **wasmflow** is reviewing `{}`… this comment will be updated in place.", short(&head_sha))
    } else {
        format!("⏳ **wasmflow** is updating the review for `{}` (last reviewed: `{}`)…", short(&head_sha), short(&previous_sha))
    };
    set_comment(&mut ctx, &placeholder)?;
    state.comment_id = ctx.comment_id;
    state.save(&repo, number)?;

    match review_pr(&mut ctx, &cfg, &pr, &mut state, &previous_sha, command) {
        Ok(summary) => {
            if summary["action"] == "reviewed" {
                state.sha = head_sha;
                state.comment_id = ctx.comment_id;
                state.save(&repo, number)?;
            }
            kv::set(&delivery_key, "done")?;
            Ok(summary)
        }
        Err(failure) => {
            let retry = if failure.transient {
                format!(" wasmflow retries the run (this was attempt {}); this note is replaced when a retry succeeds.", ctx.attempt)
            } else {
                String::new()
            };
            let note = format!(
                "⚠️ **wasmflow** could not finish the review of `{}`: {}.{}\n\n<sub>delivery `{}`</sub>",
                short(&ctx.head_sha),
                failure.note,
                retry,
                ctx.delivery
            );
            // Replace the placeholder even when the failure was GitHub's; if that fails too, say so in the log.
            let full = format!("{}{}", note, ctx.checks_md);
            if let Err(e) = set_comment(&mut ctx, &full) {
                wasmflow::error!("could not write the error note: {}", e.note);
            }
            Err(failure)
        }
    }
}

fn review_pr(ctx: &mut Ctx, cfg: &Config, pr: &Value, state: &mut PrState, previous_sha: &str, command: bool) -> Result<Value, Failure> {
    let number = ctx.number;
    let files_resp = Request::get(&format!("/repos/{{repo}}/pulls/{}/files", number)).paginate().max_pages(30).send()?;
    let files_truncated = files_resp.truncated;
    let files: Vec<Value> = gh_ok(files_resp, "listing the pull request's files")?.json()?;
    let checks = checks::run(&files);
    let plan = diff::plan(&files, &cfg.ignore, &cfg.budget);
    ctx.checks_md = format!("\n\n{}", render::checks_section(&checks));

    // What changed since the last reviewed commit (synchronize, or a command after new pushes).
    let mut since: Option<render::Since> = None;
    if !previous_sha.is_empty() && previous_sha != ctx.head_sha {
        let resp = Request::get(&format!("/repos/{{repo}}/compare/{}...{}", previous_sha, ctx.head_sha)).send()?;
        if resp.is_success() {
            let cmp: Value = resp.json()?;
            since = Some(render::Since::from_compare(previous_sha, &ctx.head_sha, &cmp));
        } else {
            since = Some(render::Since::unknown(previous_sha, &ctx.head_sha)); // force-push: old commit gone
        }
    }

    let settings = review::Settings { max_tokens: cfg.answer_tokens, language: cfg.language.clone(), max_findings: cfg.max_findings };
    let title = pr["title"].as_str().unwrap_or("");
    let body = pr["body"].as_str().unwrap_or("");
    let outcome = if plan.chunks.is_empty() {
        review::Outcome::default()
    } else {
        review::review(title, body, &plan, &settings)?
    };

    // Inline comments: the model's findings and the secrets found, as ONE review. On synchronize only
    // files changed since the last review get new inline comments, and nothing already posted is repeated.
    let changed: Option<Vec<String>> = since.as_ref().and_then(|s| s.files.clone());
    let mut inline: Vec<Value> = Vec::new();
    let mut fingerprints: Vec<String> = Vec::new();
    let mut push = |path: &str, line: u32, body: String, inline: &mut Vec<Value>| {
        let fp = format!("{}:{}:{}", path, line, body.chars().take(60).collect::<String>());
        if state.posted.contains(&fp) || fingerprints.contains(&fp) {
            return;
        }
        if let Some(files) = &changed {
            if !command && !files.iter().any(|f| f == path) {
                return;
            }
        }
        fingerprints.push(fp);
        inline.push(json!({"path": path, "line": line, "side": "RIGHT", "body": body}));
    };
    for s in &checks.secrets {
        if plan.find(&s.path).map(|f| f.commentable().contains(&s.line)).unwrap_or(false) {
            push(&s.path, s.line, format!("🔑 **Possible secret** ({}): `{}`. Remove it and rotate the credential.", s.kind, s.preview), &mut inline);
        }
    }
    for f in &outcome.findings {
        push(&f.path, f.line, format!("**{}**: {}", f.severity, f.message), &mut inline);
    }
    let mut review_url: Option<String> = None;
    let mut inline_posted = 0usize;
    if !inline.is_empty() {
        let review_marker = format!("<!-- wasmflow:review delivery={} sha={} -->", ctx.delivery, ctx.head_sha);
        let mut already = false;
        if ctx.attempt > 1 {
            // A retried run may have posted its review before failing: look for it before posting again.
            let resp = Request::get(&format!("/repos/{{repo}}/pulls/{}/reviews", number)).paginate().send()?;
            let reviews: Vec<Value> = gh_ok(resp, "listing reviews")?.json()?;
            already = reviews.iter().any(|r| r["body"].as_str().map(|b| b.contains(&review_marker)).unwrap_or(false));
        }
        if !already {
            let body = format!("**wasmflow** left {} inline comment(s) on `{}`; the summary is in the PR conversation.\n{}", inline.len(), short(&ctx.head_sha), review_marker);
            let resp = Request::post(&format!("/repos/{{repo}}/pulls/{}/reviews", number))
                .json(&json!({"commit_id": ctx.head_sha, "event": "COMMENT", "body": body, "comments": inline}))
                .send()?;
            if resp.status == 422 {
                // A line GitHub does not accept: keep the findings in the summary instead of losing them.
                wasmflow::warn!("GitHub refused the inline comments ({}); they stay in the summary", resp.error_message());
            } else {
                let posted: Value = gh_ok(resp, "posting the review")?.json()?;
                review_url = posted["html_url"].as_str().map(String::from);
                inline_posted = inline.len();
                state.posted.extend(fingerprints.into_iter());
            }
        }
    }

    let comment = render::comment(&render::Input {
        head_sha: &ctx.head_sha,
        delivery: &ctx.delivery,
        checks: &checks,
        plan: &plan,
        outcome: &outcome,
        since: since.as_ref(),
        inline_posted,
        review_url: review_url.as_deref(),
        files_truncated,
        budget: &cfg.budget,
    });
    // Another run may have finished a review while this one ran (two pushes in quick succession): the
    // newer head's review must not be overwritten by an older one.
    let now = PrState::load(&ctx.repo, number);
    if now.sha != ctx.started_sha && now.sha != ctx.head_sha && !now.sha.is_empty() {
        let current: Value = gh_ok(Request::get(&format!("/repos/{{repo}}/pulls/{}", number)).send()?, "reading the pull request")?.json()?;
        if current["head"]["sha"].as_str().unwrap_or("") != ctx.head_sha {
            return Ok(json!({"action": "skipped", "reason": "superseded by a newer push while reviewing", "sha": ctx.head_sha}));
        }
    }
    let comment_id = set_comment(ctx, &comment)?;
    Ok(json!({
        "action": "reviewed",
        "pr": number,
        "sha": ctx.head_sha,
        "comment_id": comment_id,
        "files": files.len(),
        "files_reviewed": plan.reviewed_files(),
        "left_out": plan.left_out.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(),
        "clipped": plan.clipped.iter().map(|(p, _, _)| p.clone()).collect::<Vec<_>>(),
        "ignored": plan.ignored,
        "tokens": plan.used_tokens,
        "chunks": plan.chunks.len(),
        "llm_calls": outcome.calls,
        "llm_ms": outcome.ms,
        "findings": outcome.findings.len(),
        "inline_comments": inline_posted,
        "secrets": checks.secrets.len(),
        "todos": checks.todos.len(),
    }))
}
