"""The local route of the `llm` capability (`llm_chat` / `llm_embed` on a GGUF model of `models:`).

It lives in the WASI-NN package, not in `host_functions/llm.py`, so that the host functions reach the
one generation and embedding path of `generation` through the registry they are handed
(`ModelRegistry.run_chat` / `run_embed`) without importing this higher layer. Here the back end's errors
become the host-function vocabulary: a passed deadline ends the run (`RunContext.halt`), anything
else is a `HostError` code with a message that says what to change.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from wasmflow.host_functions.spec import Code, HostError, RunContext

from .abi import NNError, NNFailure, NNHalt
from .generation import chat, embed

_CODES = {NNError.PROMPT_TOO_LONG: Code.TOO_LARGE, NNError.CONTEXT_FULL: Code.TOO_LARGE, NNError.TOO_LARGE: Code.TOO_LARGE,
          NNError.INVALID_ARGUMENT: Code.INVALID, NNError.INVALID_ENCODING: Code.INVALID, NNError.BUSY: Code.UPSTREAM,
          NNError.MODEL_NOT_FOUND: Code.NOT_FOUND, NNError.NOT_FOUND: Code.NOT_FOUND}


def _host_error(run: RunContext, exc: NNFailure, what: str) -> HostError:
    if isinstance(exc, NNHalt):
        return run.halt(exc.status, f"llm {what}: {exc.message}")
    code = _CODES.get(exc.code, Code.INTERNAL)
    message = f"llm {what}: {exc.message}"
    if code == Code.TOO_LARGE:
        message += "; shorten the prompt or raise the model's ctx-size in flows.yaml"
    return HostError(code, message)


def run_chat(model: Any, run: RunContext, messages: list[dict[str, Any]], request: dict[str, Any],
             chat_format: Optional[str], timeout: float) -> dict[str, Any]:
    """`generation.chat` for a run: the run's deadline is checked between decode steps (the run ends
    `timeout`), and `timeout` (the endpoint's) ends the answer early with finish_reason "time"."""
    try:
        result = chat(model, messages, request, wait=run.remaining(), deadline=run.remaining, chat_format=chat_format,
                      stop_at=time.monotonic() + timeout)
    except NNFailure as exc:
        raise _host_error(run, exc, "chat") from None
    return {"content": result.text, "finish_reason": result.finish,
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens}}


def run_embed(model: Any, run: RunContext, texts: list[str]) -> list[list[float]]:
    """`generation.embed` for a run: L2-normalised vectors, the run's deadline checked before each text."""
    try:
        vectors, _ = embed(model, texts, wait=run.remaining(), deadline=run.remaining)
    except NNFailure as exc:
        raise _host_error(run, exc, "embeddings") from None
    return vectors
