"""Stored transcripts: one row per attempt of a run, its host calls as compressed JSON.

The recorder (wasmflow/host_functions/transcript.py) keeps the calls while the guest runs; this module
adds the run's result, stores the document (`save`, `persist`), reads it back (`load_transcript`,
`list_transcripts`) and summarises it for people (`Transcript.activity`: what the run did through the
host, one row per call, which `wasmflow logs` prints and the console shows).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import queue
import threading
import time
import weakref
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import sqlalchemy as sa

from wasmflow.engine.base import LoadedModule
from wasmflow.engine.cache import module_sha256
from wasmflow.host_functions.transcript import Entry, Recorder, Scrubber, decode, encode
from wasmflow.storage.driver import DriverStatement, driver_transaction
from wasmflow.storage.schema import transcripts_table
from wasmflow.storage.sqlite_writes import take_write_turn

log = logging.getLogger("wasmflow.transcripts")

RESULT_FIELDS = ("status", "exit_code", "output", "response_status", "response_headers", "response_body", "stdout",
                 "stderr", "logs")


def result_summary(result: Any, scrub: Optional[Scrubber] = None) -> dict[str, Any]:
    """What a replay must reproduce of a run's result, secrets scrubbed like the calls."""
    scrub = scrub or Scrubber({})

    def b(data: Optional[bytes]) -> Any:
        return None if data is None else encode(scrub.bytes(bytes(data)) if scrub else bytes(data))

    return {
        "status": str(result.status),
        "exit_code": result.exit_code,
        "error": scrub.text(result.error) if result.error else None,
        "output": b(result.output),
        "response_status": result.response_status,
        "response_headers": [[k, scrub.text(v)] for k, v in result.response_headers],
        "response_body": b(result.response_body),
        "stdout": b(result.stdout),
        "stderr": b(result.stderr),
        "logs": [[level, scrub.text(message)] for _, level, message in result.logs],
    }


_digests: dict[tuple[str, float, int], str] = {}


def module_digest(path: Path) -> Optional[str]:
    """sha256 of a module file (cached by path, mtime and size): tells a replay whether it runs the same build."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (str(path), st.st_mtime, st.st_size)
    digest = _digests.get(key)
    if digest is None:
        digest = _digests[key] = module_sha256(Path(path).read_bytes())
    return digest


def document(recorder: Recorder, result: Any, module: Optional[LoadedModule] = None,
             engine: Optional[str] = None) -> dict[str, Any]:
    """The stored form of a recorded run; `module` is the one the run loaded, whose digest names the
    build it ran (the file may have been rebuilt since)."""
    doc = recorder.document()
    doc["result"] = result_summary(result, recorder.scrub)
    doc["engine"] = engine or getattr(result, "engine", "") or ""
    if module is not None:
        doc["module_path"] = str(module.path)
        doc["module_sha256"] = module.sha256
    doc["finished_at"] = time.time()
    return doc


@dataclass
class Transcript:
    """A stored transcript: the document, and summaries of it."""

    doc: dict[str, Any]

    @property
    def run_id(self) -> str:
        return str(self.doc["run_id"])

    @property
    def attempt(self) -> int:
        return int(self.doc.get("attempt", 1))

    @property
    def flow(self) -> str:
        return str(self.doc["flow"])

    @property
    def truncated(self) -> bool:
        return bool(self.doc.get("truncated"))

    @property
    def result(self) -> dict[str, Any]:
        return dict(self.doc.get("result") or {})

    def entries(self) -> list[Entry]:
        return [Entry.from_json(e) for e in self.doc.get("entries", ())]

    def size(self) -> int:
        """Bytes of the document as JSON (what the size limit bounds, before compression)."""
        return len(json.dumps(self.doc, separators=(",", ":")))

    def activity(self) -> list[dict[str, Any]]:
        """What the run did through the host: one row per call (consecutive clock and random reads as one),
        with kind, target, ok, error, duration_ms, tokens and bytes."""
        rows: list[dict[str, Any]] = []
        for number, raw in enumerate(self.doc.get("entries", ()), start=1):
            entry = Entry.from_json(raw)
            row = _activity_row(entry)
            row["n"] = number
            last = rows[-1] if rows else None
            if (last is not None and row["kind"] in ("clock", "random") and last["kind"] == row["kind"]
                    and last["ok"] and row["ok"]):
                last["count"] += 1
                last["duration_ms"] = round(last["duration_ms"] + row["duration_ms"], 3)
                last["bytes"] += row["bytes"]
                if row["kind"] == "random":
                    last["target"] = f"{last['bytes']} bytes"
                continue
            rows.append(row)
        if self.truncated:
            rows.append({"n": len(self.doc.get("entries", ())) + 1, "kind": "truncated", "count": self.doc.get("dropped", 0),
                         "target": f"{self.doc.get('dropped', 0)} more calls not recorded (limits.transcript)",
                         "ok": False, "error": "transcript truncated", "duration_ms": 0.0, "tokens": 0, "bytes": 0})
        return rows


_KINDS = {"event_name": "event", "event_body": "event", "event_headers": "event", "run_info": "event",
          "config_get": "config", "secret_get": "secret", "http_request": "http", "clock_time_get": "clock",
          "random_get": "random"}
_CLOCK_NAMES = {0: "realtime", 1: "monotonic", 2: "process cputime", 3: "thread cputime"}


def _json_of(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _activity_row(entry: Entry) -> dict[str, Any]:
    module, _, name = entry.fn.partition("::")
    kind = _KINDS.get(name) or ("nn" if module == "wasi_ephemeral_nn" else name.split("_")[0])
    first = entry.reads[0][1] if entry.reads else b""
    target = name
    tokens = 0
    if kind in ("kv", "config", "secret"):
        target = f"{name.split('_', 1)[-1]} {first.decode('utf-8', 'replace')[:120]}" if kind == "kv" else first.decode("utf-8", "replace")[:120]
    elif kind in ("http", "github") and name.endswith("_request"):
        spec = _json_of(first)
        target = f"{spec.get('method', 'GET')} {spec.get('url') or spec.get('path') or ''}"[:200]
    elif kind == "llm":
        spec = _json_of(first)
        target = f"{name.split('_', 1)[-1]} {spec.get('model') or ''}".strip()
        if entry.results:
            usage = _json_of(entry.results[0]).get("usage") or {}
            tokens = sum(int(usage.get(k) or 0) for k in ("prompt_tokens", "completion_tokens")) if isinstance(usage, dict) else 0
    elif kind == "clock":
        target = _CLOCK_NAMES.get(int(entry.args[0] or 0), f"clock {entry.args[0]}")
    elif kind == "random":
        target = f"{entry.args[1] or 0} bytes"
    elif kind == "nn" and name.startswith("load_by_name"):
        target = f"{name} {first.decode('utf-8', 'replace')[:80]}"
    size = sum(n for _, _, n in entry.reads) + sum(len(r) for r in entry.results)
    size += sum(len(d) for _, d in entry.writes if isinstance(d, bytes))
    if entry.fn.startswith("wasi_snapshot_preview1::"):
        ok = entry.code == 0
    elif module == "wasi_ephemeral_nn":
        ok = entry.code == 0
    else:
        ok = entry.code == 0 and not entry.raised
    return {"kind": kind, "target": target, "ok": ok, "error": None if ok else (entry.message or f"code {entry.code}"),
            "duration_ms": round(entry.ms, 3), "tokens": tokens, "bytes": size, "count": 1, "fn": entry.fn}


# -- storage ---------------------------------------------------------------------------------------

def _row(doc: dict[str, Any]) -> dict[str, Any]:
    text = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    return {"run_id": doc["run_id"], "attempt": int(doc.get("attempt", 1)), "flow": doc["flow"],
            "created_at": float(doc.get("started_at") or time.time()), "status": (doc.get("result") or {}).get("status"),
            "calls": len(doc.get("entries", ())), "size": len(text), "truncated": bool(doc.get("truncated")),
            "data": zlib.compress(text, 6)}


def _upsert(dialect: str) -> Any:
    """INSERT that replaces the row of the same (run_id, attempt): a transcript saved again wins."""
    t = transcripts_table
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert

        stmt = insert(t)
        return stmt.on_conflict_do_update(index_elements=[t.c.run_id, t.c.attempt],
                                          set_={c.name: stmt.excluded[c.name] for c in t.c if not c.primary_key})
    if dialect == "sqlite":
        return t.insert().prefix_with("OR REPLACE")
    raise ValueError(f"transcripts: no upsert for the {dialect} dialect (SQLite and PostgreSQL are supported)")


@functools.lru_cache(maxsize=None)
def _upsert_statement(dialect: sa.Dialect, columns: tuple[str, ...]) -> DriverStatement:
    return DriverStatement(_upsert(dialect.name), dialect, column_keys=list(columns))


def save_many(db: sa.Engine, docs: list[dict[str, Any]]) -> list[int]:
    """Store (or replace) transcripts in one transaction; returns each one's compressed size in bytes.

    One statement however many (a batch costs about what one row does), on the driver's cursor: a
    worker stores a transcript per run, and SQLAlchemy's execution took more of the interpreter than
    the guest's own run (`DriverStatement`)."""
    rows = [_row(doc) for doc in docs]
    if not rows:
        return []
    upsert = _upsert_statement(db.dialect, tuple(rows[0]))
    with driver_transaction(db) as raw:
        take_write_turn(raw)
        cursor = raw.cursor()
        try:
            cursor.executemany(upsert.sql, [upsert.params(row) for row in rows])
        finally:
            cursor.close()
    return [len(row["data"]) for row in rows]


def save(db: sa.Engine, doc: dict[str, Any]) -> int:
    """Store (or replace) the transcript of one attempt; returns the compressed size in bytes."""
    return save_many(db, [doc])[0]


def _decode_row(row: Any) -> Optional[Transcript]:
    try:
        return Transcript(json.loads(zlib.decompress(bytes(row.data))))
    except (zlib.error, ValueError) as exc:
        log.warning("transcript of run %s attempt %s cannot be read: %s", row.run_id, row.attempt, exc)
        return None


def load_transcript(db: sa.Engine, run_id: str, attempt: Optional[int] = None) -> Optional[Transcript]:
    """The transcript of a run's latest attempt (or of `attempt`); `run_id` may be a unique prefix."""
    t = transcripts_table
    query = sa.select(t).order_by(t.c.attempt.desc())
    if attempt is not None:
        query = query.where(t.c.attempt == attempt)
    with db.connect() as conn:
        row = conn.execute(query.where(t.c.run_id == run_id).limit(1)).first()
        if row is None and run_id and "%" not in run_id and "_" not in run_id:
            rows = conn.execute(query.where(t.c.run_id.like(f"{run_id}%")).limit(50)).all()
            if len({r.run_id for r in rows}) == 1:
                row = rows[0]
    return _decode_row(row) if row is not None else None


def list_transcripts(db: sa.Engine, flow: Optional[str] = None, since: Optional[float] = None,
                     limit: int = 1000) -> list[Transcript]:
    """The latest attempt's transcript of each run, newest first (of `flow`, started after `since`)."""
    t = transcripts_table
    query = sa.select(t).order_by(t.c.created_at.desc(), t.c.attempt.desc())
    if flow is not None:
        query = query.where(t.c.flow == flow)
    if since is not None:
        query = query.where(t.c.created_at >= since)
    out: list[Transcript] = []
    seen: set[str] = set()
    with db.connect() as conn:
        for row in conn.execute(query.limit(limit * 4)):
            if row.run_id in seen:
                continue
            seen.add(row.run_id)
            transcript = _decode_row(row)
            if transcript is not None:
                out.append(transcript)
            if len(out) >= limit:
                break
    return out


class TranscriptWriter:
    """Stores transcripts off the run's thread, a batch per transaction.

    A transaction of its own per run would cost a worker about as much as the run itself
    (bench/run_overhead.py measures both); the writer turns many into one. A transcript is not the run's
    result: if the process dies before the writer commits it, the run is not replayable offline, and
    nothing else is lost. `flush` waits for what was submitted; the runtime's close calls it.
    """

    def __init__(self, db: sa.Engine, max_batch: int = 256, linger: float = 0.05) -> None:
        self.db = db
        self.max_batch = max_batch
        self.linger = linger  # seconds the writer waits after the first transcript of a batch
        self._queue: "queue.SimpleQueue[Optional[tuple[Recorder, Any, Optional[Path]]]]" = queue.SimpleQueue()
        self._pending = 0
        self._done = threading.Condition()
        self._hurry = threading.Event()  # set by flush: write what is queued now
        self._thread = threading.Thread(target=self._loop, name="wasmflow-transcripts", daemon=True)
        self._thread.start()

    def submit(self, recorder: Recorder, result: Any, module: Optional[LoadedModule]) -> None:
        with self._done:
            self._pending += 1
        self._queue.put((recorder, result, module))

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every submitted transcript is stored (or dropped after an error); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._done:
            while self._pending:
                self._hurry.set()
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._done.wait(left)
        return True

    def _loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            if batch[0] is not None:
                self._hurry.wait(self.linger)  # let a batch gather (one transaction for many), unless flushed
                self._hurry.clear()
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                docs = [document(rec, result, module) for rec, result, module in (b for b in batch if b is not None)]
                save_many(self.db, docs)
            except Exception:  # the store is down or a document is broken: drop the batch, keep serving
                log.exception("storing %d transcript(s)", len(batch))
            stop = any(b is None for b in batch)
            with self._done:
                self._pending -= sum(1 for b in batch if b is not None)
                self._done.notify_all()
            if stop:
                return

    def close(self, timeout: float = 30.0) -> None:
        """Store what is pending, then end the writer's thread (and wait for it: a closed runtime leaves
        no thread of its own behind)."""
        deadline = time.monotonic() + timeout
        self.flush(timeout)
        self._queue.put(None)
        self._thread.join(max(0.0, deadline - time.monotonic()))


_writers: "weakref.WeakKeyDictionary[Any, TranscriptWriter]" = weakref.WeakKeyDictionary()
_writers_lock = threading.Lock()


def _writer_for(runtime: Any, capability: Any) -> TranscriptWriter:
    with _writers_lock:
        writer = _writers.get(runtime)
        if writer is None:
            writer = _writers[runtime] = TranscriptWriter(runtime.db)
            capability.on_close(writer.close)  # the runtime's close waits for what is in flight
        return writer


def persist(runtime: Any, result: Any, wait: bool = True) -> Optional[int]:
    """Store the transcript the run `result` left in `runtime` (if it was recorded); never raises.

    Called by whoever owns the run's result: `wasmflow run` waits (returns the stored size), the executor
    does not (`wait=False`: a background writer stores it; returns 0 once it is handed over).
    """
    try:
        capability = runtime.host.capability("transcript")
    except (AttributeError, KeyError):
        return None
    recorder = capability.take(result.run_id)
    if recorder is None:
        return None
    try:
        module = None
        try:
            module = runtime.module_for(runtime.flows.flow(recorder.run.flow.name))
        except Exception:  # the module did not load: the run is `invalid` and its transcript empty
            pass
        if not wait:
            _writer_for(runtime, capability).submit(recorder, result, module)
            return 0
        return save(runtime.db, document(recorder, result, module))
    except Exception:  # a transcript that cannot be stored must not fail the run
        log.exception("storing the transcript of run %s", result.run_id)
        return None


__all__ = ["Transcript", "TranscriptWriter", "decode", "document", "list_transcripts", "load_transcript", "persist",
           "result_summary", "save", "save_many"]
