//! __NAME__: an HTTP-triggered function answering JSON.
//!
//! `wasmflow up` serves it at `/flows/__NAME__`; `wasmflow run __NAME__ --event fixtures/__NAME__.json`
//! runs it once with the fixture as the request body.
use wasmflow::serde_json::{json, Value};
use wasmflow::{config, event, info, output, response};

fn run() -> wasmflow::Result<()> {
    let body = event::json().unwrap_or(Value::Null);
    let who = body["name"].as_str().unwrap_or("world").to_string();
    let greeting = config::get_or("greeting", "Hello")?;
    let method = event::header(":method")?.unwrap_or_else(|| "manual".to_string());
    info!("{} request for {}", method, who);
    let answer = json!({"message": format!("{}, {}!", greeting, who), "method": method});
    response::status(200)?;
    response::json(&answer)?;
    output::set_json(&answer)
}

fn main() {
    if let Err(err) = run() {
        wasmflow::error!("__NAME__ failed: {}", err);
        std::process::exit(1);
    }
}
