//! Chat and embeddings through the model the operator chose for this flow (`llm:` in flows.yaml).
//!
//! The same call reaches an OpenAI-compatible endpoint (OpenAI, Ollama, a llama.cpp server,
//! wasmflow's own `/v1`) or a local GGUF model run by the host over its WASI-NN back end; the guest
//! does not know or care which, and never sees an API key.
//!
//! ```no_run
//! # fn main() -> wasmflow::Result<()> {
//! use wasmflow::llm::{self, Message};
//! let answer = llm::chat(&[Message::system("Be brief."), Message::user("What is WASI?")])?;
//! wasmflow::info!("{} ({} ms)", answer.content, answer.ms);
//! let vectors = llm::embed(&["first text", "second text"])?;
//! # Ok(()) }
//! ```

use serde::{Deserialize, Serialize};

use crate::result::call;
use crate::{sys, Result};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A system message.
    pub fn system(content: &str) -> Message {
        Message { role: "system".to_string(), content: content.to_string() }
    }

    /// A user message.
    pub fn user(content: &str) -> Message {
        Message { role: "user".to_string(), content: content.to_string() }
    }

    /// An assistant message (for few-shot examples or a conversation so far).
    pub fn assistant(content: &str) -> Message {
        Message { role: "assistant".to_string(), content: content.to_string() }
    }
}

/// A chat request with sampling settings; unset fields take the flow's `llm.chat.options`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<Message>,
    /// Longest answer, in tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Sampling temperature (0 for the most deterministic answer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// `Some("json")` asks for a JSON object where the back end supports it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_format: Option<String>,
    /// Stop sequences.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// With `response_format: json`, the JSON schema of the answer. Local models are held to it by a
    /// grammar; remote endpoints get plain JSON mode (not every OpenAI-compatible server takes schemas).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub json_schema: Option<serde_json::Value>,
}

/// Token counts of one call, when the back end reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: Option<u64>,
    /// Tokens generated.
    pub completion_tokens: Option<u64>,
}

/// The model's answer.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Completion {
    /// The generated text.
    pub content: String,
    /// The model that answered.
    pub model: String,
    /// `stop`, `length`, ...
    pub finish_reason: Option<String>,
    /// `openai` or `local`.
    pub backend: String,
    /// Token counts.
    pub usage: Usage,
    /// Wall time of the call in milliseconds.
    pub ms: f64,
}

/// Send a conversation with the flow's default settings.
pub fn chat(messages: &[Message]) -> Result<Completion> {
    chat_with(&ChatRequest { messages: messages.to_vec(), ..ChatRequest::default() })
}

/// Send a [`ChatRequest`].
pub fn chat_with(request: &ChatRequest) -> Result<Completion> {
    let req = serde_json::to_vec(request)?;
    let bytes = call(|out| unsafe { sys::llm_chat(req.as_ptr(), req.len(), out) })?;
    Ok(serde_json::from_slice(&bytes)?)
}

#[derive(Deserialize)]
struct Embeddings {
    embeddings: Vec<Vec<f32>>,
}

/// One vector per input text, from the flow's `llm.embeddings` model.
pub fn embed(inputs: &[&str]) -> Result<Vec<Vec<f32>>> {
    let req = serde_json::to_vec(&serde_json::json!({ "input": inputs }))?;
    let bytes = call(|out| unsafe { sys::llm_embed(req.as_ptr(), req.len(), out) })?;
    let parsed: Embeddings = serde_json::from_slice(&bytes)?;
    Ok(parsed.embeddings)
}

/// One of the flow's endpoints as the host describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Endpoint {
    /// The model name.
    pub model: String,
    /// `openai` or `local`.
    pub backend: String,
    /// The context size in tokens, when known (local models, or `options.context`).
    pub context: Option<u64>,
}

/// The flow's LLM endpoints (`None` where flows.yaml sets none).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Info {
    /// The chat endpoint.
    pub chat: Option<Endpoint>,
    /// The embeddings endpoint.
    pub embeddings: Option<Endpoint>,
}

/// Which models the flow's calls reach, and their context sizes: size prompts to fit.
pub fn info() -> Result<Info> {
    let bytes = call(|out| unsafe { sys::llm_info(out) })?;
    Ok(serde_json::from_slice(&bytes)?)
}
