"""Cron triggers: each tick once, catch-up windows, overlap policies and time zones, on a real store.

Passes are driven with explicit times (`Scheduler.tick(now=...)`), so the tests are exact and instant.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from wasmflow.flows.model import Flow, FlowsFile
from wasmflow import storage as dbmod
from wasmflow.platform.metrics import Metrics
from wasmflow.platform.scheduler import Scheduler

from platform_support import scalar

UTC = timezone.utc


def at(*args: int, tz: str = "UTC") -> float:
    return datetime(*args, tzinfo=ZoneInfo(tz)).timestamp()


def flows(cron: str = "0 * * * *", tz: str = "UTC", overlap: str = "allow", catch_up: str = "0s") -> FlowsFile:
    return FlowsFile(flows=[Flow(name="digest", module="x.wasm", on=[
        {"schedule": {"cron": cron, "timezone": tz, "overlap": overlap, "catch_up": catch_up}}])])


@pytest.fixture
def db(tmp_path):
    engine = dbmod.open_database(f"sqlite:///{tmp_path / 's.db'}")
    yield engine
    engine.dispose()


def runs(db: sa.Engine) -> list[tuple[str, str]]:
    with db.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT e.body, r.state FROM runs r JOIN events e ON e.id = r.event_id ORDER BY r.created_at")).all()
    return [(json.loads(body)["scheduled_at"], state) for body, state in rows]


def finish_all(db: sa.Engine) -> None:
    with db.begin() as conn:
        conn.execute(sa.text("UPDATE runs SET state = 'done' WHERE state IN ('queued', 'running')"))


def test_first_start_fires_nothing_from_the_past_then_each_tick_once(db):
    s = Scheduler(db, flows())
    assert s.tick(now=at(2026, 1, 5, 10, 30)) == []  # 10:00 is past: not fired on first sight
    assert s.tick(now=at(2026, 1, 5, 10, 59, 59)) == []
    (run_id,) = s.tick(now=at(2026, 1, 5, 11, 0, 1))
    assert s.tick(now=at(2026, 1, 5, 11, 0, 2)) == []
    assert runs(db) == [("2026-01-05T11:00:00+00:00", "queued")]
    assert scalar(db, "SELECT idempotency_key FROM runs WHERE id = :r", r=run_id) == "digest@2026-01-05T11:00:00+00:00"


def test_a_tick_is_stored_once_even_if_a_second_scheduler_fires_it(db):
    first, second = Scheduler(db, flows()), Scheduler(db, flows())
    first.tick(now=at(2026, 1, 5, 10, 30))
    assert len(first.tick(now=at(2026, 1, 5, 11, 0, 1))) == 1
    # a second scheduler working from stale state (as if both read it before either wrote)
    with db.begin() as conn:
        conn.execute(sa.text("UPDATE schedule_state SET last_tick = :t"), {"t": at(2026, 1, 5, 10, 0)})
    assert second.tick(now=at(2026, 1, 5, 11, 0, 2)) == []
    assert scalar(db, "SELECT count(*) FROM runs") == 1
    assert scalar(db, "SELECT count(*) FROM events") == 1


def test_catch_up_runs_missed_ticks_inside_the_window_and_drops_older_ones(db):
    metrics = Metrics()
    s = Scheduler(db, flows(catch_up="2h", overlap="allow"), metrics)
    s.tick(now=at(2026, 1, 5, 10, 30))
    created = s.tick(now=at(2026, 1, 5, 15, 30))  # down from 10:30 to 15:30: 11, 12 ... 15 were missed
    assert [t for t, _ in runs(db)] == ["2026-01-05T14:00:00+00:00", "2026-01-05T15:00:00+00:00"]
    assert len(created) == 2
    assert metrics.schedule_ticks.labels(flow="digest", outcome="missed")._value.get() == 3


def test_without_catch_up_a_long_outage_fires_nothing_old(db):
    s = Scheduler(db, flows(catch_up="0s"))
    s.tick(now=at(2026, 1, 5, 10, 30))
    assert s.tick(now=at(2026, 1, 5, 15, 30)) == []
    assert s.tick(now=at(2026, 1, 5, 16, 0, 3)) != []  # and the next tick is on time again


def test_overlap_skip_records_the_tick_as_skipped_while_the_previous_run_goes(db):
    s = Scheduler(db, flows(overlap="skip"))
    s.tick(now=at(2026, 1, 5, 10, 30))
    assert len(s.tick(now=at(2026, 1, 5, 11, 0, 1))) == 1
    assert s.tick(now=at(2026, 1, 5, 12, 0, 1)) == []  # 11:00 still queued
    assert scalar(db, "SELECT status FROM events ORDER BY received_at DESC LIMIT 1") == "skipped"
    finish_all(db)
    assert len(s.tick(now=at(2026, 1, 5, 13, 0, 1))) == 1
    assert [t for t, _ in runs(db)] == ["2026-01-05T11:00:00+00:00", "2026-01-05T13:00:00+00:00"]


def test_overlap_queue_holds_the_tick_until_the_previous_run_is_over(db):
    s = Scheduler(db, flows(overlap="queue"))
    s.tick(now=at(2026, 1, 5, 10, 30))
    s.tick(now=at(2026, 1, 5, 11, 0, 1))
    assert s.tick(now=at(2026, 1, 5, 12, 0, 1)) == []
    assert runs(db) == [("2026-01-05T11:00:00+00:00", "queued"), ("2026-01-05T12:00:00+00:00", "waiting")]
    assert s.tick(now=at(2026, 1, 5, 12, 0, 2)) == []  # still going: still waiting
    finish_all(db)
    (released,) = s.tick(now=at(2026, 1, 5, 12, 0, 3))
    assert runs(db)[1] == ("2026-01-05T12:00:00+00:00", "queued")


def test_overlap_allow_enqueues_every_tick(db):
    s = Scheduler(db, flows(overlap="allow"))
    s.tick(now=at(2026, 1, 5, 10, 30))
    s.tick(now=at(2026, 1, 5, 11, 0, 1))
    s.tick(now=at(2026, 1, 5, 12, 0, 1))
    assert [state for _, state in runs(db)] == ["queued", "queued"]


def test_time_zone_follows_daylight_saving_time(db):
    s = Scheduler(db, flows(cron="0 9 * * *", tz="Europe/Berlin", overlap="allow", catch_up="1h"))
    s.tick(now=at(2026, 3, 27, 12, 0, tz="Europe/Berlin"))
    s.tick(now=at(2026, 3, 28, 9, 0, 1, tz="Europe/Berlin"))  # Saturday, winter time (+01:00)
    finish_all(db)
    s.tick(now=at(2026, 3, 29, 9, 0, 1, tz="Europe/Berlin"))  # Sunday, summer time since 02:00 (+02:00)
    ticks = [t for t, _ in runs(db)]
    assert ticks == ["2026-03-28T09:00:00+01:00", "2026-03-29T09:00:00+02:00"]
    utc_hours = [datetime.fromisoformat(t).astimezone(UTC).hour for t in ticks]
    assert utc_hours == [8, 7]
