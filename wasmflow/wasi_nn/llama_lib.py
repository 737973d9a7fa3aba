"""llama-cpp-python itself, imported once and quietly.

A module of its own so that both the context pools (`ggml_pool`) and the batch scheduler
(`batch_scheduler`) can load the library without importing each other.
"""

from __future__ import annotations

import os

from .abi import NNError, NNFailure

_quiet = False


def load_llama_cpp():  # type: ignore[no-untyped-def]
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
