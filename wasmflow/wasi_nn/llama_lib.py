"""llama-cpp-python itself, imported once and quietly.

A module of its own so that both the context pools (`ggml_pool`) and the batch scheduler
(`batch_scheduler`) can load the library without importing each other.
"""

from __future__ import annotations

import os

from .abi import NNError, NNFailure

_quiet = False

# libgomp's waiting defaults, read once when llama.cpp's CPU library loads it (see `openmp_defaults`).
OPENMP_DEFAULTS = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}


def openmp_defaults() -> None:
    """Keep llama.cpp's OpenMP threads spinning briefly between the steps of a graph, even when several
    threads of this process have used llama.cpp.

    Why: ggml's CPU back end ends every graph node with an OpenMP barrier. libgomp spins about 3 ms
    at a barrier, but once the threads of all OpenMP teams outnumber the cores (two Python threads
    that each ran a decode: a pooled context and the batch scheduler, or an embedding model) it spins
    only 100 times and then sleeps in the kernel at each of the hundreds of barriers of a decode.
    Measured on 2 cores with Gemma 3 270M: one stream 62 -> 81 tokens/s, four batched 99 -> 116. With
    OMP_WAIT_POLICY=ACTIVE and an explicit spin count, an unthrottled barrier spins the same 3 ms as
    libgomp's default (so idle threads still sleep) and a throttled one 1,000 times. Values the
    operator set are kept. Must run before llama_cpp is imported: libgomp reads them when loaded."""
    for key, value in OPENMP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def load_llama_cpp():  # type: ignore[no-untyped-def]
    """Import llama_cpp lazily: the package is optional and its import loads a large shared library."""
    openmp_defaults()
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
