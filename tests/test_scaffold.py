"""`wasmflow new`, `build` and `run` from an installed wheel, in directories outside the checkout.

The wheel is built from a copy of the package's sources (so the checkout gets no build/ directory) and
installed with `pip install --no-deps` into a fresh virtual environment. Its dependencies (wasmtime,
llama-cpp-python, ...) are made importable through a `.pth` file naming this checkout's `.venv`
site-packages, which spares recompiling llama.cpp; wasmflow itself, its templates and its Rust SDK come
only from the wheel (the test checks that the generated crates point into that environment).

One project gets every template (the first `new` in an empty directory creates it, the others add to
it), so cargo compiles the SDK's dependencies once for all of them. The README's "Writing an agent"
commands are run word for word, as its first three steps.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from optional_support import need_toolchain

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = ["http", "github-bot", "schedule", "llm", "embed"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed; returns its bin/ directory."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "wasmflow", src / "wasmflow",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "sdk"))
    shutil.copytree(REPO / "guest-examples" / "sdk", src / "guest-examples" / "sdk",
                    ignore=shutil.ignore_patterns("target"))
    wheels = root / "dist"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(wheels)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [wheel] = wheels.glob("wasmflow-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "wasmflow-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


def _env(bin_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WASMFLOW_")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["NO_COLOR"] = "1"
    env["COLUMNS"] = "200"
    env.update(extra)
    return env


def _sh(command: str, cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def readme_commands() -> list[str]:
    """The commands of the README's "Writing an agent" section: its first ```sh block."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Writing an agent\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "the README's Writing an agent section has no ```sh block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_wheel_carries_the_sdk_and_the_templates(installed: Path, tmp_path: Path) -> None:
    python = installed / "python"
    code = ("import wasmflow.scaffold.sdk as s, wasmflow.scaffold.templates as t; "
            "print(s.sdk_dir()); print(t.TEMPLATE_ROOT)")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=_env(installed),
                         cwd=tmp_path, check=True).stdout.split()
    sdk, templates = Path(out[0]), Path(out[1])
    venv = installed.parent
    assert sdk.is_relative_to(venv) and templates.is_relative_to(venv), out
    assert (sdk / "src" / "lib.rs").read_text() == (REPO / "guest-examples/sdk/src/lib.rs").read_text()
    assert sorted(p.name for p in templates.iterdir() if p.is_dir()) == sorted(TEMPLATES)


def test_bad_names_and_places_say_what_is_allowed(installed: Path, tmp_path: Path) -> None:
    env = _env(installed)
    for bad in ("Hello", "my_agent", "x-", "a--b", "9lives", "x" * 41, "fn", "wasmflow"):
        proc = _sh(f"wasmflow new '{bad}'", tmp_path, env)
        assert proc.returncode == 2, (bad, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert "lowercase ASCII letters, digits and single hyphens" in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written for a refused name
    (tmp_path / "notes.txt").write_text("not a project")
    proc = _sh("wasmflow new fine", tmp_path, env)
    assert proc.returncode == 2 and "is not empty and has no flows.yaml" in proc.stderr, proc.stderr
    proc = _sh("wasmflow new fine --template nope", tmp_path, env)
    assert proc.returncode == 2 and "github-bot" in proc.stderr, proc.stderr


def test_readme_commands_then_every_template_builds_and_runs(installed: Path, tmp_path: Path) -> None:
    need_toolchain()
    project = tmp_path / "project"
    project.mkdir()
    env = _env(installed)
    commands = readme_commands()
    assert [c.split()[:2] for c in commands] == [["wasmflow", "new"], ["wasmflow", "build"], ["wasmflow", "run"]]
    for command in commands:  # word for word, in an empty directory
        proc = _sh(command, project, env)
        assert proc.returncode == 0, (command, proc.stdout, proc.stderr)
    assert re.search(r"^ok\s+run [0-9a-f]+", proc.stdout, re.M), proc.stdout
    assert '"message": "Hello, ' in proc.stdout
    first = commands[0].split()[2]
    manifest = (project / "agents" / first / "Cargo.toml").read_text()
    sdk_path = re.search(r'path = "([^"]+)"', manifest).group(1)
    assert Path(sdk_path).is_relative_to(installed.parent), sdk_path  # the installed SDK, not the checkout's

    names = {"github-bot": "bot", "schedule": "tick", "llm": "chat", "embed": "rank"}
    for template, name in names.items():  # inside the project: adds the crate and the flow
        proc = _sh(f"wasmflow new {name} --template {template}", project, env)
        assert proc.returncode == 0 and "added to project" in proc.stdout, proc.stdout + proc.stderr
    proc = _sh("wasmflow validate", project, env)
    assert proc.returncode == 0 and "5 flows" in proc.stdout, proc.stdout + proc.stderr
    proc = _sh("wasmflow build", project, env)
    assert proc.returncode == 0, proc.stderr
    for name in [first, *names.values()]:
        assert re.search(rf"^{name}\s+[\d,]+ bytes", proc.stdout, re.M), proc.stdout

    # github-bot: its GitHub calls answered from fixtures/github, its writes printed as a table
    proc = _sh("wasmflow run bot --event fixtures/bot.json --event-name issues --github-fixtures fixtures/github",
               project, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "what the guest would have written on GitHub" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if "octo-org/hello-world#1" in line]
    assert any("comment" in r and "Thanks for the issue" in r for r in rows), proc.stdout
    assert any("labels" in r and "triage" in r for r in rows), proc.stdout

    bot_run = "wasmflow run bot --event fixtures/bot.json --event-name issues --github-fixtures "
    # a read without a fixture is answered 404 and named after the run, with what to add
    (project / "empty").mkdir()
    proc = _sh(bot_run + "empty", project, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no fixture for GET /repos/octo-org/hello-world/issues/1/comments" in proc.stdout, proc.stdout
    # a fixture can refuse a write; the bot's error and the refused write both show
    (project / "refuse").mkdir()
    (project / "refuse" / "comments.json").write_text(
        '[{"request": "POST /repos/octo-org/hello-world/issues/*/comments", "status": 422,'
        ' "body": {"message": "Validation Failed"}}]')
    proc = _sh(bot_run + "refuse", project, env)
    assert proc.returncode == 1 and "Validation Failed" in proc.stdout, proc.stdout + proc.stderr
    assert re.search(r"comment .* 422 \(comments\.json\[0\]\)", proc.stdout), proc.stdout
    # a broken fixture file is a clear error naming it
    (project / "broken").mkdir()
    (project / "broken" / "bad.json").write_text("{not json")
    proc = _sh(bot_run + "broken", project, env)
    assert proc.returncode == 2 and "bad.json: not JSON" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr

    # schedule: kv keeps state between runs
    for tick in (1, 2):
        proc = _sh("wasmflow run tick --event fixtures/tick.json", project, env)
        assert proc.returncode == 0 and f'"tick": {tick}' in proc.stdout, proc.stdout + proc.stderr

    # llm and embed: tiny generated models stand in for Gemma and MiniLM
    from optional_support import need_llama_cpp

    need_llama_cpp()
    from wasmflow.wasi_nn.testmodels import write_tiny_llama

    tiny = write_tiny_llama(tmp_path / "tiny.gguf")
    model_env = _env(installed, WASMFLOW_CHAT_GGUF=str(tiny), WASMFLOW_EMBED_GGUF=str(tiny))
    proc = _sh("wasmflow run chat --event fixtures/chat.json", project, model_env)
    assert proc.returncode == 0 and '"question": "What is WebAssembly?"' in proc.stdout, proc.stdout + proc.stderr
    assert re.search(r'"tokens": [1-9]', proc.stdout), proc.stdout
    proc = _sh("wasmflow run rank --event fixtures/rank.json", project, model_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count('"document"') == 3 and '"dimensions": 64' in proc.stdout, proc.stdout


def test_missing_model_is_a_clear_error(installed: Path, tmp_path: Path) -> None:
    """Not built: `run` names the build command; no toolchain needed for that."""
    env = _env(installed)
    proc = _sh("wasmflow new talk --template llm", tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    assert "wasmflow models pull gemma" in proc.stdout  # what the template needs is said up front
    proc = _sh("wasmflow run talk --event fixtures/talk.json", tmp_path, env)
    assert proc.returncode == 1 and "invalid" in proc.stdout, proc.stdout + proc.stderr
    assert "wasmflow build talk" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def test_build_without_a_toolchain_says_what_to_install(installed: Path, tmp_path: Path) -> None:
    """rustup's toolchain forced where there is none: the message names both ways to get one.

    The PATH holds the installed `wasmflow` and a shell only, so no rustup is found on any machine."""
    shell_dir, project = tmp_path / "shell-only", tmp_path / "project"
    project.mkdir()
    shell_dir.mkdir()
    (shell_dir / "bash").symlink_to(shutil.which("bash") or "/bin/bash")
    path = f"{installed}{os.pathsep}{shell_dir}"
    assert shutil.which("rustup", path=path) is None
    env = _env(installed, WASMFLOW_TOOLCHAIN="rustup")
    env["PATH"] = path
    assert _sh("wasmflow new solo", project, env).returncode == 0
    proc = _sh("wasmflow build", project, env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "apt-get install rustc cargo libstd-rust-dev-wasm32" in proc.stderr, proc.stderr
    assert "rustup target add wasm32-wasip1" in proc.stderr, proc.stderr


def test_adding_keeps_the_file_and_validates(tmp_path: Path) -> None:
    """The flow goes to the end of `flows:` even when another section follows; comments survive; a
    result that does not validate is taken back whole."""
    from wasmflow.flows.loader import load_flows
    from wasmflow.scaffold.project import ScaffoldError, new_agent

    flows = tmp_path / "flows.yaml"
    flows.write_text("# my flows\nflows:\n  - name: first\n    module: first.wasm  # kept\n\n"
                     "engine: wasmtime\n")
    created = new_agent("chat", "llm", tmp_path)
    text = flows.read_text()
    assert text.startswith("# my flows\n") and "module: first.wasm  # kept" in text
    assert text.index("name: chat") < text.index("engine: wasmtime")
    loaded = load_flows(flows)
    assert [f.name for f in loaded.file.flows] == ["first", "chat"] and "chat-model" in loaded.file.models
    assert (tmp_path / "Cargo.toml").is_file() and created.changed == [flows]
    before = flows.read_text()
    try:
        new_agent("chat", "http", tmp_path)
    except ScaffoldError as exc:
        assert "already has a flow named 'chat'" in str(exc)
    else:
        raise AssertionError("a second flow named chat was accepted")
    # a flows.yaml whose `flows:` holds a name the new flow's model would clash with: refused, nothing kept
    flows.write_text(before.replace("chat-model:", "rank-model:", 1).replace("[chat-model]", "[rank-model]")
                     .replace("{model: chat-model}", "{model: rank-model}"))
    snapshot = flows.read_text()
    with pytest.raises(ScaffoldError, match="does not validate"):
        new_agent("rank", "embed", tmp_path)
    assert flows.read_text() == snapshot and not (tmp_path / "agents" / "rank").exists()
