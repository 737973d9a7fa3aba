"""What the console reads from the store: filtered, keyset-paginated runs and events, one run in full.

Pages are cut by keyset (`created_at`, `id` of the last row shown) rather than OFFSET, so page 2,000 of
100,000 runs costs what page 1 does: every filter has an index that starts with its column and ends with
`created_at` (schema version 4). Rows come back as plain dicts, ready for JSON and templates.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any, Optional

import sqlalchemy as sa

from wasmflow.console.redact import redact_headers, redact_json
from wasmflow.storage.schema import attempts_table, events_table, runs_table

MAX_LIMIT = 200
STATES = ("queued", "waiting", "running", "done", "dead")
TEXT_CAP = 256 * 1024  # bytes of stdout/stderr/output/payload shown on a page; the CLI shows the rest


class QueryError(ValueError):
    """A filter or cursor the console cannot use; the message says which and what is accepted."""


@dataclass
class RunFilter:
    flow: Optional[str] = None
    state: Optional[str] = None
    status: Optional[str] = None
    repo: Optional[str] = None
    trigger: Optional[str] = None
    since: Optional[float] = None
    until: Optional[float] = None
    limit: int = 50
    cursor: Optional[str] = None

    @classmethod
    def from_query(cls, query: Any) -> "RunFilter":
        """From a request's query string; bad numbers and unknown states are a QueryError."""
        def text(name: str) -> Optional[str]:
            value = query.get(name)
            return value.strip()[:320] if isinstance(value, str) and value.strip() else None

        def number(name: str) -> Optional[float]:
            value = text(name)
            if value is None:
                return None
            try:
                parsed = float(value)
            except ValueError:
                raise QueryError(f"{name} must be a unix time in seconds, got {value[:40]!r}") from None
            if parsed != parsed or parsed in (float("inf"), float("-inf")):
                raise QueryError(f"{name} must be a finite number")
            return parsed

        state = text("state")
        if state is not None and state not in STATES:
            raise QueryError(f"state must be one of {', '.join(STATES)}, got {state[:40]!r}")
        limit_text = text("limit")
        try:
            limit = int(limit_text) if limit_text else 50
        except ValueError:
            raise QueryError(f"limit must be a whole number from 1 to {MAX_LIMIT}") from None
        if not 1 <= limit <= MAX_LIMIT:
            raise QueryError(f"limit must be a whole number from 1 to {MAX_LIMIT}")
        return cls(flow=text("flow"), state=state, status=text("status"), repo=text("repo"),
                   trigger=text("trigger"), since=number("since"), until=number("until"), limit=limit,
                   cursor=text("cursor"))

    def params(self) -> dict[str, str]:
        """The filter as query parameters (cursor left out), for links to the next page and the API."""
        out = {k: str(v) for k, v in (("flow", self.flow), ("state", self.state), ("status", self.status),
                                      ("repo", self.repo), ("trigger", self.trigger), ("since", self.since),
                                      ("until", self.until)) if v is not None}
        if self.limit != 50:
            out["limit"] = str(self.limit)
        return out


def encode_cursor(created_at: float, run_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created_at, run_id]).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, run_id = json.loads(raw)
        if not isinstance(run_id, str) or not isinstance(created_at, (int, float)) or isinstance(created_at, bool):
            raise ValueError
        return float(created_at), run_id
    except (ValueError, TypeError, UnicodeDecodeError):
        raise QueryError("cursor is not one this server handed out; start again from the first page") from None


def _first_line(text: Optional[str], cap: int = 160) -> str:
    return (text or "").strip().splitlines()[0][:cap] if (text or "").strip() else ""


def _run_summary(row: Any) -> dict[str, Any]:
    m = row._mapping
    event = (m.get("event_name") or "") + (f".{m['action']}" if m.get("action") else "")
    return {"id": m["id"], "flow": m["flow"], "seq": m["seq"], "trigger": m["trigger"], "state": m["state"],
            "status": m["status"], "attempt": m["attempt"], "max_attempts": m["max_attempts"],
            "created_at": m["created_at"], "started_at": m["started_at"], "finished_at": m["finished_at"],
            "duration_ms": m["duration_ms"], "error": _first_line(m["error"]), "replay_of": m["replay_of"],
            "event_id": m["event_id"], "event": event, "repo": m.get("repo"), "delivery_id": m.get("delivery_id"),
            "cancelled_by": m.get("cancelled_by")}


def _run_columns() -> list[Any]:
    r, e = runs_table, events_table
    columns = [r.c.id, r.c.flow, r.c.seq, r.c.trigger, r.c.state, r.c.status, r.c.attempt, r.c.max_attempts,
               r.c.created_at, r.c.started_at, r.c.finished_at, r.c.duration_ms, r.c.error, r.c.replay_of,
               r.c.event_id, e.c.name.label("event_name"), e.c.action, e.c.repo, e.c.delivery_id]
    if "cancelled_by" in r.c:  # schema version 3 (cancel): read when present
        columns.append(r.c.cancelled_by)
    return columns


# A repository with at least this many events is filtered while walking the runs in order (SQLite);
# a rarer one is found through its events and sorted (fewer rows than this to sort).
REPO_WALK_THRESHOLD = 5000


def _walk_runs_for_repo(conn: sa.Connection, repo: str) -> bool:
    """SQLite: whether to read a repository's runs by walking the runs index rather than its events.

    SQLite's planner, lacking column statistics for the join, always starts from the repository's
    events and sorts all of them by time: 60 ms at 100,000 runs for a busy repository. Walking the
    newest runs first and skipping other repositories' costs what a page costs when the repository is
    common, so that is chosen when it has many events (counted through its index, capped).
    """
    if conn.dialect.name != "sqlite":
        return False  # PostgreSQL's planner weighs both with its statistics
    e = events_table
    capped = sa.select(sa.literal(1)).where(e.c.repo == repo).limit(REPO_WALK_THRESHOLD).subquery()
    return (conn.execute(sa.select(sa.func.count()).select_from(capped)).scalar() or 0) >= REPO_WALK_THRESHOLD


def _filtered(query: sa.Select, f: RunFilter, walk_repo: bool = False) -> sa.Select:
    r, e = runs_table, events_table
    if f.flow:
        query = query.where(r.c.flow == f.flow)
    if f.state:
        query = query.where(r.c.state == f.state)
    if f.status:
        query = query.where(r.c.status == f.status)
    if f.trigger:
        query = query.where(r.c.trigger == f.trigger)
    if f.repo and walk_repo:  # unary + keeps SQLite from using the repo index: it walks the runs in order
        query = query.where(sa.literal_column("+events.repo") == f.repo)
    elif f.repo:
        query = query.where(e.c.repo == f.repo)
    if f.since is not None:
        query = query.where(r.c.created_at >= f.since)
    if f.until is not None:
        query = query.where(r.c.created_at < f.until)
    return query


def list_runs(db: sa.Engine, f: RunFilter) -> dict[str, Any]:
    """A page of runs, newest first: `{"runs": [...], "next_cursor": str | None}`."""
    r, e = runs_table, events_table
    cursor = decode_cursor(f.cursor) if f.cursor else None
    with db.connect() as conn:
        walk = bool(f.repo) and _walk_runs_for_repo(conn, f.repo or "")
        query = _filtered(sa.select(*_run_columns()).join(e, e.c.id == r.c.event_id), f, walk_repo=walk)
        if cursor is not None:
            # The plain `created_at <= t` lets the index seek to the cursor; the OR breaks ties by id.
            query = query.where(r.c.created_at <= cursor[0],
                                sa.or_(r.c.created_at < cursor[0], r.c.id < cursor[1]))
        query = query.order_by(r.c.created_at.desc(), r.c.id.desc()).limit(f.limit + 1)
        rows = conn.execute(query).all()
    runs = [_run_summary(row) for row in rows[: f.limit]]
    next_cursor = encode_cursor(runs[-1]["created_at"], runs[-1]["id"]) if len(rows) > f.limit else None
    return {"runs": runs, "next_cursor": next_cursor}


def dead_run_ids(db: sa.Engine, f: RunFilter, cap: int = 10_000) -> list[str]:
    """Ids of the dead runs matching `f` that no later replay has taken over, oldest first (at most `cap`)."""
    r, e = runs_table, events_table
    newer = sa.select(sa.literal(1)).select_from(r.alias("later")).where(
        sa.literal_column("later.event_id") == r.c.event_id, sa.literal_column("later.flow") == r.c.flow,
        sa.literal_column("later.seq") > r.c.seq).exists()
    query = _filtered(sa.select(r.c.id).join(e, e.c.id == r.c.event_id), RunFilter(**{**f.__dict__, "state": "dead"}))
    query = query.where(~newer).order_by(r.c.created_at, r.c.id).limit(cap)
    with db.connect() as conn:
        return [row.id for row in conn.execute(query)]


def _text(data: Optional[bytes]) -> Optional[str]:
    if data is None:
        return None
    raw = bytes(data)
    text = raw[:TEXT_CAP].decode("utf-8", "replace")
    return text + (f"\n... ({len(raw) - TEXT_CAP} more bytes: `wasmflow logs RUN` shows them)" if len(raw) > TEXT_CAP else "")


def _decode_logs(text: Optional[str]) -> list[dict[str, Any]]:
    try:
        items = json.loads(text) if text else []
    except ValueError:
        return []
    return [{"ts": item[0], "level": item[1], "message": item[2]} for item in items
            if isinstance(item, list) and len(item) == 3]


def _pretty(text: Optional[str]) -> Optional[str]:
    if text is None:
        return None
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        return text


def event_detail(row: Any) -> dict[str, Any]:
    """An event with its headers and payload, secrets redacted."""
    m = row._mapping
    try:
        headers = json.loads(m["headers"] or "{}")
    except ValueError:
        headers = {}
    body = bytes(m["body"] or b"")
    payload: Any
    try:
        payload = json.dumps(redact_json(json.loads(body)), indent=2, ensure_ascii=False)[:TEXT_CAP] if body else ""
    except ValueError:
        payload = _text(body) if body else ""
    return {"id": m["id"], "source": m["source"], "name": m["name"], "action": m["action"], "repo": m["repo"],
            "delivery_id": m["delivery_id"], "received_at": m["received_at"], "status": m["status"],
            "runs_created": m["runs_created"], "note": m["note"],
            "headers": redact_headers(headers if isinstance(headers, dict) else {}), "payload": payload}


def find_run_row(conn: sa.Connection, run_id: str) -> Optional[Any]:
    """A run by id, or by a unique prefix of at least 6 characters (what people type for the
    whole id; one matching several runs names none)."""
    r = runs_table
    row = conn.execute(sa.select(r).where(r.c.id == run_id)).first()
    if row is None and len(run_id) >= 6 and run_id.isalnum():
        rows = conn.execute(sa.select(r).where(r.c.id.like(run_id + "%")).limit(2)).all()
        row = rows[0] if len(rows) == 1 else None
    return row


def run_detail(db: sa.Engine, run_id: str) -> Optional[dict[str, Any]]:
    """Everything about one run: the run, its attempts, its event (redacted) and its replays."""
    r, a, e = runs_table, attempts_table, events_table
    with db.connect() as conn:
        row = find_run_row(conn, run_id)
        if row is None:
            return None
        m = row._mapping
        attempts = conn.execute(sa.select(a).where(a.c.run_id == m["id"]).order_by(a.c.id)).all()
        event = conn.execute(sa.select(e).where(e.c.id == m["event_id"])).first()
        related = conn.execute(
            sa.select(r.c.id, r.c.seq, r.c.state, r.c.status, r.c.created_at)
            .where(r.c.event_id == m["event_id"], r.c.flow == m["flow"]).order_by(r.c.seq)).all()
    run = {k: m[k] for k in ("id", "flow", "seq", "trigger", "state", "status", "attempt", "max_attempts",
                             "created_at", "available_at", "started_at", "finished_at", "duration_ms",
                             "lease_owner", "lease_expires_at", "replay_of", "event_id", "idempotency_key")}
    for optional in ("cancel_requested_at", "cancelled_by", "llm_tokens", "concurrency_key"):
        if optional in m:
            run[optional] = m[optional]
    run.update(error=m["error"], logs=_decode_logs(m["logs"]), stdout=_text(m["stdout"]), stderr=_text(m["stderr"]),
               output=_pretty(_text(m["output"])))
    run["attempts"] = [{"attempt": x.attempt, "worker": x.worker, "claimed_at": x.claimed_at,
                        "finished_at": x.finished_at, "status": x.status, "error": x.error,
                        "duration_ms": x.duration_ms} for x in attempts]
    run["event"] = event_detail(event) if event is not None else None
    run["history"] = [{"id": x.id, "seq": x.seq, "state": x.state, "status": x.status, "created_at": x.created_at}
                      for x in related]
    return run


@dataclass
class EventFilter:
    source: Optional[str] = None
    status: Optional[str] = None
    repo: Optional[str] = None
    limit: int = 50
    before: Optional[float] = None

    @classmethod
    def from_query(cls, query: Any) -> "EventFilter":
        f = RunFilter.from_query({k: query.get(k) for k in ("limit",) if query.get(k)})
        before = query.get("before")
        try:
            before_value = float(before) if before else None
        except ValueError:
            raise QueryError("before must be a unix time in seconds") from None
        status = query.get("status") or None
        if status is not None and status not in ("accepted", "ignored", "skipped"):
            raise QueryError("status must be accepted, ignored or skipped")
        return cls(source=(query.get("source") or None), status=status, repo=(query.get("repo") or None),
                   limit=f.limit, before=before_value)


def list_events(db: sa.Engine, f: EventFilter) -> dict[str, Any]:
    """Events newest first, each with the runs it started: `{"events": [...], "next_before": float|None}`."""
    e, r = events_table, runs_table
    query = sa.select(e.c.id, e.c.source, e.c.name, e.c.action, e.c.repo, e.c.delivery_id, e.c.received_at,
                      e.c.status, e.c.runs_created, e.c.note)
    if f.source:
        query = query.where(e.c.source == f.source)
    if f.status:
        query = query.where(e.c.status == f.status)
    if f.repo:
        query = query.where(e.c.repo == f.repo)
    if f.before is not None:
        query = query.where(e.c.received_at < f.before)
    query = query.order_by(e.c.received_at.desc()).limit(f.limit + 1)
    with db.connect() as conn:
        rows = conn.execute(query).all()
        page = rows[: f.limit]
        runs: dict[str, list[dict[str, Any]]] = {}
        if page:
            for run in conn.execute(sa.select(r.c.id, r.c.event_id, r.c.flow, r.c.seq, r.c.state, r.c.status)
                                    .where(r.c.event_id.in_([row.id for row in page]))
                                    .order_by(r.c.flow, r.c.seq)):
                runs.setdefault(run.event_id, []).append(
                    {"id": run.id, "flow": run.flow, "seq": run.seq, "state": run.state, "status": run.status})
    events = [{**dict(row._mapping), "runs": runs.get(row.id, [])} for row in page]
    return {"events": events, "next_before": page[-1].received_at if len(rows) > f.limit else None}


@dataclass
class FlowStats:
    last_run_at: Optional[float] = None
    last_state: Optional[str] = None
    last_status: Optional[str] = None
    runs_24h: int = 0
    failures_24h: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def flow_stats(db: sa.Engine, names: list[str], now: float) -> dict[str, FlowStats]:
    """Per flow: the latest run, and runs and failures (dead or not ok) in the last 24 hours."""
    r = runs_table
    out = {name: FlowStats() for name in names}
    with db.connect() as conn:
        for name in names:
            last = conn.execute(sa.select(r.c.created_at, r.c.state, r.c.status).where(r.c.flow == name)
                                .order_by(r.c.created_at.desc()).limit(1)).first()
            if last is not None:
                out[name].last_run_at, out[name].last_state, out[name].last_status = last
            counts = conn.execute(
                sa.select(sa.func.count(),
                          sa.func.sum(sa.case((sa.or_(r.c.state == "dead",
                                                      sa.and_(r.c.state == "done", r.c.status != "ok")), 1), else_=0)))
                .where(r.c.flow == name, r.c.created_at >= now - 86400)).first()
            out[name].runs_24h = int(counts[0] or 0)
            out[name].failures_24h = int(counts[1] or 0)
    return out


def llm_tokens_since(db: sa.Engine, since: float) -> Optional[int]:
    """LLM tokens the runs created since `since` spent (None where the store does not record them)."""
    r = runs_table
    if "llm_tokens" not in r.c:
        return None
    with db.connect() as conn:
        return int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(r.c.llm_tokens), 0))
                                .where(r.c.created_at >= since)).scalar() or 0)
