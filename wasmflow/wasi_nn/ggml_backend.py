"""The `ggml` back end: llama.cpp through llama-cpp-python, with WasmEdge's GGML plugin behaviour.

What a guest sees follows `shared/reference/wasi-nn.md`: input index 1 is JSON metadata, any other index
the prompt; output 0 the generated text (or the embedding JSON), output 1 the token counts; streaming
through compute_single / get_output_single / fini_single; codes 100/101/102/103.

Process-wide state is a `GgmlModel` per registered model: a small pool of `llama_cpp.Llama` instances
per distinct set of *instance* parameters (n-gpu-layers, ctx-size, embedding, ...). The weights are
mmapped, so a second instance costs its KV cache, not another copy of the model. A run borrows one
instance for the length of a `compute` (or of a whole streaming session), which is what keeps two runs
from interleaving tokens in one llama context. Sampling parameters are per execution context and cost
nothing to change.
"""

from __future__ import annotations

import ctypes
import json
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Optional

from .abi import NNError, NNFailure, NNHalt

LLAMA_BUILD_NUMBER = 0  # llama-cpp-python does not expose llama.cpp's build number; see llama_commit


def _llama_cpp():  # type: ignore[no-untyped-def]
    """Import llama_cpp lazily: the package is optional and its import loads a large shared library."""
    try:
        import llama_cpp
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise NNFailure(NNError.UNSUPPORTED_OPERATION, f"the ggml back end needs llama-cpp-python: {exc}") from None
    global _quiet
    if not _quiet:
        # llama.cpp logs every model load to stderr, which is the guest's stderr under `wasmflow exec`;
        # keep only errors unless WASMFLOW_NN_LOG is set.
        from llama_cpp._logger import set_verbose

        set_verbose(bool(os.environ.get("WASMFLOW_NN_LOG")))
        _quiet = True
    return llama_cpp


_quiet = False


def llama_commit() -> str:
    """What output 1 reports as `llama_commit`: the llama-cpp-python version that bundles llama.cpp."""
    try:
        from importlib.metadata import version

        return f"llama-cpp-python-{version('llama-cpp-python')}"
    except Exception:
        return "unknown"


def gpu_offload_supported() -> bool:
    """True when llama-cpp-python was built with a GPU back end (CMAKE_ARGS=-DGGML_CUDA=on)."""
    return bool(_llama_cpp().llama_supports_gpu_offload())


# ---------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class InstanceParams:
    """Parameters that need a new llama context or model: changing one picks (or builds) another pool."""

    n_gpu_layers: int = 0
    main_gpu: int = 0
    tensor_split: Optional[tuple[float, ...]] = None
    embedding: bool = False
    ctx_size: int = 4096
    batch_size: int = 512
    ubatch_size: int = 512
    threads: Optional[int] = None


@dataclass(frozen=True)
class SamplingParams:
    """Parameters of one generation; cheap to change per execution context."""

    n_predict: int = -1
    temp: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: random
    reverse_prompt: str = ""
    stream_stdout: bool = False
    grammar: str = ""
    json_schema: Optional[str] = None
    ignore_eos: bool = False
    enable_log: bool = False
    enable_debug_log: bool = False


@dataclass(frozen=True)
class GgmlParams:
    instance: InstanceParams = InstanceParams()
    sampling: SamplingParams = SamplingParams()


# metadata key -> (section, attribute, parser)
def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise ValueError("expected an integer")
    return int(v)


def _uint(v: Any) -> int:
    n = _int(v)
    if n < 0:
        raise ValueError("expected a non-negative integer")
    return n


def _float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError("expected a number")
    return float(v)


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("expected true or false")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("expected a string")
    return v


def _split(v: Any) -> Optional[tuple[float, ...]]:
    if isinstance(v, str):  # WasmEdge takes "3,1" as well as a list
        v = [x for x in v.split(",") if x.strip()]
    if not isinstance(v, list):
        raise ValueError("expected a list of numbers")
    return tuple(float(x) for x in v) or None


def _schema(v: Any) -> Optional[str]:
    if isinstance(v, str):
        json.loads(v)
        return v
    if isinstance(v, dict):
        return json.dumps(v)
    raise ValueError("expected a JSON schema object or string")


_KEYS: dict[str, tuple[str, str, Callable[[Any], Any]]] = {
    "n-gpu-layers": ("instance", "n_gpu_layers", _int),
    "main-gpu": ("instance", "main_gpu", _uint),
    "tensor-split": ("instance", "tensor_split", _split),
    "embedding": ("instance", "embedding", _bool),
    "ctx-size": ("instance", "ctx_size", _uint),
    "batch-size": ("instance", "batch_size", _uint),
    "ubatch-size": ("instance", "ubatch_size", _uint),
    "threads": ("instance", "threads", _uint),
    "n-predict": ("sampling", "n_predict", _int),
    "temp": ("sampling", "temp", _float),
    "top-p": ("sampling", "top_p", _float),
    "top-k": ("sampling", "top_k", _int),
    "min-p": ("sampling", "min_p", _float),
    "repeat-penalty": ("sampling", "repeat_penalty", _float),
    "presence-penalty": ("sampling", "presence_penalty", _float),
    "frequency-penalty": ("sampling", "frequency_penalty", _float),
    "seed": ("sampling", "seed", _int),
    "reverse-prompt": ("sampling", "reverse_prompt", _str),
    "stream-stdout": ("sampling", "stream_stdout", _bool),
    "grammar": ("sampling", "grammar", _str),
    "json-schema": ("sampling", "json_schema", _schema),
    "ignore-eos": ("sampling", "ignore_eos", _bool),
    "enable-log": ("sampling", "enable_log", _bool),
    "enable-debug-log": ("sampling", "enable_debug_log", _bool),
}
# Accepted spellings from flows.yaml options and WasmEdge's `preload:path,ngl=99` suffix.
_ALIASES = {"ngl": "n-gpu-layers", "n_gpu_layers": "n-gpu-layers"}


def apply_metadata(params: GgmlParams, meta: dict[str, Any]) -> GgmlParams:
    """`params` with the known keys of `meta` applied. Unknown keys are ignored, as WasmEdge does
    (guests send things like "llama3" or "model_name"); a known key of the wrong type is
    invalid_argument, also as WasmEdge does."""
    if not isinstance(meta, dict):
        raise NNFailure(NNError.INVALID_ENCODING, "metadata must be a JSON object")
    inst: dict[str, Any] = {}
    samp: dict[str, Any] = {}
    for raw_key, value in meta.items():
        key = _ALIASES.get(raw_key, raw_key.replace("_", "-") if raw_key.replace("_", "-") in _KEYS else raw_key)
        spec = _KEYS.get(key)
        if spec is None:
            continue
        section, attr, parse = spec
        try:
            parsed = parse(value)
        except (ValueError, TypeError) as exc:
            raise NNFailure(NNError.INVALID_ARGUMENT, f"metadata {raw_key!r}: {exc}") from None
        (inst if section == "instance" else samp)[attr] = parsed
    return GgmlParams(replace(params.instance, **inst), replace(params.sampling, **samp))


def parse_metadata_bytes(params: GgmlParams, data: bytes) -> GgmlParams:
    """Apply a JSON metadata tensor; bad JSON is invalid_encoding (WasmEdge's code for it)."""
    try:
        meta = json.loads(bytes(data).decode("utf-8") or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NNFailure(NNError.INVALID_ENCODING, f"metadata is not JSON: {exc}") from None
    return apply_metadata(params, meta)


# ---------------------------------------------------------------------------------------------
# Process-wide: models and pools of llama contexts


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

    def _build(self) -> Any:
        llama_cpp = _llama_cpp()
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
                    if self._free:
                        inst = self._free.pop()
                        break
                    if len(self._all) < self.size:
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
            self._cond.notify()

    def idle(self) -> bool:
        with self._cond:
            return self.stats.busy == 0 and self.stats.waiting == 0

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
        llama_cpp = _llama_cpp()
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
                 guest: Any = None) -> None:
        self.name = name
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

    def chat_prompt(self, messages: list[dict[str, Any]]) -> tuple[str, list[str]]:
        """The prompt for chat `messages` and extra stop strings: the GGUF's own chat template when it
        has one (rendered by llama-cpp-python's Jinja2 formatter), else a plain `role: text` layout."""
        template = self._chat_template()
        if template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            bos, eos = self._vocab_instance().special_texts()
            try:
                resp = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)(messages=messages)  # type: ignore[arg-type]
                prompt = resp.prompt
                if bos and prompt.startswith(bos):  # tokenize adds the BOS itself
                    prompt = prompt[len(bos):]
                stops = [resp.stop] if isinstance(resp.stop, str) else list(resp.stop or [])
                return prompt, stops
            except Exception:
                pass
        lines = [f"{m.get('role', 'user')}: {m.get('content') or ''}" for m in messages]
        return "\n".join(lines) + "\nassistant:", ["\nuser:"]

    def _chat_template(self) -> Optional[str]:
        if not hasattr(self, "_template"):
            self._template = self._vocab_instance().meta("tokenizer.chat_template")
        return self._template

    def stats(self) -> dict[str, Any]:
        with self._lock:
            pools = list(self._pools.values())
        return {
            "backend": "ggml",
            "loaded": any(p._all for p in pools),
            "instances": sum(len(p._all) for p in pools),
            "busy": sum(p.stats.busy for p in pools),
            "waiting": sum(p.stats.waiting for p in pools),
            "acquired_total": sum(p.stats.acquired_total for p in pools),
            "wait_seconds_total": sum(p.stats.wait_seconds_total for p in pools),
            "busy_total": sum(p.stats.busy_total for p in pools),
        }

    def close(self) -> None:
        with self._lock:
            for pool in self._pools.values():
                pool.close()
            self._pools.clear()
            if self._vocab is not None:
                self._vocab.close()
            self._vocab = None


# ---------------------------------------------------------------------------------------------
# Token-level generation, shared by one-shot compute, streaming and the OpenAI endpoints


def token_piece(llama: Any, token: int) -> bytes:
    """The bytes of one token as llama.cpp renders it (special tokens rendered empty, like WasmEdge)."""
    llama_cpp = _llama_cpp()
    vocab = llama._model.vocab
    size = 64
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, False)
        if n >= 0:
            return buf.raw[:n]
        size = -n


def is_eog(llama: Any, token: int) -> bool:
    llama_cpp = _llama_cpp()
    return bool(llama_cpp.llama_vocab_is_eog(llama._model.vocab, token))


def _grammar(sp: SamplingParams, llama: Any) -> Any:
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
    lc = _llama_cpp()
    probe = lc.llama_sampler_init_grammar(llama._model.vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8"))
    if not probe:
        raise NNFailure(NNError.INVALID_ARGUMENT, "llama.cpp cannot parse the grammar")
    lc.llama_sampler_free(probe)
    return grammar


class Generation:
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
        self._lc = _llama_cpp()
        self._vocab = llama._model.vocab
        self._buf = ctypes.create_string_buffer(256)

    def step(self) -> tuple[NNError, bytes]:
        if self.done is not None:
            return self.done, b""
        if self._gen is None:
            if not self.prompt:
                raise NNFailure(NNError.INVALID_ARGUMENT, "llama input is not set")
            if len(self.prompt) > self.n_ctx - 4:  # WasmEdge keeps 4 positions for special tokens
                self.done = NNError.PROMPT_TOO_LONG
                return self.done, b""
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
        if 0 <= self.sp.n_predict <= len(self.tokens):
            self.done = NNError.END_OF_SEQUENCE
            return self.done, b""
        self.check_deadline("generation")
        if len(self.prompt) + len(self.tokens) >= self.n_ctx:  # prompt and answer share the window
            self.done = NNError.CONTEXT_FULL
            return self.done, b""
        try:
            token = next(self._gen)
        except StopIteration:
            self.done = NNError.END_OF_SEQUENCE
            return self.done, b""
        except RuntimeError as exc:  # llama_decode failed
            raise NNFailure(NNError.RUNTIME_ERROR, f"llama_decode failed: {exc}") from None
        if not self.sp.ignore_eos and self._lc.llama_vocab_is_eog(self._vocab, token):
            self.done = NNError.END_OF_SEQUENCE
            return self.done, b""
        n = self._lc.llama_token_to_piece(self._vocab, token, self._buf, 256, 0, False)
        piece = self._buf.raw[:n] if 0 <= n <= 256 else token_piece(self.llama, token)
        self.tokens.append(token)
        self.text += piece
        if self.sp.reverse_prompt and self.sp.reverse_prompt.encode() in self.text[-(len(self.sp.reverse_prompt.encode()) + len(piece)):]:
            self.done = NNError.END_OF_SEQUENCE  # this token still counts and is returned
        return NNError.SUCCESS, piece

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


def embed_tokens(llama: Any, tokens: list[int], deadline: Optional[Callable[[], float]] = None) -> list[float]:
    """Sentence embedding of one token sequence (the model's pooling), L2-normalised like WasmEdge.
    One decode of at most a batch; it does not start once the run's deadline has passed."""
    llama_cpp = _llama_cpp()
    import numpy as np

    if deadline is not None and deadline() <= 0:
        raise NNHalt("timeout", "the run's deadline passed before the embedding")
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
# Per run: an execution context


@dataclass
class GgmlExecution:
    """A WASI-NN execution context on a GGML graph (per run, never shared)."""

    model: GgmlModel
    params: GgmlParams
    write_stdout: Callable[[bytes], None]
    deadline: Callable[[], float]  # seconds left in the run (queueing on the pool, decode steps)
    memory: Optional[int] = None  # the flow's memory limit: a guest's GGUF contexts must fit in it
    prompt: list[int] = field(default_factory=list)
    output: bytes = b""
    output_tokens: int = 0
    last_piece: bytes = b""
    _stream: Optional[Generation] = None
    _lease: Optional[tuple[LlamaPool, Any]] = None

    # -- inputs ------------------------------------------------------------------------------

    def set_input(self, index: int, data: bytes) -> None:
        if index == 1:
            self.params = parse_metadata_bytes(self.params, data)
            return
        self._end_stream()
        self.prompt = self.model.tokenize(bytes(data))
        self.output = b""
        self.output_tokens = 0
        self.last_piece = b""

    # -- borrowing a llama context -----------------------------------------------------------

    def _borrow(self) -> Any:
        if self._lease is None:
            if self.deadline() <= 0:
                raise NNHalt("timeout", f"the run's deadline passed before a llama context of {self.model.name} was free")
            self.model.check_memory(self.params.instance, self.memory)
            pool = self.model.pool(self.params.instance)
            try:
                inst = pool.acquire(max(0.0, self.deadline()))
            except NNFailure as exc:
                if exc.code == NNError.BUSY and self.deadline() <= 0:
                    raise NNHalt("timeout", f"the run's deadline passed waiting for a llama context of {self.model.name}") from None
                raise
            self._lease = (pool, inst)
        return self._lease[1]

    def _give_back(self) -> None:
        if self._lease is not None:
            pool, inst = self._lease
            self._lease = None
            pool.release(inst)

    def _end_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self._give_back()

    # -- compute -----------------------------------------------------------------------------

    def compute(self) -> NNError:
        if not self.prompt:
            raise NNFailure(NNError.INVALID_ARGUMENT, "llama input is not set")
        self._end_stream()
        llama = self._borrow()
        try:
            if self.params.instance.embedding:
                vec = embed_tokens(llama, self.prompt, self.deadline)
                self.output = json.dumps({"n_embedding": len(vec), "embedding": vec}, separators=(",", ":")).encode()
                self.output_tokens = 0
                return NNError.SUCCESS
            gen = Generation(llama, self.prompt, self.params.sampling, self.params.instance.ctx_size, self.deadline)
            try:
                while True:
                    code, piece = gen.step()
                    if piece and self.params.sampling.stream_stdout:
                        self.write_stdout(piece)
                    if code != NNError.SUCCESS or gen.done is not None:
                        break
            finally:
                gen.close()
            self.output = bytes(gen.text)
            self.output_tokens = len(gen.tokens)
            final = gen.done or NNError.END_OF_SEQUENCE
            return NNError.SUCCESS if final == NNError.END_OF_SEQUENCE else final
        finally:
            self._give_back()

    def compute_single(self) -> NNError:
        if not self.prompt:
            raise NNFailure(NNError.INVALID_ARGUMENT, "llama input is not set")
        if self.params.instance.embedding:
            raise NNFailure(NNError.UNSUPPORTED_OPERATION, "compute_single does not apply to embeddings")
        if self._stream is None:
            llama = self._borrow()
            self._stream = Generation(llama, self.prompt, self.params.sampling, self.params.instance.ctx_size, self.deadline)
            self.output = b""
            self.output_tokens = 0
        code, piece = self._stream.step()
        self.last_piece = piece
        if code == NNError.SUCCESS:
            self.output += piece
            self.output_tokens = len(self._stream.tokens)
            if piece and self.params.sampling.stream_stdout:
                self.write_stdout(piece)
        return code

    def fini_single(self) -> None:
        """Clear outputs, reset the sampler and the position, give the llama context back."""
        self._end_stream()
        self.output = b""
        self.output_tokens = 0
        self.last_piece = b""

    # -- outputs -----------------------------------------------------------------------------

    def metadata_output(self) -> bytes:
        return json.dumps(
            {
                "input_tokens": len(self.prompt),
                "output_tokens": self.output_tokens,
                "llama_build_number": LLAMA_BUILD_NUMBER,
                "llama_commit": llama_commit(),
            }
        ).encode()

    def get_output(self, index: int) -> bytes:
        return self.metadata_output() if index == 1 else self.output

    def get_output_single(self, index: int) -> bytes:
        return self.metadata_output() if index == 1 else self.last_piece

    def close(self) -> None:
        self._end_stream()
