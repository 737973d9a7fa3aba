"""Hostile guests, class 13 (kv, llm, config): malformed host-call arguments are the guest's error.

A wrong JSON type, a NUL in a key or a string where a number belongs used to come back as INTERNAL
with a traceback in the host's log (an operator paged for a guest's typo), or was forwarded to the
model endpoint. Each must be INVALID, with a message saying what was expected, before anything is
sent anywhere, and with nothing logged above a warning.
"""

from __future__ import annotations

import json
import logging
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from hostile_support import engine_name, run_flow  # noqa: F401
from test_github_host import Memory
from wasmflow.devtools.openai_standin import OpenAIStandin
from wasmflow.engine import Status
from wasmflow.flows.model import Allow, Flow, LlmEndpoint, LlmSettings
from wasmflow.host_functions.config import ConfigCapability
from wasmflow.host_functions.kv import KeyValueCapability, KeyValueStore
from wasmflow.host_functions.llm import LlmCapability
from wasmflow.host_functions.spec import Call, Capability, Code, Event, RunContext, invoke
from wasmflow.storage import open_database


def call_raw(cap: Capability, name: str, run: RunContext, mem: Memory, *args: Any) -> int:
    """Call host function `name` the way an engine does (through `invoke`); bytes become (ptr, len)."""
    fn = next(f for f in cap.functions() if f.name == name)
    flat: list[int] = []
    for arg in args:
        if isinstance(arg, bytes):
            flat += mem.put(arg)
        else:
            flat.append(arg)
    return invoke(fn, Call(mem, run), flat)


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    loud = [r for r in caplog.records if r.name.startswith("wasmflow") and (r.levelno >= logging.ERROR or r.exc_info)]
    assert loud == [], f"logged: {[r.getMessage() for r in loud]}"


def run_for(flow: Flow) -> RunContext:
    return RunContext(flow=flow, event=Event("manual"), run_id="r", deadline=time.monotonic() + 30)


# -- kv ------------------------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def kv_cap(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    url = f"sqlite:///{tmp_path / 'kv.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    db = open_database(url)
    yield KeyValueCapability(KeyValueStore(db))
    db.dispose()


@pytest.mark.parametrize("key", [b"a\0b", b"\xff\xfe", b"\0"])
def test_kv_keys_that_no_database_stores_are_invalid(kv_cap, caplog, key: bytes) -> None:
    run = run_for(Flow(name="f", module="x.wasm", allow={"kv": True}))
    mem = Memory()
    out = 60000
    assert call_raw(kv_cap, "kv_set", run, mem, key, b"v") == Code.INVALID
    assert call_raw(kv_cap, "kv_get", run, mem, key, out) == Code.INVALID
    assert call_raw(kv_cap, "kv_delete", run, mem, key) == Code.INVALID
    assert call_raw(kv_cap, "kv_keys", run, mem, key, out) == Code.INVALID
    assert call_raw(kv_cap, "kv_increment", run, mem, key, 1, out) == Code.INVALID
    assert call_raw(kv_cap, "kv_cas", run, mem, key, 0, -1, b"v", out) == Code.INVALID
    no_tracebacks(caplog)


def test_kv_increment_of_text_is_invalid_with_a_message(kv_cap, caplog) -> None:
    run = run_for(Flow(name="f", module="x.wasm", allow={"kv": True}))
    mem = Memory()
    assert call_raw(kv_cap, "kv_set", run, mem, b"k", b"hello") == Code.OK
    assert call_raw(kv_cap, "kv_increment", run, mem, b"k", 1, 60000) == Code.INVALID
    assert any("not a decimal integer" in m for _, _, m in run.logs)
    no_tracebacks(caplog)


def test_kv_increment_of_text_through_a_guest(engine_name, tmp_path) -> None:
    wat = """(module
      (import "wasmflow" "kv_set" (func $set (param i32 i32 i32 i32) (result i32)))
      (import "wasmflow" "kv_increment" (func $inc (param i32 i32 i64 i32) (result i32)))
      (import "wasmflow" "set_output" (func $out (param i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 0) "k") (data (i32.const 8) "text")
      (func (export "_start")
        (drop (call $set (i32.const 0) (i32.const 1) (i32.const 8) (i32.const 4)))
        (i32.store (i32.const 32) (call $inc (i32.const 0) (i32.const 1) (i64.const 1) (i32.const 40)))
        (drop (call $out (i32.const 32) (i32.const 4)))))"""
    result = run_flow(engine_name, tmp_path, wat, allow={"kv": True})
    assert result.status is Status.OK and struct.unpack("<i", result.output) == (Code.INVALID,)


# -- llm -----------------------------------------------------------------------------------------------

HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("request_json", [
    {"messages": HI, "max_tokens": "abc"},
    {"messages": HI, "max_tokens": -5},
    {"messages": HI, "max_tokens": 1.5},
    {"messages": HI, "temperature": "hot"},
    {"messages": HI, "temperature": 1e400},
    {"messages": HI, "top_p": [1]},
    {"messages": HI, "stop": 5},
    {"messages": HI, "stop": ["a", 5]},
    {"messages": HI, "seed": "x"},
    {"messages": HI, "seed": True},
    {"messages": HI, "response_format": 7},
    {"messages": HI, "response_format": "yaml"},
    {"messages": HI, "json_schema": "not an object"},
    {"messages": HI, "presence_penalty": {}},
    {"messages": [{"role": "user", "content": "hi", "name": 5}]},
    {"messages": {"role": "user", "content": "hi"}},
    {"messages": []},
    [HI],
    "messages",
])
def test_llm_chat_malformed_requests_are_invalid_and_never_sent(caplog, request_json: Any) -> None:
    with OpenAIStandin(api_key=None) as standin:
        endpoint = LlmEndpoint(model="standin-chat", base_url=standin.base_url)
        cap = LlmCapability(environ={})
        run = run_for(Flow(name="bot", module="x.wasm", llm=LlmSettings(chat=endpoint, embeddings=endpoint)))
        cap.open_run(run)
        mem = Memory()
        code = call_raw(cap, "llm_chat", run, mem, json.dumps(request_json).encode(), 60000)
        assert code == Code.INVALID
        assert standin.chat_requests() == [], "a malformed request reached the endpoint"
        assert any("llm_chat" in m and "expected" in m for _, _, m in run.logs), run.logs
    no_tracebacks(caplog)


@pytest.mark.parametrize("request_json", [{"input": 5}, {"input": ["a", 3]}, {"input": []}, {"input": None}, 7, [1]])
def test_llm_embed_malformed_requests_are_invalid(caplog, request_json: Any) -> None:
    with OpenAIStandin(api_key=None) as standin:
        endpoint = LlmEndpoint(model="standin-chat", base_url=standin.base_url)
        cap = LlmCapability(environ={})
        run = run_for(Flow(name="bot", module="x.wasm", llm=LlmSettings(chat=endpoint, embeddings=endpoint)))
        cap.open_run(run)
        assert call_raw(cap, "llm_embed", run, Memory(), json.dumps(request_json).encode(), 60000) == Code.INVALID
        assert any("llm_embed" in m and "expected" in m for _, _, m in run.logs), run.logs
    no_tracebacks(caplog)


def test_llm_chat_well_formed_request_still_goes_through(caplog) -> None:
    with OpenAIStandin(lambda messages, req: "fine", api_key=None) as standin:
        endpoint = LlmEndpoint(model="standin-chat", base_url=standin.base_url)
        cap = LlmCapability(environ={})
        run = run_for(Flow(name="bot", module="x.wasm", llm=LlmSettings(chat=endpoint)))
        cap.open_run(run)
        req = {"messages": HI, "max_tokens": 20, "temperature": 0.2, "stop": ["\n"], "seed": 1,
               "response_format": "json", "json_schema": {"type": "object"}, "extra": "ignored"}
        assert call_raw(cap, "llm_chat", run, Memory(), json.dumps(req).encode(), 60000) == Code.OK
        sent = standin.chat_requests()[0]["body"]
        assert sent["max_tokens"] == 20 and sent["temperature"] == 0.2 and sent["stop"] == ["\n"]
    no_tracebacks(caplog)


# -- config --------------------------------------------------------------------------------------------


def test_config_and_secret_names_that_are_not_utf8_are_invalid(caplog) -> None:
    cap = ConfigCapability(environ={"TOKEN": "t"})
    run = run_for(Flow(name="f", module="x.wasm", config={"k": "v"}, secrets=["TOKEN"]))
    mem = Memory()
    assert call_raw(cap, "config_get", run, mem, b"\xff", 60000) == Code.INVALID
    assert call_raw(cap, "secret_get", run, mem, b"\xc3", 60000) == Code.INVALID
    assert call_raw(cap, "config_get", run, mem, b"k\0", 60000) == Code.NOT_FOUND
    assert call_raw(cap, "config_get", run, mem, b"k", 60000) == Code.OK
    no_tracebacks(caplog)


def test_config_values_of_any_yaml_type_reach_the_guest(caplog) -> None:
    import datetime

    cap = ConfigCapability(environ={})
    run = run_for(Flow(name="f", module="x.wasm", config={"when": datetime.date(2024, 1, 2), "n": 3}))
    mem = Memory()
    out = 60000
    assert call_raw(cap, "config_get", run, mem, b"when", out) == Code.OK
    handle, size = struct.unpack("<II", mem.read(out, 8))
    assert run.take_result(handle, size) == b"2024-01-02"
    no_tracebacks(caplog)
