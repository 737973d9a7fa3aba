"""Soak the WasmEdge engine: many invocations in one process, printing RSS, open fds and threads.

What it proves: every WasmEdge object a run creates (store, executor, WASI module, guest instance,
async handle) and every pipe and thread of its output capture is released, on every path. So the mix
is not only good runs: every 50th run traps, every 100th calls the host with bad pointers, and every
500th loops into its deadline. After a warm-up, RSS must stay flat (within allocator noise) and the
fd and thread counts must not move.

    WASMFLOW_WASMEDGE_LIB=/opt/wasmedge/lib .venv/bin/python bench/wasmedge_soak.py [--runs 10000]
    (--engine wasmtime soaks the default engine the same way, for comparison)
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wasmflow.build import artifact_path, build  # noqa: E402
from wasmflow.engine import RunRequest, Status, make_engine  # noqa: E402
from wasmflow.flows.model import Flow  # noqa: E402
from wasmflow.host_functions import Host  # noqa: E402
from wasmflow.host_functions.spec import Event  # noqa: E402


def rss_mib() -> float:
    """Resident set size from /proc (Linux), in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024**2


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=1000, help="print a line every N runs")
    parser.add_argument("--engine", default="wasmedge", choices=["wasmedge", "wasmtime"])
    args = parser.parse_args()

    workspace = ROOT / "guest-examples"
    packages = ["hello", "hostile-bad-pointers", "hostile-read-passwd", "hostile-loop"]
    build(packages, workspace, ROOT / ".wasmflow", progress=False)
    with tempfile.TemporaryDirectory(prefix="wasmflow-soak-") as tmp:
        host = Host.default(state_dir=Path(tmp) / "state")
        engine = make_engine(args.engine, host, Path(tmp) / "cache")
        flows = {
            "hello": Flow(name="soak", module="hello", allow={"kv": True}),
            "hostile-bad-pointers": Flow(name="soak", module="bad", allow={"kv": True}),
            "hostile-read-passwd": Flow(name="soak", module="trap"),
            "hostile-loop": Flow(name="soak", module="loop", limits={"timeout": "20ms"}),
        }
        modules = {name: engine.load(artifact_path(workspace, name), "soak") for name in packages}
        expected = {"hello": Status.OK, "hostile-bad-pointers": Status.DENIED,
                    "hostile-read-passwd": Status.TRAP, "hostile-loop": Status.TIMEOUT}
        event = Event("manual", b'{"name": "soak"}')
        print(f"engine {engine.name} mode {getattr(engine, 'mode', '')}; {args.runs} runs")
        print(f"{'runs':>7} {'rss MiB':>8} {'fds':>4} {'threads':>7} {'runs/s':>7}")
        start = last = time.perf_counter()
        baseline = None
        for i in range(1, args.runs + 1):
            package = ("hostile-loop" if i % 500 == 0 else "hostile-bad-pointers" if i % 100 == 0
                       else "hostile-read-passwd" if i % 50 == 0 else "hello")
            result = engine.run(modules[package], RunRequest(flow=flows[package], event=event))
            if result.status is not expected[package]:
                raise SystemExit(f"run {i} ({package}): {result.status} {result.error}")
            if i % args.every == 0 or i == 200:
                gc.collect()
                now = time.perf_counter()
                rate = (args.every if i % args.every == 0 else 200) / (now - last)
                last = now
                print(f"{i:>7} {rss_mib():>8.1f} {open_fds():>4} {threading.active_count():>7} {rate:>7.0f}", flush=True)
                if i == 200:
                    baseline = rss_mib()
        engine.close()
        elapsed = time.perf_counter() - start
        print(f"done in {elapsed:.1f}s; RSS after warm-up (200 runs) {baseline:.1f} MiB, at the end {rss_mib():.1f} MiB")


if __name__ == "__main__":
    main()
