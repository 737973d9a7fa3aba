//! __NAME__: a cron flow that keeps state in kv between runs.
//!
//! Each tick counts itself (an atomic increment) and remembers when the previous tick ran.
use wasmflow::serde_json::{json, Value};
use wasmflow::{event, info, kv, output};

fn run() -> wasmflow::Result<()> {
    let tick = kv::increment("ticks", 1)?;
    let body = event::json().unwrap_or(Value::Null);
    let now = body["scheduled_at"].clone();
    let previous: Option<Value> = kv::get_json("last")?;
    kv::set_json("last", &now)?;
    info!("tick {} (previous tick: {})", tick, previous.clone().unwrap_or(Value::Null));
    output::set_json(&json!({"tick": tick, "scheduled_at": now, "previous": previous}))
}

fn main() {
    if let Err(err) = run() {
        wasmflow::error!("__NAME__ failed: {}", err);
        std::process::exit(1);
    }
}
