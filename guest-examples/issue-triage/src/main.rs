//! issue-triage: on `issues.opened`, embed the issue with MiniLM over WASI-NN, compare it with the
//! repository's recent issues (vectors kept in kv), comment on likely duplicates above a threshold and
//! apply labels from the flow's config.
//!
//! Config: `model` (WASI-NN model name, default `minilm`), `duplicate_threshold` (cosine, default
//! 0.80), `max_duplicates` (3), `labels` (JSON object label → keywords, matched as words in the title
//! and body), `duplicate_label` (applied when duplicates are found, default `possible-duplicate`;
//! empty to skip), `recent` (how many issues are kept, 200), `bootstrap` (how many existing issues to
//! embed on the first run, 50). A value of the wrong type fails the run with a message naming it.
//!
//! The first run in a repository has no vectors in kv yet, so it reads the recent issues from GitHub
//! once and embeds them; later runs only embed the new issue.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use wasmflow::github::Request;
use wasmflow::nn::{ExecutionTarget, GraphBuilder, GraphEncoding, TensorType};
use wasmflow::{config, event, kv, output};

const MARKER: &str = "<!-- wasmflow:issue-triage -->";

/// The flow's `config:`, read once with the SDK's typed getters (a wrong type fails the run, naming the key).
struct Settings {
    model: String,
    bootstrap: usize,
    threshold: f32,
    max_duplicates: usize,
    /// Label → keywords, from the `labels` object.
    labels: BTreeMap<String, Vec<String>>,
    /// `None` when set to an empty string: no label for duplicates.
    duplicate_label: Option<String>,
    recent: usize,
}

fn count(key: &str, default: usize) -> wasmflow::Result<usize> {
    Ok(config::get_u64(key)?.map(|n| usize::try_from(n).unwrap_or(usize::MAX)).unwrap_or(default))
}

impl Settings {
    fn load() -> wasmflow::Result<Settings> {
        Ok(Settings {
            model: config::get_trimmed("model")?.unwrap_or_else(|| "minilm".to_string()),
            bootstrap: count("bootstrap", 50)?,
            threshold: config::get_f64("duplicate_threshold")?.unwrap_or(0.80) as f32,
            max_duplicates: count("max_duplicates", 3)?,
            labels: config::get_json("labels")?.unwrap_or_default(),
            duplicate_label: match config::get("duplicate_label")? {
                None => Some("possible-duplicate".to_string()),
                Some(l) => Some(l.trim().to_string()).filter(|l| !l.is_empty()),
            },
            recent: count("recent", 200)?,
        })
    }
}

fn fail(msg: String, transient: bool) -> ! {
    wasmflow::error!("{}", msg);
    let _ = output::set_json(&json!({"action": "failed", "error": msg}));
    std::process::exit(if transient { 1 } else { 0 })
}

struct Embedder<'a> {
    ctx: wasmflow::nn::GraphExecutionContext<'a>,
}

impl<'a> Embedder<'a> {
    fn embed(&mut self, text: &str) -> Result<Vec<f32>, String> {
        // MiniLM reads at most 256 word pieces; the title and the start of the body carry the meaning.
        let text: String = text.chars().take(1500).collect();
        self.ctx.set_input(0, TensorType::U8, &[1], text.as_bytes()).map_err(|e| e.to_string())?;
        self.ctx.compute().map_err(|e| e.to_string())?;
        let out = self.ctx.get_output_vec(0, 16384).map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_slice(&out).map_err(|e| e.to_string())?;
        let vec: Vec<f32> = v["embedding"].as_array().map(|a| a.iter().map(|x| x.as_f64().unwrap_or(0.0) as f32).collect()).unwrap_or_default();
        if vec.is_empty() {
            return Err("the model returned no embedding".to_string());
        }
        Ok(normalise(vec))
    }
}

fn normalise(mut v: Vec<f32>) -> Vec<f32> {
    let n: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        for x in v.iter_mut() {
            *x /= n;
        }
    }
    v
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn issue_text(title: &str, body: &str) -> String {
    format!("{}\n\n{}", title, body)
}

fn words(text: &str) -> Vec<String> {
    text.to_lowercase().split(|c: char| !c.is_alphanumeric() && c != '-' && c != '_').filter(|w| !w.is_empty()).map(String::from).collect()
}

fn main() {
    let name = event::name().unwrap_or_default();
    let payload = event::json().unwrap_or(Value::Null);
    let action = payload["action"].as_str().unwrap_or("");
    if name != "issues" || action != "opened" {
        let _ = output::set_json(&json!({"action": "skipped", "reason": format!("{}.{} is not handled", name, action)}));
        return;
    }
    let issue = &payload["issue"];
    let number = issue["number"].as_u64().unwrap_or(0);
    if !issue["pull_request"].is_null() || number == 0 {
        let _ = output::set_json(&json!({"action": "skipped", "reason": "not an issue"}));
        return;
    }
    let info = wasmflow::run_info().unwrap_or_default();
    let delivery_key = format!("delivery/{}", info.idempotency_key);
    if kv::get(&delivery_key).ok().flatten().is_some() {
        let _ = output::set_json(&json!({"action": "skipped", "reason": "delivery already handled"}));
        return;
    }
    // kv is per flow and one App serves many repositories: every key carries the repository.
    let repo = payload["repository"]["full_name"].as_str().unwrap_or("unknown/unknown").to_ascii_lowercase();
    let index_key = format!("index/{}", repo);
    let issue_key = |n: u64| format!("issue/{}/{}", repo, n);
    let title = issue["title"].as_str().unwrap_or("");
    let body = issue["body"].as_str().unwrap_or("");

    let settings = match Settings::load() {
        Ok(s) => s,
        Err(e) => fail(e.to_string(), false),
    };
    let model = settings.model.clone();
    let graph = match GraphBuilder::new(GraphEncoding::Ggml, ExecutionTarget::AUTO)
        .config(r#"{"embedding": true}"#.to_string())
        .build_from_cache(&model)
    {
        Ok(g) => g,
        Err(e) => fail(format!("cannot load model {}: {}", model, e), false),
    };
    let ctx = match graph.init_execution_context() {
        Ok(c) => c,
        Err(e) => fail(format!("cannot start model {}: {}", model, e), true),
    };
    let mut embedder = Embedder { ctx };
    let _ = embedder.ctx.set_input(1, TensorType::U8, &[1], r#"{"embedding": true}"#.as_bytes());

    // The repository's recent issues, from kv (bootstrapped from GitHub on the first run).
    let mut index: Vec<u64> = kv::get_json(&index_key).ok().flatten().unwrap_or_default();
    let mut bootstrapped = 0usize;
    if index.is_empty() {
        let limit = settings.bootstrap;
        let resp = Request::get("/repos/{repo}/issues").query("state", "all").query("per_page", limit.min(100) as u64).send();
        let existing: Vec<Value> = match resp {
            Ok(r) if r.is_success() => r.json().unwrap_or_default(),
            Ok(r) => fail(format!("GitHub answered {} listing issues: {}", r.status, r.error_message()), r.status >= 500),
            Err(e) => fail(format!("listing issues: {}", e), true),
        };
        for other in existing.iter().take(limit) {
            let n = other["number"].as_u64().unwrap_or(0);
            if n == 0 || n == number || !other["pull_request"].is_null() {
                continue;
            }
            let text = issue_text(other["title"].as_str().unwrap_or(""), other["body"].as_str().unwrap_or(""));
            let vec = match embedder.embed(&text) {
                Ok(v) => v,
                Err(e) => fail(format!("embedding #{}: {}", n, e), true),
            };
            let _ = kv::set_json(&issue_key(n), &json!({"title": other["title"], "vec": vec}));
            index.push(n);
            bootstrapped += 1;
        }
    }
    let vec = match embedder.embed(&issue_text(title, body)) {
        Ok(v) => v,
        Err(e) => fail(format!("embedding the issue: {}", e), true),
    };

    let threshold = settings.threshold;
    let max_dups = settings.max_duplicates;
    let mut scored: Vec<(u64, f32, String)> = Vec::new();
    for n in &index {
        if *n == number {
            continue;
        }
        let stored: Value = kv::get_json(&issue_key(*n)).ok().flatten().unwrap_or(Value::Null);
        let other: Vec<f32> = stored["vec"].as_array().map(|a| a.iter().map(|x| x.as_f64().unwrap_or(0.0) as f32).collect()).unwrap_or_default();
        if other.len() != vec.len() {
            continue;
        }
        scored.push((*n, cosine(&vec, &other), stored["title"].as_str().unwrap_or("").to_string()));
    }
    scored.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal));
    let best = scored.first().map(|s| s.1).unwrap_or(0.0);
    let duplicates: Vec<&(u64, f32, String)> = scored.iter().filter(|s| s.1 >= threshold).take(max_dups).collect();

    // Labels: keywords from the config, matched as words of the title and body.
    let mut labels: Vec<String> = Vec::new();
    let text_words = words(&issue_text(title, body));
    for (label, keywords) in &settings.labels {
        let hit = keywords.iter().any(|k| {
            let kw = words(k);
            !kw.is_empty() && text_words.windows(kw.len()).any(|w| w == kw.as_slice())
        });
        if hit {
            labels.push(label.clone());
        }
    }
    if !duplicates.is_empty() {
        if let Some(l) = &settings.duplicate_label {
            labels.push(l.clone());
        }
    }

    let mut comment_id: Option<u64> = None;
    if !duplicates.is_empty() {
        let mut text = String::from("👋 **wasmflow triage**: this issue looks similar to\n\n");
        for (n, score, t) in &duplicates {
            text.push_str(&format!("- #{} {} (similarity {:.2})\n", n, t, score));
        }
        text.push_str(&format!(
            "\nIf it is the same problem, please add your details there and close this one.\n\n<sub>MiniLM embeddings over WASI-NN, threshold {:.2}</sub>\n{}",
            threshold, MARKER
        ));
        let resp = Request::post(&format!("/repos/{{repo}}/issues/{}/comments", number)).json(&json!({"body": text})).send();
        match resp {
            Ok(r) if r.is_success() => comment_id = r.json::<Value>().ok().and_then(|v| v["id"].as_u64()),
            Ok(r) => fail(format!("GitHub answered {} to the comment: {}", r.status, r.error_message()), r.status >= 500),
            Err(e) => fail(format!("commenting: {}", e), true),
        }
    }
    if !labels.is_empty() {
        match Request::post(&format!("/repos/{{repo}}/issues/{}/labels", number)).json(&json!({"labels": labels})).send() {
            Ok(r) if r.is_success() => {}
            Ok(r) => wasmflow::warn!("labels not applied: {} {}", r.status, r.error_message()),
            Err(e) => wasmflow::warn!("labels not applied: {}", e),
        }
    }

    // Remember this issue for the next ones; keep the index bounded.
    let _ = kv::set_json(&issue_key(number), &json!({"title": title, "vec": vec}));
    index.push(number);
    let keep = settings.recent;
    while index.len() > keep {
        let old = index.remove(0);
        let _ = kv::delete(&issue_key(old));
    }
    let _ = kv::set_json(&index_key, &index);
    let _ = kv::set(&delivery_key, "done");
    let _ = output::set_json(&json!({
        "action": "triaged",
        "issue": number,
        "duplicates": duplicates.iter().map(|d| json!({"number": d.0, "similarity": d.1})).collect::<Vec<_>>(),
        "best_similarity": best,
        "compared": scored.len(),
        "bootstrapped": bootstrapped,
        "labels": labels,
        "comment_id": comment_id,
    }));
}
