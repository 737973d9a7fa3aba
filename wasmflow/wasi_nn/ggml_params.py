"""GGML parameters: what a guest (metadata JSON), flows.yaml options or an OpenAI request may set.

Split in two because they cost differently: `InstanceParams` need their own llama context (a pool of
their own, see `ggml_pool`), `SamplingParams` are per generation and free to change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

from .abi import NNError, NNFailure


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
    """The two halves a GGML graph carries: its instance (which pool) and its sampling."""

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

