//! embed: sentence embeddings over WASI-NN, with either back end.
//!
//! ```text
//! embed [--model NAME] [--backend ggml|onnx] [--vocab PATH] [--repeat N] [--quiet] SENTENCE...
//! ```
//!
//! `ggml` (default, model `embedding`): the host's llama.cpp tokenizes and pools; the guest sends the
//! text with `{"embedding": true}` and reads `{"n_embedding", "embedding"}` from output 0.
//! `onnx` (model `embedding-onnx`): the guest tokenizes itself (BERT WordPiece, lower-cased, with the
//! `vocab.txt` at `--vocab`, a path in a preopened directory), sends `input_ids`, `attention_mask`
//! and `token_type_ids` as I64 `[1, n]`, and reads the pooled, normalised `sentence_embedding` (output
//! 1, F32 `[1, dims]`).
//! Prints one JSON line per sentence: `{"text", "embedding"}`, then the cosine similarity of every
//! pair. `--repeat N` embeds the sentences N times (for benchmarks) and prints only the last round.

use std::collections::HashMap;

use wasmflow::nn::{self, ExecutionTarget, GraphBuilder, GraphEncoding, TensorType};
use wasmflow::serde_json::{self, json, Value};

fn fail(err: nn::Error) -> ! {
    eprintln!("embed: {}", err);
    std::process::exit((err.backend().map(|b| b.code()).unwrap_or(1) & 0xff) as i32)
}

/// BERT's basic tokenizer (lower case, accents of ASCII text unchanged, split on whitespace and
/// punctuation) followed by greedy longest-match WordPiece, as `BertTokenizer` does it.
struct WordPiece {
    vocab: HashMap<String, i64>,
    unk: i64,
    cls: i64,
    sep: i64,
}

impl WordPiece {
    fn load(path: &str) -> Result<WordPiece, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {}", path, e))?;
        let vocab: HashMap<String, i64> = text.lines().enumerate().map(|(i, t)| (t.to_string(), i as i64)).collect();
        let get = |t: &str| vocab.get(t).copied().ok_or(format!("{} has no {}", path, t));
        Ok(WordPiece { unk: get("[UNK]")?, cls: get("[CLS]")?, sep: get("[SEP]")?, vocab })
    }

    fn is_punct(c: char) -> bool {
        let cp = c as u32;
        (33..=47).contains(&cp) || (58..=64).contains(&cp) || (91..=96).contains(&cp) || (123..=126).contains(&cp) || c.is_ascii_punctuation()
    }

    fn words(text: &str) -> Vec<String> {
        let mut words = Vec::new();
        let mut cur = String::new();
        for c in text.to_lowercase().chars() {
            if c.is_whitespace() {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            } else if Self::is_punct(c) {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
                words.push(c.to_string());
            } else if !c.is_control() {
                cur.push(c);
            }
        }
        if !cur.is_empty() {
            words.push(cur);
        }
        words
    }

    fn encode(&self, text: &str) -> Vec<i64> {
        let mut ids = vec![self.cls];
        for word in Self::words(text) {
            let chars: Vec<char> = word.chars().collect();
            if chars.len() > 100 {
                ids.push(self.unk);
                continue;
            }
            let mut pieces = Vec::new();
            let mut start = 0;
            let mut bad = false;
            while start < chars.len() {
                let mut end = chars.len();
                let mut found = None;
                while start < end {
                    let mut sub: String = chars[start..end].iter().collect();
                    if start > 0 {
                        sub = format!("##{}", sub);
                    }
                    if let Some(id) = self.vocab.get(&sub) {
                        found = Some(*id);
                        break;
                    }
                    end -= 1;
                }
                match found {
                    Some(id) => {
                        pieces.push(id);
                        start = end;
                    }
                    None => {
                        bad = true;
                        break;
                    }
                }
            }
            if bad {
                ids.push(self.unk);
            } else {
                ids.extend(pieces);
            }
        }
        ids.push(self.sep);
        ids
    }
}

fn embed_ggml(ctx: &mut nn::GraphExecutionContext, text: &str) -> Vec<f32> {
    ctx.set_input(0, TensorType::U8, &[1], text.as_bytes()).unwrap_or_else(|e| fail(e));
    ctx.compute().unwrap_or_else(|e| fail(e));
    let out = ctx.get_output_vec(0, 16384).unwrap_or_else(|e| fail(e));
    let v: Value = serde_json::from_slice(&out).unwrap_or(Value::Null);
    v["embedding"].as_array().map(|a| a.iter().map(|x| x.as_f64().unwrap_or(0.0) as f32).collect()).unwrap_or_default()
}

fn embed_onnx(ctx: &mut nn::GraphExecutionContext, wp: &WordPiece, text: &str, dims: usize) -> Vec<f32> {
    let ids = wp.encode(text);
    let n = ids.len();
    let mask = vec![1i64; n];
    let types = vec![0i64; n];
    ctx.set_input(0, TensorType::I64, &[1, n], &ids).unwrap_or_else(|e| fail(e));
    ctx.set_input(1, TensorType::I64, &[1, n], &mask).unwrap_or_else(|e| fail(e));
    ctx.set_input(2, TensorType::I64, &[1, n], &types).unwrap_or_else(|e| fail(e));
    ctx.compute().unwrap_or_else(|e| fail(e));
    let mut out = vec![0f32; dims];
    let written = ctx.get_output(1, &mut out).unwrap_or_else(|e| fail(e));
    out.truncate(written / 4);
    out
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}

fn main() {
    let mut backend = "ggml".to_string();
    let mut model: Option<String> = None;
    let mut vocab = "/models/all-MiniLM-L6-v2.vocab.txt".to_string();
    let mut repeat = 1usize;
    let mut quiet = false;
    let mut dims = 384usize;
    let mut sentences: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--backend" => backend = args.next().unwrap_or_default(),
            "--model" | "-m" => model = args.next(),
            "--vocab" => vocab = args.next().unwrap_or_default(),
            "--repeat" => repeat = args.next().and_then(|v| v.parse().ok()).unwrap_or(1),
            "--dims" => dims = args.next().and_then(|v| v.parse().ok()).unwrap_or(384),
            "--quiet" => quiet = true,
            "--" => sentences.extend(args.by_ref()),
            _ => sentences.push(arg),
        }
    }
    if sentences.is_empty() {
        eprintln!("embed: give one or more sentences");
        std::process::exit(2);
    }
    let onnx = backend == "onnx";
    let name = model.unwrap_or_else(|| if onnx { "embedding-onnx".to_string() } else { "embedding".to_string() });
    let builder = if onnx {
        GraphBuilder::new(GraphEncoding::Onnx, ExecutionTarget::AUTO)
    } else {
        GraphBuilder::new(GraphEncoding::Ggml, ExecutionTarget::AUTO).config(r#"{"embedding": true}"#.to_string())
    };
    let graph = builder.build_from_cache(&name).unwrap_or_else(|e| fail(e));
    let mut ctx = graph.init_execution_context().unwrap_or_else(|e| fail(e));
    if !onnx {
        ctx.set_input(1, TensorType::U8, &[1], r#"{"embedding": true}"#.as_bytes()).unwrap_or_else(|e| fail(e));
    }
    let wp = if onnx {
        match WordPiece::load(&vocab) {
            Ok(w) => Some(w),
            Err(e) => {
                eprintln!("embed: {}", e);
                std::process::exit(2)
            }
        }
    } else {
        None
    };
    let mut vectors: Vec<Vec<f32>> = Vec::new();
    for _ in 0..repeat.max(1) {
        vectors.clear();
        for s in &sentences {
            let v = match &wp {
                Some(wp) => embed_onnx(&mut ctx, wp, s, dims),
                None => embed_ggml(&mut ctx, s),
            };
            vectors.push(v);
        }
    }
    if quiet {
        println!("{}", json!({"sentences": sentences.len(), "rounds": repeat, "dims": vectors.first().map(|v| v.len()).unwrap_or(0)}));
        return;
    }
    for (s, v) in sentences.iter().zip(&vectors) {
        println!("{}", json!({"text": s, "embedding": v}));
    }
    let mut sims = Vec::new();
    for i in 0..vectors.len() {
        for j in (i + 1)..vectors.len() {
            sims.push(json!({"a": i, "b": j, "cosine": cosine(&vectors[i], &vectors[j])}));
        }
    }
    println!("{}", json!({"similarities": sims}));
}
