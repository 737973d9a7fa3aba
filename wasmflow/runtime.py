"""The composition root: one flows.yaml turned into a host, engines and loaded modules.

The CLI (`wasmflow run`), the workers of the control plane and the benchmarks all run flows through a
`Runtime`, so a flow behaves the same whichever way it is started. Process-wide things (the database,
capabilities, compiled modules, models) are built once here and shared by every run.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Iterable, Optional

import sqlalchemy as sa

from wasmflow.build import resolve_module
from wasmflow.engine import Engine, LoadedModule, ModuleError, RunRequest, RunResult, Status, make_engine
from wasmflow.flows.model import Flow, FlowsFile
from wasmflow.host_functions import STANDARD, Host
from wasmflow.host_functions.spec import Capability, Event, Setup
from wasmflow.storage import default_url, open_database

log = logging.getLogger("wasmflow.runtime")


def capabilities() -> tuple[type[Capability], ...]:
    """Every capability a runtime offers, in order: the host layer's STANDARD ones, then WASI-NN (its
    model registry is shared with the LLM host functions after it), GitHub and LLM. All are present
    whatever flows.yaml says, so a guest calling one without its section is refused, never unlinked."""
    from wasmflow.host_functions.github import GithubCapability
    from wasmflow.host_functions.llm import LlmCapability
    from wasmflow.wasi_nn.host import WasiNNCapability

    return (*STANDARD, WasiNNCapability, GithubCapability, LlmCapability)


class Runtime:
    def __init__(
        self,
        flows: FlowsFile,
        base_dir: Path,
        database_url: Optional[str] = None,
        engine_override: Optional[str] = None,
        extra_capabilities: Iterable[Capability] = (),
        db: Optional[sa.Engine] = None,
    ) -> None:
        self.flows = flows
        self.base_dir = Path(base_dir)
        self.state_dir = (self.base_dir / flows.state_dir).resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.db = db if db is not None else open_database(database_url or default_url(self.state_dir))
        setup = Setup(flows=flows, base_dir=self.base_dir, state_dir=self.state_dir, db=self.db)
        self.host = Host.build(setup, capabilities(), extra_capabilities)
        self.engine_override = engine_override
        self._engines: dict[str, Engine] = {}
        self._modules: dict[str, LoadedModule] = {}
        self._lock = threading.Lock()

    def engine_for(self, flow: Flow) -> Engine:
        name = self.engine_override or flow.engine or self.flows.engine
        with self._lock:
            if name not in self._engines:
                self._engines[name] = make_engine(name, self.host, self.state_dir / "cache")
            return self._engines[name]

    def module_for(self, flow: Flow) -> LoadedModule:
        """The flow's compiled, linked module; compiled once per process (and cached on disk)."""
        key = f"{flow.name}@{self.engine_override or flow.engine or self.flows.engine}"
        with self._lock:
            cached = self._modules.get(key)
        if cached is not None:
            return cached
        try:
            path = resolve_module(flow.module, self.base_dir)
        except (FileNotFoundError, ValueError) as exc:
            raise ModuleError(f"flow {flow.name!r}: {exc}") from None
        module = self.engine_for(flow).load(path, flow.name)
        with self._lock:
            self._modules[key] = module
        return module

    def prepare(self) -> list[str]:
        """Build the engines and load every flow's module now; returns what could not be loaded.

        A server calls this at start-up so that its first event does not pay for creating an engine and
        loading a module (about 3 ms with a warm cache, against 0.2 ms for a run); a module that cannot
        load is logged here and still reported as `invalid` by each run of its flow.
        """
        problems = []
        for flow in self.flows.flows:
            try:
                self.module_for(flow)
            except Exception as exc:  # a missing build, an absent libwasmedge: the runs will say so
                problems.append(f"{flow.name}: {exc}")
        return problems

    def invalidate(self, flow_name: Optional[str] = None) -> None:
        """Forget loaded modules (after a rebuild) so the next run loads the new one."""
        with self._lock:
            for key in list(self._modules):
                if flow_name is None or key.split("@")[0] == flow_name:
                    del self._modules[key]

    def run(self, flow_name: str, event: Event, run_id: Optional[str] = None, attempt: int = 1, **kw) -> RunResult:  # type: ignore[no-untyped-def]
        """Run a flow once. A module that cannot load is a result with status `invalid`, not an exception."""
        flow = self.flows.flow(flow_name)
        if run_id:
            kw["run_id"] = run_id
        request = RunRequest(flow=flow, event=event, attempt=attempt, **kw)
        try:
            module = self.module_for(flow)
        except ModuleError as exc:
            return RunResult(status=Status.INVALID, run_id=request.run_id, error=str(exc))
        return self.engine_for(flow).run(module, request)

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()
        self.host.close()
        self.db.dispose()
