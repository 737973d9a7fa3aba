"""Writing a project, or one more agent into a project, from a template.

A project is a directory with `flows.yaml`, a Cargo workspace (`Cargo.toml`, members `agents/*`, the
release profile guests want), one crate per agent under `agents/`, fixture events under `fixtures/` and
a README naming the next commands. Adding an agent to an existing project writes its crate and fixture,
and inserts its flow (and models) into flows.yaml as text, so the file's comments and layout survive;
the result is validated and, if it does not validate, every file written is taken back.
"""

from __future__ import annotations

import keyword
import re
from dataclasses import dataclass, field
from pathlib import Path

from wasmflow.flows.loader import FlowsError, load_flows
from wasmflow.scaffold.sdk import sdk_dir
from wasmflow.scaffold.templates import TEMPLATES, Template

NAME_RULE = ("a name of 1 to 40 lowercase ASCII letters, digits and single hyphens, starting with a letter "
             "and not ending with a hyphen (e.g. `my-agent`)")
_NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")
RUST_KEYWORDS = {"as", "async", "await", "break", "const", "continue", "crate", "dyn", "else", "enum", "extern",
                 "false", "fn", "for", "if", "impl", "in", "let", "loop", "match", "mod", "move", "mut", "pub",
                 "ref", "return", "self", "static", "struct", "super", "trait", "true", "type", "unsafe", "use",
                 "where", "while", "abstract", "become", "box", "do", "final", "macro", "override", "priv",
                 "try", "typeof", "unsized", "virtual", "yield"}
# Names cargo refuses for a package, or that would shadow the SDK or a directory of the project.
RESERVED = RUST_KEYWORDS | set(keyword.kwlist) | {"wasmflow", "wasmflow-sdk", "sdk", "std", "core", "alloc",
                                                  "proc-macro", "test", "build", "deps", "examples", "incremental",
                                                  "target", "agents", "fixtures", "con", "nul", "aux", "prn"}

WORKSPACE_TOML = """\
# The agents' Cargo workspace: every crate under agents/ shares one target/ directory and the release
# profile below. `wasmflow build [NAME]` compiles them to WebAssembly (wasm32-wasi) and supplies the
# toolchain's configuration, so no .cargo/config.toml is needed.
[workspace]
resolver = "2"
members = ["agents/*"]

# Guests ship as modules compiled per host: small is what matters, and a panic must be a trap (status
# `trap`), not an unwinding attempt.
[profile.release]
opt-level = "s"
lto = true
codegen-units = 1
panic = "abort"
strip = true
"""

CRATE_TOML = """\
[package]
name = "{name}"
version = "0.1.0"
edition = "2021"
publish = false
description = "{description}"

[dependencies]
# The wasmflow SDK that came with the installed wasmflow (`wasmflow new` wrote this path; run
# `wasmflow new` again or edit it after moving wasmflow). The library is imported as `wasmflow`.
wasmflow-sdk = {{ path = "{sdk}" }}
"""

FLOWS_HEADER = """\
# wasmflow flows: each flow is a module (a crate under agents/ that `wasmflow build` compiles) plus the
# events that start it and what it may use. Nothing is granted unless it is listed under `allow:`
# (deny by default). `wasmflow validate` checks this file; `wasmflow up` serves it; `wasmflow dev`
# serves it and rebuilds on every save.
state_dir: .wasmflow                      # the database, caches and pulled models
"""

GITIGNORE = "target/\nCargo.lock\n.wasmflow/\n"


class ScaffoldError(Exception):
    """`wasmflow new` cannot do what was asked; the message says what to do instead."""


@dataclass
class Created:
    """What `new` did: the files it wrote and the commands to run next."""

    project: Path
    new_project: bool
    template: Template
    files: list[Path] = field(default_factory=list)
    changed: list[Path] = field(default_factory=list)
    directories: list[Path] = field(default_factory=list)  # made by this call (taken back with the files)
    commands: list[str] = field(default_factory=list)


def check_name(name: str) -> str:
    """The name, if it can be a crate, a flow and a file name at once; ScaffoldError saying what is allowed."""
    if not isinstance(name, str) or len(name) > 40 or not _NAME.fullmatch(name):
        raise ScaffoldError(f"{name!r} is not a valid agent name: expected {NAME_RULE}")
    if name in RESERVED:
        raise ScaffoldError(f"{name!r} is reserved (a Rust keyword, a cargo or wasmflow name): pick another, "
                            f"{NAME_RULE}")
    return name


def _is_empty(directory: Path) -> bool:
    """Empty but for hidden entries (.git, an editor's files): a place for a new project."""
    return not any(not p.name.startswith(".") for p in directory.iterdir())


def new_agent(name: str, template_name: str, directory: Path) -> Created:
    """Create a project in `directory` (empty or missing) or add an agent to the project there."""
    check_name(name)
    template = TEMPLATES.get(template_name)
    if template is None:
        raise ScaffoldError(f"no template {template_name!r}: expected one of {', '.join(TEMPLATES)}")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ScaffoldError(f"{directory} is a file: name a directory")
    flows = directory / "flows.yaml"
    if flows.is_file():
        return _add_to_project(name, template, directory.resolve())
    if directory.exists() and not _is_empty(directory):
        raise ScaffoldError(f"{directory.resolve()} is not empty and has no flows.yaml: run `wasmflow new` in an "
                            "empty directory (a new project) or in a project's directory (adds an agent), "
                            "or pass --dir")
    directory.mkdir(parents=True, exist_ok=True)
    return _create_project(name, template, directory.resolve())


def _crate_files(name: str, template: Template, project: Path) -> dict[Path, str]:
    source = template.read("src/main.rs", name)
    fixture = template.read("fixture.json", name)
    if source is None or fixture is None:
        raise ScaffoldError(f"template {template.name!r} is incomplete in this installation ({template.directory}): "
                            "reinstall wasmflow")
    sdk = sdk_dir().resolve().as_posix()
    files = {
        project / "agents" / name / "Cargo.toml":
            CRATE_TOML.format(name=name, description=template.description.replace('"', "'"), sdk=sdk),
        project / "agents" / name / "src" / "main.rs": source,
        project / "fixtures" / f"{name}.json": fixture,
    }
    github = template.directory / "github"
    if template.github_fixtures and github.is_dir():  # answers to the GitHub calls of its fixture run
        for path in sorted(github.glob("*.json")):
            files[project / "fixtures" / "github" / path.name] = path.read_text().replace("__NAME__", name)
    return files


def _next_commands(name: str, template: Template) -> list[str]:
    return ["wasmflow build", template.run_command(name), "wasmflow dev"]


def _create_project(name: str, template: Template, project: Path) -> Created:
    entry = template.read("flow.yaml", name) or ""
    models = template.read("models.yaml", name)
    flows_text = FLOWS_HEADER
    if models:
        flows_text += "\n# Models for WASI-NN and the LLM host functions, loaded once per process.\nmodels:\n" + models
    flows_text += "\nflows:\n" + entry
    files = _crate_files(name, template, project)
    files[project / "flows.yaml"] = flows_text
    files[project / "Cargo.toml"] = WORKSPACE_TOML
    files[project / ".gitignore"] = GITIGNORE
    commands = _next_commands(name, template)
    files[project / "README.md"] = _readme(project.name, name, template, commands)
    created = Created(project, True, template, commands=commands)
    _write_all(files, created)
    _validate_or_undo(project / "flows.yaml", created, {})
    return created


def _add_to_project(name: str, template: Template, project: Path) -> Created:
    flows_path = project / "flows.yaml"
    try:
        existing = load_flows(flows_path)
    except FlowsError as exc:
        raise ScaffoldError(f"{flows_path} does not validate; fix it first:\n{exc}") from None
    if any(flow.name == name for flow in existing.file.flows):
        raise ScaffoldError(f"flows.yaml already has a flow named {name!r}: pick another name")
    if (project / "agents" / name).exists():
        raise ScaffoldError(f"{project / 'agents' / name} already exists: pick another name")
    cargo = project / "Cargo.toml"
    if not cargo.is_file() and (project / "guest-examples" / "Cargo.toml").is_file():
        raise ScaffoldError(f"{project} keeps its crates in the guest-examples/ workspace (wasmflow's own layout): "
                            "run `wasmflow new` in an empty directory for a project of your own, or copy "
                            "guest-examples/hello and add it to guest-examples/Cargo.toml")
    files = _crate_files(name, template, project)
    for path in files:
        if path.exists():
            raise ScaffoldError(f"{path} already exists: pick another name or move it away")
    if not cargo.is_file():
        files[cargo] = WORKSPACE_TOML
    elif '"agents/*"' not in cargo.read_text() and f'"agents/{name}"' not in cargo.read_text():
        raise ScaffoldError(f"{cargo} does not list agents/* in its workspace members: add "
                            f'"agents/*" to `members` (or "agents/{name}"), then run `wasmflow new` again')
    original = flows_path.read_text()
    text = _insert_flow(original, template.read("flow.yaml", name) or "")
    models = template.read("models.yaml", name)
    if models:
        text = _insert_models(text, models)
    created = Created(project, False, template, commands=_next_commands(name, template))
    _write_all(files, created)
    flows_path.write_text(text)
    created.changed.append(flows_path)
    _validate_or_undo(flows_path, created, {flows_path: original})
    return created


def _top_level(line: str) -> bool:
    return bool(line) and not line[0].isspace() and not line.startswith("#")


def _insert_flow(text: str, entry: str) -> str:
    """`entry` appended to the `flows:` list, before the next top-level key (or at the end)."""
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    start = next((i for i, line in enumerate(lines) if re.match(r"flows:\s*(#.*)?$", line.rstrip("\n"))), None)
    if start is None:
        if any(re.match(r"flows:", line) for line in lines):
            raise ScaffoldError("flows.yaml's `flows:` is not a block list (`flows:` on a line of its own, then "
                                "`  - name: ...` entries): add the flow by hand")
        return "".join(lines) + "\nflows:\n" + entry
    end = next((i for i in range(start + 1, len(lines)) if _top_level(lines[i])), len(lines))
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    return "".join(lines[:end] + ["\n", entry] + (["\n"] if end < len(lines) else []) + lines[end:])


def _insert_models(text: str, models: str) -> str:
    """`models` entries added under `models:` (created before `flows:` when there is none)."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if re.match(r"models:\s*(#.*)?$", line.rstrip("\n"))), None)
    if start is not None:
        return "".join(lines[: start + 1] + [models] + lines[start + 1:])
    flows = next((i for i, line in enumerate(lines) if line.startswith("flows:")), len(lines))
    block = ["# Models for WASI-NN and the LLM host functions, loaded once per process.\n", "models:\n", models, "\n"]
    return "".join(lines[:flows] + block + lines[flows:])


def _write_all(files: dict[Path, str], created: Created) -> None:
    for path, text in files.items():
        missing = [d for d in [path.parent, *path.parent.parents] if not d.exists()]
        created.directories.extend(missing)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        created.files.append(path)


def _validate_or_undo(flows_path: Path, created: Created, originals: dict[Path, str]) -> None:
    """Validate flows.yaml as written; if it fails, restore `originals` and delete the new files."""
    try:
        load_flows(flows_path)
    except FlowsError as exc:
        for path in created.files:
            path.unlink(missing_ok=True)
        for directory in sorted(set(created.directories), key=lambda d: len(d.parts), reverse=True):
            try:
                directory.rmdir()  # only directories this call made, deepest first, and only if empty
            except OSError:
                pass
        for path, text in originals.items():
            path.write_text(text)
        raise ScaffoldError(f"the new flow does not validate in {flows_path} (nothing was changed):\n{exc}") from None


def _readme(project: str, name: str, template: Template, commands: list[str]) -> str:
    needs = "".join(f"\nBefore running it you need {need}.\n" for need in template.needs)
    steps = "\n".join(commands)
    return f"""# {project}

wasmflow agents written in Rust. `agents/{name}` ({template.name} template: {template.description}) is
declared in `flows.yaml`, and `fixtures/{name}.json` is an event to try it with.
{needs}
```sh
{steps}
```

`wasmflow build` compiles every crate under `agents/` to WebAssembly; `wasmflow run` runs one flow once
on the fixture and prints its logs, output and status; `wasmflow dev` serves the flows (webhooks, HTTP
triggers at `/flows/NAME`, schedules) and rebuilds a crate whenever you save it. `wasmflow new OTHER
--template T` adds another agent (templates: {", ".join(TEMPLATES)}).
"""
