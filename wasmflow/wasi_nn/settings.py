"""WASI-NN's sections of flows.yaml: the file's `models:` and a flow's `allow.models` and `allow.nn`.

The capability owns them, as kv owns `allow.kv`; flows/model.py assembles them into the file's schema
(`Allow` is made of the capabilities' parts) and checks that each model a flow allows is defined.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from wasmflow.fields import Option, Section, Size, check_options

# Options the platform reads from `models.*.options`: name -> (kind, low, high).
GGML_OPTIONS: dict[str, Option] = {
    "n-gpu-layers": ("int", -1, 100_000), "main-gpu": ("int", 0, 1024), "ctx-size": ("int", 0, 4_194_304),
    "batch-size": ("int", 1, 4_194_304), "ubatch-size": ("int", 1, 4_194_304), "threads": ("int", 1, 1024),
    "parallel": ("int", 1, 64), "n-predict": ("int", -2, 4_194_304), "top-k": ("int", 0, 1_000_000),
    "seed": ("int", -1, 2**32 - 1), "temp": ("number", 0, 100), "top-p": ("number", 0, 1),
    "min-p": ("number", 0, 1), "repeat-penalty": ("number", 0, 100), "presence-penalty": ("number", -100, 100),
    "frequency-penalty": ("number", -100, 100), "embedding": ("bool", None, None),
    "stream-stdout": ("bool", None, None), "ignore-eos": ("bool", None, None), "enable-log": ("bool", None, None),
    "enable-debug-log": ("bool", None, None),
    # continuous batching (wasi_nn/batch_scheduler.py)
    "batching": ("bool", None, None), "sequences": ("int", 1, 64), "kv-size": ("int", 16, 4_194_304),
    "prefix-cache-mib": ("int", 0, 65_536),
}
_GGML_ALIASES = {"ngl": "n-gpu-layers"}
ONNX_OPTIONS: dict[str, Option] = {"threads": ("int", 1, 1024)}


def ggml_option_name(key: str) -> str:
    """An option's canonical name: `ngl` and `ctx_size` are written `n-gpu-layers` and `ctx-size`."""
    return _GGML_ALIASES.get(key, key.replace("_", "-"))


class ModelSpec(Section):
    """One entry of the file's `models:`: a model file and the back end that serves it."""

    backend: Literal["ggml", "onnx"]
    path: str
    target: Literal["cpu", "gpu", "auto"] = "auto"
    options: dict[str, Any] = {}

    @model_validator(mode="after")
    def _options(self) -> "ModelSpec":
        if self.backend == "ggml":
            check_options(self.options, GGML_OPTIONS, ggml_option_name)
        else:
            check_options(self.options, ONNX_OPTIONS)
        return self


class NnAllow(Section):
    """`allow.nn:` what a flow may do through WASI-NN beyond the named models of `allow.models`.

    Loading a graph from bytes (or from a file in `allow.dirs`) hands a guest-chosen model to ONNX
    Runtime's and llama.cpp's parsers, so it is a capability of its own, off unless granted.
    """

    load_bytes: bool = False
    max_bytes: Size = Field(default=64 * 1024**2, ge=1, le=4 * 1024**3)  # largest model a guest may load


class WasiNnAllow(Section):
    """The capability's part of a flow's `allow:`."""

    models: list[str] = []  # names from the file's `models:` the flow may load
    nn: NnAllow = NnAllow()
