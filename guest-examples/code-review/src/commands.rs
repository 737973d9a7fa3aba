//! The commands people give the bot in PR comments: who may run them (write access, checked with
//! GitHub's collaborator-permission API, for anything that costs model time or changes the bot's
//! behaviour), `/help`, `/pause` and `/resume`, `/ask` and `/describe`. `/review` is in main.rs.

use serde_json::{json, Value};
use wasmflow::github::Request;
use wasmflow::kv;
use wasmflow::llm::{self, ChatRequest, Message};

use crate::decision::Command;
use crate::diff::Plan;
use crate::failure::{gh_ok, Failure};
use crate::review::is_budget_error;

/// Start and end markers of the bot's section in the PR body: `/describe` writes between them only.
pub const DESCRIBE_START: &str = "<!-- wasmflow:describe:start -->";
pub const DESCRIBE_END: &str = "<!-- wasmflow:describe:end -->";
/// Labels `/describe` may choose from when the repository has none of its own.
pub const DEFAULT_LABELS: &[&str] = &["bug", "enhancement", "documentation", "tests", "refactor", "dependencies", "security"];

/// The `/help` answer.
pub fn help(prefix: &str) -> String {
    let p = prefix;
    format!(
        "**wasmflow** commands (in a comment on this pull request):\n\n\
         | command | what it does |\n|---|---|\n\
         | `{p}review` | review the commits pushed since the last review |\n\
         | `{p}review full` | review the whole pull request again |\n\
         | `{p}describe` | suggest a title, write the description section of the PR body, add labels |\n\
         | `{p}ask QUESTION` | answer a question about this diff |\n\
         | `{p}pause` / `{p}resume` | stop / restart automatic reviews of this pull request |\n\
         | `{p}help` | this table |\n\n\
         Commands other than `{p}help` need write access to the repository. Settings: `.github/wasmflow.yaml` on the base branch.",
        p = p
    )
}

/// Post `body` as a new comment on PR `number`.
pub fn reply(number: u64, body: &str) -> Result<u64, Failure> {
    let resp = Request::post(&format!("/repos/{{repo}}/issues/{}/comments", number)).json(&json!({"body": body})).send()?;
    let created: Value = gh_ok(resp, "posting a reply")?.json()?;
    Ok(created["id"].as_u64().unwrap_or(0))
}

/// Does `login` have write access (write, maintain or admin) to the repository?
pub fn has_write(login: &str) -> Result<bool, Failure> {
    if login.is_empty() || !login.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Ok(false); // not a user login GitHub would accept (bots are never let through here)
    }
    let resp = Request::get(&format!("/repos/{{repo}}/collaborators/{}/permission", login)).send()?;
    if resp.status == 404 || resp.status == 403 {
        return Ok(false);
    }
    let v: Value = gh_ok(resp, "checking the commenter's permission")?.json()?;
    let role = v["permission"].as_str().unwrap_or("none");
    Ok(matches!(role, "admin" | "maintain" | "write"))
}

/// The polite refusal for someone without write access.
pub fn refusal(user: &str, command: &Command, prefix: &str) -> String {
    format!(
        "Thanks @{}! `{}{}` is only available to people with write access to this repository, because it {}. \
         A maintainer can run it for you; `{}help` lists the commands.",
        user,
        prefix,
        command.name(),
        if command.costs_model_time() { "uses model time" } else { "changes how the bot treats this pull request" },
        prefix
    )
}

fn pause_key(repo: &str, number: u64) -> String {
    format!("paused/{}/{}", repo.to_ascii_lowercase(), number)
}

/// Who paused automatic reviews of this PR, if someone did.
pub fn paused_by(repo: &str, number: u64) -> Option<String> {
    kv::get_str(&pause_key(repo, number)).ok().flatten()
}

pub fn set_paused(repo: &str, number: u64, user: Option<&str>) -> wasmflow::Result<()> {
    match user {
        Some(u) => kv::set(&pause_key(repo, number), u),
        None => kv::delete(&pause_key(repo, number)),
    }
}

/// The diff as the model reads it, for `/ask` and `/describe` (the plan's chunks, as many as fit).
fn diff_text(plan: &Plan, budget_chars: usize) -> String {
    let mut out = String::new();
    for f in plan.chunks.iter().flat_map(|c| c.iter()) {
        if out.len() + f.rendered.len() > budget_chars && !out.is_empty() {
            break;
        }
        out.push_str(&f.rendered);
        out.push('\n');
    }
    out
}

fn language_note(language: &Option<String>) -> String {
    match language {
        Some(l) if !l.is_empty() => format!(" Answer in {}.", l),
        _ => String::new(),
    }
}

/// What a model command produced: the text to post, or that the budget said no.
pub enum Answer {
    Text(String),
    Budget(String),
}

fn chat(request: &ChatRequest) -> Result<Option<(String, String)>, Failure> {
    match llm::chat_with(request) {
        Ok(a) => Ok(Some((a.content.trim().to_string(), a.model))),
        Err(e) if is_budget_error(&e) => Err(Failure { note: format!("budget:{}", e.message().unwrap_or("model budget exhausted")), transient: false }),
        Err(e) => Err(e.into()),
    }
}

fn budget_or(r: Result<Option<(String, String)>, Failure>) -> Result<Result<(String, String), String>, Failure> {
    match r {
        Ok(Some(x)) => Ok(Ok(x)),
        Ok(None) => Ok(Ok((String::new(), String::new()))),
        Err(f) if f.note.starts_with("budget:") => Ok(Err(f.note["budget:".len()..].to_string())),
        Err(f) => Err(f),
    }
}

/// `/ask QUESTION`: an answer from the diff, posted as a reply quoting the question.
pub fn ask(title: &str, question: &str, user: &str, plan: &Plan, head: &str, max_tokens: u32, language: &Option<String>, chars: usize) -> Result<Answer, Failure> {
    let diff = diff_text(plan, chars);
    let request = ChatRequest {
        messages: vec![
            Message::system(&format!(
                "You answer a question about a pull request using only its diff. Quote file names and line numbers \
                 from the diff. If the diff does not tell, say so plainly. Be brief.{}",
                language_note(language)
            )),
            Message::user(&format!("Pull request: {}\n\nDiff:\n{}\n\nQuestion: {}", title, diff, question)),
        ],
        max_tokens: Some(max_tokens),
        temperature: Some(0.2),
        ..ChatRequest::default()
    };
    let (text, model) = match budget_or(chat(&request))? {
        Ok(x) => x,
        Err(reason) => return Ok(Answer::Budget(reason)),
    };
    let quoted: String = question.lines().map(|l| format!("> {}", l)).collect::<Vec<_>>().join("\n");
    let answer = if text.is_empty() { "_The model gave no answer._".to_string() } else { text };
    Ok(Answer::Text(format!(
        "{}\n\n@{} {}\n\n<sub>answered from the diff of `{}` by model `{}`</sub>",
        quoted, user, answer, &head[..head.len().min(7)], model
    )))
}

/// The PR body with the bot's section replaced (or appended): everything outside the markers is
/// kept byte for byte.
pub fn replace_section(body: &str, section: &str) -> String {
    let block = format!("{}\n{}\n{}", DESCRIBE_START, section.trim(), DESCRIBE_END);
    if let (Some(s), Some(e)) = (body.find(DESCRIBE_START), body.find(DESCRIBE_END)) {
        if e > s {
            return format!("{}{}{}", &body[..s], block, &body[e + DESCRIBE_END.len()..]);
        }
    }
    if body.trim().is_empty() {
        block
    } else {
        format!("{}\n\n{}", body.trim_end(), block)
    }
}

/// `/describe`: ask for a title, a description and labels (under a schema, labels from the
/// repository's own); write the section of the PR body, add the labels, and reply with the title.
pub fn describe(number: u64, pr: &Value, plan: &Plan, max_tokens: u32, language: &Option<String>, chars: usize) -> Result<Answer, Failure> {
    let resp = Request::get("/repos/{repo}/labels").paginate().max_pages(3).send()?;
    let mut labels: Vec<String> = if resp.is_success() {
        resp.json::<Vec<Value>>()?.iter().filter_map(|l| l["name"].as_str().map(String::from)).collect()
    } else {
        Vec::new()
    };
    if labels.is_empty() {
        labels = DEFAULT_LABELS.iter().map(|s| s.to_string()).collect();
    }
    let schema = json!({"type": "object", "properties": {
        "title": {"type": "string"},
        "description": {"type": "string"},
        "labels": {"type": "array", "maxItems": 3, "items": {"type": "string", "enum": labels}}
    }, "required": ["title", "description", "labels"]});
    let title = pr["title"].as_str().unwrap_or("");
    let request = ChatRequest {
        messages: vec![
            Message::system(&format!(
                "You write the description of a pull request from its diff: a short imperative title (under 72 \
                 characters), a description of 2-6 sentences or bullet points saying what changes and why it matters, \
                 and 0-3 labels from the allowed list. Answer with JSON only.{}",
                language_note(language)
            )),
            Message::user(&format!("Current title: {}\n\nDiff:\n{}", title, diff_text(plan, chars))),
        ],
        max_tokens: Some(max_tokens),
        temperature: Some(0.2),
        response_format: Some("json".to_string()),
        json_schema: Some(schema),
        ..ChatRequest::default()
    };
    let (text, model) = match budget_or(chat(&request))? {
        Ok(x) => x,
        Err(reason) => return Ok(Answer::Budget(reason)),
    };
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let new_title = v["title"].as_str().unwrap_or("").trim().lines().next().unwrap_or("").chars().take(120).collect::<String>();
    let description = v["description"].as_str().unwrap_or("").trim().to_string();
    if description.is_empty() {
        return Ok(Answer::Text(format!("The model (`{}`) gave no usable description, so the PR body was left as it is.", model)));
    }
    let chosen: Vec<String> = v["labels"].as_array().map(|a| a.iter().filter_map(|l| l.as_str()).filter(|l| labels.iter().any(|x| x == l)).map(String::from).collect()).unwrap_or_default();
    let section = format!("### Description (wasmflow)\n\n{}\n\n<sub>written by `/describe` with model `{}`; edit outside these markers freely</sub>",
                          description.replace(DESCRIBE_START, "").replace(DESCRIBE_END, ""), model);
    let body = replace_section(pr["body"].as_str().unwrap_or(""), &section);
    gh_ok(Request::patch(&format!("/repos/{{repo}}/pulls/{}", number)).json(&json!({"body": body})).send()?, "editing the PR body")?;
    if !chosen.is_empty() {
        gh_ok(Request::post(&format!("/repos/{{repo}}/issues/{}/labels", number)).json(&json!({"labels": chosen})).send()?, "adding labels")?;
    }
    let mut out = String::from("Updated the description section of the PR body.");
    if !new_title.is_empty() && new_title != title {
        out.push_str(&format!("\n\n**Suggested title:** {}", new_title));
    }
    if !chosen.is_empty() {
        out.push_str(&format!("\n\n**Labels added:** {}", chosen.iter().map(|l| format!("`{}`", l)).collect::<Vec<_>>().join(", ")));
    }
    Ok(Answer::Text(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_is_replaced_and_nothing_else() {
        let body = "Fixes #3.\n\nMy notes stay.";
        let once = replace_section(body, "first");
        assert!(once.starts_with("Fixes #3.\n\nMy notes stay.\n\n<!-- wasmflow:describe:start -->\nfirst\n"));
        let edited = once.replace("My notes stay.", "My notes, edited.") + "\n\ntrailing text";
        let twice = replace_section(&edited, "second");
        assert_eq!(twice, edited.replace("\nfirst\n", "\nsecond\n"));
        assert_eq!(replace_section("", "x"), format!("{}\nx\n{}", DESCRIBE_START, DESCRIBE_END));
    }

    #[test]
    fn help_lists_every_command() {
        let h = help("/");
        for c in ["/review`", "/review full", "/describe", "/ask QUESTION", "/pause", "/resume", "/help"] {
            assert!(h.contains(c), "{}", c);
        }
    }
}
