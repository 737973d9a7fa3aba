"""A loopback stand-in for an OpenAI-compatible API (`/v1/chat/completions`, `/v1/embeddings`, `/v1/models`).

OpenAI's API is beyond a test machine's network, so tests of the LLM host functions talk to this
server through the real `openai` client. It answers with what a test's `responder` returns, checks the
bearer key, records every request, streams SSE when asked, and can be told to fail (`fail_next`) or be
stopped to test "endpoint down".
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import threading
import time
import uuid
from typing import Any, Callable, Optional

from aiohttp import web

from wasmflow.loopback import LoopbackServer

JSON_BODY = web.RequestKey("json_body", object)  # the parsed request body, set by the middleware

Responder = Callable[[list[dict[str, Any]], dict[str, Any]], str]


def echo_responder(messages: list[dict[str, Any]], request: dict[str, Any]) -> str:
    """Default answer: a short summary naming the last message's length (deterministic)."""
    last = str(messages[-1].get("content", "")) if messages else ""
    return f"Reviewed {len(last)} characters."


def hashed_embedding(text: str, dims: int = 64) -> list[float]:
    """A deterministic bag-of-words vector: texts sharing words get similar vectors."""
    vec = [0.0] * dims
    for word in text.lower().split():
        h = int(hashlib.md5(word.strip(".,:;!?()[]{}\"'").encode()).hexdigest(), 16)
        vec[h % dims] += 1.0
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


class OpenAIStandin(LoopbackServer):
    def __init__(self, responder: Responder = echo_responder, api_key: Optional[str] = "sk-test",
                 model: str = "standin-chat", host: str = "127.0.0.1", port: int = 0) -> None:
        self.responder = responder
        self.api_key = api_key
        self.model = model
        super().__init__(host, port)
        self.requests: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self.delay = 0.0
        self._lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def fail_next(self, status: int = 503, times: int = 1, message: str = "overloaded") -> None:
        with self._lock:
            self.failures.append({"status": status, "times": times, "message": message})

    def chat_requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests if r["path"].endswith("/chat/completions")]

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=32 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.h_chat)
        app.router.add_post("/v1/embeddings", self.h_embeddings)
        app.router.add_get("/v1/models", self.h_models)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else None
        with self._lock:
            self.requests.append({"path": request.path, "body": body, "auth": request.headers.get("Authorization")})
        if self.api_key is not None and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                                "code": "invalid_api_key"}}, status=401)
        with self._lock:
            for failure in self.failures:
                if failure["times"] > 0:
                    failure["times"] -= 1
                    return web.json_response({"error": {"message": failure["message"], "type": "server_error"}},
                                             status=failure["status"])
        if self.delay:
            await asyncio.sleep(self.delay)
        request[JSON_BODY] = body
        return await handler(request)

    async def h_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model", "created": 0,
                                                              "owned_by": "wasmflow-standin"}]})

    async def h_chat(self, request: web.Request) -> web.StreamResponse:
        data = request[JSON_BODY] or {}
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            return web.json_response({"error": {"message": "messages is required", "type": "invalid_request_error"}},
                                     status=400)
        text = await asyncio.get_running_loop().run_in_executor(None, self.responder, messages, data)
        prompt_tokens = sum(len(str(m.get("content", ""))) // 4 for m in messages)
        completion_tokens = max(1, len(text) // 4)
        cid = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        created = int(time.time())
        model = data.get("model") or self.model
        if data.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(0, len(text), 16):
                chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                         "choices": [{"index": 0, "delta": {"content": text[i:i + 16]}, "finish_reason": None}]}
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            end = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            await resp.write(f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode())
            await resp.write_eof()
            return resp
        return web.json_response({
            "id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                         "logprobs": None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })

    async def h_embeddings(self, request: web.Request) -> web.Response:
        data = request[JSON_BODY] or {}
        inputs = data.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            return web.json_response({"error": {"message": "input is required", "type": "invalid_request_error"}},
                                     status=400)
        vectors = [hashed_embedding(str(t)) for t in inputs]
        return web.json_response({"object": "list", "model": data.get("model") or "standin-embed",
                                  "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                                  "usage": {"prompt_tokens": sum(len(str(t)) // 4 for t in inputs),
                                            "total_tokens": sum(len(str(t)) // 4 for t in inputs)}})
