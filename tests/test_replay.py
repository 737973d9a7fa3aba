"""Exact offline replay (docs/replay.md): runs recorded by the real runtime, replayed against their stored
transcript on both engines.

- the WASI clock and random values a guest consumed are served back, so a guest printing them replays
  `identical`;
- a replay writes nothing: the kv counter the run bumped is where the run left it;
- a changed guest (`--module`) or a changed config reports the first divergent call;
- no secret value is ever stored, in the calls or in the result;
- past `limits.transcript` the transcript is marked truncated and a replay refuses to call itself exact;
- `wasmflow run` records, and `wasmflow replay RUN --offline` / `--flow F --since` replay from the CLI.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import sqlalchemy as sa

from guest_support import write_wat
from wasmflow.flows.model import Allow, Flow, FlowsFile, Limits
from wasmflow.host_functions.spec import Event
from wasmflow.platform.replay_offline import replay_offline
from wasmflow.platform.transcripts import list_transcripts, load_transcript, persist
from wasmflow.runtime import Runtime
from wasmflow.storage.schema import transcripts_table

REPO = Path(__file__).resolve().parents[1]
WASMFLOW = str(Path(sys.executable).with_name("wasmflow"))

# clock(monotonic), clock(realtime), 16 random bytes; all 32 bytes become the output.
CLOCK_WAT = """(module
 (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
 (import "wasi_snapshot_preview1" "random_get" (func $rand (param i32 i32) (result i32)))
 (import "wasmflow" "set_output" (func $out (param i32 i32) (result i32)))
 (memory (export "memory") 1)
 (func (export "_start")
   (drop (call $clock (i32.const 1) (i64.const 1) (i32.const 0)))
   (drop (call $clock (i32.const 0) (i64.const 1) (i32.const 8)))
   (drop (call $rand (i32.const 16) (i32.const 16)))
   (drop (call $out (i32.const 0) (i32.const 32)))))"""


def kv_wat(key: str, out: int = 0, data: int = 64) -> str:
    """Reads the event name (its descriptor at OUT), then kv_get(KEY at DATA), then outputs the key."""
    return f"""(module
 (import "wasmflow" "event_name" (func $ev (param i32) (result i32)))
 (import "wasmflow" "kv_get" (func $get (param i32 i32 i32) (result i32)))
 (import "wasmflow" "set_output" (func $out (param i32 i32) (result i32)))
 (memory (export "memory") 1)
 (data (i32.const {data}) "{key}")
 (func (export "_start")
   (drop (call $ev (i32.const {out})))
   (drop (call $get (i32.const {data}) (i32.const {len(key)}) (i32.const 8)))
   (drop (call $out (i32.const {data}) (i32.const {len(key)})))))"""


# secret_get("MY_TOKEN") -> result_read into 256 -> kv_set("t", secret) -> set_output(secret)
SECRET_WAT = """(module
 (import "wasmflow" "secret_get" (func $secret (param i32 i32 i32) (result i32)))
 (import "wasmflow" "result_read" (func $read (param i32 i32 i32) (result i32)))
 (import "wasmflow" "kv_set" (func $set (param i32 i32 i32 i32) (result i32)))
 (import "wasmflow" "set_output" (func $out (param i32 i32) (result i32)))
 (memory (export "memory") 1)
 (data (i32.const 64) "MY_TOKEN")
 (data (i32.const 80) "t")
 (func (export "_start")
   (if (i32.ne (call $secret (i32.const 64) (i32.const 8) (i32.const 0)) (i32.const 0)) (then unreachable))
   (drop (call $read (i32.load (i32.const 0)) (i32.const 256) (i32.load (i32.const 4))))
   (drop (call $set (i32.const 80) (i32.const 1) (i32.const 256) (i32.load (i32.const 4))))
   (drop (call $out (i32.const 256) (i32.load (i32.const 4))))))"""

# 200 kv_get calls of a 40-byte key: far past a 2 KiB transcript
LOOP_WAT = """(module
 (import "wasmflow" "kv_get" (func $get (param i32 i32 i32) (result i32)))
 (memory (export "memory") 1)
 (data (i32.const 64) "a-key-of-forty-bytes-a-key-of-forty-byte")
 (func (export "_start") (local $i i32)
   (loop $again
     (drop (call $get (i32.const 64) (i32.const 40) (i32.const 8)))
     (local.set $i (i32.add (local.get $i) (i32.const 1)))
     (br_if $again (i32.lt_u (local.get $i) (i32.const 200))))))"""


def make(tmp: Path, wasm: Path, engine: str, name: str = "g", **flow: object) -> Runtime:
    flows = FlowsFile(flows=[Flow(name=name, module=str(wasm), **flow)], state_dir=str(tmp / "state"))  # type: ignore[arg-type]
    return Runtime(flows, tmp, engine_override=engine)


def record(rt: Runtime, flow: str, event: Event) -> tuple[object, object]:
    result = rt.run(flow, event)
    assert persist(rt, result), "the run left no transcript"
    transcript = load_transcript(rt.db, result.run_id)
    assert transcript is not None
    return result, transcript


def test_clock_and_random_are_served_back(tmp_path: Path, engine_name: str) -> None:
    wasm = write_wat(tmp_path / "clock.wasm", CLOCK_WAT)
    rt = make(tmp_path, wasm, engine_name)
    try:
        result, transcript = record(rt, "g", Event("manual"))
        assert result.ok, result.error
        kinds = [row["kind"] for row in transcript.activity()]
        assert kinds == ["clock", "random"]  # two consecutive clock reads shown as one row
        assert transcript.activity()[0]["count"] == 2
        report = replay_offline(rt, transcript)
        assert report.verdict == "identical", report
        assert report.calls_replayed == 3
        # a second live run sees other values: the replay's equality is not a coincidence
        again = rt.run("g", Event("manual"))
        assert again.output[16:] != result.output[16:]
        assert struct.unpack("<Q", again.output[:8])[0] > struct.unpack("<Q", result.output[:8])[0]
    finally:
        rt.close()


def test_hello_replays_identical_and_writes_nothing(tmp_path: Path, guest_wasm: dict[str, Path], engine_name: str) -> None:
    rt = make(tmp_path, guest_wasm["hello"], engine_name, name="hello", allow=Allow(kv=True), config={"greeting": "Hi"})
    try:
        body = json.dumps({"action": "opened", "sender": {"login": "octocat"}}).encode()
        result, transcript = record(rt, "hello", Event("issues", body))
        assert json.loads(result.output)["count"] == 1
        for _ in range(2):
            report = replay_offline(rt, transcript)
            assert report.verdict == "identical", report
        # the replays served kv_increment from the transcript: the next live run is the second
        assert json.loads(rt.run("hello", Event("issues", body)).output)["count"] == 2
        rows = transcript.activity()
        assert [r["kind"] for r in rows] == ["event", "event", "kv", "config"]
        assert rows[2]["target"] == "increment count" and rows[2]["ok"]
    finally:
        rt.close()


def test_changed_config_reports_the_divergent_call(tmp_path: Path, guest_wasm: dict[str, Path], engine_name: str) -> None:
    rt = make(tmp_path, guest_wasm["hello"], engine_name, name="hello", allow=Allow(kv=True), config={"greeting": "Hi"})
    try:
        _, transcript = record(rt, "hello", Event("issues", b'{"sender": {"login": "a"}}'))
    finally:
        rt.close()
    changed = make(tmp_path, guest_wasm["hello"], engine_name, name="hello", allow=Allow(kv=True),
                   config={"greeting": "Bonjour"})
    try:
        report = replay_offline(changed, transcript)
    finally:
        changed.close()
    assert report.verdict == "diverged"
    assert report.detail.startswith("call 4: expected wasmflow::config_get")
    assert "the config differs" in report.detail
    assert '-  "greeting": "Hi"' in report.output_diff and '+  "greeting": "Bonjour"' in report.output_diff


def test_new_module_reports_first_divergent_call(tmp_path: Path, engine_name: str) -> None:
    old = write_wat(tmp_path / "old.wasm", kv_wat("alpha"))
    new = write_wat(tmp_path / "new.wasm", kv_wat("omega"))
    same = write_wat(tmp_path / "same.wasm", kv_wat("alpha", out=32, data=128))  # other buffers, same calls
    rt = make(tmp_path, old, engine_name, allow=Allow(kv=True))
    try:
        _, transcript = record(rt, "g", Event("push"))
        assert replay_offline(rt, transcript).verdict == "identical"
        assert replay_offline(rt, transcript, module=str(same)).verdict == "identical"
        report = replay_offline(rt, transcript, module=str(new))
    finally:
        rt.close()
    assert report.verdict == "diverged", report
    assert report.detail == 'call 2: expected wasmflow::kv_get("alpha"), got wasmflow::kv_get("omega")'
    # the call the old run never made had no answer to give: it failed, saying so
    assert report.refused == ['offline replay: the recorded run made no call wasmflow::kv_get("omega") (call 2); '
                              'there is no recorded answer']
    assert report.module == str(new.resolve())


def test_no_secret_value_is_stored(tmp_path: Path, engine_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    value = "s3cr3t-value-" + os.urandom(8).hex()
    monkeypatch.setenv("MY_TOKEN", value)
    wasm = write_wat(tmp_path / "secret.wasm", SECRET_WAT)
    rt = make(tmp_path, wasm, engine_name, allow=Allow(kv=True), secrets=["MY_TOKEN"])
    try:
        result, transcript = record(rt, "g", Event("manual"))
        assert result.ok and result.output == value.encode()  # the guest did get and use the value
        with rt.db.connect() as conn:
            blobs = [zlib.decompress(bytes(row.data)) for row in conn.execute(sa.select(transcripts_table))]
        assert blobs and all(value.encode() not in blob for blob in blobs)
        assert b"[secret:MY_TOKEN]" in blobs[0]  # the kv_set and the output name the secret instead
        assert replay_offline(rt, transcript).verdict == "identical"
        monkeypatch.delenv("MY_TOKEN")  # not set where the replay runs: a stand-in value keeps it going,
        report = replay_offline(rt, transcript)  # and the call that used it differs (another length)
        assert report.verdict == "diverged" and report.detail.startswith("call 2: expected wasmflow::kv_set")
        assert any("secret MY_TOKEN is not set here" in note for note in report.notes)
    finally:
        rt.close()


def test_truncated_transcript_cannot_replay_exactly(tmp_path: Path, engine_name: str) -> None:
    wasm = write_wat(tmp_path / "loop.wasm", LOOP_WAT)
    rt = make(tmp_path, wasm, engine_name, allow=Allow(kv=True), limits=Limits(transcript=2048))
    try:
        result, transcript = record(rt, "g", Event("manual"))
        assert result.ok
        assert transcript.truncated and 0 < len(transcript.entries()) < 200
        assert transcript.doc["dropped"] == 200 - len(transcript.entries())
        assert transcript.size() < 4096
        assert transcript.activity()[-1]["kind"] == "truncated"
        report = replay_offline(rt, transcript)
        assert report.verdict == "failed" and "truncated" in report.detail and "limits.transcript" in report.detail
    finally:
        rt.close()


def test_transcript_zero_records_nothing(tmp_path: Path, guest_wasm: dict[str, Path]) -> None:
    rt = make(tmp_path, guest_wasm["hello"], "wasmtime", name="hello", allow=Allow(kv=True),
              limits=Limits(transcript=0))
    try:
        result = rt.run("hello", Event("manual"))
        assert result.ok and persist(rt, result) is None and load_transcript(rt.db, result.run_id) is None
    finally:
        rt.close()


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([WASMFLOW, *args], cwd=cwd, capture_output=True, text=True, timeout=120, env=env)


def test_cli_run_is_recorded_and_replays_offline(tmp_path: Path, guest_wasm: dict[str, Path]) -> None:
    (tmp_path / "flows.yaml").write_text(
        f"flows:\n  - name: hello\n    module: {guest_wasm['hello']}\n    allow: {{kv: true}}\n"
        "    config: {greeting: Hi}\n")
    (tmp_path / "ev.json").write_text('{"action": "opened", "sender": {"login": "bob"}}')
    ran = _cli(tmp_path, "run", "hello", "--event", "ev.json", "--event-name", "issues")
    assert ran.returncode == 0, ran.stderr
    run_id = ran.stdout.split(" run ")[1].split()[0]
    replayed = _cli(tmp_path, "replay", run_id[:10], "--offline")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert replayed.stdout.startswith(f"identical  run {run_id}")
    logs = _cli(tmp_path, "logs", run_id)
    assert logs.returncode == 0 and "increment count" in logs.stdout and "greeting" in logs.stdout
    text = (tmp_path / "flows.yaml").read_text().replace("greeting: Hi", "greeting: Yo")
    (tmp_path / "flows.yaml").write_text(text)
    _cli(tmp_path, "run", "hello", "--event", "ev.json", "--event-name", "issues")
    bulk = _cli(tmp_path, "replay", "--offline", "--flow", "hello", "--since", "1h")
    assert bulk.returncode == 1  # the first run's config changed since: not all identical
    assert "same 1" in bulk.stdout and "diverged 1" in bulk.stdout and '+  "greeting": "Yo"' in bulk.stdout
    missing = _cli(tmp_path, "replay", "ffffffffffff", "--offline")
    assert missing.returncode == 1 and "no transcript for run ffffffffffff" in missing.stderr
    no_module = _cli(tmp_path, "replay", run_id, "--offline", "--module", "nope.wasm")
    assert no_module.returncode == 1 and no_module.stdout.startswith("failed") and "does not exist" in no_module.stdout
    bad_since = _cli(tmp_path, "replay", "--offline", "--flow", "hello", "--since", "soon")
    assert bad_since.returncode == 2 and "--since 'soon'" in bad_since.stderr
    lonely = _cli(tmp_path, "replay", run_id, "--module", "x.wasm")
    assert lonely.returncode == 2 and "go with --offline" in lonely.stderr
    for done in (missing, bulk, no_module, bad_since, lonely):
        assert "Traceback" not in done.stdout + done.stderr


def test_list_transcripts_filters_by_flow_and_time(tmp_path: Path, guest_wasm: dict[str, Path]) -> None:
    rt = make(tmp_path, guest_wasm["hello"], "wasmtime", name="hello", allow=Allow(kv=True))
    try:
        ids = [record(rt, "hello", Event("manual"))[0].run_id for _ in range(3)]
        listed = list_transcripts(rt.db, flow="hello")
        assert [t.run_id for t in listed] == ids[::-1]
        assert list_transcripts(rt.db, flow="other") == []
        assert list_transcripts(rt.db, flow="hello", since=listed[0].doc["started_at"] + 1) == []
    finally:
        rt.close()


def test_the_transcript_names_the_build_the_run_loaded(tmp_path: Path, engine_name: str) -> None:
    # A rebuild while the process still runs the module it loaded (`wasmflow dev`, a deploy): the
    # transcript must record the digest of what ran, not of the file as it is when stored.
    import hashlib

    wasm = write_wat(tmp_path / "g.wasm", kv_wat("alpha"))
    loaded = hashlib.sha256(wasm.read_bytes()).hexdigest()
    rt = make(tmp_path, wasm, engine_name, allow=Allow(kv=True))
    try:
        record(rt, "g", Event("push"))  # loads the module
        write_wat(wasm, kv_wat("omega"))  # the file changes; the runtime keeps the module it loaded
        _, transcript = record(rt, "g", Event("push"))
    finally:
        rt.close()
    assert hashlib.sha256(wasm.read_bytes()).hexdigest() != loaded
    assert transcript.doc["module_sha256"] == loaded


def test_transcripts_stored_in_the_background_are_kept_and_close_ends_the_writer(tmp_path: Path) -> None:
    """The workers hand transcripts to a writer thread; closing the runtime stores what is pending and
    ends that thread before it returns (nothing of a closed runtime keeps running)."""
    import threading

    wasm = write_wat(tmp_path / "clock.wasm", CLOCK_WAT)
    rt = make(tmp_path, wasm, "wasmtime")
    results = [rt.run("g", Event("manual")) for _ in range(5)]
    assert all(r.ok for r in results) and all(persist(rt, r, wait=False) == 0 for r in results)
    writers = [t for t in threading.enumerate() if t.name == "wasmflow-transcripts"]
    assert writers
    db = rt.db
    rt.close()
    assert not any(t.is_alive() for t in writers)
    assert all(load_transcript(db, r.run_id) is not None for r in results)
