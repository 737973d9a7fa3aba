"""LLM host functions: the remote route through the real `openai` client against the loopback
OpenAI-compatible stand-in, and the local route through the WASI-NN registry with a real GGUF model."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from test_github_host import Memory
from wasmflow.devtools.openai_standin import OpenAIStandin
from wasmflow.flows.model import Allow, Flow, FlowsFile, LlmEndpoint, LlmSettings, ModelSpec
from wasmflow.host_functions.llm import LlmCapability
from wasmflow.host_functions.spec import Call, Code, Event, HostError, RunContext
from optional_support import need_llama_cpp, need_model

REPO_ROOT = Path(__file__).resolve().parents[1]
GEMMA = REPO_ROOT / ".wasmflow" / "models" / "gemma-3-270m-q4_k_m.gguf"


def make_run(llm: LlmSettings | None, models: list[str] = (), timeout: float = 30) -> RunContext:  # type: ignore[assignment]
    flow = Flow(name="bot", module="x.wasm", llm=llm, allow=Allow(models=list(models)))
    return RunContext(flow=flow, event=Event("manual"), run_id="r", deadline=time.monotonic() + timeout)


def call(cap: LlmCapability, fn: str, run: RunContext, mem: Memory, req: Any) -> Any:
    ptr, length = mem.put(json.dumps(req).encode())
    out = mem.top
    mem.top += 8
    assert getattr(cap, fn)(Call(mem, run), ptr, length, out) == Code.OK
    handle, size = struct.unpack("<II", mem.read(out, 8))
    return json.loads(run.take_result(handle, size))


def remote(standin: OpenAIStandin, key_env: str = "LLM_KEY") -> LlmSettings:
    endpoint = LlmEndpoint(model="standin-chat", base_url=standin.base_url, api_key_secret=key_env,
                           options={"temperature": 0.3})
    return LlmSettings(chat=endpoint, embeddings=endpoint)


def test_remote_chat_and_embeddings_through_the_openai_client() -> None:
    with OpenAIStandin(lambda messages, req: f"echo: {messages[-1]['content']}") as standin:
        cap = LlmCapability(environ={"LLM_KEY": "sk-test"})
        run = make_run(remote(standin))
        cap.open_run(run)
        mem = Memory()
        answer = call(cap, "llm_chat", run, mem, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20})
        assert answer["content"] == "echo: hi" and answer["backend"] == "openai" and answer["usage"]["completion_tokens"] >= 1
        sent = standin.chat_requests()[0]
        assert sent["auth"] == "Bearer sk-test" and sent["body"]["temperature"] == 0.3 and sent["body"]["max_tokens"] == 20
        vectors = call(cap, "llm_embed", run, mem, {"input": ["the build is broken", "the build broke", "cats"]})
        a, b, c = vectors["embeddings"]
        dot = lambda x, y: sum(i * j for i, j in zip(x, y))  # noqa: E731
        assert dot(a, b) > dot(a, c) and vectors["dims"] == 64
        cap.close_run(run)
        assert "2 LLM calls" in run.logs[-1][2]


def test_endpoint_down_missing_key_and_undeclared_llm() -> None:
    standin = OpenAIStandin().start()
    settings = remote(standin)
    standin.stop()  # nothing listens there now
    cap = LlmCapability(environ={"LLM_KEY": "sk-test"})
    mem = Memory()
    run = make_run(settings)
    with pytest.raises(HostError) as err:
        call(cap, "llm_chat", run, mem, {"messages": [{"role": "user", "content": "hi"}]})
    assert err.value.code == Code.UPSTREAM and "cannot reach" in run.logs[-1][2]
    with pytest.raises(HostError) as err:
        call(LlmCapability(environ={}), "llm_chat", make_run(settings), mem, {"messages": [{"role": "user", "content": "x"}]})
    assert err.value.code == Code.NOT_FOUND
    bare = make_run(None)
    with pytest.raises(HostError) as err:
        call(cap, "llm_chat", bare, mem, {"messages": [{"role": "user", "content": "hi"}]})
    assert err.value.code == Code.DENIED and bare.denials
    with pytest.raises(HostError) as err:
        call(cap, "llm_chat", make_run(settings), mem, {"messages": [{"role": "wizard", "content": "hi"}]})
    assert err.value.code == Code.INVALID


def test_server_errors_are_upstream_and_bad_requests_invalid() -> None:
    with OpenAIStandin() as standin:
        cap = LlmCapability(environ={"LLM_KEY": "sk-test"})
        run = make_run(remote(standin))
        mem = Memory()
        standin.fail_next(503)
        with pytest.raises(HostError) as err:
            call(cap, "llm_chat", run, mem, {"messages": [{"role": "user", "content": "hi"}]})
        assert err.value.code == Code.UPSTREAM
        standin.fail_next(400, message="maximum context length exceeded")
        with pytest.raises(HostError) as err:
            call(cap, "llm_chat", run, mem, {"messages": [{"role": "user", "content": "hi"}]})
        assert err.value.code == Code.INVALID


def test_local_model_needs_allow_models() -> None:
    with pytest.raises(Exception) as err:
        FlowsFile(models={"gemma": ModelSpec(backend="ggml", path="m.gguf")},
                  flows=[Flow(name="bot", module="x.wasm", llm=LlmSettings(chat=LlmEndpoint(model="gemma")))])
    assert "allow.models" in str(err.value)


@pytest.mark.slow
def test_local_chat_with_gemma_through_the_wasi_nn_registry() -> None:
    need_model(GEMMA, "gemma")
    from wasmflow.wasi_nn.registry import ModelRegistry

    registry = ModelRegistry.from_config({"gemma": {"backend": "ggml", "path": str(GEMMA), "options": {"ctx-size": 2048}}},
                                         use_env=False)
    models = {"gemma": ModelSpec(backend="ggml", path=str(GEMMA), options={"ctx-size": 2048})}
    cap = LlmCapability(registry=registry, models=models)
    run = make_run(LlmSettings(chat=LlmEndpoint(model="gemma")), models=["gemma"], timeout=120)
    mem = Memory()
    ptr = mem.top
    mem.top += 8
    assert cap.llm_info(Call(mem, run), ptr) == Code.OK
    handle, size = struct.unpack("<II", mem.read(ptr, 8))
    assert json.loads(run.take_result(handle, size))["chat"] == {"model": "gemma", "backend": "local", "context": 2048}
    answer = call(cap, "llm_chat", run, mem, {"messages": [{"role": "user", "content": "Say hello in one word."}],
                                              "max_tokens": 16, "temperature": 0})
    assert answer["backend"] == "local" and answer["content"].strip() and answer["usage"]["completion_tokens"] <= 16
    registry.close()


def test_local_chat_and_embeddings_stop_at_the_run_deadline_and_the_endpoint_timeout(tmp_path: Path) -> None:
    """The local route is a host call the engine cannot interrupt: the shared token loop checks the run's
    deadline between decode steps (the run ends `timeout`), and `llm.chat.timeout` ends the answer early
    with finish_reason "time"."""
    need_llama_cpp()
    from wasmflow.wasi_nn.registry import ModelRegistry
    from wasmflow.wasi_nn.testmodels import write_tiny_llama

    path = write_tiny_llama(tmp_path / "long.gguf", n_ctx=8192)
    registry = ModelRegistry.from_config({"long": {"backend": "ggml", "path": str(path), "target": "cpu",
                                                   "options": {"ctx-size": 8192}}}, use_env=False)
    cap = LlmCapability(registry=registry)
    ask = {"messages": [{"role": "user", "content": "once upon a time"}], "max_tokens": 8000}
    try:
        run = make_run(LlmSettings(chat=LlmEndpoint(model="long", options={"ignore_eos": True})), models=["long"], timeout=0.8)
        t0 = time.monotonic()
        with pytest.raises(HostError) as err:
            call(cap, "llm_chat", run, Memory(), ask)
        assert err.value.code == Code.TIMEOUT and run.halted is not None and run.halted[0] == "timeout", run.halted
        assert time.monotonic() - t0 < 2.0
        run = make_run(LlmSettings(chat=LlmEndpoint(model="long", timeout=0.3, options={"ignore_eos": True})), models=["long"])
        t0 = time.monotonic()
        answer = call(cap, "llm_chat", run, Memory(), ask)
        assert answer["finish_reason"] == "time" and 0 < answer["usage"]["completion_tokens"] < 8000 and run.halted is None
        assert time.monotonic() - t0 < 2.0
        run = make_run(LlmSettings(embeddings=LlmEndpoint(model="long")), models=["long"], timeout=0.5)
        time.sleep(0.6)  # the deadline has passed: the call is refused before any work
        with pytest.raises(HostError) as err:
            call(cap, "llm_embed", run, Memory(), {"input": ["a", "b"]})
        assert err.value.code == Code.TIMEOUT
    finally:
        registry.close()
