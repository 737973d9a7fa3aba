"""The host: the capabilities offered to guests, built once per process.

`Host` gathers each capability's engine-neutral `HostFunction`s; engines adapt them. Adding a capability
means writing one module and listing it in `Host.default`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Optional

from .spec import Capability, HostFunction, RunContext

log = logging.getLogger("wasmflow.host")


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
    def default(cls, db=None, state_dir: Optional[Path] = None, extra: Iterable[Capability] = ()) -> "Host":  # type: ignore[no-untyped-def]
        """The standard capabilities over the given database (SQLite in `state_dir` if none)."""
        from wasmflow.storage import default_url, open_database

        from .config import ConfigCapability
        from .core import CoreCapability
        from .http import HttpCapability
        from .kv import KeyValueCapability, KeyValueStore
        from .transcript import TranscriptCapability

        if db is None:
            db = open_database(default_url(state_dir or Path(".wasmflow")))
        return cls([CoreCapability(), ConfigCapability(), KeyValueCapability(KeyValueStore(db)), HttpCapability(),
                    TranscriptCapability(), *extra])

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
