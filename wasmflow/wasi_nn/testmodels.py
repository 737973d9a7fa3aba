"""Tiny deterministic models written on demand: a random llama GGUF and a small ONNX graph.

Tests, benchmarks and demos need models that exist on every machine without a download and load in
milliseconds. The weights are random (seeded), so the text they generate is nonsense, but llama.cpp and
onnxruntime run them through exactly the code paths a real model takes: a SentencePiece vocabulary with
byte fallback that llama.cpp's tokenizer accepts, real attention layers, real ONNX operators.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

TINY_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?:;'\"-()"
TINY_WORDS = ["the", "a", "is", "of", "and", "to", "in", "it", "hello", "world", "once", "upon", "time", "story", "cat", "dog"]


def tiny_vocab() -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece (llama) vocabulary: <unk> <s> </s>, 256 byte tokens, characters and a few words."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    scores = [0.0, 0.0, 0.0]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(gguf.TokenType.BYTE)
        scores.append(0.0)
    pieces = ["\u2581"] + list(TINY_CHARS) + ["\u2581" + c for c in "abcdefghijklmnopqrstuvwxyz"] + ["\u2581" + w for w in TINY_WORDS] + TINY_WORDS
    seen = set(tokens)
    for i, piece in enumerate(pieces):
        if piece in seen:
            continue
        seen.add(piece)
        tokens.append(piece)
        types.append(gguf.TokenType.NORMAL)
        scores.append(-float(i) if len(piece) == 1 else float(len(piece)))  # longer pieces merge first
    return tokens, scores, [int(t) for t in types]


def write_tiny_llama(path: Path, seed: int = 1234, n_embd: int = 64, n_layer: int = 2, n_head: int = 4, n_ff: int = 128, n_ctx: int = 512,
                     extra: Optional[Callable[[Any], None]] = None) -> Path:
    """A random llama-architecture GGUF (f32, a few hundred KB) with a working tokenizer. `extra`, if
    given, is called with the `gguf.GGUFWriter` to add metadata (the hostile tests add keys)."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tokens, scores, types = tiny_vocab()
    n_vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("wasmflow-tiny-llama")
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if extra is not None:
        extra(w)

    def rand(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w.add_tensor("token_embd.weight", rand(n_vocab, n_embd, scale=1.0))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.add_tensor("output.weight", rand(n_vocab, n_embd, scale=0.5))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{name}.weight", rand(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", rand(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rand(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_down.weight", rand(n_embd, n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_tiny_onnx(path: Path, seed: int = 7) -> Path:
    """A small classifier: x F32 [1,4] -> probs F32 [1,3] (MatMul, Add, Softmax), and ids I64 [1,5]
    -> ids_sum I64 [1,1], so tests cover a float and an integer input and output with true dims."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((4, 3)).astype(np.float32)
    bias = rng.standard_normal(3).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
            helper.make_node("ReduceSum", ["ids", "axes"], ["ids_sum"], keepdims=1),
        ],
        "wasmflow_tiny",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 5]),
        ],
        [
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 3]),
            helper.make_tensor_value_info("ids_sum", TensorProto.INT64, [1, 1]),
        ],
        initializer=[
            numpy_helper.from_array(weight, "W"),
            numpy_helper.from_array(bias, "b"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="wasmflow")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
