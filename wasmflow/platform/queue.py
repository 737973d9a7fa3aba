"""The durable run queue: claim with a lease, finish, retry with backoff, recover, replay.

At-least-once, the way procrastinate, graphile-worker and Oban do it: a run is claimed by setting a lease
(owner + expiry) in one UPDATE, `FOR UPDATE SKIP LOCKED` on PostgreSQL so concurrent workers never wait
on or take the same row; on SQLite the UPDATE itself is atomic and the database has a single writer.
Every state change checks the lease owner, so a worker whose lease was taken over cannot overwrite the
run. A run whose worker died is taken again when its lease expires.

A run keeps its place in the queue (`available_at`) when it is released or taken back from a dead
worker, so it is claimed again before runs stored after it; only a retry's backoff moves it. Every claim
counts an execution (`executions`), which the guest sees and which never repeats for a run, whereas
the attempt is given back when a run is released unstarted or cut by a shutdown.
"""

from __future__ import annotations

import functools
import json
import random
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional

import sqlalchemy as sa

from wasmflow.engine.base import RunResult, Status
from wasmflow.flows.model import FlowsFile, Retry
from wasmflow.host_functions.spec import Event
from wasmflow.storage.driver import (RELAXED_COMMIT, DriverStatement, driver_errors, driver_transaction, in_slots,
                                     slot_params)
from wasmflow.storage.schema import attempts_table, events_table, runs_table
from wasmflow.storage.sqlite_writes import take_write_turn
from wasmflow.storage.text import storable_text
from wasmflow.platform.cancel import CancelResult, cancel_reason, notify_cancel
from wasmflow.platform.notify import notify_new_runs
from wasmflow.platform.store import (DEAD, DONE, QUEUED, RUNNING, WAITING, NewRun, encode_logs, insert_many, new_id,
                                     run_row)

if TYPE_CHECKING:
    from wasmflow.platform.concurrency import Admission

_RUN_REF = re.compile(r"[0-9A-Za-z]{1,64}")

# A run whose worker vanished this many times is dead: a guest that takes its host process down (an
# out-of-memory kill, say) must not take down every worker in turn forever.
MAX_LEASE_LOSSES = 3


@dataclass(frozen=True)
class ClaimedRun:
    id: str
    flow: str
    attempt: int
    max_attempts: int
    trigger: str
    event: Event
    event_id: str
    # The claim's number among all claims of the run (releases and lease losses included): 1, 2, ...
    execution: int = 1


class _ClaimedRow(NamedTuple):
    """What a claim's RETURNING gives for each run (`Queue._claimed_columns` are these columns)."""

    id: str
    event_id: str
    flow: str
    attempt: int
    max_attempts: int
    trigger: str
    idempotency_key: Optional[str]
    executions: int
    available_at: float


@functools.lru_cache(maxsize=None)
def _claimed_events(dialect: sa.Dialect, n: int) -> DriverStatement:
    """The events of claimed runs, `n` ids (`in_slots`): id, name, headers, body."""
    e = events_table
    return DriverStatement(sa.select(e.c.id, e.c.name, e.c.headers, e.c.body).where(
        e.c.id.in_(slot_params(n))), dialect)


@dataclass(frozen=True)
class Outcome:
    """One attempt's result on its way to the store, and the status it is filed under.

    `reclassified` replaces the result's status when the run's classification differs from the guest's
    (a guest that failed after an upstream failure, a host failure around the run: `upstream`).
    """

    run: ClaimedRun
    result: RunResult
    retry: Retry
    reclassified: Optional[Status] = None

    @property
    def status(self) -> Status:
        return self.reclassified if self.reclassified is not None else self.result.status


@dataclass(frozen=True)
class Finish:
    """What `finish` did: the new queue state and, for a retry, when it will be tried again."""

    state: str  # done | queued (a retry) | dead | lost (the lease was no longer ours)
    delay: float = 0.0


def backoff_delay(retry: Retry, attempt: int, rng: Callable[[], float] = random.random) -> float:
    """Seconds before the next attempt after `attempt` failed: exponential (or fixed) with equal jitter.

    Half the delay is fixed and half random, so retries of many runs that failed together (an upstream
    outage) spread out instead of arriving together, while none comes back almost at once.
    """
    base = retry.initial if retry.backoff == "fixed" else retry.initial * (2 ** max(attempt - 1, 0))
    base = min(base, retry.max)
    return base / 2 + rng() * base / 2


def is_retryable(status: Status, retry: Retry) -> bool:
    """Whether `retry.on` names the status. `ok`, `invalid` (a module that does not load: configuration,
    never retried) and `lost` cannot be named there (flows.yaml refuses them)."""
    return status.value in retry.on


class Queue:
    """One worker's handle on the queue; `owner` names it in leases and in the attempts table."""

    def __init__(self, db: sa.Engine, owner: str, lease_seconds: float = 30.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.clock = clock
        self.postgres = db.dialect.name == "postgresql"
        self.governed: dict[str, Any] = {}  # flow -> concurrency.Policy, for flows whose runs are admitted

    def govern(self, flows: Optional[FlowsFile]) -> None:
        """Apply the concurrency, debounce, rate and budget settings of `flows` in `admit` and `claim`.

        A queue that governs a flow never claims a run of it that has not been admitted."""
        from wasmflow.platform.concurrency import policies

        self.governed = policies(flows) if flows is not None else {}

    def admit(self) -> "Admission":
        """Admit the new runs of governed flows (platform/concurrency.py): key, rate, debounce, conflicts."""
        from wasmflow.platform.concurrency import Admission, admit

        if not self.governed:
            return Admission()
        with self.db.begin() as conn:
            return admit(conn, self.governed, self.clock())

    _claimed_columns = tuple(runs_table.c[name] for name in _ClaimedRow._fields)

    def _claim_statement(self) -> DriverStatement:
        """`claim`'s UPDATE of due runs, built and compiled once per set of governed flows (its bind
        parameters: c_now, c_limit, c_expires). Building it on every claim cost the claim loop more than
        running it (py-spy, `up` under a burst)."""
        cached = self.__dict__.get("_claim_cache")
        if cached is not None and cached[0] is self.governed:
            return cached[1]
        r = runs_table
        now = sa.bindparam("c_now")
        where: list[sa.ColumnElement[bool]] = [r.c.state == QUEUED, r.c.available_at <= now]
        limited = [name for name, p in self.governed.items() if p.limit is not None]
        if self.governed:  # not admitted yet, or under a per-key limit (claimed by `claim_limited`): not here
            # each name a bound value of its own: a DriverStatement takes no expanding list
            governed, unlimited_only = ([sa.literal(n) for n in names] for names in (self.governed, limited or [""]))
            where.append(sa.or_(r.c.flow.not_in(governed),
                                sa.and_(r.c.concurrency_key.is_not(None), r.c.flow.not_in(unlimited_only))))
        picked = self._picked(*where, order=r.c.available_at, limit=sa.bindparam("c_limit", type_=sa.Integer))
        statement = DriverStatement(
            r.update().where(picked, r.c.state == QUEUED).values(**self._lease(started_at=now))
            .returning(*self._claimed_columns), self.db.dialect)
        self.__dict__["_claim_cache"] = (self.governed, statement)
        return statement

    def _lease(self, started_at: Any) -> dict[str, Any]:
        """What a claim sets on a run: leased to this worker until the bind parameter c_expires, the
        attempt and the execution counted."""
        r = runs_table
        return dict(state=RUNNING, attempt=r.c.attempt + 1, executions=r.c.executions + 1, lease_owner=self.owner,
                    lease_expires_at=sa.bindparam("c_expires"), started_at=started_at, finished_at=None)

    def _picked(self, *where: sa.ColumnElement[bool], order: sa.ColumnElement, limit: Any) -> sa.ColumnElement[bool]:
        """A condition selecting at most `limit` runs matching `where`, oldest first, for one UPDATE.

        On PostgreSQL the ids come from a CTE with `FOR UPDATE SKIP LOCKED`: a CTE is evaluated once,
        whereas `id IN (SELECT ... LIMIT n FOR UPDATE SKIP LOCKED)` may be rescanned by a nested-loop
        plan and update far more than n rows. SQLite has one writer, so a plain subquery is exact there.
        """
        query = sa.select(runs_table.c.id).where(*where).order_by(order).limit(limit)
        if self.postgres:
            picked = query.with_for_update(skip_locked=True).cte("picked")
            return runs_table.c.id == picked.c.id
        return runs_table.c.id.in_(query.scalar_subquery())

    def _relaxed_commit(self, cursor: Any) -> None:
        """PostgreSQL: do not wait for the WAL flush when committing a claim or a result.

        Only a crash of the database server itself can lose such a commit, and losing one is safe in an
        at-least-once queue: a lost claim leaves the run queued, a lost result leaves it running until its
        lease expires, and either way it runs again. Events (what was acknowledged) keep full durability.
        """
        if self.postgres:  # on the transaction's own DBAPI cursor, first
            cursor.execute(RELAXED_COMMIT)

    def claim(self, limit: int) -> list[ClaimedRun]:
        """Take up to `limit` due runs: lease them, count the attempt, and return them with their event."""
        if limit <= 0:
            return []
        now = self.clock()
        with driver_errors(self.db), self.db.begin() as conn:
            # Most of the claim goes through the driver's cursor, in this transaction: the claim runs once
            # per batch of runs, and SQLAlchemy's execution of it took the claim thread more time than the
            # database. The branch for per-key limits stays on SQLAlchemy. (driver_errors: the cursor's
            # failures reach the claim loop as SQLAlchemy's, which it retries.)
            cursor = conn.connection.dbapi_connection.cursor()
            try:
                rows = self._claim_rows(conn, cursor, now, limit)
                if not rows:
                    return []
                insert_many(cursor, self.db.dialect, attempts_table, [
                    dict(run_id=row.id, attempt=row.attempt, worker=self.owner, claimed_at=now) for row in rows])
                ids = in_slots(sorted({row.event_id for row in rows}))
                query = _claimed_events(self.db.dialect, len(ids))
                cursor.execute(query.sql, query.params(ids))
                events = {ev[0]: ev for ev in cursor.fetchall()}  # id, name, headers, body
            finally:
                cursor.close()
        claimed = []
        for row in rows:
            _, name, headers, body = events[row.event_id]
            claimed.append(ClaimedRun(
                id=row.id, flow=row.flow, attempt=row.attempt, max_attempts=row.max_attempts,
                trigger=row.trigger, event_id=row.event_id, execution=row.executions,
                event=Event(name=name, body=bytes(body), headers=json.loads(headers),
                            idempotency_key=row.idempotency_key or row.id, trigger=row.trigger),
            ))
        return claimed

    def _claim_rows(self, conn: sa.Connection, cursor: Any, now: float, limit: int) -> list[Any]:
        """Lease up to `limit` due runs in `conn`'s transaction: runs of limited keys first (SQLAlchemy),
        then the others (on `cursor`, the transaction's DBAPI cursor); rows of `_claimed_columns`, in
        queue order."""
        r = runs_table
        self._relaxed_commit(cursor)
        rows: list[Any] = []
        if any(p.limit is not None for p in self.governed.values()):
            from wasmflow.platform.concurrency import claim_limited

            ids = claim_limited(conn, self.governed, now, limit)
            if ids:
                # Stamped after the count: a run of the key that finished just before is then seen to
                # have ended before this one started, in the intervals the store keeps.
                rows += conn.execute(
                    r.update().where(r.c.id.in_(ids), r.c.state == QUEUED)
                    .values(**self._lease(started_at=max(now, self.clock())))
                    .returning(*self._claimed_columns),
                    {"c_expires": now + self.lease_seconds}).all()
        take_write_turn(cursor.connection)
        if len(rows) < limit:
            claim = self._claim_statement()
            cursor.execute(claim.sql, claim.params(
                {"c_now": now, "c_limit": limit - len(rows), "c_expires": now + self.lease_seconds}))
            rows += [_ClaimedRow(*row) for row in cursor.fetchall()]
        # RETURNING follows no ORDER BY: hand the runs out in their queue order.
        rows.sort(key=lambda row: row.available_at)
        return rows

    def cancel(self, run_id: str, by: str) -> CancelResult:
        """Cancel a run (by id, or a unique prefix of 6+ characters): at once if it has not started,
        and by marking it if it is running, for its worker to stop the guest (within the engine's
        interrupt period once the worker has heard). A cancelled run is never retried.

        Safe from any process: it is one conditional UPDATE per case, so a run claimed in between is
        marked instead, and a run that finished in between is reported `finished`.
        """
        from wasmflow.platform.store import get_run

        by = (by or "unknown")[:160]
        # Ids are letters and digits: anything else (LIKE's % and _ among them) could match another run.
        if not isinstance(run_id, str) or not _RUN_REF.fullmatch(run_id):
            return CancelResult(run_id=str(run_id)[:64], outcome="not_found", by=by)
        row = get_run(self.db, run_id)
        if row is None:
            return CancelResult(run_id=run_id, outcome="not_found", by=by)
        now = self.clock()
        r = runs_table
        reason = cancel_reason(by)
        with self.db.begin() as conn:
            done = conn.execute(
                r.update()
                .where(r.c.id == row.id, r.c.state.in_([QUEUED, WAITING]))
                .values(state=DONE, status=Status.CANCELLED.value, error=reason, finished_at=now,
                        cancel_requested_at=now, cancelled_by=by, lease_owner=None, lease_expires_at=None)
                .returning(r.c.id)
            ).first()
            if done is not None:
                return CancelResult(run_id=row.id, outcome="cancelled", state=DONE, by=by)
            marked = conn.execute(
                r.update()
                .where(r.c.id == row.id, r.c.state == RUNNING)
                .values(cancel_requested_at=sa.func.coalesce(r.c.cancel_requested_at, now),
                        cancelled_by=sa.func.coalesce(r.c.cancelled_by, by))
                .returning(r.c.id, r.c.cancelled_by)
            ).first()
            if marked is not None:
                notify_cancel(conn, [row.id])
                return CancelResult(run_id=row.id, outcome="cancelling", state=RUNNING, by=marked.cancelled_by)
            state = conn.execute(sa.select(r.c.state).where(r.c.id == row.id)).scalar()
        return CancelResult(run_id=row.id, outcome="finished", state=state, by=by)

    def heartbeat(self, run_ids: list[str]) -> set[str]:
        """Extend the leases of runs still executing here; returns the ids whose lease is still ours."""
        if not run_ids:
            return set()
        now = self.clock()
        r = runs_table
        with self.db.begin() as conn:
            rows = conn.execute(
                r.update()
                .where(r.c.id.in_(run_ids), r.c.lease_owner == self.owner, r.c.state == RUNNING)
                .values(lease_expires_at=now + self.lease_seconds)
                .returning(r.c.id)
            ).all()
        return {row.id for row in rows}

    def finish(self, run: ClaimedRun, result: RunResult, retry: Retry, status: Optional[Status] = None) -> Finish:
        """Record an attempt's result: done, queued again after a backoff, or dead when out of attempts.

        `status` replaces the result's (a host-side failure around the run is `upstream`).
        """
        return self.finish_many([Outcome(run, result, retry, status)])[0]

    def finish_many(self, outcomes: list["Outcome"]) -> list[Finish]:
        """`finish` for several runs in one transaction, one multi-row UPDATE per table.

        The runs whose lease is still ours are read first (locked on PostgreSQL); only they are updated,
        and the others are reported `lost`, their late result kept only in the attempts table. On the
        driver's own cursor, with statements compiled once (`DriverStatement`): through SQLAlchemy's
        execution the finishing thread took a tenth of the interpreter's time in `up` under a burst
        of webhooks (py-spy), as much as the guests it finished.
        """
        if not outcomes:
            return []
        now = self.clock()
        decided: list[Finish] = []
        run_params: list[dict[str, Any]] = []
        attempt_params: list[dict[str, Any]] = []
        with driver_transaction(self.db, relaxed=True) as raw:  # relaxed: see _relaxed_commit
            cursor = raw.cursor()
            try:
                ids = in_slots([o.run.id for o in outcomes])
                owned_query = self._owned_query(len(ids))
                cursor.execute(owned_query.sql, owned_query.params(ids))
                owned_rows = cursor.fetchall()  # (id, cancelled_by, cancel_requested_at)
                owned = {row[0] for row in owned_rows}
                # A run asked to stop that did not end `ok` ends `cancelled`, whatever cut it: never retried.
                cancels = {row[0]: row[1] for row in owned_rows if row[2] is not None}
                for o in outcomes:
                    status = o.status
                    error = storable_text(o.result.error)  # it may quote what a guest asked for
                    delay = 0.0
                    if o.run.id in cancels and status is not Status.OK:
                        status, error = Status.CANCELLED, cancel_reason(cancels[o.run.id])
                    if status is Status.OK or status is Status.CANCELLED:
                        state = DONE
                    elif is_retryable(status, o.retry) and o.run.attempt < o.retry.attempts:
                        state = QUEUED
                        delay = backoff_delay(o.retry, o.run.attempt)
                    else:
                        state = DEAD
                    duration_ms = o.result.instantiate_ms + o.result.run_ms
                    mine = o.run.id in owned
                    if mine:
                        run_params.append(dict(
                            b_id=o.run.id, b_state=state, b_status=status.value, b_duration=duration_ms,
                            b_logs=encode_logs(o.result.logs), b_output=o.result.output,
                            b_stdout=o.result.stdout or None, b_stderr=o.result.stderr or None,
                            b_error=error, b_available=now + delay, b_tokens=o.result.llm_tokens, b_now=now))
                    attempt_params.append(dict(
                        b_run=o.run.id, b_attempt=o.run.attempt,
                        b_status=status.value if mine else f"{status} (lease lost)",
                        b_error=error, b_duration=duration_ms, b_now=now))
                    decided.append(Finish(state=state, delay=delay) if mine else Finish(state="lost"))
                take_write_turn(raw)
                finish_run, finish_attempt = self._finish_statements
                if run_params:
                    cursor.executemany(finish_run.sql, [finish_run.params(p) for p in run_params])
                cursor.executemany(finish_attempt.sql, [finish_attempt.params(p) for p in attempt_params])
            finally:
                cursor.close()
        return decided

    def _owned_query(self, n: int) -> DriverStatement:
        """finish_many's SELECT of which of `n` runs (`in_slots`) are still leased to this worker."""
        cache = self.__dict__.setdefault("_owned_cache", {})
        statement = cache.get(n)
        if statement is None:
            r = runs_table
            query = sa.select(r.c.id, r.c.cancelled_by, r.c.cancel_requested_at).where(
                r.c.id.in_(slot_params(n)), r.c.lease_owner == self.owner,
                r.c.state == RUNNING)
            if self.postgres:
                query = query.with_for_update()
            statement = cache[n] = DriverStatement(query, self.db.dialect)
        return statement

    @functools.cached_property
    def _finish_statements(self) -> tuple[DriverStatement, DriverStatement]:
        """finish_many's two UPDATEs, built and compiled once: building them cost the finishing thread
        more than running them (a fifth of the interpreter's time in `up` under a burst, py-spy)."""
        r, a = runs_table, attempts_table
        now = sa.bindparam("b_now")
        run = (r.update()
               .where(r.c.id == sa.bindparam("b_id"), r.c.lease_owner == self.owner, r.c.state == RUNNING)
               .values(state=sa.bindparam("b_state"), status=sa.bindparam("b_status"), finished_at=now,
                       duration_ms=sa.bindparam("b_duration"), logs=sa.bindparam("b_logs"),
                       output=sa.bindparam("b_output"), stdout=sa.bindparam("b_stdout"),
                       stderr=sa.bindparam("b_stderr"), error=sa.bindparam("b_error"), lease_owner=None,
                       lease_expires_at=None, available_at=sa.bindparam("b_available"),
                       llm_tokens=r.c.llm_tokens + sa.bindparam("b_tokens")))
        attempt = (a.update()
                   .where(a.c.run_id == sa.bindparam("b_run"), a.c.attempt == sa.bindparam("b_attempt"),
                          a.c.worker == self.owner,
                          # a release gives the attempt number back: its row is not this attempt's
                          a.c.status.is_distinct_from("released"))
                   .values(finished_at=now, status=sa.bindparam("b_status"),
                           error=sa.bindparam("b_error"), duration_ms=sa.bindparam("b_duration")))
        return DriverStatement(run, self.db.dialect), DriverStatement(attempt, self.db.dialect)

    def release(self, run_ids: list[str]) -> int:
        """Give runs back unfinished (graceful shutdown): queued again at their place, the attempt not counted.

        `available_at` is left as it was, so a released run is claimed again before the runs stored after
        it; its execution number is kept, so its next claim gets a new one. An HTTP-triggered run is not
        queued again but filed `lost`, as `recover_expired` does: its caller will get no answer.
        """
        if not run_ids:
            return 0
        now = self.clock()
        r = runs_table
        http = r.c.trigger == "http"
        cancelled = r.c.cancel_requested_at.is_not(None)  # asked to stop: it ends here, cancelled
        with self.db.begin() as conn:
            rows = conn.execute(
                r.update()
                .where(r.c.id.in_(run_ids), r.c.lease_owner == self.owner, r.c.state == RUNNING)
                .values(state=sa.case((cancelled, DONE), (http, DEAD), else_=QUEUED),
                        attempt=sa.case((cancelled, r.c.attempt), (http, r.c.attempt), else_=r.c.attempt - 1),
                        status=sa.case((cancelled, Status.CANCELLED.value), (http, Status.LOST.value),
                                       else_=r.c.status),
                        error=sa.case((cancelled, sa.literal("cancelled by ") + sa.func.coalesce(r.c.cancelled_by, "unknown")),
                                      (http, "the process running it stopped before it finished"), else_=r.c.error),
                        finished_at=sa.case((cancelled, now), (http, now), else_=r.c.finished_at),
                        lease_owner=None, lease_expires_at=None)
                .returning(r.c.id, r.c.trigger, r.c.state)
            ).all()
            outcome = {QUEUED: "released", DEAD: Status.LOST.value, DONE: Status.CANCELLED.value}
            for state, status in outcome.items():
                ids = [row.id for row in rows if row.state == state]
                if ids:
                    conn.execute(
                        attempts_table.update()
                        .where(attempts_table.c.run_id.in_(ids), attempts_table.c.worker == self.owner,
                               attempts_table.c.finished_at.is_(None))
                        .values(finished_at=now, status=status)
                    )
        return len(rows)

    def recover_expired(self, orphans: bool = False, limit: int = 1000) -> int:
        """Queue again the runs whose worker stopped renewing its lease; returns how many.

        With `orphans` every running run not leased by this owner is recovered at once, lease or not:
        for a process that holds the store alone (SQLite under `wasmflow up`'s lock), any other lease
        belongs to a process that is gone. HTTP-triggered runs are not retried (their caller is gone
        too) and a run lost MAX_LEASE_LOSSES times is dead. A run queued again keeps its `available_at`:
        it is claimed before the runs stored after it, not sent to the back of the queue.
        """
        now = self.clock()
        r = runs_table
        cond = [r.c.state == RUNNING]
        if orphans:
            cond.append(sa.or_(r.c.lease_owner.is_(None), r.c.lease_owner != self.owner))
        else:
            cond.append(r.c.lease_expires_at < now)
        picked = self._picked(*cond, order=r.c.lease_expires_at, limit=limit)
        give_up = sa.or_(r.c.trigger == "http", r.c.lease_expiries + 1 >= MAX_LEASE_LOSSES)
        cancelled = r.c.cancel_requested_at.is_not(None)  # asked to stop before its worker died: not run again
        with self.db.begin() as conn:
            rows = conn.execute(
                r.update()
                .where(picked, *cond)
                .values(
                    state=sa.case((cancelled, DONE), (give_up, DEAD), else_=QUEUED),
                    status=sa.case((cancelled, Status.CANCELLED.value), (give_up, Status.LOST.value),
                                   else_=r.c.status),
                    error=sa.case((cancelled, sa.literal("cancelled by ") + sa.func.coalesce(r.c.cancelled_by, "unknown")),
                                  (give_up, "the worker running it stopped before it finished"), else_=r.c.error),
                    finished_at=sa.case((cancelled, now), (give_up, now), else_=None),
                    lease_expiries=r.c.lease_expiries + 1, lease_owner=None, lease_expires_at=None,
                )
                .returning(r.c.id)
            ).all()
            if rows:
                conn.execute(
                    attempts_table.update()
                    .where(attempts_table.c.run_id.in_([row.id for row in rows]),
                           attempts_table.c.finished_at.is_(None))
                    .values(finished_at=now, status=Status.LOST.value)
                )
        return len(rows)


class ReplayError(Exception):
    """Nothing to replay, or the run is still queued or running; the message says which."""


def replay(db: sa.Engine, ref: str, flows: Optional[FlowsFile] = None) -> list[str]:
    """Run again a run (by id or unique prefix) or every flow a delivery ran; returns the new run ids.

    A replay is a new run of the same event and flow (`seq` + 1, `replay_of` the old run), with fresh
    attempts, so the history of the original stays as it was. A delivery that started no run (it came
    before its flow existed) is matched again against `flows` when given.
    """
    from wasmflow.platform.matching import GithubEventInfo, match_github
    from wasmflow.platform.store import find_event_by_delivery, get_run

    r, e = runs_table, events_table
    run = get_run(db, ref)
    if run is not None:
        targets = [(run.event_id, run.flow, run.id, run.trigger, run.idempotency_key, run.max_attempts)]
        busy = [run] if run.state in (QUEUED, RUNNING, WAITING) else []
    else:
        event = find_event_by_delivery(db, ref)
        if event is None:
            raise ReplayError(f"no run or delivery {ref!r}")
        with db.connect() as conn:
            rows = conn.execute(
                sa.select(r).where(r.c.event_id == event.id).order_by(r.c.flow, r.c.seq.desc())
            ).all()
        latest: dict[str, sa.Row] = {}
        for row in rows:
            latest.setdefault(row.flow, row)
        busy = [row for row in latest.values() if row.state in (QUEUED, RUNNING, WAITING)]
        targets = [(row.event_id, row.flow, row.id, row.trigger, row.idempotency_key, row.max_attempts)
                   for row in latest.values()]
        if not targets and flows is not None and event.source == "github":
            info = GithubEventInfo(name=event.name, action=event.action, repo=event.repo)
            targets = [(event.id, name, None, "github", event.delivery_id, flows.flow(name).retry.attempts)
                       for name in match_github(flows, info)]
        if not targets:
            raise ReplayError(f"delivery {ref!r} matches no flow")
    if busy:
        raise ReplayError(f"run {busy[0].id} of flow {busy[0].flow} is still {busy[0].state}; wait for it to finish")
    new_ids = []
    now = time.time()
    with db.begin() as conn:
        for event_id, flow, old_id, trigger, key, attempts in targets:
            seq = conn.execute(
                sa.select(sa.func.max(r.c.seq)).where(r.c.event_id == event_id, r.c.flow == flow)
            ).scalar()
            run_new = NewRun(flow=flow, trigger=trigger, max_attempts=attempts, idempotency_key=key,
                             seq=(seq + 1) if seq is not None else 0, replay_of=old_id, id=new_id())
            conn.execute(r.insert().values(**run_row(run_new, event_id, now)))
            conn.execute(e.update().where(e.c.id == event_id, e.c.status == "ignored").values(status="accepted"))
            new_ids.append(run_new.id)
        notify_new_runs(conn)
    return new_ids
