//! The model's part: one call per chunk asking for structured findings under a JSON schema (a grammar
//! for local models, JSON mode for endpoints), a merge call for multi-chunk PRs, and the answers
//! validated and grounded (`findings`). A model that gives nothing usable leaves an honest summary.

use serde_json::Value;
use wasmflow::llm::{self, ChatRequest, Message};
use wasmflow::ErrorKind;

use crate::diff::Plan;
use crate::findings::{self, Dropped, Finding};

#[derive(Debug, Default)]
pub struct Outcome {
    pub summary: String,
    pub findings: Vec<Finding>,
    /// Findings the model gave, before grounding.
    pub proposed: usize,
    pub dropped: Dropped,
    /// Answers that were not the JSON asked for.
    pub unusable_answers: usize,
    /// Summaries left out because they did not describe the change.
    pub summaries_dropped: usize,
    pub calls: usize,
    pub model: String,
    pub failed_chunks: Vec<String>,
    /// The LLM call was refused for the flow's model budget: the reason.
    pub budget_exhausted: Option<String>,
    pub ms: f64,
}

pub struct Settings {
    pub max_tokens: u32,
    pub language: Option<String>,
    pub max_findings: usize,
    pub severity_threshold: String,
    /// Per-path instructions of the repository file, as (glob, text).
    pub instructions: Vec<(String, String)>,
}

const SYSTEM: &str = "You review a pull request. The diff shows each line as `<new line number> +<code>` (added), \
`<new line number>  <code>` (unchanged) or `      -<code>` (removed). Report only real defects in ADDED lines: \
bugs, off-by-one errors, unchecked errors, injection, secrets, races, wrong comparisons. For each finding give \
the file, start_line and end_line (new line numbers of added lines), severity, category, `code`: the exact \
code copied from those lines, `problem`: one or two sentences, and `replacement` only when you can give the \
corrected code for exactly those lines. No style remarks. If nothing is clearly wrong, return an empty \
findings list: that is the most common right answer. The summary says in 1-3 sentences what the change does.";

fn language_note(settings: &Settings) -> String {
    match &settings.language {
        Some(lang) if !lang.is_empty() => format!(" Write the summary and problems in {}.", lang),
        _ => String::new(),
    }
}

/// Is this error the flow's model budget refusing the call (rather than the model failing)?
pub fn is_budget_error(e: &wasmflow::Error) -> bool {
    matches!(e.kind(), ErrorKind::Limit | ErrorKind::Denied) && e.message().map(|m| m.to_ascii_lowercase().contains("budget")).unwrap_or(false)
}

/// Review every chunk of the plan, then merge. Errors from the LLM call (endpoint down, deadline)
/// are returned for the caller to turn into an error note and a retry; a budget refusal is not an
/// error but an outcome (`budget_exhausted`).
pub fn review(title: &str, body: &str, plan: &Plan, settings: &Settings) -> wasmflow::Result<Outcome> {
    let mut out = Outcome::default();
    let description: String = body.chars().take(1500).collect();
    let n = plan.chunks.len();
    let mut summaries: Vec<String> = Vec::new();
    let mut grounded: Vec<Finding> = Vec::new();
    for (i, chunk) in plan.chunks.iter().enumerate() {
        let diff: String = chunk.iter().map(|f| f.rendered.as_str()).collect::<Vec<_>>().join("\n");
        let paths: Vec<&str> = chunk.iter().map(|f| f.path.as_str()).collect();
        let part = if n > 1 { format!(" (part {} of {})", i + 1, n) } else { String::new() };
        let mut notes = crate::repo_config::instructions_for(&settings.instructions, &paths);
        let notes = if notes.is_empty() { String::new() } else { notes.insert(0, "Repository instructions:".into()); format!("{}\n\n", notes.join("\n")) };
        let user = format!(
            "Pull request: {}\n\nDescription:\n{}\n\n{}Diff{}:\n{}",
            title,
            if description.trim().is_empty() { "(none)" } else { description.as_str() },
            notes,
            part,
            diff
        );
        let request = ChatRequest {
            messages: vec![Message::system(&format!("{}{}", SYSTEM, language_note(settings))), Message::user(&user)],
            max_tokens: Some(settings.max_tokens),
            temperature: Some(0.1),
            response_format: Some("json".to_string()),
            stop: Vec::new(),
            json_schema: Some(findings::answer_schema(&paths.iter().map(|p| p.to_string()).collect::<Vec<_>>(), findings::max_items(settings.max_tokens))),
        };
        let answer = match llm::chat_with(&request) {
            Ok(a) => a,
            Err(e) if is_budget_error(&e) => {
                out.budget_exhausted = Some(e.message().unwrap_or("model budget exhausted").to_string());
                break;
            }
            Err(e) if matches!(e.kind(), ErrorKind::TooLarge | ErrorKind::Invalid) => {
                // This chunk does not fit the model (or the endpoint refused it): name it, go on.
                out.failed_chunks.extend(chunk.iter().map(|f| f.path.clone()));
                continue;
            }
            Err(e) => return Err(e),
        };
        out.calls += 1;
        out.ms += answer.ms;
        out.model = answer.model.clone();
        match parse_answer(&answer.content) {
            Some((summary, items)) => {
                out.proposed += items.len();
                let (kept, notes) = findings::ground_all(&items, chunk, &mut out.dropped);
                grounded.extend(kept);
                for n in notes {
                    wasmflow::info!("dropped a model finding, {}", n);
                }
                if findings::summary_grounded(&summary, &format!("{}\n{}\n{}", title, description, diff)) {
                    summaries.push(summary);
                } else if !summary.is_empty() {
                    out.summaries_dropped += 1;
                    wasmflow::info!("dropped the model's summary (it does not describe the change): {}", summary.chars().take(200).collect::<String>());
                }
            }
            None => {
                out.unusable_answers += 1;
                wasmflow::info!("the model's answer is not the JSON asked for: {}", answer.content.chars().take(300).collect::<String>());
            }
        }
    }
    out.summary = if summaries.len() > 1 && out.budget_exhausted.is_none() {
        merge(title, &summaries, settings, &mut out)?
    } else {
        summaries.join("\n\n")
    };
    out.findings = findings::select(grounded, &settings.severity_threshold, settings.max_findings, &mut out.dropped);
    Ok(out)
}

fn merge(title: &str, summaries: &[String], settings: &Settings, out: &mut Outcome) -> wasmflow::Result<String> {
    let joined = summaries.iter().enumerate().map(|(i, s)| format!("Part {}: {}", i + 1, s)).collect::<Vec<_>>().join("\n\n");
    let request = ChatRequest {
        messages: vec![
            Message::system(&format!(
                "You merge partial reviews of one pull request into one summary of 2-5 sentences, potential issues first. \
                 Plain text, no JSON.{}",
                language_note(settings)
            )),
            Message::user(&format!("Pull request: {}\n\n{}", title, joined)),
        ],
        max_tokens: Some(settings.max_tokens),
        temperature: Some(0.1),
        ..ChatRequest::default()
    };
    match llm::chat_with(&request) {
        Ok(a) => {
            out.calls += 1;
            out.ms += a.ms;
            let text = a.content.trim().to_string();
            Ok(if text.is_empty() || !findings::summary_grounded(&text, &format!("{}\n{}", title, joined)) { joined } else { text })
        }
        Err(e) if is_budget_error(&e) || matches!(e.kind(), ErrorKind::TooLarge | ErrorKind::Invalid) => Ok(joined),
        Err(e) => Err(e),
    }
}

/// The model's answer as (summary, raw findings), or `None` when it is not a JSON object of that
/// shape (a fenced or prefixed object is accepted: endpoints without JSON mode add them).
pub fn parse_answer(text: &str) -> Option<(String, Vec<Value>)> {
    let v = extract_json(text.trim())?;
    if !v.is_object() {
        return None;
    }
    let summary = v["summary"].as_str().unwrap_or("").trim().chars().take(3000).collect::<String>();
    let items = match &v["findings"] {
        Value::Array(a) => a.clone(),
        Value::Null => Vec::new(),
        _ => return None,
    };
    Some((summary, items))
}

fn extract_json(text: &str) -> Option<Value> {
    if let Ok(v) = serde_json::from_str::<Value>(text) {
        return Some(v);
    }
    let start = text.find('{')?;
    let end = text.rfind('}')?;
    if end <= start {
        return None;
    }
    serde_json::from_str::<Value>(&text[start..=end]).ok()
}

#[cfg(test)]
mod tests {
    use super::parse_answer;

    #[test]
    fn parses_fenced_json_and_refuses_prose() {
        let (s, f) = parse_answer("```json\n{\"summary\": \"ok\", \"findings\": [{\"file\": \"a.rs\", \"start_line\": \"3\"}]}\n```").unwrap();
        assert_eq!(s, "ok");
        assert_eq!(f.len(), 1);
        assert!(parse_answer("This change looks fine.").is_none());
        assert!(parse_answer("{\"summary\": \"x\", \"findings\": 3}").is_none());
    }
}
