"""HTTP ingress: GitHub webhooks in, HTTP-triggered flows, health and metrics.

The webhook handler does the least a durable acknowledgement needs, in this order: cap the size, check
the HMAC of the raw bytes (nothing unauthenticated is parsed), parse, match flows, store the event and its
runs (group-committed by `BatchWriter`), answer 202. No flow runs inside the request, so the answer comes
in milliseconds, far inside GitHub's 10 seconds, however slow the guests are.

Every error is a short JSON body with a 4xx/5xx status; a traceback goes to the log, never to a client.

What a client cannot do (docs/security.md): hold a connection without sending a complete request head
(`header_timeout`, the server's keep-alive timer) or its whole body (`body_timeout`, 408), send a body over
`max_body` (413), or make the host recurse on deep JSON (`MAX_JSON_DEPTH`, 400). What a guest behind an
HTTP trigger cannot do: answer with a status outside 200..599, frame the response itself (Content-Length,
Transfer-Encoding, ...), or send a body with 204/304. An HTTP run keeps its lease while it waits for a run
slot and while it runs, so recovery never takes back a run whose caller is still waiting.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import logging
import re
import time
from concurrent.futures import Executor
from typing import Any, Optional
from urllib.parse import parse_qs

import sqlalchemy as sa
from aiohttp import web

from wasmflow.engine.base import Status
from wasmflow.host_functions.spec import CancelSignal, Event
from wasmflow.platform.ack_first import AckFirst
from wasmflow.platform.cancel import CancelWatcher, cancel_reason
from wasmflow.platform.executor import execute, report
from wasmflow.platform.matching import GithubEventInfo, match_github
from wasmflow.platform.metrics import CONTENT_TYPE_LATEST, Metrics
from wasmflow.platform.queue import ClaimedRun, Finish, Outcome, Queue
from wasmflow.platform.store import RUNNING, BatchWriter, NewEvent, NewRun, github_dedupe_key, queue_depth
from wasmflow.runtime import Runtime

log = logging.getLogger("wasmflow.ingress")

DEFAULT_MAX_BODY = 25 * 1024 * 1024  # GitHub does not send payloads over 25 MB
DEFAULT_BODY_TIMEOUT = 60.0  # seconds for a whole request body to arrive, once its head has
DEFAULT_HEADER_TIMEOUT = 15.0  # seconds for a request head to arrive (and for an idle keep-alive connection)
MAX_JSON_DEPTH = 64  # arrays/objects inside each other in a webhook payload (GitHub's go about 10 deep)
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_INNERMOST = re.compile(rb"\[\]|\{\}")
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_EVENT_NAME = re.compile(r"^[a-z_]{1,64}$")
_DELIVERY = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Headers a guest may not set on an HTTP trigger's response: the server frames the response itself.
_HOP_BY_HOP = {"connection", "content-length", "transfer-encoding", "keep-alive", "upgrade", "te", "trailer",
               "proxy-connection"}


def sign(secret: bytes, body: bytes) -> str:
    """The `X-Hub-Signature-256` value GitHub sends for `body`. Not `hmac.digest`: with OpenSSL 3 its
    one-shot HMAC looks the digest up on every call, and under load in `wasmflow up` that took a tenth of
    the event loop's time (py-spy), against a fortieth for `hmac.new`."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify_signature(secret: bytes, body: bytes, header: Optional[str]) -> bool:
    """Constant-time check of `X-Hub-Signature-256` over the raw body."""
    if not header:
        return False
    return hmac.compare_digest(sign(secret, body).encode(), header.strip().encode("utf-8", "replace"))


def json_too_deep(data: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether JSON text nests arrays and objects more than `limit` levels deep, found without recursing.

    Python's parser recurses once per level, so 100,000 `[` end in a RecursionError deep in the stack;
    this looks first: strings removed (brackets in them are text), only brackets kept, then one pass per
    level deletes the innermost `[]`/`{}` pairs. Text that is not JSON at all is left to the parser.
    """
    if data.count(b"[") + data.count(b"{") <= limit:  # no deeper than it has openings (in C, no copy)
        return False
    brackets = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    for _ in range(limit):
        if not brackets:
            return False
        shorter = _INNERMOST.sub(b"", brackets)  # exactly one level: pairs it leaves adjacent stay
        if len(shorter) == len(brackets):
            return False  # unbalanced: not JSON, and the parser says so
        brackets = shorter
    return bool(brackets)


def loads_bounded(data: bytes, limit: int = MAX_JSON_DEPTH) -> Any:
    """`json.loads` for bodies from outside: ValueError (saying what is wrong) when not JSON or too deep."""
    if json_too_deep(data, limit):
        raise ValueError(f"body is JSON nested deeper than {limit} levels")
    try:
        return json.loads(data)
    except RecursionError:  # malformed and deep: the check above leaves that to the parser
        raise ValueError(f"body is JSON nested deeper than {limit} levels") from None
    except ValueError:
        raise ValueError("body is not JSON") from None


def final_status(status: Optional[int]) -> Optional[int]:
    """The status of an HTTP trigger's response: the guest's (200 when it set none), or None when it is
    not a final status a server may send (1xx would leave the client waiting for another response,
    101 would switch protocols on a connection the server still frames)."""
    if status is None:
        return 200
    return status if 200 <= status <= 599 else None


def guest_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The guest's response headers that may go out: no framing (hop-by-hop) headers, no malformed names,
    no control characters in values (the host call refuses them too; this is the last word)."""
    return [(k, v) for k, v in headers
            if k.lower() not in _HOP_BY_HOP and _TOKEN.match(k) and not _CONTROL.search(v)]


def error(http_status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=http_status)


class Ingress:
    """The request handlers; `add_routes` puts them on an aiohttp app.

    `run_pool` executes HTTP-triggered flows (bounded, off the event loop); `db_pool` runs blocking
    database reads for /metrics and /healthz. Event writes go through the `writer` thread.
    """

    def __init__(self, runtime: Runtime, writer: BatchWriter, queue: Queue, metrics: Metrics, run_pool: Executor,
                 db_pool: Executor, webhook_secret: Optional[str], max_body: int = DEFAULT_MAX_BODY,
                 body_timeout: float = DEFAULT_BODY_TIMEOUT, ack_first: Optional[AckFirst] = None) -> None:
        self.runtime = runtime
        self.ack_first = ack_first  # tells this process's claim loop when deliveries are being answered
        self.writer = writer
        self.queue = queue
        self.metrics = metrics
        self.run_pool = run_pool
        self.db_pool = db_pool
        self.secret = webhook_secret.encode() if webhook_secret else None
        self.max_body = max_body
        self.body_timeout = body_timeout
        # HTTP-triggered runs stored and not yet finished: kept leased, and stopped when cancelled
        self._http_runs: dict[str, CancelSignal] = {}
        self._counters: dict[tuple[str, str], Any] = {}  # events_received's children, by (source, outcome)
        self._cancels: Optional[CancelWatcher] = None
        self._lease_task: Optional[asyncio.Task[None]] = None

    def add_routes(self, app: web.Application) -> None:
        if self.secret is None:
            log.warning("no webhook secret configured (github.webhook_secret in flows.yaml or "
                        "GITHUB_WEBHOOK_SECRET): every GitHub delivery will be refused with 401")
        app.router.add_post("/webhooks/github", self.github_webhook)
        app.router.add_route("*", "/flows/{name}", self.flow_http)
        app.router.add_route("*", "/flows/{name}/{subpath:.*}", self.flow_http)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics_handler)
        app.on_startup.append(self._start_leases)
        app.on_cleanup.append(self._stop_leases)

    # --- GitHub -------------------------------------------------------------------------------------

    def _count(self, outcome: str, source: str = "github") -> None:
        counter = self._counters.get((source, outcome))
        if counter is None:  # `labels` looks the child up under a lock: once per pair, not per delivery
            counter = self._counters[(source, outcome)] = self.metrics.events_received.labels(
                source=source, outcome=outcome)
        counter.inc()

    async def _read_body(self, request: web.Request, source: str) -> "bytes | web.Response":
        """The raw body, or the error to answer: 413 over the cap (by its Content-Length or as it streams
        in), 408 when the whole body has not arrived within `body_timeout` (a short body, a slow drip)."""
        if request.content_length is not None and request.content_length > self.max_body:
            self._count("too_large", source)
            return error(413, f"body over {self.max_body} bytes")
        try:
            if request.content.is_eof():  # the whole body came with the head, as usual: no timer needed
                return await request.read()  # (wait_for costs a task and a timer: 8 us of 100 per delivery)
            return await asyncio.wait_for(request.read(), self.body_timeout)
        except web.HTTPRequestEntityTooLarge:
            self._count("too_large", source)
            return error(413, f"body over {self.max_body} bytes")
        except asyncio.TimeoutError:
            self._count("timeout", source)
            response = error(408, f"the request body did not arrive within {self.body_timeout:g} s; "
                                  "send it in one go, with a Content-Length that matches it")
            response.force_close()
            return response

    async def github_webhook(self, request: web.Request) -> web.Response:
        if self.ack_first is None:
            return await self._github_webhook(request)
        self.ack_first.arrived()
        try:
            return await self._github_webhook(request)
        finally:
            self.ack_first.answered()

    async def _github_webhook(self, request: web.Request) -> web.Response:
        body = await self._read_body(request, "github")
        if isinstance(body, web.Response):
            return body
        if self.secret is None:
            self._count("bad_signature")
            return error(401, "no webhook secret configured on this server")
        if not verify_signature(self.secret, body, request.headers.get("X-Hub-Signature-256")):
            self._count("bad_signature")
            return error(401, "missing or wrong X-Hub-Signature-256")
        name = request.headers.get("X-GitHub-Event", "")
        delivery = request.headers.get("X-GitHub-Delivery", "")
        if not _EVENT_NAME.match(name):
            self._count("malformed")
            return error(400, "missing or malformed X-GitHub-Event header")
        if not _DELIVERY.match(delivery):
            self._count("malformed")
            return error(400, "missing or malformed X-GitHub-Delivery header")
        payload_bytes = body
        if request.content_type == "application/x-www-form-urlencoded":  # GitHub's other content type
            payload_bytes = parse_qs(body.decode("utf-8", "replace")).get("payload", [""])[0].encode()
        try:
            payload = loads_bounded(payload_bytes)
        except ValueError as exc:
            self._count("malformed")
            return error(400, str(exc))
        if not isinstance(payload, dict):
            self._count("malformed")
            return error(400, "body is not a JSON object")

        info = GithubEventInfo.from_payload(name, payload)
        flows = self.runtime.flows
        matched = match_github(flows, info)
        event = NewEvent(
            source="github", name=name, action=info.action, repo=info.repo, dedupe_key=github_dedupe_key(delivery),
            delivery_id=delivery, headers={k.lower(): v for k, v in request.headers.items()}, body=payload_bytes,
            status="accepted" if matched else "ignored",
            note=None if matched else f"no flow takes {info.qualified}" + (f" on {info.repo}" if info.repo else ""),
            runs=[NewRun(flow=f, trigger="github", max_attempts=flows.flow(f).retry.attempts,
                         idempotency_key=delivery) for f in matched],
        )
        try:
            recorded = await self.writer.submit_async(event)
        except Exception:
            log.exception("storing delivery %s failed", delivery)
            self._count("error")
            return error(503, "could not store the event; deliver it again later")
        if recorded.duplicate:
            self._count("duplicate")
        else:
            self._count("accepted" if matched else "ignored")
        return web.json_response(
            {"delivery": delivery, "event": recorded.event_id, "duplicate": recorded.duplicate,
             "runs": list(recorded.run_ids), "ignored": not matched},
            status=202,
        )

    # --- HTTP trigger -------------------------------------------------------------------------------

    async def flow_http(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        try:
            flow = self.runtime.flows.flow(name)
        except KeyError:
            return error(404, f"no flow named {name!r}")
        triggers = [t.http for t in flow.on if t.http is not None]
        if not triggers:
            return error(404, f"flow {name!r} has no http trigger")
        methods = sorted({m for t in triggers for m in t.methods})
        if request.method not in methods:
            return web.json_response({"error": f"method {request.method} not allowed"}, status=405,
                                     headers={"Allow": ", ".join(methods)})
        body = await self._read_body(request, "http")
        if isinstance(body, web.Response):
            return body
        headers = {k.lower(): v for k, v in request.headers.items()}
        headers.update({":method": request.method, ":path": request.path, ":query": request.query_string})
        run = NewRun(flow=name, trigger="http", max_attempts=1, state=RUNNING, lease_owner=self.queue.owner,
                     lease_expires_at=time.time() + flow.limits.timeout + self.queue.lease_seconds)
        run.idempotency_key = run.id
        stored = NewEvent(source="http", name="http", headers=headers, body=body, status="accepted", runs=[run])
        try:
            await self.writer.submit_async(stored)
        except Exception:
            log.exception("storing the request for flow %s failed", name)
            return error(503, "could not store the request", run_id=run.id)
        self._count("accepted", "http")
        event = Event(name="http", body=body, headers=headers, idempotency_key=run.id, trigger="http")
        claimed = ClaimedRun(id=run.id, flow=name, attempt=1, max_attempts=1, trigger="http", event=event,
                             event_id=stored.id)
        outcome = await self._execute(claimed)
        result = outcome.result
        if not result.ok:
            return error(500, f"flow {name} failed ({outcome.status})", run_id=run.id,
                         status=outcome.status.value)
        status = final_status(result.response_status)
        if status is None:  # cannot happen: `_execute` files such a result as an error
            return error(500, f"flow {name} set HTTP status {result.response_status}", run_id=run.id)
        body_out = result.response_body if result.response_body is not None else (result.output or b"")
        if status in (204, 304):  # no body by definition: bytes after the head would start a "response"
            body_out = b""
        response = web.Response(status=status, body=body_out)
        for key, value in guest_headers(result.response_headers):
            response.headers.add(key, value)
        response.headers["X-Wasmflow-Run"] = run.id
        return response

    async def _execute(self, claimed: ClaimedRun) -> Outcome:
        """Run an HTTP-triggered run in place, as a worker would (`execute`), keeping its lease meanwhile,
        store its outcome and count it. A guest's response status outside 200..599 makes the run an error.

        A KeyboardInterrupt or SystemExit while it runs gives the run back (filed `lost`: its caller gets
        no answer, so it is not run again) and goes on up.
        """
        loop = asyncio.get_running_loop()
        signal = self._http_runs[claimed.id] = CancelSignal()  # leased from here until its result is stored
        try:
            try:
                outcome = await loop.run_in_executor(self.run_pool, functools.partial(execute, self.runtime, claimed,
                                                                                      cancel=signal))
            except BaseException:
                await loop.run_in_executor(self.db_pool, self._give_back, claimed.id)
                raise
            result = outcome.result
            if result.ok and final_status(result.response_status) is None:  # the host call refuses these
                result.status = Status.ERROR
                result.error = f"the guest set HTTP status {result.response_status}, outside 200..599"
            finish: Optional[Finish] = None
            try:
                (finish,) = await loop.run_in_executor(self.db_pool, self.queue.finish_many, [outcome])
            except Exception:  # the caller still gets its answer; the lease expiring files the run `lost`
                log.exception("run %s: storing the result failed", claimed.id)
        finally:
            self._http_runs.pop(claimed.id, None)
        report(self.metrics, outcome, finish)
        return outcome

    def _give_back(self, run_id: str) -> None:
        try:
            self.queue.release([run_id])
        except sa.exc.SQLAlchemyError:
            log.exception("run %s: giving it back failed; it is filed lost when its lease expires", run_id)

    async def _start_leases(self, app: web.Application) -> None:
        self._lease_task = asyncio.get_running_loop().create_task(self._keep_leases())
        # A cancel of an HTTP run (`wasmflow cancel`, the console) reaches it as it reaches a worker's.
        self._cancels = CancelWatcher(self.queue.db, lambda: list(self._http_runs), self._cancel_local)
        self._cancels.start()

    def _cancel_local(self, run_id: str, by: str) -> None:
        signal = self._http_runs.get(run_id)
        if signal is not None and not signal:
            signal.cancel(cancel_reason(by))
            log.info("HTTP run %s: %s; stopping its guest", run_id, signal.reason)

    async def _stop_leases(self, app: web.Application) -> None:
        if self._cancels is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._cancels.stop)
        if self._lease_task is not None:
            self._lease_task.cancel()
            try:
                await self._lease_task
            except asyncio.CancelledError:
                pass

    async def _keep_leases(self) -> None:
        """Heartbeat the leases of HTTP runs in flight, as the dispatcher does for the runs it claimed.

        An HTTP run may wait for a run slot and then run to its timeout; without this its lease (stored
        as timeout + lease) could expire while the caller still waits, and recovery would record the run
        `dead/lost` though the caller then got its answer.
        """
        loop = asyncio.get_running_loop()
        interval = max(0.1, self.queue.lease_seconds / 3)
        while True:
            await asyncio.sleep(interval)
            ids = list(self._http_runs)
            if not ids:
                continue
            try:
                kept = await loop.run_in_executor(self.db_pool, self.queue.heartbeat, ids)
            except Exception as exc:  # a busy database: the next beat comes well inside the lease
                log.warning("renewing the leases of %d HTTP runs failed (%s); retrying", len(ids),
                            exc.__class__.__name__)
                continue
            for run_id in set(ids) - kept:
                if run_id in self._http_runs:
                    log.warning("HTTP run %s: lease lost while running", run_id)

    # --- operations ---------------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.db_pool, self._ping)
        except Exception as exc:
            return error(503, f"database unavailable: {exc.__class__.__name__}")
        return web.json_response({"status": "ok"})

    def _ping(self) -> None:
        with self.runtime.db.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    async def metrics_handler(self, request: web.Request) -> web.Response:
        loop = asyncio.get_running_loop()
        try:
            text = await loop.run_in_executor(self.db_pool, self.metrics.render, lambda: queue_depth(self.runtime.db))
        except sa.exc.SQLAlchemyError:
            text = await loop.run_in_executor(self.db_pool, self.metrics.render)
        return web.Response(body=text, headers={"Content-Type": CONTENT_TYPE_LATEST})
