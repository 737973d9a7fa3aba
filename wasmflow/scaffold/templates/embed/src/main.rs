//! __NAME__: embeddings and similarity. Embeds a query and a list of documents with the flow's
//! `llm.embeddings` model and ranks the documents by cosine similarity to the query.
use wasmflow::llm;
use wasmflow::serde_json::{json, Value};
use wasmflow::{event, info, output, response};

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let denom = norm(a) * norm(b);
    if denom == 0.0 { 0.0 } else { dot / denom }
}

fn run() -> wasmflow::Result<()> {
    let body = event::json().unwrap_or(Value::Null);
    let query = body["query"].as_str().unwrap_or("").to_string();
    let documents: Vec<String> = body["documents"].as_array().map(|docs| {
        docs.iter().filter_map(|d| d.as_str().map(str::to_string)).collect()
    }).unwrap_or_default();
    let mut inputs: Vec<&str> = vec![query.as_str()];
    inputs.extend(documents.iter().map(String::as_str));
    let vectors = llm::embed(&inputs)?;
    let mut ranked: Vec<(f32, &str)> = documents.iter().enumerate()
        .map(|(i, doc)| (cosine(&vectors[0], &vectors[i + 1]), doc.as_str()))
        .collect();
    ranked.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal));
    info!("ranked {} documents ({} dimensions)", ranked.len(), vectors[0].len());
    let result = json!({"query": query, "dimensions": vectors[0].len(),
                        "ranked": ranked.iter().map(|(s, d)| json!({"document": d, "score": s})).collect::<Vec<_>>()});
    response::json(&result)?;
    output::set_json(&result)
}

fn main() {
    if let Err(err) = run() {
        wasmflow::error!("__NAME__ failed: {}", err);
        std::process::exit(1);
    }
}
