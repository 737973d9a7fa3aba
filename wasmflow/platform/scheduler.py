"""Cron triggers: turn due ticks into runs, exactly once per tick across every process.

croniter computes the ticks, in the trigger's time zone (so `0 9 * * MON` in Europe/Berlin follows
daylight saving time). The last tick handled per trigger is stored, so after a restart the scheduler knows
which ticks it missed: those within the trigger's `catch_up` window still run, older ones are counted as
missed and dropped. Each tick is an event whose dedupe key is flow + trigger + scheduled time, so even two
schedulers racing could not enqueue it twice; normally only one is active at all, elected through a
PostgreSQL advisory lock (a SQLite database is served by one process, which is always elected).

Overlap, when a tick comes while the flow's previous scheduled run is still queued or running:
`allow` enqueues it anyway, `skip` records it as skipped, `queue` stores it as `waiting` and the
scheduler releases it once the previous run is over.

A trigger that fails (its ticks cannot be computed, say a cron expression that never fires, or the
database refuses its writes) is isolated: the pass goes on with the other triggers. Each failed pass
counts in `wasmflow_schedule_ticks_total{outcome="failed"}`; the failure is logged once, and stored once
as a `failed` schedule event (see `wasmflow events`), until the trigger works again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Optional
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy as sa
from croniter import CroniterError, croniter

from wasmflow.flows.model import FlowsFile
from wasmflow.storage.schema import runs_table, schedule_state_table
from wasmflow.platform.metrics import Metrics
from wasmflow.platform.notify import notify_new_runs
from wasmflow.platform.store import QUEUED, RUNNING, WAITING, NewEvent, NewRun, insert_ignore, record_event

log = logging.getLogger("wasmflow.scheduler")

# A tick this late is still on time even with `catch_up: 0`: the loop wakes about once a second, and a
# restart that takes a few seconds should not drop the tick it straddled.
LATE_GRACE = 10.0
MAX_TICKS_PER_PASS = 1000


@dataclass(frozen=True)
class ScheduleSpec:
    flow: str
    cron: str
    timezone: str
    overlap: str
    catch_up: float
    max_attempts: int

    @property
    def key(self) -> str:
        return f"{self.cron}|{self.timezone}"


def schedule_specs(flows: FlowsFile) -> list[ScheduleSpec]:
    return [
        ScheduleSpec(flow=flow.name, cron=t.schedule.cron, timezone=t.schedule.timezone, overlap=t.schedule.overlap,
                     catch_up=t.schedule.catch_up, max_attempts=flow.retry.attempts)
        for flow in flows.flows for t in flow.on if t.schedule is not None
    ]


def tick_event(spec: ScheduleSpec, tick: datetime, state: str) -> NewEvent:
    iso = tick.isoformat()
    body = json.dumps({"flow": spec.flow, "cron": spec.cron, "timezone": spec.timezone, "scheduled_at": iso})
    runs = [] if state == "skipped" else [NewRun(
        flow=spec.flow, trigger="schedule", max_attempts=spec.max_attempts, idempotency_key=f"{spec.flow}@{iso}",
        state=state)]
    return NewEvent(
        source="schedule", name="schedule", headers={"x-wasmflow-scheduled-at": iso, "x-wasmflow-cron": spec.cron},
        body=body.encode(), status="skipped" if state == "skipped" else "accepted", runs=runs,
        dedupe_key=f"schedule:{spec.flow}:{spec.key}:{iso}",
        note="overlap: skip (the previous run is still going)" if state == "skipped" else None,
    )


class Scheduler:
    def __init__(self, db: sa.Engine, flows: FlowsFile, metrics: Optional[Metrics] = None,
                 on_enqueue: Optional[Callable[[], None]] = None) -> None:
        self.db = db
        self.specs = schedule_specs(flows)
        self.metrics = metrics or Metrics()
        self.on_enqueue = on_enqueue
        self.failing: dict[tuple[str, str], str] = {}  # (flow, trigger) -> the kind of failure, while it fails

    def tick(self, now: Optional[float] = None) -> list[str]:
        """One pass over every schedule trigger at time `now`; returns the ids of runs made runnable.

        One trigger's failure never stops the pass: the others still fire (see `_failed`)."""
        now = time.time() if now is None else now
        created: list[str] = []
        for spec in self.specs:
            try:
                created += self._tick_one(spec, now)
            except Exception as exc:  # noqa: BLE001 - isolated to this trigger, reported by _failed
                self._failed(spec, exc, now)
            else:
                if self.failing.pop((spec.flow, spec.key), None) is not None:
                    log.info("schedule of %s (cron %r) recovered; firing again", spec.flow, spec.cron)
        if created and self.on_enqueue:
            self.on_enqueue()
        return created

    def _failed(self, spec: ScheduleSpec, exc: Exception, now: float) -> None:
        """Count every failed pass; log and record a `failed` schedule event once per run of failures."""
        self.metrics.schedule_ticks.labels(flow=spec.flow, outcome="failed").inc()
        transient = isinstance(exc, sa.exc.SQLAlchemyError)
        if isinstance(exc, CroniterError):
            problem = f"cron {spec.cron!r} ({spec.timezone}) has no next time to fire ({exc})"
        elif isinstance(exc, ZoneInfoNotFoundError):
            problem = f"unknown time zone {spec.timezone!r}"
        elif transient:
            problem = f"the database refused the schedule's update ({exc.__class__.__name__})"
        else:
            problem = f"{exc.__class__.__name__}: {exc}"
        key, kind = (spec.flow, spec.key), exc.__class__.__name__
        if self.failing.get(key) == kind:
            return
        self.failing[key] = kind
        fix = ("trying again each pass" if transient else
               "fix this trigger in flows.yaml (`wasmflow validate` checks it) and restart")
        log.log(logging.WARNING if transient else logging.ERROR,
                "schedule of %s failed: %s; its ticks are not run, other schedules go on; %s "
                "(logged once until it recovers)", spec.flow, problem, fix)
        log.debug("schedule of %s: failure in detail", spec.flow, exc_info=exc)
        if transient:
            return  # the database is the problem: nothing useful can be stored in it now
        body = json.dumps({"flow": spec.flow, "cron": spec.cron, "timezone": spec.timezone, "error": problem})
        event = NewEvent(source="schedule", name="schedule", headers={"x-wasmflow-cron": spec.cron[:200]},
                         body=body.encode(), status="failed", received_at=now,
                         note=f"schedule of {spec.flow} failed: {problem}; {fix}")
        try:
            with self.db.begin() as conn:
                record_event(conn, event)
        except sa.exc.SQLAlchemyError as db_exc:
            log.warning("schedule of %s: could not record the failure (%s)", spec.flow, db_exc.__class__.__name__)

    def _tick_one(self, spec: ScheduleSpec, now: float) -> list[str]:
        tz = ZoneInfo(spec.timezone)
        r, s = runs_table, schedule_state_table
        with self.db.begin() as conn:
            last = conn.execute(
                sa.select(s.c.last_tick).where(s.c.flow == spec.flow, s.c.trigger == spec.key)
            ).scalar()
            if last is None:  # first sight of this trigger: start from now, fire nothing from the past
                first = croniter(spec.cron, datetime.fromtimestamp(now, tz)).get_prev(datetime).timestamp()
                insert_ignore(conn, s, dict(flow=spec.flow, trigger=spec.key, last_tick=first, updated_at=now))
                return []
            due: list[datetime] = []
            it = croniter(spec.cron, datetime.fromtimestamp(last, tz))
            while len(due) < MAX_TICKS_PER_PASS:
                nxt = it.get_next(datetime)
                if nxt.timestamp() > now:
                    break
                due.append(nxt)
            active = conn.execute(
                sa.select(r.c.id, r.c.state).where(r.c.flow == spec.flow, r.c.trigger == "schedule",
                                                   r.c.state.in_([QUEUED, RUNNING, WAITING]))
                .order_by(r.c.created_at)
            ).all()
            released = self._release_waiting(conn, active)
            if not due:
                if released:
                    notify_new_runs(conn)
                return released
            window = max(spec.catch_up, LATE_GRACE)
            on_time = [t for t in due if t.timestamp() >= now - window]
            missed = len(due) - len(on_time)
            if missed:
                self.metrics.schedule_ticks.labels(flow=spec.flow, outcome="missed").inc(missed)
                log.warning("schedule of %s: %d tick(s) missed while down, older than the catch-up window "
                            "of %.0fs; not run", spec.flow, missed, spec.catch_up)
            busy = bool(released) or any(row.state in (QUEUED, RUNNING) for row in active)
            plan: list[tuple[datetime, str]] = []
            if spec.overlap == "allow":
                plan = [(t, QUEUED) for t in on_time]
            elif spec.overlap == "skip":
                run_last = on_time and not busy
                plan = [(t, "skipped") for t in (on_time[:-1] if run_last else on_time)]
                if run_last:
                    plan.append((on_time[-1], QUEUED))
            else:  # queue: one at a time, oldest first
                waiting = busy or any(row.state == WAITING for row in active)
                for t in on_time:
                    plan.append((t, WAITING if waiting else QUEUED))
                    waiting = True
            created = list(released)
            for t, state in plan:
                recorded = record_event(conn, tick_event(spec, t, state))
                outcome = "skipped" if state == "skipped" else "enqueued"
                if not recorded.duplicate:
                    self.metrics.schedule_ticks.labels(flow=spec.flow, outcome=outcome).inc()
                    if state == QUEUED:
                        created += recorded.run_ids
            conn.execute(s.update().where(s.c.flow == spec.flow, s.c.trigger == spec.key)
                         .values(last_tick=due[-1].timestamp(), updated_at=now))
            if created:
                notify_new_runs(conn)
        return created

    def _release_waiting(self, conn: sa.Connection, active: list[sa.Row]) -> list[str]:
        """Under `overlap: queue`: when nothing of the flow is queued or running, let the oldest waiting run go."""
        if any(row.state in (QUEUED, RUNNING) for row in active):
            return []
        waiting = [row for row in active if row.state == WAITING]
        if not waiting:
            return []
        r = runs_table
        conn.execute(r.update().where(r.c.id == waiting[0].id, r.c.state == WAITING)
                     .values(state=QUEUED, available_at=time.time()))
        return [waiting[0].id]

    def run(self, stop: threading.Event, election: "Election", interval: float = 1.0) -> None:
        """Loop until `stop`: while elected, one pass per `interval`; otherwise try to become elected."""
        leader = False
        while not stop.is_set():
            try:
                if not leader:
                    leader = election.try_acquire()
                    if leader:
                        log.info("scheduler active (%d schedule trigger(s))", len(self.specs))
                elif not election.still_held():
                    leader = False
                    log.warning("scheduler lock lost; standing by")
                if leader:
                    self.tick()
            except Exception:
                log.exception("scheduler pass failed")
                leader = False
                election.release()
            stop.wait(interval if leader else max(interval, 2.0))
        election.release()


class Election:
    """Who may run the scheduler. `try_acquire` must not block; a holder keeps it until `release`."""

    def try_acquire(self) -> bool:
        raise NotImplementedError

    def still_held(self) -> bool:
        return True

    def release(self) -> None:
        return None


class PostgresElection(Election):
    """A session-level advisory lock on a dedicated connection: held while the connection lives, so a
    process that dies (SIGKILL included) frees it and another worker takes over within seconds."""

    KEY = 0x77666C6F77  # "wflow"

    def __init__(self, db: sa.Engine) -> None:
        self.db = db
        self._conn: Optional[sa.Connection] = None

    def try_acquire(self) -> bool:
        conn = self.db.connect()
        got = bool(conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": self.KEY}).scalar())
        conn.commit()
        if got:
            self._conn = conn
        else:
            conn.close()
        return got

    def still_held(self) -> bool:
        if self._conn is None:
            return False
        try:
            self._conn.execute(sa.text("SELECT 1")).scalar()
            self._conn.commit()
            return True
        except sa.exc.SQLAlchemyError:
            self.release()
            return False

    def release(self) -> None:
        if self._conn is not None:
            try:
                self._conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": self.KEY})
                self._conn.commit()
                self._conn.close()
            except sa.exc.SQLAlchemyError:
                self._conn.invalidate()
            self._conn = None

