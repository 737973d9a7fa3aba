"""What the platform hands the console: the store, the flows, and the actions it may take.

The console is below `wasmflow.platform` in the package's layers, so it cannot import the queue: the
platform builds a `ConsoleServices` with its own replay and cancel (and the transcript reader, once
that exists), and the console calls them. Tests and other servers can build one the same way.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import sqlalchemy as sa
from croniter import croniter

from wasmflow.build import resolve_module
from wasmflow.console.queries import flow_stats
from wasmflow.flows.model import FlowsFile


class ActionError(Exception):
    """An action the console cannot do as asked (a replay of a running run, an unknown id): shown as is."""


@dataclass
class ConsoleServices:
    db: sa.Engine
    flows: FlowsFile
    base_dir: Any = None  # where flows.yaml's relative module paths start
    replay: Optional[Callable[[str], list[str]]] = None  # run id or delivery id -> new run ids; raises on refusal
    replay_errors: tuple[type[BaseException], ...] = ()  # exceptions of `replay` whose message is for the operator
    cancel: Optional[Callable[[str, str], Any]] = None  # (run id, by) -> a result with .outcome/.state/.run_id
    transcript: Optional[Callable[[str], Optional[list[dict[str, Any]]]]] = None  # run id -> host activity
    models: Optional[Callable[[], dict[str, dict[str, Any]]]] = None  # the WASI-NN registry's stats()
    ingress_counts: Optional[Callable[[], dict[str, float]]] = None  # events received by outcome (duplicates)
    engine: str = "wasmtime"
    _digests: dict[str, tuple[float, str]] = field(default_factory=dict, repr=False)

    def module_digest(self, module: str) -> Optional[str]:
        """The sha256 of a flow's built module (cached by modification time), or None when it is not built."""
        try:
            path = resolve_module(module, self.base_dir)
            mtime = os.stat(path).st_mtime
        except (OSError, ValueError, TypeError):
            return None
        cached = self._digests.get(str(path))
        if cached and cached[0] == mtime:
            return cached[1]
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        self._digests[str(path)] = (mtime, digest)
        return digest

    def flow_summaries(self, now: Optional[float] = None) -> list[dict[str, Any]]:
        """Each flow: triggers, capabilities, engine, module digest, last run, 24-hour counts, next fire."""
        now = time.time() if now is None else now
        stats = flow_stats(self.db, [f.name for f in self.flows.flows], now)
        out = []
        for flow in self.flows.flows:
            triggers, next_fire = [], None
            for trigger in flow.on:
                if trigger.github is not None:
                    triggers.append("github: " + ", ".join(trigger.github.events) + " on " + ", ".join(trigger.github.repos))
                if trigger.schedule is not None:
                    triggers.append(f"schedule: {trigger.schedule.cron} ({trigger.schedule.timezone})")
                    fire = _next_fire(trigger.schedule.cron, trigger.schedule.timezone, now)
                    if fire is not None and (next_fire is None or fire < next_fire):
                        next_fire = fire
                if trigger.http is not None:
                    triggers.append(f"http: {', '.join(trigger.http.methods)} /flows/{flow.name}")
            allow = flow.allow
            capabilities = []
            if allow.http:
                capabilities.append("http: " + ", ".join(allow.http))
            if allow.github:
                capabilities.append("github: " + ", ".join(f"{k}={v}" for k, v in allow.github.items()))
            if allow.kv:
                capabilities.append("kv")
            if allow.models:
                capabilities.append("models: " + ", ".join(allow.models))
            if allow.dirs:
                capabilities.append("dirs: " + ", ".join(allow.dirs))
            if flow.secrets:
                capabilities.append(f"secrets: {len(flow.secrets)}")  # their names only count, never values
            s = stats[flow.name]
            out.append({"name": flow.name, "module": flow.module, "engine": flow.engine or self.engine,
                        "digest": self.module_digest(flow.module), "triggers": triggers,
                        "capabilities": capabilities, "last_run_at": s.last_run_at, "last_state": s.last_state,
                        "last_status": s.last_status, "runs_24h": s.runs_24h, "failures_24h": s.failures_24h,
                        "next_fire": next_fire, "max_attempts": flow.retry.attempts})
        return out

    def model_stats(self) -> dict[str, dict[str, Any]]:
        """The registry's numbers per model, read defensively: a back end may report more or fewer keys."""
        if self.models is None:
            return {}
        try:
            stats = self.models()
        except Exception as exc:  # a pool being rebuilt, a back end that failed to load
            return {"(unavailable)": {"error": str(exc)[:200]}}
        return {str(name): (dict(values) if isinstance(values, dict) else {"value": values})
                for name, values in (stats or {}).items()}


def _next_fire(cron: str, timezone: str, now: float) -> Optional[float]:
    from datetime import datetime
    from zoneinfo import ZoneInfo

    try:
        return croniter(cron, datetime.fromtimestamp(now, ZoneInfo(timezone))).get_next(datetime).timestamp()
    except Exception:  # validated at load; a zone missing from this machine's tzdata
        return None
