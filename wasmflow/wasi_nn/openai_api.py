"""OpenAI-compatible endpoints over the WASI-NN model registry: `/v1/models`, `/v1/chat/completions`
(with SSE streaming and usage) and `/v1/embeddings`.

They serve the very objects guests use (`ModelRegistry`), so a model is loaded once per process whether
a guest or an HTTP client asks for it, and both queue on the same llama contexts. Chat and embeddings
run in a worker thread through the WASI-NN package's one generation and one embedding path
(`wasi_nn/generation.py`: `chat`, `embed`), the same that serves WASI-NN guests and the `llm_chat` /
`llm_embed` host functions, so `usage` counts the model's tokens, a streamed answer equals a
non-streamed one, and a vector equals a guest's for the same text.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Any, Optional

from aiohttp import web

from wasmflow.wasi_nn.abi import NNError, NNFailure
from wasmflow.wasi_nn.generation import Completion, chat, embed

MAX_WAIT = 300.0  # seconds a request queues for a llama context
MAX_INPUTS = 256


def _error(status: int, message: str, code: Optional[str] = None, kind: str = "invalid_request_error") -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": None, "code": code}}, status=status)


def add_openai_routes(app: web.Application, registry: Any) -> None:
    """Mount the three endpoints on `app`, serving the models of `registry` (a ModelRegistry)."""
    api = _OpenAI(registry)
    app.router.add_get("/v1/models", api.models)
    app.router.add_post("/v1/chat/completions", api.chat)
    app.router.add_post("/v1/embeddings", api.embeddings)


class _OpenAI:
    def __init__(self, registry: Any) -> None:
        self.registry = registry

    # -- /v1/models --------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        data = [
            {"id": e.name, "object": "model", "created": 0, "owned_by": "wasmflow", "backend": e.backend}
            for e in self.registry.entries()
        ]
        return web.json_response({"object": "list", "data": data})

    # -- helpers -----------------------------------------------------------------------------

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise web.HTTPBadRequest(text=json.dumps({"error": {"message": "the body is not JSON", "type": "invalid_request_error"}}),
                                     content_type="application/json") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text=json.dumps({"error": {"message": "the body must be a JSON object", "type": "invalid_request_error"}}),
                                     content_type="application/json")
        return body

    def _model(self, name: Any, backend: str) -> Any:
        if not isinstance(name, str):
            raise NNFailure(NNError.NOT_FOUND, "`model` is required")
        entry = self.registry.entry(name)
        if entry.backend != backend:
            raise NNFailure(NNError.UNSUPPORTED_OPERATION, f"model {name!r} is a {entry.backend} model; this endpoint needs {backend}")
        return self.registry.model(name)

    @staticmethod
    def _failure(exc: NNFailure) -> web.Response:
        if exc.code in (NNError.NOT_FOUND, NNError.MODEL_NOT_FOUND):
            return _error(404, exc.message, "model_not_found")
        if exc.code == NNError.PROMPT_TOO_LONG:
            return _error(400, exc.message, "context_length_exceeded")
        if exc.code == NNError.BUSY:
            return _error(503, exc.message, "busy", "server_error")
        if exc.code in (NNError.RUNTIME_ERROR,):
            return _error(500, exc.message, "runtime_error", "server_error")
        return _error(400, exc.message, exc.code.name.lower())

    # -- /v1/chat/completions ----------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            return _error(400, "`messages` must be a non-empty list of objects")
        for m in messages:  # content may be a list of parts: keep the text parts
            if isinstance(m.get("content"), list):
                m["content"] = "".join(p.get("text", "") for p in m["content"] if isinstance(p, dict))
        try:
            model = self._model(body.get("model"), "ggml")
        except NNFailure as exc:
            return self._failure(exc)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": body["model"]}
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if body.get("stream"):
            return await self._chat_stream(request, model, messages, body, meta, include_usage)
        try:
            result = await asyncio.get_running_loop().run_in_executor(None, lambda: chat(model, messages, body, wait=MAX_WAIT))
        except NNFailure as exc:
            return self._failure(exc)
        return web.json_response({
            **meta, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text}, "finish_reason": result.finish,
                         "logprobs": None}],
            "usage": _usage(result),
        })

    async def _chat_stream(self, request: web.Request, model: Any, messages: list[dict[str, Any]], body: dict[str, Any],
                           meta: dict[str, Any], include_usage: bool) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancel = threading.Event()

        def emit(delta: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ("delta", delta))

        def work() -> None:
            try:
                result = chat(model, messages, body, wait=MAX_WAIT, emit=emit, cancel=cancel)
                loop.call_soon_threadsafe(queue.put_nowait, ("done", result))
            except NNFailure as exc:
                loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))
            except Exception as exc:  # never leave the client hanging
                loop.call_soon_threadsafe(queue.put_nowait, ("error", NNFailure(NNError.RUNTIME_ERROR, str(exc))))

        thread = threading.Thread(target=work, name="openai-stream", daemon=True)
        thread.start()
        kind, value = await queue.get()
        if kind == "error":  # failed before the first token: a plain HTTP error
            cancel.set()
            return self._failure(value)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)

        def chunk(delta: dict[str, Any], finish: Optional[str] = None) -> bytes:
            payload = {**meta, "object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            return f"data: {json.dumps(payload)}\n\n".encode()

        try:
            await resp.write(chunk({"role": "assistant", "content": ""}))
            while True:
                if kind == "delta":
                    await resp.write(chunk({"content": value}))
                elif kind == "done":
                    await resp.write(chunk({}, value.finish))
                    if include_usage:
                        usage = {**meta, "object": "chat.completion.chunk", "choices": [], "usage": _usage(value)}
                        await resp.write(f"data: {json.dumps(usage)}\n\n".encode())
                    break
                else:
                    err = {"error": {"message": value.message, "type": "server_error", "code": value.code.name.lower()}}
                    await resp.write(f"data: {json.dumps(err)}\n\n".encode())
                    break
                kind, value = await queue.get()
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            cancel.set()  # the client went away: stop generating, give the context back
            raise
        finally:
            cancel.set()
        await resp.write_eof()
        return resp

    # -- /v1/embeddings ----------------------------------------------------------------------

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str) for t in inputs):
            return _error(400, "`input` must be a string or a non-empty list of strings")
        if len(inputs) > MAX_INPUTS:
            return _error(400, f"at most {MAX_INPUTS} inputs per request")
        try:
            model = self._model(body.get("model"), "ggml")
            vectors, n_tokens = await asyncio.get_running_loop().run_in_executor(None, lambda: embed(model, inputs, wait=MAX_WAIT))
        except NNFailure as exc:
            return self._failure(exc)
        if body.get("encoding_format") == "base64":
            import base64

            import numpy as np

            data = [{"object": "embedding", "index": i, "embedding": base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()}
                    for i, v in enumerate(vectors)]
        else:
            data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
        return web.json_response({"object": "list", "data": data, "model": body["model"],
                                  "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})


def _usage(result: Completion) -> dict[str, int]:
    """OpenAI's `usage` of a finished generation, in the model's tokens."""
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}
