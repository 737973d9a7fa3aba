"""Which engines a test may use here: wasmtime always; WasmEdge where a supported libwasmedge loads."""

from __future__ import annotations

import pytest

from optional_support import require, skip_unless
from wasmflow.engine import ENGINES, wasmedge_capi

WASMEDGE_SKIP = "libwasmedge not found (set WASMFLOW_WASMEDGE_LIB)"


def wasmedge_problem() -> str | None:
    """None where a supported libwasmedge loads; otherwise why not."""
    try:
        wasmedge_capi.load()
    except wasmedge_capi.WasmEdgeUnavailable as exc:
        return str(exc)
    return None


def skip_without(name: str) -> None:
    if name == "wasmedge":
        problem = wasmedge_problem()
        if problem is None:
            return
        # not installed: the fixed reason CI looks for
        skip_unless(not ("not found" in problem or "names no" in problem), WASMEDGE_SKIP)
        # present but unusable (a wrong version, a broken build): say why; under CI a failure
        require(problem is None, f"libwasmedge is present but cannot be used: {problem}")


@pytest.fixture(params=list(ENGINES))
def engine_name(request: pytest.FixtureRequest) -> str:
    """The fixture `engine_name` (conftest.py offers it to every test): the test runs once per engine,
    and the WasmEdge half skips where libwasmedge is absent."""
    skip_without(request.param)
    return request.param
