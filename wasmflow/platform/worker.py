"""The dispatcher: claims runs from the queue and executes them on a bounded thread pool.

Everything here runs on plain threads, never on the asyncio loop: guests run in wasmtime (which releases
the GIL), and database calls block, so the ingress loop in the same process stays responsive however
busy the workers are. One claim thread leases runs in batches and keeps at most twice as many as there
are threads (a claim costs about the same for one run as for ten, and a run waits at most one run's length
for a thread); one finisher thread stores results, many per transaction; a maintenance thread renews the
leases of the runs held and takes back runs whose worker died. On PostgreSQL a listener thread wakes the
claim loop when another process stores runs (LISTEN/NOTIFY).

Each run held has a `CancelSignal`; a `CancelWatcher` (platform/cancel.py) hears of cancel requests on
the runs held, from this process or any other, and sets it: the guest stops within the engine's
interrupt period, and a run not yet started is not started.

Stopping is in two steps. `drain` (called the moment SIGTERM arrives) stops claiming and gives back at once
the runs claimed but not yet started, at their place in the queue and without counting an attempt: a
shutdown must not start work it will then cut. `stop` then lets the runs already executing finish for the
grace period and releases those that do not.
"""

from __future__ import annotations

import logging
import os
import queue as queue_mod
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import sqlalchemy as sa

from wasmflow.engine.base import Status
from wasmflow.host_functions.spec import CancelSignal
from wasmflow.platform.ack_first import AckFirst
from wasmflow.platform.cancel import CancelWatcher, cancel_reason
from wasmflow.platform.executor import Runner, execute, report
from wasmflow.platform.loop_failures import log_retry
from wasmflow.platform.metrics import Metrics
from wasmflow.platform.notify import Listener
from wasmflow.platform.queue import ClaimedRun, Finish, Outcome, Queue

log = logging.getLogger("wasmflow.worker")


# How far ahead a worker claims when runs are short: what its threads get through in about this long.
PREFETCH_SECONDS = 0.1


def worker_name() -> str:
    """host:pid:random, unique per process start: what leases and the attempts table record."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Dispatcher:
    def __init__(self, runtime: Runner, queue: Queue, metrics: Optional[Metrics] = None, concurrency: int = 4,
                 poll_interval: float = 0.5, claim_batch: int = 32, yield_to: Optional[AckFirst] = None) -> None:
        self.runtime = runtime
        self.yield_to = yield_to  # claims wait while this process is acknowledging webhooks (ack_first.py)
        self.queue = queue
        self.metrics = metrics or Metrics()
        self.concurrency = max(1, concurrency)
        self.poll_interval = poll_interval
        self.claim_batch = claim_batch
        self.maintenance_interval = max(0.2, queue.lease_seconds / 3)
        # Runs held at once: one executing per thread plus claimed ones waiting for a thread (leased and
        # heartbeated like the others); see `capacity`. A claim is made once at most half a thread's
        # worth are waiting, so the threads never run dry while it is in progress.
        self.claim_below = self.concurrency + self.concurrency // 2
        self._run_seconds: Optional[float] = None  # recent run length (moving average), for `capacity`
        self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="wasmflow-run")
        self._in_flight: dict[str, ClaimedRun] = {}
        self._finishing: set[str] = set()  # results being stored: no heartbeat, not lost
        self._started: set[str] = set()  # runs whose guest has started: only these are waited for on stop
        self._slots = threading.Condition()
        # Held through a whole drain, release included: `stop` (or a second signal) calling drain again
        # must not go on, and let the process exit, while the first drain's release is still being stored.
        self._draining = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()  # no more claims
        self._stopped = threading.Event()  # nothing held any more: lease maintenance ends too
        self._threads: list[threading.Thread] = []
        # Results are stored by one thread, many per transaction: fewer commits, less GIL time per run.
        self._results: queue_mod.Queue[Optional[Outcome]] = queue_mod.Queue()
        self._finisher = threading.Thread(target=self._finish_loop, name="wasmflow-finish", daemon=True)
        self._listener: Optional[Listener] = None
        queue.govern(runtime.flows)  # concurrency keys, debounce, rate, budget: admitted before a claim
        self._signals: dict[str, CancelSignal] = {}  # one per run held, set when the run is cancelled
        self._cancels = CancelWatcher(queue.db, self._held_ids, self.cancel_local)
        self.completed = 0
        self.released = 0  # runs given back to the queue by `drain` and `stop`
        self._drained_at: Optional[float] = None  # when the stop began: the grace period counts from it

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        for target, name in ((self._claim_loop, "wasmflow-claim"), (self._maintenance_loop, "wasmflow-lease")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self._finisher.start()
        self._cancels.start()
        if self.queue.postgres:  # other processes store runs too: hear about them at once
            self._listener = Listener(self.queue.db, self.wake)
            self._listener.start()

    def _held_ids(self) -> list[str]:
        with self._slots:
            return [i for i in self._in_flight if i not in self._finishing]

    def cancel_local(self, run_id: str, by: str) -> bool:
        """Stop a run held here (its cancel request is already in the store); False if it is not held."""
        with self._slots:
            signal = self._signals.get(run_id)
        if signal is None:
            return False
        if not signal:
            signal.cancel(cancel_reason(by))
            log.info("run %s: %s; stopping its guest", run_id, signal.reason)
        return True

    def wake(self) -> None:
        """New runs were stored: claim now instead of at the next poll."""
        self._wake.set()

    def drain(self) -> int:
        """Stop claiming and give back every run claimed but not started; returns how many were released.

        Safe to call more than once and from any thread (the signal handler's). A run is either started
        before this takes the lock, and then finishes or is cut by `stop`, or never starts here.
        """
        with self._draining:
            with self._slots:
                if not self._stopping.is_set():
                    self._drained_at = time.monotonic()
                self._stopping.set()
                unstarted = [i for i in self._in_flight if i not in self._started]
                for run_id in unstarted:
                    del self._in_flight[run_id]
                    self._signals.pop(run_id, None)
                self.metrics.in_flight.set(len(self._in_flight))
                self._slots.notify_all()
            self._wake.set()
            released = self._release(unstarted)
        if unstarted:
            log.info("released %d claimed runs that had not started", released)
        return released

    def _release(self, run_ids: list[str]) -> int:
        if not run_ids:
            return 0
        try:
            released = self.queue.release(run_ids)
        except sa.exc.SQLAlchemyError:
            log.exception("releasing %d runs failed; their leases will expire", len(run_ids))
            return 0
        with self._slots:
            self.released += released
        return released

    def stop(self, grace: float = 30.0) -> int:
        """Stop claiming, release runs not started, let the others finish for `grace` seconds, cut the rest.

        The grace period counts from the first `drain` (the signal), however long the shutdown of what
        came before took: a supervisor's kill timer started then too.

        Returns how many runs were released (queued again at their place, their attempt not counted) for
        another worker or the next start to take.
        """
        self.drain()
        deadline = (self._drained_at or time.monotonic()) + grace
        with self._slots:
            while self._in_flight and time.monotonic() < deadline:
                self._slots.wait(timeout=min(0.2, max(0.0, deadline - time.monotonic())))
            # A run whose result is being stored has finished: the finisher stores it below.
            left = [i for i in self._in_flight if i not in self._finishing]
        if left:
            log.warning("released %d runs still running after %.0fs", self._release(left), grace)
        if self._listener is not None:
            self._listener.stop()
        self._cancels.stop()
        if self._threads:
            self._threads[0].join(timeout=5)  # the claim loop (it releases what a claim in progress took)
        self._results.put(None)
        if self._finisher.is_alive():
            self._finisher.join(timeout=10)
        self._stopped.set()
        if len(self._threads) > 1:
            self._threads[1].join(timeout=5)
        self._pool.shutdown(wait=not left, cancel_futures=True)
        return self.released

    @property
    def in_flight(self) -> int:
        with self._slots:
            return len(self._in_flight)

    # --- loops -------------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Runs held at once: the threads' own plus one waiting per thread, or up to three when runs are
        short enough that the threads get through them within `PREFETCH_SECONDS`.

        Why adaptive: a claim and a result batch cost a few round trips whatever their size, and with
        short runs (the hello flow: a few ms) small claims made the claim and finish threads the
        worker's busiest (py-spy: 80% of the interpreter's time, the guests 10%); holding three per
        thread cut the CPU per run by a quarter on PostgreSQL. A long run (an LLM review) must not
        wait behind others in one worker while another worker idles, so long runs keep one waiting.
        """
        per_run = self._run_seconds
        ahead = 1 if per_run is None else max(1, min(3, int(PREFETCH_SECONDS / max(per_run, 1e-6))))
        return self.concurrency * (1 + ahead)

    def _claim_loop(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            with self._slots:
                # Claim in batches (a claim costs about as much for ten runs as for one), except when idle,
                # so a lone event is taken at once.
                while len(self._in_flight) > self.claim_below and not self._stopping.is_set():
                    self._slots.wait(timeout=1.0)
                free = self.capacity - len(self._in_flight)
            if self._stopping.is_set():
                return
            self._wake.clear()
            if self.yield_to is not None and not self.yield_to.wait(self._stopping):
                free = min(free, self.concurrency)  # still answering webhooks: start one round, no more
            try:
                self._admit()
                runs = self.queue.claim(min(free, self.claim_batch))
                failures = 0
            except Exception as exc:  # the store, or a bug: this thread must go on claiming either way
                failures += 1
                log_retry(log, exc, "claiming runs")
                self._stopping.wait(min(5.0, 0.1 * 2 ** failures))
                continue
            if not runs:
                self._wake.wait(self.poll_interval)
                continue
            with self._slots:
                late = self._stopping.is_set()  # drained while this claim was in progress
                if not late:
                    for run in runs:
                        self._in_flight[run.id] = run
                        self._signals[run.id] = CancelSignal()
                    self.metrics.in_flight.set(len(self._in_flight))
            if late:
                self._release([run.id for run in runs])
                return
            for run in runs:
                self._pool.submit(self._execute, run)

    def _admit(self) -> None:
        """Admit new runs of governed flows (platform/concurrency.py) and count what admission decided."""
        if not self.queue.governed:
            return
        try:
            admission = self.queue.admit()
        except sa.exc.SQLAlchemyError:
            raise  # the claim loop retries with backoff
        except Exception:  # a bug must not stop the claim loop: the other flows' runs go on
            log.exception("admitting new runs failed; runs of flows with concurrency settings wait")
            return
        for flow, how in admission.outcomes:
            if how == "denied-rate":
                self.metrics.denied.labels(flow=flow, reason="rate").inc()
            else:
                self.metrics.cancellations.labels(flow=flow, how=how).inc()
        for run_id, by in admission.cancel_marked.items():  # held here? stop it now, not at the next poll
            self.cancel_local(run_id, by)

    def _maintenance_loop(self) -> None:
        # Runs on through `stop`'s grace period: runs finishing then must keep their leases.
        while not self._stopped.wait(self.maintenance_interval):
            try:
                with self._slots:
                    ids = [i for i in self._in_flight if i not in self._finishing]
                if ids:
                    kept = self.queue.heartbeat(ids)
                    with self._slots:  # a run whose result was stored meanwhile is not lost
                        lost = [i for i in set(ids) - kept if i in self._in_flight and i not in self._finishing]
                    for run_id in lost:
                        log.warning("run %s: lease lost while running (another worker may run it)", run_id)
                if self.queue.governed:
                    from wasmflow.platform.concurrency import waiting_by_flow

                    for flow, waiting in waiting_by_flow(self.queue.db, self.queue.governed).items():
                        self.metrics.concurrency_waiting.labels(flow=flow).set(waiting)
                recovered = self.queue.recover_expired()
                if recovered:
                    self.metrics.lease_expiries.inc(recovered)
                    log.warning("took back %d runs whose worker stopped renewing its lease", recovered)
                    self._wake.set()
            except Exception as exc:  # without this thread the runs here would lose their leases
                log_retry(log, exc, "lease maintenance")

    # --- one run -----------------------------------------------------------------------------------

    def _execute(self, run: ClaimedRun) -> None:
        with self._slots:  # released by `drain` while it waited for a thread: it must not start
            if self._stopping.is_set() or run.id not in self._in_flight:
                return
            self._started.add(run.id)
            signal = self._signals.get(run.id)
        try:
            outcome = execute(self.runtime, run, cancel=signal, budget=self._budget(run))
        except BaseException:  # KeyboardInterrupt, SystemExit: the process is stopping, not the run failing
            self._give_back(run)
            raise
        self._results.put(outcome)

    def _budget(self, run: ClaimedRun) -> Any:
        """The flow's LLM token budget for this run's key (None when the flow has none)."""
        if run.flow not in self.queue.governed:
            return None
        from wasmflow.platform.concurrency import budget_for

        try:
            return budget_for(self.queue.db, self.runtime.flows, run)
        except sa.exc.SQLAlchemyError as exc:  # the run goes on; its LLM calls are refused (no budget known)
            log.warning("run %s: reading its token budget failed (%s)", run.id, exc.__class__.__name__)
            from wasmflow.platform.concurrency import RunBudget

            return RunBudget(limit=0, per=1.0, key="(unknown: the store could not be read)", spent_before=0)

    def _give_back(self, run: ClaimedRun) -> None:
        """Release a started run that will not finish here and free its slot."""
        with self._slots:
            self._signals.pop(run.id, None)
            self._in_flight.pop(run.id, None)
            self._started.discard(run.id)
            self.metrics.in_flight.set(len(self._in_flight))
            self._slots.notify_all()
        self._release([run.id])

    def _finish_loop(self) -> None:
        while True:
            item = self._results.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < 64:
                try:
                    more = self._results.get_nowait()
                except queue_mod.Empty:
                    break
                if more is None:
                    self._results.put(None)  # seen after this batch
                    break
                batch.append(more)
            if self.yield_to is not None:  # results can wait a little; a webhook sender cannot
                self.yield_to.wait(self._stopping)
            self._store(batch)

    def _store(self, batch: list[Outcome]) -> None:
        with self._slots:
            self._finishing.update(o.run.id for o in batch)
        for attempt in range(5):
            try:
                finishes = self.queue.finish_many(batch)
                break
            except Exception as exc:  # the store, or a bug: the slots below must be freed either way
                log_retry(log, exc, f"storing {len(batch)} results", f"try {attempt + 1} of 5")
                time.sleep(0.2 * 2 ** attempt)
        else:
            log.error("%d results not stored; their runs will be taken again when the leases expire", len(batch))
            finishes = []
        for outcome, finish in zip(batch, finishes):
            self._report(outcome, finish)
            seconds = (outcome.result.instantiate_ms + outcome.result.run_ms) / 1000
            last = self._run_seconds
            self._run_seconds = seconds if last is None else 0.8 * last + 0.2 * seconds
        with self._slots:
            for outcome in batch:
                self._signals.pop(outcome.run.id, None)
                self._in_flight.pop(outcome.run.id, None)
                self._finishing.discard(outcome.run.id)
                self._started.discard(outcome.run.id)
            self.metrics.in_flight.set(len(self._in_flight))
            self._slots.notify_all()

    def _report(self, outcome: Outcome, finish: Finish) -> None:
        report(self.metrics, outcome, finish)
        if finish.state != "lost":
            if outcome.status is Status.CANCELLED:
                self.metrics.cancellations.labels(flow=outcome.run.flow, how="stopped").inc()
            elif outcome.status is Status.DENIED and any("budget exhausted" in d for d in outcome.result.denials):
                self.metrics.denied.labels(flow=outcome.run.flow, reason="budget").inc()
        self.completed += 1
