"""`wasmflow replay --offline`: the command-line side of exact offline replay (replay_offline.py does it).

One run: a verdict line (`identical`, or the first divergence), what changed and a diff of the outputs.
Many runs (`--flow F --since 7d`): a table, one row per run, the counts per verdict, and the diffs.
Exit status: 0 when every replay is identical, 1 otherwise (so a CI job can gate a new build on it).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from wasmflow.cli_support import load_runtime
from wasmflow.terminal import clean, guest_text

console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, highlight=False)
VERDICT_STYLE = {"identical": "green", "output changed": "yellow", "diverged": "red", "failed": "red"}


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[red]error:[/red] {escape(clean(message))}", soft_wrap=True)
    sys.exit(code)


def offline_command(ref: Optional[str], module: Optional[str], flow_name: Optional[str], since: Optional[str],
                    engine: Optional[str], database_url: Optional[str], flows_path: Optional[Path]) -> None:
    """Replay one recorded run (REF) or many (--flow, --since) offline; print the verdicts; exit 1 unless all
    are identical."""
    from wasmflow.fields import parse_duration
    from wasmflow.platform.replay_offline import replay_many, replay_offline
    from wasmflow.platform.transcripts import list_transcripts, load_transcript

    if ref and (flow_name or since):
        _fail("give a run id, or --flow/--since for many runs, not both")
    if not ref and not flow_name:
        _fail("name a run (`wasmflow replay RUN --offline`) or a flow (`--flow NAME --since 7d`); "
              "`wasmflow runs` lists them")
    cutoff = None
    if since:
        try:
            cutoff = time.time() - parse_duration(since)
        except ValueError as exc:
            _fail(f"--since {since!r}: {exc}")
    if ref:
        # The store is read before the runtime is built: a wrong id costs no module loading.
        probe = load_runtime(flows_path, engine, database_url)
        try:
            transcript = load_transcript(probe.db, ref)
            if transcript is None:
                _fail(f"no transcript for run {ref}: it was not recorded (limits.transcript: 0), or ran before "
                      "recording existed; `wasmflow runs` lists runs", 1)
            recorded_engine = str(transcript.doc.get("engine") or "") or None  # type: ignore[union-attr]
            if engine is None and recorded_engine and recorded_engine != (probe.engine_override or ""):
                probe.close()
                probe = load_runtime(flows_path, recorded_engine, database_url)  # the engine it ran on
            report = replay_offline(probe, transcript, module)  # type: ignore[arg-type]
        finally:
            probe.close()
        _print_one(report)
        sys.exit(0 if report.verdict == "identical" else 1)
    runtime = load_runtime(flows_path, engine, database_url)
    try:
        transcripts = list_transcripts(runtime.db, flow=flow_name, since=cutoff)
        if not transcripts:
            _fail(f"no recorded runs of flow {flow_name!r}" + (f" in the last {since}" if since else ""), 1)
        reports = replay_many(runtime, transcripts, module)
    finally:
        runtime.close()
    _print_many(reports)
    sys.exit(0 if all(r.verdict == "identical" for r in reports) else 1)


def _print_one(report) -> None:  # type: ignore[no-untyped-def]
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {escape(clean(note))}", soft_wrap=True)
    style = VERDICT_STYLE.get(report.verdict, "default")
    line = f"[bold {style}]{report.verdict}[/]  run {escape(report.run_id)}  flow {escape(report.flow)}"
    if report.verdict != "failed":
        line += f"  {report.calls_replayed} calls replayed of {report.calls_recorded} recorded  status {report.status}"
    console.print(line, soft_wrap=True)
    if report.detail:
        console.print(guest_text(report.detail), soft_wrap=True)
    for reason in report.refused[:5]:
        console.print(guest_text(f"refused: {reason}", style="yellow"), soft_wrap=True)
    if report.output_diff:
        console.print("[dim]--- output diff ---[/dim]")
        console.print(guest_text(report.output_diff), soft_wrap=True)


def _print_many(reports) -> None:  # type: ignore[no-untyped-def]
    table = Table(show_edge=False, pad_edge=False)
    for column in ("run", "recorded", "replayed", "verdict", "calls", "detail"):
        table.add_column(column, overflow="fold")
    for r in reports:
        style = VERDICT_STYLE.get(r.verdict, "default")
        table.add_row(r.run_id, r.recorded_status, r.status, f"[{style}]{r.verdict}[/]",
                      f"{r.calls_replayed}/{r.calls_recorded}", guest_text(r.detail[:160]))
    console.print(table)
    counts = {v: sum(1 for r in reports if r.verdict == v) for v in ("identical", "output changed", "diverged", "failed")}
    console.print("  ".join(f"[{VERDICT_STYLE[v]}]{v.replace('identical', 'same')}[/] {n}" for v, n in counts.items()))
    for r in reports:
        if r.output_diff:
            console.print(f"[dim]--- output diff of run {escape(r.run_id)} ---[/dim]")
            console.print(guest_text(r.output_diff), soft_wrap=True)


def activity_table(transcript) -> Table:  # type: ignore[no-untyped-def]
    """What the run did through the host (`Transcript.activity`), for `wasmflow logs`."""
    table = Table(show_edge=False, pad_edge=False, title="host calls", title_justify="left", title_style="dim")
    for column in ("#", "kind", "target", "ok", "ms", "tokens", "bytes"):
        table.add_column(column, overflow="fold", justify="right" if column in ("#", "ms", "tokens", "bytes") else "left")
    for row in transcript.activity():
        target = row["target"] + (f" (x{row['count']})" if row.get("count", 1) > 1 else "")
        ok = "[green]ok[/]" if row["ok"] else "[red]" + escape(clean(str(row.get("error") or "error"))[:80]) + "[/]"
        table.add_row(str(row["n"]), row["kind"], guest_text(target), ok, f"{row['duration_ms']:.2f}",
                      str(row["tokens"] or ""), str(row["bytes"]))
    return table


def print_recorded_run(db, run_id: str) -> bool:  # type: ignore[no-untyped-def]
    """`wasmflow logs RUN` for a run made by `wasmflow run` (no queue row, only a transcript)."""
    from wasmflow.host_functions.transcript import decode
    from wasmflow.platform.transcripts import load_transcript

    transcript = load_transcript(db, run_id)
    if transcript is None:
        return False
    result = transcript.result
    console.print(f"run {escape(transcript.run_id)}  flow {escape(transcript.flow)}  ({escape(str(result.get('status')))})"
                  "  [dim]recorded by `wasmflow run`[/dim]", soft_wrap=True)
    if transcript.doc.get("entries"):
        console.print(activity_table(transcript))
    for level, message in result.get("logs") or ():
        console.print(f"{level:5} ", guest_text(message), soft_wrap=True)
    if result.get("output") is not None:
        console.print("[dim]--- output ---[/dim]")
        console.print(guest_text(decode(result["output"]).decode("utf-8", "replace")), soft_wrap=True)
    if result.get("error"):
        console.print(guest_text(result["error"], style="red"), soft_wrap=True)
    return True
