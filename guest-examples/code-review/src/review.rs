//! The model's part: prompts per chunk, a merge call for multi-chunk PRs, and lenient parsing of the
//! answer into a summary and concrete findings (a small model's prose still becomes a summary).

use serde_json::Value;
use wasmflow::llm::{self, ChatRequest, Message};
use wasmflow::ErrorKind;

use crate::diff::{Plan, FileDiff};

#[derive(Debug, Clone)]
pub struct Finding {
    pub path: String,
    pub line: u32,
    pub severity: String,
    pub message: String,
}

#[derive(Debug, Default)]
pub struct Outcome {
    pub summary: String,
    pub findings: Vec<Finding>,
    pub calls: usize,
    pub model: String,
    pub failed_chunks: Vec<String>,
    pub ms: f64,
}

pub struct Settings {
    pub max_tokens: u32,
    pub language: Option<String>,
    pub max_findings: usize,
}

const SYSTEM: &str = "You are a careful senior engineer reviewing a pull request. The diff shows each line as \
`<new line number> +<code>` (added), `<new line number>  <code>` (context) or `      -<code>` (removed). \
Answer with ONLY a JSON object, no prose around it: \
{\"summary\": \"2-5 sentences: what the change does and its main risks\", \
\"findings\": [{\"file\": \"path\", \"line\": 12, \"severity\": \"high|medium|low\", \"message\": \"the concrete problem and the fix\"}]}. \
Findings are only concrete bugs, security problems or clear mistakes on ADDED lines, with that line's number; \
no style remarks; at most 5; an empty list is fine.";

/// The shape asked of the model (a grammar for local models).
fn answer_schema() -> Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "summary": {"type": "string"},
            "findings": {"type": "array", "items": {
                "type": "object",
                "properties": {
                    "file": {"type": "string"},
                    "line": {"type": "integer"},
                    "severity": {"type": "string", "enum": ["high", "medium", "low"]},
                    "message": {"type": "string"}
                },
                "required": ["file", "line", "severity", "message"]
            }}
        },
        "required": ["summary", "findings"]
    })
}

fn language_note(settings: &Settings) -> String {
    match &settings.language {
        Some(lang) if !lang.is_empty() => format!(" Write the summary and messages in {}.", lang),
        _ => String::new(),
    }
}

/// Review every chunk of the plan, then merge. Errors from the LLM call (endpoint down, deadline)
/// are returned for the caller to turn into an error note and a retry.
pub fn review(title: &str, body: &str, plan: &Plan, settings: &Settings) -> wasmflow::Result<Outcome> {
    let mut out = Outcome::default();
    let description: String = body.chars().take(1500).collect();
    let n = plan.chunks.len();
    let mut summaries: Vec<String> = Vec::new();
    for (i, chunk) in plan.chunks.iter().enumerate() {
        let diff: String = chunk.iter().map(|f| f.rendered.as_str()).collect::<Vec<_>>().join("\n");
        let part = if n > 1 { format!(" (part {} of {})", i + 1, n) } else { String::new() };
        let user = format!(
            "Pull request: {}\n\nDescription:\n{}\n\nDiff{}:\n{}",
            title,
            if description.trim().is_empty() { "(none)" } else { description.as_str() },
            part,
            diff
        );
        let request = ChatRequest {
            messages: vec![Message::system(&format!("{}{}", SYSTEM, language_note(settings))), Message::user(&user)],
            max_tokens: Some(settings.max_tokens),
            temperature: Some(0.1),
            response_format: Some("json".to_string()),
            stop: Vec::new(),
            json_schema: Some(answer_schema()),
        };
        let answer = match llm::chat_with(&request) {
            Ok(a) => a,
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
        let (summary, findings) = parse_answer(&answer.content);
        for f in findings {
            if let Some(valid) = validate(f, chunk) {
                out.findings.push(valid);
            }
        }
        if !summary.is_empty() {
            summaries.push(summary);
        }
    }
    out.summary = if summaries.len() > 1 {
        let joined = summaries.iter().enumerate().map(|(i, s)| format!("Part {}: {}", i + 1, s)).collect::<Vec<_>>().join("\n\n");
        let request = ChatRequest {
            messages: vec![
                Message::system(&format!(
                    "You merge partial reviews of one pull request into one summary of 3-6 sentences, potential issues first. \
                     Plain text, no JSON.{}",
                    language_note(settings)
                )),
                Message::user(&format!("Pull request: {}\n\n{}", title, joined)),
            ],
            max_tokens: Some(settings.max_tokens),
            temperature: Some(0.1),
            response_format: None,
            stop: Vec::new(),
            json_schema: None,
        };
        match llm::chat_with(&request) {
            Ok(a) => {
                out.calls += 1;
                out.ms += a.ms;
                let text = a.content.trim().to_string();
                if text.is_empty() { joined } else { text }
            }
            Err(e) if matches!(e.kind(), ErrorKind::TooLarge | ErrorKind::Invalid) => joined,
            Err(e) => return Err(e),
        }
    } else {
        summaries.pop().unwrap_or_default()
    };
    // Most severe first, one finding per line, capped.
    let rank = |s: &str| match s {
        "high" => 0,
        "medium" => 1,
        _ => 2,
    };
    out.findings.sort_by(|a, b| rank(&a.severity).cmp(&rank(&b.severity)).then(a.path.cmp(&b.path)).then(a.line.cmp(&b.line)));
    let mut seen = std::collections::BTreeSet::new();
    out.findings.retain(|f| seen.insert((f.path.clone(), f.line)));
    out.findings.truncate(settings.max_findings);
    Ok(out)
}

/// A finding is kept only if its file was in this chunk and its line is one the diff shows, because
/// GitHub refuses inline comments elsewhere (422) and a made-up location helps nobody.
fn validate(f: Finding, chunk: &[FileDiff]) -> Option<Finding> {
    let file = chunk.iter().find(|d| d.path == f.path || d.path.ends_with(&format!("/{}", f.path)))?;
    if f.message.trim().is_empty() || !file.commentable().contains(&f.line) {
        return None;
    }
    Some(Finding { path: file.path.clone(), ..f })
}

/// The model's answer as (summary, findings): JSON when it managed, its prose otherwise.
pub fn parse_answer(text: &str) -> (String, Vec<Finding>) {
    let trimmed = text.trim();
    let value = extract_json(trimmed);
    match value {
        Some(v) if v.is_object() => {
            let summary = v["summary"].as_str().unwrap_or("").trim().to_string();
            let mut findings = Vec::new();
            if let Some(items) = v["findings"].as_array() {
                for item in items {
                    let path = item["file"].as_str().or_else(|| item["path"].as_str()).unwrap_or("").trim().to_string();
                    let line = item["line"].as_u64().or_else(|| item["line"].as_str().and_then(|s| s.trim().parse().ok()));
                    let message = item["message"].as_str().or_else(|| item["comment"].as_str()).unwrap_or("").trim().to_string();
                    let severity = item["severity"].as_str().unwrap_or("medium").to_ascii_lowercase();
                    if let Some(line) = line {
                        if !path.is_empty() {
                            findings.push(Finding { path, line: line as u32, severity, message });
                        }
                    }
                }
            }
            (summary, findings)
        }
        _ if trimmed.starts_with('{') || trimmed.starts_with("```") => {
            // Broken JSON (cut at max_tokens, or not the shape asked): show a short excerpt, flagged.
            let excerpt: String = trimmed.chars().take(300).collect::<String>().replace("```", "");
            (format!("_The model's answer was not the JSON asked for; excerpt:_ `{}`…", excerpt.replace('`', "'").replace('\n', " ")), Vec::new())
        }
        _ => (trimmed.chars().take(2000).collect(), Vec::new()),
    }
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
    fn parses_fenced_json_and_prose() {
        let (s, f) = parse_answer("```json\n{\"summary\": \"ok\", \"findings\": [{\"file\": \"a.rs\", \"line\": \"3\", \"message\": \"bug\"}]}\n```");
        assert_eq!(s, "ok");
        assert_eq!(f[0].line, 3);
        let (s, f) = parse_answer("This change looks fine.");
        assert_eq!(s, "This change looks fine.");
        assert!(f.is_empty());
    }
}
