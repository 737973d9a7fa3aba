"""The one token loop and the one embedding path for GGUF models.

WASI-NN (`ggml_backend.GgmlExecution`), the `llm_chat` / `llm_embed` host functions and the `/v1`
endpoints all generate through `Generation` and embed through `embed_tokens`, so the same model, text
and sampling parameters give the same tokens, the same token counts and the same (L2-normalised)
vectors whichever door a caller came in by. `complete` and `embed` are the request-level forms the
host functions and `/v1` use: they borrow a context, apply stop strings, and count tokens exactly.
"""

from __future__ import annotations

import codecs
import ctypes
import queue
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Mapping, Optional

from .abi import NNError, NNFailure, NNHalt
from .ggml_params import GgmlParams, SamplingParams, apply_metadata
from .batch_scheduler import BatchScheduler, SeqRequest
from .ggml_pool import Lease, borrow, load_llama_cpp

REPLY_TIMEOUT = 600.0  # seconds without a token from the scheduler before a caller with no deadline gives up


def token_piece(llama: Any, token: int) -> bytes:
    """The bytes of one token as llama.cpp renders it (special tokens rendered empty, like WasmEdge)."""
    return vocab_piece(llama._model.vocab, token)


def vocab_piece(vocab: Any, token: int) -> bytes:
    """`token_piece` for a vocabulary (a scheduler's model has no `Llama`), any length."""
    llama_cpp = load_llama_cpp()
    size = 64
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, False)
        if n >= 0:
            return buf.raw[:n]
        size = -n


def _grammar(sp: SamplingParams, llama: Any) -> Any:
    return checked_grammar(sp, llama._model.vocab)


def checked_grammar(sp: SamplingParams, vocab: Any) -> Any:
    """The LlamaGrammar for `grammar` / `json-schema`, checked first: llama-cpp-python hands a grammar
    that llama.cpp cannot parse to the sampler chain as a NULL sampler, which kills the process, so a
    guest's grammar is parsed here once and refused (invalid_argument) if llama.cpp returns NULL."""
    if not sp.grammar and not sp.json_schema:
        return None
    from llama_cpp.llama_grammar import LlamaGrammar

    try:
        if sp.grammar:
            grammar = LlamaGrammar.from_string(sp.grammar, verbose=False)
        else:
            grammar = LlamaGrammar.from_json_schema(sp.json_schema or "{}", verbose=False)
    except Exception as exc:
        raise NNFailure(NNError.INVALID_ARGUMENT, f"bad grammar or json-schema: {exc}") from None
    lc = load_llama_cpp()
    probe = lc.llama_sampler_init_grammar(vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8"))
    if not probe:
        raise NNFailure(NNError.INVALID_ARGUMENT, "llama.cpp cannot parse the grammar")
    lc.llama_sampler_free(probe)
    return grammar


class _TokenSteps:
    """What every generation checks around its source of tokens, in one order, so both give the
    same codes: prompt too long, n-predict, the run's deadline, a full window, end of generation,
    reverse prompt. Subclasses say how to start (`_started`, `_start`), where the next token comes from
    (`_next_token`: a token id, or the NNError that ends the generation) and what ending does (`_ended`)."""

    prompt: list[int]
    sp: SamplingParams
    n_ctx: int
    tokens: list[int]
    text: bytearray
    done: Optional[NNError]
    deadline: Optional[Callable[[], float]]
    _lc: Any
    _buf: Any

    def _started(self) -> bool:
        raise NotImplementedError

    def _start(self) -> None:
        raise NotImplementedError

    def _next_token(self) -> "int | NNError":
        raise NotImplementedError

    def _vocab(self) -> Any:
        raise NotImplementedError

    def _ended(self) -> None:
        return None

    def _stop(self, code: NNError) -> tuple[NNError, bytes]:
        self.done = code
        self._ended()
        return code, b""

    def step(self) -> tuple[NNError, bytes]:
        """(SUCCESS, the newest token's bytes), or the code that ends the generation with no bytes."""
        if self.done is not None:
            return self.done, b""
        if not self._started():
            if not self.prompt:
                raise NNFailure(NNError.INVALID_ARGUMENT, "llama input is not set")
            if len(self.prompt) > self.n_ctx - 4:  # WasmEdge keeps 4 positions for special tokens
                return self._stop(NNError.PROMPT_TOO_LONG)
            self._start()
        if 0 <= self.sp.n_predict <= len(self.tokens):
            return self._stop(NNError.END_OF_SEQUENCE)
        self.check_deadline("generation")
        if len(self.prompt) + len(self.tokens) >= self.n_ctx:  # prompt and answer share the window
            return self._stop(NNError.CONTEXT_FULL)
        token = self._next_token()
        if isinstance(token, NNError):
            return self._stop(token)
        vocab = self._vocab()
        if not self.sp.ignore_eos and self._lc.llama_vocab_is_eog(vocab, token):
            return self._stop(NNError.END_OF_SEQUENCE)
        n = self._lc.llama_token_to_piece(vocab, token, self._buf, 256, 0, False)
        piece = self._buf.raw[:n] if 0 <= n <= 256 else vocab_piece(vocab, token)
        self.tokens.append(token)
        self.text += piece
        if self.sp.reverse_prompt and self.sp.reverse_prompt.encode() in self.text[-(len(self.sp.reverse_prompt.encode()) + len(piece)):]:
            self.done = NNError.END_OF_SEQUENCE  # this token still counts and is returned
            self._ended()
        return NNError.SUCCESS, piece

    def check_deadline(self, what: str) -> None:
        raise NotImplementedError


class Generation(_TokenSteps):
    """One generation on a borrowed llama instance, a token at a time.

    `step()` returns (code, piece): code 0 with the newest token's bytes, or END_OF_SEQUENCE /
    CONTEXT_FULL / PROMPT_TOO_LONG to stop. One-shot `compute` is a loop over `step()`, so streaming
    concatenated equals non-streaming by construction, and both are llama-cpp-python's own
    `Llama.generate` (the same sampler chain a direct caller gets).
    """

    def __init__(self, llama: Any, prompt: list[int], sp: SamplingParams, n_ctx: Optional[int] = None,
                 deadline: Optional[Callable[[], float]] = None) -> None:
        self.llama = llama
        self.prompt = prompt
        self.sp = sp
        self.deadline = deadline  # seconds left in the run; checked between decode steps
        # llama.cpp pads a context to a multiple of 256; the limit a guest asked for is the one it gets.
        self.n_ctx = min(int(llama.n_ctx()), n_ctx) if n_ctx else int(llama.n_ctx())
        self.tokens: list[int] = []
        self.text = bytearray()
        self._gen: Optional[Iterator[int]] = None
        self.done: Optional[NNError] = None
        # Per-token work on the host is two C calls: keep their arguments at hand.
        self._lc = load_llama_cpp()
        self._vocab_ptr = llama._model.vocab
        self._buf = ctypes.create_string_buffer(256)

    def _started(self) -> bool:
        return self._gen is not None

    def _start(self) -> None:
        llama, sp = self.llama, self.sp
        llama.reset()
        llama.set_seed(sp.seed)
        self._prefill()
        self._gen = llama.generate(
            self.prompt,
            top_k=sp.top_k,
            top_p=sp.top_p,
            min_p=sp.min_p,
            temp=sp.temp,
            repeat_penalty=sp.repeat_penalty,
            presence_penalty=sp.presence_penalty,
            frequency_penalty=sp.frequency_penalty,
            grammar=_grammar(sp, llama),
            reset=True,
        )

    def _next_token(self) -> "int | NNError":
        assert self._gen is not None
        try:
            return next(self._gen)
        except StopIteration:
            return NNError.END_OF_SEQUENCE
        except RuntimeError as exc:  # llama_decode failed
            raise NNFailure(NNError.RUNTIME_ERROR, f"llama_decode failed: {exc}") from None

    def _vocab(self) -> Any:
        return self._vocab_ptr

    def check_deadline(self, what: str) -> None:
        if self.deadline is not None and self.deadline() <= 0:
            raise NNHalt("timeout", f"the run's deadline passed during {what}")

    def _prefill(self) -> None:
        """Evaluate a long prompt a batch at a time, checking the deadline between batches, so a long
        prompt overruns the deadline by one batch at most. Only whole batches before the last are
        evaluated here: `generate` finds them cached and evaluates the rest, so the batches (and the
        numbers) are those of one `eval` of the whole prompt."""
        n_batch = max(1, int(self.llama.n_batch))
        full = (len(self.prompt) - 1) // n_batch * n_batch
        for start in range(0, full, n_batch):
            self.check_deadline("prompt evaluation")
            self.llama.eval(self.prompt[start : start + n_batch])

    def close(self) -> None:
        if self._gen is not None:
            try:
                self._gen.close()  # type: ignore[attr-defined]
            except Exception:
                pass
            self._gen = None


class BatchedGeneration(_TokenSteps):
    """`Generation`'s interface (step / tokens / text / done / close) over a `BatchScheduler`: the
    request joins the model's shared batch and this side reads its tokens as they come.

    The same checks as `Generation`, in the same order (prompt too long, n-predict, the run's
    deadline, a full window, end of generation, reverse prompt), so the two give the same codes. The
    run's deadline bounds every wait for a token: when it passes, the request is cancelled (its
    sequence is free at the next batch step) and the run ends `timeout`."""

    def __init__(self, scheduler: BatchScheduler, prompt: list[int], sp: SamplingParams, n_ctx: Optional[int] = None,
                 deadline: Optional[Callable[[], float]] = None, model: Any = None, wait: float = REPLY_TIMEOUT) -> None:
        self.scheduler = scheduler
        self.wait = wait  # seconds the request may queue for a sequence (busy after that)
        self.prompt = prompt
        self.sp = sp
        self.deadline = deadline
        limit = scheduler.params.ctx_size
        self.n_ctx = min(limit, n_ctx) if n_ctx else limit
        self.tokens: list[int] = []
        self.text = bytearray()
        self.done: Optional[NNError] = None
        self.request: Optional[SeqRequest] = None
        self.reused = 0  # prompt tokens the prefix cache supplied (known once the request has ended)
        self._model = model  # the GgmlModel, told when a generation opens and closes (its `busy`)
        self._lc = load_llama_cpp()
        self._buf = ctypes.create_string_buffer(256)

    def _start(self) -> None:
        self.scheduler.load()
        grammar = checked_grammar(self.sp, self.scheduler.vocab)
        self.check_deadline("prompt evaluation")
        self.request = self.scheduler.submit(SeqRequest(list(self.prompt), self.sp, self.n_ctx, grammar))
        if self._model is not None:
            self._model.generation_opened()

    def _started(self) -> bool:
        return self.request is not None

    def _next_token(self) -> "int | NNError":
        item = self._next()
        if isinstance(item, NNFailure):
            self.close()
            raise item
        return item if isinstance(item, NNError) else int(item)

    def _vocab(self) -> Any:
        return self.scheduler.vocab

    def _ended(self) -> None:
        self.close()

    def _next(self) -> Any:
        """The next item from the scheduler, waiting no longer than the run has left."""
        assert self.request is not None
        req = self.request
        what = "generation" if self.tokens else "prompt evaluation"
        start = time.monotonic()
        while True:
            left = REPLY_TIMEOUT - (time.monotonic() - start)
            if self.deadline is not None:
                left = min(left, self.deadline())
            queued = req.admitted is None
            if queued:  # still waiting for a sequence: the caller's wait bounds that too
                left = min(left, self.wait - (time.monotonic() - req.submitted))
            try:
                return req.out.get(timeout=max(0.0, min(left, 0.25)))
            except queue.Empty:
                pass
            if left > 0.25:
                continue
            run_left = self.deadline() if self.deadline is not None else 1.0
            if queued and req.admitted is not None and run_left > 0:
                continue  # it got a sequence just now: the queueing limit no longer applies
            self.close()
            if self.deadline is not None and self.deadline() <= 0:
                raise NNHalt("timeout", f"the run's deadline passed during {what}") from None
            if queued and req.admitted is None:
                raise NNFailure(NNError.BUSY, f"no free sequence of {self.scheduler.name} within {self.wait:.1f}s") from None
            raise NNFailure(NNError.RUNTIME_ERROR, f"no token from the batch scheduler in {REPLY_TIMEOUT:.0f}s") from None

    def check_deadline(self, what: str) -> None:
        if self.deadline is not None and self.deadline() <= 0:
            self.close()
            raise NNHalt("timeout", f"the run's deadline passed during {what}")

    def close(self) -> None:
        """Leave the batch now (a no-op once the request ended by itself)."""
        req, self.request = self.request, None
        if req is not None:
            self.scheduler.cancel(req)
            self.reused = req.reused
            if self._model is not None:
                self._model.generation_closed()
        if self.done is None and req is not None:
            self.done = NNError.END_OF_SEQUENCE



class Stream:
    """A generation and what it holds (a pooled context's lease, or nothing on a scheduler), so the
    callers (`GgmlExecution`, `complete`) treat both paths alike."""

    def __init__(self, gen: Any, lease: Optional[Lease] = None) -> None:
        self.gen = gen
        self.lease = lease

    def close(self) -> None:
        self.gen.close()
        if self.lease is not None:
            lease, self.lease = self.lease, None
            lease.release()


def open_generation(model: Any, params: GgmlParams, prompt: list[int], wait: float,
                    deadline: Optional[Callable[[], float]] = None, memory: Optional[int] = None) -> Stream:
    """A generation of `prompt` on `model` (a GgmlModel): on the model's batch scheduler where it has
    one, else on a context borrowed from its pool for as long as the stream is open."""
    sched = model.scheduler(params.instance)
    if sched is not None:
        if deadline is not None and deadline() <= 0:
            raise NNHalt("timeout", f"the run's deadline passed before the generation on {model.name} started")
        return Stream(BatchedGeneration(sched, prompt, params.sampling, params.instance.ctx_size, deadline, model, wait))
    lease = borrow(model, params.instance, wait, deadline, memory)
    return Stream(Generation(lease.llama, prompt, params.sampling, params.instance.ctx_size, deadline), lease)


def embed_tokens(llama: Any, tokens: list[int], deadline: Optional[Callable[[], float]] = None) -> list[float]:
    """Sentence embedding of one token sequence (the model's pooling), L2-normalised like WasmEdge.
    One decode of at most a batch; it does not start once the run's deadline has passed."""
    llama_cpp = load_llama_cpp()
    import numpy as np

    if deadline is not None and deadline() <= 0:
        raise NNHalt("timeout", "the run's deadline passed before the embedding")
    if not tokens:
        raise NNFailure(NNError.INVALID_ARGUMENT, "nothing to embed: the text has no tokens")
    if len(tokens) > llama.n_batch:
        raise NNFailure(NNError.PROMPT_TOO_LONG, f"{len(tokens)} tokens exceed the batch size {llama.n_batch}")
    n_embd = llama.n_embd()
    llama._ctx.kv_cache_clear()
    llama._batch.reset()
    llama._batch.add_sequence(tokens, 0, True)
    try:
        llama._ctx.decode(llama._batch)
    except RuntimeError as exc:
        raise NNFailure(NNError.RUNTIME_ERROR, f"llama_decode failed: {exc}") from None
    finally:
        llama._batch.reset()
    if llama.pooling_type() == llama_cpp.LLAMA_POOLING_TYPE_NONE:
        ptr = llama_cpp.llama_get_embeddings(llama._ctx.ctx)
        vec = np.ctypeslib.as_array(ptr, shape=(len(tokens) * n_embd,)).reshape(len(tokens), n_embd).mean(axis=0)
    else:
        ptr = llama_cpp.llama_get_embeddings_seq(llama._ctx.ctx, 0)
        vec = np.ctypeslib.as_array(ptr, shape=(n_embd,)).copy()
    llama._ctx.kv_cache_clear()
    llama.reset()
    norm = float(np.linalg.norm(vec))
    if norm > 0:
        vec = vec / norm
    return [float(x) for x in vec]



# ---------------------------------------------------------------------------------------------
# Request level: what `llm_chat`, `llm_embed` and `/v1` call


# OpenAI request key -> GGML metadata key (the last four as llama.cpp's server takes them)
_CHAT_KEYS = {"temperature": "temp", "top_p": "top-p", "seed": "seed", "presence_penalty": "presence-penalty",
              "frequency_penalty": "frequency-penalty", "top_k": "top-k", "min_p": "min-p",
              "repeat_penalty": "repeat-penalty", "ignore_eos": "ignore-eos"}


def chat_params(base: GgmlParams, request: Mapping[str, Any]) -> GgmlParams:
    """The parameters of an OpenAI-style chat request over a model's base parameters: one mapping for
    `llm_chat` and `/v1/chat/completions`. `max_tokens` (or `max_completion_tokens`) is `n-predict`;
    `response_format` json_object / json_schema becomes a grammar. A value of the wrong type is
    invalid_argument, as in a guest's metadata."""
    meta: dict[str, Any] = {meta_key: request[key] for key, meta_key in _CHAT_KEYS.items() if request.get(key) is not None}
    max_tokens = request.get("max_completion_tokens", request.get("max_tokens"))
    meta["n-predict"] = -1 if max_tokens is None else max_tokens
    fmt = request.get("response_format") or {}
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(fmt.get("json_schema"), dict):
        meta["json-schema"] = fmt["json_schema"].get("schema") or {}
    elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
        meta["json-schema"] = {"type": "object"}
    params = apply_metadata(base, meta)
    return replace(params, instance=replace(params.instance, embedding=False))


@dataclass
class Completion:
    """One finished generation, counted in the model's tokens (not in text chunks)."""

    text: str
    finish: str  # "stop", "length" (n-predict or a full context) or "time" (the caller's time limit)
    prompt_tokens: int
    completion_tokens: int


def complete(model: Any, params: GgmlParams, prompt: list[int], stops: list[str], *, wait: float,
             deadline: Optional[Callable[[], float]] = None, stop_at: Optional[float] = None,
             emit: Optional[Callable[[str], None]] = None, cancel: Optional[threading.Event] = None) -> Completion:
    """Generate from the tokens `prompt` on `model` (a GgmlModel: its batch scheduler, or a borrowed
    context) until a stop string, end of generation, n-predict or a full context.

    `deadline` is the run's (passing it ends the run `timeout`: the generation checks it between decode
    steps); `stop_at` a time.monotonic() instant after which the answer ends early with finish "time";
    `emit` receives text as it becomes final (held back while it might start a stop string); `cancel`
    stops at the next token. Text is decoded incrementally, so a character split across tokens is whole."""
    stream = open_generation(model, params, prompt, wait, deadline)
    gen = stream.gen
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    text, sent, finish, hit = "", 0, "stop", None  # sent: characters of `text` already emitted
    hold = max((len(s) - 1 for s in stops), default=0)
    try:
        while cancel is None or not cancel.is_set():
            code, piece = gen.step()
            if code == NNError.PROMPT_TOO_LONG:
                raise NNFailure(NNError.PROMPT_TOO_LONG, f"the prompt has {len(prompt)} tokens; the context holds {gen.n_ctx - 4}")
            if piece:
                text += decoder.decode(piece)
            hit = next((text.index(s) for s in stops if s in text), None)
            if hit is not None:
                text = text[:hit]
                break
            if code != NNError.SUCCESS:
                limited = code == NNError.CONTEXT_FULL or 0 <= params.sampling.n_predict <= len(gen.tokens)
                finish = "length" if limited else "stop"
                break
            if stop_at is not None and time.monotonic() >= stop_at:
                finish = "time"
                break
            if emit is not None and len(text) - hold > sent:
                emit(text[sent : len(text) - hold])
                sent = len(text) - hold
        if hit is None:
            text += decoder.decode(b"", final=True)
        if emit is not None and len(text) > sent:
            emit(text[sent:])
        return Completion(text, finish, len(prompt), len(gen.tokens))
    finally:
        stream.close()


def chat(model: Any, messages: list[dict[str, Any]], request: Mapping[str, Any], *, wait: float,
         chat_format: Optional[str] = None, deadline: Optional[Callable[[], float]] = None,
         stop_at: Optional[float] = None, emit: Optional[Callable[[str], None]] = None,
         cancel: Optional[threading.Event] = None) -> Completion:
    """An OpenAI-style chat request on a local GGUF model: the model's chat prompt (`chat_prompt`),
    tokenized as WASI-NN tokenizes, the request's sampling (`chat_params`), its `stop` strings and the
    format's, then `complete`. `llm_chat` and `/v1/chat/completions` both end here."""
    params = chat_params(model.base, request)
    prompt, stops = model.chat_prompt(messages, chat_format)
    stop = request.get("stop") or []
    if not isinstance(stop, (str, list)) or not all(isinstance(s, str) for s in ([stop] if isinstance(stop, str) else stop)):
        raise NNFailure(NNError.INVALID_ARGUMENT, "`stop` must be a string or a list of strings")
    asked = [stop] if isinstance(stop, str) else list(stop)
    tokens = model.tokenize(prompt.encode())
    return complete(model, params, tokens, [s for s in asked + stops if s], wait=wait, deadline=deadline,
                    stop_at=stop_at, emit=emit, cancel=cancel)


def embed(model: Any, texts: list[str], *, wait: float,
          deadline: Optional[Callable[[], float]] = None) -> tuple[list[list[float]], int]:
    """Sentence embeddings of `texts` on `model` (a GgmlModel) and the number of tokens they took:
    the texts tokenized as WASI-NN tokenizes a prompt, one `embed_tokens` each on one borrowed
    embedding context, so a vector equals what a WASI-NN guest gets for the same text."""
    instance = replace(model.base.instance, embedding=True)
    token_lists = [model.tokenize(text.encode()) for text in texts]
    with borrow(model, instance, wait, deadline) as lease:
        return [embed_tokens(lease.llama, tokens, deadline) for tokens in token_lists], sum(map(len, token_lists))
