"""Compile the guest workspace to WebAssembly, and find the built module of a flow.

Flows name their guest as a crate directory (`module: guest-examples/hello`) or a `.wasm` path. This
module is the one place that knows how a crate becomes a `.wasm`: which Rust toolchain and target to
use, where cargo leaves the artifact, and what to tell a person whose module is not built yet. The
engine only ever receives a path from `resolve_module`.

Two toolchains are supported, tried in this order:

- Debian's packaged Rust (`/usr/bin/cargo` with `libstd-rust-dev-wasm32`, target `wasm32-wasi`). It
  has no crates.io access, so builds get a private `CARGO_HOME` whose `config.toml` replaces crates.io
  with the directory of Debian's `librust-*-dev` packages (`/usr/share/cargo/registry`), offline.
- rustup's toolchain with target `wasm32-wasip1` (or the older `wasm32-wasi`) and the user's own
  cargo configuration.

`WASMFLOW_TOOLCHAIN=debian|rustup` forces one of them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Iterable, Optional

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

log = logging.getLogger("wasmflow.build")

DEBIAN_CARGO = Path("/usr/bin/cargo")
DEBIAN_WASI_STD = Path("/usr/lib/rustlib/wasm32-wasi")
DEBIAN_REGISTRY = Path("/usr/share/cargo/registry")
#: Targets cargo may have built for, newest name first; `artifact_path` looks in each.
WASI_TARGETS = ("wasm32-wasip1", "wasm32-wasi")
INSTALL_HINT = (
    "no Rust toolchain for WebAssembly (WASI) found. Install one of:\n"
    "  Debian/Ubuntu: apt-get install rustc cargo libstd-rust-dev-wasm32 librust-serde-json-dev "
    "librust-serde-derive-dev\n"
    "  rustup:        rustup target add wasm32-wasip1"
)

_DEBIAN_CARGO_CONFIG = f"""\
# Written by `wasmflow build`: Debian's Rust has no crates.io, only the crates packaged as
# librust-*-dev, which live in a directory source.
[source.crates-io]
replace-with = "debian"

[source.debian]
directory = "{DEBIAN_REGISTRY}"

[net]
offline = true
"""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class BuildError(Exception):
    """A build that could not start or that cargo failed.

    `stderr` is cargo's own output, verbatim, so a person sees the compiler's errors exactly as cargo
    printed them; `str()` includes it so a failing test fixture shows it too.
    """

    def __init__(self, message: str, stderr: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.stderr = stderr

    def __str__(self) -> str:
        return f"{self.message}\n{self.stderr}".rstrip() if self.stderr else self.message


class ModuleNotBuilt(FileNotFoundError):
    """A flow names a crate whose `.wasm` does not exist yet. A `FileNotFoundError`, so callers that
    handle missing modules (the runtime reports status `invalid`) handle this one too."""


@dataclass(frozen=True)
class Toolchain:
    """A cargo that can build for WASI, and how to run it."""

    name: str  # "debian" or "rustup"
    cargo: str
    target: str

    def env(self, state_dir: Path) -> dict[str, str]:
        """The environment for cargo. Artifacts always go to the workspace's own `target/` (so
        `artifact_path` finds them), whatever `CARGO_TARGET_DIR` the caller had."""
        env = dict(os.environ)
        for name in ("CARGO_TARGET_DIR", "CARGO_BUILD_TARGET", "CARGO_BUILD_TARGET_DIR"):
            env.pop(name, None)
        if self.name == "debian":
            cargo_home = Path(state_dir).resolve() / "cargo-home"
            cargo_home.mkdir(parents=True, exist_ok=True)
            config = cargo_home / "config.toml"
            if not config.is_file() or config.read_text() != _DEBIAN_CARGO_CONFIG:
                config.write_text(_DEBIAN_CARGO_CONFIG)
            env["CARGO_HOME"] = str(cargo_home)
            env["PATH"] = "/usr/bin" + os.pathsep + env.get("PATH", "")
            env.pop("RUSTC", None)  # /usr/bin/rustc, not a rustup proxy or another compiler
            env.pop("RUSTUP_TOOLCHAIN", None)
        return env


def _rustup_targets() -> list[str]:
    """Targets installed for rustup's active toolchain (empty when rustup is absent or fails)."""
    rustup = shutil.which("rustup")
    if not rustup:
        return []
    try:
        out = subprocess.run([rustup, "target", "list", "--installed"], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return out.split()


def _debian_toolchain() -> Optional[Toolchain]:
    if DEBIAN_CARGO.is_file() and DEBIAN_WASI_STD.is_dir():
        return Toolchain("debian", str(DEBIAN_CARGO), "wasm32-wasi")
    return None


def _rustup_toolchain() -> Optional[Toolchain]:
    installed = _rustup_targets()
    cargo = shutil.which("cargo")
    for target in WASI_TARGETS:
        if target in installed and cargo:
            return Toolchain("rustup", cargo, target)
    return None


def find_toolchain() -> Toolchain:
    """The toolchain `wasmflow build` uses: Debian's if its WASI standard library is installed, else
    rustup's with a WASI target (`WASMFLOW_TOOLCHAIN` picks one). Raises BuildError with install
    instructions when there is none."""
    choice = os.environ.get("WASMFLOW_TOOLCHAIN", "").strip().lower()
    finders: dict[str, Callable[[], Optional[Toolchain]]] = {"debian": _debian_toolchain,
                                                             "rustup": _rustup_toolchain}
    if choice and choice not in finders:
        raise BuildError(f"WASMFLOW_TOOLCHAIN={choice!r}: expected 'debian' or 'rustup'")
    for name in ([choice] if choice else ["debian", "rustup"]):
        toolchain = finders[name]()
        if toolchain is not None:
            return toolchain
    raise BuildError(INSTALL_HINT if not choice else f"WASMFLOW_TOOLCHAIN={choice}: not installed.\n{INSTALL_HINT}")


@dataclass(frozen=True)
class Crate:
    """One package of the workspace."""

    name: str
    directory: Path
    is_bin: bool  # has a binary target, i.e. builds to a .wasm (the SDK is a library)


def workspace_crates(workspace: Path, toolchain: Toolchain, state_dir: Path) -> list[Crate]:
    """The workspace's packages, as cargo sees them (globs in `members` expanded)."""
    manifest = Path(workspace) / "Cargo.toml"
    if not manifest.is_file():
        raise BuildError(f"{workspace} is not a cargo workspace (no Cargo.toml): run `wasmflow build` in a project "
                         "made by `wasmflow new NAME` (or create one with it), or pass --workspace")
    proc = subprocess.run(
        [toolchain.cargo, "metadata", "--no-deps", "--format-version", "1", "--manifest-path", str(manifest)],
        capture_output=True, text=True, env=toolchain.env(state_dir),
    )
    if proc.returncode != 0:
        raise BuildError(f"cargo metadata failed for {manifest} (exit {proc.returncode})", proc.stderr)
    crates = []
    for pkg in json.loads(proc.stdout)["packages"]:
        kinds = {kind for target in pkg["targets"] for kind in target["kind"]}
        crates.append(Crate(pkg["name"], Path(pkg["manifest_path"]).parent, "bin" in kinds))
    return sorted(crates, key=lambda c: (c.is_bin, c.name))  # libraries first: their errors come first


def select_crates(crates: list[Crate], names: Optional[Iterable[str]], workspace: Path) -> list[Crate]:
    """The crates named by package name (`hostile-loop`), directory name (`loop`) or path inside the
    workspace (`hostile/loop`); all of them for `None` or no names. Unknown or ambiguous names are a
    BuildError that lists what exists."""
    names = list(names or [])
    if not names:
        return list(crates)
    root = Path(workspace).resolve()
    chosen: list[Crate] = []
    for name in names:
        wanted = name.strip().rstrip("/")
        matches = [c for c in crates if c.name == wanted]
        if not matches:
            matches = [c for c in crates
                       if c.directory.name == wanted or _relative(c.directory, root) == wanted]
        if not matches:
            known = ", ".join(c.name for c in crates)
            raise BuildError(f"no crate named {name!r} in {workspace} (crates: {known})")
        if len(matches) > 1:
            raise BuildError(f"{name!r} is ambiguous in {workspace}: " + ", ".join(c.name for c in matches))
        if matches[0] not in chosen:
            chosen.append(matches[0])
    return chosen


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return str(path)


@dataclass
class _CargoRun:
    """What one cargo invocation reported: artifacts on stdout (JSON), human output on stderr."""

    executables: dict[Path, Path] = field(default_factory=dict)  # crate directory -> .wasm
    stderr_lines: list[str] = field(default_factory=list)
    compiling: str = ""


def _pump_stderr(stream: IO[str], run: _CargoRun, echo: Optional[Callable[[str], None]]) -> None:
    """Collect cargo's stderr verbatim and note which crate it is compiling now."""
    for line in stream:
        run.stderr_lines.append(line)
        words = _ANSI.sub("", line).split()
        if len(words) >= 2 and words[0] == "Compiling":
            run.compiling = words[1]
        if echo is not None:
            echo(line)


def _run_cargo(cmd: list[str], env: dict[str, str], cwd: Path, run: _CargoRun,
               on_artifact: Callable[[Path], None], echo: Optional[Callable[[str], None]]) -> int:
    """Run cargo with `--message-format json-render-diagnostics`: cargo still renders the compiler's
    diagnostics on stderr exactly as usual, and stdout carries one JSON line per finished unit."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            bufsize=1)
    if proc.stdout is None or proc.stderr is None:  # both are pipes: Popen always sets them
        proc.kill()
        raise BuildError(f"could not read cargo's output: {' '.join(cmd)}")
    pump = threading.Thread(target=_pump_stderr, args=(proc.stderr, run, echo), daemon=True)
    pump.start()
    for line in proc.stdout:
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("reason") != "compiler-artifact" or "manifest_path" not in msg:
            continue
        directory = Path(msg["manifest_path"]).parent.resolve()
        if msg.get("executable"):
            run.executables[directory] = Path(msg["executable"])
        on_artifact(directory)
    code = proc.wait()
    pump.join()
    return code


def build(crates: Optional[list[str]], workspace: Path, state_dir: Path, progress: bool = True,
          verbose: bool = False) -> dict[str, Path]:
    """Build the named crates (all when `None` or empty) for WASI in release mode, in one cargo run.

    Returns package name -> built `.wasm` for every selected crate with a binary (libraries are
    compiled, and so checked, but have no module). Raises BuildError with cargo's stderr when cargo
    fails. `progress` shows on stderr which crate is compiling and how many of the selected are done;
    `verbose` streams cargo's own output as well. One cargo run (not one per crate) lets cargo share
    and parallelise the dependencies.
    """
    workspace = Path(workspace).resolve()
    toolchain = find_toolchain()
    selected = select_crates(workspace_crates(workspace, toolchain, state_dir), crates, workspace)
    by_dir = {c.directory.resolve(): c for c in selected}
    cmd = [toolchain.cargo, "build", "--release", "--target", toolchain.target,
           "--message-format", "json-render-diagnostics",
           "--manifest-path", str(workspace / "Cargo.toml")]
    for crate in selected:
        cmd += ["-p", crate.name]
    if progress and sys.stderr.isatty():
        cmd += ["--color", "always"]  # cargo's errors keep their colours when passed through

    console = Console(stderr=True, highlight=False)
    live = progress and console.is_terminal
    if progress and not live:  # a log (CI): one line instead of a bar's redraws
        console.print(f"building {len(selected)} crate(s) with {toolchain.name} cargo ({toolchain.target})")
    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=console, transient=True, disable=not live)
    run = _CargoRun()
    with bar:
        task = bar.add_task(f"building with {toolchain.name} cargo ({toolchain.target})", total=len(selected))
        done: set[Path] = set()

        def on_artifact(directory: Path) -> None:
            if directory in by_dir and directory not in done:
                done.add(directory)
                bar.update(task, completed=len(done), description=f"built {by_dir[directory].name}")

        def echo(line: str) -> None:
            if verbose:
                bar.console.print(line.rstrip("\n"), markup=False, highlight=False)
            if run.compiling:
                bar.update(task, description=f"compiling {run.compiling}")

        code = _run_cargo(cmd, toolchain.env(state_dir), workspace, run, on_artifact, echo)
    stderr = "".join(run.stderr_lines)
    if code != 0:
        raise BuildError(f"cargo build failed (exit {code}): {' '.join(cmd)}", stderr)
    if progress and not verbose and "warning" in stderr:
        sys.stderr.write(stderr)  # warnings are worth seeing; a clean build stays quiet
    built: dict[str, Path] = {}
    for crate in selected:
        if crate.is_bin:
            built[crate.name] = run.executables.get(crate.directory.resolve()) or artifact_path(workspace, crate.name)
    return built


def artifact_path(workspace: Path, package_name: str) -> Path:
    """The built `.wasm` of a package: `target/<wasi target>/release/<name>.wasm`, from whichever
    WASI target was built (the newest if both were). Cargo keeps `-` in binary names; the `_` form
    (cargo's name under `deps/`) is accepted too. Raises ModuleNotBuilt when there is none."""
    release_dirs = [Path(workspace) / "target" / target / "release" for target in WASI_TARGETS]
    names = dict.fromkeys([package_name, package_name.replace("-", "_")])
    candidates = [d / f"{n}.wasm" for d in release_dirs for n in names]
    found = [p for p in candidates if p.is_file()]
    if not found:
        raise ModuleNotBuilt(f"crate {package_name!r} is not built (no {candidates[0].name} under "
                             f"{Path(workspace) / 'target'}): run `wasmflow build {package_name}`")
    return max(found, key=lambda p: p.stat().st_mtime)


def _load_toml(path: Path) -> dict:
    """A TOML file as a dict; a small `[section]`/`key = "string"` reader on Python 3.10 (no tomllib),
    which is all Cargo.toml lookups here need."""
    text = path.read_text()
    try:
        import tomllib
    except ImportError:  # Python 3.10
        data: dict = {}
        section: dict = data
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            header = re.fullmatch(r"\[([A-Za-z0-9_.-]+)\]", line)
            if header:
                section = data.setdefault(header.group(1), {})
            else:
                pair = re.fullmatch(r'([A-Za-z0-9_-]+)\s*=\s*"([^"]*)"', line)
                if pair:
                    section[pair.group(1)] = pair.group(2)
        return data
    return tomllib.loads(text)


def _workspace_root(crate_dir: Path) -> Path:
    """The directory of the nearest Cargo.toml with a `[workspace]` at or above the crate (the crate
    itself when it is not in a workspace): that is where cargo puts `target/`."""
    for directory in [crate_dir, *crate_dir.parents]:
        manifest = directory / "Cargo.toml"
        if manifest.is_file() and "workspace" in _load_toml(manifest):
            return directory
    return crate_dir


def _warn_if_stale(wasm: Path, crate_dir: Path, package: str) -> None:
    """Running an old build after editing the agent is a classic waste of an afternoon: say so."""
    sources = [crate_dir / "Cargo.toml", *(crate_dir / "src").rglob("*.rs")]
    newest = max((p.stat().st_mtime for p in sources if p.is_file()), default=0.0)
    if newest > wasm.stat().st_mtime:
        log.warning("%s is older than the sources of %s: run `wasmflow build %s`", wasm, package, package)


def resolve_module(module: str, base_dir: Path) -> Path:
    """The `.wasm` a flow's `module:` names: a `.wasm` path as is, a crate directory as the module
    cargo built for it. Relative paths are relative to `base_dir` (the directory of flows.yaml).

    Raises ModuleNotBuilt (a FileNotFoundError) naming the `wasmflow build` command to run when the
    crate is not built, FileNotFoundError when the path does not exist, and ValueError when it is
    neither a `.wasm` file nor a crate directory.
    """
    path = Path(module).expanduser()
    if not path.is_absolute():
        path = Path(base_dir) / path
    if path.suffix == ".wasm" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"module {module!r}: {path} does not exist")
        if path.suffix != ".wasm":
            raise ValueError(f"module {module!r}: {path} is not a .wasm file or a crate directory")
        return path.resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"module {module!r}: {path} does not exist")
    manifest = path / "Cargo.toml"
    if not manifest.is_file():
        raise ValueError(f"module {module!r}: {path} is neither a .wasm file nor a crate directory (no Cargo.toml)")
    package = _load_toml(manifest).get("package", {}).get("name")
    if not package:
        raise ValueError(f"module {module!r}: {manifest} has no [package] name (a workspace is not a module)")
    crate_dir = path.resolve()
    wasm = artifact_path(_workspace_root(crate_dir), package)
    _warn_if_stale(wasm, crate_dir, package)
    return wasm.resolve()


def is_project(directory: Path) -> bool:
    """A project made by `wasmflow new`: flows.yaml beside a Cargo workspace (the agents' crates)."""
    manifest = Path(directory) / "Cargo.toml"
    return (Path(directory) / "flows.yaml").is_file() and manifest.is_file() and "workspace" in _load_toml(manifest)


def default_workspace() -> Path:
    """`$WASMFLOW_WORKSPACE`, else the nearest project (flows.yaml beside a Cargo workspace, as `wasmflow
    new` makes them) or `guest-examples/` (this repository's layout) at or above the current directory."""
    if os.environ.get("WASMFLOW_WORKSPACE"):
        return Path(os.environ["WASMFLOW_WORKSPACE"])
    cwd = Path.cwd()
    for directory in [cwd, *cwd.parents]:
        if is_project(directory):
            return directory
        if (directory / "guest-examples" / "Cargo.toml").is_file():
            return directory / "guest-examples"
    return cwd / "guest-examples"


def default_state_dir(workspace: Path) -> Path:
    """Where a build keeps its cargo home: the project's `.wasmflow`, or `.wasmflow` beside `guest-examples/`."""
    workspace = Path(workspace)
    return workspace / ".wasmflow" if is_project(workspace) else workspace.parent / ".wasmflow"


@click.command("build")
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option("--workspace", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="the guest cargo workspace (default: $WASMFLOW_WORKSPACE, else the nearest project made by "
                   "`wasmflow new` or ./guest-examples)")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="where the build keeps its cargo home (default: the project's .wasmflow, or .wasmflow "
                   "beside guest-examples)")
@click.option("-v", "--verbose", is_flag=True, help="stream cargo's output")
def build_command(names: tuple[str, ...], workspace: Optional[Path], state_dir: Optional[Path], verbose: bool) -> None:
    """Compile guest crates to WebAssembly (all of them, or each NAME: a package or directory name)."""
    workspace = (workspace or default_workspace()).resolve()
    state_dir = state_dir or default_state_dir(workspace)
    out = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    try:
        built = build(list(names) or None, workspace, state_dir, progress=True, verbose=verbose)
    except BuildError as exc:
        if exc.stderr:
            sys.stderr.write(exc.stderr if exc.stderr.endswith("\n") else exc.stderr + "\n")
            sys.stderr.flush()
        err.print(f"[red]error:[/red] {escape(exc.message)}")
        sys.exit(1)
    width = max((len(name) for name in built), default=0)
    for name, path in sorted(built.items()):
        # Plain lines, not a table: paths stay whole and copyable at any terminal width.
        out.print(f"{name:<{width}}  {path.stat().st_size:>9,} bytes  {_display(path)}", soft_wrap=True)
    if not built:
        out.print("built (no binary crates selected: libraries have no module)")


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
