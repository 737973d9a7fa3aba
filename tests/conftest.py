"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from wasmflow.build import BuildError, Toolchain, build, find_toolchain

REPO = Path(__file__).resolve().parents[1]
GUEST_WORKSPACE = REPO / "guest-examples"


def require_toolchain() -> Toolchain:
    """The Rust WASI toolchain, or a skip saying how to install it; under CI (which installs it) a failure."""
    try:
        return find_toolchain()
    except BuildError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def toolchain() -> Toolchain:
    return require_toolchain()


@pytest.fixture(scope="session")
def guest_wasm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every guest of `guest-examples/` built to wasm, once per session: package name -> .wasm path
    (`guest_wasm["hello"]`, `guest_wasm["hostile-loop"]`).

    Cargo keeps its build in `guest-examples/target`, so later sessions only rebuild what changed.
    Without a Rust WASI toolchain the tests that need guests are skipped, saying how to install one;
    a toolchain that fails to build them is a test error with cargo's output.
    """
    require_toolchain()
    return build(None, GUEST_WORKSPACE, tmp_path_factory.mktemp("build-state"), progress=False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config._wasmflow_exitstatus = exitstatus  # type: ignore[attr-defined]


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave through exit_now once pytest has printed its summary (see wasmflow/process.py)."""
    from wasmflow.process import exit_now

    exit_now(int(getattr(config, "_wasmflow_exitstatus", 0)))
