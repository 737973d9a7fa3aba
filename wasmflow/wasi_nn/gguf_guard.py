"""Checks on GGUF bytes that a guest supplies, made before llama.cpp opens them.

A GGUF file is a header of key/value metadata, tensor descriptions and the weights. Two things in it
matter to the host: keys that make llama.cpp open other files (`split.*`: a model in several files,
whose siblings llama.cpp derives from the path and opens), and the sizes from which llama.cpp sizes
its allocations (the vocabulary, every string array, the context: layers, heads and the training
context that caps `ctx-size`). `scan` walks the header without materialising it (the `gguf` package
would build an object per array element, which a hostile file turns into gigabytes) and `need`
estimates what a llama context over the file costs, so the flow's memory limit is checked before
llama.cpp allocates anything.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any, Optional

from .abi import NNDenied, NNError, NNFailure

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
MAX_KEY = 65535
# keys (after "<arch>.") whose values size a llama context
_SIZING = ("block_count", "embedding_length", "context_length", "feed_forward_length", "vocab_size",
           "attention.head_count", "attention.head_count_kv", "attention.key_length", "attention.value_length")
STRING_COST = 64  # bytes llama.cpp spends per string of a string array (std::string, vectors, maps)
TENSOR_COST = 512  # bytes per tensor description
KV_COST = 128  # bytes per metadata key


@dataclass(frozen=True)
class GgufInfo:
    """What the host needs to know about a guest's GGUF before llama.cpp reads it."""

    size: int  # bytes of the file (weights are mmapped: they count)
    tensors: int
    metadata: dict[str, Any] = field(default_factory=dict)  # architecture and the sizing keys
    vocab: int = 0  # tokens of the vocabulary
    overhead: int = 0  # bytes llama.cpp spends on the header beyond the file itself

    def value(self, key: str, default: int) -> int:
        arch = self.metadata.get("general.architecture", "")
        v = self.metadata.get(f"{arch}.{key}", default)
        return int(v) if isinstance(v, (int, float)) and v >= 0 else default

    def vocab_need(self) -> int:
        """Bytes to open the file for its vocabulary (no context yet)."""
        return self.size + self.overhead

    def context_need(self, n_ctx: int, n_batch: int, n_ubatch: int) -> int:
        """Bytes of a llama context: the file, the header, the KV cache (f16) and the compute buffers."""
        n_layer = max(1, self.value("block_count", 1))
        n_embd = max(1, self.value("embedding_length", 1))
        n_head = max(1, self.value("attention.head_count", 1))
        n_head_kv = max(1, self.value("attention.head_count_kv", n_head))
        k_len = max(1, self.value("attention.key_length", max(1, n_embd // n_head)))
        v_len = max(1, self.value("attention.value_length", k_len))
        n_ff = max(1, self.value("feed_forward_length", 4 * n_embd))
        n_vocab = max(self.vocab, self.value("vocab_size", 0))
        ub = max(1, min(n_ubatch, n_batch))
        kv = n_layer * n_ctx * n_head_kv * (k_len + v_len) * 2
        logits = n_vocab * 8 * 4  # llama.cpp computes logits only for the rows it outputs
        attention = n_head * n_ctx * ub * 4
        activations = (16 * n_embd + 3 * n_ff) * ub * 4
        return self.vocab_need() + kv + logits + attention + activations


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise NNFailure(NNError.INVALID_ARGUMENT, f"GGUF header runs past the end of the file at byte {self.pos}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> Any:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0]

    def string(self, limit: Optional[int] = None) -> bytes:
        n = self.unpack("Q")
        if limit is not None and n > limit:
            raise NNFailure(NNError.INVALID_ARGUMENT, f"GGUF key of {n} bytes at byte {self.pos}")
        return bytes(self.take(n))

    def skip_string(self) -> None:
        self.take(self.unpack("Q"))


def scan(data: bytes) -> GgufInfo:
    """Walk a GGUF header; refuse keys that name files; keep what sizes a context."""
    r = _Reader(data)
    if bytes(r.take(4)) != b"GGUF":
        raise NNFailure(NNError.INVALID_ARGUMENT, "not a GGUF file")
    version = r.unpack("I")
    if version not in (2, 3):
        raise NNFailure(NNError.INVALID_ARGUMENT, f"GGUF version {version} is not supported (2 or 3)")
    tensors, kv_count = r.unpack("Q"), r.unpack("Q")
    if kv_count > len(data) // 13 or tensors > len(data) // 24:
        raise NNFailure(NNError.INVALID_ARGUMENT, f"GGUF header claims {kv_count} keys and {tensors} tensors, more than the file holds")
    metadata: dict[str, Any] = {}
    strings = 0
    vocab = 0
    for _ in range(kv_count):
        key = r.string(MAX_KEY).decode("utf-8", "replace")
        if key.startswith("split."):
            raise NNDenied(NNError.INVALID_ARGUMENT, f"GGUF key {key!r} makes llama.cpp open other files; a guest's model must be one file")
        kind = r.unpack("I")
        sizing = key == "general.architecture" or key.endswith(_SIZING)
        if kind in _SCALARS:
            value = r.unpack(_SCALARS[kind])
            if sizing:
                metadata[key] = value
        elif kind == _STRING:
            value = r.string()
            if sizing:
                metadata[key] = value.decode("utf-8", "replace")
        elif kind == _ARRAY:
            elem, count = r.unpack("I"), r.unpack("Q")
            if elem in _SCALARS:
                width = struct.calcsize("<" + _SCALARS[elem])
                raw = r.take(count * width)
                if sizing and count and elem not in (6, 7, 12):
                    metadata[key] = max(struct.unpack_from(f"<{count}{_SCALARS[elem]}", raw))  # per-layer values: the largest
            elif elem == _STRING:
                if count * 8 > len(data) - r.pos:
                    raise NNFailure(NNError.INVALID_ARGUMENT, f"GGUF array {key!r} claims {count} strings, more than the file holds")
                for _ in range(count):
                    r.skip_string()
                strings += count
                if key == "tokenizer.ggml.tokens":
                    vocab = count
            else:
                raise NNFailure(NNError.INVALID_ARGUMENT, f"GGUF array {key!r} has element type {elem}")
        else:
            raise NNFailure(NNError.INVALID_ARGUMENT, f"GGUF key {key!r} has value type {kind}")
    overhead = strings * STRING_COST + tensors * TENSOR_COST + kv_count * KV_COST
    return GgufInfo(len(data), tensors, metadata, vocab, overhead)


def mib(n: float) -> str:
    return f"{n / 1024**2:.1f} MiB" if math.isfinite(n) else "unbounded"


__all__ = ["GgufInfo", "scan", "mib"]
