"""Continuous batching for one GGUF model: one llama.cpp context, several sequences, one decode a step.

Why: with a context per request, four runs on one model decode four single-token batches in turn and
compete for the same cores; a decode of four tokens costs little more than a decode of one, because
the weights are read once. So a `BatchScheduler` owns one context with `sequences` requests at once
(and a prefix cache of evaluated prompts, `prefix_cache`), and a thread that, every step, puts the next token of every generating request and a chunk of every new
prompt into one `llama_batch`, decodes it, and samples each request's token with that request's own
sampler chain (grammar, temperature, seed, penalties: the chain llama-cpp-python's `Llama.generate`
builds). Callers (`generation.BatchedGeneration`) read tokens from a queue of their own.

Guarantees: every generating request gets a token every step (no request waits more than one batch
step while it is active); a new prompt is evaluated at most `prefill_chunk` tokens a step while others
generate, so it does not stall them; a request that is cancelled (its caller's deadline passed, the
client went away, a stop string matched) leaves the batch at the next step and its sequence is free
for the next request at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional

import numpy

from .abi import NNError, NNFailure
from .ggml_params import InstanceParams, SamplingParams
from .llama_lib import load_llama_cpp
from .prefix_cache import PrefixCache

PENALTY_LAST_N = 64  # llama-cpp-python's last_n_tokens_size: the window repeat penalties look at
IDLE_EXIT = 30.0  # seconds without work before the scheduler thread ends (the context stays loaded)


def batching_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """GgmlModel's batching keyword arguments from a model's options (flows.yaml `models.*.options`):
    `batching` (on unless false), `sequences` (requests decoded together, 8), `kv-size` (the shared
    context's cells; default ctx-size x sequences, at most 16384) and `prefix-cache-mib` (the KV that
    finished prompts may keep for reuse, 256). A value of the wrong type is invalid_argument."""
    out: dict[str, Any] = {}
    for key, attr, kind, lo in (("batching", "batching", bool, None), ("sequences", "sequences", int, 1),
                                ("kv-size", "kv_size", int, 16), ("prefix-cache-mib", "cache_bytes", int, 0)):
        value = options.get(key, options.get(key.replace("-", "_")))
        if value is None:
            continue
        if kind is bool:
            if not isinstance(value, bool):
                raise NNFailure(NNError.INVALID_ARGUMENT, f"model option {key!r}: expected true or false")
        elif isinstance(value, bool) or not isinstance(value, int) or value < lo:  # type: ignore[operator]
            raise NNFailure(NNError.INVALID_ARGUMENT, f"model option {key!r}: expected an integer of at least {lo}")
        out[attr] = value << 20 if key == "prefix-cache-mib" else value
    return out


@dataclass(eq=False)
class SeqRequest:
    """One generation as the scheduler sees it. `out` yields sampled token ids, then an NNError (the
    end: END_OF_SEQUENCE, CONTEXT_FULL) or an NNFailure (llama.cpp failed)."""

    prompt: list[int]
    sampling: SamplingParams
    n_ctx: int  # the window prompt and answer share for this request
    grammar: Any = None  # a LlamaGrammar, already checked
    out: "queue.SimpleQueue[Any]" = field(default_factory=queue.SimpleQueue)
    cancelled: bool = False
    finished: bool = False
    submitted: float = field(default_factory=time.monotonic)
    admitted: Optional[float] = None
    reused: int = 0  # prompt tokens found in the prefix cache
    # scheduler-thread state
    slot: Any = None
    n_past: int = 0  # positions of the prompt (then the answer) evaluated in the slot
    last: Optional[int] = None  # the newest sampled token, evaluated in the next step
    n_gen: int = 0
    sampler: Any = None
    greedy: bool = False  # plain argmax: temp 0, no grammar, neutral penalties (see `_greedy`)


def _greedy(r: SeqRequest) -> bool:
    """Whether the request's sampler chain would reduce to an argmax over the logits: temperature 0,
    no grammar, and penalties that llama.cpp's penalties sampler skips (repeat 1, frequency and
    presence 0). Why: the chain copies all of the vocabulary's logits into a candidate array every
    token (262,144 for Gemma 3, about 0.24 ms a call, a few percent of a 4-sequence step), while
    numpy's argmax reads them in place and picks the same first maximum."""
    sp = r.sampling
    return (sp.temp == 0.0 and r.grammar is None and sp.repeat_penalty == 1.0 and sp.frequency_penalty == 0.0
            and sp.presence_penalty == 0.0)


@dataclass
class SchedulerStats:
    submitted: int = 0
    finished: int = 0
    cancelled: int = 0
    steps: int = 0
    batch_tokens_total: int = 0  # tokens decoded, prompt chunks included
    batch_sequences_total: int = 0  # sequences sampled, summed over steps
    last_batch_sequences: int = 0
    max_batch_sequences: int = 0
    tokens_generated: int = 0
    prompt_tokens_evaluated: int = 0
    decode_seconds_total: float = 0.0
    queue_wait_seconds_total: float = 0.0
    kv_full: int = 0


@contextlib.contextmanager
def _quiet_warnings() -> Iterator[None]:
    """Hide llama.cpp's warnings while the context is made: it warns that a context of several
    sequences is longer than the model was trained for, which is true of the cells, not of any one
    request (each is held to ctx-size), and would land on a guest's stderr."""
    if os.environ.get("WASMFLOW_NN_LOG"):
        yield
        return
    log = logging.getLogger("llama-cpp-python")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


class _Kv:
    """llama_memory_seq_* on one context, for `PrefixCache`."""

    def __init__(self, lc: Any, ctx: Any, mem: Any, unified: bool) -> None:
        self.lc, self.ctx, self.mem, self.unified = lc, ctx, mem, unified

    def rm(self, seq: int, p0: int, p1: int) -> bool:
        return bool(self.lc.llama_memory_seq_rm(self.mem, seq, p0, p1))

    def cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        if self.unified:  # cells are shared between sequences: nothing is copied
            self.lc.llama_memory_seq_cp(self.mem, src, dst, p0, p1)
            return
        # a KV stream per sequence: llama.cpp copies whole streams only, so copy, then cut the tail
        self.lc.llama_memory_seq_rm(self.mem, dst, -1, -1)
        self.lc.llama_memory_seq_cp(self.mem, src, dst, -1, -1)
        self.lc.llama_memory_seq_rm(self.mem, dst, p1, -1)

    def save(self, seq: int) -> Optional[tuple[Any, int]]:
        size = int(self.lc.llama_state_seq_get_size(self.ctx, seq))
        if size <= 0:
            return None
        blob = (ctypes.c_uint8 * size)()
        n = int(self.lc.llama_state_seq_get_data(self.ctx, blob, size, seq))
        return (blob, n) if n > 0 else None

    def load(self, seq: int, blob: Any, size: int) -> bool:
        return int(self.lc.llama_state_seq_set_data(self.ctx, blob, size, seq)) > 0


class BatchScheduler:
    """One llama context over the model at `path` with `sequences` concurrent requests.

    `kv_size` is the context's cell count, shared by all sequences (unified KV cache); each request
    is still held to `params.ctx_size`. `cache_bytes` bounds the saved KV states the prefix cache keeps.
    Loaded on first use; the decode thread runs while there is work.
    """

    def __init__(self, path: str, params: InstanceParams, sequences: int = 8, kv_size: Optional[int] = None,
                 cache_bytes: int = 256 << 20, prefill_chunk: int = 128, name: str = "", gate: Any = None) -> None:
        self.path = path
        self.params = params
        self.name = name or path
        self.sequences = max(1, sequences)
        # every request may use its whole ctx-size, so the shared cells are never fewer than that
        self.kv_size = max(params.ctx_size, kv_size or min(params.ctx_size * self.sequences, 16384))
        self.cache_bytes = max(0, cache_bytes)
        self.n_batch = max(1, params.batch_size)
        self.prefill_chunk = max(1, min(prefill_chunk, self.n_batch))
        self.stats = SchedulerStats()
        self._cond = threading.Condition()
        self._pending: list[SeqRequest] = []
        self._active: list[SeqRequest] = []
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self._load_lock = threading.Lock()
        self._ctx_lock = threading.Lock()  # the decode thread holds it while it uses the context
        self._model: Any = None
        self._ctx: Any = None
        self._batch: Any = None
        self.cache: Optional[PrefixCache] = None
        self.last_used = time.monotonic()
        # `gate` (the model's LlamaPool for these parameters) counts this context against the pool's
        # size while the scheduler has work, so `parallel:` still bounds the contexts of a model.
        self._gate = gate
        self._holding = False

    # -- loading -----------------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._ctx is not None

    def load(self) -> None:
        """Load the weights and make the context now (the same settings a pooled `Llama` gets, so a
        greedy answer is the one the single-stream path gives)."""
        with self._load_lock:
            if self._ctx is not None:
                return
            if self._closed:
                raise NNFailure(NNError.RUNTIME_ERROR, f"the scheduler of {self.name} is closed")
            lc = load_llama_cpp()
            from llama_cpp import _internals as internals

            p = self.params
            mparams = lc.llama_model_default_params()
            mparams.n_gpu_layers = 0x7FFFFFFF if p.n_gpu_layers == -1 else p.n_gpu_layers
            mparams.main_gpu = p.main_gpu
            try:
                model = internals.LlamaModel(path_model=self.path, params=mparams, verbose=False)
            except (ValueError, RuntimeError, OSError) as exc:
                raise NNFailure(NNError.INVALID_ARGUMENT, f"llama.cpp could not load {self.path}: {exc}") from None
            n_slots = min(self.sequences, int(lc.llama_max_parallel_sequences()))
            cparams = lc.llama_context_default_params()
            cparams.n_ctx = self.kv_size
            cparams.n_batch = self.n_batch
            cparams.n_ubatch = max(1, min(p.ubatch_size, self.n_batch))
            cparams.n_seq_max = n_slots
            cparams.kv_unified = True  # one pool of cells: prefixes are shared, not copied
            cparams.swa_full = True  # sliding-window models keep every position, so a prefix can be cut anywhere
            cparams.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as llama-cpp-python's Llama default
            cparams.n_threads = p.threads or max(multiprocessing.cpu_count() // 2, 1)
            cparams.n_threads_batch = p.threads or multiprocessing.cpu_count()
            try:
                with _quiet_warnings():
                    ctx = internals.LlamaContext(model=model, params=cparams, verbose=False)
            except (ValueError, RuntimeError) as exc:
                model.close()
                raise NNFailure(NNError.INVALID_ARGUMENT, f"llama.cpp could not make a context for {self.path}: {exc}") from None
            self._lc = lc
            self._model = model
            self.vocab = model.vocab
            self.n_vocab = int(lc.llama_vocab_n_tokens(model.vocab))
            self._batch = lc.llama_batch_init(self.n_batch, 0, 1)
            self._kv = _Kv(lc, ctx.ctx, ctx.memory, bool(cparams.kv_unified))
            self.cache = PrefixCache(n_slots, self.cache_bytes, self._kv)
            self._ctx = ctx

    # -- the callers' side -----------------------------------------------------------------------

    def submit(self, request: SeqRequest) -> SeqRequest:
        """Queue `request`; it joins the batch at the next step with a free sequence."""
        self.load()
        with self._cond:
            if self._closed:
                raise NNFailure(NNError.RUNTIME_ERROR, f"the scheduler of {self.name} is closed")
            self._pending.append(request)
            self.stats.submitted += 1
            self.last_used = time.monotonic()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=f"llm-batch-{self.name}", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return request

    def cancel(self, request: SeqRequest) -> None:
        """Stop `request`: it leaves the batch (and frees its sequence) before the next decode."""
        with self._cond:
            if request.finished:
                return
            request.cancelled = True
            if request in self._pending:
                self._pending.remove(request)
                request.finished = True
                self.stats.cancelled += 1
            self._cond.notify_all()

    def busy(self) -> int:
        with self._cond:
            return len(self._active)

    def waiting(self) -> int:
        with self._cond:
            return len(self._pending)

    def cache_state_bytes(self) -> int:
        """Host memory the prefix cache's saved states take (the sizes of the buffers it holds)."""
        if self.cache is None:
            return 0
        with self._cond:
            return sum(len(e.blob) for e in self.cache.saved)

    def snapshot(self) -> dict[str, Any]:
        """Figures for stats() and /metrics (a copy: read without holding up the decode thread)."""
        s = self.stats
        with self._cond:
            active, pending = len(self._active), len(self._pending)
        cache = self.cache.stats if self.cache is not None else None
        return {
            "sequences": self.sequences, "sequences_busy": active, "waiting": pending, "kv_size": self.kv_size,
            "submitted": s.submitted, "finished": s.finished, "cancelled": s.cancelled, "steps": s.steps,
            "tokens_generated": s.tokens_generated, "prompt_tokens_evaluated": s.prompt_tokens_evaluated,
            "batch_size_last": s.last_batch_sequences, "batch_size_max": s.max_batch_sequences,
            "batch_size_mean": round(s.batch_sequences_total / s.steps, 2) if s.steps else 0.0,
            "decode_seconds_total": round(s.decode_seconds_total, 4),
            "tokens_per_second": round(s.tokens_generated / s.decode_seconds_total, 1) if s.decode_seconds_total else 0.0,
            "queue_wait_seconds_total": round(s.queue_wait_seconds_total, 4), "kv_full": s.kv_full,
            "cache_hits": cache.hits if cache else 0, "cache_misses": cache.misses if cache else 0,
            "cache_saved_tokens": cache.saved_tokens if cache else 0, "cache_evictions": cache.evictions if cache else 0,
            "cache_tokens": self.cache.cached_tokens() if self.cache else 0,
            "cache_entries": len(self.cache.saved) if self.cache else 0,
            "cache_bytes": self.cache.cached_bytes() if self.cache else 0, "cache_budget_bytes": self.cache_bytes,
        }

    def idle(self) -> bool:
        with self._cond:
            return not self._active and not self._pending

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for r in self._pending + self._active:
                r.cancelled = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(30)
        with self._load_lock:
            if self._ctx is not None:
                for r in self._pending + self._active:
                    self._finish(r, NNFailure(NNError.RUNTIME_ERROR, "the model was unloaded"))
                self._lc.llama_batch_free(self._batch)
                self._ctx.close()
                self._model.close()
                self._ctx = None

    # -- the decode thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                idle_since = time.monotonic()
                while not self._closed and not self._pending and not self._active:
                    if self._holding:
                        self._gate.unreserve()
                        self._holding = False
                    left = IDLE_EXIT - (time.monotonic() - idle_since)
                    if left <= 0:
                        self._thread = None
                        return
                    self._cond.wait(left)
                if not self._closed and not self._holding and self._gate is not None:
                    self._cond.release()
                    try:
                        self._holding = self._gate.reserve(0.05)
                    finally:
                        self._cond.acquire()
                    if not self._holding:
                        continue  # the pool's contexts are all lent: wait (callers' deadlines still run)
                if self._closed:
                    for r in self._pending + self._active:
                        self._finish(r, NNFailure(NNError.RUNTIME_ERROR, "the model was unloaded"))
                    self._pending.clear()
                    self._active.clear()
                    if self._holding:
                        self._gate.unreserve()
                        self._holding = False
                    return
            try:
                with self._ctx_lock:
                    with self._cond:
                        self._admit()
                    self._step()
            except Exception as exc:  # never leave a caller waiting on a dead thread
                with self._cond:
                    for r in list(self._active):
                        self._end(r, NNFailure(NNError.RUNTIME_ERROR, f"batch decode failed: {exc}"))

    def _admit(self) -> None:
        """Drop cancelled requests, then give waiting ones a sequence (FIFO). Holds `_cond`."""
        assert self.cache is not None
        for r in [r for r in self._active if r.cancelled]:
            self.stats.cancelled += 1
            self._end(r, None)
        while self._pending and len(self._active) < self.sequences:
            r = self._pending[0]
            claim = self.cache.claim(r.prompt)
            if claim is None:
                break
            self._pending.pop(0)
            r.slot, r.reused = claim
            r.n_past = r.reused
            r.admitted = time.monotonic()
            self.stats.queue_wait_seconds_total += r.admitted - r.submitted
            r.greedy = _greedy(r)
            try:
                r.sampler = None if r.greedy else self._sampler(r)
            except Exception as exc:
                self._end(r, NNFailure(NNError.INVALID_ARGUMENT, f"cannot build the sampler: {exc}"))
                continue
            self._active.append(r)

    def _sampler(self, r: SeqRequest) -> Any:
        """The sampler chain of llama-cpp-python's `Llama._init_sampler` for these parameters."""
        from llama_cpp import _internals as internals

        sp = r.sampling
        chain = internals.LlamaSampler()
        chain.add_penalties(n_vocab=self.n_vocab, penalty_last_n=PENALTY_LAST_N, penalty_repeat=sp.repeat_penalty,
                            penalty_freq=sp.frequency_penalty, penalty_present=sp.presence_penalty)
        if r.grammar is not None:
            g = self._lc.llama_sampler_init_grammar(self.vocab, r.grammar._grammar.encode("utf-8"), r.grammar._root.encode("utf-8"))
            if not g:
                raise ValueError("llama.cpp cannot parse the grammar")
            self._lc.llama_sampler_chain_add(chain.sampler, g)
        seed = sp.seed & 0xFFFFFFFF
        if sp.temp < 0.0:
            chain.add_dist(seed)
        elif sp.temp == 0.0:
            chain.add_greedy()
        else:
            chain.add_top_k(sp.top_k)
            chain.add_typical(1.0, 1)
            chain.add_top_p(sp.top_p, 1)
            chain.add_min_p(sp.min_p, 1)
            chain.add_temp(sp.temp)
            chain.add_dist(seed)
        return chain

    def _step(self) -> None:
        """One llama_decode over every active request: a token each for those generating, prompt
        chunks for those still reading their prompt."""
        with self._cond:
            active = list(self._active)
        if not active:
            return
        lc, batch = self._lc, self._batch
        n = 0
        placed: list[tuple[SeqRequest, list[int], int]] = []  # request, tokens added, index of its logits or -1
        generating = [r for r in active if r.last is not None]
        for r in generating:
            self._put(n, r.last, r.n_past, r.slot.seq, True)  # type: ignore[arg-type]
            placed.append((r, [r.last], n))  # type: ignore[list-item]
            n += 1
        # While others generate, a prompt gets at most `prefill_chunk` tokens a step; alone, a full batch.
        room = self.n_batch - n if not generating else min(self.n_batch - n, self.prefill_chunk)
        for r in (r for r in active if r.last is None):
            if room <= 0:
                break
            chunk = r.prompt[r.n_past : r.n_past + room]
            last = r.n_past + len(chunk) == len(r.prompt)
            for i, tok in enumerate(chunk):
                self._put(n + i, tok, r.n_past + i, r.slot.seq, last and i == len(chunk) - 1)
            placed.append((r, chunk, n + len(chunk) - 1 if last else -1))
            n += len(chunk)
            room -= len(chunk)
        batch.n_tokens = n
        t0 = time.monotonic()
        ret = lc.llama_decode(self._ctx.ctx, batch)
        if ret == 1:  # no room in the KV cache (llama.cpp left it as it was): end the longest request
            self.stats.kv_full += 1
            with self._cond:
                victim = max(active, key=lambda r: r.n_past)
                self._end(victim, NNError.CONTEXT_FULL)
            return
        if ret != 0:
            raise RuntimeError(f"llama_decode returned {ret}")
        self.stats.decode_seconds_total += time.monotonic() - t0
        self.stats.steps += 1
        self.stats.batch_tokens_total += n
        sampled = 0
        for r, tokens, idx in placed:
            r.slot.tokens.extend(tokens)
            r.n_past += len(tokens)
            if r.last is None:
                self.stats.prompt_tokens_evaluated += len(tokens)
            if idx < 0:
                continue
            if r.greedy:
                token = int(numpy.ctypeslib.as_array(lc.llama_get_logits_ith(self._ctx.ctx, idx), shape=(self.n_vocab,)).argmax())
            else:
                token = int(lc.llama_sampler_sample(r.sampler.sampler, self._ctx.ctx, idx))
            sampled += 1
            r.last = token
            r.n_gen += 1
            self.stats.tokens_generated += 1
            r.out.put(token)
            eog = not r.sampling.ignore_eos and lc.llama_vocab_is_eog(self.vocab, token)
            if eog or 0 <= r.sampling.n_predict <= r.n_gen:
                with self._cond:
                    self._end(r, NNError.END_OF_SEQUENCE)
            elif len(r.prompt) + r.n_gen >= r.n_ctx:
                with self._cond:
                    self._end(r, NNError.CONTEXT_FULL)
        self.stats.last_batch_sequences = sampled
        self.stats.max_batch_sequences = max(self.stats.max_batch_sequences, sampled)
        self.stats.batch_sequences_total += sampled

    def _put(self, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        b = self._batch
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = 1 if logits else 0

    def _end(self, r: SeqRequest, result: Any) -> None:
        """Take `r` out of the batch and free its sequence (its KV stays as a prefix-cache entry).
        Holds `_cond`."""
        if r in self._active:
            self._active.remove(r)
        if r.slot is not None and self.cache is not None:
            self.cache.release(r.slot)
            r.slot = None
        if r.sampler is not None:
            r.sampler.close()
            r.sampler = None
        self._finish(r, result)
        self._cond.notify_all()

    def _finish(self, r: SeqRequest, result: Any) -> None:
        if not r.finished:
            r.finished = True
            self.stats.finished += 1
            r.out.put(result if result is not None else NNError.END_OF_SEQUENCE)
