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
//! skip_title_prefixes (default `[skip review]`). A value of the wrong type fails the run, naming it.
//!
//! Modules: `config` reads the settings; `decision` decides whether and what to review (pure, with unit
//! tests); `comment` keeps the per-PR state in kv and the summary comment; `diff`, `checks`, `review`
//! and `render` plan the diff, run the deterministic checks, ask the model and write the comment;
//! `failure` says what a failed run tells the PR. This file runs them in order.

mod checks;
mod comment;
mod config;
mod decision;
mod diff;
mod failure;
mod glob;
mod render;
mod review;

use serde_json::{json, Value};
use wasmflow::github::{self, Request};
use wasmflow::{event, kv, output};

use comment::{PrState, SummaryComment};
use config::Config;
use decision::{decide, Decision};
use failure::{gh_ok, Failure};

/// What one review run knows about the PR it reviews.
struct Ctx {
    number: u64,
    head_sha: String,
    delivery: String,
    attempt: u32,
    /// The bot's summary comment on the PR.
    comment: SummaryComment,
    repo: String,
    /// The reviewed head recorded in kv when this run started.
    started_sha: String,
    /// The deterministic checks, rendered as soon as they exist, so an error note still carries them.
    checks_md: String,
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(7)]
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
    let cfg = Config::load()?;

    let (number, command, command_comment, pr_payload) = match decide(&name, &payload, &cfg.rules, &bot_login) {
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
    let comment = SummaryComment::find(number, &state, &bot_login)?;
    let mut ctx = Ctx { number, head_sha: head_sha.clone(), delivery: delivery.clone(), attempt: info.attempt, comment,
                        repo: repo.clone(), started_sha: state.sha.clone(), checks_md: String::new() };
    let previous_sha = state.sha.clone();

    // The placeholder: visible at once, and always replaced below (by the review or an error note).
    let placeholder = if previous_sha.is_empty() || ctx.comment.id.is_none() {
        format!("⏳ **wasmflow** is reviewing `{}`… this comment will be updated in place.", short(&head_sha))
    } else {
        format!("⏳ **wasmflow** is updating the review for `{}` (last reviewed: `{}`)…", short(&head_sha), short(&previous_sha))
    };
    ctx.comment.set(&placeholder)?;
    state.comment_id = ctx.comment.id;
    state.save(&repo, number)?;

    match review_pr(&mut ctx, &cfg, &pr, &mut state, &previous_sha, command) {
        Ok(summary) => {
            if summary["action"] == "reviewed" {
                state.sha = head_sha;
                state.comment_id = ctx.comment.id;
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
            if let Err(e) = ctx.comment.set(&full) {
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
    let comment_id = ctx.comment.set(&comment)?;
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
