"""`wasmflow replay --dead`: queue a replay of every dead run matching a filter (the console's bulk replay).

Online: the replays are queued in the store for a running `wasmflow up` or worker, like `wasmflow replay
RUN`. A dead run that a later replay has already taken over is left out, so running the same command twice
replays the replays that died, not the originals again.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Optional

import sqlalchemy as sa

from wasmflow.console.queries import RunFilter, dead_run_ids
from wasmflow.flows.model import FlowsFile

MAX_BULK = 10_000
_PERIOD = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class SinceError(ValueError):
    pass


def parse_since(text: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """`7d`, `12h`, `30m` (ago), or a unix time in seconds; None for None."""
    if text is None or not text.strip():
        return None
    match = _PERIOD.match(text)
    if match:
        return (time.time() if now is None else now) - float(match.group(1)) * _SECONDS[match.group(2)]
    try:
        value = float(text)
    except ValueError:
        raise SinceError(f"--since takes a period (30m, 12h, 7d) or a unix time, got {text[:40]!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise SinceError("--since must be a finite time")
    return value


@dataclass
class BulkReplay:
    matched: int
    queued: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (run id, why)


def replay_dead(db: sa.Engine, flows: Optional[FlowsFile], f: RunFilter, dry_run: bool = False) -> BulkReplay:
    """Queue a replay of each dead run matching `f` (oldest first, at most MAX_BULK)."""
    from wasmflow.platform.queue import ReplayError, replay

    ids = dead_run_ids(db, f, cap=MAX_BULK)
    result = BulkReplay(matched=len(ids))
    if dry_run:
        return result
    for run_id in ids:
        try:
            result.queued.extend(replay(db, run_id, flows))
        except ReplayError as exc:
            result.failed.append((run_id, str(exc)))
    return result
