"""Review quality: planted defects found at the right lines, posted findings that are right, and
ungrounded findings kept out of the pull request, for the code-review bot with any model.

    .venv/bin/python bench/review_quality.py [--quick]                       # the embedded Gemma 3 270M
    .venv/bin/python bench/review_quality.py --base-url URL --model NAME [--api-key-env VAR] [--quick]
    .venv/bin/python bench/review_quality.py --oracle [--quick]             # checks the bench itself

Each PR of `bench/review_corpus/` (small PRs written for this bench, defects marked `⟦defect: KIND⟧`
at known file:line, and clean PRs) is opened in the GitHub stand-in and reviewed by the real bot
(guest-examples/code-review on wasmtime, the real host functions, the model through the `llm` host
function: llama.cpp in process for a GGUF, the `openai` client for an endpoint). Scored from what the
bot actually posted as inline comments:

* recall: planted defects covered by a posted comment (its line range, +-1 line);
* precision: posted comments that cover a planted defect (clean PRs count against it);
* ungrounded_posted: posted comments whose lines are not added lines of the diff, checked here
  independently of the bot (it must be 0);
* the baseline measured in the same run: the model's own proposals before grounding, i.e. what a bot
  posting them unchecked (the first generation) would have put in front of people.

Figures for the deterministic secret check are shown apart (`checks`), so the model's part is clear.
The last line is `RESULT model=NAME recall=R precision=P ungrounded_posted=N` for tooling
(`precision=n/a` when nothing was posted). `--oracle` answers with the planted defects plus invented
ones through the OpenAI-compatible stand-in: recall 1, ungrounded_posted 0 prove the scoring.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CORPUS = REPO / "bench" / "review_corpus"
GEMMA = REPO / ".wasmflow" / "models" / "gemma-3-270m-q4_k_m.gguf"
MARK = re.compile(r"\s*⟦defect:\s*([^⟧]+)⟧\s*$")
REPO_NAME = "bench-org/corpus"


@dataclass
class Defect:
    path: str
    line: int
    kind: str
    code: str


@dataclass
class CorpusPr:
    name: str
    title: str
    body: str
    files: list[tuple[str, list[str]]]
    defects: list[Defect]
    quick: bool


@dataclass
class Scored:
    pr: CorpusPr
    posted: list[dict[str, Any]] = field(default_factory=list)  # model comments: path, start, end
    checks_posted: int = 0
    found: int = 0
    true_posts: int = 0
    ungrounded_posted: int = 0
    proposed: int = 0
    dropped_ungrounded: int = 0
    seconds: float = 0.0
    status: str = ""
    dropped: dict[str, int] = field(default_factory=dict)


def load_corpus(quick: bool) -> list[CorpusPr]:
    """The corpus PRs (the `quick: true` ones with --quick), markers stripped, defects located."""
    import yaml

    prs = []
    for path in sorted(CORPUS.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        files, defects = [], []
        for f in data["files"]:
            lines = []
            for no, raw in enumerate(f["code"].rstrip("\n").split("\n"), start=1):
                m = MARK.search(raw)
                text = MARK.sub("", raw)
                if m:
                    defects.append(Defect(f["path"], no, m.group(1).strip(), text.strip()))
                lines.append(text)
            files.append((f["path"], lines))
        prs.append(CorpusPr(path.stem, data["title"], data.get("body", ""), files, defects, bool(data.get("quick"))))
    return [p for p in prs if p.quick] if quick else prs


def oracle_responder(corpus: list[CorpusPr]) -> Any:
    """A perfect reviewer plus noise: every planted defect of the files shown, and per chunk one
    invented finding (a line that is not in the diff) and one misquoting finding."""
    by_file = {d.path: [x for p in corpus for x in p.defects if x.path == d.path] for p in corpus for d in p.defects}

    def respond(messages: list[dict[str, Any]], request: dict[str, Any]) -> str:
        user = messages[-1]["content"]
        if "Diff" not in user:
            return "merged"
        shown = re.findall(r"^### (\S+) \(", user, re.M)
        findings: list[dict[str, Any]] = []
        for path in shown:
            for d in by_file.get(path, []):
                findings.append({"file": path, "start_line": d.line, "end_line": d.line, "severity": "high",
                                 "category": "bug", "code": d.code, "problem": f"Planted defect: {d.kind}."})
            findings.append({"file": path, "start_line": 900, "end_line": 900, "severity": "high", "category": "bug",
                             "code": "return x", "problem": "An invented line far outside the diff."})
            findings.append({"file": path, "start_line": 1, "end_line": 1, "severity": "medium", "category": "bug",
                             "code": "a shopping cart in California", "problem": "Quotes code that is not there."})
        return json.dumps({"summary": "Oracle review.", "findings": findings})

    return respond


def build_runtime(tmp: Path, github: Any, endpoint: dict[str, Any], answer_tokens: int) -> Any:
    from wasmflow.build import build
    from wasmflow.flows.model import (Allow, Flow, FlowsFile, GithubApp, Limits, LlmEndpoint, LlmSettings,
                                      ModelSpec)
    from wasmflow.runtime import Runtime

    wasm = build(["code-review"], REPO / "guest-examples", tmp / "build", progress=False)["code-review"]
    models = {}
    allow_models: list[str] = []
    if endpoint["kind"] == "local":
        models["review"] = ModelSpec(backend="ggml", path=str(endpoint["path"]), options={"ctx-size": 4096})
        allow_models = ["review"]
        chat = LlmEndpoint(model="review")
    else:
        chat = LlmEndpoint(model=endpoint["model"], base_url=endpoint["base_url"], api_key_secret=endpoint.get("key_env"))
    flow = Flow(name="code-review", module=str(wasm),
                allow=Allow(kv=True, models=allow_models,
                            github={"pull_requests": "write", "issues": "write", "contents": "read", "checks": "write"}),
                config={"answer_tokens": answer_tokens, "severity_threshold": "low", "max_findings": 10},
                llm=LlmSettings(chat=chat), limits=Limits(timeout=600))
    flows = FlowsFile(models=models,
                      github=GithubApp(app_id=github.app_id, private_key=github.private_key_pem, webhook_secret="s",
                                       api_url=github.url, min_write_interval=0),
                      flows=[flow], state_dir=str(tmp / "state"))
    return Runtime(flows, tmp)


def score(s: Scored, comments: list[dict[str, Any]]) -> None:
    """Fill `s` from the inline comments the bot posted on its PR."""
    added = {path: set(range(1, len(lines) + 1)) for path, lines in s.pr.files}  # new files: every line is added
    covered: set[int] = set()
    for c in comments:
        end = int(c["line"])
        start = int(c.get("start_line") or end)
        if not set(range(start, end + 1)) <= added.get(c["path"], set()):
            s.ungrounded_posted += 1
        hits = [i for i, d in enumerate(s.pr.defects) if d.path == c["path"] and start - 1 <= d.line <= end + 1]
        if c["body"].startswith("🔑"):
            s.checks_posted += 1
            covered.update(hits)
            continue
        s.posted.append({"path": c["path"], "start": start, "end": end})
        if hits:
            s.true_posts += 1
            covered.update(hits)
    s.found = len(covered)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick subset (under 5 minutes on Gemma)")
    parser.add_argument("--base-url", help="an OpenAI-compatible endpoint (default: the embedded Gemma GGUF)")
    parser.add_argument("--model", help="the endpoint's model name")
    parser.add_argument("--api-key-env", help="the environment variable holding the endpoint's key")
    parser.add_argument("--gguf", default=str(GEMMA), help="the local GGUF model (default: Gemma 3 270M)")
    parser.add_argument("--oracle", action="store_true", help="a scripted perfect-plus-noise reviewer (checks the bench)")
    parser.add_argument("--answer-tokens", type=int, default=600)
    parser.add_argument("--only", help="only the corpus PRs whose name contains this")
    parser.add_argument("--json", help="write the per-PR figures here")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from wasmflow.devtools.github_payloads import encode, pull_request_event
    from wasmflow.devtools.github_standin import GithubStandin, added_file
    from wasmflow.devtools.openai_standin import OpenAIStandin
    from wasmflow.host_functions.spec import Event

    console = Console(highlight=False, width=max(Console().width, 130))
    corpus = [p for p in load_corpus(args.quick) if not args.only or args.only in p.name]
    llm_standin = None
    if args.oracle:
        llm_standin = OpenAIStandin(oracle_responder(corpus), api_key=None).start()
        endpoint: dict[str, Any] = {"kind": "openai", "base_url": llm_standin.base_url, "model": "oracle"}
        name = "oracle"
    elif args.base_url:
        if not args.model:
            parser.error("--base-url needs --model")
        endpoint = {"kind": "openai", "base_url": args.base_url, "model": args.model, "key_env": args.api_key_env}
        name = args.model
    else:
        if not Path(args.gguf).exists():
            console.print(f"[red]no model at {args.gguf}[/red]: run `wasmflow models pull gemma`, or pass --base-url")
            return 2
        endpoint = {"kind": "local", "path": args.gguf}
        name = Path(args.gguf).stem
    results: list[Scored] = []
    with tempfile.TemporaryDirectory() as tmp, GithubStandin() as github:
        github.add_repo(REPO_NAME)
        runtime = build_runtime(Path(tmp), github, endpoint, args.answer_tokens)
        try:
            for pr_def in corpus:
                pr = github.add_pull(REPO_NAME, pr_def.title, [added_file(p, lines) for p, lines in pr_def.files],
                                     body=pr_def.body)
                body = encode(pull_request_event(github, REPO_NAME, pr.number))
                started = time.monotonic()
                result = runtime.run("code-review", Event("pull_request", body, {}, f"bench-{pr.number}", "github"))
                s = Scored(pr_def, seconds=time.monotonic() - started)
                out = json.loads(result.output) if result.output else {}
                s.status = out.get("action") or str(result.status)
                s.proposed = int(out.get("proposed") or 0)
                s.dropped = {k: int(v) for k, v in (out.get("dropped") or {}).items() if k not in ("ungrounded", "total")}
                s.dropped_ungrounded = int((out.get("dropped") or {}).get("ungrounded") or 0)
                score(s, [c for r in github.reviews(REPO_NAME, pr.number) for c in r["_comments"]])
                results.append(s)
                console.print(f"  {pr_def.name:<34} {s.status:<9} {len(s.posted)} posted, {s.found}/{len(pr_def.defects)} "
                              f"found, {s.dropped_ungrounded} ungrounded dropped, {s.seconds:.1f} s; dropped by reason "
                              f"{ {k: v for k, v in s.dropped.items() if v} }")
        finally:
            runtime.close()
            if llm_standin is not None:
                llm_standin.stop()

    table = Table(title=f"review quality, model {name}{' (quick)' if args.quick else ''}")
    for col in ("PR", "defects", "found", "posted", "right", "checks", "proposed", "ungrounded dropped",
                "ungrounded posted", "s"):
        table.add_column(col, justify="left" if col == "PR" else "right")
    for s in results:
        table.add_row(s.pr.name, str(len(s.pr.defects)), str(s.found), str(len(s.posted)), str(s.true_posts),
                      str(s.checks_posted), str(s.proposed), str(s.dropped_ungrounded), str(s.ungrounded_posted),
                      f"{s.seconds:.1f}")
    console.print(table)
    defects = sum(len(s.pr.defects) for s in results)
    found = sum(s.found for s in results)
    posted = sum(len(s.posted) + s.checks_posted for s in results)
    right = sum(s.true_posts + s.checks_posted for s in results)
    model_posted = sum(len(s.posted) for s in results)
    model_right = sum(s.true_posts for s in results)
    ungrounded_posted = sum(s.ungrounded_posted for s in results)
    baseline = sum(s.dropped_ungrounded for s in results)
    recall = found / defects if defects else 0.0
    precision = f"{right / posted:.3f}" if posted else "n/a"
    model_precision = f"{model_right / model_posted:.3f}" if model_posted else "n/a"
    console.print(f"recall {recall:.3f} ({found}/{defects}) · precision {precision} ({right}/{posted} posted, "
                  f"model alone {model_precision}: {model_right}/{model_posted}) · ungrounded posted {ungrounded_posted}")
    malformed = sum(s.dropped.get("malformed", 0) for s in results)
    console.print(f"baseline, same run: the model proposed {sum(s.proposed for s in results)} finding(s), "
                  f"{baseline} of them ungrounded (not about changed code, or misquoted) and {malformed} malformed; "
                  f"posted unchecked (first generation) that is up to {baseline + malformed} comment(s) not grounded "
                  f"in the diff, against {ungrounded_posted} here")
    reasons: dict[str, int] = {}
    for s in results:
        for k, v in s.dropped.items():
            reasons[k] = reasons.get(k, 0) + v
    console.print(f"dropped by reason: {', '.join(f'{k} {v}' for k, v in reasons.items() if v) or 'none'}")
    console.print(f"wall: {sum(s.seconds for s in results):.1f} s for {len(results)} PR(s)")
    if args.json:
        Path(args.json).write_text(json.dumps([{"pr": s.pr.name, "defects": len(s.pr.defects), "found": s.found,
                                                "posted": len(s.posted), "right": s.true_posts, "checks": s.checks_posted,
                                                "proposed": s.proposed, "ungrounded_dropped": s.dropped_ungrounded,
                                                "ungrounded_posted": s.ungrounded_posted, "seconds": round(s.seconds, 2)}
                                               for s in results], indent=2))
    print(f"RESULT model={name} recall={recall:.3f} precision={precision} ungrounded_posted={ungrounded_posted}")
    return 0 if ungrounded_posted == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
