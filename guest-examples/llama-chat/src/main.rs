//! llama-chat: one-shot or streaming generation over WASI-NN with a model the host preloaded.
//!
//! ```text
//! llama-chat [--model NAME] [--stream] [--json] [--n-predict N] [--temp T] [--ctx-size N]
//!            [--seed S] [--metadata JSON] [PROMPT...]
//! ```
//!
//! The model name comes from `--model`, else the `model` environment variable (a flow's `config:`
//! key), else `default`, the way LlamaEdge guests name a `--nn-preload default:GGML:AUTO:...` model.
//! Without a prompt on the command line it reads one from stdin. It prints the answer to stdout (in
//! streaming mode token by token as it comes); `--json` prints one JSON object instead, with the text,
//! the pieces of a stream (hex, since a piece may split a UTF-8 character) and the host's metadata.
//! A WASI-NN failure exits with its code (e.g. 102 for a prompt longer than the context).
//! It imports only `wasi_ephemeral_nn` and WASI, so WasmEdge runs it unchanged.

use std::io::{Read, Write};

use wasmflow::nn::{self, ExecutionTarget, GraphBuilder, GraphEncoding, TensorType};
use wasmflow::serde_json::{self, json, Map, Value};

struct Args {
    model: String,
    stream: bool,
    json: bool,
    metadata: Map<String, Value>,
    prompt: String,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let mut out = Args {
        model: std::env::var("model").unwrap_or_else(|_| "default".to_string()),
        stream: false,
        json: false,
        metadata: Map::new(),
        prompt: String::new(),
    };
    let mut words: Vec<String> = Vec::new();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{} needs a value", name));
        match arg.as_str() {
            "--model" | "-m" => out.model = value("--model")?,
            "--stream" => out.stream = true,
            "--json" => out.json = true,
            "--n-predict" | "--temp" | "--ctx-size" | "--seed" | "--top-k" | "--top-p" | "--repeat-penalty" | "--batch-size" | "--threads" | "--n-gpu-layers" => {
                let v = value(&arg)?;
                let parsed: Value = serde_json::from_str(&v).map_err(|_| format!("{} needs a number, got {}", arg, v))?;
                out.metadata.insert(arg.trim_start_matches("--").to_string(), parsed);
            }
            "--reverse-prompt" => {
                let v = value(&arg)?;
                out.metadata.insert("reverse-prompt".to_string(), Value::String(v));
            }
            "--metadata" => {
                let v = value(&arg)?;
                match serde_json::from_str::<Value>(&v) {
                    Ok(Value::Object(m)) => out.metadata.extend(m),
                    _ => return Err("--metadata needs a JSON object".to_string()),
                }
            }
            "--" => words.extend(args.by_ref()),
            _ => words.push(arg),
        }
    }
    out.prompt = words.join(" ");
    if out.prompt.is_empty() {
        std::io::stdin().read_to_string(&mut out.prompt).map_err(|e| e.to_string())?;
    }
    Ok(out)
}

fn fail(err: nn::Error) -> ! {
    eprintln!("llama-chat: {}", err);
    let code = err.backend().map(|b| b.code()).unwrap_or(1);
    std::process::exit((code & 0xff) as i32)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{:02x}", b)).collect()
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("llama-chat: {}", e);
            std::process::exit(2)
        }
    };
    let graph = GraphBuilder::new(GraphEncoding::Ggml, ExecutionTarget::AUTO)
        .build_from_cache(&args.model)
        .unwrap_or_else(|e| fail(e));
    let mut ctx = graph.init_execution_context().unwrap_or_else(|e| fail(e));
    if !args.metadata.is_empty() {
        let meta = Value::Object(args.metadata.clone()).to_string();
        ctx.set_input(1, TensorType::U8, &[1], meta.as_bytes()).unwrap_or_else(|e| fail(e));
    }
    ctx.set_input(0, TensorType::U8, &[1], args.prompt.as_bytes()).unwrap_or_else(|e| fail(e));

    let stdout = std::io::stdout();
    let mut text: Vec<u8> = Vec::new();
    let mut pieces: Vec<String> = Vec::new();
    let mut stop = "end_of_sequence";
    if args.stream {
        let mut buf = vec![0u8; 256];
        loop {
            match ctx.compute_single() {
                Ok(()) => {}
                Err(e) if nn::is_end_of_stream(&e) => {
                    if e.backend() == Some(nn::BackendError::ContextFull) {
                        stop = "context_full";
                    }
                    break;
                }
                Err(e) => fail(e),
            }
            let n = match ctx.get_output_single(0, &mut buf) {
                Ok(n) => n,
                Err(nn::Error::OutputTooLarge { needed }) => {
                    buf.resize(needed, 0);
                    ctx.get_output_single(0, &mut buf).unwrap_or_else(|e| fail(e))
                }
                Err(e) => fail(e),
            };
            let piece = &buf[..n];
            text.extend_from_slice(piece);
            if args.json {
                pieces.push(hex(piece));
            } else {
                let mut lock = stdout.lock();
                let _ = lock.write_all(piece);
                let _ = lock.flush();
            }
        }
    } else {
        match ctx.compute() {
            Ok(()) => {}
            Err(e) if e.backend() == Some(nn::BackendError::ContextFull) => stop = "context_full",
            Err(e) => fail(e),
        }
        text = ctx.get_output_vec(0, 4096).unwrap_or_else(|e| fail(e));
        if !args.json {
            let mut lock = stdout.lock();
            let _ = lock.write_all(&text);
        }
    }
    let meta_bytes = if args.stream {
        let mut buf = vec![0u8; 1024];
        let n = ctx.get_output_single(1, &mut buf).unwrap_or_else(|e| fail(e));
        buf.truncate(n);
        buf
    } else {
        ctx.get_output_vec(1, 1024).unwrap_or_else(|e| fail(e))
    };
    if args.stream {
        ctx.fini_single().unwrap_or_else(|e| fail(e));
    }
    if args.json {
        let meta: Value = serde_json::from_slice(&meta_bytes).unwrap_or(Value::Null);
        let out = json!({
            "text": String::from_utf8_lossy(&text),
            "text_hex": hex(&text),
            "pieces_hex": pieces,
            "stop": stop,
            "metadata": meta,
        });
        println!("{}", out);
    } else {
        println!();
    }
}
