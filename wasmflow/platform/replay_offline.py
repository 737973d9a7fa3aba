"""Exact offline replay: run a module against a stored transcript and say whether it did the same.

The guest runs on a real engine, but every host call that would reach outside it is answered from the
transcript (`wasmflow.host_functions.transcript.ReplayTape`): no network, no kv write, no model. The
verdict is one of:

- `identical`: the same calls, in the same order, with the same inputs, and the same result (status,
  exit code, output, HTTP response, stdout/stderr, log lines);
- `output changed`: the same calls, another result (a new build that formats its answer differently);
- `diverged`: the first call that differs, "call N: expected X, got Y";
- `failed`: the replay could not run (truncated transcript, unknown flow, a module that does not load).

`--module` (a .wasm or a crate) replays a new build against the recorded inputs: this is how a new
prompt or model is tried on a flow's real history before it is switched on.
"""

from __future__ import annotations

import difflib
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from wasmflow.build import resolve_module
from wasmflow.engine import ModuleError, RunRequest
from wasmflow.host_functions.spec import Event
from wasmflow.host_functions.transcript import decode
from wasmflow.host_functions.transcript_replay import ReplayTape
from wasmflow.platform.transcripts import RESULT_FIELDS, Transcript, module_digest, result_summary

VERDICTS = ("identical", "output changed", "diverged", "failed")
MAX_DIFF_LINES = 60
HOST_SUMMARY = "wasmflow: "  # how the host's own log lines begin


@dataclass
class ReplayReport:
    """The outcome of one offline replay."""

    run_id: str
    flow: str
    verdict: str
    detail: str = ""  # the divergence, what changed, or why it failed
    recorded_status: str = ""
    status: str = ""
    calls_recorded: int = 0
    calls_replayed: int = 0
    changed: list[str] = field(default_factory=list)  # result fields that differ
    output_diff: str = ""
    module: str = ""
    notes: list[str] = field(default_factory=list)  # e.g. the module is not the recorded build
    refused: list[str] = field(default_factory=list)  # calls with no recorded answer (the guest got DENIED)


def _failed(transcript: Transcript, detail: str) -> ReplayReport:
    return ReplayReport(transcript.run_id, transcript.flow, "failed", detail,
                        recorded_status=str(transcript.result.get("status", "")),
                        calls_recorded=len(transcript.doc.get("entries", ())))


def replay_offline(runtime: Any, transcript: Transcript, module: Optional[str] = None) -> ReplayReport:
    """Replay `transcript` on `runtime` (its flows.yaml gives the flow's config, limits and engine).

    `module`: a .wasm path or crate directory to run instead of the flow's current module.
    """
    doc = transcript.doc
    if transcript.truncated:
        return _failed(transcript, f"the transcript was truncated at call {doc.get('truncated_at')} (limit "
                                   f"{doc.get('limit')} bytes, limits.transcript): an offline replay cannot be "
                                   "exact; raise the flow's limits.transcript to record whole runs")
    try:
        flow = runtime.flows.flow(transcript.flow)
    except KeyError:
        return _failed(transcript, f"flow {transcript.flow!r} is not in flows.yaml; replay it with the flows.yaml "
                                   "it ran under (--flows)")
    notes: list[str] = []
    engine = runtime.engine_for(flow)
    try:
        if module is not None:
            path = resolve_new_module(module, Path(runtime.base_dir))
        else:
            path = resolve_module(flow.module, runtime.base_dir)
            recorded = doc.get("module_sha256")
            if recorded and module_digest(path) != recorded:
                notes.append(f"the flow's module {path} is not the build that ran (sha256 {recorded[:12]}...): "
                             "replaying the current build")
        loaded = engine.load(path, flow.name)
    except (FileNotFoundError, ValueError, ModuleError) as exc:
        return _failed(transcript, str(exc))
    event_doc = doc.get("event") or {}
    request = RunRequest(flow=flow, event=Event(name=str(event_doc.get("name", "manual")), body=b"{}",
                                                trigger=str(event_doc.get("trigger", "manual"))),
                         run_id=f"replay-{uuid.uuid4().hex[:12]}", attempt=transcript.attempt)
    tape = ReplayTape(transcript.entries())
    capability = runtime.host.capability("transcript")
    capability.expect(request.run_id, tape)
    try:
        result = engine.run(loaded, request)
    finally:
        capability.forget(request.run_id)
    tape.finish()
    notes.extend(tape.notes)
    report_refused = list(tape.refused)
    report = ReplayReport(transcript.run_id, transcript.flow, "identical", recorded_status=str(
        transcript.result.get("status", "")), status=str(result.status), calls_recorded=len(tape.entries),
        calls_replayed=tape.count, module=str(path), notes=notes, refused=report_refused)
    now = result_summary(result, tape.scrub)
    before = transcript.result
    report.changed = [name for name in RESULT_FIELDS if _comparable(name, now) != _comparable(name, before)]
    if "output" in report.changed:
        report.output_diff = output_diff(before.get("output"), now.get("output"))
    if tape.divergence is not None:
        report.verdict, report.detail = "diverged", tape.divergence
    elif report.changed:
        report.verdict = "output changed"
        report.detail = "changed: " + ", ".join(report.changed)
        if "status" in report.changed:
            report.detail += f" (status {before.get('status')} -> {now.get('status')}" + (
                f": {result.error}" if result.error else "") + ")"
    return report


def resolve_new_module(module: str, base_dir: Path) -> Path:
    """`--module`: a .wasm or crate path (from the current directory, else from flows.yaml's), or the name of
    a crate under guest-examples/."""
    for candidate in (Path(module), base_dir / module, base_dir / "guest-examples" / module):
        if candidate.exists():
            return resolve_module(str(candidate.resolve()), base_dir)
    return resolve_module(module, Path.cwd())  # raises, naming the path


def _comparable(name: str, summary: dict[str, Any]) -> Any:
    """A result field as compared: of the logs, the guest's lines (and the host's notes about its calls,
    replayed with them), not the host's closing summaries ("wasmflow: 3 GitHub API calls ..."), which
    describe work a replay by design does not do."""
    value = summary.get(name)
    if name == "logs" and value:
        return [line for line in value if not str(line[1]).startswith(HOST_SUMMARY)]
    return value


def _pretty(value: Any) -> list[str]:
    if value is None:
        return ["(no output)"]
    text = decode(value).decode("utf-8", "replace")
    try:
        text = json.dumps(json.loads(text), indent=2, sort_keys=True)
    except ValueError:
        pass
    return text.splitlines()


def output_diff(before: Any, after: Any) -> str:
    """A unified diff of two outputs (JSON pretty-printed first), at most MAX_DIFF_LINES lines."""
    lines = list(difflib.unified_diff(_pretty(before), _pretty(after), "recorded", "replayed", lineterm="", n=2))
    if len(lines) > MAX_DIFF_LINES:
        lines = lines[:MAX_DIFF_LINES] + [f"... {len(lines) - MAX_DIFF_LINES} more lines"]
    return "\n".join(lines)


def replay_many(runtime: Any, transcripts: list[Transcript], module: Optional[str] = None) -> list[ReplayReport]:
    """Replay each transcript (oldest first); a failure of one is its report, never an exception."""
    reports = []
    for transcript in sorted(transcripts, key=lambda t: float(t.doc.get("started_at") or 0)):
        try:
            reports.append(replay_offline(runtime, transcript, module))
        except Exception as exc:  # one broken transcript must not end a bulk replay
            reports.append(_failed(transcript, f"replay error: {type(exc).__name__}: {exc}"))
    return reports


__all__ = ["ReplayReport", "VERDICTS", "output_diff", "replay_many", "replay_offline"]
