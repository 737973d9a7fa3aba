"""Process-wide GGML state: models, their batch schedulers and their pools of llama contexts.

A `GgmlModel` per registered model holds, per distinct set of *instance* parameters (n-gpu-layers,
ctx-size, embedding, ...), a `BatchScheduler` (one context shared by every generation, see
`batch_scheduler`) and a small pool of `llama_cpp.Llama` instances (embeddings, guests' own GGUFs,
models with batching off; the scheduler's context counts against the pool's size). The weights are
mmapped, so a second context costs its KV cache, not another copy of the model. A pooled instance is
borrowed (`borrow`) for the length of a compute, of a whole streaming session or of one chat /
embedding request, which keeps two callers from interleaving tokens in one llama context.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

from .abi import NNError, NNFailure, NNHalt
from .batch_scheduler import BatchScheduler
from .ggml_params import GgmlParams, InstanceParams
from .llama_lib import load_llama_cpp

LLAMA_BUILD_NUMBER = 0  # llama-cpp-python does not expose llama.cpp's build number; see llama_commit


def llama_commit() -> str:
    """What output 1 reports as `llama_commit`: the llama-cpp-python version that bundles llama.cpp."""
    try:
        from importlib.metadata import version

        return f"llama-cpp-python-{version('llama-cpp-python')}"
    except Exception:
        return "unknown"


def gpu_offload_supported() -> bool:
    """True when llama-cpp-python was built with a GPU back end (CMAKE_ARGS=-DGGML_CUDA=on)."""
    return bool(load_llama_cpp().llama_supports_gpu_offload())


@dataclass
class PoolStats:
    """What /metrics shows for one pool: how contended the model is."""

    size: int = 0
    busy: int = 0
    waiting: int = 0
    acquired_total: int = 0
    wait_seconds_total: float = 0.0
    busy_total: int = 0  # acquisitions that gave up (the run's deadline passed first)


class LlamaPool:
    """Up to `size` llama contexts over one model file with one set of instance parameters.

    Instances are built on demand (the first on first use), so an idle model costs one context. A run
    holds an instance for the length of a compute or a streaming session; others queue on a condition
    variable, and `stats.waiting` is the queue length that the control plane exports.
    """

    def __init__(self, path: str, params: InstanceParams, size: int = 1) -> None:
        self.path = path
        self.params = params
        self.size = max(1, size)
        self._free: list[Any] = []
        self._all: list[Any] = []
        self._cond = threading.Condition()
        self.stats = PoolStats(size=self.size)
        self.last_used = time.monotonic()
        self._reserved = 0  # contexts held by a batch scheduler for these parameters

    def reserve(self, timeout: float) -> bool:
        """Take one of the pool's `size` places for a batch scheduler's context, waiting at most
        `timeout` seconds: the scheduler's context counts against the same limit as lent ones."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.stats.busy + self._reserved >= self.size:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            self._reserved += 1
            return True

    def unreserve(self) -> None:
        with self._cond:
            self._reserved = max(0, self._reserved - 1)
            self._cond.notify_all()

    def _build(self) -> Any:
        llama_cpp = load_llama_cpp()
        p = self.params
        if not os.path.exists(self.path):
            raise NNFailure(NNError.MODEL_NOT_FOUND, f"model file {self.path} does not exist")
        threads = p.threads or None  # None: llama-cpp-python's default (half the CPUs), same as a direct caller
        kwargs: dict[str, Any] = dict(
            model_path=self.path,
            n_gpu_layers=p.n_gpu_layers,
            main_gpu=p.main_gpu,
            embedding=p.embedding,
            n_ctx=p.ctx_size,
            n_batch=p.batch_size,
            # A non-causal model (BERT) must see a whole sequence in one micro-batch.
            n_ubatch=max(p.ubatch_size, p.batch_size) if p.embedding else min(p.ubatch_size, p.batch_size),
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        if p.tensor_split:
            kwargs["tensor_split"] = list(p.tensor_split)
        try:
            return llama_cpp.Llama(**kwargs)
        except (ValueError, RuntimeError, OSError) as exc:
            raise NNFailure(NNError.INVALID_ARGUMENT, f"llama.cpp could not load {self.path}: {exc}") from None

    def warm(self) -> Any:
        """Build the first instance now (eager loading) and return it without lending it."""
        with self._cond:
            if not self._all:
                inst = self._build()
                self._all.append(inst)
                self._free.append(inst)
            return self._all[0]

    def acquire(self, timeout: float) -> Any:
        """Borrow an instance, waiting at most `timeout` seconds (busy after that)."""
        start = time.monotonic()
        with self._cond:
            self.stats.waiting += 1
            try:
                while True:
                    if self.stats.busy + self._reserved >= self.size:
                        pass  # every context in use (the batch scheduler's counts as one)
                    elif self._free:
                        inst = self._free.pop()
                        break
                    elif len(self._all) < self.size:
                        inst = self._build()
                        self._all.append(inst)
                        break
                    remaining = timeout - (time.monotonic() - start)
                    if remaining <= 0:
                        self.stats.busy_total += 1
                        raise NNFailure(NNError.BUSY, f"no free llama context for {self.path} within {timeout:.1f}s")
                    self._cond.wait(remaining)
            finally:
                self.stats.waiting -= 1
            self.stats.busy += 1
            self.stats.acquired_total += 1
            self.stats.wait_seconds_total += time.monotonic() - start
            self.last_used = time.monotonic()
            return inst

    def release(self, inst: Any) -> None:
        with self._cond:
            self._free.append(inst)
            self.stats.busy -= 1
            self.last_used = time.monotonic()
            self._cond.notify_all()

    def idle(self) -> bool:
        with self._cond:
            return self.stats.busy == 0 and self.stats.waiting == 0 and self._reserved == 0

    def close(self) -> None:
        with self._cond:
            for inst in self._all:
                try:
                    inst.close()
                except Exception:
                    pass
            self._all.clear()
            self._free.clear()


class VocabOnly:
    """A GGUF's vocabulary loaded without weights or a context, through llama.cpp's C API.

    Tokenizing needs only this, so set_input never waits for a busy llama context, and a model's
    tokenizer is ready (and a missing or broken file detected) before its weights are read."""

    def __init__(self, path: str) -> None:
        llama_cpp = load_llama_cpp()
        self._lc = llama_cpp
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self.model = llama_cpp.llama_model_load_from_file(path.encode(), params)
        if not self.model:
            raise NNFailure(NNError.INVALID_ARGUMENT, f"llama.cpp could not read {path} as a GGUF model")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)

    def tokenize(self, text: bytes, add_special: bool = True, parse_special: bool = True) -> list[int]:
        lc = self._lc
        n_max = len(text) + 16
        for _ in range(2):
            arr = (lc.llama_token * n_max)()
            n = lc.llama_tokenize(self.vocab, text, len(text), arr, n_max, add_special, parse_special)
            if n >= 0:
                return list(arr[:n])
            n_max = -n
        raise NNFailure(NNError.INVALID_ARGUMENT, "tokenization failed")

    def meta(self, key: str) -> Optional[str]:
        """A GGUF metadata value as a string (llama.cpp reads the header even for a vocab-only load)."""
        size = 256
        while True:
            buf = ctypes.create_string_buffer(size)
            n = self._lc.llama_model_meta_val_str(self.model, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", "replace")
            size = n + 1

    def context_length(self) -> Optional[int]:
        arch = self.meta("general.architecture")
        value = self.meta(f"{arch}.context_length") if arch else None
        try:
            return int(value) if value else None
        except ValueError:
            return None

    def token_text(self, token: int) -> str:
        if token < 0:
            return ""
        raw = self._lc.llama_vocab_get_text(self.vocab, token)
        return raw.decode("utf-8", "replace") if raw else ""

    def special_texts(self) -> tuple[str, str]:
        """(bos, eos) token texts, for chat templates."""
        return self.token_text(self._lc.llama_vocab_bos(self.vocab)), self.token_text(self._lc.llama_vocab_eos(self.vocab))

    def close(self) -> None:
        if self.model:
            self._lc.llama_model_free(self.model)
            self.model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class GgmlModel:
    """One GGUF file as the registry holds it: its base parameters and its pools.

    `max_variants` bounds the pools a guest can make the host build by sending different instance
    parameters (each is a llama context, and with another n-gpu-layers a model load); the least
    recently used idle pool is dropped beyond it.
    """

    backend = "ggml"

    def __init__(self, name: str, path: str, base: GgmlParams = GgmlParams(), pool_size: int = 1, max_variants: int = 4,
                 guest: Any = None, batching: Optional[bool] = None, sequences: int = 8, kv_size: Optional[int] = None,
                 cache_bytes: int = 256 << 20) -> None:
        self.name = name
        # Generation goes through a batch scheduler (one context, several sequences) unless turned off;
        # a guest's own GGUF keeps a context per run, which the flow's memory limit can be checked against.
        self.batching = (guest is None) if batching is None else batching
        self.sequences = max(1, sequences)
        self.kv_size = kv_size
        self.cache_bytes = cache_bytes
        self._schedulers: "OrderedDict[InstanceParams, BatchScheduler]" = OrderedDict()
        self._generating = 0  # generations open on schedulers (what `busy` counts for them)
        self._generations_total = 0
        self.path = path
        self.base = base
        self.guest = guest  # a GgufInfo when the bytes came from a guest: its contexts are held to the memory limit
        self.pool_size = pool_size
        self.max_variants = max_variants
        self._pools: "OrderedDict[InstanceParams, LlamaPool]" = OrderedDict()
        self._lock = threading.Lock()
        self._n_ctx_train: Optional[int] = None
        self._vocab: Any = None

    def _normalise(self, p: InstanceParams) -> InstanceParams:
        """Clamp what a guest may ask for: no context beyond what the model was trained for."""
        ctx = p.ctx_size
        if self._n_ctx_train:
            ctx = min(ctx, self._n_ctx_train) if ctx else self._n_ctx_train
        ctx = max(ctx, 16)
        batch = max(1, min(p.batch_size, ctx))
        threads = min(p.threads, os.cpu_count() or 1) if p.threads else None  # no thread bombs
        return replace(p, ctx_size=ctx, batch_size=batch, ubatch_size=max(1, min(p.ubatch_size, batch)), threads=threads)

    def pool(self, params: Optional[InstanceParams] = None) -> LlamaPool:
        """The pool for these instance parameters, built (not yet loaded) on first request."""
        self._vocab_instance()
        params = self._normalise(params or self.base.instance)
        with self._lock:
            return self._pool_locked(params)

    def _pool_locked(self, params: InstanceParams) -> LlamaPool:
        """The pool for `params` (normalised); the caller holds `_lock`."""
        pool = self._pools.get(params)
        if pool is None:
            while len(self._pools) >= self.max_variants:
                victim = next((k for k, v in self._pools.items() if v.idle()), None)
                if victim is None:
                    raise NNFailure(NNError.BUSY, f"model {self.name}: {self.max_variants} parameter sets in use")
                self._pools.pop(victim).close()
            pool = LlamaPool(self.path, params, self.pool_size)
            self._pools[params] = pool
        self._pools.move_to_end(params)
        return pool

    def scheduler(self, params: Optional[InstanceParams] = None) -> Optional[BatchScheduler]:
        """The batch scheduler for these instance parameters, or None where generation keeps a pooled
        context per request (batching off, embeddings). Built (not yet loaded) on first request."""
        if not self.batching:
            return None
        self._vocab_instance()
        params = self._normalise(params or self.base.instance)
        if params.embedding:
            return None
        with self._lock:
            sched = self._schedulers.get(params)
            if sched is None:
                while len(self._schedulers) >= self.max_variants:
                    victim = next((k for k, v in self._schedulers.items() if v.idle()), None)
                    if victim is None:
                        raise NNFailure(NNError.BUSY, f"model {self.name}: {self.max_variants} parameter sets in use")
                    self._schedulers.pop(victim).close()
                sched = BatchScheduler(self.path, params, self.sequences, self.kv_size, self.cache_bytes, name=self.name,
                                       gate=self._pool_locked(params))
                self._schedulers[params] = sched
            self._schedulers.move_to_end(params)
            return sched

    def generation_opened(self) -> None:
        with self._lock:
            self._generating += 1
            self._generations_total += 1

    def generation_closed(self) -> None:
        with self._lock:
            self._generating -= 1

    def _vocab_instance(self) -> "VocabOnly":
        """The vocabulary alone (no weights, no context): enough to tokenize, cheap to keep."""
        with self._lock:
            if self._vocab is None:
                if not os.path.exists(self.path):
                    raise NNFailure(NNError.MODEL_NOT_FOUND, f"model file {self.path} does not exist")
                self._vocab = VocabOnly(self.path)
                self._n_ctx_train = self._vocab.context_length()
            return self._vocab

    def load(self, warm: bool = True) -> None:
        """Read the vocabulary (and with `warm`, the weights and one context) now rather than on first
        use, so the first run does not pay for it."""
        self._vocab_instance()
        if warm:
            sched = self.scheduler()
            if sched is not None:
                sched.load()
            else:
                self.pool().warm()

    def check_memory(self, params: InstanceParams, memory: Optional[int]) -> None:
        """For a guest's GGUF: refuse (`oom`) a context that would need more than the flow's memory
        limit, before llama.cpp allocates its KV cache. Operators' models are not limited here."""
        if self.guest is None or memory is None:
            return
        from .gguf_guard import mib

        p = self._normalise(params)
        need = self.guest.context_need(p.ctx_size, p.batch_size, p.ubatch_size)
        if need > memory:
            raise NNHalt("oom", f"guest model {self.name}: a context of {p.ctx_size} tokens needs about {mib(need)}, over the "
                                f"flow's memory limit of {mib(memory)}", NNError.TOO_LARGE)

    def tokenizer(self) -> Any:
        """Tokenization reads only the vocabulary, so it needs no context lease."""
        return self._vocab_instance()

    def tokenize(self, text: bytes) -> list[int]:
        """The prompt as WasmEdge tokenizes it: the model's BOS/CLS rules, special tokens parsed."""
        return self.tokenizer().tokenize(text, add_special=True, parse_special=True)

    def chat_prompt(self, messages: list[dict[str, Any]], chat_format: Optional[str] = None) -> tuple[str, list[str]]:
        """The prompt for chat `messages` and the format's stop strings, the same for every caller
        (`llm_chat`, `/v1/chat/completions`): the flow's `chat_format` when given; else the GGUF's own
        chat template (llama-cpp-python's Jinja2 formatter); else the format of the model's architecture,
        because the Llama 2 layout llama-cpp-python would fall back to is not understood by other families.
        A leading BOS is dropped: `tokenize` adds it."""
        from llama_cpp import llama_chat_format

        vocab = self._vocab_instance()
        bos, eos = vocab.special_texts()
        template = None if chat_format else self._chat_template()
        resp = None
        if template:
            try:
                resp = llama_chat_format.Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)(messages=messages)  # type: ignore[arg-type]
            except Exception:  # a template that cannot render these messages (a role it does not know)
                resp = None
        if resp is None:
            name = chat_format or _ARCH_FORMATS.get(vocab.meta("general.architecture") or "", "chatml")
            formatter = _chat_formatter(name)
            try:
                resp = formatter(messages=messages)
            except Exception as exc:  # a format that cannot lay out these messages
                raise NNFailure(NNError.INVALID_ARGUMENT, f"chat format {name!r} cannot render these messages ({exc}); "
                                                          "use roles system, user and assistant") from None
        prompt = resp.prompt
        if bos and prompt.startswith(bos):
            prompt = prompt[len(bos):]
        stops = [resp.stop] if isinstance(resp.stop, str) else list(resp.stop or [])
        return prompt, [s for s in stops if s]

    def _chat_template(self) -> Optional[str]:
        if not hasattr(self, "_template"):
            self._template = self._vocab_instance().meta("tokenizer.chat_template")
        return self._template

    def stats(self) -> dict[str, Any]:
        """What /metrics and the console show for this model: the pools' figures (contexts lent per
        request) with the batch schedulers' added in (`busy`: generations open, `waiting`: requests
        queued for a sequence), and the schedulers' own under `batching`."""
        with self._lock:
            pools = list(self._pools.values())
            scheds = list(self._schedulers.values())
            generating, generations = self._generating, self._generations_total
        snaps = [s.snapshot() for s in scheds]
        batching = {key: sum(s[key] for s in snaps) for key in _SUMMED}
        batching.update({
            "enabled": self.batching, "contexts": sum(1 for s in scheds if s.loaded),
            "batch_size_last": max((s["batch_size_last"] for s in snaps), default=0),
            "batch_size_max": max((s["batch_size_max"] for s in snaps), default=0),
            "batch_size_mean": max((s["batch_size_mean"] for s in snaps), default=0.0),
            "tokens_per_second": round(batching["tokens_generated"] / batching["decode_seconds_total"], 1)
            if batching["decode_seconds_total"] else 0.0,
        })
        return {
            "backend": "ggml",
            "loaded": any(p._all for p in pools) or any(s.loaded for s in scheds),
            "instances": sum(len(p._all) for p in pools) + batching["contexts"],
            "busy": sum(p.stats.busy for p in pools) + generating,
            "waiting": sum(p.stats.waiting for p in pools) + batching["waiting"],
            "acquired_total": sum(p.stats.acquired_total for p in pools) + generations,
            "wait_seconds_total": sum(p.stats.wait_seconds_total for p in pools) + batching["queue_wait_seconds_total"],
            "busy_total": sum(p.stats.busy_total for p in pools),
            "batching": batching,
        }

    def close(self) -> None:
        with self._lock:
            for pool in self._pools.values():
                pool.close()
            self._pools.clear()
            for sched in self._schedulers.values():
                sched.close()
            self._schedulers.clear()
            if self._vocab is not None:
                self._vocab.close()
            self._vocab = None



_SUMMED = ("sequences", "sequences_busy", "waiting", "submitted", "finished", "cancelled", "steps", "tokens_generated",
           "prompt_tokens_evaluated", "decode_seconds_total", "queue_wait_seconds_total", "kv_full", "cache_hits",
           "cache_misses", "cache_saved_tokens", "cache_evictions", "cache_tokens", "cache_entries", "cache_bytes")


# llama-cpp-python's chat formats for GGUF files without a chat template, by architecture.
_ARCH_FORMATS = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "llama": "llama-2", "mistral": "mistral-instruct",
                 "qwen2": "chatml", "qwen3": "chatml", "phi3": "chatml"}


def _chat_formatter(name: str) -> Callable[..., Any]:
    """llama-cpp-python's formatter function for a chat format name ("llama-2" is `format_llama2`,
    "mistral-instruct" `format_mistral_instruct`); an unknown name is invalid_argument."""
    from llama_cpp import llama_chat_format

    for attr in (f"format_{name.replace('-', '_')}", f"format_{name.replace('-', '')}"):
        fn = getattr(llama_chat_format, attr, None)
        if callable(fn):
            return fn  # type: ignore[no-any-return]
    raise NNFailure(NNError.INVALID_ARGUMENT, f"unknown chat_format {name!r}; use one of llama-cpp-python's "
                                              f"(chatml, gemma, llama-2, llama-3, mistral-instruct, ...)")


@dataclass
class Lease:
    """A llama context borrowed from its pool, given back once by `release` (or leaving a `with`)."""

    pool: LlamaPool
    llama: Any

    def release(self) -> None:
        if self.llama is not None:
            llama, self.llama = self.llama, None
            self.pool.release(llama)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def borrow(model: GgmlModel, params: InstanceParams, wait: float, deadline: Optional[Callable[[], float]] = None,
           memory: Optional[int] = None) -> Lease:
    """Borrow a context of `model` for `params`, queueing at most `wait` seconds (busy after that).

    `deadline` (seconds left in a run, None for an HTTP client) makes a wait that outlives the run end
    the run `timeout` (NNHalt) rather than fail busy, the same for WASI-NN and the LLM host functions.
    `memory` holds a guest's GGUF context to the flow's memory limit (`GgmlModel.check_memory`)."""
    if deadline is not None and deadline() <= 0:
        raise NNHalt("timeout", f"the run's deadline passed before a llama context of {model.name} was free")
    model.check_memory(params, memory)
    pool = model.pool(params)
    limit = wait if deadline is None else min(wait, deadline())
    try:
        return Lease(pool, pool.acquire(max(0.0, limit)))
    except NNFailure as exc:
        if exc.code == NNError.BUSY and deadline is not None and deadline() <= 0:
            raise NNHalt("timeout", f"the run's deadline passed waiting for a llama context of {model.name}") from None
        raise
