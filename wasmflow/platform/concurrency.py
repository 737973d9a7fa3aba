"""Concurrency keys, debounce, rate limits and token budgets: how a flow's runs that share a key relate.

Runs are stored by whoever received their event (ingress, scheduler, replay) as they always were; a
worker *admits* each new run of a governed flow before any worker may claim it. Admission renders the
run's key from its event, records it on the run, and applies the flow's settings in one transaction:

- `rate`: a key over its runs per period gets the run recorded `denied` (never executed);
- `debounce`: a run whose key has a run still waiting out its debounce period replaces it (the older
  is finished `cancelled` by "debounce", the new one keeps the first event's time for `max_wait`);
- `concurrency.on_conflict`: `skip-new` finishes the new run when its key is at its limit;
  `replace-queued` cancels the key's runs still queued; `cancel-running` does that and also marks the
  key's running runs for cancellation (their workers stop the guests), so the newest event wins.

The limit itself is enforced in the claim (`claim_limited`): per key, the claim counts the key's running
runs and takes at most `limit` minus that many. No lock service: on PostgreSQL, admission and claim of one
key are serialised by a transaction-scoped advisory lock on the key (the claim only tries it, and skips
a key another worker is claiming right now, as `SKIP LOCKED` skips rows), and rows are taken `FOR UPDATE
SKIP LOCKED`; on SQLite the claim's transaction takes the database's single write lock first.

Budgets are summed from the store: every run records the LLM tokens it spent (`runs.llm_tokens`), and a
run of a flow with a `budget` gets a `RunBudget` that knows what its key spent in the period before the
run started; the LLM host functions ask it before each call. Runs of one key running at the same time
may together overshoot a budget by what they spend concurrently.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import sqlalchemy as sa

from wasmflow.engine.base import Status
from wasmflow.flows.keys import KeyTemplate, parse_template
from wasmflow.fields import format_duration
from wasmflow.flows.model import Flow, FlowsFile
from wasmflow.storage.schema import events_table, runs_table
from wasmflow.platform.cancel import notify_cancel
from wasmflow.platform.store import DEAD, DONE, QUEUED, RUNNING

log = logging.getLogger("wasmflow.concurrency")

ADMIT_BATCH = 200
_LOCK_CLASS = 0x7766  # first half of the two-int advisory lock key: wasmflow's concurrency keys


@dataclass(frozen=True)
class Policy:
    """A governed flow's settings, with its key templates parsed once."""

    flow: Flow
    key: Optional[KeyTemplate]
    budget_key: Optional[KeyTemplate]

    @property
    def name(self) -> str:
        return self.flow.name

    @property
    def limit(self) -> Optional[int]:
        return self.flow.concurrency.limit if self.flow.concurrency is not None else None

    @property
    def on_conflict(self) -> str:
        return self.flow.concurrency.on_conflict if self.flow.concurrency is not None else "queue"


def policies(flows: FlowsFile) -> dict[str, Policy]:
    """The flows whose runs are admitted (they have concurrency, debounce, rate or budget), by name."""
    found = {}
    for flow in flows.flows:
        if flow.concurrency is None and flow.debounce is None and flow.rate is None and flow.budget is None:
            continue
        key = parse_template(flow.run_key) if flow.run_key else None
        budget = parse_template(flow.budget_key) if flow.budget_key else None
        found[flow.name] = Policy(flow=flow, key=key, budget_key=budget)
    return found


@dataclass
class Admission:
    """What one admission pass did: runs admitted, and those finished instead, by flow and how."""

    admitted: int = 0
    outcomes: list[tuple[str, str]] = field(default_factory=list)  # (flow, how): denied-rate, skipped, ...
    cancel_marked: dict[str, str] = field(default_factory=dict)  # running run id -> who cancelled it

    def count(self, flow: str, how: str) -> None:
        self.outcomes.append((flow, how))


def _lock_key(flow: str, key: str) -> str:
    return f"{flow}\x1f{key}"


def lock_key(conn: sa.Connection, flow: str, key: str, wait: bool = True) -> bool:
    """PostgreSQL: take the transaction-scoped advisory lock of (flow, key); with `wait` False only try.
    Elsewhere a no-op (SQLite's write lock serialises the transaction)."""
    if conn.dialect.name != "postgresql":
        return True
    fn = "pg_advisory_xact_lock" if wait else "pg_try_advisory_xact_lock"
    got = conn.execute(sa.text(f"SELECT {fn}(:c, hashtext(:k))"), {"c": _LOCK_CLASS, "k": _lock_key(flow, key)}).scalar()
    return True if wait else bool(got)


def take_write_lock(conn: sa.Connection) -> None:
    """SQLite: start the transaction as a writer, so what it counts cannot change before it writes."""
    if conn.dialect.name == "sqlite":
        conn.execute(sa.text("UPDATE runs SET state = state WHERE 0"))


def admit(conn: sa.Connection, governed: dict[str, Policy], now: float) -> Admission:
    """Admit the queued runs of governed flows that no worker has admitted yet (see the module doc)."""
    report = Admission()
    if not governed:
        return report
    r, e = runs_table, events_table
    pending = sa.select(r.c.id).where(r.c.state == QUEUED, r.c.concurrency_key.is_(None),
                                      r.c.flow.in_(list(governed))).limit(1)
    if conn.execute(pending).first() is None:  # the usual case: nothing new, and no write lock taken for it
        return report
    take_write_lock(conn)
    query = (
        sa.select(r.c.id, r.c.flow, r.c.created_at, e.c.name, e.c.body)
        .join(e, e.c.id == r.c.event_id)
        .where(r.c.state == QUEUED, r.c.concurrency_key.is_(None), r.c.flow.in_(list(governed)))
        .order_by(r.c.created_at, r.c.id).limit(ADMIT_BATCH)
    )
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True, of=r)
    rows = conn.execute(query).all()
    if not rows:
        return report
    keyed = []
    for row in rows:
        policy = governed[row.flow]
        body = _decode(row.body)
        key = policy.key.render(row.name, body) if policy.key is not None else ""
        budget_key = policy.budget_key.render(row.name, body) if policy.budget_key is not None else None
        keyed.append((row, policy, key, budget_key))
    # Locks in one order (flow, key) in every process: two admitters never wait on each other in a circle.
    for flow, key in sorted({(row.flow, key) for row, _, key, _ in keyed}):
        lock_key(conn, flow, key)
    for row, policy, key, budget_key in keyed:  # oldest first: a later event sees the earlier ones admitted
        _admit_one(conn, report, row, policy, key, budget_key, now)
    if report.cancel_marked:
        notify_cancel(conn, list(report.cancel_marked))
    return report


def _admit_one(conn: sa.Connection, report: Admission, row: Any, policy: Policy, key: str,
               budget_key: Optional[str], now: float) -> None:
    r = runs_table
    flow = policy.flow
    same_key = sa.and_(r.c.flow == flow.name, r.c.concurrency_key == key, r.c.id != row.id)
    values: dict[str, Any] = dict(concurrency_key=key, budget_key=budget_key)

    def finish(state: str, status: Status, error: str, by: Optional[str], how: str) -> None:
        conn.execute(r.update().where(r.c.id == row.id).values(
            state=state, status=status.value, error=error, finished_at=now, cancelled_by=by,
            cancel_requested_at=now if by else None, **values))
        report.count(flow.name, how)

    if flow.rate is not None:
        window = row.created_at - flow.rate.per
        started = conn.execute(
            sa.select(sa.func.count()).select_from(r).where(
                same_key, r.c.created_at > window, r.c.created_at <= row.created_at,
                r.c.status.is_distinct_from(Status.DENIED.value),
                sa.or_(r.c.started_at.is_not(None), r.c.state.in_([QUEUED, RUNNING])))
        ).scalar() or 0
        if started >= flow.rate.limit:
            finish(DEAD, Status.DENIED,
                   f"rate limit reached: {flow.rate.limit} runs per {format_duration(flow.rate.per)} for key "
                   f"{key!r}; this run was not executed", None, "denied-rate")
            return

    queued_same = sa.and_(same_key, r.c.state == QUEUED)
    if flow.debounce is not None:
        period, max_wait = flow.debounce.period, flow.debounce.max_wait
        pending = conn.execute(
            sa.select(r.c.id, r.c.debounce_since).where(
                queued_same, r.c.executions == 0, r.c.debounce_since.is_not(None),
                r.c.created_at >= row.created_at - period)
            .order_by(r.c.created_at.desc()).limit(1)
        ).first()
        since = row.created_at
        if pending is not None and (max_wait is None or pending.debounce_since + max_wait > row.created_at):
            since = pending.debounce_since
            conn.execute(r.update().where(r.c.id == pending.id, r.c.state == QUEUED).values(
                state=DONE, status=Status.CANCELLED.value, error=f"debounced: merged into run {row.id}",
                finished_at=now, cancel_requested_at=now, cancelled_by="debounce"))
            report.count(flow.name, "debounced")
        due = row.created_at + period
        if max_wait is not None:
            due = min(due, since + max_wait)
        values.update(debounce_since=since, available_at=due)

    conflict = policy.on_conflict
    limit = policy.limit or 0
    if conflict == "skip-new":
        busy = conn.execute(sa.select(sa.func.count()).select_from(r).where(
            same_key, r.c.state.in_([QUEUED, RUNNING]))).scalar() or 0
        if busy >= limit:
            finish(DONE, Status.CANCELLED,
                   f"skipped: {busy} run(s) of key {key!r} already queued or running (on_conflict: skip-new)",
                   "skip-new", "skipped")
            return
    elif conflict in ("replace-queued", "cancel-running"):
        replaced = conn.execute(r.update().where(queued_same).values(
            state=DONE, status=Status.CANCELLED.value, error=f"replaced by run {row.id} ({conflict})",
            finished_at=now, cancel_requested_at=now, cancelled_by=f"run {row.id} ({conflict})"
        ).returning(r.c.id)).all()
        for _ in replaced:
            report.count(flow.name, "superseded")
        if conflict == "cancel-running":
            running = conn.execute(
                sa.select(r.c.id).where(same_key, r.c.state == RUNNING, r.c.cancel_requested_at.is_(None))
                .order_by(r.c.started_at)
            ).scalars().all()
            surplus = len(running) - limit + 1  # make room for this one: the oldest go
            if surplus > 0:
                ids = list(running[:surplus])
                by = f"run {row.id} (cancel-running)"
                conn.execute(r.update().where(r.c.id.in_(ids), r.c.state == RUNNING).values(
                    cancel_requested_at=now, cancelled_by=by))
                report.cancel_marked.update({run_id: by for run_id in ids})
                for _ in ids:
                    report.count(flow.name, "superseded")
    conn.execute(r.update().where(r.c.id == row.id).values(**values))
    report.admitted += 1


def claim_limited(conn: sa.Connection, governed: dict[str, Policy], now: float, limit: int) -> list[str]:
    """Ids of due runs of flows with a concurrency limit that may start now: per key, at most the limit
    minus the key's running runs, oldest first; the caller leases them in the same transaction."""
    limited = {name: p.limit for name, p in governed.items() if p.limit is not None}
    if not limited or limit <= 0:
        return []
    r = runs_table
    take_write_lock(conn)
    due = sa.and_(r.c.state == QUEUED, r.c.available_at <= now, r.c.flow.in_(list(limited)),
                  r.c.concurrency_key.is_not(None))
    groups = conn.execute(
        sa.select(r.c.flow, r.c.concurrency_key, sa.func.min(r.c.available_at).label("first"))
        .where(due).group_by(r.c.flow, r.c.concurrency_key).order_by(sa.text("first")).limit(limit)
    ).all()
    picked: list[str] = []
    for group in groups:
        if len(picked) >= limit:
            break
        if not lock_key(conn, group.flow, group.concurrency_key, wait=False):
            continue  # another worker is claiming (or admitting) this key right now
        same = sa.and_(r.c.flow == group.flow, r.c.concurrency_key == group.concurrency_key)
        running = conn.execute(sa.select(sa.func.count()).select_from(r).where(same, r.c.state == RUNNING)).scalar() or 0
        room = min(limited[group.flow] - running, limit - len(picked))
        if room <= 0:
            continue
        query = sa.select(r.c.id).where(same, due).order_by(r.c.available_at).limit(room)
        if conn.dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        picked += conn.execute(query).scalars().all()
    return picked


# --- budgets ------------------------------------------------------------------------------------------


@dataclass
class RunBudget:
    """A run's view of its key's token budget (`wasmflow.host_functions.spec.TokenBudget`)."""

    limit: int
    per: float
    key: str
    spent_before: int  # by the key's other runs in the period, read when the run started
    spent: int = 0  # by this run so far

    def left(self) -> int:
        return self.limit - self.spent_before - self.spent

    def spend(self, tokens: int) -> None:
        self.spent += max(0, int(tokens))

    def describe(self) -> str:
        return f"{self.limit} LLM tokens per {format_duration(self.per)} for key {self.key!r}"


def budget_for(db: sa.Engine, flows: FlowsFile, run: Any, now: Optional[float] = None) -> Optional[RunBudget]:
    """The budget of `run` (a ClaimedRun) if its flow has one: its key's tokens spent in the period."""
    try:
        flow = flows.flow(run.flow)
    except KeyError:
        return None
    if flow.budget is None:
        return None
    now = time.time() if now is None else now
    r = runs_table
    with db.connect() as conn:
        key = conn.execute(sa.select(r.c.budget_key).where(r.c.id == run.id)).scalar()
        if key is None:  # admitted before the flow had a budget, or not admitted (an HTTP run): from the event
            template = parse_template(flow.budget_key) if flow.budget_key else None
            key = template.render(run.event.name, run.event.json()) if template is not None else ""
        spent = conn.execute(
            sa.select(sa.func.coalesce(sa.func.sum(r.c.llm_tokens), 0)).where(
                r.c.flow == flow.name, r.c.budget_key == key, r.c.id != run.id,
                sa.func.coalesce(r.c.finished_at, r.c.created_at) > now - flow.budget.per)
        ).scalar() or 0
    return RunBudget(limit=flow.budget.llm_tokens, per=flow.budget.per, key=key, spent_before=int(spent))


# --- reading ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyRow:
    flow: str
    key: str
    running: int
    waiting: int  # queued (due or debouncing)
    cancelled: int  # in the window
    denied: int  # in the window
    limit: Optional[int]
    tokens: int  # LLM tokens in the window


def key_summary(db: sa.Engine, flow: Optional[str] = None, since: float = 86400.0, limit: int = 100) -> list[KeyRow]:
    """Per (flow, key): running and waiting now, cancelled, denied and tokens over the last `since` s."""
    r = runs_table
    cutoff = time.time() - since
    recent = sa.func.coalesce(r.c.finished_at, r.c.created_at) > cutoff
    query = (
        sa.select(
            r.c.flow, r.c.concurrency_key,
            sa.func.sum(sa.case((r.c.state == RUNNING, 1), else_=0)).label("running"),
            sa.func.sum(sa.case((r.c.state == QUEUED, 1), else_=0)).label("waiting"),
            sa.func.sum(sa.case((sa.and_(recent, r.c.status == Status.CANCELLED.value), 1), else_=0)).label("cancelled"),
            sa.func.sum(sa.case((sa.and_(recent, r.c.status == Status.DENIED.value), 1), else_=0)).label("denied"),
            sa.func.sum(sa.case((recent, r.c.llm_tokens), else_=0)).label("tokens"),
        )
        .where(r.c.concurrency_key.is_not(None), sa.or_(recent, r.c.state.in_([QUEUED, RUNNING])))
        .group_by(r.c.flow, r.c.concurrency_key)
        .order_by(sa.text("running DESC"), sa.text("waiting DESC"), r.c.flow, r.c.concurrency_key)
        .limit(limit)
    )
    if flow:
        query = query.where(r.c.flow == flow)
    with db.connect() as conn:
        rows = conn.execute(query).all()
    return [KeyRow(flow=row.flow, key=row.concurrency_key, running=int(row.running or 0),
                   waiting=int(row.waiting or 0), cancelled=int(row.cancelled or 0), denied=int(row.denied or 0),
                   limit=None, tokens=int(row.tokens or 0)) for row in rows]


def waiting_by_flow(db: sa.Engine, governed: dict[str, Policy]) -> dict[str, int]:
    """Queued runs of flows with a concurrency limit whose key is at its limit now (the gauge)."""
    limited = {name: p.limit for name, p in governed.items() if p.limit is not None}
    if not limited:
        return {}
    r = runs_table
    with db.connect() as conn:
        rows = conn.execute(
            sa.select(r.c.flow, r.c.concurrency_key,
                      sa.func.sum(sa.case((r.c.state == RUNNING, 1), else_=0)).label("running"),
                      sa.func.sum(sa.case((r.c.state == QUEUED, 1), else_=0)).label("queued"))
            .where(r.c.flow.in_(list(limited)), r.c.state.in_([QUEUED, RUNNING]), r.c.concurrency_key.is_not(None))
            .group_by(r.c.flow, r.c.concurrency_key)
        ).all()
    waiting = {name: 0 for name in limited}
    for row in rows:
        if (row.running or 0) >= limited[row.flow]:
            waiting[row.flow] += int(row.queued or 0)
    return waiting


def _decode(body: Any) -> Any:
    try:
        return json.loads(bytes(body or b"null"))
    except ValueError:
        return None
