"""Webhook ingress under load: ack latency and delivery-to-completed-run throughput of `wasmflow up`.

Concurrent senders post signed GitHub deliveries on loopback to a `wasmflow up` subprocess serving the
hello flow, once on SQLite and once on PostgreSQL (when a URL is given). The baseline, measured in the
same run with the same senders, is a bare aiohttp server whose handler does nothing but answer 202,
measured before each configuration and after the last: a configuration's share of the baseline's rate
(and its p99 against the baseline's) is taken against the two measured beside it.

- ack latency: from sending a delivery to its 202 (p50 / p99 / max), per request.
- completed runs/s: deliveries divided by the time from the first send to the moment the last run is
  done in the store (delivery to completed run, end to end).

    .venv/bin/python bench/ingress.py [--deliveries 3000] [--concurrency 100] [--workers 4] [--repeat 3]
        [--postgres-url postgresql://...]   (default: $WASMFLOW_TEST_POSTGRES_URL; omitted if unset)

The senders share the machine with the server (2 cores here): the figures include that contention.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Optional

import aiohttp
import sqlalchemy as sa
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wasmflow.build import artifact_path, build  # noqa: E402
from wasmflow.storage import open_database  # noqa: E402

SECRET = "bench-secret"

BASELINE = r"""
import sys
from aiohttp import web

async def hook(request):
    await request.read()
    return web.json_response({"ok": True}, status=202)

app = web.Application()
app.router.add_post("/webhooks/github", hook)
app.router.add_get("/healthz", lambda r: web.json_response({"status": "ok"}))
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""

FLOWS = """
flows:
  - name: hello
    module: {wasm}
    allow: {{kv: true}}
    config: {{greeting: Hello}}
    on:
      - github: {{events: [pull_request]}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(port: int, proc: subprocess.Popen, log: Path) -> None:
    import urllib.request

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("server did not become healthy")


def payloads(n: int) -> list[tuple[bytes, dict[str, str]]]:
    """Pre-signed deliveries, so the senders spend their CPU on sending."""
    out = []
    for i in range(n):
        body = json.dumps({"action": "opened", "number": i, "repository": {"full_name": "acme/app"},
                           "sender": {"login": "octocat"}}).encode()
        sig = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        out.append((body, {"X-GitHub-Event": "pull_request", "X-GitHub-Delivery": str(uuid.uuid4()),
                           "X-Hub-Signature-256": sig, "Content-Type": "application/json"}))
    return out


async def send_all(port: int, items: list[tuple[bytes, dict[str, str]]], concurrency: int) -> tuple[list[float], float]:
    """Send everything with `concurrency` senders; returns per-request ack latencies (ms) and the start time."""
    url = f"http://127.0.0.1:{port}/webhooks/github"
    latencies: list[float] = []
    queue: asyncio.Queue = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def sender() -> None:
            while True:
                try:
                    body, headers = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                t = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 202:
                        raise SystemExit(f"unexpected {resp.status}: {await resp.text()}")
                latencies.append((time.perf_counter() - t) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(concurrency)))
    return latencies, started


def stats(latencies: list[float]) -> tuple[float, float, float]:
    ordered = sorted(latencies)
    return statistics.median(ordered), ordered[max(0, int(len(ordered) * 0.99) - 1)], ordered[-1]


def run_baseline(n: int, concurrency: int) -> dict:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "baseline.log"
        proc = subprocess.Popen([sys.executable, "-c", BASELINE, str(port)], stdout=log.open("wb"), stderr=subprocess.STDOUT)
        try:
            wait_healthy(port, proc, log)
            asyncio.run(send_all(port, payloads(min(n, 500)), concurrency))  # warm-up
            latencies, started = asyncio.run(send_all(port, payloads(n), concurrency))
            elapsed = time.perf_counter() - started
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
    p50, p99, worst = stats(latencies)
    return dict(name="baseline: bare aiohttp 202", p50=p50, p99=p99, max=worst, acks_per_s=n / elapsed, runs_per_s=None)


def run_wasmflow(name: str, wasm: Path, n: int, concurrency: int, workers: int, database_url: Optional[str],
                 worker_processes: int = 0) -> dict:
    """`wasmflow up` alone, or (worker_processes > 0, PostgreSQL) `up --workers 0` for ingress and the
    scheduler beside that many `wasmflow worker` processes: the documented way to use more cores."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        (tmpdir / "flows.yaml").write_text(FLOWS.format(wasm=wasm))
        url = database_url or f"sqlite:///{tmpdir / 'bench.db'}"
        env = {**os.environ, "GITHUB_WEBHOOK_SECRET": SECRET, "WASMFLOW_DATABASE_URL": url}
        log = tmpdir / "up.log"
        up_workers = 0 if worker_processes else workers
        proc = subprocess.Popen(
            [sys.executable, "-m", "wasmflow.cli", "up", "--flows", str(tmpdir / "flows.yaml"), "--port", str(port),
             "--workers", str(up_workers), "--log-level", "warning"],
            stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=tmpdir)
        helpers = [subprocess.Popen(
            [sys.executable, "-m", "wasmflow.cli", "worker", "--flows", str(tmpdir / "flows.yaml"),
             "--workers", str(workers), "--log-level", "warning"],
            stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env, cwd=tmpdir) for _ in range(worker_processes)]
        db = open_database(url)
        try:
            wait_healthy(port, proc, log)
            warm = payloads(200)
            asyncio.run(send_all(port, warm, 50))
            done_sql = sa.text("SELECT count(*) FROM runs WHERE state = 'done'")

            def done() -> int:
                with db.connect() as conn:
                    return conn.execute(done_sql).scalar()

            while done() < len(warm):
                time.sleep(0.05)
            base_done = done()
            latencies, started = asyncio.run(send_all(port, payloads(n), concurrency))
            acked = time.perf_counter()
            while done() < base_done + n:
                if time.perf_counter() - started > 300:
                    raise SystemExit(f"runs not done after 300 s ({done() - base_done}/{n})")
                time.sleep(0.02)
            finished = time.perf_counter()
            with db.connect() as conn:
                not_ok = conn.execute(sa.text("SELECT count(*) FROM runs WHERE state <> 'done'")).scalar()
        finally:
            for p in [proc, *helpers]:
                p.send_signal(signal.SIGTERM)
            for p in [proc, *helpers]:
                p.wait(timeout=60)
            db.dispose()
    if not_ok:
        raise SystemExit(f"{not_ok} runs did not complete ok")
    p50, p99, worst = stats(latencies)
    return dict(name=name, p50=p50, p99=p99, max=worst, acks_per_s=n / (acked - started),
                runs_per_s=n / (finished - started))


def fresh_schema(base: str) -> str:
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(base.replace("postgresql://", "postgresql+psycopg://", 1))
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    admin.dispose()
    return schema


def drop_schema(base: str, schema: str) -> None:
    admin = sa.create_engine(base.replace("postgresql://", "postgresql+psycopg://", 1))
    with admin.begin() as conn:
        conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


def _merged(runs: list[dict]) -> dict:
    """The median of each figure over rounds, and the range of the p99s."""
    merged: dict = dict(name=runs[0]["name"])
    for key in ("p50", "p99", "max", "acks_per_s", "runs_per_s"):
        values = [r[key] for r in runs]
        merged[key] = None if values[0] is None else statistics.median(values)
    merged["p99_range"] = (min(r["p99"] for r in runs), max(r["p99"] for r in runs))
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deliveries", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--workers", type=int, default=4, help="run slots of `wasmflow up` (and of the worker)")
    parser.add_argument("--postgres-url", default=os.environ.get("WASMFLOW_TEST_POSTGRES_URL"))
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the table shows medians")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    console = Console(width=140)
    workspace = ROOT / "guest-examples"
    build(["hello"], workspace, ROOT / ".wasmflow", progress=False)
    wasm = artifact_path(workspace, "hello")

    def on_postgres(name: str, worker_processes: int) -> dict:
        schema = fresh_schema(args.postgres_url)
        sep = "&" if "?" in args.postgres_url else "?"
        try:
            return run_wasmflow(name, wasm, args.deliveries, args.concurrency, args.workers,
                                f"{args.postgres_url}{sep}options=-csearch_path%3D{schema}", worker_processes)
        finally:
            drop_schema(args.postgres_url, schema)

    baseline = lambda: run_baseline(args.deliveries, args.concurrency)  # noqa: E731
    configs = [lambda: run_wasmflow("wasmflow up, SQLite", wasm, args.deliveries, args.concurrency, args.workers, None)]
    if args.postgres_url:
        configs.append(lambda: on_postgres("wasmflow up, PostgreSQL", 0))
        configs.append(lambda: on_postgres("up --workers 0 + 2 worker processes, PostgreSQL", 2))
    else:
        console.print("[yellow]PostgreSQL skipped: pass --postgres-url or set WASMFLOW_TEST_POSTGRES_URL[/yellow]")
    # Rounds interleave the configurations, and the baseline runs before each of them and after the
    # last: this machine's speed swings by half within minutes, and the bare server's rate swings the
    # most, so each configuration's share is taken against the baselines measured right before and
    # after it. Each figure is the median over the rounds.
    rounds: list[dict] = []
    for _ in range(args.repeat):
        measured = [baseline()]
        for config in configs:
            measured += [config(), baseline()]
        rounds.append(dict(baselines=measured[0::2], results=measured[1::2]))
    all_baselines = [b for r in rounds for b in r["baselines"]]
    results = [_merged(all_baselines)]
    for i in range(len(configs)):
        runs = [r["results"][i] for r in rounds]
        merged = _merged(runs)
        # the share and the p99 ratio against the two baselines beside the run, per round
        beside = [(r["baselines"][i], r["baselines"][i + 1]) for r in rounds]
        merged["share"] = statistics.median(
            run["acks_per_s"] / statistics.mean(b["acks_per_s"] for b in pair) for run, pair in zip(runs, beside))
        merged["p99_ratio"] = statistics.median(
            run["p99"] / statistics.mean(b["p99"] for b in pair) for run, pair in zip(runs, beside))
        results.append(merged)

    table = Table(title=f"{args.deliveries} signed deliveries, {args.concurrency} concurrent senders, hello flow, "
                        f"{args.workers} run slots, {os.cpu_count()} cores, median of {args.repeat} round(s)")
    for col in ("server", "ack p50 ms", "ack p99 ms", "p99 range", "ack max ms", "acks/s", "share", "p99 ×",
                "completed runs/s"):
        table.add_column(col, justify="left" if col == "server" else "right")
    for r in results:
        low, high = r["p99_range"]
        table.add_row(r["name"], f"{r['p50']:.1f}", f"{r['p99']:.1f}", f"{low:.0f}-{high:.0f}", f"{r['max']:.1f}",
                      f"{r['acks_per_s']:.0f}", f"{r['share']:.0%}" if "share" in r else "-",
                      f"{r['p99_ratio']:.1f}" if "p99_ratio" in r else "-",
                      "-" if r["runs_per_s"] is None else f"{r['runs_per_s']:.0f}")
    console.print(table)
    for r in results:  # one plain line each, for logs and reports
        runs = "-" if r["runs_per_s"] is None else f"{r['runs_per_s']:.0f}"
        print(f"RESULT {r['name']}: ack p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms, max {r['max']:.1f} ms, "
              f"{r['acks_per_s']:.0f} acks/s, {runs} completed runs/s")
    for r in results[1:]:
        console.print(f"{r['name']}: acks at [bold]{r['share']:.0%}[/bold] of the baseline's rate (goal >= 50%), "
                      f"ack p99 [bold]{r['p99_ratio']:.1f}x[/bold] the baseline's (goal <= 2x), against the "
                      "baselines measured just before and after it")
    sqlite = results[1]["runs_per_s"]
    for r in results[2:]:
        console.print(f"{r['name']}: [bold]{r['runs_per_s'] / sqlite:.2f}x[/bold] SQLite's completed runs/s (goal >= 1)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
