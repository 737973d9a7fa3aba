//! The model's findings, grounded: a finding is posted only if its file is in the diff, every line of
//! its range is an added (or changed) line, and the code it quotes appears on those lines. Everything
//! else is dropped and counted by reason, so the summary can say what was thrown away and why; a weak
//! model's inventions never reach the pull request.

use serde_json::{json, Value};

use crate::diff::FileDiff;

/// Severities, least to most severe.
pub const SEVERITIES: &[&str] = &["low", "medium", "high"];
/// Categories a finding may carry.
pub const CATEGORIES: &[&str] = &["bug", "security", "error-handling", "concurrency", "performance", "maintainability"];
/// The longest line range one finding may cover.
const MAX_RANGE: u32 = 40;

/// The rank of a severity (higher is more severe); unknown ones rank as `low`.
pub fn severity_rank(s: &str) -> usize {
    SEVERITIES.iter().position(|x| *x == s).unwrap_or(0)
}

/// One grounded finding, ready to post.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub path: String,
    pub start_line: u32,
    pub line: u32,
    pub severity: String,
    pub category: String,
    /// The code the finding is about, as the model quoted it (found on the lines).
    pub quote: String,
    pub message: String,
    /// Replacement for lines `start_line..=line`, when they lie in one hunk: a suggested change.
    pub suggestion: Option<String>,
}

/// What was dropped, by reason.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// Not about changed code: a file not in the diff, or lines that are not added lines.
    pub not_changed: usize,
    /// The quoted code is not on the lines named.
    pub quote_mismatch: usize,
    /// The same finding twice (overlapping lines of one file).
    pub duplicate: usize,
    /// Not the shape asked: missing fields, empty text, a reversed or huge range.
    pub malformed: usize,
    /// Below the severity threshold (not noise, just not asked for).
    pub below_threshold: usize,
    /// Over max_findings.
    pub over_limit: usize,
}

impl Dropped {
    /// Findings dropped because they were not grounded in the diff (the count that must stay honest).
    pub fn ungrounded(&self) -> usize {
        self.not_changed + self.quote_mismatch
    }

    pub fn total(&self) -> usize {
        self.not_changed + self.quote_mismatch + self.duplicate + self.malformed + self.below_threshold + self.over_limit
    }

    /// `3 model findings dropped: 2 not about changed code, 1 duplicate`, or empty when none were.
    pub fn sentence(&self) -> String {
        if self.total() == 0 {
            return String::new();
        }
        let mut parts = Vec::new();
        for (n, what) in [
            (self.not_changed, "not about changed code"),
            (self.quote_mismatch, "quoted code not on the lines named"),
            (self.duplicate, "duplicate"),
            (self.malformed, "malformed"),
            (self.below_threshold, "below the severity threshold"),
            (self.over_limit, "over max_findings"),
        ] {
            if n > 0 {
                parts.push(format!("{} {}", n, what));
            }
        }
        let total = self.total();
        format!("{} model finding{} dropped: {}", total, if total == 1 { "" } else { "s" }, parts.join(", "))
    }

    pub fn to_json(&self) -> Value {
        json!({"not_changed": self.not_changed, "quote_mismatch": self.quote_mismatch, "duplicate": self.duplicate,
               "malformed": self.malformed, "below_threshold": self.below_threshold, "over_limit": self.over_limit,
               "ungrounded": self.ungrounded(), "total": self.total()})
    }
}

/// How many findings fit in an answer of `answer_tokens` (each at most ~200 tokens under the
/// schema's string limits, plus the summary): a grammar-held answer cut at max_tokens is not JSON.
pub fn max_items(answer_tokens: u32) -> usize {
    ((answer_tokens.saturating_sub(120) / 200) as usize).clamp(1, 5)
}

/// The JSON schema asked of the model for one chunk: `files` become an enum, so a grammar-held local
/// model cannot even name a file outside the chunk, and strings are bounded, so a small model that
/// starts repeating itself still closes its JSON inside the answer's token budget.
pub fn answer_schema(files: &[String], max_items: usize) -> Value {
    json!({
        "type": "object",
        "properties": {
            "summary": {"type": "string", "maxLength": 300},
            "findings": {"type": "array", "maxItems": max_items.max(1), "items": {
                "type": "object",
                "properties": {
                    "file": {"type": "string", "enum": files},
                    "start_line": {"type": "integer"},
                    "end_line": {"type": "integer"},
                    "severity": {"type": "string", "enum": SEVERITIES},
                    "category": {"type": "string", "enum": CATEGORIES},
                    "code": {"type": "string", "maxLength": 160},
                    "problem": {"type": "string", "maxLength": 200},
                    "replacement": {"type": "string", "maxLength": 200}
                },
                "required": ["file", "start_line", "end_line", "severity", "category", "code", "problem"]
            }}
        },
        "required": ["summary", "findings"]
    })
}

/// Collapse runs of white space, so a quote matches whatever the model did to indentation.
fn squash(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn line_of(v: &Value) -> Option<u32> {
    v.as_u64().or_else(|| v.as_str().and_then(|s| s.trim().parse().ok())).and_then(|n| u32::try_from(n).ok())
}

fn text(v: &Value, keys: &[&str]) -> String {
    keys.iter().find_map(|k| v[*k].as_str()).unwrap_or("").trim().to_string()
}

/// The added lines of `file` as (line number, hunk index, text).
fn added_lines(file: &FileDiff) -> Vec<(u32, usize, &str)> {
    let mut out = Vec::new();
    for (h, hunk) in file.hunks.iter().enumerate() {
        for l in &hunk.lines {
            if l.kind == '+' {
                if let Some(n) = l.new_no {
                    out.push((n, h, l.text.as_str()));
                }
            }
        }
    }
    out
}

/// Ground one raw finding against the chunk's files: `Ok(finding)` or `Err(reason)` for [`Dropped`].
fn ground(item: &Value, chunk: &[FileDiff]) -> Result<Finding, &'static str> {
    if !item.is_object() {
        return Err("malformed");
    }
    let path = text(item, &["file", "path"]);
    let start = line_of(&item["start_line"]).or_else(|| line_of(&item["line"]));
    let end = line_of(&item["end_line"]).or(start);
    let message = text(item, &["problem", "message"]);
    let quote = text(item, &["code", "quote"]);
    let severity = text(item, &["severity"]).to_ascii_lowercase();
    let category = text(item, &["category"]).to_ascii_lowercase();
    let (start, end) = match (start, end) {
        (Some(s), Some(e)) if s >= 1 && e >= s && e - s < MAX_RANGE => (s, e),
        _ => return Err("malformed"),
    };
    if path.is_empty() || message.chars().filter(|c| c.is_alphanumeric()).count() < 8 || !SEVERITIES.contains(&severity.as_str()) {
        return Err("malformed");
    }
    let file = chunk.iter().find(|d| d.path == path || d.path.ends_with(&format!("/{}", path))).ok_or("not_changed")?;
    let added = added_lines(file);
    let on = |n: u32| added.iter().find(|(no, _, _)| *no == n);
    let quote_sq = squash(&quote);
    if quote_sq.chars().filter(|c| c.is_alphanumeric()).count() < 3 {
        return Err("quote_mismatch"); // nothing checkable was quoted
    }
    let in_range = |s: u32, e: u32| -> Option<Vec<(u32, usize, &str)>> { (s..=e).map(|n| on(n).copied()).collect() };
    let (start, end, lines) = match in_range(start, end) {
        Some(lines) if squash(&lines.iter().map(|l| l.2).collect::<Vec<_>>().join("\n")).contains(&quote_sq) => (start, end, lines),
        found => {
            // Right code, wrong numbers: a quote found on exactly one added line is anchored there.
            let hits: Vec<&(u32, usize, &str)> = added.iter().filter(|(_, _, t)| quote_sq.len() >= 8 && squash(t).contains(&quote_sq)).collect();
            if hits.len() == 1 {
                (hits[0].0, hits[0].0, vec![*hits[0]])
            } else if found.is_none() {
                return Err("not_changed");
            } else {
                return Err("quote_mismatch");
            }
        }
    };
    let one_hunk = lines.iter().all(|l| l.1 == lines[0].1);
    let original = lines.iter().map(|l| l.2).collect::<Vec<_>>().join("\n");
    let suggestion = match item["replacement"].as_str() {
        Some(r) if one_hunk && !r.trim().is_empty() && squash(r) != squash(&original) && !r.contains("```") => {
            Some(r.trim_end_matches('\n').to_string())
        }
        _ => None,
    };
    let category = if CATEGORIES.contains(&category.as_str()) { category } else { "bug".to_string() };
    Ok(Finding { path: file.path.clone(), start_line: start, line: end, severity, category, quote, message, suggestion })
}

/// Ground every raw finding of one answer against its chunk, counting what is dropped; the second
/// list says what was dropped and why (for the run's log: an operator can see what the model said).
pub fn ground_all(items: &[Value], chunk: &[FileDiff], dropped: &mut Dropped) -> (Vec<Finding>, Vec<String>) {
    let mut out = Vec::new();
    let mut notes = Vec::new();
    for item in items {
        match ground(item, chunk) {
            Ok(f) => out.push(f),
            Err(reason) => {
                match reason {
                    "not_changed" => dropped.not_changed += 1,
                    "quote_mismatch" => dropped.quote_mismatch += 1,
                    _ => dropped.malformed += 1,
                }
                notes.push(format!("{}: {}", reason, item.to_string().chars().take(300).collect::<String>()));
            }
        }
    }
    (out, notes)
}

/// Does a summary describe this change? At least 5 words, mostly words, and at least one word of 4+
/// letters that also occurs in `context` (the title, the description and the diff): a small model's stray token
/// (`e-rror-handling.html`) or an essay about something else is left out rather than posted.
pub fn summary_grounded(summary: &str, context: &str) -> bool {
    let words: Vec<String> = summary.split_whitespace().map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()).to_lowercase()).collect();
    let wordy = words.iter().filter(|w| w.chars().count() >= 2 && w.chars().all(|c| c.is_alphabetic() || c == '\'' || c == '-')).count();
    if words.len() < 5 || wordy * 10 < words.len() * 6 {
        return false;
    }
    let context = context.to_lowercase();
    words.iter().any(|w| w.chars().count() >= 4 && context.contains(w.as_str()))
}

/// Most severe first; duplicates (overlapping lines of one file),
/// findings below `threshold` and those past `max` dropped and counted.
pub fn select(mut all: Vec<Finding>, threshold: &str, max: usize, dropped: &mut Dropped) -> Vec<Finding> {
    all.sort_by(|a, b| severity_rank(&b.severity).cmp(&severity_rank(&a.severity)).then(a.path.cmp(&b.path)).then(a.start_line.cmp(&b.start_line)));
    let min = severity_rank(threshold);
    let mut kept: Vec<Finding> = Vec::new();
    for f in all {
        let overlaps = kept.iter().any(|k| k.path == f.path && k.start_line <= f.line && f.start_line <= k.line);
        if overlaps {
            dropped.duplicate += 1;
        } else if severity_rank(&f.severity) < min {
            dropped.below_threshold += 1;
        } else if kept.len() >= max {
            dropped.over_limit += 1;
        } else {
            kept.push(f);
        }
    }
    kept
}

/// The inline comment's Markdown: severity, category, the problem, and a suggested change when there
/// is a replacement (GitHub shows it with a "Commit suggestion" button).
pub fn comment_body(f: &Finding) -> String {
    let mut body = format!("**{}** ({}): {}", f.severity, f.category, f.message.trim());
    if let Some(s) = &f.suggestion {
        body.push_str(&format!("\n\n```suggestion\n{}\n```", s));
    }
    body
}

/// The review API's comment object: single-line, or `start_line`..`line` for a range.
pub fn review_comment(f: &Finding) -> Value {
    let mut c = json!({"path": f.path, "line": f.line, "side": "RIGHT", "body": comment_body(f)});
    if f.start_line < f.line {
        c["start_line"] = json!(f.start_line);
        c["start_side"] = json!("RIGHT");
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diff::plan;
    use crate::diff::Budget;

    fn chunk() -> Vec<FileDiff> {
        let files = vec![json!({"filename": "src/a.rs", "status": "modified", "additions": 3,
            "patch": "@@ -1,3 +1,5 @@\n fn keep() {}\n-let x = 1;\n+let x = items.len() - 1;\n+for i in 0..x {\n+    total += i;\n }\n@@ -20,1 +22,2 @@\n ctx\n+let q = format!(\"SELECT * FROM t WHERE id = {}\", id);"})];
        plan(&files, &[], &Budget { total_tokens: 10_000, chunk_tokens: 5_000, max_chunks: 2 }).chunks.remove(0)
    }

    fn item(start: u32, end: u32, code: &str) -> Value {
        json!({"file": "src/a.rs", "start_line": start, "end_line": end, "severity": "high", "category": "bug",
               "code": code, "problem": "Off by one: the last item is skipped.", "replacement": "let x = items.len();"})
    }

    #[test]
    fn summaries_must_describe_the_change() {
        let ctx = "Cart total\n### src/cart.rs\n+pub fn total(prices: &[u64]) -> u64 { let mut sum = 0;";
        assert!(summary_grounded("Adds a total function that sums the cart prices in cents.", ctx));
        assert!(!summary_grounded("e-rror-handling.html", ctx));
        assert!(!summary_grounded("The state of California is known for its beaches and sunny weather.", ctx));
        assert!(!summary_grounded("{ } ( ) total prices 1 2 3 4 5 6", ctx));
    }

    #[test]
    fn grounded_findings_pass_and_carry_a_suggestion() {
        let mut d = Dropped::default();
        let (got, _) = ground_all(&[item(2, 2, "items.len() - 1")], &chunk(), &mut d);
        assert_eq!(d.total(), 0);
        assert_eq!((got[0].start_line, got[0].line), (2, 2));
        assert_eq!(got[0].suggestion.as_deref(), Some("let x = items.len();"));
        assert!(comment_body(&got[0]).contains("```suggestion\nlet x = items.len();\n```"));
    }

    #[test]
    fn ungrounded_findings_are_dropped_by_reason() {
        let mut d = Dropped::default();
        let items = vec![
            item(1, 1, "fn keep() {}"),                 // a context line, not an added one
            item(2, 2, "shopping cart in California"),  // quote nowhere in the diff
            item(3, 4, "items.len() - 1"),              // quote not on those lines, but also found once: re-anchored
            json!({"file": "src/other.rs", "start_line": 2, "end_line": 2, "severity": "low", "code": "x", "problem": "a problem here"}),
            json!({"file": "src/a.rs", "start_line": 5, "end_line": 2, "severity": "low", "code": "x", "problem": "reversed range"}),
            json!("not an object"),
        ];
        let (got, _) = ground_all(&items, &chunk(), &mut d);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].start_line, got[0].line), (2, 2));
        assert_eq!(d.not_changed, 2);
        assert_eq!(d.quote_mismatch, 1);
        assert_eq!(d.malformed, 2);
        assert_eq!(d.sentence(), "5 model findings dropped: 2 not about changed code, 1 quoted code not on the lines named, 2 malformed");
    }

    #[test]
    fn ranges_across_hunks_get_no_suggestion_and_select_dedupes() {
        let mut d = Dropped::default();
        let mut a = item(2, 3, "for i in 0..x");
        a["replacement"] = json!("for i in 0..=x {");
        let mut sql = item(23, 23, "SELECT * FROM t");
        sql["problem"] = json!("SQL built by string formatting: use a bound parameter.");
        let (got, _) = ground_all(&[a.clone(), a, sql], &chunk(), &mut d);
        assert_eq!(got.len(), 3);
        assert!(got[0].suggestion.is_some()); // lines 2-3 are one hunk
        let kept = select(got, "medium", 10, &mut d);
        assert_eq!(kept.len(), 2);
        assert_eq!(d.duplicate, 1);
        let c = review_comment(&kept.iter().find(|f| f.start_line == 2).unwrap().clone());
        assert_eq!((c["start_line"].as_u64(), c["line"].as_u64()), (Some(2), Some(3)));
        let mut low = Dropped::default();
        let mut f = kept[0].clone();
        f.severity = "low".into();
        assert!(select(vec![f], "medium", 10, &mut low).is_empty());
        assert_eq!(low.below_threshold, 1);
    }
}
