"""bench/review_quality.py scores what the bot really posted: with the scripted oracle (every planted
defect, plus invented and misquoting findings) the invented ones are all dropped by grounding, every
planted defect is found at its line, and the RESULT line carries the figures for tooling. Also the
host's view of the endpoints the bot calls: each needs exactly the App permission GitHub requires."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from wasmflow.host_functions.github import classify

REPO = Path(__file__).resolve().parents[1]


def test_the_corpus_has_planted_defects_and_clean_prs() -> None:
    sys.path.insert(0, str(REPO / "bench"))
    import review_quality

    corpus = review_quality.load_corpus(quick=False)
    assert len(corpus) >= 12
    assert sum(1 for p in corpus if not p.defects) >= 3
    kinds = {d.kind for p in corpus for d in p.defects}
    assert {"off-by-one", "unchecked-error", "sql-by-string", "secret", "race", "wrong-comparison"} <= kinds
    for p in corpus:
        for d in p.defects:  # the marker is stripped and the line holds the code the defect is about
            lines = dict(p.files)[d.path]
            assert "⟦" not in lines[d.line - 1] and lines[d.line - 1].strip() == d.code


def test_oracle_run_scores_grounding(guest_wasm: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    import review_quality

    assert review_quality.main(["--oracle", "--quick"]) == 0
    out = capsys.readouterr().out
    result = re.search(r"^RESULT model=oracle recall=([\d.]+) precision=([\d.]+) ungrounded_posted=(\d+)$", out, re.M)
    assert result, out[-2000:]
    assert float(result.group(1)) == 1.0 and float(result.group(2)) == 1.0 and result.group(3) == "0"
    baseline = re.search(r"the model proposed (\d+) finding\(s\), (\d+) of them ungrounded", out)
    assert baseline and int(baseline.group(2)) >= 2 * 4  # two invented findings per PR were dropped


@pytest.mark.parametrize("method,path,permission,level", [
    ("POST", "/repos/o/r/check-runs", "checks", "write"),
    ("PATCH", "/repos/o/r/check-runs/5", "checks", "write"),
    ("GET", "/repos/o/r/collaborators/bob/permission", "metadata", "read"),
    ("GET", "/repos/o/r/contents/.github/wasmflow.yaml", "contents", "read"),
    ("PATCH", "/repos/o/r/pulls/3", "pull_requests", "write"),
    ("POST", "/repos/o/r/issues/3/labels", "issues", "write"),
    ("POST", "/repos/o/r/pulls/3/comments/9/replies", "pull_requests", "write"),
])
def test_the_bots_endpoints_need_the_apps_permissions(method: str, path: str, permission: str, level: str) -> None:
    scope = classify(method, path, {}, ["o/r"])
    assert (scope.permission, scope.level) == (permission, level)


def test_collaborators_cannot_be_changed_and_other_repos_are_out_of_scope() -> None:
    with pytest.raises(ValueError, match="read-only"):
        classify("PUT", "/repos/o/r/collaborators/bob", {}, ["o/r"])
    with pytest.raises(ValueError, match="not this run's repository"):
        classify("GET", "/repos/other/r/contents/.github/wasmflow.yaml", {}, ["o/r"])
    with pytest.raises(ValueError):
        classify("GET", "/repos/o/r/contents/../../other/r/contents/x", {}, ["o/r"])
