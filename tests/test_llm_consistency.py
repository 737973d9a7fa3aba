"""One generation path and one embedding path for local GGUF models, whichever door a caller uses.

The same model and text must give the same vector (to 1e-5, L2-normalised) from a WASI-NN guest, the
`llm_embed` host function and `/v1/embeddings`; the same greedy chat must give the same text and the
same token counts from `llm_chat` and `/v1/chat/completions` (streamed or not), and those counts must
be the model's own: the prompt as llama.cpp tokenizes it, one completion token per generated token.
Checked on the tiny generated llama, and on the pulled MiniLM and Gemma where they are present.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import openai  # a dependency of wasmflow itself: never a skip
import pytest

from optional_support import need_llama_cpp, require

need_llama_cpp()

from hostile_support import engine_name, run_flow  # noqa: E402,F401
from nn_guest_wat import NnGuest, NnInput, nn_guest_wat  # noqa: E402
from test_github_host import Memory  # noqa: E402
from test_llm_host import call  # noqa: E402
from test_openai_api import Server  # noqa: E402
from wasmflow.engine.base import Status  # noqa: E402
from wasmflow.flows.model import Allow, Flow, LlmEndpoint, LlmSettings  # noqa: E402
from wasmflow.host_functions.llm import LlmCapability  # noqa: E402
from wasmflow.host_functions.spec import Event, RunContext  # noqa: E402
from wasmflow.wasi_nn import ModelRegistry, parse_preload  # noqa: E402
from wasmflow.wasi_nn.testmodels import write_tiny_llama  # noqa: E402

MODELS = Path(__file__).resolve().parents[1] / ".wasmflow" / "models"
MINILM = MODELS / "all-MiniLM-L6-v2.f16.gguf"
GEMMA = MODELS / "gemma-3-270m-q4_k_m.gguf"
TEXTS = ["A man is playing a guitar.", "the cat is a dog"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Model name -> GGUF file: the tiny llama always, MiniLM and Gemma where pulled."""
    found = {"tiny": write_tiny_llama(tmp_path_factory.mktemp("consistency") / "tiny.gguf")}
    for name, path in (("minilm", MINILM), ("gemma", GEMMA)):
        if path.exists():
            found[name] = path
    return found


@pytest.fixture(scope="module")
def served(paths: dict[str, Path]) -> Iterator[tuple[ModelRegistry, Any]]:
    """One registry behind `/v1` (on loopback, through the `openai` client) and the host functions."""
    registry = ModelRegistry([parse_preload(f"{name}:GGML:CPU:{path}") for name, path in paths.items()])
    server = Server(registry)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0, timeout=120)
    yield registry, client
    server.close()
    registry.close()


def host_call(registry: ModelRegistry, fn: str, req: dict[str, Any], chat: LlmEndpoint | None = None,
              embeddings: LlmEndpoint | None = None) -> Any:
    """`fn` (llm_chat / llm_embed) as a guest calls it, in a run of a flow routed to a local model."""
    model = (chat or embeddings).model  # type: ignore[union-attr]
    flow = Flow(name="bot", module="x.wasm", llm=LlmSettings(chat=chat, embeddings=embeddings), allow=Allow(models=[model]))
    run = RunContext(flow=flow, event=Event("manual"), run_id="r", deadline=time.monotonic() + 120)
    cap = LlmCapability(registry=registry)
    cap.open_run(run)
    return call(cap, fn, run, Memory(), req)


def embed_models(paths: dict[str, Path]) -> list[str]:
    return [name for name in ("tiny", "minilm") if name in paths]


def test_the_same_vector_from_every_entry_point(engine_name: str, tmp_path: Path, paths: dict[str, Path],
                                                served: tuple[ModelRegistry, Any]) -> None:
    registry, client = served
    for name in embed_models(paths):
        host = host_call(registry, "llm_embed", {"input": TEXTS}, embeddings=LlmEndpoint(model=name))["embeddings"]
        api = [d.embedding for d in client.embeddings.create(model=name, input=TEXTS).data]
        for text, from_host, from_api in zip(TEXTS, host, api):
            guest = nn_guest_wat(NnGuest([b'{"embedding": true}'], encoding=6, name=name,
                                         inputs=[NnInput(0, [1], 3, text.encode())]))
            result = run_flow(engine_name, tmp_path, guest, models={name: {"backend": "ggml", "path": str(paths[name]), "target": "cpu"}},
                              allow={"models": [name]})
            assert result.status is Status.OK, (name, result.status, result.error, result.stdout)
            from_guest = np.array(json.loads(result.stdout)["embedding"])
            assert from_guest.shape == (len(from_host),) and len(from_host) == len(from_api)
            assert abs(float(np.linalg.norm(from_host)) - 1.0) < 1e-5, f"{name}: llm_embed is not L2-normalised"
            assert np.allclose(from_host, from_guest, atol=1e-5), f"{name}: llm_embed differs from WASI-NN"
            assert np.allclose(from_api, from_guest, atol=1e-5), f"{name}: /v1/embeddings differs from WASI-NN"
        assert not np.allclose(host[0], host[1], atol=1e-3)  # different texts, different vectors


def direct_greedy(path: Path, prompt: str, n: int, repeat_penalty: float) -> tuple[int, int, str]:
    """(prompt tokens, completion tokens, text) of a greedy generation straight through llama-cpp-python,
    the prompt tokenized as llama.cpp tokenizes it: the yardstick for the counts the entry points report."""
    import llama_cpp

    llama = llama_cpp.Llama(model_path=str(path), n_ctx=2048, verbose=False)
    try:
        tokens = llama.tokenize(prompt.encode(), add_bos=True, special=True)
        out: list[int] = []
        for token in llama.generate(tokens, temp=0.0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=repeat_penalty, reset=True):
            out.append(token)
            if len(out) == n:
                break
        return len(tokens), len(out), llama.detokenize(out).decode("utf-8", "replace")
    finally:
        llama.close()


@pytest.mark.parametrize("name", ["tiny", "gemma"])
def test_the_same_tokens_and_counts_from_llm_chat_and_v1(name: str, paths: dict[str, Path],
                                                         served: tuple[ModelRegistry, Any]) -> None:
    require(name in paths, f"model {name} is not pulled: run `wasmflow models pull {name}`")
    registry, client = served
    messages = [{"role": "user", "content": "Once upon a time there was a cat"}]
    n = 12
    # ignore_eos: every answer runs to max_tokens, so the count says something; the llm route's repeat penalty.
    endpoint = LlmEndpoint(model=name, options={"ignore_eos": True})
    host = host_call(registry, "llm_chat", {"messages": messages, "max_tokens": n, "temperature": 0}, chat=endpoint)
    extra = {"ignore_eos": True, "repeat_penalty": 1.15}
    full = client.chat.completions.create(model=name, messages=messages, max_tokens=n, temperature=0, extra_body=extra)
    chunks = list(client.chat.completions.create(model=name, messages=messages, max_tokens=n, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}, extra_body=extra))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage

    prompt, _ = registry.model(name).chat_prompt(messages)
    n_prompt, n_out, text = direct_greedy(paths[name], prompt, n, 1.15)
    assert n_out == n and n_prompt > 5
    assert host["content"] == full.choices[0].message.content == streamed == text
    assert host["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": n}
    assert (full.usage.prompt_tokens, full.usage.completion_tokens) == (n_prompt, n)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (n_prompt, n, n_prompt + n)
    assert host["finish_reason"] == full.choices[0].finish_reason == "length"


def test_bad_requests_are_refused_the_same_way_at_both_doors(served: tuple[ModelRegistry, Any]) -> None:
    """A value of the wrong type is a client error with its reason, never a server error."""
    _, client = served
    messages = [{"role": "user", "content": "hi"}]
    for bad in ({"stop": 3}, {"top_k": "many"}, {"max_tokens": 1.5}):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="tiny", messages=messages, extra_body=bad)
        assert err.value.status_code == 400 and ("stop" in str(err.value) or "expected" in str(err.value))
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=messages, stream=True, extra_body={"stop": {"a": 1}})
