//! classify-onnx: runs an ONNX model over WASI-NN with inputs given on the command line.
//!
//! ```text
//! classify-onnx (--model NAME | --file PATH) --input TYPE:DIMS:VALUES... [--output TYPE:COUNT]...
//!   TYPE   F32 | F16 (given as f32, sent as raw half floats is not supported: use F32) | U8 | I32 | I64
//!   DIMS   1x4
//!   VALUES 0.1,0.2,0.3,0.4
//! ```
//!
//! Inputs are set by index in the order given; each `--output` reads the output of that index and
//! decodes it as TYPE. Prints `{"outputs": [[...], ...], "argmax": i}` (argmax of output 0), so it
//! works as a classifier for any graph with a scores output first. `--file` loads the model bytes from
//! a preopened directory (`load` with the bytes); `--model` uses a model the host registered by name.

use wasmflow::nn::{self, ExecutionTarget, GraphBuilder, GraphEncoding, TensorType};
use wasmflow::serde_json::{json, Value};

fn fail(err: nn::Error) -> ! {
    eprintln!("classify-onnx: {}", err);
    std::process::exit((err.backend().map(|b| b.code()).unwrap_or(1) & 0xff) as i32)
}

fn usage(msg: &str) -> ! {
    eprintln!("classify-onnx: {}", msg);
    std::process::exit(2)
}

fn tensor_type(name: &str) -> TensorType {
    match name.to_ascii_uppercase().as_str() {
        "F32" => TensorType::F32,
        "F16" => TensorType::F16,
        "F64" => TensorType::F64,
        "U8" => TensorType::U8,
        "I32" => TensorType::I32,
        "I64" => TensorType::I64,
        other => usage(&format!("unknown tensor type {}", other)),
    }
}

struct Input {
    ty: TensorType,
    dims: Vec<usize>,
    bytes: Vec<u8>,
}

fn parse_input(spec: &str) -> Input {
    let mut parts = spec.splitn(3, ':');
    let ty = tensor_type(parts.next().unwrap_or(""));
    let dims: Vec<usize> = parts
        .next()
        .unwrap_or("")
        .split('x')
        .map(|d| d.parse().unwrap_or_else(|_| usage(&format!("bad dims in {}", spec))))
        .collect();
    let values: Vec<&str> = parts.next().unwrap_or("").split(',').filter(|v| !v.is_empty()).collect();
    let mut bytes = Vec::new();
    for v in values {
        match ty {
            TensorType::F32 => bytes.extend_from_slice(&v.parse::<f32>().unwrap_or_else(|_| usage(v)).to_le_bytes()),
            TensorType::F64 => bytes.extend_from_slice(&v.parse::<f64>().unwrap_or_else(|_| usage(v)).to_le_bytes()),
            TensorType::U8 => bytes.push(v.parse::<u8>().unwrap_or_else(|_| usage(v))),
            TensorType::I32 => bytes.extend_from_slice(&v.parse::<i32>().unwrap_or_else(|_| usage(v)).to_le_bytes()),
            TensorType::I64 => bytes.extend_from_slice(&v.parse::<i64>().unwrap_or_else(|_| usage(v)).to_le_bytes()),
            TensorType::F16 => bytes.extend_from_slice(&v.parse::<u16>().unwrap_or_else(|_| usage("F16 values are raw u16 bit patterns")).to_le_bytes()),
        }
    }
    Input { ty, dims, bytes }
}

fn decode(ty: TensorType, bytes: &[u8]) -> Vec<Value> {
    match ty {
        TensorType::F32 => bytes.chunks_exact(4).map(|c| json!(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect(),
        TensorType::F64 => bytes.chunks_exact(8).map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            json!(f64::from_le_bytes(a))
        }).collect(),
        TensorType::U8 => bytes.iter().map(|b| json!(*b)).collect(),
        TensorType::I32 => bytes.chunks_exact(4).map(|c| json!(i32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect(),
        TensorType::I64 => bytes.chunks_exact(8).map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            json!(i64::from_le_bytes(a))
        }).collect(),
        TensorType::F16 => bytes.chunks_exact(2).map(|c| json!(u16::from_le_bytes([c[0], c[1]]))).collect(),
    }
}

fn main() {
    let mut model: Option<String> = None;
    let mut file: Option<String> = None;
    let mut inputs: Vec<Input> = Vec::new();
    let mut outputs: Vec<(TensorType, usize)> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--model" | "-m" => model = args.next(),
            "--file" => file = args.next(),
            "--input" => inputs.push(parse_input(&args.next().unwrap_or_else(|| usage("--input needs a value")))),
            "--output" => {
                let spec = args.next().unwrap_or_else(|| usage("--output needs a value"));
                let mut p = spec.splitn(2, ':');
                let ty = tensor_type(p.next().unwrap_or(""));
                let count = p.next().and_then(|c| c.parse().ok()).unwrap_or(1024);
                outputs.push((ty, count));
            }
            other => usage(&format!("unknown argument {}", other)),
        }
    }
    if outputs.is_empty() {
        outputs.push((TensorType::F32, 1024));
    }
    let builder = GraphBuilder::new(GraphEncoding::Onnx, ExecutionTarget::CPU);
    let graph = match (&model, &file) {
        (Some(name), _) => builder.build_from_cache(name),
        (None, Some(path)) => builder.build_from_files(vec![path.clone()]),
        (None, None) => usage("give --model NAME or --file PATH"),
    }
    .unwrap_or_else(|e| fail(e));
    let mut ctx = graph.init_execution_context().unwrap_or_else(|e| fail(e));
    for (i, input) in inputs.iter().enumerate() {
        ctx.set_input(i, input.ty, &input.dims, &input.bytes).unwrap_or_else(|e| fail(e));
    }
    ctx.compute().unwrap_or_else(|e| fail(e));
    let mut decoded = Vec::new();
    for (i, (ty, count)) in outputs.iter().enumerate() {
        let mut buf = vec![0u8; count * 8];
        let n = ctx.get_output(i, &mut buf).unwrap_or_else(|e| fail(e));
        decoded.push(decode(*ty, &buf[..n]));
    }
    let argmax = decoded
        .first()
        .map(|v| {
            let mut best = 0usize;
            for (i, x) in v.iter().enumerate() {
                if x.as_f64().unwrap_or(f64::MIN) > v[best].as_f64().unwrap_or(f64::MIN) {
                    best = i;
                }
            }
            best
        })
        .unwrap_or(0);
    println!("{}", json!({"outputs": decoded, "argmax": argmax}));
}
