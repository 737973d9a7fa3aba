//! The flow's settings (`config:` in flows.yaml), with defaults that suit a mid-size hosted model.
//!
//! Values are read with the SDK's typed getters, so a value of the wrong type fails the run with a
//! message naming the key (`config.max_calls: expected a whole number ...`) instead of being ignored.

use wasmflow::{config, llm};

use crate::decision::Rules;
use crate::diff::Budget;
use crate::repo_config::RepoConfig;

/// Paths left out of the review unless `ignore` replaces this list (`extra_ignore` adds to it).
pub const DEFAULT_IGNORE: &[&str] = &[
    "*.lock", "package-lock.json", "pnpm-lock.yaml", "yarn.lock", "go.sum", "poetry.lock", "Pipfile.lock",
    "composer.lock", "Gemfile.lock", "vendor/", "third_party/", "node_modules/", "dist/", "*.min.js", "*.min.css",
    "*.map", "**/generated/**", "*.generated.*", "*_generated.*", "*.pb.go", "*_pb2.py", "*.snap", "*.svg",
];

/// Tokens kept free in each call for the instructions, besides the answer.
const PROMPT_TOKENS: usize = 700;
/// The largest diff chunk per call, whatever the model's context.
const MAX_CHUNK_TOKENS: usize = 12_000;
/// The smallest diff chunk per call, even for a tiny context.
const MIN_CHUNK_TOKENS: usize = 256;

/// Everything the review reads from `config:`.
pub struct Config {
    /// Whether an event is reviewed at all.
    pub rules: Rules,
    /// Globs of paths left out of the review.
    pub ignore: Vec<String>,
    /// How much diff goes to the model, in how many calls.
    pub budget: Budget,
    /// At most this many inline findings.
    pub max_findings: usize,
    /// The longest answer per call, in tokens.
    pub answer_tokens: u32,
    /// The language of the review, if not English.
    pub language: Option<String>,
    /// Findings below this severity (`low`, `medium`, `high`) are not posted.
    pub severity_threshold: String,
    /// Per-path instructions (from the repository file), as (glob, text).
    pub instructions: Vec<(String, String)>,
}

fn number(key: &str, default: usize) -> wasmflow::Result<usize> {
    Ok(config::get_u64(key)?.map(|n| usize::try_from(n).unwrap_or(usize::MAX)).unwrap_or(default))
}

/// The diff tokens per call: the configured value, never more than fits in the model's context
/// (when the host knows it: local models) after the answer and the instructions.
pub fn chunk_tokens(context: Option<usize>, answer_tokens: usize, configured: Option<usize>) -> usize {
    let fits = match context {
        Some(ctx) => ctx.saturating_sub(answer_tokens + PROMPT_TOKENS).clamp(MIN_CHUNK_TOKENS, MAX_CHUNK_TOKENS),
        None => MAX_CHUNK_TOKENS,
    };
    configured.unwrap_or(fits).min(fits.max(MIN_CHUNK_TOKENS))
}

impl Config {
    /// Read the settings; a value of the wrong type is an error that names it.
    pub fn load() -> wasmflow::Result<Config> {
        let mut ignore = config::get_list("ignore")?.unwrap_or_else(|| DEFAULT_IGNORE.iter().map(|s| s.to_string()).collect());
        ignore.extend(config::get_list("extra_ignore")?.unwrap_or_default());
        let context = llm::info().ok().and_then(|i| i.chat).and_then(|c| c.context).map(|c| c as usize);
        let answer_tokens = u32::try_from(number("answer_tokens", 700)?).unwrap_or(u32::MAX);
        let configured_chunk = config::get_u64("chunk_tokens")?.map(|n| usize::try_from(n).unwrap_or(usize::MAX));
        let defaults = Rules::default();
        Ok(Config {
            rules: Rules {
                trigger_phrase: config::get_trimmed("trigger_phrase")?.unwrap_or(defaults.trigger_phrase),
                review_drafts: config::get_bool("review_drafts")?.unwrap_or(defaults.review_drafts),
                review_bot_prs: config::get_bool("review_bot_prs")?.unwrap_or(defaults.review_bot_prs),
                auto_review: config::get_bool("auto_review")?.unwrap_or(defaults.auto_review),
                skip_labels: config::get_list("skip_labels")?.unwrap_or(defaults.skip_labels),
                skip_branches: config::get_list("skip_branches")?.unwrap_or(defaults.skip_branches),
                skip_title_prefixes: config::get_list("skip_title_prefixes")?.unwrap_or(defaults.skip_title_prefixes),
            },
            ignore,
            budget: Budget {
                total_tokens: number("max_patch_tokens", 24_000)?,
                chunk_tokens: chunk_tokens(context, answer_tokens as usize, configured_chunk),
                max_chunks: number("max_calls", 4)?.max(1),
            },
            max_findings: number("max_findings", 10)?,
            answer_tokens,
            language: config::get_trimmed("language")?,
            severity_threshold: threshold(config::get_trimmed("severity_threshold")?)?,
            instructions: Vec::new(),
        })
    }

    /// The repository file's settings over the flow's: it adds ignore globs and instructions, and
    /// replaces language, threshold, auto-review, draft handling and max findings where it sets them.
    pub fn apply(&mut self, repo: &RepoConfig) {
        if let Some(globs) = &repo.ignore {
            self.ignore.extend(globs.iter().cloned());
        }
        self.instructions.extend(repo.instructions.iter().cloned());
        if let Some(lang) = &repo.language {
            self.language = Some(lang.clone());
        }
        if let Some(t) = &repo.severity_threshold {
            self.severity_threshold = t.clone();
        }
        if let Some(b) = repo.auto_review {
            self.rules.auto_review = b;
        }
        if let Some(b) = repo.drafts {
            self.rules.review_drafts = b;
        }
        if let Some(n) = repo.max_findings {
            self.max_findings = n;
        }
    }
}

fn threshold(value: Option<String>) -> wasmflow::Result<String> {
    let v = value.unwrap_or_else(|| "medium".to_string()).to_ascii_lowercase();
    if !crate::findings::SEVERITIES.contains(&v.as_str()) {
        return Err(wasmflow::Error::new(wasmflow::ErrorKind::Invalid, format!("config.severity_threshold: expected low, medium or high, got {:?}", v)));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::chunk_tokens;

    #[test]
    fn chunks_fit_the_context() {
        assert_eq!(chunk_tokens(None, 700, None), 12_000);
        assert_eq!(chunk_tokens(None, 700, Some(3_000)), 3_000);
        assert_eq!(chunk_tokens(Some(4_096), 700, None), 4_096 - 1_400);
        assert_eq!(chunk_tokens(Some(4_096), 700, Some(9_000)), 4_096 - 1_400); // never past the context
        assert_eq!(chunk_tokens(Some(512), 700, None), 256); // a tiny context still gets a chunk
        assert_eq!(chunk_tokens(Some(1_000_000), 700, None), 12_000);
    }
}
