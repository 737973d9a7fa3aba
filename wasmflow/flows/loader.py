"""Reading flows.yaml: YAML to checked `FlowsFile`, with every problem reported as file:line: field.

Plain `yaml.safe_load` loses line numbers, silently keeps the last of two equal keys and reads the key
`on:` as the boolean True (YAML 1.1), so the file is composed into nodes and converted here instead:
keys stay text, duplicates are errors, and each path remembers its line so that pydantic's errors can be
pointed back at the line a person has to edit.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Mapping, Optional, Sequence, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from wasmflow.fields import FieldError, abbreviate

from .model import FlowsFile, Trigger

Path_ = tuple[Union[str, int], ...]

MAX_NODES = 100_000  # aliases can expand a small file enormously ("billion laughs")
MAX_DEPTH = 64  # mappings and lists inside each other, aliases expanded; no real file comes close
MAX_FILE_BYTES = 1024**2
MAX_PROBLEMS = 50  # reported at once; a file with thousands of bad keys gets a summary line, not a flood
MAX_MESSAGE_CHARS = 500
INT_RANGE = (-(2**63), 2**64 - 1)  # what a guest's JSON parser (serde: i64 / u64) and the database hold
_MERGE = "tag:yaml.org,2002:merge"
_STR = "tag:yaml.org,2002:str"
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_JSON_SCALAR_TAGS = {f"tag:yaml.org,2002:{name}" for name in ("int", "float", "bool", "null")}
_COLLECTION_TAGS = {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"}
_VAR_REF = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FIELD_NAME = re.compile(r"[A-Za-z0-9_*/-]{1,64}")  # shown as is in a field path; longer or odd names quoted
_SURROGATE = re.compile(r"[\ud800-\udfff]")


class FlowsError(Exception):
    """flows.yaml is unusable. `file`, `line` and `field` locate the first problem; `problems` has all.

    One report lists every problem found, so a person fixes the file in one pass instead of one error per
    run. `line` is None for problems of the file as a whole (missing, unreadable).
    """

    def __init__(self, file: Path, line: Optional[int], field: Optional[str], message: str,
                 problems: Sequence["FlowsError"] = ()) -> None:
        if len(message) > MAX_MESSAGE_CHARS:  # a hostile value quoted in a message is not echoed whole
            message = message[:MAX_MESSAGE_CHARS] + "..."
        self.file, self.line, self.field, self.message = Path(file), line, field, message
        self.problems: tuple[FlowsError, ...] = tuple(problems) or (self,)
        super().__init__(str(self))

    @classmethod
    def of(cls, problems: Sequence["FlowsError"], total: Optional[int] = None) -> "FlowsError":
        """One error for several problems, first (by line) in front; past MAX_PROBLEMS (or when `total`
        says more were found than given) a last line says how many more there are."""
        ordered = sorted(problems, key=lambda p: (p.line is None, p.line or 0))
        first = ordered[0]
        more = max(len(ordered), total or 0) - MAX_PROBLEMS
        if more > 0:
            ordered = ordered[:MAX_PROBLEMS] + [cls(first.file, None, None, f"{more} more problems not shown; "
                                                                          "fix these and run again")]
        return cls(first.file, first.line, first.field, first.message, ordered)

    def location(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else str(self.file)
        return f"{where}: {self.field}" if self.field else where

    def __str__(self) -> str:
        return "\n".join(f"{p.location()}: {p.message}" for p in self.problems)


@dataclass(frozen=True)
class LoadedFlows:
    """A validated flows.yaml and where it lives: relative paths in it are relative to its directory."""

    file: FlowsFile
    path: Path  # absolute

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    @property
    def state_dir(self) -> Path:
        return self.resolve(self.file.state_dir)

    def resolve(self, path: str) -> Path:
        """A path written in the file (`module:`, `state_dir:`, a model's `path:`) as an absolute path."""
        return self.base_dir / path


def load_flows(path: Path, env: Optional[Mapping[str, str]] = None) -> LoadedFlows:
    """Read, substitute `${VAR}` from `env` (default: the process environment) and validate."""
    path = Path(path)
    text = _read(path)
    root = _compose(path, text)
    reader = _Reader(path, os.environ if env is None else env)
    data = reader.convert(root, ())
    if reader.problems:
        raise FlowsError.of([_problem(path, at, line, message, data)
                             for at, line, message in reader.problems[:MAX_PROBLEMS]], len(reader.problems))
    if not isinstance(data, dict):
        raise FlowsError(path, reader.lines.get((), 1), None,
                         f"expected a mapping at the top level (flows:, models:, github:), got {_describe(data)}")
    try:
        flows = FlowsFile.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        found = _dedupe([_from_pydantic(path, err, data, reader.lines) for err in errors[:MAX_PROBLEMS]])
        raise FlowsError.of(found, len(found) + len(errors) - MAX_PROBLEMS) from None
    flows = _with_stored_github(path, flows, reader.lines.get(("github",)))
    return LoadedFlows(flows, path.resolve())


def _with_stored_github(path: Path, flows: FlowsFile, line: Optional[int]) -> FlowsFile:
    """The `github:` section completed from the App that `wasmflow github register` stored, if any."""
    from .github_credentials import CredentialsError, fill_github, load_app

    base_dir = path.resolve().parent
    try:
        stored = load_app(base_dir / flows.state_dir)
    except CredentialsError as exc:
        raise FlowsError(path, line, "github", f"the stored GitHub App: {exc}") from None
    github = fill_github(flows.github, stored, base_dir)
    return flows if github is flows.github else flows.model_copy(update={"github": github})


def _read(path: Path) -> str:
    hint = "pass the path of your flows.yaml, or set $WASMFLOW_FLOWS"
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise FlowsError(path, None, None, f"file not found ({hint})") from None
    except IsADirectoryError:
        raise FlowsError(path, None, None, f"is a directory, not a flows.yaml file ({hint})") from None
    except OSError as exc:
        raise FlowsError(path, None, None, f"cannot read the file: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise FlowsError(path, None, None, f"the file is larger than {MAX_FILE_BYTES // 1024**2} MiB; a flows.yaml "
                         "is a few kilobytes (keep large data such as prompts in files the guest is given)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise FlowsError(path, line, None, "not UTF-8 text; save the file as UTF-8") from None


# libyaml when PyYAML has it (the usual case): several times faster than the pure-Python parser.
_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _TooDeep(Exception):
    def __init__(self, line: int) -> None:
        self.line = line


def _check_depth(text: str) -> None:
    """Refuse nesting past MAX_DEPTH before composing: the composer recurses once per level, and 50,000
    `[` on one line used to end in a RecursionError. The parser's events come without recursion."""
    depth = 0
    for event in yaml.parse(text, Loader=_YAML_LOADER):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise _TooDeep(event.start_mark.line + 1)
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _too_deep(path: Path, line: int) -> FlowsError:
    return FlowsError(path, line, None, f"nested more than {MAX_DEPTH} levels deep (mappings and lists, aliases "
                      "expanded); flatten the structure")


def _compose(path: Path, text: str) -> Node:
    try:
        _check_depth(text)
        root = yaml.compose(text, Loader=_YAML_LOADER)
    except _TooDeep as exc:
        raise _too_deep(path, exc.line) from None
    except yaml.reader.ReaderError as exc:  # a control character: it has a position, not a mark
        line = text[: exc.position].count("\n") + 1
        char = f"U+{exc.character:04X}" if isinstance(exc.character, int) else repr(exc.character)
        raise FlowsError(path, line, None, f"invalid YAML: character {char} is not allowed ({exc.reason}); "
                         "remove it, or write it as an escape such as \\x01 in a double-quoted string") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        if "nesting depth" in str(exc.problem):  # libyaml's own limit, hit before ours on one long line
            raise _too_deep(path, mark.line + 1 if mark else 1) from None
        message = f"invalid YAML: {exc.problem or exc.context}"
        if exc.context and exc.context_mark and exc.problem:  # "while scanning ... at line 3, found ..."
            message = f"invalid YAML: {exc.context} at line {exc.context_mark.line + 1}, {exc.problem}"
        raise FlowsError(path, mark.line + 1 if mark else None, None, message) from None
    except yaml.YAMLError as exc:
        raise FlowsError(path, None, None, f"invalid YAML: {exc}") from None
    if root is None:
        raise FlowsError(path, 1, None, "the file is empty; expected a mapping with at least `flows:`")
    return root


_NOT_UNICODE = "not valid Unicode: a lone surrogate escape such as \\ud800; write the character itself"


class _Reader:
    """Nodes to plain Python, recording the line of every path and collecting problems as it goes."""

    def __init__(self, file: Path, env: Mapping[str, str]) -> None:
        self.file, self.env = file, env
        self.lines: dict[Path_, int] = {}
        self.problems: list[tuple[Path_, int, str]] = []
        self.constructor = yaml.constructor.SafeConstructor()
        self.active: set[int] = set()  # nodes being converted, to refuse recursive aliases
        self.count = 0

    def problem(self, path: Path_, line: int, message: str) -> None:
        self.problems.append((path, line, message))

    def written_line(self, path: Path_, node: Node) -> int:
        """Where `path` is written: the latest line along it. An alias's node starts back at its anchor,
        but the alias itself comes later, so the latest line is the one a person has to look at."""
        return max([node.start_mark.line + 1] + [self.lines.get(path[:n], 0) for n in range(len(path) + 1)])

    def convert(self, node: Node, path: Path_) -> Any:
        line = node.start_mark.line + 1
        self.lines.setdefault(path, line)
        self.count += 1
        if self.count > MAX_NODES:
            raise FlowsError(self.file, self.written_line(path, node), None,
                             f"more than {MAX_NODES} values; is an alias (*name) expanding too much?")
        if not isinstance(node, ScalarNode) and len(path) >= MAX_DEPTH:  # aliases can nest past the composer's check
            raise _too_deep(self.file, self.written_line(path, node))
        if id(node) in self.active:
            self.problem(path, line, "an alias refers to a value that contains it")
            return None
        if isinstance(node, ScalarNode):
            return self.scalar(node, path)
        if node.tag not in _COLLECTION_TAGS:
            self.problem(path, line, f"unsupported YAML tag {node.tag!r}; remove it")
            return None
        self.active.add(id(node))
        try:
            if isinstance(node, SequenceNode):
                return [self.convert(item, path + (i,)) for i, item in enumerate(node.value)]
            out = {}
            for key, (line, value) in self.entries(node, path, line).items():
                self.lines[path + (key,)] = line
                out[key] = self.convert(value, path + (key,))
            return out
        finally:
            self.active.discard(id(node))

    def entries(self, node: MappingNode, path: Path_, origin: int, chain: int = 0) -> dict[str, tuple[int, Node]]:
        """Key text -> (key line, value node), with `<<: *anchor` merges applied (explicit keys win) and
        duplicate keys refused. `origin` is the line of the mapping that started a chain of merges."""
        if chain > MAX_DEPTH:
            raise FlowsError(self.file, origin, None, f"more than {MAX_DEPTH} merges (<<: *name) in a chain; "
                             "merge fewer mappings into each other")
        explicit: dict[str, tuple[int, Node]] = {}
        merged: dict[str, tuple[int, Node]] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == _MERGE:
                sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
                for source in sources:
                    if not isinstance(source, MappingNode) or id(source) in self.active:
                        self.problem(path, line, "<< must merge a mapping, as in <<: *defaults")
                        continue
                    self.count += 1 + len(source.value)  # merges can multiply work as aliases can
                    if self.count > MAX_NODES:
                        raise FlowsError(self.file, origin, None, f"more than {MAX_NODES} values; is a merge "
                                         "(<<: *name) expanding too much?")
                    self.active.add(id(source))
                    try:
                        for key, entry in self.entries(source, path, origin, chain + 1).items():
                            merged.setdefault(key, entry)
                    finally:
                        self.active.discard(id(source))
                continue
            if not isinstance(key_node, ScalarNode):
                self.problem(path, line, "a key must be plain text, not a list or mapping")
                continue
            key = key_node.value
            if _SURROGATE.search(key):
                self.problem(path, line, _NOT_UNICODE)
                continue
            if key in explicit:
                self.problem(path + (key,), line, f"duplicate key {key!r} (first at line {explicit[key][0]}); "
                             "YAML would silently keep only the last one, so remove one of them")
                continue
            explicit[key] = (line, value_node)
        return {**merged, **explicit}

    def scalar(self, node: ScalarNode, path: Path_) -> Any:
        # Timestamps stay text: the schema has no dates, and config values must stay JSON-able for guests.
        if node.tag in (_STR, _TIMESTAMP):
            value: Any = node.value
        elif node.tag not in _JSON_SCALAR_TAGS:  # !!binary, !!python/..., !custom: nothing but JSON's types
            self.problem(path, node.start_mark.line + 1, f"unsupported YAML tag {abbreviate(node.tag)}; remove it")
            return None
        else:
            line = node.start_mark.line + 1
            try:
                value = self.constructor.construct_object(node)
            except yaml.YAMLError as exc:
                self.problem(path, line, f"invalid value: {getattr(exc, 'problem', exc)}")
                return None
            except ValueError:  # an integer of thousands of digits (Python refuses to convert it)
                self.problem(path, line, f"{abbreviate(node.value)} is not a usable number: an integer from "
                             f"{INT_RANGE[0]} to {INT_RANGE[1]} (the 64-bit range) is expected")
                return None
            if not isinstance(value, (str, int, float, bool, type(None))):  # !!binary and the like
                self.problem(path, line, f"unsupported YAML tag {abbreviate(node.tag)}; remove it")
                return None
            if isinstance(value, float) and not math.isfinite(value):
                self.problem(path, line, f"{abbreviate(node.value)} is not a finite number; write a number "
                             "(infinity and NaN are not allowed anywhere in the file)")
                return None
            if isinstance(value, int) and not isinstance(value, bool) and not INT_RANGE[0] <= value <= INT_RANGE[1]:
                self.problem(path, line, f"{abbreviate(node.value)} is too large: an integer from {INT_RANGE[0]} to "
                             f"{INT_RANGE[1]} (the 64-bit range) is expected")
                return None
        if isinstance(value, str) and _SURROGATE.search(value):
            self.problem(path, node.start_mark.line + 1, _NOT_UNICODE)
            return None
        return self.substitute(value, node, path) if isinstance(value, str) else value

    def substitute(self, text: str, node: ScalarNode, path: Path_) -> str:
        """`${VAR}` and `${VAR:-default}` (default when unset or empty) from env; `$${` is a literal `${`."""
        if "${" not in text:
            return text

        def line_of(offset: int) -> int:
            line = node.start_mark.line + 1
            if node.style == "|":  # a literal block keeps its newlines: find the line of the reference
                line += 1 + text.count("\n", 0, offset)
            return line

        def replace(match: re.Match[str]) -> str:
            token, inner = match.group(0), match.group(1)
            if token == "$${":
                return "${"
            name, sep, default = (inner or "").partition(":-")
            if inner is None or not _VAR_NAME.fullmatch(name):
                shown = token if inner is not None else text[match.start():match.start() + 20]
                self.problem(path, line_of(match.start()),
                             f"invalid variable reference {shown!r}: expected ${{NAME}} or ${{NAME:-default}} "
                             "(write $${ for a literal ${)")
                return token
            value = self.env.get(name)
            if value is None or (sep and value == ""):
                if sep:
                    return default
                self.problem(path, line_of(match.start()),
                             f"environment variable {name} is not set (set it, or write ${{{name}:-default}})")
                return ""
            return value

        return _VAR_REF.sub(replace, text)


def _field(path: Path_, data: Any) -> Optional[str]:
    """`flows[code-review].limits.memory`: flows by name when they have one, other lists by index."""
    out = ""
    cur = data
    for i, step in enumerate(path):
        name = None
        if i == 1 and path[0] == "flows" and isinstance(cur, list) and isinstance(step, int) and step < len(cur):
            entry = cur[step]
            name = entry.get("name") if isinstance(entry, dict) else None
        if isinstance(step, int):
            usable = isinstance(name, str) and 0 < len(name) <= 64 and name.isprintable()
            out += f"[{name}]" if usable else f"[{step}]"
        elif _FIELD_NAME.fullmatch(step):
            out += f".{step}" if out else step
        else:
            out += f"[{abbreviate(step)}]"
        if isinstance(cur, dict):
            cur = cur.get(step)
        elif isinstance(cur, list) and isinstance(step, int) and step < len(cur):
            cur = cur[step]
        else:
            cur = None
    return out or None


def _problem(file: Path, path: Path_, line: int, message: str, data: Any) -> FlowsError:
    return FlowsError(file, line, _field(path, data), message)


def _in_data(loc: Path_, data: Any) -> Path_:
    """The longest prefix of a pydantic loc that exists in the input (the rest is pydantic's own tags)."""
    cur, found = data, 0
    for step in loc:
        if isinstance(cur, dict) and isinstance(step, str) and step in cur:
            cur = cur[step]
        elif isinstance(cur, list) and isinstance(step, int) and 0 <= step < len(cur):
            cur = cur[step]
        else:
            break
        found += 1
    return loc[:found]


def _from_pydantic(file: Path, err: Mapping[str, Any], data: Any, lines: Mapping[Path_, int]) -> FlowsError:
    loc: Path_ = tuple(err["loc"])
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        loc += cause.loc
    at = _in_data(loc, data)
    line = next((lines[at[:n]] for n in range(len(at), -1, -1) if at[:n] in lines), None)
    kind = err["type"]
    field_path = at
    if kind == "missing" and len(loc) > len(at):
        field_path = at + (loc[len(at)],)
        message = f"missing required key {loc[len(at)]!r}"
    elif kind == "extra_forbidden":
        message = _unknown_key(at)
    elif cause is not None:
        message = str(cause)
    else:
        message = _friendly(err)
        if kind == "model_type" and _model_at(at) is Trigger:
            message += " (a trigger is one of: github: {events: [...]}, schedule: {cron: ...}, http)"
    return FlowsError(file, line, _field(field_path, data), message)


def _unknown_key(loc: Path_) -> str:
    key = str(loc[-1])
    model = _model_at(loc[:-1])
    if model is None:
        return f"unknown key {key!r}"
    allowed = list(model.model_fields)
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    hint = f", did you mean {close[0]!r}?" if close else ""
    return f"unknown key {key!r}{hint} (expected one of: {', '.join(allowed)})"


def _model_at(loc: Path_) -> Optional[type[BaseModel]]:
    """The schema model that validates the value at `loc`, found by walking the annotations."""
    tp: Any = FlowsFile
    for step in loc:
        tp = _unwrap(tp)
        origin = get_origin(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel) and isinstance(step, str):
            field = tp.model_fields.get(step)
            if field is None:
                return None
            tp = field.annotation
        elif origin is list and isinstance(step, int):
            tp = get_args(tp)[0]
        elif origin is dict:
            tp = get_args(tp)[1]
        else:
            return None
    tp = _unwrap(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _unwrap(tp: Any) -> Any:
    """Annotated[X, ...] -> X; Optional[X] -> X (a schema union of one model and None)."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            rest = [a for a in get_args(tp) if a is not type(None)]
            if len(rest) != 1:
                return tp
            tp = rest[0]
        else:
            return tp


def _friendly(err: Mapping[str, Any]) -> str:
    """Pydantic's message in the file's terms: what was expected and what was found."""
    msg: str = err["msg"]
    got = _describe(err.get("input"))
    if err["type"] in ("model_type", "dict_type", "model_attributes_type"):
        return f"expected a mapping (key: value), got {got}"
    if err["type"] == "list_type":
        return f"expected a list, got {got}"
    if msg.startswith("Input should be "):
        return f"expected {msg[len('Input should be '):]}, got {got}"
    if msg.startswith("Value error, "):
        return msg[len("Value error, "):]
    return msg[:1].lower() + msg[1:]


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing (an empty value)"
    return abbreviate(value)


def _dedupe(problems: list[FlowsError]) -> list[FlowsError]:
    seen: set[tuple[Optional[int], Optional[str], str]] = set()
    out = []
    for p in problems:
        key = (p.line, p.field, p.message)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out
