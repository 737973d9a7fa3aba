//! code-review: a GitHub App agent that reviews pull requests with an LLM and deterministic checks.
//!
//! Triggers: `pull_request` opened / reopened / synchronize / ready_for_review, and `issue_comment`
//! commands on a pull request (`/review`, `/review full`, `/describe`, `/ask QUESTION`, `/pause`,
//! `/resume`, `/help`; the `/` is the configurable `trigger_phrase`). Commands other than `/help`
//! need write access to the repository (GitHub's collaborator-permission API says).
//!
//! Output: one summary comment per PR (found again through a hidden marker, edited in place), one
//! GitHub review carrying the grounded inline findings (a `suggestion` block where the model gave a
//! replacement inside one hunk), a check run on the head commit (neutral with the reason when the PR
//! is skipped, failed when the run fails), and an error note in place of the placeholder when the
//! run fails. Redelivery changes nothing: the delivery id and the reviewed head sha are kept in kv.
//!
//! Settings resolve in this order: `.github/wasmflow.yaml` on the PR's base branch (`repo_config`),
//! the flow's `config:` (`config`), defaults. A bad repository file is reported once, with line
//! numbers, and the review goes on with the flow's settings.
//!
//! Modules: `decision` decides whether and what to do (pure, with unit tests); `repo_config` reads
//! the repository's file; `comment` keeps the per-PR state in kv and the summary comment; `diff`,
//! `checks`, `review`, `findings` and `render` plan the diff, run the deterministic checks, ask the
//! model, ground its findings and write the comment; `check_run` reports to the checks list;
//! `commands` answers the commands; `failure` says what a failed run tells the PR.

mod check_run;
mod checks;
mod commands;
mod comment;
mod config;
mod decision;
mod diff;
mod failure;
mod findings;
mod glob;
mod render;
mod repo_config;
mod review;

use serde_json::{json, Value};
use wasmflow::github::{self, Request};
use wasmflow::{event, kv, output};

use check_run::CheckRun;
use comment::{PrState, SummaryComment};
use config::Config;
use decision::{auto_skip, command_prefix, decide, Command, Decision};
use failure::{gh_ok, Failure};
use repo_config::RepoConfig;

/// Marker of the one comment that reports problems in `.github/wasmflow.yaml`.
const CONFIG_MARKER: &str = "<!-- wasmflow:config-errors -->";

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
    /// Where the settings came from, for the footer.
    source: String,
    prefix: String,
}

/// How much a review covers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// An automatic review (opened, synchronize...): the whole PR, new inline comments only on files
    /// changed since the last review.
    Auto,
    /// `/review`: the files changed since the last reviewed commit.
    Incremental,
    /// `/review full`: the whole PR again.
    Full,
}

/// What the check run says at the end.
struct Verdict {
    conclusion: &'static str,
    title: String,
    summary: String,
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

/// FNV-1a: the same repository file is reported once per PR, not on every run.
fn fnv(text: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{:016x}", h)
}

/// Read `.github/wasmflow.yaml` from the base branch `base_ref` and apply it over `cfg`; returns
/// where the settings came from. Problems in the file are posted once as one comment; nothing here
/// stops the review.
fn repo_settings(cfg: &mut Config, number: u64, base_ref: &str, repo: &str) -> String {
    if base_ref.is_empty() {
        return "the flow's config (the pull request names no base branch)".to_string();
    }
    let readable = github::info().map(|i| i.permissions.contains_key("contents")).unwrap_or(false);
    if !readable {
        return format!("the flow's config (the flow may not read `{}`: no `contents: read` in allow.github)", repo_config::PATH);
    }
    let resp = Request::get(&format!("/repos/{{repo}}/contents/{}", repo_config::PATH)).query("ref", base_ref).accept("raw").send();
    let text = match resp {
        Ok(r) if r.is_success() => r.text(),
        Ok(r) if r.status == 404 => return format!("the flow's config (no `{}` on `{}`)", repo_config::PATH, base_ref),
        Ok(r) => {
            wasmflow::warn!("{}: GitHub answered {}: {}", repo_config::PATH, r.status, r.error_message());
            return format!("the flow's config (`{}` could not be read: GitHub answered {})", repo_config::PATH, r.status);
        }
        Err(e) => {
            wasmflow::warn!("{}: {}", repo_config::PATH, e);
            return format!("the flow's config (`{}` could not be read)", repo_config::PATH);
        }
    };
    match RepoConfig::parse(&text) {
        Ok(rc) => {
            cfg.apply(&rc);
            format!("`{}` on `{}`", repo_config::PATH, base_ref)
        }
        Err(problems) => {
            report_config_problems(number, repo, base_ref, &text, &problems);
            format!("the flow's config (`{}` on `{}` has {} problem(s); see the comment about it)", repo_config::PATH, base_ref, problems.len())
        }
    }
}

fn report_config_problems(number: u64, repo: &str, base_ref: &str, text: &str, problems: &[repo_config::Problem]) {
    let key = format!("cfgerr/{}/{}", repo.to_ascii_lowercase(), number);
    let hash = fnv(text);
    let known: Value = kv::get_json(&key).ok().flatten().unwrap_or(Value::Null);
    if known["hash"].as_str() == Some(hash.as_str()) {
        return;
    }
    let body = format!(
        "⚠️ **wasmflow** could not use `{}` on `{}`: {} problem(s). Reviews go on with the flow's settings until it is fixed.\n\n{}\n{}",
        repo_config::PATH, base_ref, problems.len(), repo_config::problems_markdown(problems), CONFIG_MARKER
    );
    let mut id = known["comment_id"].as_u64();
    if let Some(existing) = id {
        let ok = Request::patch(&format!("/repos/{{repo}}/issues/comments/{}", existing)).json(&json!({"body": body})).send().map(|r| r.is_success()).unwrap_or(false);
        if !ok {
            id = None;
        }
    }
    if id.is_none() {
        id = commands::reply(number, &body).ok();
    }
    let _ = kv::set_json(&key, &json!({"hash": hash, "comment_id": id}));
}

fn run() -> Result<Value, Failure> {
    let name = event::name()?;
    let payload = event::json()?;
    let info = wasmflow::run_info()?;
    let gh = github::info()?;
    let bot_login = gh.bot_login.clone().unwrap_or_default();
    let mut cfg = Config::load()?;

    let (number, command, comment_id, user, event_pr) = match decide(&name, &payload, &cfg.rules, &bot_login) {
        Decision::Skip(reason) => {
            wasmflow::info!("skipped: {}", reason);
            return Ok(json!({"action": "skipped", "reason": reason}));
        }
        Decision::Auto { number, pr } => (number, None, None, String::new(), Some(pr)),
        Decision::Command { number, comment_id, user, command } => (number, Some(command), comment_id, user, None),
    };
    let delivery = info.idempotency_key.clone();
    let delivery_key = format!("delivery/{}", delivery);
    if kv::get(&delivery_key)?.is_some() {
        return Ok(json!({"action": "skipped", "reason": "delivery already handled", "delivery": delivery}));
    }
    if let Some(id) = comment_id {
        // Acknowledge the command at once; a failure here is cosmetic.
        let _ = Request::post(&format!("/repos/{{repo}}/issues/comments/{}/reactions", id)).json(&json!({"content": "eyes"})).send();
    }
    // The pull request as it is now, not as the delivery saw it: deliveries queue, and a newer push may
    // already be there. A run for a head that is no longer the head leaves the review to the newer run.
    let pr: Value = gh_ok(Request::get(&format!("/repos/{{repo}}/pulls/{}", number)).send()?, "reading the pull request")?.json()?;
    let head_sha = pr["head"]["sha"].as_str().unwrap_or("").to_string();
    if let Some(event_pr) = &event_pr {
        let event_sha = event_pr["head"]["sha"].as_str().unwrap_or("");
        if !event_sha.is_empty() && event_sha != head_sha {
            kv::set(&delivery_key, "superseded")?;
            return Ok(json!({"action": "skipped", "reason": "superseded by a newer push", "sha": event_sha, "head": head_sha}));
        }
    }
    let repo = gh.repository.clone().unwrap_or_default();
    // The repository's settings from the BASE branch only: the head is the PR author's to change.
    let source = repo_settings(&mut cfg, number, pr["base"]["ref"].as_str().unwrap_or(""), &repo);
    let prefix = command_prefix(&cfg.rules.trigger_phrase);
    let state = PrState::load(&repo, number);
    let kind = match &command {
        None => Kind::Auto,
        Some(c) => {
            let result = command_run(c, &user, number, &pr, &cfg, &repo, &prefix)?;
            match result {
                Some(done) => {
                    kv::set(&delivery_key, "done")?;
                    return Ok(done);
                }
                None => match c {
                    Command::Review { full: true } => Kind::Full,
                    _ => Kind::Incremental,
                },
            }
        }
    };
    if kind == Kind::Auto {
        let skip = auto_skip(&pr, &cfg.rules, &bot_login)
            .or_else(|| commands::paused_by(&repo, number).map(|by| format!("automatic reviews of this pull request are paused (by @{}; {}resume restarts them)", by, prefix)));
        if let Some(reason) = skip {
            wasmflow::info!("skipped: {}", reason);
            CheckRun::neutral(&head_sha, &reason, &prefix);
            kv::set(&delivery_key, "skipped")?;
            return Ok(json!({"action": "skipped", "reason": reason, "sha": head_sha}));
        }
        if state.sha == head_sha && !head_sha.is_empty() {
            kv::set(&delivery_key, "skipped")?;
            return Ok(json!({"action": "skipped", "reason": "this head commit was already reviewed", "sha": head_sha}));
        }
    }
    if kind == Kind::Incremental && state.sha == head_sha && !head_sha.is_empty() {
        let id = commands::reply(number, &format!("Nothing new since the last review of `{}`. `{}review full` reviews the whole pull request again.", short(&head_sha), prefix))?;
        kv::set(&delivery_key, "done")?;
        return Ok(json!({"action": "skipped", "reason": "nothing new since the last review", "sha": head_sha, "reply": id}));
    }
    let result = review_run(number, &pr, head_sha, delivery, info.attempt, repo, state, &cfg, source, prefix, kind)?;
    kv::set(&delivery_key, "done")?;
    Ok(result)
}

/// A command other than `/review`: answered here (`Some(output)`). `None`: a review to run.
fn command_run(c: &Command, user: &str, number: u64, pr: &Value, cfg: &Config, repo: &str, prefix: &str) -> Result<Option<Value>, Failure> {
    let out = |reply: u64, extra: Value| {
        let mut v = json!({"action": "command", "command": c.name(), "pr": number, "reply": reply});
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        Some(v)
    };
    match c {
        Command::Help => return Ok(out(commands::reply(number, &commands::help(prefix))?, json!({}))),
        Command::Unknown(word) => {
            let text = format!("I don't know `{}{}`.\n\n{}", prefix, word.replace('`', ""), commands::help(prefix));
            return Ok(out(commands::reply(number, &text)?, json!({"unknown": word})));
        }
        _ => {}
    }
    if c.needs_write() && !commands::has_write(user)? {
        let id = commands::reply(number, &commands::refusal(user, c, prefix))?;
        return Ok(Some(json!({"action": "refused", "command": c.name(), "pr": number, "user": user, "reply": id})));
    }
    let chars = cfg.budget.chunk_tokens.saturating_mul(4);
    match c {
        Command::Pause => {
            commands::set_paused(repo, number, Some(user))?;
            let text = format!("Automatic reviews of this pull request are paused (by @{}). `{}resume` restarts them; `{}review` still reviews on demand.", user, prefix, prefix);
            Ok(out(commands::reply(number, &text)?, json!({})))
        }
        Command::Resume => {
            commands::set_paused(repo, number, None)?;
            let text = format!("Automatic reviews of this pull request are back on. `{}review` reviews it now.", prefix);
            Ok(out(commands::reply(number, &text)?, json!({})))
        }
        Command::Ask(question) => {
            let (_, plan, _) = load_files(number, cfg, None)?;
            let head = pr["head"]["sha"].as_str().unwrap_or("");
            let answer = commands::ask(pr["title"].as_str().unwrap_or(""), question, user, &plan, head, cfg.answer_tokens, &cfg.language, chars)?;
            Ok(out(commands::reply(number, &answer_text(answer))?, json!({})))
        }
        Command::Describe => {
            let (_, plan, _) = load_files(number, cfg, None)?;
            let answer = commands::describe(number, pr, &plan, cfg.answer_tokens, &cfg.language, chars)?;
            Ok(out(commands::reply(number, &answer_text(answer))?, json!({})))
        }
        Command::Review { .. } => Ok(None),
        Command::Help | Command::Unknown(_) => Ok(None), // answered above
    }
}

fn answer_text(a: commands::Answer) -> String {
    match a {
        commands::Answer::Text(t) => t,
        commands::Answer::Budget(reason) => format!("The flow's model budget is exhausted ({}), so there is no answer now; try again later.", reason),
    }
}

/// The PR's files, the deterministic checks' input, and the review plan; `only` limits the plan to
/// those paths (the files changed since the last review).
fn load_files(number: u64, cfg: &Config, only: Option<&[String]>) -> Result<(Vec<Value>, diff::Plan, bool), Failure> {
    let files_resp = Request::get(&format!("/repos/{{repo}}/pulls/{}/files", number)).paginate().max_pages(30).send()?;
    let truncated = files_resp.truncated;
    let files: Vec<Value> = gh_ok(files_resp, "listing the pull request's files")?.json()?;
    let planned: Vec<Value> = match only {
        Some(paths) => files.iter().filter(|f| paths.iter().any(|p| Some(p.as_str()) == f["filename"].as_str())).cloned().collect(),
        None => files.clone(),
    };
    let plan = diff::plan(&planned, &cfg.ignore, &cfg.budget);
    Ok((files, plan, truncated))
}

/// A review from placeholder to final comment, with its check run; a failure ends the check failed
/// and replaces the placeholder with an error note.
#[allow(clippy::too_many_arguments)]
fn review_run(number: u64, pr: &Value, head_sha: String, delivery: String, attempt: u32, repo: String, mut state: PrState,
              cfg: &Config, source: String, prefix: String, kind: Kind) -> Result<Value, Failure> {
    let bot_login = github::info().ok().and_then(|g| g.bot_login).unwrap_or_default();
    let comment = SummaryComment::find(number, &state, &bot_login)?;
    let mut ctx = Ctx { number, head_sha: head_sha.clone(), delivery: delivery.clone(), attempt, comment,
                        repo: repo.clone(), started_sha: state.sha.clone(), checks_md: String::new(), source, prefix };
    let previous_sha = if kind == Kind::Full { String::new() } else { state.sha.clone() };
    let check = CheckRun::start(&head_sha, &delivery);

    // The placeholder: visible at once, and always replaced below (by the review or an error note).
    let placeholder = if state.sha.is_empty() || ctx.comment.id.is_none() {
        format!("⏳ **wasmflow** is reviewing `{}`… this comment will be updated in place.", short(&head_sha))
    } else {
        format!("⏳ **wasmflow** is updating the review for `{}` (last reviewed: `{}`)…", short(&head_sha), short(&state.sha))
    };
    if let Err(f) = ctx.comment.set(&placeholder) {
        check.complete("failure", "The review failed", &format!("wasmflow could not write its comment: {}", f.note));
        return Err(f);
    }
    state.comment_id = ctx.comment.id;
    state.save(&repo, number)?;

    match review_pr(&mut ctx, cfg, pr, &mut state, &previous_sha, kind) {
        Ok((summary, verdict)) => {
            if summary["action"] == "reviewed" {
                state.sha = head_sha;
                state.comment_id = ctx.comment.id;
                state.save(&repo, number)?;
            }
            check.complete(verdict.conclusion, &verdict.title, &verdict.summary);
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
            check.complete("failure", "The review failed", &format!("{}{}", note, ctx.checks_md));
            Err(failure)
        }
    }
}

/// The check run's conclusion, title and summary for a finished review.
fn verdict(outcome: &review::Outcome, checks: &checks::Checks, plan: &diff::Plan, source: &str) -> Verdict {
    let mut summary = String::new();
    if let Some(reason) = &outcome.budget_exhausted {
        return Verdict { conclusion: "neutral", title: "Skipped: the model budget is exhausted".into(),
                         summary: format!("No model review: {}.\n\n{}", reason, render::checks_section(checks)) };
    }
    if plan.chunks.is_empty() {
        let why = if !plan.ignored.is_empty() && plan.no_patch.is_empty() && plan.deletions_only.is_empty() && plan.deleted.is_empty() {
            "only ignored paths changed"
        } else {
            "nothing reviewable changed (only deleted, ignored or binary files)"
        };
        return Verdict { conclusion: "neutral", title: format!("Skipped: {}", why),
                         summary: format!("wasmflow did not ask the model: {}.\n\n{}", why, render::checks_section(checks)) };
    }
    let count = |s: &str| outcome.findings.iter().filter(|f| f.severity == s).count();
    let (high, medium, low) = (count("high"), count("medium"), count("low"));
    let title = if outcome.findings.is_empty() {
        "No model findings".to_string()
    } else {
        format!("{} finding(s): {} high, {} medium, {} low", outcome.findings.len(), high, medium, low)
    };
    summary.push_str(&format!("| severity | findings |\n|---|---|\n| high | {} |\n| medium | {} |\n| low | {} |\n\n", high, medium, low));
    for f in &outcome.findings {
        summary.push_str(&format!("- **{}** `{}:{}` {}\n", f.severity, f.path, f.line, f.message.replace('\n', " ")));
    }
    let dropped = outcome.dropped.sentence();
    if !dropped.is_empty() {
        summary.push_str(&format!("\n{}.\n", dropped));
    }
    let mut skipped = Vec::new();
    if !plan.left_out.is_empty() {
        skipped.push(format!("{} file(s) over the token budget", plan.left_out.len()));
    }
    if !plan.ignored.is_empty() {
        skipped.push(format!("{} ignored file(s)", plan.ignored.len()));
    }
    if !outcome.failed_chunks.is_empty() {
        skipped.push(format!("{} file(s) too large for the model", outcome.failed_chunks.len()));
    }
    if !skipped.is_empty() {
        summary.push_str(&format!("\nNot reviewed: {}.\n", skipped.join(", ")));
    }
    summary.push_str(&format!("\n{}\n<sub>settings: {}</sub>", render::checks_section(checks), source));
    let conclusion = if high > 0 || !checks.secrets.is_empty() { "neutral" } else { "success" };
    Verdict { conclusion, title, summary }
}

fn review_pr(ctx: &mut Ctx, cfg: &Config, pr: &Value, state: &mut PrState, previous_sha: &str, kind: Kind) -> Result<(Value, Verdict), Failure> {
    let number = ctx.number;
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
    let changed: Option<Vec<String>> = since.as_ref().and_then(|s| s.files.clone());
    let only = if kind == Kind::Incremental { changed.as_deref() } else { None };
    let (files, plan, files_truncated) = load_files(number, cfg, only)?;
    let checks = checks::run(&files);
    ctx.checks_md = format!("\n\n{}", render::checks_section(&checks));

    let settings = review::Settings {
        max_tokens: cfg.answer_tokens,
        language: cfg.language.clone(),
        max_findings: cfg.max_findings,
        severity_threshold: cfg.severity_threshold.clone(),
        instructions: cfg.instructions.clone(),
    };
    let title = pr["title"].as_str().unwrap_or("");
    let body = pr["body"].as_str().unwrap_or("");
    let outcome = if plan.chunks.is_empty() { review::Outcome::default() } else { review::review(title, body, &plan, &settings)? };

    // Inline comments: the grounded findings and the secrets found, as ONE review. On synchronize only
    // files changed since the last review get new inline comments, and nothing already posted is repeated.
    let mut inline: Vec<Value> = Vec::new();
    let mut fingerprints: Vec<String> = Vec::new();
    let mut push = |path: &str, line: u32, comment: Value, inline: &mut Vec<Value>| {
        let text = comment["body"].as_str().unwrap_or("").chars().take(60).collect::<String>();
        let fp = format!("{}:{}:{}", path, line, text);
        if state.posted.contains(&fp) || fingerprints.contains(&fp) {
            return;
        }
        if let Some(files) = &changed {
            if kind == Kind::Auto && !files.iter().any(|f| f == path) {
                return;
            }
        }
        fingerprints.push(fp);
        inline.push(comment);
    };
    for s in &checks.secrets {
        if plan.find(&s.path).map(|f| f.commentable().contains(&s.line)).unwrap_or(false) {
            let body = format!("🔑 **Possible secret** ({}): `{}`. Remove it and rotate the credential.", s.kind, s.preview);
            push(&s.path, s.line, json!({"path": s.path, "line": s.line, "side": "RIGHT", "body": body}), &mut inline);
        }
    }
    for f in &outcome.findings {
        push(&f.path, f.line, findings::review_comment(f), &mut inline);
    }
    let suggestions = inline.iter().filter(|c| c["body"].as_str().map(|b| b.contains("```suggestion")).unwrap_or(false)).count();
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
        settings_source: &ctx.source,
        prefix: &ctx.prefix,
    });
    let verdict = verdict(&outcome, &checks, &plan, &ctx.source);
    // Another run may have finished a review while this one ran (two pushes in quick succession): the
    // newer head's review must not be overwritten by an older one.
    let now = PrState::load(&ctx.repo, number);
    if now.sha != ctx.started_sha && now.sha != ctx.head_sha && !now.sha.is_empty() {
        let current: Value = gh_ok(Request::get(&format!("/repos/{{repo}}/pulls/{}", number)).send()?, "reading the pull request")?.json()?;
        if current["head"]["sha"].as_str().unwrap_or("") != ctx.head_sha {
            let v = Verdict { conclusion: "neutral", title: "Superseded by a newer push".into(), summary: "A newer commit was reviewed meanwhile.".into() };
            return Ok((json!({"action": "skipped", "reason": "superseded by a newer push while reviewing", "sha": ctx.head_sha}), v));
        }
    }
    let comment_id = ctx.comment.set(&comment)?;
    Ok((json!({
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
        "proposed": outcome.proposed,
        "findings": outcome.findings.len(),
        "dropped": outcome.dropped.to_json(),
        "unusable_answers": outcome.unusable_answers,
        "summaries_dropped": outcome.summaries_dropped,
        "budget_exhausted": outcome.budget_exhausted,
        "inline_comments": inline_posted,
        "suggestions": if inline_posted > 0 { suggestions } else { 0 },
        "secrets": checks.secrets.len(),
        "todos": checks.todos.len(),
        "conclusion": verdict.conclusion,
        "settings": ctx.source,
    }), verdict))
}
