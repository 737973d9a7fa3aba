"""The shared `MetaData` every table of wasmflow registers into, and the control plane's tables.

Storage is the ground floor: the control plane (`wasmflow.platform`) and the capabilities both build on
it, and it imports neither. A capability that keeps data owns its table: it defines
`sa.Table(name, metadata, ...)` in its own module (`wasmflow.host_functions.kv` does), and
`wasmflow.storage.migrations.migrate` creates every registered table when a database is opened.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()


# Control plane (wasmflow.platform): events in, runs out.

# Every event the platform accepted or recorded: GitHub deliveries, schedule ticks, HTTP requests.
# `dedupe_key` is unique, so a redelivered webhook or a tick fired by two schedulers is stored once.
events_table = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("source", sa.String(16), nullable=False),  # github | schedule | http | manual
    sa.Column("name", sa.String(128), nullable=False),  # X-GitHub-Event, "schedule", "http"
    sa.Column("action", sa.String(128)),
    sa.Column("repo", sa.String(256)),
    sa.Column("dedupe_key", sa.String(320), unique=True),
    sa.Column("delivery_id", sa.String(128)),  # looked up by dedupe_key, "github:<delivery_id>" (version 5)
    sa.Column("headers", sa.Text, nullable=False, default="{}"),  # JSON object, lower-case names
    sa.Column("body", sa.LargeBinary, nullable=False, default=b""),
    sa.Column("received_at", sa.Float, nullable=False, index=True),
    sa.Column("status", sa.String(16), nullable=False),  # accepted | ignored | skipped
    sa.Column("runs_created", sa.Integer, nullable=False, default=0),
    sa.Column("note", sa.Text),
    sa.Index("ix_events_repo_received", "repo", "received_at"),  # the console's repository filter (version 4)
)

# One row per (event, flow[, replay]): the unit of work the queue hands out. `state` is the queue's view
# (queued, running, done, dead); `status` the outcome of the latest attempt (ok, trap, timeout, ...).
runs_table = sa.Table(
    "runs",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    # Looked up by uq_runs_event_flow_seq, which starts with it (version 5).
    sa.Column("event_id", sa.String(32), sa.ForeignKey("events.id"), nullable=False),
    sa.Column("flow", sa.String(128), nullable=False),
    sa.Column("seq", sa.Integer, nullable=False, default=0),  # 0: the original; n: the n-th replay
    sa.Column("trigger", sa.String(16), nullable=False),
    sa.Column("idempotency_key", sa.String(320)),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16)),
    sa.Column("attempt", sa.Integer, nullable=False, default=0),
    sa.Column("max_attempts", sa.Integer, nullable=False, default=1),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("available_at", sa.Float, nullable=False),  # not claimed before (retry backoff)
    sa.Column("started_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    sa.Column("duration_ms", sa.Float),
    sa.Column("lease_owner", sa.String(160)),
    sa.Column("lease_expires_at", sa.Float),
    sa.Column("lease_expiries", sa.Integer, nullable=False, default=0),
    # Claims so far, counting those released or taken back (an attempt is not counted then): the number
    # the guest sees as its execution, which never repeats for a run, so effects can be keyed on it.
    sa.Column("executions", sa.Integer, nullable=False, default=0, server_default="0"),
    sa.Column("logs", sa.Text),  # JSON [[unix_time, level, message], ...] of the latest attempt
    sa.Column("output", sa.LargeBinary),
    sa.Column("stdout", sa.LargeBinary),
    sa.Column("stderr", sa.LargeBinary),
    sa.Column("error", sa.Text),
    sa.Column("replay_of", sa.String(32)),
    # Concurrency control (schema version 3): the key the flow's `concurrency`/`debounce`/`rate` template
    # gave the run ("" for one key per flow; NULL until a worker admitted it, or for ungoverned flows); who asked to cancel it and when (a running run stops at its worker's next look);
    # LLM tokens its attempts spent, which a `budget` sums per key and period.
    sa.Column("concurrency_key", sa.String(320)),
    sa.Column("cancel_requested_at", sa.Float),
    sa.Column("cancelled_by", sa.String(160)),
    sa.Column("llm_tokens", sa.Integer, nullable=False, default=0, server_default="0"),
    sa.Column("budget_key", sa.String(320)),  # the `budget` key, when it differs from concurrency_key
    sa.Column("debounce_since", sa.Float),  # when the first event merged into this run arrived
    sa.UniqueConstraint("event_id", "flow", "seq", name="uq_runs_event_flow_seq"),
    sa.Index("ix_runs_claim", "state", "available_at"),
    sa.Index("ix_runs_flow_created", "flow", "created_at"),
    sa.Index("ix_runs_concurrency", "flow", "concurrency_key", "state"),
    # The console's runs list (schema version 4): newest first under one filter, keyset by (created_at, id).
    sa.Index("ix_runs_created", "created_at", "id"),
    sa.Index("ix_runs_state_created", "state", "created_at", "id"),
    sa.Index("ix_runs_status_created", "status", "created_at", "id"),
    sa.Index("ix_runs_trigger_created", "trigger", "created_at", "id"),
)

# One row per claim of a run, written in the claim's own transaction: the audit trail that shows
# whether a run was ever executed twice, and the attempt history `wasmflow logs` prints.
attempts_table = sa.Table(
    "attempts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(32), nullable=False, index=True),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("worker", sa.String(160), nullable=False),
    sa.Column("claimed_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),
    sa.Column("status", sa.String(16)),
    sa.Column("error", sa.Text),
    sa.Column("duration_ms", sa.Float),
)

# The last tick the scheduler enqueued (or skipped) per schedule trigger, so a restart knows what it missed.
schedule_state_table = sa.Table(
    "schedule_state",
    metadata,
    sa.Column("flow", sa.String(128), primary_key=True),
    sa.Column("trigger", sa.String(256), primary_key=True),  # "cron|timezone"
    sa.Column("last_tick", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

# The transcript of each attempt of a run (offline replay, wasmflow/platform/transcripts.py): its host calls
# as zlib-compressed JSON, bounded by the flow's `limits.transcript`; `truncated` when the bound cut it.
transcripts_table = sa.Table(
    "transcripts",
    metadata,
    sa.Column("run_id", sa.String(32), primary_key=True),
    sa.Column("attempt", sa.Integer, primary_key=True),
    sa.Column("flow", sa.String(128), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("status", sa.String(16)),
    sa.Column("calls", sa.Integer, nullable=False, default=0),
    sa.Column("size", sa.Integer, nullable=False),  # bytes of the JSON before compression
    sa.Column("truncated", sa.Boolean, nullable=False, default=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.Index("ix_transcripts_flow_created", "flow", "created_at"),
)
