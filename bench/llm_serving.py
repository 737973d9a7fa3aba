"""LLM serving: concurrent wasm guests on one model, continuous batching against a context per request
and against llama.cpp's own server.

    .venv/bin/python bench/llm_serving.py [--quick] [--with-llama-server | --llama-server PATH] [--json out.json]

Each request is the `llama-chat` guest on the wasmtime engine (one-shot `compute`), greedy, exactly
`--n-predict` new tokens (ignore-eos), `--threads` llama.cpp threads, a different prompt per guest.
Measured in one run, side by side:

- sequential (old path): the requests one after another, each on a pooled llama context of its own
  (the model with `batching: false`), which is how wasmflow served a model before the batch
  scheduler. This is "one stream": its tokens/s is the baseline of `aggregate_ratio`.
- batched: 1 / 2 / 4 / 8 guests at once on the batch scheduler (one context, a sequence each).
- llama-server -np 8: the same prompts over HTTP (/completion), built from the llama.cpp source in
  llama-cpp-python's sdist (`--with-llama-server` builds it in a temporary directory; `--llama-server`
  reuses a built binary), with the same threads, greedy, ignore-eos and total context.

Aggregate tokens/s is all new tokens over the wall time of the whole round; latency is per request
(instantiate, prompt, generation). Greedy answers of the batched rounds are compared with the
sequential ones byte for byte and any difference is reported where it starts (batched arithmetic can
round differently in llama.cpp; see docs/wasi-nn.md). The prefix-cache figure is a code review asked
twice with the same instructions and a changed diff: time to the first token of the second review on a
model that kept the first one's KV, against the same prompt on a model with the cache off.

On a shared machine the figures are noisy: each round is short and other processes take cores; the
ratios are measured in the same run so that load affects both sides alike, not equally.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = REPO / ".wasmflow" / "models" / "gemma-3-270m-q4_k_m.gguf"
TOPICS = ["a lighthouse keeper", "a robot learning to paint", "the first snow of winter", "a lost cat in Paris",
          "a ship made of glass", "an old clock that runs backwards", "a garden on the moon", "a very polite dragon"]


def prompt_for(i: int) -> str:
    return f"<start_of_turn>user\nWrite a short story about {TOPICS[i % len(TOPICS)]}.<end_of_turn>\n<start_of_turn>model\n"


SEQUENTIAL, BATCHED, SERVER = "sequential (context per request)", "batched (one context)", "llama-server -np 8"


# -- wasm guests ------------------------------------------------------------------------------------


class Guests:
    """`llama-chat` on the wasmtime engine over a registry with two names for the same file: `batched`
    (the batch scheduler) and `pooled` (a context per request, batching off)."""

    def __init__(self, model: Path, cache: Path, threads: int, ctx: int, sequences: int) -> None:
        from wasmflow.build import BuildError, artifact_path, build
        from wasmflow.engine.wasmtime_engine import WasmtimeEngine
        from wasmflow.host_functions import Host
        from wasmflow.wasi_nn import ModelRegistry, WasiNNCapability
        from wasmflow.wasi_nn.abi import Encoding, Target
        from wasmflow.wasi_nn.registry import ModelEntry

        try:
            wasm = build(["llama-chat"], REPO / "guest-examples", cache / "build", progress=False)["llama-chat"]
        except BuildError as exc:
            wasm = artifact_path(REPO / "guest-examples", "llama-chat")
            if not wasm.exists():
                raise
            print(f"note: build failed ({exc}); using the built module", file=sys.stderr)
        opts = {"threads": threads, "ctx-size": ctx}
        self.registry = ModelRegistry([
            ModelEntry("batched", Encoding.GGML, Target.CPU, str(model), {**opts, "sequences": sequences}),
            ModelEntry("pooled", Encoding.GGML, Target.CPU, str(model), {**opts, "batching": False}),
        ])
        self.host = Host([WasiNNCapability(self.registry)])
        self.engine = WasmtimeEngine(self.host, cache)
        self.module = self.engine.load(wasm, "bench")

    def run(self, model: str, prompt: str, n_predict: int) -> tuple[bytes, int, float]:
        """(answer bytes, output tokens, seconds) of one guest run."""
        from wasmflow.engine.base import RunRequest, Status
        from wasmflow.flows.model import Allow, Flow, Limits
        from wasmflow.host_functions.spec import Event

        meta = {"temp": 0, "n-predict": n_predict, "ignore-eos": True}
        args = ["--json", "--model", model, "--metadata", json.dumps(meta), prompt]
        flow = Flow(name="bench", module="x.wasm", allow=Allow(models=[model]), limits=Limits(timeout=3600, memory="1GiB", output="64MiB"))
        t0 = time.perf_counter()
        r = self.engine.run(self.module, RunRequest(flow=flow, event=Event(name="bench"), args=args))
        seconds = time.perf_counter() - t0
        if r.status is not Status.OK:
            raise RuntimeError(f"llama-chat failed: {r.status} {r.error} {r.stderr[-500:]!r}")
        out = json.loads(r.stdout)
        return bytes.fromhex(out["text_hex"]), int(out["metadata"]["output_tokens"]), seconds

    def close(self) -> None:
        self.engine.close()
        self.host.close()
        self.registry.close()


def at_once(jobs: list[Callable[[], Any]]) -> tuple[list[Any], float]:
    """Run the jobs in threads started together: their results and the wall time of the round."""
    out: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(jobs) + 1)

    def go(i: int) -> None:
        barrier.wait()
        try:
            out[i] = jobs[i]()
        except BaseException as exc:  # reported after the round
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return out, wall


def figures(name: str, results: list[tuple[bytes, int, float]], wall: float, concurrency: int, cpu: float) -> dict[str, Any]:
    tokens = sum(r[1] for r in results)
    lat = [r[2] for r in results]
    return {"path": name, "concurrency": concurrency, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "aggregate_tps": tokens / wall, "latency_mean_s": statistics.mean(lat), "latency_max_s": max(lat),
            "cpu_s": cpu, "tokens_per_cpu_s": tokens / cpu if cpu > 0 else 0.0}


def own_cpu() -> float:
    """CPU seconds this process has used (every thread: guests, llama.cpp's workers)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int) -> float:
    """CPU seconds another process has used (/proc/PID/stat utime + stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def first_difference(a: bytes, b: bytes) -> Optional[int]:
    if a == b:
        return None
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


# -- llama-server -----------------------------------------------------------------------------------


def build_llama_server(workdir: Path) -> Path:
    """llama-server from the llama.cpp source inside the installed llama-cpp-python's sdist."""
    from importlib.metadata import version

    ver = version("llama-cpp-python")
    print(f"building llama-server from llama-cpp-python {ver}'s sdist in {workdir} (several minutes)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", f"llama-cpp-python=={ver}",
                    "-d", str(workdir)], check=True, stdout=subprocess.DEVNULL)
    sdist = next(workdir.glob("llama_cpp_python-*.tar.gz"))
    subprocess.run(["tar", "xzf", str(sdist), "-C", str(workdir)], check=True)
    src = next(workdir.glob("llama_cpp_python-*/vendor/llama.cpp"))
    subprocess.run(["cmake", "-S", str(src), "-B", str(src / "build"), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF",
                    "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(src / "build"), "--target", "llama-server", "-j", str(os.cpu_count() or 1)],
                   check=True, stdout=subprocess.DEVNULL)
    return src / "build" / "bin" / "llama-server"


class LlamaServer:
    def __init__(self, binary: Path, model: Path, threads: int, ctx: int, slots: int = 8) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [str(binary), "-m", str(model), "-np", str(slots), "-c", str(ctx * slots), "-t", str(threads), "-tb", str(threads),
             "-ngl", "0", "-fa", "off", "--host", "127.0.0.1", "--port", str(self.port), "--no-webui", "--log-disable"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
            if self.proc.poll() is not None:
                break
        self.close()
        raise RuntimeError("llama-server did not become ready")

    def run(self, prompt: str, n_predict: int) -> tuple[bytes, int, float]:
        body = json.dumps({"prompt": prompt, "n_predict": n_predict, "temperature": 0, "ignore_eos": True,
                           "cache_prompt": False}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", body, {"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=3600) as resp:
            out = json.loads(resp.read())
        return out["content"].encode(), int(out.get("tokens_predicted") or out["timings"]["predicted_n"]), time.perf_counter() - t0

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# -- prefix cache -----------------------------------------------------------------------------------


def prefix_bench(model: Path, threads: int, ctx: int) -> dict[str, Any]:
    """A second review of the same PR: the instructions are shared, the diff changed."""
    from wasmflow.wasi_nn.generation import complete
    from wasmflow.wasi_nn.ggml_params import GgmlParams, apply_metadata
    from wasmflow.wasi_nn.ggml_pool import GgmlModel
    from wasmflow.wasi_nn.prefix_cache import common_prefix

    instructions = ("<start_of_turn>user\nYou review pull requests for a Python web service. For each change, point out "
                    "bugs, missing tests, unclear names, security problems and performance traps. Answer as a list of "
                    "findings, each with the file, the line, the severity and a suggested fix. ") * 6
    reviews = [f"{instructions}\nDiff:\n--- a/app.py\n+++ b/app.py\n+    total = sum(x for x in {v})\n<end_of_turn>\n"
               f"<start_of_turn>model\n" for v in ("items", "prices")]
    base = apply_metadata(GgmlParams(), {"threads": threads, "ctx-size": ctx, "temp": 0, "n-predict": 1})
    cached = GgmlModel("cached", str(model), base)
    cold = GgmlModel("cold", str(model), base, cache_bytes=0)
    try:
        cached.load()
        cold.load()
        first, second = (cached.tokenize(r.encode()) for r in reviews)
        complete(cold, base, cold.tokenize(b"warm up"), [], wait=60)
        complete(cached, base, first, [], wait=60)  # the first review: its KV stays
        times = {}
        for name, m in (("cold", cold), ("cached", cached)):
            t0 = time.perf_counter()
            complete(m, base, second, [], wait=60)
            times[name] = time.perf_counter() - t0
        shared = common_prefix(first, second)
        return {"prompt_tokens": len(second), "shared_tokens": shared, "cold_s": times["cold"], "cached_s": times["cached"],
                "saving": 1 - times["cached"] / times["cold"],
                "saved_tokens": cached.stats()["batching"]["cache_saved_tokens"]}
    finally:
        cached.close()
        cold.close()


# -- main -------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="concurrency 4 only (under 3 minutes)")
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-predict", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=1024, help="context per request (llama-server: per slot)")
    ap.add_argument("--with-llama-server", action="store_true", help="build llama-server from the sdist in a temp dir")
    ap.add_argument("--llama-server", type=Path, help="a built llama-server to use")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is shown (--quick: 1)")
    ap.add_argument("--json", type=Path)
    opts = ap.parse_args()
    if not opts.model.exists():
        sys.exit(f"no model at {opts.model}: run `wasmflow models pull gemma3-270m` first")
    levels = [4] if opts.quick else [1, 2, 4, 8]
    rounds = 1 if opts.quick else opts.rounds
    n_seq = max(levels)
    tmp = Path(tempfile.mkdtemp(prefix="wasmflow-bench-llm-"))
    server = None
    guests = None
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    diffs: set[str] = set()
    try:
        binary = opts.llama_server
        if binary is None and opts.with_llama_server:
            binary = build_llama_server(tmp / "llama-server")
        guests = Guests(opts.model, tmp, opts.threads, opts.ctx, n_seq)
        guests.run("pooled", prompt_for(0), 4)  # load both before timing
        guests.run("batched", prompt_for(0), 4)
        if binary is not None:
            server = LlamaServer(binary, opts.model, opts.threads, opts.ctx)
            server.run(prompt_for(0), 4)
        # Rounds interleave the paths, so a burst of load from elsewhere falls on all of them.
        for _ in range(rounds):
            seq_results: list[tuple[bytes, int, float]] = []
            t0, c0 = time.perf_counter(), own_cpu()
            for i in range(n_seq):
                seq_results.append(guests.run("pooled", prompt_for(i), opts.n_predict))
            runs.setdefault((SEQUENTIAL, 1), []).append(
                figures(SEQUENTIAL, seq_results, time.perf_counter() - t0, 1, own_cpu() - c0))
            for c in levels:
                c0 = own_cpu()
                results, wall = at_once([lambda i=i: guests.run("batched", prompt_for(i), opts.n_predict) for i in range(c)])
                runs.setdefault((BATCHED, c), []).append(figures(BATCHED, results, wall, c, own_cpu() - c0))
                for i, r in enumerate(results):
                    at = first_difference(seq_results[i][0], r[0])
                    if at is not None:
                        diffs.add(f"concurrency {c}, request {i}: differs from the sequential answer from byte {at} of {len(r[0])}")
                if server is not None:
                    c0 = process_cpu(server.proc.pid)
                    results, wall = at_once([lambda i=i: server.run(prompt_for(i), opts.n_predict) for i in range(c)])
                    runs.setdefault((SERVER, c), []).append(figures(SERVER, results, wall, c, process_cpu(server.proc.pid) - c0))
        stats = guests.registry.stats()["batched"]["batching"]
        guests.close()
        guests = None
        prefix = prefix_bench(opts.model, opts.threads, opts.ctx)
    finally:
        if guests is not None:
            guests.close()
        if server is not None:
            server.close()
        shutil.rmtree(tmp, ignore_errors=True)
    # the median round of each path and concurrency, by aggregate tokens/s
    rows = [sorted(v, key=lambda r: r["aggregate_tps"])[len(v) // 2] for v in runs.values()]

    from rich.console import Console
    from rich.table import Table

    one = rows[0]["aggregate_tps"]
    table = Table(title=f"{opts.model.name}: {opts.n_predict} new tokens a request, greedy, {opts.threads} threads, "
                        f"{os.cpu_count()} CPUs, median of {rounds} round(s)")
    one_cpu = rows[0]["tokens_per_cpu_s"]
    for col in ("path", "at once", "tokens", "wall s", "aggregate tok/s", "x one stream", "latency mean s", "latency max s",
                "CPU s", "tok/CPU-s", "x one stream (CPU)"):
        table.add_column(col, justify="left" if col == "path" else "right")
    for r in rows:
        table.add_row(r["path"], str(r["concurrency"]), str(r["tokens"]), f"{r['wall_s']:.1f}", f"{r['aggregate_tps']:.1f}",
                      f"{r['aggregate_tps'] / one:.2f}", f"{r['latency_mean_s']:.2f}", f"{r['latency_max_s']:.2f}",
                      f"{r['cpu_s']:.1f}", f"{r['tokens_per_cpu_s']:.1f}",
                      f"{r['tokens_per_cpu_s'] / one_cpu:.2f}" if one_cpu else "-")
    console = Console(width=max(150, Console().width))
    console.print(table)
    console.print(f"batch scheduler: {stats['steps']} steps, mean batch {stats['batch_size_mean']} sequences "
                  f"(max {stats['batch_size_max']}), queue wait {stats['queue_wait_seconds_total']:.2f} s in all")
    console.print("greedy answers: " + ("all equal to the sequential ones" if not diffs else f"{len(diffs)} differ"))
    for d in sorted(diffs):
        console.print(f"  {d}")
    console.print(f"prefix cache, second review of a PR: {prefix['shared_tokens']} of {prefix['prompt_tokens']} prompt tokens "
                  f"shared; first token after {prefix['cached_s'] * 1000:.0f} ms with the cache, {prefix['cold_s'] * 1000:.0f} ms "
                  f"without: {prefix['saving'] * 100:.0f}% less")
    at4 = next(r for r in rows if r["path"].startswith("batched") and r["concurrency"] == 4)
    srv4 = next((r for r in rows if r["path"].startswith("llama-server") and r["concurrency"] == 4), None)
    vs = f"{at4['aggregate_tps'] / srv4['aggregate_tps']:.2f}" if srv4 else "-"
    vs_cpu = f"{at4['tokens_per_cpu_s'] / srv4['tokens_per_cpu_s']:.2f}" if srv4 and srv4["tokens_per_cpu_s"] else "-"
    console.print("tok/CPU-s: new tokens per CPU second of the serving process (wasmflow: the whole bench process, "
                  "guests included; llama-server: its process), which load from other processes does not change much")
    print(f"RESULT concurrency=4 aggregate_ratio={at4['aggregate_tps'] / one:.2f} vs_llama_server={vs} "
          f"cpu_ratio={at4['tokens_per_cpu_s'] / one_cpu:.2f} cpu_vs_llama_server={vs_cpu} prefix_saving={prefix['saving']:.2f}")
    if opts.json:
        opts.json.write_text(json.dumps({"rows": rows, "rounds": rounds, "differences": sorted(diffs), "prefix": prefix, "scheduler": stats}, indent=2))


if __name__ == "__main__":
    main()
