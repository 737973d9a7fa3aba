//! Whether this event starts a review, and of which pull request: pure functions of the event and
//! the flow's rules, so they are unit-tested on the host (`cargo test` for the host target).

use serde_json::Value;

use crate::glob;

/// The settings that decide whether an event is reviewed (the `config:` keys of the same names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// A comment starting with this (any case) asks for a review: `/review` by default.
    pub trigger_phrase: String,
    /// Review draft pull requests automatically.
    pub review_drafts: bool,
    /// Review pull requests opened by bots automatically.
    pub review_bot_prs: bool,
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
            trigger_phrase: "/review".to_string(),
            review_drafts: false,
            review_bot_prs: false,
            skip_labels: Vec::new(),
            skip_branches: Vec::new(),
            skip_title_prefixes: vec!["[skip review]".to_string()],
        }
    }
}

/// Why this run reviews, or why it does nothing.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Nothing to do, and why (it goes in the run's output).
    Skip(String),
    /// Review pull request `number`; `command` when a `/review` comment asked (its id, to react to it);
    /// `pr` is the pull request as the event carried it.
    Review { number: u64, command: bool, comment_id: Option<u64>, pr: Option<Value> },
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
        "pull_request" => decide_pull_request(action, &payload["pull_request"], rules, bot_login),
        "issue_comment" => decide_comment(action, payload, rules, bot_login),
        other => Decision::Skip(format!("event {} is not handled", other)),
    }
}

fn decide_pull_request(action: &str, pr: &Value, rules: &Rules, bot_login: &str) -> Decision {
    if !["opened", "reopened", "synchronize", "ready_for_review"].contains(&action) {
        return Decision::Skip(format!("pull_request.{} is not reviewed", action));
    }
    if pr["draft"].as_bool().unwrap_or(false) && !rules.review_drafts {
        return Decision::Skip("draft pull request (set review_drafts: true to review drafts)".to_string());
    }
    if is_bot(&pr["user"], bot_login) && !rules.review_bot_prs {
        return Decision::Skip(format!(
            "pull request opened by bot {} (set review_bot_prs: true to review them)",
            pr["user"]["login"].as_str().unwrap_or("?")
        ));
    }
    let title = pr["title"].as_str().unwrap_or("").to_lowercase();
    if let Some(prefix) = rules.skip_title_prefixes.iter().find(|p| !p.is_empty() && title.starts_with(&p.to_lowercase())) {
        return Decision::Skip(format!("title starts with {:?} (skip_title_prefixes)", prefix));
    }
    let labels: Vec<&str> = pr["labels"].as_array().map(|a| a.iter().filter_map(|l| l["name"].as_str()).collect()).unwrap_or_default();
    if let Some(label) = rules.skip_labels.iter().find(|l| labels.iter().any(|x| x.eq_ignore_ascii_case(l))) {
        return Decision::Skip(format!("labelled {} (skip_labels)", label));
    }
    let branch = pr["head"]["ref"].as_str().unwrap_or("");
    if let Some(pattern) = rules.skip_branches.iter().find(|g| glob::matches(g, branch)) {
        return Decision::Skip(format!("branch {} matches {} (skip_branches)", branch, pattern));
    }
    match pr["number"].as_u64() {
        Some(number) => Decision::Review { number, command: false, comment_id: None, pr: Some(pr.clone()) },
        None => Decision::Skip("payload has no pull_request.number".to_string()),
    }
}

fn decide_comment(action: &str, payload: &Value, rules: &Rules, bot_login: &str) -> Decision {
    if action != "created" {
        return Decision::Skip(format!("issue_comment.{} is not a command", action));
    }
    let comment = &payload["comment"];
    if is_bot(&comment["user"], bot_login) {
        return Decision::Skip("comment written by a bot (never a trigger)".to_string());
    }
    let body = comment["body"].as_str().unwrap_or("").trim_start();
    let phrase = rules.trigger_phrase.to_lowercase();
    let head: String = body.chars().take(phrase.chars().count()).collect();
    if head.to_lowercase() != phrase {
        return Decision::Skip("comment does not start with the trigger phrase".to_string());
    }
    if payload["issue"]["pull_request"].is_null() {
        return Decision::Skip("comment is on an issue, not a pull request".to_string());
    }
    match payload["issue"]["number"].as_u64() {
        Some(number) => Decision::Review { number, command: true, comment_id: comment["id"].as_u64(), pr: None },
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
        assert!(matches!(d, Decision::Review { number: 7, command: false, comment_id: None, pr: Some(_) }), "{:?}", d);
    }

    #[test]
    fn closed_and_other_events_are_skipped() {
        let rules = Rules::default();
        assert_eq!(skipped(decide("pull_request", &pr_event("closed", pr(json!({}))), &rules, "")), "pull_request.closed is not reviewed");
        assert_eq!(skipped(decide("push", &json!({}), &rules, "")), "event push is not handled");
    }

    #[test]
    fn drafts_and_bots_follow_the_rules() {
        let draft = pr_event("opened", pr(json!({"draft": true})));
        assert!(skipped(decide("pull_request", &draft, &Rules::default(), "")).starts_with("draft pull request"));
        let rules = Rules { review_drafts: true, ..Rules::default() };
        assert!(matches!(decide("pull_request", &draft, &rules, ""), Decision::Review { .. }));

        let by_bot = pr_event("opened", pr(json!({"user": {"login": "dependabot[bot]", "type": "Bot"}})));
        assert!(skipped(decide("pull_request", &by_bot, &Rules::default(), "")).contains("dependabot[bot]"));
        let rules = Rules { review_bot_prs: true, ..Rules::default() };
        assert!(matches!(decide("pull_request", &by_bot, &rules, ""), Decision::Review { .. }));
    }

    #[test]
    fn title_label_and_branch_skips() {
        let rules = Rules { skip_labels: vec!["WIP".into()], skip_branches: vec!["release/*".into()], ..Rules::default() };
        let titled = pr_event("opened", pr(json!({"title": "[Skip Review] bump"})));
        assert!(skipped(decide("pull_request", &titled, &rules, "")).contains("skip_title_prefixes"));
        let labelled = pr_event("synchronize", pr(json!({"labels": [{"name": "wip"}]})));
        assert_eq!(skipped(decide("pull_request", &labelled, &rules, "")), "labelled WIP (skip_labels)");
        let branch = pr_event("reopened", pr(json!({"head": {"ref": "release/1.2", "sha": "abc"}})));
        assert_eq!(skipped(decide("pull_request", &branch, &rules, "")), "branch release/1.2 matches release/* (skip_branches)");
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
        assert_eq!(d, Decision::Review { number: 9, command: true, comment_id: Some(55), pr: None });
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
        assert!(matches!(decide("issue_comment", &comment_event("@Bot Review now", "octocat", true), &rules, ""), Decision::Review { .. }));
        assert!(matches!(decide("issue_comment", &comment_event("/review", "octocat", true), &rules, ""), Decision::Skip(_)));
    }
}
