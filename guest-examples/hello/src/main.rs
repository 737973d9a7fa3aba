//! hello: the smallest agent that touches every everyday capability.
//!
//! Reads the event (name and JSON body), counts its runs in key-value storage (`count`, atomically), reads the
//! `greeting` config value (default "Hello") and sets a JSON output. Started by an HTTP trigger, it
//! also answers the request with the same JSON.

use wasmflow::serde_json::{json, Value};
use wasmflow::{config, event, info, kv, output, response};

/// Who to greet: the GitHub sender's login, else a `name` field, else "world".
fn who(body: &Value) -> String {
    body.pointer("/sender/login")
        .and_then(Value::as_str)
        .or_else(|| body.get("name").and_then(Value::as_str))
        .unwrap_or("world")
        .to_string()
}

fn run() -> wasmflow::Result<()> {
    let name = event::name()?;
    let body = event::json().unwrap_or(Value::Null);
    // Atomic: runs of this flow at the same time each get their own number (a get then a set would not).
    let count = kv::increment("count", 1)?;
    let greeting = config::get("greeting")?.unwrap_or_else(|| "Hello".to_string());
    let who = who(&body);
    info!("{}, {}! event {} (run {} of this flow)", greeting, who, name, count);

    let result = json!({"greeting": greeting, "event": name, "count": count, "who": who});
    output::set_json(&result)?;
    if name == "http" {
        response::status(200)?;
        response::header("content-type", "application/json")?;
        response::body(wasmflow::serde_json::to_vec(&result)?)?;
    }
    Ok(())
}

fn main() {
    if let Err(err) = run() {
        wasmflow::error!("hello failed: {}", err);
        std::process::exit(1);
    }
}
