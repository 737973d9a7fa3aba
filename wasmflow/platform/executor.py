"""One claimed run executed, whoever claimed it: the dispatcher's worker threads and the HTTP trigger.

`execute` turns a claimed run into the `Outcome` the queue stores: it looks the flow up, runs the guest,
files a guest that failed after a service beyond it failed as `upstream` (transient, retried), and files a
failure of the host around the run as `upstream` too. `report` records the metrics and the log line of a
finished run. Both triggers use the two, so an HTTP-triggered run is classified and
counted exactly as a queued one.

Only `Exception` is a host failure: KeyboardInterrupt and SystemExit are the process being stopped, not
the run failing, and go on up to the caller, which gives the run back before letting them through.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Protocol

from wasmflow.engine.base import RunResult, Status
from wasmflow.flows.model import FlowsFile, Retry
from wasmflow.host_functions.spec import CancelSignal, Event, TokenBudget
from wasmflow.platform.metrics import Metrics
from wasmflow.platform.queue import ClaimedRun, Finish, Outcome
from wasmflow.platform.transcripts import persist as persist_transcript

log = logging.getLogger("wasmflow.executor")

# A run started by an HTTP request is tried once: its caller waits for this answer, not a later one.
HTTP_RETRY = Retry(attempts=1)


class Runner(Protocol):
    """What `execute` needs of `wasmflow.runtime.Runtime`: the flows and a way to run one."""

    flows: FlowsFile

    def run(self, flow_name: str, event: Event, run_id: Optional[str] = None, attempt: int = 1,
            **kw: Any) -> RunResult: ...


def execute(runtime: Runner, run: ClaimedRun, cancel: Optional[CancelSignal] = None,
            budget: Optional[TokenBudget] = None) -> Outcome:
    """Run `run` once and classify its result; never raises `Exception` (a host failure is a result).

    `cancel` stops the guest when set (from another thread); a run cancelled before it started is not
    started at all. `budget` is the flow's LLM token budget for the run's key, if it has one.
    """
    if cancel is not None and cancel.reason is not None:
        return Outcome(run, RunResult(status=Status.CANCELLED, run_id=run.id, error=cancel.reason), Retry())
    try:
        flow = runtime.flows.flow(run.flow)
    except KeyError:
        return Outcome(run, RunResult(status=Status.INVALID, run_id=run.id,
                                      error=f"flow {run.flow!r} is no longer in flows.yaml"), Retry())
    retry = HTTP_RETRY if run.trigger == "http" else flow.retry
    extra: dict[str, Any] = {}
    if cancel is not None:
        extra["cancel"] = cancel
    if budget is not None:
        extra["budget"] = budget
    try:
        result = runtime.run(run.flow, run.event, run_id=run.id, attempt=run.attempt, execution=run.execution,
                             **extra)
    except Exception as exc:  # the host failed around the run: a transient, retryable error
        log.exception("run %s of %s: host error", run.id, run.flow)
        return Outcome(run, RunResult(status=Status.ERROR, run_id=run.id, error=f"host error: {exc}"), retry,
                       Status.UPSTREAM)
    persist_transcript(runtime, result, wait=False)  # its host calls, for `wasmflow replay RUN --offline`
    if budget is not None:
        result.llm_tokens = getattr(budget, "spent", 0)  # summed per key by the next runs' budgets
    if result.status is Status.CANCELLED:
        return Outcome(run, result, retry)
    if result.status in (Status.ERROR, Status.TRAP) and result.upstream_failures:
        # The guest failed because a service beyond it did (its HTTP, GitHub or LLM call answered
        # UPSTREAM or TIMEOUT): transient, retried as `upstream`, not filed as a bug in the guest.
        result.error = f"{result.error}; after upstream failure: {result.upstream_failures[-1]}"
        return Outcome(run, result, retry, Status.UPSTREAM)
    return Outcome(run, result, retry)


def report(metrics: Metrics, outcome: Outcome, finish: Optional[Finish]) -> None:
    """Count a finished run (status, duration, output cut at a cap, retries) and log what the queue did
    with it; `finish` is None when its result could not be stored (the caller logged why)."""
    run, result, status = outcome.run, outcome.result, outcome.status
    metrics.runs.labels(flow=run.flow, status=status.value).inc()
    metrics.run_duration.labels(flow=run.flow).observe((result.instantiate_ms + result.run_ms) / 1000)
    metrics.output_truncated(run.flow, result.truncated)
    if finish is None:
        return
    if finish.state == "queued":
        metrics.retries.labels(flow=run.flow).inc()
        log.info("run %s of %s: %s, attempt %d; retry in %.1fs", run.id, run.flow, status, run.attempt,
                 finish.delay)
    elif finish.state == "lost":
        log.warning("run %s of %s finished after its lease was taken; result dropped", run.id, run.flow)
    elif finish.state == "dead":
        log.warning("run %s of %s: %s after %d attempt(s): %s", run.id, run.flow, status, run.attempt,
                    result.error)
