"""Size of a code review's transcript (docs/replay.md), against what the run stores anyway.

Runs the code-review guest once per pull-request size against the GitHub and OpenAI stand-ins, stores its
transcript as `wasmflow run` and the workers do, and prints: calls recorded, the transcript as JSON and
compressed, and the baseline measured in the same run: the event body plus the result the runs table
keeps (logs and output).

    .venv/bin/python bench/transcript_size.py [--files 3 10 30]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from wasmflow.build import artifact_path, build  # noqa: E402
from wasmflow.devtools.github_payloads import delivery_headers, encode, pull_request_event  # noqa: E402
from wasmflow.devtools.github_standin import GithubStandin  # noqa: E402
from wasmflow.devtools.openai_standin import OpenAIStandin  # noqa: E402
from wasmflow.host_functions.spec import Event  # noqa: E402
from wasmflow.platform.transcripts import load_transcript, persist  # noqa: E402

REPO = "octo-org/hello-world"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, nargs="+", default=[3, 10, 30], help="changed files per pull request")
    args = parser.parse_args()
    from test_code_review import KEY_ENV, Env, finding_responder, rust_files

    os.environ[KEY_ENV] = "sk-test"
    workspace = ROOT / "guest-examples"
    build(["code-review"], workspace, ROOT / ".wasmflow", progress=False)
    wasm = artifact_path(workspace, "code-review")
    table = Table(title="code review: transcript size per run")
    for col in ("changed files", "calls", "transcript JSON", "stored (zlib)", "baseline: event + logs + output",
                "stored / baseline"):
        table.add_column(col, justify="right")
    for n in args.files:
        with tempfile.TemporaryDirectory() as tmp, GithubStandin() as github, OpenAIStandin(finding_responder) as llm:
            github.add_repo(REPO)
            env = Env(Path(tmp), wasm, github, llm)
            github.add_pull(REPO, "Add modules", rust_files(n, lines=20), body="Adds modules.")
            body = encode(pull_request_event(github, REPO, 1))
            headers = delivery_headers("pull_request", body, "s3cret", None)
            result = env.runtime.run("code-review", Event("pull_request", body, headers, headers["x-github-delivery"],
                                                          "github"))
            assert result.ok, (result.error, result.logs)
            stored = persist(env.runtime, result) or 0
            transcript = load_transcript(env.runtime.db, result.run_id)
            assert transcript is not None
            baseline = len(body) + len(json.dumps([[t, lv, m] for t, lv, m in result.logs])) + len(result.output or b"")
            table.add_row(str(n), str(len(transcript.entries())), f"{transcript.size():,} B", f"{stored:,} B",
                          f"{baseline:,} B", f"{stored / baseline:.2f}x")
            env.runtime.close()
    Console().print(table)


if __name__ == "__main__":
    main()
