//! Glob patterns for ignore rules, gitignore-style: `*` and `?` stay inside one path segment, `**`
//! crosses segments, and a pattern without `/` matches the file's name in any directory.

/// True if `path` (a repository path like `src/a/b.rs`) matches `pattern`.
pub fn matches(pattern: &str, path: &str) -> bool {
    let pattern = pattern.trim().trim_start_matches("./");
    if pattern.is_empty() {
        return false;
    }
    if let Some(dir) = pattern.strip_suffix('/') {
        // `vendor/` means everything under any directory named vendor.
        let anchored = format!("{}/**", dir.trim_start_matches('/'));
        let dir = dir.trim_start_matches('/');
        return matches(&anchored, path) || (!dir.contains('/') && path.split('/').rev().skip(1).any(|seg| seg == dir));
    }
    if !pattern.contains('/') {
        let name = path.rsplit('/').next().unwrap_or(path);
        return glob(pattern.as_bytes(), name.as_bytes());
    }
    glob(pattern.trim_start_matches('/').as_bytes(), path.as_bytes())
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    if p.is_empty() {
        return s.is_empty();
    }
    if p.len() >= 2 && p[0] == b'*' && p[1] == b'*' {
        // `**/rest` matches rest here or after any `/`; a bare `**` matches anything, slashes included.
        if p.len() >= 3 && p[2] == b'/' {
            let rest = &p[3..];
            if glob(rest, s) {
                return true;
            }
            return (0..s.len()).any(|i| s[i] == b'/' && glob(rest, &s[i + 1..]));
        }
        let rest = &p[2..];
        return (0..=s.len()).any(|i| glob(rest, &s[i..]));
    }
    match p[0] {
        b'*' => {
            for i in 0..=s.len() {
                if i > 0 && s[i - 1] == b'/' {
                    break;
                }
                if glob(&p[1..], &s[i..]) {
                    return true;
                }
            }
            false
        }
        b'?' => !s.is_empty() && s[0] != b'/' && glob(&p[1..], &s[1..]),
        c => !s.is_empty() && s[0] == c && glob(&p[1..], &s[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn globs() {
        assert!(matches("*.lock", "Cargo.lock"));
        assert!(matches("*.lock", "a/b/yarn.lock"));
        assert!(matches("vendor/**", "vendor/x/y.go"));
        assert!(!matches("vendor/**", "src/vendor.rs"));
        assert!(matches("**/generated/**", "a/generated/b.rs"));
        assert!(matches("**/generated/**", "generated/b.rs"));
        assert!(matches("*.min.js", "web/app.min.js"));
        assert!(!matches("src/*.rs", "src/a/b.rs"));
        assert!(matches("src/**/*.rs", "src/a/b.rs"));
        assert!(matches("node_modules/", "web/node_modules/x.js"));
    }
}
