"""WASI-NN through real wasm guests on the wasmtime engine, against the libraries called directly.

- Greedy generation by `llama-chat` equals llama-cpp-python's own `Llama.generate`, token for token
  (the tiny random llama always; Gemma 3 270M marked `slow`), and streaming equals one-shot.
- MiniLM embeddings from `embed` through the ggml and the onnx back ends are each within cosine 0.99 of
  a numpy forward pass over the safetensors weights, and similar sentences score higher.
- Bad input comes back as WASI-NN codes and exit codes, never a crash of the host.
- `wasmflow exec` passes arguments, stdin, stdout and the exit code through.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from engine_support import skip_without
from wasmflow.engine.base import RunRequest, Status
from wasmflow.flows.model import Allow, Flow, Limits
from wasmflow.host_functions import Host
from wasmflow.host_functions.spec import Event
from wasmflow.wasi_nn import ModelRegistry, WasiNNCapability, parse_preload
from wasmflow.wasi_nn.testmodels import write_tiny_llama, write_tiny_onnx
from optional_support import need_llama_cpp

llama_cpp = need_llama_cpp()

REPO = Path(__file__).resolve().parents[1]
STATE = Path(os.environ.get("WASMFLOW_TEST_STATE_DIR", REPO / ".wasmflow"))
SENTENCES = [
    "A man is playing a guitar.",
    "Someone is strumming a guitar on stage.",
    "The central bank raised interest rates again.",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tiny-models")
    return {"gguf": write_tiny_llama(d / "tiny.gguf"), "onnx": write_tiny_onnx(d / "tiny.onnx"), "dir": d}


@pytest.fixture(scope="module")
def minilm() -> dict[str, Path]:
    from wasmflow.wasi_nn import models

    files = models.pull("all-minilm-l6-v2", STATE)
    return {"gguf": files[0], "onnx": files[1], "vocab": files[2], "src": models.minilm_source()}


@pytest.fixture(scope="module")
def gemma() -> Path:
    from wasmflow.wasi_nn import models

    return models.pull("gemma3-270m", STATE)[0]


class Runner:
    """One host and one engine for the module, like a wasmflow process."""

    def __init__(self, registry: ModelRegistry, cache: Path, wasm: dict[str, Path], engine: str = "wasmtime") -> None:
        from wasmflow.engine import make_engine

        self.host = Host([WasiNNCapability(registry)])
        self.engine = make_engine(engine, self.host, cache)
        self.wasm = wasm
        self.modules: dict[str, object] = {}

    def run(self, guest: str, args: list[str], models: list[str], dirs: list[str] = [], timeout: float = 300,  # noqa: B006
            load_bytes: bool = False):
        if guest not in self.modules:
            self.modules[guest] = self.engine.load(self.wasm[guest], "nn-test")
        flow = Flow(name="nn-test", module="x.wasm", allow=Allow(models=models, dirs=dirs, nn={"load_bytes": load_bytes}),
                    limits=Limits(timeout=timeout, memory="1GiB", output="16MiB"))
        return self.engine.run(self.modules[guest], RunRequest(flow=flow, event=Event(name="test"), args=args))

    def close(self) -> None:
        self.engine.close()
        self.host.close()


@pytest.fixture(scope="module", params=["wasmtime", "wasmedge"])
def runner(request, guest_wasm: dict[str, Path], tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The guests run on both engines: a guest written for WasmEdge's plugin must behave the same."""
    skip_without(request.param)
    reg = ModelRegistry([
        parse_preload(f"default:GGML:AUTO:{tiny['gguf']}"),
        parse_preload(f"tiny-onnx:ONNX:CPU:{tiny['onnx']}"),
        parse_preload(f"gone:GGML:AUTO:{tiny['dir']}/missing.gguf"),
    ])
    r = Runner(reg, tmp_path_factory.mktemp("wasm-cache"), guest_wasm, request.param)
    yield r
    r.close()


def direct_greedy(path: Path, prompt: str, n_predict: int, n_ctx: int) -> list[bytes]:
    """llama-cpp-python called directly: the same prompt tokenization and greedy sampling."""
    from wasmflow.wasi_nn.ggml_backend import token_piece

    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, verbose=False)
    tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    pieces: list[bytes] = []
    for tok in llm.generate(tokens, temp=0.0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, tok) or len(pieces) >= n_predict:
            break
        pieces.append(token_piece(llm, tok))
    llm.close()
    return pieces


def chat(runner: Runner, model: str, prompt: str, n_predict: int, stream: bool, ctx: int = 512) -> dict:
    args = ["--json", "--model", model, "--temp", "0", "--n-predict", str(n_predict), "--ctx-size", str(ctx)]
    result = runner.run("llama-chat", [*args, *(["--stream"] if stream else []), prompt], [model])
    assert result.status is Status.OK, (result.error, result.stderr)
    return json.loads(result.stdout)


def test_tiny_greedy_guest_equals_direct_token_for_token(runner: Runner, tiny: dict[str, Path]) -> None:
    prompt = "once upon a time the cat"
    expected = direct_greedy(tiny["gguf"], prompt, 40, 512)
    one_shot = chat(runner, "default", prompt, 40, stream=False)
    streamed = chat(runner, "default", prompt, 40, stream=True)
    pieces = [bytes.fromhex(p) for p in streamed["pieces_hex"]]
    assert len(expected) == 40
    assert pieces == expected  # token for token
    assert bytes.fromhex(one_shot["text_hex"]) == b"".join(expected) == bytes.fromhex(streamed["text_hex"])
    assert one_shot["metadata"]["output_tokens"] == streamed["metadata"]["output_tokens"] == 40


@pytest.mark.slow
def test_gemma_greedy_guest_equals_direct_token_for_token(runner: Runner, gemma: Path) -> None:
    runner.host.capability("nn").registry.add(parse_preload(f"gemma:GGML:AUTO:{gemma}"))  # type: ignore[attr-defined]
    prompt = "The capital of France is"
    expected = direct_greedy(gemma, prompt, 24, 512)
    streamed = chat(runner, "gemma", prompt, 24, stream=True)
    one_shot = chat(runner, "gemma", prompt, 24, stream=False)
    assert [bytes.fromhex(p) for p in streamed["pieces_hex"]] == expected
    assert bytes.fromhex(one_shot["text_hex"]) == b"".join(expected)
    # the text field is the same bytes as text (lossy UTF-8, as the guest decodes them), and not empty
    assert one_shot["text"] == b"".join(expected).decode("utf-8", errors="replace") != ""


def test_bad_model_names_and_files_give_codes(runner: Runner) -> None:
    r = runner.run("llama-chat", ["--model", "nope", "hi"], ["default"])
    assert r.exit_code == 8 and r.status is Status.DENIED and b"NotFound" in r.stderr
    r = runner.run("llama-chat", ["--model", "default", "hi"], [])  # exists, not allowed: same answer
    assert r.exit_code == 8 and any("allow.models" in d for d in r.denials)
    r = runner.run("llama-chat", ["--model", "gone", "hi"], ["gone"])
    assert r.exit_code == 103 and r.status is Status.ERROR


def test_prompt_longer_than_context_is_102_through_a_guest(runner: Runner) -> None:
    r = runner.run("llama-chat", ["--ctx-size", "64", "hello world " * 60], ["default"])
    assert r.exit_code == 102 and b"PromptTooLong" in r.stderr


def test_concurrent_guest_runs_share_one_model_without_mixing(runner: Runner) -> None:
    expected = chat(runner, "default", "the dog", 24, stream=False)["text_hex"]
    out: list[str] = []

    def go() -> None:
        out.append(chat(runner, "default", "the dog", 24, stream=True)["text_hex"])

    threads = [threading.Thread(target=go) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert out == [expected] * 3
    stats = runner.host.capability("nn").registry.stats()["default"]  # type: ignore[attr-defined]
    assert stats["acquired_total"] >= 4 and stats["busy"] == 0 and stats["waiting"] == 0


def test_classify_onnx_guest(runner: Runner, tiny: dict[str, Path]) -> None:
    import onnxruntime as ort

    x = [0.5, -1.0, 2.0, 0.25]
    args = ["--input", "F32:1x4:" + ",".join(map(str, x)), "--input", "I64:1x5:1,2,3,4,5", "--output", "F32:3", "--output", "I64:1"]
    sess = ort.InferenceSession(str(tiny["onnx"]))
    probs, sums = sess.run(None, {"x": np.array([x], dtype=np.float32), "ids": np.array([[1, 2, 3, 4, 5]], dtype=np.int64)})
    for source in (["--model", "tiny-onnx"], ["--file", "/m/tiny.onnx"]):
        r = runner.run("classify-onnx", [*source, *args], ["tiny-onnx"], dirs=[f"{tiny['dir']}:/m:ro"],
                       load_bytes=source[0] == "--file")  # the guest reads the file and passes its bytes
        assert r.status is Status.OK, (r.error, r.stderr)
        out = json.loads(r.stdout)
        assert np.allclose(out["outputs"][0], probs.ravel(), atol=1e-6)
        assert out["outputs"][1] == [15] and out["argmax"] == int(np.argmax(probs))
    r = runner.run("classify-onnx", ["--model", "tiny-onnx", "--input", "I32:1x4:1,2,3,4"], ["tiny-onnx"])
    assert r.exit_code == 1 and b"InvalidArgument" in r.stderr  # wrong tensor type for an F32 input


# -- MiniLM embeddings ------------------------------------------------------------------------


def numpy_minilm(src: Path, text: str) -> np.ndarray:
    """all-MiniLM-L6-v2 forward pass in numpy from the safetensors weights: BERT, mean pooling, L2."""
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    W = load_file(str(src / "model.safetensors"))
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    ids = np.array(tok.encode(text).ids)
    cfg = json.loads((src / "config.json").read_text())
    heads, eps = cfg["num_attention_heads"], cfg["layer_norm_eps"]
    erf = np.vectorize(math.erf)

    def ln(x: np.ndarray, p: str) -> np.ndarray:
        m = x.mean(-1, keepdims=True)
        v = ((x - m) ** 2).mean(-1, keepdims=True)
        return (x - m) / np.sqrt(v + eps) * W[p + ".weight"] + W[p + ".bias"]

    def lin(x: np.ndarray, p: str) -> np.ndarray:
        return x @ W[p + ".weight"].T + W[p + ".bias"]

    x = W["embeddings.word_embeddings.weight"][ids] + W["embeddings.position_embeddings.weight"][: len(ids)] + W["embeddings.token_type_embeddings.weight"][0]
    x = ln(x, "embeddings.LayerNorm").astype(np.float64)
    hd = x.shape[1] // heads
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        q, k, v = (lin(x, f"{p}.attention.self.{n}").reshape(-1, heads, hd).transpose(1, 0, 2) for n in ("query", "key", "value"))
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        c = (s @ v).transpose(1, 0, 2).reshape(-1, heads * hd)
        h = ln(lin(c, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm")
        f = lin(h, f"{p}.intermediate.dense")
        f = 0.5 * f * (1 + erf(f / np.sqrt(2)))
        x = ln(lin(f, f"{p}.output.dense") + h, f"{p}.output.LayerNorm")
    m = x.mean(0)
    return m / np.linalg.norm(m)


def embed_run(runner: Runner, minilm: dict[str, Path], backend: str) -> list[np.ndarray]:
    reg = runner.host.capability("nn").registry  # type: ignore[attr-defined]
    if "embedding" not in reg.names():
        reg.add(parse_preload(f"embedding:GGML:AUTO:{minilm['gguf']}"))
        reg.add(parse_preload(f"embedding-onnx:ONNX:AUTO:{minilm['onnx']}"))
    args = ["--backend", backend]
    if backend == "onnx":
        args += ["--vocab", f"/models/{minilm['vocab'].name}"]
    r = runner.run("embed", [*args, *SENTENCES], ["embedding", "embedding-onnx"], dirs=[f"{minilm['vocab'].parent}:/models:ro"])
    assert r.status is Status.OK, (r.error, r.stderr)
    lines = [json.loads(line) for line in r.stdout.decode().splitlines()]
    assert [line["text"] for line in lines[:-1]] == SENTENCES
    return [np.array(line["embedding"]) for line in lines[:-1]]


@pytest.mark.parametrize("backend", ["ggml", "onnx"])
def test_minilm_embeddings_match_numpy_reference(runner: Runner, minilm: dict[str, Path], backend: str) -> None:
    vectors = embed_run(runner, minilm, backend)
    refs = [numpy_minilm(minilm["src"], s) for s in SENTENCES]
    for v, ref in zip(vectors, refs):
        assert v.shape == (384,)
        cos = float(v @ ref / (np.linalg.norm(v) * np.linalg.norm(ref)))
        assert cos >= 0.99, cos
    sim = lambda a, b: float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))  # noqa: E731
    assert sim(vectors[0], vectors[1]) > sim(vectors[0], vectors[2]) + 0.2
    assert sim(vectors[0], vectors[1]) > sim(vectors[1], vectors[2]) + 0.2


# -- wasmflow exec ----------------------------------------------------------------------------


def _exec(args: list[str], stdin: bytes = b"") -> subprocess.CompletedProcess:
    code = "from wasmflow.exec_command import exec_command; exec_command()"
    return subprocess.run([sys.executable, "-c", code, *args], input=stdin, capture_output=True, cwd=REPO, timeout=300)


def test_exec_runs_a_guest_like_wasmedge(guest_wasm: dict[str, Path], tiny: dict[str, Path], tmp_path: Path) -> None:
    wasm = str(guest_wasm["llama-chat"])
    state = ["--state-dir", str(tmp_path)]
    ok = _exec([wasm, *state, "--nn-preload", f"default:GGML:AUTO:{tiny['gguf']}", "--", "--json", "--temp", "0", "--n-predict", "6"],
               stdin=b"once upon a time")
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert out["metadata"]["output_tokens"] == 6 and out["metadata"]["input_tokens"] > 3  # prompt read from stdin
    env = _exec([wasm, *state, "--nn-preload", f"chat:GGML:AUTO:{tiny['gguf']}", "--env", "model=chat", "--", "--n-predict", "2", "hi"])
    assert env.returncode == 0, env.stderr  # the model named through the environment
    streamed = _exec([wasm, *state, "--nn-preload", f"default:GGML:AUTO:{tiny['gguf']}", "--",
                      "--temp", "0", "--n-predict", "8", "--metadata", '{"stream-stdout": true}', "once upon a time"])
    assert streamed.returncode == 0, streamed.stderr
    text = streamed.stdout[: (len(streamed.stdout) - 1) // 2]
    assert text and streamed.stdout == text + text + b"\n"  # the host streamed it, then the guest printed it
    missing = _exec([wasm, *state, "--nn-preload", f"default:GGML:AUTO:{tmp_path}/none.gguf", "--", "hi"])
    assert missing.returncode == 103 and b"ModelNotFound" in missing.stderr
    bad = _exec([wasm, *state, "--nn-preload", "default:GGML:AUTO", "--", "hi"])
    assert bad.returncode == 2 and b"nn-preload" in bad.stderr


def test_same_guest_on_the_wasmedge_engine(guest_wasm: dict[str, Path], tiny: dict[str, Path], tmp_path: Path) -> None:
    """One capability definition serves both engines: the WasmEdge engine gives the same tokens."""
    skip_without("wasmedge")
    from wasmflow.engine import make_engine

    reg = ModelRegistry([parse_preload(f"default:GGML:AUTO:{tiny['gguf']}")])
    host = Host([WasiNNCapability(reg)])
    results = {}
    for name in ("wasmtime", "wasmedge"):
        eng = make_engine(name, host, tmp_path / name)
        mod = eng.load(guest_wasm["llama-chat"], "nn-test")
        flow = Flow(name="nn-test", module="x.wasm", allow=Allow(models=["default"]), limits=Limits(timeout=120, memory="1GiB"))
        r = eng.run(mod, RunRequest(flow=flow, event=Event(name="test"), args=["--json", "--stream", "--temp", "0", "--n-predict", "16", "the cat"]))
        assert r.status is Status.OK, (name, r.error, r.stderr)
        results[name] = json.loads(r.stdout)["pieces_hex"]
        eng.close()
    assert results["wasmtime"] == results["wasmedge"] and len(results["wasmtime"]) == 16
    host.close()
