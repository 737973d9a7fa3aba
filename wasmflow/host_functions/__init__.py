"""The host: the capabilities offered to guests, built once per process.

`Host` gathers each capability's engine-neutral `HostFunction`s; engines adapt them. Each capability
builds itself from its flows.yaml section (`Capability.build(setup)`); `Host.build` makes a host from
a list of capability classes, in order. `STANDARD` is the list of this layer; the runtime appends the
ones bound to inference back ends and to GitHub. Adding a capability means writing one module and
listing its class once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Optional

from .config import ConfigCapability
from .core import CoreCapability
from .http import HttpCapability
from .kv import KeyValueCapability
from .spec import Capability, HostFunction, RunContext, Setup
from .transcript import TranscriptCapability

log = logging.getLogger("wasmflow.host")

# The capabilities of this layer, in the order hosts list them.
STANDARD: tuple[type[Capability], ...] = (CoreCapability, ConfigCapability, KeyValueCapability, HttpCapability,
                                          TranscriptCapability)


class Host:
    def __init__(self, capabilities: Iterable[Capability]) -> None:
        self.capabilities = list(capabilities)
        names = [c.name for c in self.capabilities]
        if len(set(names)) != len(names):
            raise ValueError(f"capability listed twice: {names}")
        # Only capabilities with per-run state take part in every run's open/close (the hot path).
        self._openers = [c for c in self.capabilities if type(c).open_run is not Capability.open_run]
        self._closers = [c for c in self.capabilities if type(c).close_run is not Capability.close_run]

    @classmethod
    def build(cls, setup: Setup, kinds: Iterable[type[Capability]], extra: Iterable[Capability] = ()) -> "Host":
        """Each capability of `kinds` built from `setup`, in order (later ones see earlier ones in
        `setup.built`), then the ready-made `extra` ones (a test's probe, a caller's own)."""
        for kind in kinds:
            capability = kind.build(setup)
            if capability.name in setup.built:
                raise ValueError(f"capability listed twice: {capability.name}")
            setup.built[capability.name] = capability
        return cls([*setup.built.values(), *extra])

    @classmethod
    def default(cls, db=None, state_dir: Optional[Path] = None, extra: Iterable[Capability] = ()) -> "Host":  # type: ignore[no-untyped-def]
        """The STANDARD capabilities, no flows.yaml, over the given database (SQLite in `state_dir` if
        none): what an engine needs to run a guest without a runtime (engine tests, benches)."""
        from wasmflow.storage import default_url, open_database

        state = Path(state_dir or ".wasmflow")
        if db is None:
            db = open_database(default_url(state))
        return cls.build(Setup(flows=None, base_dir=state, state_dir=state, db=db), STANDARD, extra)

    def capability(self, name: str) -> Capability:
        for cap in self.capabilities:
            if cap.name == name:
                return cap
        raise KeyError(name)

    def functions(self) -> list[HostFunction]:
        return [fn for cap in self.capabilities for fn in cap.functions()]

    def open_run(self, run: RunContext) -> None:
        for cap in self._openers:
            cap.open_run(run)

    def close_run(self, run: RunContext) -> None:
        for cap in self._closers:
            try:
                cap.close_run(run)
            except Exception:  # one capability's cleanup must not skip the others'
                log.exception("closing %s for run %s", cap.name, run.run_id)

    def close(self) -> None:
        for cap in self.capabilities:
            cap.close()
