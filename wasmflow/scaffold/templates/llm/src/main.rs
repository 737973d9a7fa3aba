//! __NAME__: a chat with a language model. The host makes the call, to a local GGUF model through
//! llama.cpp or to an OpenAI-compatible endpoint, as flows.yaml's `llm.chat` says; the guest only
//! sends the conversation.
use wasmflow::llm::{self, ChatRequest, Message};
use wasmflow::serde_json::{json, Value};
use wasmflow::{config, event, info, output, response};

fn run() -> wasmflow::Result<()> {
    let body = event::json().unwrap_or(Value::Null);
    let question = body["question"].as_str().unwrap_or("Say hello.").to_string();
    let system = config::get_or("system", "You are a helpful assistant. Answer briefly.")?;
    let max_tokens = config::get_u64("max_tokens")?.unwrap_or(64);
    let request = ChatRequest {
        messages: vec![Message::system(&system), Message::user(&question)],
        max_tokens: Some(max_tokens as u32),
        ..ChatRequest::default()
    };
    let answer = llm::chat_with(&request)?;
    info!("{} ({}) answered in {:.0} ms", answer.model, answer.backend, answer.ms);
    let result = json!({"question": question, "answer": answer.content, "model": answer.model,
                        "tokens": answer.usage.completion_tokens});
    response::json(&result)?;
    output::set_json(&result)
}

fn main() {
    if let Err(err) = run() {
        wasmflow::error!("__NAME__ failed: {}", err);
        std::process::exit(1);
    }
}
