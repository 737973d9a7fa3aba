"""Guest text is data (class 8): what a guest logs, prints, outputs or gets into an error never reaches the
operator's terminal as Rich markup or as control sequences, in `wasmflow run`, `logs`, `runs`, `events`.

The guest (tests/hostile/term_escapes.wat) sends a stray `[/x]` (which crashed Rich), a fake status line
in markup, an OSC 8 hyperlink, CSI screen clearing, DCS/APC strings, C1 controls, bidi overrides, a
carriage return and a newline before a fake status line, and a refused URL full of escapes.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from hostile_support import HOSTILE_DIR
from platform_support import ServerThread, scalar, wait_until, write_wat
from wasmflow.cli import main
from wasmflow.platform.app import Options
from wasmflow.terminal import GuestSafeFormatter, clean

FORBIDDEN = ["\x1b", "\x07", "\x08", "\x00", "\x7f", "\r", "\x9b", "\x9c", "\x9d", "\u202e", "\u2066", "\u2069"]
STATUS_WORDS = ("ok ", "error ", "trap ", "timeout ", "oom ", "denied ", "invalid ")


def assert_harmless(text: str) -> None:
    for seq in FORBIDDEN:
        assert seq not in text, f"{seq!r} reached the terminal"
    assert "Traceback" not in text
    assert "[/x]" in text  # shown as text, not parsed as markup
    assert "[bold red]ok  run 0123456789abcdef" in text
    assert "click me" in text and "screen wiped" in text  # the words stay, the escapes go


@pytest.fixture
def project(tmp_path: Path) -> Path:
    wasm = write_wat(tmp_path / "term.wasm", (HOSTILE_DIR / "term_escapes.wat").read_text())
    (tmp_path / "flows.yaml").write_text(f"""
flows:
  - name: term
    module: {wasm}
    on: [http]
    allow: {{http: ["https://api.example.com"]}}
""")
    return tmp_path


def test_run_prints_guest_text_as_data(project):
    proc = subprocess.run([sys.executable, "-m", "wasmflow.cli", "run", "term"], cwd=project, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert_harmless(proc.stdout + proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines[-2].startswith("denied  run ") and "refused:" in lines[-1], lines[-2:]  # the real status line
    # a newline inside a log message does not start a line of its own: its continuation is indented
    log_continuation = [line for line in lines if line.endswith("(cranelift)  fake")]
    assert log_continuation and log_continuation[0].startswith(" " * 19 + "ok  run"), log_continuation
    assert "refused: http://evil.example/x is not in allow.http" in proc.stdout


def test_logs_runs_and_events_print_guest_text_as_data(project, make_runtime):
    runtime = make_runtime(project, (project / "flows.yaml").read_text())
    try:
        with ServerThread(runtime, Options(workers=1, poll_interval=0.05)) as server:
            requests.post(f"{server.base}/flows/term", json={}, timeout=30)
            wait_until(lambda: scalar(runtime.db, "SELECT count(*) FROM runs WHERE state IN ('done', 'dead')") == 1)
        run_id = scalar(runtime.db, "SELECT id FROM runs")
        url = f"sqlite:///{project / 'state.db'}"
        runner = CliRunner()
        for args in (["logs", run_id], ["runs"], ["events"]):
            result = runner.invoke(main, [*args, "--database-url", url], catch_exceptions=False)
            assert result.exit_code == 0, result.output
            if args[0] == "logs":
                assert_harmless(result.output)
            else:
                for seq in FORBIDDEN:
                    assert seq not in result.output, f"{seq!r} reached the terminal through `{args[0]}`"
        assert "evil" in runner.invoke(main, ["runs", "--database-url", url]).output  # the error column
    finally:
        runtime.close()


@pytest.mark.parametrize("raw, shown", [
    ("\x1b]8;;http://evil\x07link\x1b]8;;\x1b\\", "link"),
    ("\x1b[2J\x1b[1;31mred", "red"),
    ("a\x9b2Jb\x9d0;title\x9cc", "abc"),
    ("\x1bPq#0;2;0;0;0\x1b\\sixel", "sixel"),
    ("tab\tand\nnewline", "tab\tand\nnewline"),
    ("cr\roverwrite\x00\x08\x7f", "croverwrite"),
    ("\u202ereversed\u202c \u2067iso\u2069 \u200fmark", "reversed iso mark"),
    ("\x1b", ""),
    ("[/x] [bold]kept[/bold]", "[/x] [bold]kept[/bold]"),
])
def test_clean_strips_control_sequences_and_keeps_the_text(raw, shown):
    assert clean(raw) == shown


def test_server_log_lines_are_cleaned():
    record = logging.LogRecord("wasmflow.worker", logging.WARNING, __file__, 1, "run %s: %s", ("r1", "\x1b[2Jgone\x07"),
                               None)
    assert GuestSafeFormatter("%(levelname)s %(message)s").format(record) == "WARNING run r1: gone"
