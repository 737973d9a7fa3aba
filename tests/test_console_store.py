"""The console's reads on SQLite and PostgreSQL: keyset pages, filters, bulk-replay selection, and the
indexes of schema version 4 (created on a fresh database, added to an older one, used by the queries)."""

from __future__ import annotations

import sqlalchemy as sa

from console_support import seed_runs
from platform_support import db  # noqa: F401  (fixture: SQLite and PostgreSQL)
from wasmflow.console.queries import RunFilter, dead_run_ids, list_events, list_runs, EventFilter
from wasmflow.storage.migrations import CONSOLE_INDEXES, SCHEMA_VERSION, migrate, schema_version_table


def _indexes(engine: sa.Engine) -> set[str]:
    inspector = sa.inspect(engine)
    return {ix["name"] for table in ("runs", "events") for ix in inspector.get_indexes(table)}


def _all_pages(engine: sa.Engine, f: RunFilter) -> list[str]:
    seen: list[str] = []
    while True:
        page = list_runs(engine, f)
        seen += [r["id"] for r in page["runs"]]
        if not page["next_cursor"]:
            return seen
        f.cursor = page["next_cursor"]


def test_keyset_pages_visit_every_run_once_even_with_equal_times(db):
    ids = seed_runs(db, 47, same_time_every=5)
    seen = _all_pages(db, RunFilter(limit=6))
    assert len(seen) == 47 and set(seen) == set(ids)
    assert seen == sorted(ids, reverse=True)  # newest first; ties broken by id, also descending
    dead = _all_pages(db, RunFilter(limit=2, state="dead"))
    assert dead == [i for i in reversed(ids) if int(i[1:]) % 10 == 8]
    both = _all_pages(db, RunFilter(limit=3, flow="f1", repo="acme/r1"))
    assert both == [i for i in reversed(ids) if int(i[1:]) % 3 == 1 and int(i[1:]) % 7 == 1]


def test_dead_runs_already_replayed_are_left_out(db):
    ids = seed_runs(db, 30)
    dead = dead_run_ids(db, RunFilter())
    assert dead == [i for i in ids if int(i[1:]) % 10 == 8]
    from wasmflow.storage.schema import runs_table

    with db.begin() as conn:  # a later replay of the first dead run (itself done)
        conn.execute(runs_table.insert().values(
            id="replay0", event_id="e" + dead[0][1:], flow=f"f{int(dead[0][1:]) % 3}", seq=1, trigger="github",
            state="done", status="ok", attempt=1, executions=1, max_attempts=1, created_at=2e9, available_at=2e9,
            lease_expiries=0, replay_of=dead[0]))
    assert dead_run_ids(db, RunFilter()) == dead[1:]


def test_events_page_lists_runs_of_each_event(db):
    seed_runs(db, 12)
    page = list_events(db, EventFilter(limit=5))
    assert len(page["events"]) == 5 and page["next_before"] is not None
    assert all(len(e["runs"]) == 1 for e in page["events"])
    rest = list_events(db, EventFilter(limit=50, before=page["next_before"]))
    assert len(rest["events"]) == 7 and rest["next_before"] is None


def test_a_fresh_database_has_the_console_indexes_and_an_older_one_gets_them(db):
    names = {name for name, _, _ in CONSOLE_INDEXES}
    assert names <= _indexes(db)
    assert SCHEMA_VERSION >= 4
    with db.begin() as conn:  # make it a version-3 database from before the console
        for name, _, _ in CONSOLE_INDEXES:
            conn.execute(sa.text(f"DROP INDEX {name}"))
        conn.execute(schema_version_table.delete())
        conn.execute(schema_version_table.insert().values(version=3, applied_at=0.0))
    assert not names & _indexes(db)
    assert migrate(db) == SCHEMA_VERSION
    assert names <= _indexes(db)
    assert migrate(db) == SCHEMA_VERSION  # again: nothing to do, no error


def test_sqlite_serves_each_filtered_page_from_an_index_without_sorting(tmp_path):
    from wasmflow import storage

    engine = storage.open_database(f"sqlite:///{tmp_path / 'plan.db'}")
    seed_runs(engine, 2000)
    with engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE")
    from wasmflow.console import queries

    for f in (RunFilter(), RunFilter(state="dead"), RunFilter(status="trap"), RunFilter(flow="f1"),
              RunFilter(trigger="schedule"), RunFilter(state="dead", cursor=queries.encode_cursor(1_700_001_000.0, "r"))):
        captured: list[str] = []

        def explain(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
            if statement.lstrip().upper().startswith("SELECT") and "FROM runs" in statement and not captured:
                rows = cursor.connection.execute("EXPLAIN QUERY PLAN " + statement, parameters).fetchall()
                captured.append(" | ".join(str(r[-1]) for r in rows))

        sa.event.listen(engine, "before_cursor_execute", explain)
        try:
            list_runs(engine, f)
        finally:
            sa.event.remove(engine, "before_cursor_execute", explain)
        plan = captured[0]
        assert "USING INDEX ix_runs_" in plan or "USING COVERING INDEX ix_runs_" in plan, (f, plan)
        assert "TEMP B-TREE" not in plan, (f, plan)
    engine.dispose()


def test_a_busy_repository_is_read_by_walking_the_runs_with_the_same_result(tmp_path, monkeypatch):
    from wasmflow import storage
    from wasmflow.console import queries

    engine = storage.open_database(f"sqlite:///{tmp_path / 'walk.db'}")
    ids = seed_runs(engine, 700)  # 100 events per repository
    expected = [i for i in reversed(ids) if int(i[1:]) % 7 == 3]
    monkeypatch.setattr(queries, "REPO_WALK_THRESHOLD", 1000)  # rare: through its events, sorted
    assert _all_pages(engine, RunFilter(limit=7, repo="acme/r3")) == expected
    monkeypatch.setattr(queries, "REPO_WALK_THRESHOLD", 50)  # busy: walking the runs index
    statements: list[str] = []
    sa.event.listen(engine, "before_cursor_execute", lambda c, cur, stmt, *a: statements.append(stmt))
    assert _all_pages(engine, RunFilter(limit=7, repo="acme/r3")) == expected
    assert any("+events.repo" in s for s in statements)
    engine.dispose()
