"""The process-wide model registry: every named model, loaded once and shared by all runs.

Models come from flows.yaml `models:` and from preloads in WasmEdge's syntax
(`--nn-preload name:ENCODING:TARGET:path`, or `WASMFLOW_NN_PRELOAD` with several entries separated by
whitespace or `;`). Loading is lazy by default: a model is read on its first use and kept for the life
of the process; `load_all()` loads every model eagerly (`wasmflow up` calls it so the first request
does not pay). Per-model concurrency (a pool of llama contexts, each lent to one run at a time) lives
in the back ends; `stats()` gathers their queue figures for /metrics.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Optional

from .abi import Encoding, NNError, NNFailure, Target

ModelObject = Any  # GgmlModel | OnnxModel

PRELOAD_ENV = "WASMFLOW_NN_PRELOAD"


@dataclass(frozen=True)
class ModelEntry:
    """A named model as configured: which back end, where, on what, with which options."""

    name: str
    encoding: Encoding
    target: Target
    path: str
    options: dict[str, Any] = field(default_factory=dict)
    source: str = "flows"  # "flows" | "preload"

    @property
    def backend(self) -> str:
        return "ggml" if self.encoding == Encoding.GGML else "onnx"


def parse_preload(spec: str, base_dir: Optional[Path] = None) -> ModelEntry:
    """`name:ENCODING:TARGET:path` as WasmEdge reads it: encoding and target case-insensitive, and for
    GGML the rest of the string is the path (it may contain ':'). A GGML path may end in WasmEdge's
    `,n_gpu_layers=99` / `,ngl=99` suffix."""
    parts = spec.split(":", 3)
    if len(parts) != 4 or not all(parts):
        raise ValueError(f"expected name:ENCODING:TARGET:path, got {spec!r}")
    name, enc_text, target_text, path = parts
    encoding = Encoding.parse(enc_text)
    target = Target.parse(target_text)
    if encoding not in (Encoding.GGML, Encoding.ONNX):
        raise ValueError(f"preload {name!r}: encoding {encoding.name} has no back end here (GGML or ONNX)")
    options: dict[str, Any] = {}
    if encoding == Encoding.GGML and "," in path:
        path, *extras = path.split(",")
        for extra in extras:
            key, _, value = extra.partition("=")
            if key in ("n_gpu_layers", "ngl"):
                try:
                    options["n-gpu-layers"] = int(value)
                except ValueError:
                    raise ValueError(f"preload {name!r}: {extra!r} is not an integer") from None
    if base_dir is not None and not os.path.isabs(path):
        path = str(base_dir / path)
    return ModelEntry(name, encoding, target, path, options, source="preload")


def preloads_from_env(environ: Optional[dict[str, str]] = None) -> list[str]:
    value = (environ if environ is not None else os.environ).get(PRELOAD_ENV, "")
    return [item for item in re.split(r"[;\s]+", value) if item]


def model_target_name(target: Target) -> str:
    return {Target.CPU: "cpu", Target.GPU: "gpu"}.get(target, "auto")


class ModelRegistry:
    """Named models, their lazily created back-end objects, and graphs loaded from guest bytes."""

    def __init__(self, entries: Iterable[ModelEntry] = (), cache_dir: Optional[Path] = None, pool_size: int = 1) -> None:
        self._entries: dict[str, ModelEntry] = {}
        self._models: dict[str, ModelObject] = {}
        self._anonymous: dict[str, ModelObject] = {}  # by sha256 of guest-supplied model bytes
        self._verified: set[str] = set()
        self._lock = threading.Lock()
        self._cache_dir = Path(cache_dir) if cache_dir else None
        self.pool_size = pool_size
        for entry in entries:
            self.add(entry)

    @property
    def cache_dir(self) -> Path:
        """Where guest GGUF bytes are written (llama.cpp reads files): the state directory's
        `nn-cache`, or a private temporary directory when the registry has no state directory."""
        if self._cache_dir is None:
            self._cache_dir = Path(tempfile.mkdtemp(prefix="wasmflow-nn-"))
        return self._cache_dir

    # -- configuration -----------------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        models: dict[str, Any] | None = None,
        base_dir: Optional[Path] = None,
        preloads: Iterable[str] = (),
        use_env: bool = True,
        cache_dir: Optional[Path] = None,
    ) -> "ModelRegistry":
        """The registry for a flows file's `models:` (ModelSpec objects or dicts) plus preloads."""
        reg = cls(cache_dir=cache_dir)
        for name, spec in (models or {}).items():
            get = spec.get if isinstance(spec, dict) else (lambda k, d=None, s=spec: getattr(s, k, d))
            backend = get("backend")
            path = str(get("path"))
            if base_dir is not None and not os.path.isabs(path):
                path = str(Path(base_dir) / path)
            reg.add(
                ModelEntry(
                    name,
                    Encoding.GGML if backend == "ggml" else Encoding.ONNX,
                    Target.parse(get("target", "auto") or "auto"),
                    path,
                    dict(get("options", {}) or {}),
                )
            )
        for spec in [*(preloads_from_env() if use_env else []), *preloads]:
            reg.add(parse_preload(spec, base_dir=None))
        return reg

    def add(self, entry: ModelEntry) -> None:
        """Register (or replace, before first use) a named model. A later preload wins over flows.yaml,
        as a command-line flag should."""
        with self._lock:
            # The old object is dropped, not closed: a run may still hold it; it is freed with the last reference.
            self._models.pop(entry.name, None)
            self._entries[entry.name] = entry

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entry(self, name: str) -> ModelEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise NNFailure(NNError.NOT_FOUND, f"no model named {name!r}") from None

    def entries(self) -> list[ModelEntry]:
        return [self._entries[n] for n in self.names()]

    def by_path(self, path: str) -> Optional[ModelEntry]:
        """The registered model whose file is `path` (for GGML `preload:<path>` builders)."""
        real = os.path.realpath(path)
        for entry in self._entries.values():
            if os.path.realpath(entry.path) == real or entry.name == path:
                return entry
        return None

    # -- the shared objects ------------------------------------------------------------------

    def model(self, name: str, config: Optional[dict[str, Any]] = None) -> ModelObject:
        """The process-wide back-end object of a named model, created on first use. `config` (from
        load_by_name_with_config) applies only when this call creates it: WasmEdge caches by name and
        ignores a later config."""
        entry = self.entry(name)
        with self._lock:
            obj = self._models.get(name)
            if obj is None:
                obj = self._build(entry, config)
                self._models[name] = obj
        return obj

    def _build(self, entry: ModelEntry, config: Optional[dict[str, Any]]) -> ModelObject:
        if not os.path.exists(entry.path):
            raise NNFailure(NNError.MODEL_NOT_FOUND, f"model {entry.name!r}: file {entry.path} does not exist")
        self._verify(entry.path)
        options = {**entry.options, **(config or {})}
        if entry.encoding == Encoding.GGML:
            from .ggml_params import GgmlParams, apply_metadata
            from .ggml_pool import GgmlModel, gpu_offload_supported

            params = apply_metadata(GgmlParams(), options)
            if entry.target == Target.CPU:
                params = GgmlParams(replace(params.instance, n_gpu_layers=0), params.sampling)
            elif "n-gpu-layers" not in options and "ngl" not in options and gpu_offload_supported():
                # GPU or AUTO with a CUDA build and no explicit layer count: offload every layer.
                params = GgmlParams(replace(params.instance, n_gpu_layers=-1), params.sampling)
            from .batch_scheduler import batching_options

            pool = options.get("parallel", self.pool_size)
            return GgmlModel(entry.name, entry.path, params, pool_size=int(pool) if isinstance(pool, int) else self.pool_size,
                             **batching_options(options))
        from .onnx_backend import OnnxModel

        return OnnxModel(entry.name, entry.path, model_target_name(entry.target), options)

    def _verify(self, path: str) -> None:
        """Check a pulled model against the sha256 recorded beside it (once per process and file)."""
        from .models import verify_beside

        key = os.path.realpath(path)
        if key in self._verified:
            return
        verify_beside(Path(path))
        self._verified.add(key)

    def anonymous(self, encoding: Encoding, target: Target, data: bytes, config: Optional[dict[str, Any]] = None) -> ModelObject:
        """A graph from model bytes a guest passed to `load`, shared by content hash so that a guest
        loading the same bytes on every run pays the load once.

        Guest bytes are untrusted: ONNX becomes a `GuestOnnxModel` (checked in a capped child before
        ONNX Runtime sees it); GGUF is scanned first (no `split.*` keys, sizes read for the memory
        check) and written only into the cache directory, under its content hash, never a name the
        guest chose."""
        digest = hashlib.sha256(data).hexdigest()
        key = f"{int(encoding)}:{int(target)}:{digest}"
        with self._lock:
            obj = self._anonymous.get(key)
            if obj is not None:
                return obj
        # Built outside the lock: scanning and writing a large file must not hold up other runs.
        if encoding == Encoding.ONNX:
            from .onnx_backend import GuestOnnxModel

            obj = GuestOnnxModel(f"bytes-{digest[:12]}", bytes(data), model_target_name(target))
        elif encoding == Encoding.GGML:
            from .ggml_params import GgmlParams, apply_metadata
            from .ggml_pool import GgmlModel
            from .gguf_guard import scan

            info = scan(data)
            path = self._write_cached(f"guest-{digest}.gguf", data)
            obj = GgmlModel(f"bytes-{digest[:12]}", str(path), apply_metadata(GgmlParams(), config or {}), self.pool_size,
                            guest=info)
        else:
            raise NNFailure(NNError.INVALID_ENCODING, f"encoding {encoding.name} has no back end here")
        with self._lock:
            if key in self._anonymous:
                return self._anonymous[key]
            if len(self._anonymous) >= 8:  # bound what guests can make the host keep
                # dropped, not closed: a run may still use it; it is freed with its last reference
                self._anonymous.pop(next(iter(self._anonymous)))
            self._anonymous[key] = obj
            return obj

    def _write_cached(self, name: str, data: bytes) -> Path:
        """Write `data` as cache_dir/name atomically (a fresh temporary file, then a rename that
        replaces whatever was there, a planted symlink included)."""
        directory = self.cache_dir
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=".write-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, directory / name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return directory / name

    def load_all(self) -> None:
        """Eager loading: read every named model now (errors name the model)."""
        for name in self.names():
            self.model(name).load(warm=True)

    # -- the `llm` capability's local route ----------------------------------------------------

    def run_chat(self, name: str, run: Any, messages: list[dict[str, Any]], request: dict[str, Any],
                 chat_format: Optional[str], timeout: float) -> dict[str, Any]:
        """`llm_chat` on the GGUF model `name` for `run` (`llm_route.run_chat`). The host functions are
        handed this registry, so they reach the one chat path without importing the WASI-NN package."""
        from .llm_route import run_chat

        return run_chat(self.model(name), run, messages, request, chat_format, timeout)

    def run_embed(self, name: str, run: Any, texts: list[str]) -> list[list[float]]:
        """`llm_embed` on the GGUF model `name` for `run` (`llm_route.run_embed`)."""
        from .llm_route import run_embed

        return run_embed(self.model(name), run, texts)

    # -- metrics -----------------------------------------------------------------------------

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per model: loaded, instances, busy, waiting (queue depth), acquired_total, wait_seconds_total.

        The control plane's /metrics reads this (gauges for busy/waiting, counters for the totals)."""
        with self._lock:
            items = list(self._models.items())
        out: dict[str, dict[str, Any]] = {}
        for name in self.names():
            obj = dict(items).get(name)
            base = {"backend": self._entries[name].backend, "loaded": False, "instances": 0, "busy": 0, "waiting": 0,
                    "acquired_total": 0, "wait_seconds_total": 0.0, "busy_total": 0}
            out[name] = obj.stats() if obj is not None else base
        return out

    def queue_depth(self) -> int:
        """Runs waiting for a model right now, all models together."""
        return sum(s["waiting"] for s in self.stats().values())

    def close(self) -> None:
        with self._lock:
            objs = [*self._models.values(), *self._anonymous.values()]
            self._models.clear()
            self._anonymous.clear()
        for obj in objs:
            obj.close()
