"""`wasmflow build`: the guest workspace compiles to WASI modules, and flows find them."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import wasmtime
from click.testing import CliRunner

from wasmflow.build import (
    BuildError,
    ModuleNotBuilt,
    artifact_path,
    build,
    build_command,
    resolve_module,
)

REPO = Path(__file__).resolve().parents[1]
GUEST_WORKSPACE = REPO / "guest-examples"

GUESTS = {"hello", "hostile-loop", "hostile-membomb", "hostile-read-passwd", "hostile-http-denied",
          "hostile-bad-pointers"}


def imports(path: Path) -> set[tuple[str, str]]:
    module = wasmtime.Module.from_file(wasmtime.Engine(), str(path))
    return {(imp.module, imp.name) for imp in module.imports}


def exports(path: Path) -> set[str]:
    return {exp.name for exp in wasmtime.Module.from_file(wasmtime.Engine(), str(path)).exports}


def write_crate(directory: Path, name: str, main_rs: str) -> Path:
    (directory / "src").mkdir(parents=True)
    (directory / "Cargo.toml").write_text(f'[package]\nname = "{name}"\nversion = "0.1.0"\nedition = "2021"\n')
    (directory / "src" / "main.rs").write_text(main_rs)
    return directory


# --- the real workspace -------------------------------------------------------------------------

def test_every_guest_builds_to_a_wasi_command_module(guest_wasm):
    assert GUESTS <= set(guest_wasm)
    assert "wasmflow-sdk" not in guest_wasm  # a library has no module
    for name in GUESTS:
        data = guest_wasm[name].read_bytes()
        assert data[:8] == b"\0asm\x01\0\0\0", name
        assert {"_start", "memory"} <= exports(guest_wasm[name]), name


def test_hello_imports_the_wasmflow_module(guest_wasm):
    imported = imports(guest_wasm["hello"])
    assert {module for module, _ in imported} == {"wasmflow", "wasi_snapshot_preview1"}
    for name in ("event_name", "event_body", "kv_increment", "config_get", "set_output", "log",
                 "result_read", "set_response_status", "set_response_header", "set_response_body"):
        assert ("wasmflow", name) in imported, name


def test_hostile_guests_use_only_what_they_attack(guest_wasm):
    assert not any(m == "wasmflow" for m, _ in imports(guest_wasm["hostile-loop"]))
    assert ("wasmflow", "http_request") in imports(guest_wasm["hostile-http-denied"])
    raw = {name for module, name in imports(guest_wasm["hostile-bad-pointers"]) if module == "wasmflow"}
    assert {"log", "kv_set", "kv_get", "event_body", "event_name", "set_output", "config_get",
            "result_read", "http_request"} <= raw


def test_release_profile_keeps_guests_small(guest_wasm):
    # opt-level "s", LTO and strip: a guest that pulls in serde_json is still well under 1 MiB.
    for name in GUESTS:
        assert guest_wasm[name].stat().st_size < 1024 * 1024, name


def test_building_one_crate_by_directory_name(guest_wasm, tmp_path):
    built = build(["loop"], GUEST_WORKSPACE, tmp_path / "state", progress=False)
    assert built == {"hostile-loop": guest_wasm["hostile-loop"]}


def test_artifact_keeps_cargo_binary_name(guest_wasm):
    path = artifact_path(GUEST_WORKSPACE, "hostile-read-passwd")
    assert path == guest_wasm["hostile-read-passwd"]
    assert path.name == "hostile-read-passwd.wasm"


def test_unknown_crate_names_the_crates_that_exist(toolchain, tmp_path):
    with pytest.raises(BuildError) as info:
        build(["no-such-agent"], GUEST_WORKSPACE, tmp_path / "state", progress=False)
    message = str(info.value)
    assert "no-such-agent" in message
    assert "hello" in message and "hostile-loop" in message


def test_debian_toolchain_gets_a_private_offline_cargo_home(toolchain, tmp_path):
    env = toolchain.env(tmp_path)
    if toolchain.name != "debian":
        assert env.get("CARGO_HOME") == os.environ.get("CARGO_HOME")
        return
    config = (tmp_path / "cargo-home" / "config.toml").read_text()
    assert env["CARGO_HOME"] == str((tmp_path / "cargo-home").resolve())
    assert 'replace-with = "debian"' in config and "/usr/share/cargo/registry" in config
    assert "offline = true" in config
    assert env["PATH"].startswith("/usr/bin")


def test_sdk_docs_build_without_warnings(toolchain, tmp_path):
    """`cargo doc` of the SDK: every public item documented, every intra-doc link resolved. With
    `-D warnings` a warning fails the build, so a cached clean build is still a proof."""
    env = toolchain.env(tmp_path)
    env["RUSTDOCFLAGS"] = "-D warnings"
    proc = subprocess.run([toolchain.cargo, "doc", "--no-deps", "-p", "wasmflow-sdk", "--target", toolchain.target,
                           "--offline"], cwd=GUEST_WORKSPACE, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning" not in proc.stderr, proc.stderr[-3000:]
    assert (GUEST_WORKSPACE / "target" / toolchain.target / "doc" / "wasmflow" / "index.html").is_file()


# --- failures ------------------------------------------------------------------------------------

def test_compiler_errors_come_back_verbatim(toolchain, tmp_path):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "Cargo.toml").write_text('[workspace]\nmembers = ["broken"]\n')
    write_crate(workspace / "broken", "broken", 'fn main() { let x: u32 = "text"; }\n')
    with pytest.raises(BuildError) as info:
        build(None, workspace, tmp_path / "state", progress=False)
    assert "error[E0308]: mismatched types" in info.value.stderr
    assert "src/main.rs" in info.value.stderr
    assert "cargo build failed" in info.value.message


def test_cli_builds_and_reports_failures(guest_wasm, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(build_command, ["hostile-loop", "--workspace", str(GUEST_WORKSPACE),
                                       "--state-dir", str(tmp_path / "state")])
    assert ok.exit_code == 0, ok.output
    assert "hostile-loop" in ok.output
    assert f"{guest_wasm['hostile-loop'].stat().st_size:,}" in ok.output
    bad = runner.invoke(build_command, ["nope", "--workspace", str(GUEST_WORKSPACE),
                                        "--state-dir", str(tmp_path / "state")])
    assert bad.exit_code == 1
    assert "no crate named 'nope'" in bad.output


def test_missing_workspace_is_a_clear_error(toolchain, tmp_path):
    with pytest.raises(BuildError, match="not a cargo workspace"):
        build(None, tmp_path, tmp_path / "state", progress=False)


# --- resolve_module ------------------------------------------------------------------------------

def test_resolve_crate_directory_to_its_module(guest_wasm):
    assert resolve_module("guest-examples/hello", REPO) == guest_wasm["hello"].resolve()
    assert resolve_module("hostile/membomb", GUEST_WORKSPACE) == guest_wasm["hostile-membomb"].resolve()
    assert resolve_module(str(GUEST_WORKSPACE / "hello"), Path("/nonexistent")) == guest_wasm["hello"].resolve()


def test_resolve_wasm_path_as_is(tmp_path):
    wasm = tmp_path / "agents" / "mine.wasm"
    wasm.parent.mkdir()
    wasm.write_bytes(b"\0asm\x01\0\0\0")
    assert resolve_module("agents/mine.wasm", tmp_path) == wasm.resolve()
    with pytest.raises(FileNotFoundError, match="other.wasm"):
        resolve_module("agents/other.wasm", tmp_path)


def test_resolve_unbuilt_crate_says_what_to_run(tmp_path):
    (tmp_path / "Cargo.toml").write_text('[workspace]\nmembers = ["agent"]\n')
    write_crate(tmp_path / "agent", "my-agent", "fn main() {}\n")
    with pytest.raises(ModuleNotBuilt, match="run `wasmflow build my-agent`"):
        resolve_module("agent", tmp_path)
    with pytest.raises(FileNotFoundError):  # what the runtime catches
        resolve_module("agent", tmp_path)


def test_resolve_rejects_what_is_not_a_module(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="no Cargo.toml"):
        resolve_module("notes", tmp_path)
    with pytest.raises(ValueError, match="not a .wasm file"):
        resolve_module("notes.txt", tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_module("no/such/crate", tmp_path)


def test_resolve_finds_the_workspace_target_and_newest_target_dir(tmp_path):
    (tmp_path / "Cargo.toml").write_text('[workspace]\nmembers = ["agents/*"]\n')
    crate = write_crate(tmp_path / "agents" / "bot", "triage-bot", "fn main() {}\n")
    old = tmp_path / "target" / "wasm32-wasi" / "release" / "triage-bot.wasm"
    new = tmp_path / "target" / "wasm32-wasip1" / "release" / "triage-bot.wasm"
    for path, mtime in ((old, 2_000_000_000), (new, 2_000_000_100)):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"\0asm\x01\0\0\0")
        os.utime(path, (mtime, mtime))
    assert resolve_module("agents/bot", tmp_path) == new.resolve()
    os.utime(old, (2_000_000_200, 2_000_000_200))
    assert resolve_module(str(crate), Path("/")) == old.resolve()


def test_resolve_warns_about_a_stale_module(tmp_path, caplog):
    crate = write_crate(tmp_path / "solo", "solo", "fn main() {}\n")  # no workspace: target/ in the crate
    wasm = crate / "target" / "wasm32-wasi" / "release" / "solo.wasm"
    wasm.parent.mkdir(parents=True)
    wasm.write_bytes(b"\0asm\x01\0\0\0")
    os.utime(wasm, (1_000_000_000, 1_000_000_000))
    with caplog.at_level(logging.WARNING, logger="wasmflow.build"):
        assert resolve_module("solo", tmp_path) == wasm.resolve()
    assert "older than the sources of solo" in caplog.text


def test_built_crate_copied_elsewhere_still_resolves(guest_wasm, tmp_path):
    # A deployment may ship only the built module: a .wasm path needs no toolchain and no sources.
    shipped = tmp_path / "hello.wasm"
    shutil.copy(guest_wasm["hello"], shipped)
    assert resolve_module("hello.wasm", tmp_path) == shipped.resolve()
