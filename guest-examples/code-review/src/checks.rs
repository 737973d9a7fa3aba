//! Deterministic checks beside the model, so the comment is worth reading with any model (or none):
//! size and risk, secrets-like strings added, TODO/FIXME added, source changed without tests.

use serde_json::Value;

use crate::diff::{is_source, is_test, parse_patch};

#[derive(Debug, Clone)]
pub struct SecretHit {
    pub path: String,
    pub line: u32,
    pub kind: &'static str,
    pub preview: String,
}

#[derive(Debug, Clone)]
pub struct Todo {
    pub path: String,
    pub line: u32,
    pub text: String,
}

#[derive(Debug, Default)]
pub struct Checks {
    pub files: usize,
    pub additions: u64,
    pub deletions: u64,
    pub size: &'static str,
    pub risk: &'static str,
    pub risk_reasons: Vec<String>,
    pub secrets: Vec<SecretHit>,
    pub todos: Vec<Todo>,
    pub untested: Vec<String>,
    pub tests_touched: usize,
}

/// Run every check over the PR's files (ignored files included: a key in a lock file is still a key).
pub fn run(files: &[Value]) -> Checks {
    let mut c = Checks { files: files.len(), ..Checks::default() };
    let mut sources: Vec<String> = Vec::new();
    for f in files {
        let path = f["filename"].as_str().unwrap_or("");
        c.additions += f["additions"].as_u64().unwrap_or(0);
        c.deletions += f["deletions"].as_u64().unwrap_or(0);
        let status = f["status"].as_str().unwrap_or("");
        if is_test(path) {
            c.tests_touched += 1;
        } else if is_source(path) && status != "removed" && f["additions"].as_u64().unwrap_or(0) > 0 {
            sources.push(path.to_string());
        }
        if let Some(reason) = sensitive(path) {
            if !c.risk_reasons.iter().any(|r| r == &reason) {
                c.risk_reasons.push(reason);
            }
        }
        let patch = match f["patch"].as_str() {
            Some(p) => p,
            None => continue,
        };
        for hunk in parse_patch(patch) {
            for line in hunk.lines.iter().filter(|l| l.kind == '+') {
                let no = line.new_no.unwrap_or(0);
                if let Some((kind, preview)) = secret_like(&line.text) {
                    c.secrets.push(SecretHit { path: path.to_string(), line: no, kind, preview });
                }
                if has_todo(&line.text) {
                    c.todos.push(Todo { path: path.to_string(), line: no, text: line.text.trim().chars().take(100).collect() });
                }
            }
        }
    }
    if c.tests_touched == 0 {
        c.untested = sources;
    }
    let lines = c.additions + c.deletions;
    c.size = match lines {
        0..=49 => "small",
        50..=299 => "medium",
        300..=999 => "large",
        _ => "very large",
    };
    c.risk = if !c.secrets.is_empty() {
        "high"
    } else if lines >= 1000 || (!c.risk_reasons.is_empty() && lines >= 300) {
        "elevated"
    } else if !c.risk_reasons.is_empty() || lines >= 300 || !c.untested.is_empty() {
        "moderate"
    } else {
        "low"
    };
    c
}

fn sensitive(path: &str) -> Option<String> {
    let lower = path.to_ascii_lowercase();
    let name = lower.rsplit('/').next().unwrap_or("");
    if lower.starts_with(".github/workflows/") {
        return Some("CI workflows".to_string());
    }
    if name == "dockerfile" || name.ends_with(".dockerfile") {
        return Some("container build".to_string());
    }
    if lower.contains("migration") || name.ends_with(".sql") {
        return Some("database schema or migrations".to_string());
    }
    if ["auth", "security", "crypto", "password", "secret", "token", "permission"].iter().any(|w| lower.contains(w)) {
        return Some("authentication/security code".to_string());
    }
    if ["cargo.toml", "package.json", "requirements.txt", "go.mod", "pyproject.toml", "pom.xml", "build.gradle", "gemfile"]
        .contains(&name)
    {
        return Some("dependencies".to_string());
    }
    None
}

fn has_todo(text: &str) -> bool {
    ["TODO", "FIXME", "XXX", "HACK"].iter().any(|w| contains_word(text, w))
}

fn contains_word(text: &str, word: &str) -> bool {
    let bytes = text.as_bytes();
    let mut start = 0;
    while let Some(pos) = text[start..].find(word) {
        let at = start + pos;
        let before = at == 0 || !bytes[at - 1].is_ascii_alphanumeric();
        let end = at + word.len();
        let after = end >= bytes.len() || !bytes[end].is_ascii_alphanumeric();
        if before && after {
            return true;
        }
        start = at + 1;
    }
    false
}

fn run_of(bytes: &[u8], from: usize, ok: impl Fn(u8) -> bool) -> usize {
    bytes[from..].iter().take_while(|b| ok(**b)).count()
}

fn token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

fn mask(value: &str) -> String {
    let head: String = value.chars().take(4).collect();
    format!("{}…", head)
}

/// A secret-looking string on an added line: (what it looks like, a masked preview).
pub fn secret_like(text: &str) -> Option<(&'static str, String)> {
    let bytes = text.as_bytes();
    if text.contains("-----BEGIN") && text.contains("PRIVATE KEY") {
        return Some(("private key", "-----BEGIN … PRIVATE KEY".to_string()));
    }
    let prefixes: [(&str, &str, usize); 9] = [
        ("AKIA", "AWS access key id", 16),
        ("ASIA", "AWS temporary access key id", 16),
        ("ghp_", "GitHub token", 30),
        ("ghs_", "GitHub token", 30),
        ("gho_", "GitHub token", 30),
        ("github_pat_", "GitHub token", 22),
        ("sk-", "API secret key", 20),
        ("xoxb-", "Slack token", 10),
        ("AIza", "Google API key", 30),
    ];
    for (prefix, kind, min) in prefixes.iter() {
        let mut start = 0;
        while let Some(pos) = text[start..].find(prefix) {
            let at = start + pos;
            let boundary = at == 0 || !bytes[at - 1].is_ascii_alphanumeric();
            let end = at + prefix.len();
            let run = if *prefix == "AKIA" || *prefix == "ASIA" {
                run_of(bytes, end, |b| b.is_ascii_uppercase() || b.is_ascii_digit())
            } else {
                run_of(bytes, end, token_char)
            };
            if boundary && run >= *min {
                return Some((kind, mask(&text[at..end + run])));
            }
            start = at + 1;
        }
    }
    // `password = "..."`, `api_key: '...'`: a literal assigned to a secret-sounding name.
    let lower = text.to_ascii_lowercase();
    for key in ["password", "passwd", "secret", "api_key", "apikey", "access_key", "auth_token", "token", "private_key"].iter() {
        let mut start = 0;
        while let Some(pos) = lower[start..].find(key) {
            let mut i = start + pos + key.len();
            start = start + pos + 1;
            // skip the rest of the identifier, closing quotes and spaces: `"password":`, `PASSWORD_X =`
            i += run_of(bytes, i, |b| b.is_ascii_alphanumeric() || b == b'_');
            i += run_of(bytes, i, |b| b == b'"' || b == b'\'' || b == b' ');
            if i >= bytes.len() || !(bytes[i] == b'=' || bytes[i] == b':') {
                continue;
            }
            i += 1;
            i += run_of(bytes, i, |b| b == b'=' || b == b' ' || b == b':');
            if i >= bytes.len() || !(bytes[i] == b'"' || bytes[i] == b'\'') {
                continue;
            }
            let quote = bytes[i];
            let value_len = run_of(bytes, i + 1, |b| b != quote);
            let value = &text[i + 1..i + 1 + value_len];
            let v = value.to_ascii_lowercase();
            let placeholder = ["${", "{{", "<", "xxx", "***", "changeme", "example", "dummy", "your", "placeholder", "redacted", "test", "env"]
                .iter()
                .any(|p| v.contains(p));
            if value_len >= 8 && !placeholder && !value.contains(' ') {
                return Some(("hard-coded credential", mask(value)));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets() {
        assert!(secret_like("let k = \"AKIAIOSFODNN7EXAMPLE\";").is_some());
        assert!(secret_like("token: ghp_abcdefghijklmnopqrstuvwxyz0123456789").is_some());
        assert!(secret_like("password = \"hunter2hunter2\"").is_some());
        assert!(secret_like("password = os.environ[\"PW\"]").is_none());
        assert!(secret_like("task-runner and sk-short").is_none());
        assert!(secret_like("-----BEGIN RSA PRIVATE KEY-----").is_some());
    }

    #[test]
    fn todos() {
        assert!(has_todo("// TODO: fix"));
        assert!(!has_todo("let todos = 1; // TODOS"));
    }
}
