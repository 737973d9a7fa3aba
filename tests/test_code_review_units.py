"""The code-review bot's Rust unit tests (globs, hunk parsing, the budget plan, secret and TODO checks,
answer parsing, the decision whether and what to review, the chunk size), compiled for wasm32-wasi and run in wasmtime: the guest's logic is tested where it runs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import wasmtime


GUESTS = Path(__file__).resolve().parents[1] / "guest-examples"


def test_rust_unit_tests_pass_in_wasmtime(tmp_path: Path, capfd: pytest.CaptureFixture[str], toolchain) -> None:  # type: ignore[no-untyped-def]
    state = GUESTS.parent / ".wasmflow"
    proc = subprocess.run(
        [toolchain.cargo, "test", "--target", toolchain.target, "-p", "code-review", "--no-run", "--message-format=json"],
        cwd=GUESTS, env=toolchain.env(state), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    executables = [json.loads(line).get("executable") for line in proc.stdout.splitlines() if line.startswith("{")]
    wasm = [e for e in executables if e and e.endswith(".wasm")]
    assert wasm, proc.stdout[-2000:]

    engine = wasmtime.Engine()
    module = wasmtime.Module.from_file(engine, wasm[-1])
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    linker.define_unknown_imports_as_traps(module)  # host functions are not called by unit tests
    store = wasmtime.Store(engine)
    wasi = wasmtime.WasiConfig()
    wasi.argv = ["code-review-tests"]
    out = tmp_path / "out.txt"
    wasi.stdout_file = str(out)
    wasi.inherit_stderr()
    store.set_wasi(wasi)
    instance = linker.instantiate(store, module)
    code = 0
    try:
        instance.exports(store)["_start"](store)
    except wasmtime.ExitTrap as exit_:
        code = exit_.code
    text = out.read_text()
    assert code == 0, text
    assert "test result: ok." in text and " 0 failed" in text
    assert int(text.split("test result: ok. ")[1].split(" passed")[0]) >= 14
    assert "decision::tests::review_command_on_a_pull_request ... ok" in text  # what is reviewed, decided purely
