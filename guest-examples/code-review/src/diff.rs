//! From GitHub's file list to what the model reads: hunks parsed, deletion-only hunks dropped, files
//! ranked, and everything fitted to a token budget split into chunks (one LLM call each). Nothing is
//! dropped silently: every file that is not reviewed in full lands in one of the plan's lists, and the
//! comment names them.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::glob;

/// Tokens are estimated as characters / 4: the guest has no tokenizer, and for code this errs on the
/// side of more tokens than BPE tokenizers count, so a budget is not overrun.
pub fn estimate_tokens(text: &str) -> usize {
    (text.len() + 3) / 4
}

#[derive(Debug, Clone)]
pub struct Line {
    pub kind: char, // '+', '-' or ' '
    pub text: String,
    pub new_no: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct Hunk {
    pub header: String,
    pub lines: Vec<Line>,
}

impl Hunk {
    pub fn adds(&self) -> bool {
        self.lines.iter().any(|l| l.kind == '+')
    }
}

/// Parse a unified-diff patch (GitHub's `patch` field) into hunks with new-file line numbers.
pub fn parse_patch(patch: &str) -> Vec<Hunk> {
    let mut hunks: Vec<Hunk> = Vec::new();
    let mut new_no: u32 = 0;
    for raw in patch.lines() {
        if raw.starts_with("@@") {
            new_no = parse_new_start(raw).unwrap_or(1);
            hunks.push(Hunk { header: raw.to_string(), lines: Vec::new() });
            continue;
        }
        let hunk = match hunks.last_mut() {
            Some(h) => h,
            None => continue,
        };
        if raw.starts_with('\\') {
            continue; // "\ No newline at end of file"
        }
        let (kind, text) = match raw.chars().next() {
            Some('+') => ('+', &raw[1..]),
            Some('-') => ('-', &raw[1..]),
            Some(' ') => (' ', &raw[1..]),
            _ => (' ', raw),
        };
        let no = if kind == '-' {
            None
        } else {
            new_no += 1;
            Some(new_no - 1)
        };
        hunk.lines.push(Line { kind, text: text.to_string(), new_no: no });
    }
    hunks
}

fn parse_new_start(header: &str) -> Option<u32> {
    let plus = header.find(" +")?;
    let rest = &header[plus + 2..];
    let end = rest.find(|c: char| c == ',' || c == ' ').unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// What kind of file, for ranking: source first, then tests, build/config, docs, the rest.
pub fn file_class(path: &str) -> u8 {
    let lower = path.to_ascii_lowercase();
    let ext = lower.rsplit('.').next().unwrap_or("");
    if is_test(path) {
        return 1;
    }
    match ext {
        "rs" | "py" | "go" | "js" | "jsx" | "ts" | "tsx" | "java" | "kt" | "c" | "h" | "cc" | "cpp" | "hpp" | "cs"
        | "rb" | "php" | "swift" | "scala" | "sh" | "sql" | "m" | "mm" | "dart" | "lua" | "ex" | "exs" | "zig" => 0,
        "toml" | "yaml" | "yml" | "json" | "ini" | "cfg" | "gradle" | "xml" | "mk" | "cmake" | "dockerfile" => 2,
        "md" | "rst" | "txt" | "adoc" => 3,
        _ => {
            if lower.ends_with("dockerfile") || lower.ends_with("makefile") {
                2
            } else {
                4
            }
        }
    }
}

/// Test files by the usual conventions of the common languages.
pub fn is_test(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    let name = lower.rsplit('/').next().unwrap_or("");
    lower.starts_with("tests/") || lower.starts_with("test/") || lower.contains("/tests/") || lower.contains("/test/")
        || lower.contains("__tests__/") || lower.starts_with("spec/") || lower.contains("/spec/")
        || name.starts_with("test_") || name.contains("_test.") || name.contains(".test.") || name.contains(".spec.")
        || name.ends_with("_tests.rs") || name.ends_with("test.java") || name.ends_with("tests.cs")
}

/// Is this a source file (code, not tests/docs/config)?
pub fn is_source(path: &str) -> bool {
    file_class(path) == 0
}

/// One file as the model will see it.
#[derive(Debug, Clone)]
pub struct FileDiff {
    pub path: String,
    pub status: String,
    pub additions: u64,
    pub deletions: u64,
    pub hunks: Vec<Hunk>,
    pub total_hunks: usize,
    pub class: u8,
    pub rendered: String,
    pub tokens: usize,
    pub clipped: bool,
}

impl FileDiff {
    /// New-file lines shown to the model: the lines where an inline comment is accepted.
    pub fn commentable(&self) -> BTreeSet<u32> {
        self.hunks.iter().flat_map(|h| h.lines.iter().filter_map(|l| l.new_no)).collect()
    }

    fn render(&mut self) {
        let mut out = format!("### {} ({}, +{} -{})\n", self.path, self.status, self.additions, self.deletions);
        for h in &self.hunks {
            out.push_str(&h.header);
            out.push('\n');
            for l in &h.lines {
                match l.new_no {
                    Some(n) => out.push_str(&format!("{:>5} {}{}\n", n, l.kind, l.text)),
                    None => out.push_str(&format!("      {}{}\n", l.kind, l.text)),
                }
            }
        }
        self.tokens = estimate_tokens(&out);
        self.rendered = out;
    }

    /// Keep the leading hunks that fit in `budget` tokens (at least one line of the first hunk).
    fn clip(&mut self, budget: usize) {
        while self.hunks.len() > 1 && self.tokens > budget {
            self.hunks.pop();
            self.render();
        }
        if self.tokens > budget {
            if let Some(h) = self.hunks.first_mut() {
                let keep = (h.lines.len() * budget / self.tokens.max(1)).max(1);
                h.lines.truncate(keep);
            }
            self.render();
        }
        self.clipped = true;
    }
}

/// The review plan: chunks for the model and, by name, everything not reviewed in full.
#[derive(Debug, Default)]
pub struct Plan {
    pub chunks: Vec<Vec<FileDiff>>,
    pub deleted: Vec<String>,
    pub ignored: Vec<String>,
    pub no_patch: Vec<String>,
    pub deletions_only: Vec<String>,
    pub left_out: Vec<(String, usize)>,
    pub clipped: Vec<(String, usize, usize)>,
    pub used_tokens: usize,
    pub dropped_hunks: usize,
}

impl Plan {
    pub fn reviewed_files(&self) -> usize {
        self.chunks.iter().map(|c| c.len()).sum()
    }

    pub fn find(&self, path: &str) -> Option<&FileDiff> {
        self.chunks.iter().flat_map(|c| c.iter()).find(|f| f.path == path)
    }
}

/// Budgets for [`plan`].
#[derive(Debug, Clone)]
pub struct Budget {
    pub total_tokens: usize,
    pub chunk_tokens: usize,
    pub max_chunks: usize,
}

/// Turn GitHub's file list into a plan within `budget`.
pub fn plan(files: &[Value], ignore: &[String], budget: &Budget) -> Plan {
    let mut plan = Plan::default();
    let mut candidates: Vec<FileDiff> = Vec::new();
    for f in files {
        let path = f["filename"].as_str().unwrap_or("").to_string();
        let status = f["status"].as_str().unwrap_or("modified").to_string();
        if path.is_empty() {
            continue;
        }
        if status == "removed" {
            plan.deleted.push(path);
            continue;
        }
        if ignore.iter().any(|g| glob::matches(g, &path)) {
            plan.ignored.push(path);
            continue;
        }
        let patch = match f["patch"].as_str() {
            Some(p) => p,
            None => {
                plan.no_patch.push(path);
                continue;
            }
        };
        let all = parse_patch(patch);
        let total = all.len();
        let kept: Vec<Hunk> = all.into_iter().filter(|h| h.adds()).collect();
        plan.dropped_hunks += total - kept.len();
        if kept.is_empty() {
            plan.deletions_only.push(path);
            continue;
        }
        let mut fd = FileDiff {
            class: file_class(&path),
            path,
            status,
            additions: f["additions"].as_u64().unwrap_or(0),
            deletions: f["deletions"].as_u64().unwrap_or(0),
            total_hunks: kept.len(),
            hunks: kept,
            rendered: String::new(),
            tokens: 0,
            clipped: false,
        };
        fd.render();
        candidates.push(fd);
    }
    // Source before tests before config before docs; within a class, the biggest change first.
    candidates.sort_by(|a, b| a.class.cmp(&b.class).then(b.additions.cmp(&a.additions)).then(a.path.cmp(&b.path)));

    let chunk_budget = budget.chunk_tokens.max(64);
    let mut current: Vec<FileDiff> = Vec::new();
    let mut current_tokens = 0usize;
    for mut fd in candidates {
        if fd.tokens > chunk_budget {
            fd.clip(chunk_budget); // one file never needs more than one call
        }
        let room_total = budget.total_tokens.saturating_sub(plan.used_tokens);
        if fd.tokens > room_total {
            // Clip into what is left of the budget, unless that leaves too little to be worth reading.
            if room_total >= 400 && !fd.clipped {
                fd.clip(room_total);
            } else {
                plan.left_out.push((fd.path.clone(), fd.tokens));
                continue;
            }
        }
        if current_tokens + fd.tokens > chunk_budget && !current.is_empty() {
            if plan.chunks.len() + 2 > budget.max_chunks {
                plan.left_out.push((fd.path.clone(), fd.tokens)); // a smaller file may still fit
                continue;
            }
            plan.chunks.push(std::mem::take(&mut current));
            current_tokens = 0;
        }
        if fd.clipped {
            plan.clipped.push((fd.path.clone(), fd.hunks.len(), fd.total_hunks));
        }
        plan.used_tokens += fd.tokens;
        current_tokens += fd.tokens;
        current.push(fd);
    }
    if !current.is_empty() {
        plan.chunks.push(current);
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hunks_and_line_numbers() {
        let hunks = parse_patch("@@ -1,2 +1,3 @@\n a\n-b\n+c\n+d\n@@ -10,2 +11,1 @@\n-x\n-y\n");
        assert_eq!(hunks.len(), 2);
        assert_eq!(hunks[0].lines[2].new_no, Some(2));
        assert_eq!(hunks[0].lines[3].new_no, Some(3));
        assert!(!hunks[1].adds());
    }

    #[test]
    fn plan_drops_and_names() {
        let files = vec![
            json!({"filename": "Cargo.lock", "status": "modified", "patch": "@@ -1 +1 @@\n-a\n+b"}),
            json!({"filename": "old.rs", "status": "removed"}),
            json!({"filename": "src/a.rs", "status": "modified", "additions": 1, "patch": "@@ -1 +1 @@\n-a\n+b"}),
            json!({"filename": "src/gone.rs", "status": "modified", "patch": "@@ -1,2 +1 @@\n-a\n b"}),
        ];
        let p = plan(&files, &["*.lock".to_string()], &Budget { total_tokens: 1000, chunk_tokens: 500, max_chunks: 2 });
        assert_eq!(p.ignored, vec!["Cargo.lock"]);
        assert_eq!(p.deleted, vec!["old.rs"]);
        assert_eq!(p.deletions_only, vec!["src/gone.rs"]);
        assert_eq!(p.reviewed_files(), 1);
    }
}
