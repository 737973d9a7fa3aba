"""OpenAI-compatible endpoints over the WASI-NN model registry: `/v1/models`, `/v1/chat/completions`
(with SSE streaming and usage) and `/v1/embeddings`.

They serve the very objects guests use (`ModelRegistry`), so a model is loaded once per process whether
a guest or an HTTP client asks for it, and both queue on the same llama contexts. Generation runs in a
worker thread through the same token loop as WASI-NN's `compute_single` (`ggml_backend.Generation`), so
`usage` counts are exact and a streamed answer equals a non-streamed one.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import threading
import time
import uuid
from dataclasses import replace
from typing import Any, Callable, Optional

from aiohttp import web

from wasmflow.wasi_nn.abi import NNError, NNFailure

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

    def _sampling(self, model: Any, body: dict[str, Any]) -> Any:
        from wasmflow.wasi_nn.ggml_backend import apply_metadata

        meta: dict[str, Any] = {}
        mapping = {"temperature": "temp", "top_p": "top-p", "seed": "seed", "presence_penalty": "presence-penalty",
                   "frequency_penalty": "frequency-penalty", "top_k": "top-k", "min_p": "min-p", "repeat_penalty": "repeat-penalty",
                   "ignore_eos": "ignore-eos"}  # the last three as llama.cpp's server takes them
        for key, meta_key in mapping.items():
            if body.get(key) is not None:
                meta[meta_key] = body[key]
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        meta["n-predict"] = -1 if max_tokens is None else max_tokens
        fmt = body.get("response_format") or {}
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(fmt.get("json_schema"), dict):
            meta["json-schema"] = fmt["json_schema"].get("schema") or {}
        elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
            meta["json-schema"] = {"type": "object"}
        params = apply_metadata(model.base, meta)
        return replace(params, instance=replace(params.instance, embedding=False))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            return _error(400, "`messages` must be a non-empty list of objects")
        for m in messages:  # content may be a list of parts: keep the text parts
            if isinstance(m.get("content"), list):
                m["content"] = "".join(p.get("text", "") for p in m["content"] if isinstance(p, dict))
        stop = body.get("stop") or []
        stops = [stop] if isinstance(stop, str) else [s for s in stop if isinstance(s, str)]
        try:
            model = self._model(body.get("model"), "ggml")
            params = self._sampling(model, body)
            prompt, template_stops = await asyncio.get_running_loop().run_in_executor(None, model.chat_prompt, messages)
            tokens = await asyncio.get_running_loop().run_in_executor(None, model.tokenize, prompt.encode())
        except NNFailure as exc:
            return self._failure(exc)
        stops = [s for s in stops + template_stops if s]
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": body["model"]}
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if body.get("stream"):
            return await self._chat_stream(request, model, params, tokens, stops, meta, include_usage)
        try:
            text, finish, n_out = await asyncio.get_running_loop().run_in_executor(
                None, lambda: self._generate(model, params, tokens, stops, None, threading.Event()))
        except NNFailure as exc:
            return self._failure(exc)
        return web.json_response({
            **meta, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}],
            "usage": {"prompt_tokens": len(tokens), "completion_tokens": n_out, "total_tokens": len(tokens) + n_out},
        })

    def _generate(self, model: Any, params: Any, tokens: list[int], stops: list[str],
                  emit: Optional[Callable[[str], None]], cancel: threading.Event) -> tuple[str, str, int]:
        """Run one generation on a borrowed context; returns (text, finish_reason, completion tokens)."""
        from wasmflow.wasi_nn.ggml_backend import Generation

        pool = model.pool(params.instance)
        llama = pool.acquire(MAX_WAIT)
        gen = Generation(llama, tokens, params.sampling, params.instance.ctx_size)
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        text = ""
        sent = 0  # characters of `text` already emitted (held back while they might start a stop string)
        finish = "stop"
        try:
            while not cancel.is_set():
                code, piece = gen.step()
                if code == NNError.PROMPT_TOO_LONG:
                    raise NNFailure(NNError.PROMPT_TOO_LONG, f"the prompt has {len(tokens)} tokens; the context holds {gen.n_ctx - 4}")
                if piece:
                    text += decoder.decode(piece)
                hit = next((text.index(s) for s in stops if s in text), None)
                if hit is not None:
                    text = text[:hit]
                    break
                if code != NNError.SUCCESS:
                    finish = "length" if code == NNError.CONTEXT_FULL or (0 <= params.sampling.n_predict <= len(gen.tokens)) else "stop"
                    break
                if emit is not None:
                    hold = max((len(s) - 1 for s in stops), default=0)
                    safe = len(text) - hold
                    if safe > sent:
                        emit(text[sent:safe])
                        sent = safe
            text += decoder.decode(b"", final=True) if hit is None else ""
            if emit is not None and len(text) > sent:
                emit(text[sent:])
            return text, finish, len(gen.tokens)
        finally:
            gen.close()
            pool.release(llama)

    async def _chat_stream(self, request: web.Request, model: Any, params: Any, tokens: list[int], stops: list[str],
                           meta: dict[str, Any], include_usage: bool) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancel = threading.Event()

        def emit(delta: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ("delta", delta))

        def work() -> None:
            try:
                result = self._generate(model, params, tokens, stops, emit, cancel)
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
                    _, finish, n_out = value
                    await resp.write(chunk({}, finish))
                    if include_usage:
                        usage = {**meta, "object": "chat.completion.chunk", "choices": [],
                                 "usage": {"prompt_tokens": len(tokens), "completion_tokens": n_out, "total_tokens": len(tokens) + n_out}}
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
            vectors, n_tokens = await asyncio.get_running_loop().run_in_executor(None, self._embed, model, inputs)
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

    def _embed(self, model: Any, inputs: list[str]) -> tuple[list[list[float]], int]:
        from wasmflow.wasi_nn.ggml_backend import embed_tokens

        instance = replace(model.base.instance, embedding=True)
        pool = model.pool(instance)
        token_lists = [model.tokenize(text.encode()) for text in inputs]
        llama = pool.acquire(MAX_WAIT)
        try:
            return [embed_tokens(llama, toks) for toks in token_lists], sum(len(t) for t in token_lists)
        finally:
            pool.release(llama)
