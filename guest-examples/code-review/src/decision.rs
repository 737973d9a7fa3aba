//! Whether this event starts a review or a command, and of which pull request: pure functions of the
//! event and the settings, so they are unit-tested where the guest runs (`cargo test` for wasm32-wasi).
//!
//! Two steps, because the repository's own settings (`.github/wasmflow.yaml` on the base branch) can
//! only be read once the event names a pull request: [`decide`] says which PR and why (an automatic
//! review or a command), then [`auto_skip`] applies the settings to an automatic review.

use serde_json::Value;

use crate::glob;

/// The settings that decide whether an event is reviewed (the `config:` keys of the same names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// What a command starts with: `/` by default (`/review`, `/ask ...`); `@bot ` gives `@bot review`.
    pub trigger_phrase: String,
    /// Review draft pull requests automatically.
    pub review_drafts: bool,
    /// Review pull requests opened by bots automatically.
    pub review_bot_prs: bool,
    /// Review pull requests automatically at all (commands still work when off).
    pub auto_review: bool,
    /// PRs carrying one of these labels are not reviewed automatically (a command still reviews them).
    pub skip_labels: Vec<String>,
    /// PRs from branches matching one of these globs are not reviewed automatically.
    pub skip_branches: Vec<String>,
    /// PRs whose title starts with one of these (any case) are not reviewed automatically.
    pub skip_title_prefixes: Vec<String>,
}

impl Default for Rules {
    fn default() -> Rules {
        Rules {
            trigger_phrase: "/".to_string(),
            review_drafts: false,
            review_bot_prs: false,
            auto_review: true,
            skip_labels: Vec::new(),
            skip_branches: Vec::new(),
            skip_title_prefixes: vec!["[skip review]".to_string()],
        }
    }
}

/// The command prefix for a configured trigger phrase. The first generation's phrase named the one
/// command (`/review`, `@bot review`): its prefix is what comes before `review`.
pub fn command_prefix(phrase: &str) -> String {
    let lower = phrase.to_ascii_lowercase();
    if lower.ends_with("review") && lower.len() > "review".len() {
        return phrase[..phrase.len() - "review".len()].to_string();
    }
    if phrase.is_empty() { "/".to_string() } else { phrase.to_string() }
}

/// A command in a PR comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `/review`: the commits since the last review; `/review full`: the whole PR again.
    Review { full: bool },
    /// `/describe`: a title suggestion, a section of the PR body and labels.
    Describe,
    /// `/ask QUESTION`: an answer from the diff, as a reply.
    Ask(String),
    /// `/pause` and `/resume` automatic reviews of this PR.
    Pause,
    Resume,
    /// `/help`, and any command word the bot does not know (its text).
    Help,
    Unknown(String),
}

impl Command {
    /// Commands that cost model time (and so need write access to the repository).
    pub fn costs_model_time(&self) -> bool {
        matches!(self, Command::Review { .. } | Command::Describe | Command::Ask(_))
    }

    /// Commands that change what the bot does on this PR, or cost model time: write access only.
    pub fn needs_write(&self) -> bool {
        self.costs_model_time() || matches!(self, Command::Pause | Command::Resume)
    }

    pub fn name(&self) -> &'static str {
        match self {
            Command::Review { full: false } => "review",
            Command::Review { full: true } => "review full",
            Command::Describe => "describe",
            Command::Ask(_) => "ask",
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Help => "help",
            Command::Unknown(_) => "unknown",
        }
    }
}

/// The command in `body`, if it starts with `prefix` (any case) followed by a command word (letters
/// only, so `/path/to/file is broken` is no command). `None`: an ordinary comment.
pub fn parse_command(body: &str, prefix: &str) -> Option<Command> {
    let body = body.trim_start();
    let plen = prefix.len();
    if plen == 0 || body.len() < plen || !body.is_char_boundary(plen) || !body[..plen].eq_ignore_ascii_case(prefix) {
        return None;
    }
    let rest = body[plen..].trim_start();
    let word_end = rest.find(|c: char| c.is_whitespace()).unwrap_or(rest.len());
    let word = &rest[..word_end];
    if word.is_empty() || !word.chars().all(|c| c.is_ascii_alphabetic() || c == '-') {
        return None;
    }
    let args = rest[word_end..].trim();
    Some(match word.to_ascii_lowercase().as_str() {
        "review" => {
            let first = args.split_whitespace().next().unwrap_or("").to_ascii_lowercase();
            Command::Review { full: first == "full" }
        }
        "describe" => Command::Describe,
        "ask" if !args.is_empty() => Command::Ask(args.chars().take(2000).collect()),
        "ask" => Command::Help,
        "pause" => Command::Pause,
        "resume" => Command::Resume,
        "help" => Command::Help,
        other => Command::Unknown(other.to_string()),
    })
}

/// Why this run acts, or why it does nothing.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Nothing to do, and why (it goes in the run's output).
    Skip(String),
    /// An automatic review of pull request `number`, as the event carried it.
    Auto { number: u64, pr: Value },
    /// A command in comment `comment_id` by `user` on pull request `number`.
    Command { number: u64, comment_id: Option<u64>, user: String, command: Command },
}

/// Is `user` (a GitHub user object) a bot: the App itself, a `Bot` account or a `...[bot]` login?
pub fn is_bot(user: &Value, bot_login: &str) -> bool {
    let login = user["login"].as_str().unwrap_or("");
    (!bot_login.is_empty() && login.eq_ignore_ascii_case(bot_login)) || user["type"].as_str() == Some("Bot") || login.ends_with("[bot]")
}

/// What to do for event `name` with `payload`; `bot_login` is the App's own account.
pub fn decide(name: &str, payload: &Value, rules: &Rules, bot_login: &str) -> Decision {
    let action = payload["action"].as_str().unwrap_or("");
    match name {
        "pull_request" => {
            if !["opened", "reopened", "synchronize", "ready_for_review"].contains(&action) {
                return Decision::Skip(format!("pull_request.{} is not reviewed", action));
            }
            let pr = &payload["pull_request"];
            match pr["number"].as_u64() {
                Some(number) => Decision::Auto { number, pr: pr.clone() },
                None => Decision::Skip("payload has no pull_request.number".to_string()),
            }
        }
        "issue_comment" => decide_comment(action, payload, rules, bot_login),
        other => Decision::Skip(format!("event {} is not handled", other)),
    }
}

/// Why an automatic review of `pr` is skipped under `rules`, or `None` to review it.
pub fn auto_skip(pr: &Value, rules: &Rules, bot_login: &str) -> Option<String> {
    if !rules.auto_review {
        return Some("automatic reviews are off (auto_review: false); comment /review to review".to_string());
    }
    if pr["draft"].as_bool().unwrap_or(false) && !rules.review_drafts {
        return Some("draft pull request (reviewed when marked ready, or set drafts: true)".to_string());
    }
    if is_bot(&pr["user"], bot_login) && !rules.review_bot_prs {
        return Some(format!(
            "pull request opened by bot {} (set review_bot_prs: true to review them)",
            pr["user"]["login"].as_str().unwrap_or("?")
        ));
    }
    let title = pr["title"].as_str().unwrap_or("").to_lowercase();
    if let Some(prefix) = rules.skip_title_prefixes.iter().find(|p| !p.is_empty() && title.starts_with(&p.to_lowercase())) {
        return Some(format!("title starts with {:?} (skip_title_prefixes)", prefix));
    }
    let labels: Vec<&str> = pr["labels"].as_array().map(|a| a.iter().filter_map(|l| l["name"].as_str()).collect()).unwrap_or_default();
    if let Some(label) = rules.skip_labels.iter().find(|l| labels.iter().any(|x| x.eq_ignore_ascii_case(l))) {
        return Some(format!("labelled {} (skip_labels)", label));
    }
    let branch = pr["head"]["ref"].as_str().unwrap_or("");
    if let Some(pattern) = rules.skip_branches.iter().find(|g| glob::matches(g, branch)) {
        return Some(format!("branch {} matches {} (skip_branches)", branch, pattern));
    }
    None
}

fn decide_comment(action: &str, payload: &Value, rules: &Rules, bot_login: &str) -> Decision {
    if action != "created" {
        return Decision::Skip(format!("issue_comment.{} is not a command", action));
    }
    let comment = &payload["comment"];
    if is_bot(&comment["user"], bot_login) {
        return Decision::Skip("comment written by a bot (never a trigger)".to_string());
    }
    let prefix = command_prefix(&rules.trigger_phrase);
    let command = match parse_command(comment["body"].as_str().unwrap_or(""), &prefix) {
        Some(c) => c,
        None => return Decision::Skip("comment does not start with the trigger phrase".to_string()),
    };
    if payload["issue"]["pull_request"].is_null() {
        return Decision::Skip("comment is on an issue, not a pull request".to_string());
    }
    let user = comment["user"]["login"].as_str().unwrap_or("").to_string();
    match payload["issue"]["number"].as_u64() {
        Some(number) => Decision::Command { number, comment_id: comment["id"].as_u64(), user, command },
        None => Decision::Skip("payload has no issue.number".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pr_event(action: &str, pr: Value) -> Value {
        json!({"action": action, "pull_request": pr})
    }

    fn pr(extra: Value) -> Value {
        let mut pr = json!({"number": 7, "title": "Add a feature", "draft": false, "user": {"login": "octocat", "type": "User"},
                            "labels": [], "head": {"ref": "feature/x", "sha": "abc"}});
        if let (Some(base), Some(extra)) = (pr.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                base.insert(k.clone(), v.clone());
            }
        }
        pr
    }

    fn skipped(decision: Decision) -> String {
        match decision {
            Decision::Skip(reason) => reason,
            other => panic!("expected a skip, got {:?}", other),
        }
    }

    #[test]
    fn opened_pull_request_is_reviewed() {
        let d = decide("pull_request", &pr_event("opened", pr(json!({}))), &Rules::default(), "app[bot]");
        assert!(matches!(d, Decision::Auto { number: 7, .. }), "{:?}", d);
        assert_eq!(auto_skip(&pr(json!({})), &Rules::default(), "app[bot]"), None);
    }

    #[test]
    fn closed_and_other_events_are_skipped() {
        let rules = Rules::default();
        assert_eq!(skipped(decide("pull_request", &pr_event("closed", pr(json!({}))), &rules, "")), "pull_request.closed is not reviewed");
        assert_eq!(skipped(decide("push", &json!({}), &rules, "")), "event push is not handled");
    }

    #[test]
    fn drafts_and_bots_follow_the_rules() {
        let draft = pr(json!({"draft": true}));
        assert!(auto_skip(&draft, &Rules::default(), "").unwrap().starts_with("draft pull request"));
        assert_eq!(auto_skip(&draft, &Rules { review_drafts: true, ..Rules::default() }, ""), None);
        let by_bot = pr(json!({"user": {"login": "dependabot[bot]", "type": "Bot"}}));
        assert!(auto_skip(&by_bot, &Rules::default(), "").unwrap().contains("dependabot[bot]"));
        assert_eq!(auto_skip(&by_bot, &Rules { review_bot_prs: true, ..Rules::default() }, ""), None);
        assert!(auto_skip(&pr(json!({})), &Rules { auto_review: false, ..Rules::default() }, "").unwrap().contains("auto_review"));
    }

    #[test]
    fn title_label_and_branch_skips() {
        let rules = Rules { skip_labels: vec!["WIP".into()], skip_branches: vec!["release/*".into()], ..Rules::default() };
        assert!(auto_skip(&pr(json!({"title": "[Skip Review] bump"})), &rules, "").unwrap().contains("skip_title_prefixes"));
        assert_eq!(auto_skip(&pr(json!({"labels": [{"name": "wip"}]})), &rules, "").unwrap(), "labelled WIP (skip_labels)");
        assert_eq!(auto_skip(&pr(json!({"head": {"ref": "release/1.2", "sha": "abc"}})), &rules, "").unwrap(),
                   "branch release/1.2 matches release/* (skip_branches)");
    }

    fn comment_event(body: &str, login: &str, on_pr: bool) -> Value {
        let mut issue = json!({"number": 9});
        if on_pr {
            issue["pull_request"] = json!({"url": "https://api.github.com/repos/o/r/pulls/9"});
        }
        json!({"action": "created", "issue": issue, "comment": {"id": 55, "body": body, "user": {"login": login, "type": "User"}}})
    }

    #[test]
    fn review_command_on_a_pull_request() {
        let d = decide("issue_comment", &comment_event("  /REVIEW please", "octocat", true), &Rules::default(), "app[bot]");
        assert_eq!(d, Decision::Command { number: 9, comment_id: Some(55), user: "octocat".into(), command: Command::Review { full: false } });
    }

    #[test]
    fn every_command_parses() {
        let p = |s: &str| parse_command(s, "/");
        assert_eq!(p("/review full"), Some(Command::Review { full: true }));
        assert_eq!(p("/describe"), Some(Command::Describe));
        assert_eq!(p("/ask why is this  safe?"), Some(Command::Ask("why is this  safe?".into())));
        assert_eq!(p("/ask"), Some(Command::Help));
        assert_eq!(p("/pause"), Some(Command::Pause));
        assert_eq!(p("/Resume"), Some(Command::Resume));
        assert_eq!(p("/frobnicate now"), Some(Command::Unknown("frobnicate".into())));
        assert_eq!(p("/path/to/file is broken"), None);
        assert_eq!(p("looks good"), None);
        assert!(Command::Ask("q".into()).costs_model_time() && !Command::Pause.costs_model_time() && Command::Pause.needs_write());
        assert!(!Command::Help.needs_write());
    }

    #[test]
    fn comments_that_are_not_commands() {
        let rules = Rules::default();
        assert_eq!(skipped(decide("issue_comment", &comment_event("looks good", "octocat", true), &rules, "")),
                   "comment does not start with the trigger phrase");
        assert_eq!(skipped(decide("issue_comment", &comment_event("/review", "octocat", false), &rules, "")),
                   "comment is on an issue, not a pull request");
        assert_eq!(skipped(decide("issue_comment", &comment_event("/review", "App[bot]", true), &rules, "app[bot]")),
                   "comment written by a bot (never a trigger)");
        let mut edited = comment_event("/review", "octocat", true);
        edited["action"] = json!("edited");
        assert_eq!(skipped(decide("issue_comment", &edited, &rules, "")), "issue_comment.edited is not a command");
    }

    #[test]
    fn custom_trigger_phrase() {
        let rules = Rules { trigger_phrase: "@bot review".into(), ..Rules::default() };
        assert!(matches!(decide("issue_comment", &comment_event("@Bot Review now", "octocat", true), &rules, ""),
                         Decision::Command { command: Command::Review { full: false }, .. }));
        assert!(matches!(decide("issue_comment", &comment_event("@bot ask what?", "octocat", true), &rules, ""),
                         Decision::Command { command: Command::Ask(_), .. }));
        assert!(matches!(decide("issue_comment", &comment_event("/review", "octocat", true), &rules, ""), Decision::Skip(_)));
        assert_eq!(command_prefix("/review"), "/");
        assert_eq!(command_prefix("!"), "!");
    }
}
