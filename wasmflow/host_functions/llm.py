"""Chat and embeddings for guests, routed by the flow's `llm:` section to a remote or a local model.

Why one pair of functions for both routes: a guest such as the code-review bot should not care whether
the operator points it at OpenAI, an Ollama or llama.cpp server, wasmflow's own `/v1`, or a GGUF file
loaded in this process. The operator picks in flows.yaml (`llm.chat` / `llm.embeddings`); the guest
calls `llm_chat` with OpenAI-style messages and gets text back. The alternative, guests driving
WASI-NN themselves, would make every guest carry chat templates, tokenizer budgets and sampling code,
and could not reach hosted models at all. (WASI-NN stays available for guests that want the raw
interface; the issue-triage example uses it for embeddings.)

* Remote: the `openai` package against `base_url`, API key from the environment variable named by
  `api_key_secret` (read by the host; the guest never sees it), no client-side retries (a failed call is
  `UPSTREAM`, and the platform retries the run with backoff), timeout bounded by the run's deadline.
* Local: the model named in `models:` through the WASI-NN model registry, so the weights are loaded once
  per process and shared with WASI-NN guests, and through the WASI-NN package's one generation and one
  embedding path (`wasi_nn/generation.py`, reached as `registry.run_chat` / `run_embed`), the same
  that serves WASI-NN guests and `/v1`: same prompt, same token counts, same L2-normalised vectors.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, Union

from pydantic import Field, field_validator, model_validator

from wasmflow.fields import INT64_MAX, INT64_MIN, Option, Section, check_options, duration_in

from .spec import Call, Capability, Code, HostError, HostFunction, RunContext, Setup, write_result
from .validate import GuestRequest, read_request

log = logging.getLogger("wasmflow.llm")

MAX_MESSAGES_BYTES = 4 * 1024 * 1024
MAX_CALLS = 50  # chat + embedding calls per run
MAX_INPUTS = 256
DEFAULT_MAX_TOKENS = 1024
LOCAL_REPEAT_PENALTY = 1.15  # local models' default (an endpoint option can change it): small ones loop without it

# The request shapes, declared once: anything else is INVALID before an endpoint or model sees it.
class ChatMessage(GuestRequest):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str
    name: Optional[str] = None


class ChatRequest(GuestRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1, le=1_000_000)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    response_format: Optional[Literal["json", "text"]] = None
    json_schema: Optional[dict[str, Any]] = None


class EmbedRequest(GuestRequest):
    input: Union[str, list[str]]


CHAT_EXPECTED = ('{"messages": [{"role": "user", "content": "..."}], "max_tokens": 512, "temperature": 0.2, '
                 '"top_p", "stop", "seed", "response_format": "json", "json_schema": {...}} (docs/abi.md)')
EMBED_EXPECTED = '{"input": "text"} or {"input": ["text", ...]} (docs/abi.md)'
SAMPLING = ("max_tokens", "temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty",
            "json_schema")


@dataclass
class _RunLlm:
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


class LlmCapability(Capability):
    """`llm_chat`, `llm_embed` and `llm_info` in module `wasmflow`."""

    name = "llm"

    def __init__(self, registry: Any = None, models: Optional[Mapping[str, Any]] = None,
                 environ: Optional[Mapping[str, str]] = None) -> None:
        self.registry = registry  # wasmflow.wasi_nn.registry.ModelRegistry, for local models
        self.models = dict(models or {})  # flows.yaml `models:` (for context sizes)
        self.environ = os.environ if environ is None else environ
        self._clients: dict[tuple[str, str, float], Any] = {}

    @classmethod
    def build(cls, setup: Setup) -> "LlmCapability":
        """Local models are served from the WASI-NN capability's registry when it was built first."""
        nn = setup.built.get("nn")
        return cls(registry=getattr(nn, "registry", None), models=getattr(setup.flows, "models", {}) or {})

    def functions(self) -> list[HostFunction]:
        return [
            HostFunction("wasmflow", "llm_chat", "ptr len ptr", ("i32",), self.llm_chat),
            HostFunction("wasmflow", "llm_embed", "ptr len ptr", ("i32",), self.llm_embed),
            HostFunction("wasmflow", "llm_info", "ptr", ("i32",), self.llm_info),
        ]

    def open_run(self, run: RunContext) -> None:
        run.state["llm"] = _RunLlm()

    def close_run(self, run: RunContext) -> None:
        state: Optional[_RunLlm] = run.state.get("llm")
        if state is not None and state.calls:
            run.logs.append((time.time(), "debug", f"wasmflow: {state.calls} LLM calls, {state.prompt_tokens} prompt + "
                                                   f"{state.completion_tokens} completion tokens, {state.seconds:.1f} s"))

    # -- helpers ------------------------------------------------------------------------------------

    def _endpoint(self, run: RunContext, kind: str) -> Any:
        llm = getattr(run.flow, "llm", None)
        endpoint = getattr(llm, kind, None) if llm is not None else None
        if endpoint is None:
            raise run.deny(f"the flow has no llm.{kind} in flows.yaml")
        return endpoint

    def _fail(self, run: RunContext, code: int, message: str) -> HostError:
        """Failures are logged into the run (the operator sees why in `wasmflow logs`) and returned as a code."""
        run.note(message)
        return HostError(code, message)

    def _request(self, call: Call, ptr: int, length: int, model: Any, what: str, expected: str) -> Any:
        try:
            return read_request(call.memory, ptr, length, model, what, expected)
        except HostError as err:
            raise self._fail(call.run, err.code, err.message) from None

    def _client(self, run: RunContext, endpoint: Any) -> Any:
        import openai

        key = "no-key"
        if endpoint.api_key_secret:
            key = self.environ.get(endpoint.api_key_secret, "")
            if not key:
                raise self._fail(run, Code.NOT_FOUND, f"llm: {endpoint.api_key_secret} is not set in the host's environment")
        timeout = max(1.0, min(float(endpoint.timeout), run.remaining()))
        return openai.OpenAI(base_url=endpoint.base_url, api_key=key, max_retries=0, timeout=timeout)

    def _count(self, run: RunContext) -> _RunLlm:
        state: _RunLlm = run.state.setdefault("llm", _RunLlm())
        if state.calls >= MAX_CALLS:
            raise HostError(Code.LIMIT, f"more than {MAX_CALLS} LLM calls in one run")
        if run.remaining() <= 0:
            raise HostError(Code.TIMEOUT, "the run's deadline has passed")
        budget = run.budget
        if budget is not None and budget.left() <= 0:
            # Refused, not failed: the guest may go on without the model (the review bot posts a
            # neutral check); if it fails, the run ends `denied` with this reason.
            reason = f"llm: budget exhausted: {budget.describe()} already spent"
            run.note(reason)
            raise run.deny(reason)
        state.calls += 1
        return state

    def _openai_error(self, run: RunContext, exc: Exception, what: str) -> HostError:
        import openai

        if isinstance(exc, openai.APITimeoutError):
            code = Code.TIMEOUT if run.remaining() <= 0 else Code.UPSTREAM
            return self._fail(run, code, f"llm {what}: the endpoint timed out")
        if isinstance(exc, openai.APIConnectionError):
            return self._fail(run, Code.UPSTREAM, f"llm {what}: cannot reach the endpoint ({exc.__cause__ or exc})")
        if isinstance(exc, openai.APIStatusError):
            code = Code.INVALID if exc.status_code in (400, 404, 413, 422) else Code.UPSTREAM
            return self._fail(run, code, f"llm {what}: the endpoint answered {exc.status_code}: {exc.message}")
        return self._fail(run, Code.UPSTREAM, f"llm {what}: {exc}")

    # -- host functions -----------------------------------------------------------------------------

    def llm_info(self, call: Call, out: int) -> int:
        """What the flow's LLM endpoints are, so a guest can size prompts to the model's context."""
        llm = getattr(call.run.flow, "llm", None)
        info: dict[str, Any] = {}
        for kind in ("chat", "embeddings"):
            endpoint = getattr(llm, kind, None) if llm is not None else None
            if endpoint is None:
                info[kind] = None
                continue
            context = None
            if endpoint.base_url is None and endpoint.model in self.models:
                opts = self.models[endpoint.model].options
                context = opts.get("ctx-size", opts.get("ctx_size"))
            context = endpoint.options.get("context", context)
            info[kind] = {"model": endpoint.model, "backend": "openai" if endpoint.base_url else "local",
                          "context": int(context) if context else None}
        return write_result(call, out, json.dumps(info).encode())

    def llm_chat(self, call: Call, req_ptr: int, req_len: int, out: int) -> int:
        run = call.run
        if req_len > MAX_MESSAGES_BYTES:
            raise HostError(Code.TOO_LARGE, "chat request over 4 MiB")
        endpoint = self._endpoint(run, "chat")
        request: ChatRequest = self._request(call, req_ptr, req_len, ChatRequest, "llm_chat", CHAT_EXPECTED)
        messages = [m.model_dump(exclude_none=True) for m in request.messages]
        params: dict[str, Any] = {"max_tokens": DEFAULT_MAX_TOKENS, **endpoint.options}
        params.pop("context", None)
        params.pop("chat_format", None)  # a local-route option; `_local_chat` reads it from the endpoint
        params.update(request.model_dump(include=set(SAMPLING), exclude_none=True))
        want_json = request.response_format == "json"
        state = self._count(run)
        started = time.monotonic()
        if endpoint.base_url:
            result = self._remote_chat(run, endpoint, messages, params, want_json)
        else:
            result = self._local_chat(run, endpoint, messages, params, want_json)
        elapsed = time.monotonic() - started
        state.seconds += elapsed
        state.prompt_tokens += result["usage"].get("prompt_tokens") or 0
        state.completion_tokens += result["usage"].get("completion_tokens") or 0
        if run.budget is not None:
            run.budget.spend((result["usage"].get("prompt_tokens") or 0) + (result["usage"].get("completion_tokens") or 0))
        result["ms"] = round(elapsed * 1000, 1)
        return write_result(call, out, json.dumps(result).encode())

    def _remote_chat(self, run: RunContext, endpoint: Any, messages: list[dict[str, Any]], params: dict[str, Any],
                     want_json: bool) -> dict[str, Any]:
        client = self._client(run, endpoint)
        extra: dict[str, Any] = {"response_format": {"type": "json_object"}} if want_json else {}
        params = {k: v for k, v in params.items() if k != "json_schema"}  # not every endpoint takes schemas
        try:
            resp = client.chat.completions.create(model=endpoint.model, messages=messages, **params, **extra)
        except Exception as exc:
            raise self._openai_error(run, exc, "chat") from None
        if not resp.choices:
            raise self._fail(run, Code.UPSTREAM, "llm chat: the endpoint returned no choices")
        choice = resp.choices[0]
        usage = resp.usage
        return {"content": choice.message.content or "", "model": resp.model or endpoint.model,
                "finish_reason": choice.finish_reason, "backend": "openai",
                "usage": {"prompt_tokens": getattr(usage, "prompt_tokens", None),
                          "completion_tokens": getattr(usage, "completion_tokens", None)}}

    def _local_model(self, run: RunContext, endpoint: Any) -> Any:
        if endpoint.model not in run.flow.allow.models:
            raise run.deny(f"llm: model {endpoint.model!r} is not in the flow's allow.models")
        if self.registry is None:
            raise self._fail(run, Code.INTERNAL, "llm: local models need the WASI-NN back end, which is not loaded")
        try:
            return self.registry.model(endpoint.model)
        except Exception as exc:
            raise self._fail(run, Code.NOT_FOUND, f"llm: local model {endpoint.model!r}: {exc}") from None

    def _local_chat(self, run: RunContext, endpoint: Any, messages: list[dict[str, Any]], params: dict[str, Any],
                    want_json: bool) -> dict[str, Any]:
        """The WASI-NN package's one chat path (also behind `/v1/chat/completions`): the same prompt,
        sampling and exact token counts. A host call is outside the engine's epoch deadline, so the
        token loop checks the run's deadline between decode steps (the run ends `timeout`), and
        `llm.chat.timeout` ends the answer early with finish_reason "time"."""
        model = self._local_model(run, endpoint)
        if getattr(model, "backend", "") != "ggml":
            raise self._fail(run, Code.INVALID, f"llm: model {endpoint.model!r} is not a GGUF chat model")
        request = dict(params)
        request.setdefault("repeat_penalty", LOCAL_REPEAT_PENALTY)
        if want_json:  # a schema becomes a llama.cpp grammar: even a small model then answers in the asked shape
            schema = params.get("json_schema")
            request["response_format"] = ({"type": "json_schema", "json_schema": {"schema": schema}} if isinstance(schema, dict)
                                          else {"type": "json_object"})
        try:
            result = self.registry.run_chat(endpoint.model, run, messages, request, endpoint.options.get("chat_format"),
                                            float(endpoint.timeout))
        except HostError as err:
            raise err if run.halted is not None else self._fail(run, err.code, err.message) from None
        return {**result, "model": endpoint.model, "backend": "local"}

    def llm_embed(self, call: Call, req_ptr: int, req_len: int, out: int) -> int:
        run = call.run
        if req_len > MAX_MESSAGES_BYTES:
            raise HostError(Code.TOO_LARGE, "embedding request over 4 MiB")
        endpoint = self._endpoint(run, "embeddings")
        request: EmbedRequest = self._request(call, req_ptr, req_len, EmbedRequest, "llm_embed", EMBED_EXPECTED)
        inputs = [request.input] if isinstance(request.input, str) else list(request.input)
        if not inputs:
            raise self._fail(run, Code.INVALID, f"llm_embed: input is an empty list; expected {EMBED_EXPECTED}")
        if len(inputs) > MAX_INPUTS:
            raise HostError(Code.LIMIT, f"more than {MAX_INPUTS} inputs in one call")
        state = self._count(run)
        started = time.monotonic()
        if endpoint.base_url:
            client = self._client(run, endpoint)
            try:
                resp = client.embeddings.create(model=endpoint.model, input=inputs)
            except Exception as exc:
                raise self._openai_error(run, exc, "embeddings") from None
            vectors = [list(d.embedding) for d in sorted(resp.data, key=lambda d: d.index)]
        else:
            vectors = self._local_embed(run, endpoint, inputs)
        state.seconds += time.monotonic() - started
        result = {"embeddings": vectors, "model": endpoint.model, "dims": len(vectors[0]) if vectors else 0}
        return write_result(call, out, json.dumps(result).encode())

    def _local_embed(self, run: RunContext, endpoint: Any, inputs: list[str]) -> list[list[float]]:
        """The WASI-NN package's one embedding path (also behind `/v1/embeddings` and a WASI-NN guest's
        `embedding` compute): the same L2-normalised vector for the same text. The run's deadline is
        checked before each input (the run ends `timeout`)."""
        model = self._local_model(run, endpoint)
        if getattr(model, "backend", "") != "ggml":
            raise self._fail(run, Code.INVALID, f"llm: model {endpoint.model!r} is not a GGUF embedding model")
        try:
            return self.registry.run_embed(endpoint.model, run, inputs)  # type: ignore[no-any-return]
        except HostError as err:
            raise err if run.halted is not None else self._fail(run, err.code, err.message) from None


# --- flows.yaml: `llm:` of a flow ----------------------------------------------------------------------

# Options of `llm.*.options`, in the OpenAI API's ranges.
LLM_OPTIONS: dict[str, Option] = {
    "context": ("int", 1, 16_777_216), "max_tokens": ("int", 1, 4_194_304), "temperature": ("number", 0, 2),
    "top_p": ("number", 0, 1), "presence_penalty": ("number", -2, 2), "frequency_penalty": ("number", -2, 2),
    "seed": ("int", INT64_MIN, INT64_MAX),
}


class LlmEndpoint(Section):
    """Where a flow's `llm_chat` / `llm_embed` calls go; chosen by the operator, never by the guest.

    With `base_url`, any OpenAI-compatible API (OpenAI, wasmflow's own /v1, llama.cpp server, Ollama)
    through the `openai` package, `model` being the id sent to it. Without, `model` names an entry of
    `models:` (listed in the flow's `allow.models`) run in-process by the WASI-NN back end.
    """

    model: str
    base_url: Optional[str] = None
    api_key_secret: Optional[str] = None  # env var holding the key; read by the host, never shown to the guest
    timeout: duration_in(0.001, 3600.0) = 120.0
    options: dict[str, Any] = {}  # defaults for requests: temperature, max_tokens, ...

    @model_validator(mode="after")
    def _options(self) -> "LlmEndpoint":
        check_options(self.options, LLM_OPTIONS)
        return self

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not value.strip():
            return None  # `${VAR:-}` left empty: the local route
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"expected an http(s) URL like https://api.openai.com/v1, got {value!r}")
        return value

    @field_validator("api_key_secret")
    @classmethod
    def _secret(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not value.strip():
            return None
        if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError(f"expected an environment variable name, got {value!r}")
        return value


class LlmSettings(Section):
    """`llm:` of a flow: the endpoint for chat and the one for embeddings (each optional)."""

    chat: Optional[LlmEndpoint] = None
    embeddings: Optional[LlmEndpoint] = None
