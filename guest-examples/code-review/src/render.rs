//! The summary comment in Markdown: the model's summary, what changed since the last review, the
//! deterministic checks, where the inline comments are, and by name everything not reviewed.

use serde_json::Value;

use crate::checks::Checks;
use crate::diff::{Budget, Plan};
use crate::review::Outcome;

/// What changed between the last reviewed commit and the new head.
pub struct Since {
    pub from: String,
    pub to: String,
    pub commits: Vec<String>,
    pub files: Option<Vec<String>>,
}

impl Since {
    pub fn from_compare(from: &str, to: &str, cmp: &Value) -> Since {
        let commits = cmp["commits"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|c| {
                        let sha = c["sha"].as_str().unwrap_or("");
                        let msg = c["commit"]["message"].as_str().unwrap_or("").lines().next().unwrap_or("");
                        format!("`{}` {}", &sha[..sha.len().min(7)], msg)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let files = cmp["files"].as_array().map(|a| a.iter().filter_map(|f| f["filename"].as_str().map(String::from)).collect());
        Since { from: from.to_string(), to: to.to_string(), commits, files }
    }

    pub fn unknown(from: &str, to: &str) -> Since {
        Since { from: from.to_string(), to: to.to_string(), commits: Vec::new(), files: None }
    }
}

pub struct Input<'a> {
    pub head_sha: &'a str,
    pub delivery: &'a str,
    pub checks: &'a Checks,
    pub plan: &'a Plan,
    pub outcome: &'a Outcome,
    pub since: Option<&'a Since>,
    pub inline_posted: usize,
    pub review_url: Option<&'a str>,
    pub files_truncated: bool,
    pub budget: &'a Budget,
    /// Where the settings came from (the footer says it).
    pub settings_source: &'a str,
    /// The command prefix (`/` by default), for the footer's hint.
    pub prefix: &'a str,
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(7)]
}

fn code_list(items: &[String], max: usize) -> String {
    let mut parts: Vec<String> = items.iter().take(max).map(|p| format!("`{}`", p)).collect();
    if items.len() > max {
        parts.push(format!("and {} more", items.len() - max));
    }
    parts.join(", ")
}

/// The checks as a Markdown section (also used alone in an error note).
pub fn checks_section(c: &Checks) -> String {
    let mut out = String::from("### Checks\n\n| check | result |\n|---|---|\n");
    let reasons = if c.risk_reasons.is_empty() { String::new() } else { format!(" (touches {})", c.risk_reasons.join(", ")) };
    out.push_str(&format!(
        "| size | {} files, +{} −{} ({}) |\n| risk | **{}**{} |\n",
        c.files, c.additions, c.deletions, c.size, c.risk, reasons
    ));
    if c.secrets.is_empty() {
        out.push_str("| secrets | none found in added lines |\n");
    } else {
        let hits: Vec<String> = c.secrets.iter().take(5).map(|s| format!("`{}:{}` {} (`{}`)", s.path, s.line, s.kind, s.preview)).collect();
        out.push_str(&format!("| secrets | 🔑 **{} possible**: {} |\n", c.secrets.len(), hits.join("; ")));
    }
    if c.todos.is_empty() {
        out.push_str("| TODO/FIXME | none added |\n");
    } else {
        let hits: Vec<String> = c.todos.iter().take(5).map(|t| format!("`{}:{}`", t.path, t.line)).collect();
        let more = if c.todos.len() > 5 { format!(" and {} more", c.todos.len() - 5) } else { String::new() };
        out.push_str(&format!("| TODO/FIXME | {} added: {}{} |\n", c.todos.len(), hits.join(", "), more));
    }
    if !c.untested.is_empty() {
        out.push_str(&format!("| tests | source changed without test changes: {} |\n", code_list(&c.untested, 6)));
    } else if c.tests_touched > 0 {
        out.push_str(&format!("| tests | {} test file(s) changed |\n", c.tests_touched));
    } else {
        out.push_str("| tests | no source code changed |\n");
    }
    out
}

pub fn comment(i: &Input) -> String {
    let mut out = format!("## 🤖 wasmflow review of `{}`\n\n", short(i.head_sha));
    if let Some(s) = i.since {
        out.push_str(&format!("**Since the last review** (`{}` → `{}`)", short(&s.from), short(&s.to)));
        if s.commits.is_empty() && s.files.is_none() {
            out.push_str(": the earlier commit is no longer in the branch (force-push); reviewed from scratch.\n\n");
        } else {
            out.push_str(&format!(": {} new commit(s)", s.commits.len()));
            if let Some(files) = &s.files {
                out.push_str(&format!(", files changed: {}", if files.is_empty() { "none".to_string() } else { code_list(files, 10) }));
            }
            out.push('\n');
            for c in s.commits.iter().take(10) {
                out.push_str(&format!("- {}\n", c));
            }
            out.push('\n');
        }
    }
    out.push_str("### Summary\n\n");
    if i.plan.chunks.is_empty() {
        out.push_str("_No reviewable changes (only deleted, ignored or binary files)._\n\n");
    } else if i.outcome.summary.trim().is_empty() && i.outcome.summaries_dropped > 0 {
        out.push_str("_The model's summary did not describe this change, so it is left out._\n\n");
    } else if i.outcome.summary.trim().is_empty() {
        out.push_str("_The model gave no summary._\n\n");
    } else {
        out.push_str(i.outcome.summary.trim());
        out.push_str("\n\n");
    }
    if let Some(reason) = &i.outcome.budget_exhausted {
        out.push_str(&format!("_No model review: the flow's model budget is exhausted ({})._ The deterministic checks below still ran.\n\n", reason.replace('\n', " ")));
    }
    if !i.outcome.findings.is_empty() {
        out.push_str(&format!("### Findings ({})\n\n", i.outcome.findings.len()));
        for f in &i.outcome.findings {
            let lines = if f.start_line < f.line { format!("{}-{}", f.start_line, f.line) } else { f.line.to_string() };
            let fix = if f.suggestion.is_some() { " _(suggested change inline)_" } else { "" };
            out.push_str(&format!("- **{}** {} `{}:{}` {}{}\n", f.severity, f.category, f.path, lines, f.message.replace('\n', " "), fix));
        }
        match (i.inline_posted, i.review_url) {
            (n, Some(url)) if n > 0 => out.push_str(&format!("\n{} inline comment(s) in [this review]({}).\n", n, url)),
            (n, None) if n > 0 => out.push_str(&format!("\n{} inline comment(s) in the review.\n", n)),
            _ => {}
        }
        out.push('\n');
    } else if !i.plan.chunks.is_empty() && i.outcome.budget_exhausted.is_none() {
        out.push_str("**No model findings**");
        if i.outcome.calls > 0 && i.outcome.unusable_answers == i.outcome.calls {
            out.push_str(": the model gave no usable answer, so this review is the deterministic checks below");
        } else if i.outcome.dropped.total() > 0 {
            out.push_str(": nothing the model proposed was about the changed code");
        }
        out.push_str(".\n\n");
    }
    out.push_str(&checks_section(i.checks));
    out.push('\n');

    let p = i.plan;
    let mut notes: Vec<String> = Vec::new();
    if !p.left_out.is_empty() {
        let names: Vec<String> = p.left_out.iter().map(|(n, t)| format!("{} (~{} tokens)", n, t)).collect();
        notes.push(format!(
            "**Not reviewed, over the budget of {} tokens** ({} file(s)): {}",
            i.budget.total_tokens,
            p.left_out.len(),
            code_list(&names, 25)
        ));
    }
    if !p.clipped.is_empty() {
        let names: Vec<String> = p.clipped.iter().map(|(n, kept, total)| format!("{} ({} of {} hunks)", n, kept, total)).collect();
        notes.push(format!("**Reviewed in part** (clipped to fit): {}", code_list(&names, 15)));
    }
    if !i.outcome.failed_chunks.is_empty() {
        notes.push(format!("**Not reviewed, too large for the model's context**: {}", code_list(&i.outcome.failed_chunks, 15)));
    }
    if !p.deleted.is_empty() {
        notes.push(format!("**Deleted**: {}", code_list(&p.deleted, 25)));
    }
    if !p.deletions_only.is_empty() {
        notes.push(format!("**Only deletions** (not sent to the model): {}", code_list(&p.deletions_only, 15)));
    }
    if !p.ignored.is_empty() {
        notes.push(format!("**Ignored** (lock, vendored or generated files; see `ignore` in the flow's config): {}", code_list(&p.ignored, 15)));
    }
    if !p.no_patch.is_empty() {
        notes.push(format!("**No diff from GitHub** (binary or too large): {}", code_list(&p.no_patch, 15)));
    }
    if i.files_truncated {
        notes.push("**The file list was cut by GitHub's limit of 3,000 files**; later files were not seen.".to_string());
    }
    if !notes.is_empty() {
        out.push_str("### Not reviewed in full\n\n");
        for n in notes {
            out.push_str(&format!("- {}\n", n));
        }
        out.push('\n');
    }
    let model = if i.outcome.model.is_empty() { "no model call".to_string() } else { format!("model `{}`", i.outcome.model) };
    let dropped = i.outcome.dropped.sentence();
    let dropped = if dropped.is_empty() { String::new() } else { format!("{} · ", dropped) };
    let unusable = if i.outcome.unusable_answers > 0 { format!("{} answer(s) not the JSON asked for · ", i.outcome.unusable_answers) } else { String::new() };
    out.push_str(&format!(
        "<sub>{} · {} file(s) in {} call(s), ~{} diff tokens · {}{}{} hunk(s) of deletions only dropped · settings: {} · delivery `{}` · comment `{}help` for commands</sub>",
        model,
        p.reviewed_files(),
        i.outcome.calls,
        p.used_tokens,
        dropped,
        unusable,
        p.dropped_hunks,
        i.settings_source,
        i.delivery,
        i.prefix
    ));
    out
}
