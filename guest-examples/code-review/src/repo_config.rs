//! `.github/wasmflow.yaml`: the repository's own review settings, read from the pull request's BASE
//! branch only (the head is whatever the PR's author pushed, so a PR cannot change how it is reviewed).
//!
//! The file is a small YAML subset, parsed here (the guest has no YAML crate): top-level `key: value`
//! lines, values that are scalars (plain, 'single' or "double" quoted, true/false, whole numbers),
//! flow lists `[a, "b"]`, or an indented block of `- item` lines or `key: value` lines; `#` comments.
//! Every problem is reported with its line number; a file with problems is not used at all, so a typo
//! never half-applies (the review goes on with the flow's settings, and the errors are posted once).
//!
//! ```yaml
//! ignore: ["docs/**", "*.snap"]
//! instructions:
//!   "src/db/**": Check every query for SQL injection.
//! language: French
//! severity_threshold: medium
//! auto_review: true
//! drafts: false
//! max_findings: 5
//! ```

/// Where the settings file lives in the repository.
pub const PATH: &str = ".github/wasmflow.yaml";
/// Its largest accepted size.
const MAX_BYTES: usize = 64 * 1024;

/// The keys the file may set.
pub const KEYS: &[&str] = &["ignore", "instructions", "language", "severity_threshold", "auto_review", "drafts", "max_findings"];

/// The repository's settings; `None` where the file does not set a key.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RepoConfig {
    pub ignore: Option<Vec<String>>,
    /// (glob, instruction) pairs, in file order.
    pub instructions: Vec<(String, String)>,
    pub language: Option<String>,
    pub severity_threshold: Option<String>,
    pub auto_review: Option<bool>,
    pub drafts: Option<bool>,
    pub max_findings: Option<usize>,
}

/// One problem in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Scalar(String, bool), // text, quoted
    List(Vec<(usize, String)>),
    Map(Vec<(usize, String, String)>),
}

fn problem(line: usize, message: impl Into<String>) -> Problem {
    Problem { line, message: message.into() }
}

/// The line without its `#` comment (a `#` inside quotes, or glued to a word, is text).
fn strip_comment(line: &str) -> &str {
    let mut quote: Option<char> = None;
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == '#' && prev.is_whitespace() => return &line[..i],
            None => {}
        }
        prev = c;
    }
    line
}

/// A scalar: quoted (the quotes removed, `\"` and `\\` unescaped in double quotes) or plain.
fn scalar(text: &str, line: usize) -> Result<(String, bool), Problem> {
    let t = text.trim();
    for q in ['"', '\''] {
        if t.starts_with(q) {
            if t.len() < 2 || !t.ends_with(q) {
                return Err(problem(line, format!("unterminated {} quote", if q == '"' { "double" } else { "single" })));
            }
            let inner = &t[1..t.len() - 1];
            let value = if q == '"' { inner.replace("\\\"", "\"").replace("\\\\", "\\") } else { inner.replace("''", "'") };
            return Ok((value, true));
        }
    }
    if t.starts_with('{') || t.starts_with('&') || t.starts_with('*') || t.starts_with('|') || t.starts_with('>') {
        return Err(problem(line, format!("{:?}: only plain or quoted values, [lists] and indented blocks are supported", t)));
    }
    Ok((t.to_string(), false))
}

/// `[a, "b, c", d]` as its items.
fn flow_list(text: &str, line: usize) -> Result<Vec<(usize, String)>, Problem> {
    let t = text.trim();
    if !t.ends_with(']') {
        return Err(problem(line, "a [list] must close with ] on the same line"));
    }
    let inner = &t[1..t.len() - 1];
    let mut items = Vec::new();
    let mut current = String::new();
    let mut quote: Option<char> = None;
    for c in inner.chars() {
        match quote {
            Some(q) if c == q => {
                quote = None;
                current.push(c)
            }
            Some(_) => current.push(c),
            None if c == '"' || c == '\'' => {
                quote = Some(c);
                current.push(c)
            }
            None if c == ',' => {
                items.push(std::mem::take(&mut current));
            }
            None if c == '[' || c == ']' => return Err(problem(line, "nested lists are not supported")),
            None => current.push(c),
        }
    }
    if quote.is_some() {
        return Err(problem(line, "unterminated quote in a [list]"));
    }
    if !current.trim().is_empty() || !items.is_empty() {
        items.push(current);
    }
    let mut out = Vec::new();
    for item in items {
        if item.trim().is_empty() {
            return Err(problem(line, "an empty item in a [list]"));
        }
        out.push((line, scalar(&item, line)?.0));
    }
    Ok(out)
}

/// `key: rest` split at the first `: ` (or a trailing `:`) outside quotes.
fn split_key(text: &str, line: usize) -> Result<(String, String), Problem> {
    let t = text.trim();
    let mut quote: Option<char> = None;
    let bytes: Vec<char> = t.chars().collect();
    let mut byte_at = 0usize;
    for (i, c) in bytes.iter().enumerate() {
        match quote {
            Some(q) if *c == q => quote = None,
            Some(_) => {}
            None if *c == '"' || *c == '\'' => quote = Some(*c),
            None if *c == ':' && (i + 1 == bytes.len() || bytes[i + 1].is_whitespace()) => {
                let key = scalar(&t[..byte_at], line)?.0;
                if key.is_empty() {
                    return Err(problem(line, "a key is missing before ':'"));
                }
                return Ok((key, t[byte_at + 1..].trim().to_string()));
            }
            None => {}
        }
        byte_at += c.len_utf8();
    }
    Err(problem(line, format!("expected `key: value`, got {:?}", t.chars().take(60).collect::<String>())))
}

/// The file as (line, key, node) entries, or every problem found.
fn parse(text: &str) -> Result<Vec<(usize, String, Node)>, Vec<Problem>> {
    let mut entries: Vec<(usize, String, Node)> = Vec::new();
    let mut problems = Vec::new();
    let mut open: Option<(usize, String, Vec<(usize, String)>, Vec<(usize, String, String)>, usize)> = None;
    let lines: Vec<&str> = text.lines().collect();
    let close = |open: &mut Option<(usize, String, Vec<(usize, String)>, Vec<(usize, String, String)>, usize)>,
                     entries: &mut Vec<(usize, String, Node)>| {
        if let Some((no, key, list, map, _)) = open.take() {
            let node = if !map.is_empty() { Node::Map(map) } else { Node::List(list) };
            entries.push((no, key, node));
        }
    };
    for (i, raw) in lines.iter().enumerate() {
        let no = i + 1;
        if i == 0 && raw.trim() == "---" {
            continue;
        }
        let body = strip_comment(raw);
        if body.trim().is_empty() {
            continue;
        }
        if body.starts_with('\t') || body.trim_start_matches(' ').starts_with('\t') {
            problems.push(problem(no, "tabs are not allowed for indentation in YAML; use spaces"));
            continue;
        }
        let indent = body.len() - body.trim_start().len();
        let content = body.trim();
        if indent == 0 {
            close(&mut open, &mut entries);
            match split_key(content, no) {
                Ok((key, rest)) if rest.is_empty() => open = Some((no, key, Vec::new(), Vec::new(), 0)),
                Ok((key, rest)) if rest.starts_with('[') => match flow_list(&rest, no) {
                    Ok(items) => entries.push((no, key, Node::List(items))),
                    Err(p) => problems.push(p),
                },
                Ok((key, rest)) => match scalar(&rest, no) {
                    Ok((v, quoted)) => entries.push((no, key, Node::Scalar(v, quoted))),
                    Err(p) => problems.push(p),
                },
                Err(p) => problems.push(p),
            }
            continue;
        }
        let block = match open.as_mut() {
            Some(b) => b,
            None => {
                problems.push(problem(no, "indented line without a `key:` above it"));
                continue;
            }
        };
        if block.4 == 0 {
            block.4 = indent;
        } else if indent != block.4 {
            problems.push(problem(no, format!("inconsistent indentation ({} spaces; the block above uses {})", indent, block.4)));
            continue;
        }
        if let Some(item) = content.strip_prefix("- ").or_else(|| if content == "-" { Some("") } else { None }) {
            if !block.3.is_empty() {
                problems.push(problem(no, "a `- item` inside a block of `key: value` lines"));
            } else if item.trim().is_empty() {
                problems.push(problem(no, "an empty list item"));
            } else {
                match scalar(item, no) {
                    Ok((v, _)) => block.2.push((no, v)),
                    Err(p) => problems.push(p),
                }
            }
        } else {
            if !block.2.is_empty() {
                problems.push(problem(no, "a `key: value` line inside a list of `- item` lines"));
                continue;
            }
            match split_key(content, no).and_then(|(k, v)| scalar(&v, no).map(|(v, _)| (k, v))) {
                Ok((k, v)) if v.is_empty() => problems.push(problem(no, format!("{}: a value is missing", k))),
                Ok((k, v)) => block.3.push((no, k, v)),
                Err(p) => problems.push(p),
            }
        }
    }
    close(&mut open, &mut entries);
    if problems.is_empty() { Ok(entries) } else { Err(problems) }
}

fn as_bool(key: &str, node: &Node, line: usize) -> Result<bool, Problem> {
    match node {
        Node::Scalar(v, false) if ["true", "yes", "on"].contains(&v.to_ascii_lowercase().as_str()) => Ok(true),
        Node::Scalar(v, false) if ["false", "no", "off"].contains(&v.to_ascii_lowercase().as_str()) => Ok(false),
        _ => Err(problem(line, format!("{}: expected true or false", key))),
    }
}

fn as_text(key: &str, node: &Node, line: usize) -> Result<String, Problem> {
    match node {
        Node::Scalar(v, _) if !v.trim().is_empty() => Ok(v.trim().to_string()),
        _ => Err(problem(line, format!("{}: expected a text value", key))),
    }
}

impl RepoConfig {
    /// Parse and check the file; `Err` lists every problem with its line number.
    pub fn parse(text: &str) -> Result<RepoConfig, Vec<Problem>> {
        if text.len() > MAX_BYTES {
            return Err(vec![problem(1, format!("the file is {} bytes; at most {} are read", text.len(), MAX_BYTES))]);
        }
        let entries = parse(text)?;
        let mut cfg = RepoConfig::default();
        let mut problems = Vec::new();
        let mut seen: Vec<String> = Vec::new();
        for (line, key, node) in &entries {
            let line = *line;
            if seen.contains(key) {
                problems.push(problem(line, format!("{} is set twice", key)));
                continue;
            }
            seen.push(key.clone());
            let result: Result<(), Problem> = (|| {
                match key.as_str() {
                    "ignore" => match node {
                        Node::List(items) => cfg.ignore = Some(items.iter().map(|(_, v)| v.clone()).collect()),
                        Node::Scalar(v, _) if !v.is_empty() => cfg.ignore = Some(vec![v.clone()]),
                        _ => return Err(problem(line, "ignore: expected a list of globs")),
                    },
                    "instructions" => match node {
                        Node::Map(pairs) => cfg.instructions = pairs.iter().map(|(_, k, v)| (k.clone(), v.clone())).collect(),
                        _ => return Err(problem(line, "instructions: expected indented `\"glob\": instruction` lines")),
                    },
                    "language" => cfg.language = Some(as_text(key, node, line)?),
                    "severity_threshold" => {
                        let v = as_text(key, node, line)?.to_ascii_lowercase();
                        if !crate::findings::SEVERITIES.contains(&v.as_str()) {
                            return Err(problem(line, format!("severity_threshold: expected low, medium or high, got {:?}", v)));
                        }
                        cfg.severity_threshold = Some(v);
                    }
                    "auto_review" => cfg.auto_review = Some(as_bool(key, node, line)?),
                    "drafts" => cfg.drafts = Some(as_bool(key, node, line)?),
                    "max_findings" => {
                        let v = as_text(key, node, line)?;
                        match v.parse::<usize>() {
                            Ok(n) if n <= 50 => cfg.max_findings = Some(n),
                            _ => return Err(problem(line, format!("max_findings: expected a whole number from 0 to 50, got {:?}", v))),
                        }
                    }
                    other => {
                        return Err(problem(line, format!("unknown key {:?} (known: {})", other, KEYS.join(", "))));
                    }
                }
                Ok(())
            })();
            if let Err(p) = result {
                problems.push(p);
            }
        }
        if problems.is_empty() { Ok(cfg) } else { Err(problems) }
    }

}

/// The instructions for the files of a chunk: each (glob, text) whose glob matches one of `paths`.
pub fn instructions_for(pairs: &[(String, String)], paths: &[&str]) -> Vec<String> {
    pairs
        .iter()
        .filter(|(glob, _)| paths.iter().any(|p| crate::glob::matches(glob, p)))
        .map(|(glob, text)| format!("For files matching `{}`: {}", glob, text))
        .collect()
}

/// The problems as one Markdown list.
pub fn problems_markdown(problems: &[Problem]) -> String {
    problems.iter().map(|p| format!("- line {}: {}", p.line, p.message.replace('`', "'"))).collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_parses() {
        let text = "---\n# review settings\nignore: [\"docs/**\", '*.snap']\ninstructions:\n  \"src/db/**\": Check queries for injection  # why\n  'web/*.ts': Prefer const\nlanguage: French\nseverity_threshold: Medium\nauto_review: false\ndrafts: yes\nmax_findings: 3\n";
        let c = RepoConfig::parse(text).unwrap();
        assert_eq!(c.ignore, Some(vec!["docs/**".to_string(), "*.snap".to_string()]));
        assert_eq!(c.instructions[0], ("src/db/**".to_string(), "Check queries for injection".to_string()));
        assert_eq!(c.language.as_deref(), Some("French"));
        assert_eq!(c.severity_threshold.as_deref(), Some("medium"));
        assert_eq!((c.auto_review, c.drafts, c.max_findings), (Some(false), Some(true), Some(3)));
        assert_eq!(instructions_for(&c.instructions, &["src/db/q.rs"]), vec!["For files matching `src/db/**`: Check queries for injection"]);
        let block = RepoConfig::parse("ignore:\n  - a/**\n  - \"b c\"\n").unwrap();
        assert_eq!(block.ignore, Some(vec!["a/**".to_string(), "b c".to_string()]));
    }

    #[test]
    fn problems_carry_line_numbers() {
        let text = "language: French\nmax_findigns: 3\nauto_review: maybe\n\tdrafts: true\nseverity_threshold: urgent\nignore: [a, \"b\nlanguage: German\n";
        let p = RepoConfig::parse(text).unwrap_err();
        let lines: Vec<usize> = p.iter().map(|p| p.line).collect();
        assert_eq!(lines, vec![4, 6], "{:?}", p); // syntax first: nothing else is checked until it parses
        let p = RepoConfig::parse("language: French\nmax_findigns: 3\nauto_review: maybe\nseverity_threshold: urgent\nlanguage: German\n").unwrap_err();
        let lines: Vec<usize> = p.iter().map(|p| p.line).collect();
        assert_eq!(lines, vec![2, 3, 4, 5], "{:?}", p);
        assert!(p[0].message.contains("unknown key \"max_findigns\""));
        assert!(problems_markdown(&p).starts_with("- line 2: unknown key"));
        assert!(RepoConfig::parse("instructions:\n  - a\n  b: c\n").is_err());
        assert!(RepoConfig::parse("  indented: first\n").is_err());
    }
}
