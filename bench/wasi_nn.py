"""WASI-NN overhead: the same model through a wasm guest and through the library called directly.

    .venv/bin/python bench/wasi_nn.py [--quick] [--skip-gemma] [--json out.json]

Generation (tokens/s): `llama-chat` on the wasmtime engine (one-shot `compute`, greedy, a fixed number
of tokens with ignore-eos) against llama-cpp-python's `Llama.generate` on the same file with the same
context size, batch and threads, in the same process, runs interleaved (guest, direct, guest, ...) so
load on the machine affects both alike; the median of the rounds is reported. Embeddings (per second):
`embed` through the ggml and the onnx back ends against llama.cpp and onnxruntime called directly.
"Load paid once" compares a guest's first run in the process (model load included) with later ones.

The time of a guest run is the whole run: instantiate, argument parsing, prompt evaluation and
generation, so the ratio includes everything wasmflow adds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SENTENCES = [
    "A man is playing a guitar.",
    "Someone is strumming a guitar on stage.",
    "The central bank raised interest rates again.",
    "WebAssembly runs sandboxed agents on the server.",
]


def measure(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this thread). With one llama.cpp / onnxruntime thread all the work
    runs on the calling thread (the wasm guest too), so CPU time is what the work costs, unaffected by
    other processes taking the CPU away; wall time is what a user waits."""
    w0, c0 = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - w0, time.thread_time() - c0


class GuestRunner:
    def __init__(self, registry: Any, cache: Path) -> None:
        from wasmflow.build import BuildError, artifact_path, build
        from wasmflow.engine.wasmtime_engine import WasmtimeEngine
        from wasmflow.host_functions import Host
        from wasmflow.wasi_nn import WasiNNCapability

        try:
            self.wasm = build(["llama-chat", "embed"], REPO / "guest-examples", cache / "build", progress=False)
        except BuildError as exc:  # e.g. another crate of the workspace is broken: use what is built
            self.wasm = {n: artifact_path(REPO / "guest-examples", n) for n in ("llama-chat", "embed")}
            if not all(p.exists() for p in self.wasm.values()):
                raise
            print(f"note: build failed ({exc}); using the built modules", file=sys.stderr)
        self.host = Host([WasiNNCapability(registry)])
        self.engine = WasmtimeEngine(self.host, cache)
        self.modules = {name: self.engine.load(self.wasm[name], "bench") for name in ("llama-chat", "embed")}

    def run(self, guest: str, args: list[str], models: list[str], dirs: list[str] = []) -> Any:  # noqa: B006
        from wasmflow.engine.base import RunRequest, Status
        from wasmflow.flows.model import Allow, Flow, Limits
        from wasmflow.host_functions.spec import Event

        flow = Flow(name="bench", module="x.wasm", allow=Allow(models=models, dirs=dirs), limits=Limits(timeout=3600, memory="1GiB", output="64MiB"))
        r = self.engine.run(self.modules[guest], RunRequest(flow=flow, event=Event(name="bench"), args=args))
        if r.status is not Status.OK:
            raise RuntimeError(f"{guest} failed: {r.status} {r.error} {r.stderr[-500:]!r}")
        return r


def bench_generation(runner: GuestRunner, name: str, path: Path, n_tokens: int, rounds: int, threads: int, ctx: int = 512) -> dict[str, Any]:
    import llama_cpp

    prompt = "Once upon a time, in a small village by the sea,"
    args = ["--json", "--model", name, "--temp", "0", "--n-predict", str(n_tokens), "--ctx-size", str(ctx),
            "--threads", str(threads), "--metadata", '{"ignore-eos": true}', prompt]
    t0 = time.perf_counter()
    first = runner.run("llama-chat", args, [name])
    first_s = time.perf_counter() - t0
    out = json.loads(first.stdout)
    assert out["metadata"]["output_tokens"] == n_tokens, out["metadata"]

    llm = llama_cpp.Llama(str(path), n_ctx=ctx, n_threads=threads, n_threads_batch=threads, verbose=False)

    def direct() -> None:
        tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        llm.reset()  # a new request evaluates its prompt (without this, generate() reuses the cached prefix)
        n = 0
        for _tok in llm.generate(tokens, temp=0.0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0):
            n += 1
            if n >= n_tokens:
                break

    def guest() -> None:
        runner.run("llama-chat", args, [name])

    direct()  # warm both the same way
    guest()
    g_times, d_times = [], []
    for _ in range(rounds):
        g_times.append(measure(guest))
        d_times.append(measure(direct))
    llm.close()
    return summarise(f"generation {name}", "tokens/s", n_tokens, g_times, d_times,
                     first_run_s=first_s, warm_run_s=min(t[0] for t in g_times))


def summarise(what: str, unit: str, n: int, g_times: list[tuple[float, float]], d_times: list[tuple[float, float]], **extra: Any) -> dict[str, Any]:
    """Best wall time of the rounds is the headline (the machine's noise only ever adds time), with
    medians and the CPU-time ratio (best of the rounds) beside it."""
    gw, dw = [t[0] for t in g_times], [t[0] for t in d_times]
    g, d = min(gw), min(dw)
    gm, dm = statistics.median(gw), statistics.median(dw)
    gc, dc = min(t[1] for t in g_times), min(t[1] for t in d_times)
    return {"what": what, "unit": unit, "guest": n / g, "direct": n / d, "ratio": d / g,
            "guest_median": n / gm, "direct_median": n / dm, "ratio_median": dm / gm,
            "guest_cpu": n / gc, "direct_cpu": n / dc, "ratio_cpu": dc / gc, "rounds": len(g_times), **extra}


def bench_embeddings(runner: GuestRunner, models_dir: Path, repeat: int, rounds: int, threads: int) -> list[dict[str, Any]]:
    import llama_cpp
    import numpy as np
    import onnxruntime as ort

    from wasmflow.wasi_nn.ggml_backend import embed_tokens

    results = []
    n = len(SENTENCES) * repeat
    dirs = [f"{models_dir}:/models:ro"]
    # ggml
    g_args = ["--quiet", "--repeat", str(repeat), *SENTENCES]
    runner.run("embed", g_args, ["embedding"])
    llm = llama_cpp.Llama(str(models_dir / "all-MiniLM-L6-v2.f16.gguf"), embedding=True, n_ctx=512, n_batch=512, n_ubatch=512,
                          n_threads=threads, n_threads_batch=threads, verbose=False)

    def direct_ggml() -> None:
        for _ in range(repeat):
            for s in SENTENCES:
                embed_tokens(llm, llm.tokenize(s.encode(), add_bos=True, special=True))

    direct_ggml()
    g_t, d_t = [], []
    for _ in range(rounds):
        g_t.append(measure(lambda: runner.run("embed", g_args, ["embedding"])))
        d_t.append(measure(direct_ggml))
    llm.close()
    results.append(summarise("embeddings MiniLM (ggml)", "embeddings/s", n, g_t, d_t))
    # onnx
    o_args = ["--quiet", "--backend", "onnx", "--vocab", "/models/all-MiniLM-L6-v2.vocab.txt", "--repeat", str(repeat), *SENTENCES]
    runner.run("embed", o_args, ["embedding-onnx"], dirs)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(models_dir / "all-MiniLM-L6-v2.onnx"), so, providers=["CPUExecutionProvider"])
    from tokenizers import Tokenizer

    from wasmflow.wasi_nn.models import minilm_source

    tok = Tokenizer.from_file(str(minilm_source() / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()

    def direct_onnx() -> None:
        for _ in range(repeat):
            for s in SENTENCES:
                ids = np.array([tok.encode(s).ids], dtype=np.int64)
                sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)})

    direct_onnx()
    g_t, d_t = [], []
    for _ in range(rounds):
        g_t.append(measure(lambda: runner.run("embed", o_args, ["embedding-onnx"], dirs)))
        d_t.append(measure(direct_onnx))
    results.append(summarise("embeddings MiniLM (onnx)", "embeddings/s", n, g_t, d_t))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer tokens and rounds (CI smoke)")
    ap.add_argument("--skip-gemma", action="store_true")
    ap.add_argument("--state-dir", type=Path, default=REPO / ".wasmflow")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="llama.cpp and onnxruntime threads, both paths")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    opts = ap.parse_args()

    from wasmflow.wasi_nn import ModelRegistry, models, parse_preload
    from wasmflow.wasi_nn.ggml_backend import gpu_offload_supported
    from wasmflow.wasi_nn.testmodels import write_tiny_llama

    tmp = Path(tempfile.mkdtemp(prefix="wasmflow-bench-"))
    tiny = write_tiny_llama(tmp / "tiny.gguf", n_embd=256, n_layer=4, n_head=8, n_ff=512, n_ctx=1024)
    models.pull("all-minilm-l6-v2", opts.state_dir)
    mdir = models.models_dir(opts.state_dir).resolve()
    from wasmflow.wasi_nn import Encoding, ModelEntry, Target

    threads = {"threads": opts.threads}
    entries = [parse_preload(f"tiny:GGML:CPU:{tiny}"),
               ModelEntry("embedding", Encoding.GGML, Target.CPU, f"{mdir}/all-MiniLM-L6-v2.f16.gguf", {**threads, "embedding": True}),
               ModelEntry("embedding-onnx", Encoding.ONNX, Target.CPU, f"{mdir}/all-MiniLM-L6-v2.onnx", threads)]
    gemma = None
    if not opts.skip_gemma:
        gemma = models.pull("gemma3-270m", opts.state_dir)[0]
        entries.append(parse_preload(f"gemma:GGML:CPU:{gemma}"))
    registry = ModelRegistry(entries)
    runner = GuestRunner(registry, tmp / "cache")

    rounds = 3 if opts.quick else 7
    results = [bench_generation(runner, "tiny", tiny, 64 if opts.quick else 256, rounds, opts.threads)]
    if gemma is not None:
        results.append(bench_generation(runner, "gemma", gemma, 32 if opts.quick else 128, rounds, opts.threads))
    results += bench_embeddings(runner, mdir, 4 if opts.quick else 16, rounds, opts.threads)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"WASI-NN through a wasm guest vs direct ({os.cpu_count()} CPUs, {opts.threads} threads, "
                        f"GPU offload {'available' if gpu_offload_supported() else 'not built'}; best of {rounds}, median in brackets)")
    for col in ("benchmark", "unit", "guest", "direct", "guest/direct", "guest/direct (CPU time)"):
        table.add_column(col)
    for r in results:
        table.add_row(r["what"], r["unit"], f"{r['guest']:.1f} ({r['guest_median']:.1f})", f"{r['direct']:.1f} ({r['direct_median']:.1f})",
                      f"{r['ratio'] * 100:.1f}% ({r['ratio_median'] * 100:.1f}%)", f"{r['ratio_cpu'] * 100:.1f}%")
    Console().print(table)
    for r in results:
        if "first_run_s" in r:
            print(f"{r['what']}: first guest run (loads the model) {r['first_run_s']:.2f}s, warm run {r['warm_run_s']:.2f}s")
    print("\n| benchmark | unit | guest | direct | guest/direct (wall, best) | median | CPU time |\n|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['what']} | {r['unit']} | {r['guest']:.1f} | {r['direct']:.1f} | {r['ratio'] * 100:.1f}% "
              f"| {r['ratio_median'] * 100:.1f}% | {r['ratio_cpu'] * 100:.1f}% |")
    if opts.json:
        opts.json.write_text(json.dumps(results, indent=2))
    runner.engine.close()
    registry.close()


if __name__ == "__main__":
    main()
