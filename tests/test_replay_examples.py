"""Every example guest, recorded by the real runtime and replayed offline: `identical` on both engines.

Each is recorded against what its own tests use (the GitHub and OpenAI stand-ins, MiniLM, the tiny
generated llama and ONNX models) and replayed where those are gone: the stand-ins are shut down and
the models point at files that do not exist, so an identical replay also shows that it used no network
and no model. (hello, and the WAT guests for clock, random and divergence, are in test_replay.py.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from engine_support import skip_without
from optional_support import need_module
from wasmflow.devtools.github_payloads import delivery_headers, encode, issues_event, pull_request_event
from wasmflow.devtools.github_standin import GithubStandin
from wasmflow.devtools.openai_standin import OpenAIStandin
from wasmflow.flows.model import Allow, Flow, FlowsFile, GithubApp, Limits, ModelSpec
from wasmflow.host_functions.spec import Event
from wasmflow.platform.replay_offline import replay_offline
from wasmflow.platform.transcripts import load_transcript, persist
from wasmflow.runtime import Runtime
from optional_support import need_llama_cpp

REPO = "octo-org/hello-world"
STATE = Path(os.environ.get("WASMFLOW_TEST_STATE_DIR", Path(__file__).resolve().parents[1] / ".wasmflow"))


@pytest.fixture(params=["wasmtime", "wasmedge"])
def engine(request: pytest.FixtureRequest) -> str:
    skip_without(request.param)
    return str(request.param)


def record_and_replay(rt: Runtime, flow: str, event: Event, offline: Runtime | None = None) -> tuple[Any, Any]:
    """Run, store the transcript, and replay it (on `offline`, a runtime without the services, if given)."""
    result = rt.run(flow, event)
    assert result.ok, (result.status, result.error, result.stderr, result.logs)
    persist(rt, result)
    transcript = load_transcript(rt.db, result.run_id)
    assert transcript is not None and not transcript.truncated
    report = replay_offline(offline or rt, transcript)
    assert report.verdict == "identical", report
    assert report.calls_replayed == len(transcript.entries()) > 0
    return result, transcript


def test_code_review(tmp_path: Path, guest_wasm: dict[str, Path], engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_code_review import KEY_ENV, Env, finding_responder, rust_files

    monkeypatch.setenv(KEY_ENV, "sk-test")  # what the OpenAI stand-in accepts
    with GithubStandin() as github, OpenAIStandin(finding_responder) as llm:
        github.add_repo(REPO)
        env = Env(tmp_path, guest_wasm["code-review"], github, llm, engine=engine)
        github.add_pull(REPO, "Add modules", rust_files(3), body="Adds modules.")
        body = encode(pull_request_event(github, REPO, 1))
        headers = delivery_headers("pull_request", body, "s3cret", None)
        event = Event("pull_request", body, headers, headers["x-github-delivery"], "github")
        result = env.runtime.run("code-review", event)
        assert result.ok and json.loads(result.output)["action"] == "reviewed", (result.error, result.logs)
        persist(env.runtime, result)
        writes = len(github.writes())
    try:  # the stand-ins are down now: a replay that reached for them would fail
        transcript = load_transcript(env.runtime.db, result.run_id)
        assert transcript is not None
        kinds = {row["kind"] for row in transcript.activity()}
        assert {"event", "github", "llm", "kv"} <= kinds
        llm_rows = [row for row in transcript.activity() if row["fn"] == "wasmflow::llm_chat"]
        assert llm_rows and all(row["tokens"] > 0 for row in llm_rows)
        assert b"sk-test" not in json.dumps(transcript.doc).encode()
        report = replay_offline(env.runtime, transcript)
        assert report.verdict == "identical", report
        assert writes == 3  # placeholder comment, review, final edit: made once, by the recorded run
    finally:
        env.runtime.close()


def test_issue_triage(tmp_path: Path, guest_wasm: dict[str, Path], engine: str) -> None:
    from wasmflow.wasi_nn import models

    minilm = models.pull("all-minilm-l6-v2", STATE)[0]

    def runtime(github: GithubStandin, model: Path) -> Runtime:
        flow = Flow(name="issue-triage", module=str(guest_wasm["issue-triage"]),
                    allow=Allow(kv=True, models=["minilm"], github={"issues": "write"}),
                    config={"duplicate_threshold": 0.7, "labels": {"bug": ["crash", "panic"]}},
                    limits=Limits(timeout=120))
        flows = FlowsFile(models={"minilm": ModelSpec(backend="ggml", path=str(model))},
                          github=GithubApp(app_id=github.app_id, private_key=github.private_key_pem, webhook_secret="s",
                                           api_url=github.url, min_write_interval=0),
                          flows=[flow], state_dir=str(tmp_path / "state"))
        return Runtime(flows, tmp_path, engine_override=engine)

    with GithubStandin() as github:
        github.add_issue(REPO, "App crashes when saving a file", "Clicking save throws a panic in the file writer.")
        github.add_issue(REPO, "Add a dark mode", "The interface should offer a dark colour scheme.")
        new = github.add_issue(REPO, "Crash on save", "The application panics every time I save a document.")
        rt = runtime(github, minilm)
        body = encode(issues_event(github, REPO, new.number))
        headers = delivery_headers("issues", body, None, None)
        event = Event("issues", body, headers, headers["x-github-delivery"], "github")
        result = rt.run("issue-triage", event)
        assert result.ok, (result.error, result.logs)
        persist(rt, result)
        offline = runtime(github, tmp_path / "no-such-model.gguf")
    try:
        transcript = load_transcript(rt.db, result.run_id)
        assert transcript is not None and "nn" in {row["kind"] for row in transcript.activity()}
        report = replay_offline(offline, transcript)
        assert report.verdict == "identical", report
    finally:
        rt.close()
        offline.close()


def nn_runtime(tmp: Path, wasm: Path, engine: str, models: dict[str, ModelSpec], args: list[str],
               dirs: list[str] | None = None, load_bytes: bool = False) -> Runtime:
    flow = Flow(name="nn", module=str(wasm), args=args,
                allow=Allow(models=list(models), dirs=dirs or [], nn={"load_bytes": load_bytes}),
                limits=Limits(timeout=300, memory="1GiB", output="16MiB"))
    return Runtime(FlowsFile(models=models, flows=[flow], state_dir=str(tmp / "state")), tmp, engine_override=engine)


def test_llama_chat_streaming(tmp_path: Path, guest_wasm: dict[str, Path], engine: str) -> None:
    need_llama_cpp()
    from wasmflow.wasi_nn.testmodels import write_tiny_llama

    gguf = write_tiny_llama(tmp_path / "tiny.gguf")
    args = ["--json", "--model", "default", "--temp", "0", "--n-predict", "12", "--ctx-size", "256", "--stream",
            "Hello there"]
    rt = nn_runtime(tmp_path, guest_wasm["llama-chat"], engine, {"default": ModelSpec(backend="ggml", path=str(gguf))}, args)
    offline = nn_runtime(tmp_path, guest_wasm["llama-chat"], engine,
                         {"default": ModelSpec(backend="ggml", path=str(tmp_path / "gone.gguf"))}, args)
    try:
        result, transcript = record_and_replay(rt, "nn", Event("manual"), offline)
        assert json.loads(result.stdout)["text"]
        names = {e.fn.split("::")[1] for e in transcript.entries() if e.fn.startswith("wasi_ephemeral_nn::")}
        assert {"load_by_name", "init_execution_context", "set_input", "compute_single"} <= names, names
    finally:
        rt.close()
        offline.close()


def test_embed(tmp_path: Path, guest_wasm: dict[str, Path], engine: str) -> None:
    from wasmflow.wasi_nn import models

    gguf = models.pull("all-minilm-l6-v2", STATE)[0]
    args = ["--backend", "ggml", "A man is playing a guitar.", "The bank raised rates."]
    rt = nn_runtime(tmp_path, guest_wasm["embed"], engine, {"embedding": ModelSpec(backend="ggml", path=str(gguf))}, args)
    offline = nn_runtime(tmp_path, guest_wasm["embed"], engine,
                         {"embedding": ModelSpec(backend="ggml", path=str(tmp_path / "gone.gguf"))}, args)
    try:
        result, _ = record_and_replay(rt, "nn", Event("manual"), offline)
        assert len(result.stdout.decode().splitlines()) == 3
    finally:
        rt.close()
        offline.close()


def test_classify_onnx(tmp_path: Path, guest_wasm: dict[str, Path], engine: str) -> None:
    need_module("onnxruntime", "ONNX Runtime (pip install -e '.[nn]')")
    from wasmflow.wasi_nn.testmodels import write_tiny_onnx

    onnx = write_tiny_onnx(tmp_path / "tiny.onnx")
    args = ["--model", "tiny-onnx", "--input", "F32:1x4:0.5,-1,2,0.25", "--input", "I64:1x5:1,2,3,4,5",
            "--output", "F32:3", "--output", "I64:1"]
    rt = nn_runtime(tmp_path, guest_wasm["classify-onnx"], engine, {"tiny-onnx": ModelSpec(backend="onnx", path=str(onnx))}, args)
    offline = nn_runtime(tmp_path, guest_wasm["classify-onnx"], engine,
                         {"tiny-onnx": ModelSpec(backend="onnx", path=str(tmp_path / "gone.onnx"))}, args)
    try:
        result, _ = record_and_replay(rt, "nn", Event("manual"), offline)
        assert json.loads(result.stdout)["outputs"][1] == [15]
    finally:
        rt.close()
        offline.close()
