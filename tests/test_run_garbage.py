"""A finished run leaves no reference cycle behind, on either engine.

Why it matters: what a run allocates (its context, transcript, buffers, store handles) is then freed by
reference counting the moment the run is done. When a cycle tied it together, only Python's cyclic
collector freed it: hundreds of objects per run, full collections of 70-100 ms about once a second
under a burst of webhooks, and every acknowledgement in flight waited for them (bench/ingress.py's
p99). The run here takes the worker's path: a cancel signal (the epoch callback on wasmtime), its
transcript recorded and stored.

What is checked is garbage of the types a run makes (wasmflow's own, wasmtime's handles): in the full
suite other threads (a previous test's platform winding down) may leave SQLAlchemy garbage meanwhile.
"""

from __future__ import annotations

import gc
import json
from collections import Counter
from pathlib import Path

from wasmflow.host_functions.spec import CancelSignal, Event
from wasmflow.platform.transcripts import persist


def test_a_worker_run_with_its_transcript_leaves_no_cyclic_garbage(tmp_path: Path, make_runtime, guest_wasm,
                                                                    engine_name) -> None:
    runtime = make_runtime(tmp_path, f"""
flows:
  - name: hello
    module: {guest_wasm["hello"]}
    allow: {{kv: true}}
    config: {{greeting: Hello}}
""", engine=engine_name)
    event = Event("pull_request", json.dumps({"action": "opened", "sender": {"login": "octocat"}}).encode())

    def one_run() -> None:
        result = runtime.run("hello", event, cancel=CancelSignal())
        assert result.ok, result.error
        assert persist(runtime, result, wait=True)  # its transcript was recorded and stored

    one_run()  # first run: module load, caches, pool slots; those live on by design
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds is kept in gc.garbage instead of freed
    try:
        for _ in range(3):
            one_run()
        gc.collect()
        garbage = Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage
                          if (type(o).__module__ or "").startswith(("wasmflow.", "wasmtime")))
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert not garbage, f"objects of a run only the cyclic collector could free: {garbage.most_common(12)}"
