"""wasmtime against WasmEdge, in the same process and run: per-run cost of a light and a CPU-heavy guest.

- `hello`: reads the event, bumps a key-value counter (SQLite), logs, sets JSON output. Its time is
  mostly per-run overhead: a fresh instance, WASI set-up, output capture, host calls.
- `cpu-heavy`: SHA-256 over 1 MiB and 200 serde_json round trips, all inside the guest: its time is
  the engine's code quality (wasmtime compiles with Cranelift; WasmEdge without LLVM interprets).

Each guest is loaded once per engine, warmed up, then timed as whole `engine.run` calls (wall clock).
The mode column says how each engine executed the code. WasmEdge's rows are left out, with the reason,
where libwasmedge is not available.

    WASMFLOW_WASMEDGE_LIB=/opt/wasmedge/lib .venv/bin/python bench/engines.py [--runs 500] [--heavy-runs 10] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wasmflow.build import artifact_path, build  # noqa: E402
from wasmflow.engine import ENGINES, RunRequest, Status, make_engine  # noqa: E402
from wasmflow.engine.wasmedge_capi import WasmEdgeUnavailable  # noqa: E402
from wasmflow.flows.model import Flow  # noqa: E402
from wasmflow.host_functions import Host  # noqa: E402
from wasmflow.host_functions.spec import Event  # noqa: E402

GUESTS = {
    "hello": Flow(name="bench-hello", module="guest-examples/hello", allow={"kv": True}),
    "cpu-heavy": Flow(name="bench-cpu", module="guest-examples/cpu-heavy", limits={"timeout": "120s"}),
}


def measure(engine, wasm: Path, flow: Flow, runs: int, warmup: int) -> dict:  # type: ignore[no-untyped-def]
    module = engine.load(wasm, flow.name)
    event = Event("pull_request", json.dumps({"action": "opened", "sender": {"login": "octocat"}}).encode())
    walls, instantiate, outputs = [], [], set()
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        result = engine.run(module, RunRequest(flow=flow, event=event))
        wall = (time.perf_counter() - t0) * 1000
        if result.status is not Status.OK:
            raise SystemExit(f"{engine.name} {flow.name}: {result.status} {result.error}")
        if i >= warmup:
            walls.append(wall)
            instantiate.append(result.instantiate_ms)
        if flow.name == "bench-cpu":
            outputs.add(result.output)
        mode = result.mode
    ordered = sorted(walls)
    return {
        "mode": mode,
        "runs": runs,
        "median": statistics.median(ordered),
        "p99": ordered[max(0, int(len(ordered) * 0.99) - 1)],
        "mean": statistics.mean(ordered),
        "instantiate": statistics.median(instantiate),
        "outputs": outputs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=500, help="timed runs of hello per engine")
    parser.add_argument("--heavy-runs", type=int, default=10, help="timed runs of cpu-heavy per engine")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown (for the README)")
    args = parser.parse_args()
    console = Console()
    workspace = ROOT / "guest-examples"
    build(list(GUESTS), workspace, ROOT / ".wasmflow", progress=False)

    rows = []
    skipped = []
    with tempfile.TemporaryDirectory(prefix="wasmflow-bench-") as tmp:
        for name in ENGINES:
            host = Host.default(state_dir=Path(tmp) / name / "state")
            try:
                engine = make_engine(name, host, Path(tmp) / name / "cache")
            except WasmEdgeUnavailable as exc:
                skipped.append(f"{name}: {exc}")
                continue
            try:
                for guest, flow in GUESTS.items():
                    runs, warmup = (args.runs, 20) if guest == "hello" else (args.heavy_runs, 1)
                    stats = measure(engine, artifact_path(workspace, guest), flow, runs, warmup)
                    rows.append((name, guest, stats))
            finally:
                engine.close()
            host.close()

    heavy = {stats["outputs"].pop() for name, guest, stats in rows if guest == "cpu-heavy" and stats["outputs"]}
    table = Table(title="per-run wall time of engine.run, ms (same process, same machine)")
    for col in ("engine", "mode", "guest", "runs", "median", "p99", "mean", "instantiate (median)"):
        table.add_column(col, justify="right" if col not in ("engine", "mode", "guest") else "left")
    for name, guest, s in rows:
        table.add_row(name, s["mode"], guest, str(s["runs"]), f"{s['median']:.2f}", f"{s['p99']:.2f}",
                      f"{s['mean']:.2f}", f"{s['instantiate']:.2f}")
    console.print(table)
    by = {(n, g): s for n, g, s in rows}
    for guest in GUESTS:
        if ("wasmtime", guest) in by and ("wasmedge", guest) in by:
            ratio = by[("wasmedge", guest)]["median"] / by[("wasmtime", guest)]["median"]
            console.print(f"{guest}: WasmEdge ({by[('wasmedge', guest)]['mode']}) / wasmtime median = {ratio:.1f}x")
    if len(heavy) > 1:
        console.print("[red]cpu-heavy gave different outputs on the two engines[/red]")
    for line in skipped:
        console.print(f"[yellow]skipped {line}[/yellow]")
    if args.markdown:
        print("\n| engine | mode | guest | runs | median ms | p99 ms | mean ms | instantiate ms |")
        print("|---|---|---|---:|---:|---:|---:|---:|")
        for name, guest, s in rows:
            print(f"| {name} | {s['mode']} | {guest} | {s['runs']} | {s['median']:.2f} | {s['p99']:.2f} | "
                  f"{s['mean']:.2f} | {s['instantiate']:.2f} |")


if __name__ == "__main__":
    main()
