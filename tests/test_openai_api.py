"""The OpenAI-compatible endpoints, exercised with the `openai` package against a real aiohttp server.

Models are the tiny random llama (chat) and MiniLM's GGUF (embeddings, pulled from PyPI into the state
directory). The streamed answer must equal the non-streamed one, usage must count real tokens, and
embeddings must equal what WASI-NN gives a guest for the same text.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path

import numpy as np
import openai  # a dependency of wasmflow itself: never a skip
import pytest

from optional_support import need_llama_cpp

need_llama_cpp()

from aiohttp import web  # noqa: E402

from wasmflow.wasi_nn.openai_api import add_openai_routes  # noqa: E402
from wasmflow.wasi_nn import ModelRegistry, parse_preload  # noqa: E402
from wasmflow.wasi_nn.testmodels import write_tiny_llama  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STATE = Path(os.environ.get("WASMFLOW_TEST_STATE_DIR", REPO / ".wasmflow"))


class Server:
    """An aiohttp app with the routes, on 127.0.0.1, in a thread of its own."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        assert self.ready.wait(30)

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        add_openai_routes(app, self.registry)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.ready.set()
        self.loop.run_forever()

    def close(self) -> None:
        fut = asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop)
        fut.result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from wasmflow.wasi_nn import models

    d = tmp_path_factory.mktemp("openai-models")
    tiny = write_tiny_llama(d / "tiny.gguf")
    minilm = models.pull("all-minilm-l6-v2", STATE)[0]
    reg = ModelRegistry([parse_preload(f"tiny:GGML:AUTO:{tiny}"), parse_preload(f"minilm:GGML:AUTO:{minilm}"),
                         parse_preload(f"gone:GGML:AUTO:{d}/missing.gguf")])
    srv = Server(reg)
    yield srv
    srv.close()
    reg.close()


@pytest.fixture()
def client(server: Server) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_lists_the_registry(client: "openai.OpenAI") -> None:
    ids = sorted(m.id for m in client.models.list())
    assert ids == ["gone", "minilm", "tiny"]


def test_chat_stream_equals_non_stream_with_usage(client: "openai.OpenAI") -> None:
    messages = [{"role": "user", "content": "once upon a time"}]
    eos = {"ignore_eos": True}  # a random model may end early otherwise; llama.cpp's server takes it too
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0, extra_body=eos)
    assert full.usage.completion_tokens == 20 and full.usage.prompt_tokens > 3
    assert full.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}, extra_body=eos))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 5  # it really streamed
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]


def test_chat_errors(client: "openai.OpenAI") -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gone", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello world " * 400}], max_tokens=4)
    assert "context" in str(exc.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[])


def test_embeddings_match_the_wasi_nn_path(client: "openai.OpenAI", server: Server) -> None:
    from wasmflow.wasi_nn.ggml_backend import GgmlExecution, apply_metadata

    texts = ["A man is playing a guitar.", "Someone is strumming a guitar.", "Interest rates rose again."]
    resp = client.embeddings.create(model="minilm", input=texts)
    vecs = [np.array(d.embedding) for d in resp.data]
    assert len(vecs) == 3 and vecs[0].shape == (384,) and resp.usage.prompt_tokens > 10
    model = server.registry.model("minilm")
    ctx = GgmlExecution(model, apply_metadata(model.base, {"embedding": True}), lambda b: None, lambda: 60)
    ctx.set_input(0, texts[0].encode())
    ctx.compute()
    guest_vec = np.array(json.loads(ctx.get_output(0))["embedding"])
    ctx.close()
    assert np.allclose(guest_vec, vecs[0], atol=1e-5)
    assert float(vecs[0] @ vecs[1]) > float(vecs[0] @ vecs[2]) + 0.2
    single = client.embeddings.create(model="minilm", input=texts[2], encoding_format="base64")
    import base64

    raw = np.frombuffer(base64.b64decode(single.data[0].embedding), dtype="<f4")  # asked for base64: given as is
    assert np.allclose(raw, vecs[2], atol=1e-5)


def test_metrics_figures_follow_requests(client: "openai.OpenAI", server: Server) -> None:
    before = server.registry.stats()["tiny"]["acquired_total"]
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    stats = server.registry.stats()["tiny"]
    assert stats["acquired_total"] == before + 1 and stats["busy"] == 0 and stats["waiting"] == 0
