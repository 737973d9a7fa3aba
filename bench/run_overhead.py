"""Per-run overhead of the hello guest, in-process, against spawning a native process per event.

The baseline is what a process-per-event platform pays: fork+exec of a small native program (C, built
here with cc) that does the same work as the guest (read the event, bump a counter kept on disk, write
JSON). Both are measured in the same run on the same machine.

    .venv/bin/python bench/run_overhead.py [--runs 2000] [--profile FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wasmflow.build import artifact_path, build  # noqa: E402
from wasmflow.flows.model import Flow, FlowsFile  # noqa: E402
from wasmflow.host_functions.spec import Event  # noqa: E402
from wasmflow.runtime import Runtime  # noqa: E402

NATIVE_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int main(int argc, char **argv) {
  char buf[65536]; FILE *f = fopen(argv[1], "rb"); size_t n = fread(buf, 1, sizeof buf - 1, f); fclose(f); buf[n] = 0;
  const char *who = strstr(buf, "\"login\""); long count = 0;
  FILE *c = fopen(argv[2], "r"); if (c) { if (fscanf(c, "%ld", &count) != 1) count = 0; fclose(c); }
  c = fopen(argv[2], "w"); fprintf(c, "%ld", ++count); fclose(c);
  printf("{\"greeting\":\"Hello\",\"event\":\"pull_request\",\"count\":%ld,\"who\":%s}\n", count, who ? "\"octocat\"" : "\"world\"");
  return 0;
}
"""


# The first run of a new process with the on-disk module cache warm: engine, module load and the run
# (the imports are start-up, done before the clock starts).
FIRST_RUN = r"""
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from wasmflow.flows.model import Flow, FlowsFile
from wasmflow.host_functions.spec import Event
from wasmflow.runtime import Runtime
import wasmflow.engine.wasmtime_engine  # noqa: F401  (importing wasmtime, ~20 ms, is process start-up)
tmpdir = Path(sys.argv[3])
flow = Flow(name="hello", module=sys.argv[2], allow={"kv": True}, config={"greeting": "Hello"})
runtime = Runtime(FlowsFile(flows=[flow], state_dir=str(tmpdir / "state")), tmpdir)
event = Event("pull_request", b'{"action": "opened", "sender": {"login": "octocat"}}')
if sys.argv[4] == "prepared":  # as `wasmflow up` and `worker` do at start-up, before the first event
    runtime.prepare()
t = time.perf_counter()
result = runtime.run("hello", event)
elapsed = (time.perf_counter() - t) * 1000
assert result.ok, result.error
runtime.close()
print(elapsed)
"""


def transcript_cost(wasm: Path, event: Event, runs: int, tmpdir: Path) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Per-run latency with the transcript off (limits.transcript: 0), recorded (the default), recorded and
    stored at once (`wasmflow run`), and stored by the background writer (the workers; docs/replay.md).

    In blocks of runs, the modes taking turns over ten rounds (so drift hits all); the background writer's
    commits land in the block that caused them, and each block ends by waiting for the writer, so the
    second result, milliseconds per run all included, is what a worker really pays per run."""
    from wasmflow.platform.transcripts import _writer_for, persist

    runtimes = {}
    for how, limit in (("off", 0), ("recorded", 4 * 1024**2), ("recorded + stored", 4 * 1024**2),
                       ("recorded + stored in the background", 4 * 1024**2)):
        flow = Flow(name="hello", module=str(wasm), allow={"kv": True}, config={"greeting": "Hello"},
                    limits={"transcript": limit})
        runtimes[how] = Runtime(FlowsFile(flows=[flow], state_dir=str(tmpdir / how.replace(" ", ""))), tmpdir)
        runtimes[how].run("hello", event)
    samples: dict[str, list[float]] = {how: [] for how in runtimes}
    total: dict[str, float] = {how: 0.0 for how in runtimes}
    rounds = 10
    for _ in range(rounds):
        for how, runtime in runtimes.items():
            block = time.perf_counter()
            for _ in range(max(1, runs // rounds)):
                t = time.perf_counter()
                result = runtime.run("hello", event)
                if how == "recorded + stored":  # as `wasmflow run` does
                    persist(runtime, result)
                elif how.endswith("background"):  # as the workers do
                    persist(runtime, result, wait=False)
                else:
                    runtime.host.capability("transcript").take(result.run_id)  # what persist would take
                samples[how].append((time.perf_counter() - t) * 1000)
                assert result.ok, result.error
            if how.endswith("background"):
                _writer_for(runtime, runtime.host.capability("transcript")).flush()
            total[how] += (time.perf_counter() - block) * 1000
    for runtime in runtimes.values():
        runtime.close()  # waits for the background writer
    return samples, {how: ms / len(samples[how]) for how, ms in total.items()}


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    ordered = sorted(samples)
    return (statistics.median(ordered), ordered[int(len(ordered) * 0.99) - 1], statistics.mean(ordered))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--profile", metavar="FILE", help="profile the measured runs with cProfile, write the stats "
                        "to FILE and print the top costs (timings then include the profiler's overhead)")
    args = parser.parse_args()
    console = Console()
    workspace = ROOT / "guest-examples"
    build(["hello"], workspace, ROOT / ".wasmflow", progress=False)
    wasm = artifact_path(workspace, "hello")
    event = Event("pull_request", json.dumps({"action": "opened", "sender": {"login": "octocat"}}).encode())

    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        flow = Flow(name="hello", module=str(wasm), allow={"kv": True}, config={"greeting": "Hello"})
        runtime = Runtime(FlowsFile(flows=[flow], state_dir=str(tmpdir / "state")), tmpdir)
        result = runtime.run("hello", event)  # compile + cache
        assert result.ok, result.error
        wasm_ms = []
        profiler = cProfile.Profile() if args.profile else None
        if profiler is not None:
            profiler.enable()
        for _ in range(args.runs):
            t = time.perf_counter()
            result = runtime.run("hello", event)
            wasm_ms.append((time.perf_counter() - t) * 1000)
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
            pstats.Stats(args.profile).sort_stats("tottime").print_stats(25)
        assert result.ok, result.error
        # In a new process, as a restarted worker sees it: in this one, the garbage of the runs above
        # makes a collection land in the measured run and adds milliseconds a new process never pays.
        first_ms = {
            how: statistics.median(
                float(subprocess.run([sys.executable, "-c", FIRST_RUN, str(ROOT), str(wasm), str(tmpdir), how],
                                     check=True, capture_output=True, text=True).stdout)
                for _ in range(5))
            for how in ("cold", "prepared")
        }
        runtime.close()
        transcript_ms, transcript_per_run = transcript_cost(wasm, event, min(args.runs, 1000), tmpdir)

        src = tmpdir / "native.c"
        src.write_text(NATIVE_C)
        exe = tmpdir / "native"
        subprocess.run(["cc", "-O2", "-o", str(exe), str(src)], check=True)
        event_file = tmpdir / "event.json"
        event_file.write_bytes(event.body)
        counter = tmpdir / "count"
        native_ms = []
        for _ in range(min(args.runs, 1000)):
            t = time.perf_counter()
            subprocess.run([str(exe), str(event_file), str(counter)], check=True, stdout=subprocess.DEVNULL)
            native_ms.append((time.perf_counter() - t) * 1000)

    table = Table(title=f"hello: per-run latency ({args.runs} runs, in-process, cached module)")
    for col in ("path", "p50 ms", "p99 ms", "mean ms"):
        table.add_column(col, justify="right" if col != "path" else "left")
    w, n = percentiles(wasm_ms), percentiles(native_ms)
    table.add_row("wasmflow run (wasmtime, fresh instance, kv in SQLite)", *(f"{x:.3f}" for x in w))
    table.add_row("baseline: spawn native process (same work)", *(f"{x:.3f}" for x in n))
    for how, samples in transcript_ms.items():
        table.add_row(f"wasmflow run, transcript {how}", *(f"{x:.3f}" for x in percentiles(samples)))
    console.print(table)
    off, kept, stored, behind = transcript_per_run.values()
    console.print(f"transcript cost per run, all included (blocks of runs, background writer waited for): off "
                  f"{off:.3f} ms; recorded {kept - off:+.3f} ms ({kept / off:.2f}x); stored at once {stored - off:+.3f} "
                  f"ms ({stored / off:.2f}x); stored in the background {behind - off:+.3f} ms ({behind / off:.2f}x)")
    console.print(f"ratio native/wasmflow at p50: [bold]{n[0] / w[0]:.1f}x[/bold]; wasmflow/native "
                  f"[bold]{w[0] / n[0]:.2f}[/bold] (goal: <= 0.25)")
    console.print(f"first run in a new process with the on-disk module cache warm (median of 5): "
                  f"{first_ms['cold']:.2f} ms including engine creation and module load (goal: <= 3 ms); "
                  f"{first_ms['prepared']:.2f} ms after start-up preparation, as `up` and `worker` serve it")
    console.print(f"module size: {wasm.stat().st_size:,} bytes ({wasm.name})")


if __name__ == "__main__":
    main()
