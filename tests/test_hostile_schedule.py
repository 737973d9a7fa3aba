"""Class 9: one bad schedule must not stop the others.

A cron expression that never fires (`0 0 31 2 *`) used to pass validation and then make every scheduler
pass fail, so no schedule fired at all. Now `wasmflow validate` refuses it with file:line: field, and at
run time a schedule that fails anyway (here injected past validation with `model_construct`) is isolated
to its trigger: the others fire, the failure is logged once (not per pass), counted in
`wasmflow_schedule_ticks_total{outcome="failed"}` and recorded once as a `failed` schedule event.
"""

from __future__ import annotations

import logging
import textwrap
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from wasmflow.flows import FlowsError, load_flows
from wasmflow.flows.cli_commands import validate_command
from wasmflow.flows.model import Flow, FlowsFile, ScheduleTrigger, Trigger
from wasmflow import storage as dbmod
from wasmflow.platform.metrics import Metrics
from wasmflow.platform.scheduler import Scheduler
from wasmflow.platform.store import list_events

from platform_support import scalar


def at(*args: int) -> float:
    return datetime(*args, tzinfo=ZoneInfo("UTC")).timestamp()


def bad_trigger(cron: str = "0 0 31 2 *", timezone: str = "UTC") -> Trigger:
    """A schedule trigger that skips validation, as a file checked by an older wasmflow could hold."""
    return Trigger.model_construct(github=None, http=None, schedule=ScheduleTrigger.model_construct(
        cron=cron, timezone=timezone, overlap="allow", catch_up=0.0))


def two_flows(bad: Trigger) -> FlowsFile:
    # The broken flow comes first: before the fix its failure ended the pass before `healthy` was reached.
    return FlowsFile(flows=[
        Flow.model_construct(**{**Flow(name="broken", module="x.wasm").__dict__, "on": [bad]}),
        Flow(name="healthy", module="x.wasm", on=[{"schedule": {"cron": "* * * * * *", "overlap": "allow"}}]),
    ])


@pytest.fixture
def db(tmp_path):
    engine = dbmod.open_database(f"sqlite:///{tmp_path / 's.db'}")
    yield engine
    engine.dispose()


def scheduler_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "wasmflow.scheduler" and r.levelno >= logging.WARNING]


@pytest.mark.parametrize("bad, failed_passes", [
    (bad_trigger(), 6),
    (bad_trigger("0 0 1 1 * 0 2020"), 5),  # its first sight (the last time it fired) works; nothing after
    (bad_trigger("* * * * *", timezone="Nowhere/Atlantis"), 6),
], ids=["31-february", "year-past", "unknown-timezone"])
def test_a_schedule_that_cannot_fire_does_not_stop_the_others(db, caplog, bad: Trigger, failed_passes: int) -> None:
    caplog.set_level(logging.DEBUG, logger="wasmflow.scheduler")
    metrics = Metrics()
    s = Scheduler(db, two_flows(bad), metrics)
    start = at(2026, 1, 5, 10, 0, 0) + 0.5
    assert s.tick(now=start) == []  # first sight of both
    fired = []
    for second in range(1, 6):
        fired += s.tick(now=start + second)
    assert len(fired) == 5  # the healthy every-second schedule fired each second
    assert scalar(db, "SELECT count(*) FROM runs WHERE flow = 'healthy'") == 5
    assert scalar(db, "SELECT count(*) FROM runs WHERE flow = 'broken'") == 0

    # Reported: once in the log (no traceback at warning level), once as an event, and counted per pass.
    errors = scheduler_errors(caplog)
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "broken" in errors[0].getMessage() and errors[0].exc_info is None
    assert "fix" in errors[0].getMessage()
    assert metrics.schedule_ticks.labels(flow="broken", outcome="failed")._value.get() == failed_passes
    rows = [e for e in list_events(db, source="schedule") if e.status == "failed"]  # as `wasmflow events` shows
    assert len(rows) == 1 and rows[0].runs_created == 0
    assert "broken" in rows[0].note and "flows.yaml" in rows[0].note


def test_a_database_outage_is_logged_once_and_the_schedule_recovers(db, caplog) -> None:
    caplog.set_level(logging.INFO, logger="wasmflow.scheduler")
    metrics = Metrics()
    s = Scheduler(db, FlowsFile(flows=[Flow(name="healthy", module="x.wasm", on=[
        {"schedule": {"cron": "* * * * * *", "overlap": "allow"}}])]), metrics)
    start = at(2026, 1, 5, 10, 0, 0) + 0.5
    s.tick(now=start)
    with db.begin() as conn:  # the store goes away under the scheduler
        conn.execute(sa.text("ALTER TABLE runs RENAME TO runs_away"))
    for second in range(1, 4):
        assert s.tick(now=start + second) == []
    errors = scheduler_errors(caplog)
    assert len(errors) == 1 and "database" in errors[0].getMessage() and "trying again" in errors[0].getMessage()
    assert metrics.schedule_ticks.labels(flow="healthy", outcome="failed")._value.get() == 3
    with db.begin() as conn:
        conn.execute(sa.text("ALTER TABLE runs_away RENAME TO runs"))
    assert len(s.tick(now=start + 4)) == 4  # the ticks of the outage, inside the 10 s grace, then on time
    assert any("recovered" in r.getMessage() for r in caplog.records)
    assert s.failing == {}


# --- validation: the same expressions are refused before they reach the scheduler ----------------------


@pytest.mark.parametrize("cron, expected", [
    ("0 0 31 2 *", "never fires"),
    ("0 0 30 2 *", "never fires"),
    ("0 0 31 4,6,9,11 *", "never fires"),
    ("0 0 1 1 * 0 2020", "never fires"),
    ("0 0 29 2 *", None),  # leap days do come
    ("* * * * * *", None),  # every second
])
def test_validate_refuses_cron_expressions_that_never_fire(tmp_path: Path, cron: str, expected: str | None) -> None:
    path = tmp_path / "flows.yaml"
    path.write_text(textwrap.dedent(f"""\
        flows:
          - name: digest
            module: x.wasm
            on:
              - schedule: {{cron: "{cron}"}}
        """))
    if expected is None:
        assert load_flows(path, env={}).file.flows[0].on[0].schedule.cron == cron
        return
    with pytest.raises(FlowsError) as info:
        load_flows(path, env={})
    assert info.value.line == 5 and info.value.field == "flows[digest].on[0].schedule.cron"
    assert expected in info.value.message
    result = CliRunner().invoke(validate_command, [str(path)])
    assert result.exit_code == 2
    assert f"{path}:5: flows[digest].on[0].schedule.cron:" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("catch_up, ok", [("31d", True), ("0s", True), ("32d", False), ("1.0e+300", False),
                                           (".inf", False), ("-1s", False)])
def test_catch_up_is_range_checked(tmp_path: Path, catch_up: str, ok: bool) -> None:
    path = tmp_path / "flows.yaml"
    path.write_text(f"flows:\n  - name: digest\n    module: x.wasm\n    on:\n"
                    f"      - schedule: {{cron: '0 9 * * *', catch_up: {catch_up}}}\n")
    if ok:
        load_flows(path, env={})
        return
    with pytest.raises(FlowsError) as info:
        load_flows(path, env={})
    assert info.value.line == 5 and info.value.field == "flows[digest].on[0].schedule.catch_up"
    assert any(word in info.value.message for word in ("31d", "366d", "finite", "negative")), info.value.message
