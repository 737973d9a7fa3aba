"""The hostile-guest corpus's harness: one planted secret, both engines, a bounded host.

Every test in `test_hostile_*.py` plays an attacker: a guest (WAT under `tests/hostile/`, or a Rust crate
under `guest-examples/hostile/`) tries one way out of the sandbox. Each asserts three things:
the run ends with the named status, no byte of the planted secret comes back through any channel a
caller can see (output, response, logs, stdout, stderr, error), and the host's peak RSS stays bounded.

Usage:

    from hostile_support import engine_name, planted_secret, run_flow, assert_no_leak, PeakRss

    def test_x(engine_name, planted_secret, tmp_path):
        with PeakRss() as rss:
            result = run_flow(engine_name, tmp_path, wat_text, allow={...}, limits={...})
        assert result.status is Status.DENIED
        assert_no_leak(result, planted_secret)
        assert rss.grew_mib < 200
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

from engine_support import engine_name  # noqa: F401  (re-exported: the hostile tests import it from here)
from guest_support import write_wat
from wasmflow.engine import ENGINES, RunResult
from wasmflow.flows.model import FlowsFile
from wasmflow.host_functions.spec import Event
from wasmflow.runtime import Runtime

HOSTILE_DIR = Path(__file__).resolve().parent / "hostile"


@pytest.fixture
def planted_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> bytes:
    """A secret the guest must never see, planted where an escape would find it.

    The process's working directory becomes `tmp_path/work`, holding `github-app.pem` and `wasmflow.db`
    with the secret; its parent holds `secret.txt` too (for `../` escapes). Returns the secret's bytes.
    """
    secret = f"-----BEGIN RSA PRIVATE KEY-----\nWASMFLOW-PLANTED-{secrets.token_hex(16)}\n-----END RSA PRIVATE KEY-----\n"
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    for path in (work / "github-app.pem", work / "wasmflow.db", tmp_path / "secret.txt"):
        path.write_text(secret)
    monkeypatch.chdir(work)
    return secret.encode()


def secret_core(secret: bytes) -> bytes:
    """The part of the planted secret that is unique to this test (the random hex)."""
    marker = b"WASMFLOW-PLANTED-"
    start = secret.index(marker)
    return secret[start : start + len(marker) + 32]


def assert_no_leak(result: RunResult, secret: bytes) -> None:
    """No channel a caller can see carries the secret (or its random core)."""
    core = secret_core(secret)
    channels: dict[str, bytes] = {
        "output": result.output or b"",
        "response_body": result.response_body or b"",
        "response_headers": repr(result.response_headers).encode(),
        "logs": "\n".join(m for _, _, m in result.logs).encode(),
        "stdout": result.stdout or b"",
        "stderr": result.stderr or b"",
        "error": (result.error or "").encode(),
    }
    for name, data in channels.items():
        assert core not in data, f"the planted secret leaked through {name}"
        assert core.hex().encode() not in data, f"the planted secret leaked (hex) through {name}"


def wat_module(tmp_path: Path, name_or_text: str) -> Path:
    """A .wasm built from WAT: a file name under tests/hostile/ or the WAT text itself."""
    text = name_or_text
    if "\n" not in name_or_text and name_or_text.endswith(".wat"):
        text = (HOSTILE_DIR / name_or_text).read_text()
    return write_wat(tmp_path / f"guest-{abs(hash(text)) % 10**12}.wasm", text)


def make_flows(module: Path, *, models: Optional[dict[str, Any]] = None, github: Optional[dict[str, Any]] = None,
               **flow: Any) -> FlowsFile:
    """A FlowsFile with one flow named `hostile` running `module` (state under the test's tmp dir)."""
    data: dict[str, Any] = {"state_dir": str(module.parent / "state"), "models": models or {},
                            "flows": [{"name": "hostile", "module": str(module), **flow}]}
    if github is not None:
        data["github"] = github
    return FlowsFile.model_validate(data)


def run_flow(engine_name: str, tmp_path: Path, guest: "str | Path", event: Optional[Event] = None,
             *, models: Optional[dict[str, Any]] = None, github: Optional[dict[str, Any]] = None,
             **flow: Any) -> RunResult:
    """Run `guest` (a .wasm path, a WAT file name under tests/hostile/, or WAT text) once, as flow
    `hostile`, through a full Runtime (every capability present) on `engine_name`."""
    module = Path(guest) if isinstance(guest, Path) else wat_module(tmp_path, guest)
    runtime = Runtime(make_flows(module, models=models, github=github, **flow), base_dir=tmp_path,
                      engine_override=engine_name)
    try:
        return runtime.run("hostile", event or Event("manual", b"{}"))
    finally:
        runtime.close()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakRss:
    """The host's peak RSS growth over a block, in MiB (Linux: resets the high-water mark on entry)."""

    def __enter__(self) -> "PeakRss":
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset VmHWM to the current RSS
        except OSError:
            pass
        self.start_kib = _status_kib("VmRSS")
        self.grew_mib = 0.0
        return self

    def __exit__(self, *exc: Any) -> None:
        self.grew_mib = max(0, _status_kib("VmHWM") - self.start_kib) / 1024


def iter_engines() -> Iterator[str]:
    """The engines usable here (for tests that compare both in one go)."""
    from engine_support import wasmedge_problem

    yield "wasmtime"
    if "wasmedge" in ENGINES and wasmedge_problem() is None:
        yield "wasmedge"


__all__ = ["engine_name", "planted_secret", "assert_no_leak", "run_flow", "make_flows", "wat_module", "PeakRss",
           "HOSTILE_DIR", "iter_engines", "secret_core"]
