"""Fixtures shared by the whole test suite, in one place: the Rust guests (`guest_wasm`), each engine
usable here (`engine_name`, from engine_support.py), a PostgreSQL schema per test (`pg_url`), runtimes
closed at teardown (`make_runtime`), and no `wasmflow` subprocess outliving its test.

Helpers without state live beside it: guest_support.py (`write_wat`, the one way to write a WAT guest),
platform_support.py (servers on a thread, deliveries, `WasmflowProcess` for a real `wasmflow up` or
`worker`), engine_support.py, hostile_support.py."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import pytest
import sqlalchemy as sa

from engine_support import engine_name  # noqa: F401  (fixture: each engine usable here)
from optional_support import need_toolchain, require
from wasmflow.build import BuildError, Toolchain, build, workspace_crates

if TYPE_CHECKING:
    from wasmflow.flows.model import FlowsFile
    from wasmflow.runtime import Runtime

REPO = Path(__file__).resolve().parents[1]
GUEST_WORKSPACE = REPO / "guest-examples"


def require_toolchain() -> Toolchain:
    """The Rust WASI toolchain, or a skip saying how to install it; under CI (which installs it) a failure."""
    return need_toolchain()


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
    state = tmp_path_factory.mktemp("build-state")
    try:
        return build(None, GUEST_WORKSPACE, state, progress=False)
    except BuildError as exc:  # one crate that does not compile must not take every other guest's tests with it
        return _BuiltEach(state, exc)


class _BuiltEach(dict):
    """The guests built one by one after the workspace build failed; asking for one that does not
    build raises its BuildError, so only the tests of that crate fail (with cargo's output)."""

    def __init__(self, state: Path, failure: BuildError) -> None:
        super().__init__()
        self.failures: dict[str, BuildError] = {}
        for crate in workspace_crates(GUEST_WORKSPACE, require_toolchain(), state):
            if not crate.is_bin:
                continue
            try:
                self.update(build([crate.name], GUEST_WORKSPACE, state, progress=False))
            except BuildError as exc:
                self.failures[crate.name] = exc
        self.failure = failure

    def __missing__(self, name: str) -> Path:
        raise self.failures.get(name, self.failure)


PG_SKIP = "PostgreSQL not available (set WASMFLOW_TEST_POSTGRES_URL, or run `make test` to start one)"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a schema of its own, dropped after the test.

    The server is WASMFLOW_TEST_POSTGRES_URL (`make test` starts one); without it the test skips with
    the reason scripts/run-tests.sh found (WASMFLOW_TEST_POSTGRES_SKIP).
    """
    base = os.environ.get("WASMFLOW_TEST_POSTGRES_URL", "")
    require(bool(base), os.environ.get("WASMFLOW_TEST_POSTGRES_SKIP") or PG_SKIP)
    schema = f"t_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(base.replace("postgresql://", "postgresql+psycopg://", 1))
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in base else "?"
    yield f"{base}{sep}options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.execute(sa.text("SET LOCAL lock_timeout = '20s'"))  # a leaked connection fails the test, not hangs it
        conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


@pytest.fixture
def make_runtime(tmp_path: Path) -> Iterator[Callable[..., Runtime]]:
    """`make_runtime(directory, flows, database_url=None, engine=None)`: a Runtime over flows.yaml text
    or a FlowsFile (see platform_support.build_runtime), closed at teardown even when the test fails,
    so no engine thread, model or database connection outlives its test. Closing it earlier is fine."""
    from platform_support import build_runtime

    made: list[Runtime] = []

    def make(directory: Path, flows: "str | FlowsFile", database_url: Optional[str] = None,
             engine: Optional[str] = None) -> Runtime:
        runtime = build_runtime(directory, flows, database_url=database_url, engine=engine)
        close = runtime.close
        closed: list[bool] = []

        def close_once() -> None:  # the test may close it itself; teardown then leaves it be
            if not closed:
                closed.append(True)
                close()

        runtime.close = close_once  # type: ignore[method-assign]
        made.append(runtime)
        return runtime

    yield make
    for runtime in reversed(made):
        runtime.close()


@pytest.fixture(autouse=True)
def _no_wasmflow_process_left() -> Iterator[None]:
    """Kill any `wasmflow` subprocess (platform_support.WasmflowProcess) its test left running."""
    yield
    support = sys.modules.get("platform_support")  # only a test that imported it can have started one
    if support is not None:
        support.WasmflowProcess.kill_leftovers()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config._wasmflow_exitstatus = exitstatus  # type: ignore[attr-defined]


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave through exit_now once pytest has printed its summary (see wasmflow/process.py)."""
    from wasmflow.process import exit_now

    exit_now(int(getattr(config, "_wasmflow_exitstatus", 0)))
