"""Class 10: hostile flows.yaml files get a clear file:line error, quickly and in bounded memory.

Each case is a file an attacker (or a careless edit) could hand to `wasmflow validate` / `wasmflow up`:
values that used to pass validation and crash at run time (infinite, NaN, negative or absurd numbers),
unknown GitHub permissions, and inputs that used to end in a traceback (deep nesting, huge integers)
or could exhaust memory (alias expansion, a huge file). Every numeric setting has a range, and the
message says what it is.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from hostile_support import PeakRss
from wasmflow.flows import FlowsError, load_flows
from wasmflow.flows.cli_commands import validate_command
from wasmflow.flows.model import Flow
from wasmflow.host_functions.github import GITHUB_PERMISSIONS

BASE = "flows:\n  - name: hello\n    module: hello.wasm\n"  # what follows is on line 4
F = "flows[hello]"


def deep_block(levels: int) -> str:
    return "a:\n" + "".join("  " * (i + 1) + "b:\n" for i in range(levels))


def alias_chain(n: int) -> str:
    """Each anchor a list holding the one before: shallow in the file, `n` deep once expanded."""
    lines = ["x0: &x0 [1]"] + [f"x{i}: &x{i} [*x{i - 1}]" for i in range(1, n)]
    return "\n".join(lines) + "\nflows: []\n"


def merge_chain(n: int) -> str:
    lines = ["m0: &m0 {k0: 1}"] + [f"m{i}: &m{i} {{<<: *m{i - 1}, k{i}: 1}}" for i in range(1, n)]
    return "\n".join(lines) + "\nflows: []\n"


def merge_bomb(keys: int, merges: int) -> str:
    """One wide mapping merged into another many times over: few values, a lot of work."""
    wide = ", ".join(f"k{i}: 1" for i in range(keys))
    return f"w: &w {{{wide}}}\nbomb: {{<<: [{', '.join(['*w'] * merges)}]}}\nflows: []\n"


LAUGHS = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else ', '.join(['lol'] * 9)}]\n"
                 for i in range(9)) + "flows: []\n"

# (id, file text, line, field (None: the file as a whole at that line), words the message must contain)
CASES = [
    ("timeout-overflow", BASE + "    limits: {timeout: 1.0e+400}\n", 4, f"{F}.limits.timeout", ["finite"]),
    ("timeout-nan", BASE + "    limits: {timeout: .nan}\n", 4, f"{F}.limits.timeout", ["finite"]),
    ("timeout-inf", BASE + "    limits: {timeout: .inf}\n", 4, f"{F}.limits.timeout", ["finite"]),
    ("timeout-negative", BASE + "    limits: {timeout: -5}\n", 4, f"{F}.limits.timeout", ["negative"]),
    ("timeout-negative-text", BASE + "    limits: {timeout: -5s}\n", 4, f"{F}.limits.timeout", ["negative"]),
    ("timeout-zero", BASE + "    limits: {timeout: 0s}\n", 4, f"{F}.limits.timeout", ["1ms", "1d"]),
    ("timeout-long", BASE + "    limits: {timeout: 2d}\n", 4, f"{F}.limits.timeout", ["1ms", "1d"]),
    ("timeout-absurd", BASE + "    limits: {timeout: 1000d}\n", 4, f"{F}.limits.timeout", ["366d"]),
    ("timeout-digits", BASE + "    limits: {timeout: " + "9" * 5000 + "s}\n", 4, f"{F}.limits.timeout", ["finite"]),
    ("memory-small", BASE + "    limits: {memory: 1KiB}\n", 4, f"{F}.limits.memory", ["64KiB", "4GiB"]),
    ("memory-large", BASE + "    limits: {memory: 5GiB}\n", 4, f"{F}.limits.memory", ["64KiB", "4GiB"]),
    ("memory-digits", BASE + "    limits: {memory: " + "9" * 400 + "GiB}\n", 4, f"{F}.limits.memory", ["1TiB"]),
    ("memory-negative", BASE + "    limits: {memory: -5}\n", 4, f"{F}.limits.memory", ["negative"]),
    ("memory-float", BASE + "    limits: {memory: 1.0e+300}\n", 4, f"{F}.limits.memory", ["1TiB"]),
    ("output-large", BASE + "    limits: {output: 100GiB}\n", 4, f"{F}.limits.output", ["64MiB"]),
    ("table-zero", BASE + "    limits: {table_elements: 0}\n", 4, f"{F}.limits.table_elements", ["1"]),
    ("table-huge", BASE + "    limits: {table_elements: 1000000000000}\n", 4, f"{F}.limits.table_elements",
     ["10000000"]),
    ("integer-digits", BASE + "    limits: {table_elements: " + "9" * 5000 + "}\n", 4, f"{F}.limits.table_elements",
     ["integer"]),
    ("attempts-zero", BASE + "    retry: {attempts: 0}\n", 4, f"{F}.retry.attempts", ["1", "100"]),
    ("attempts-huge", BASE + "    retry: {attempts: 100000}\n", 4, f"{F}.retry.attempts", ["1", "100"]),
    ("retry-initial", BASE + "    retry: {initial: 2h}\n", 4, f"{F}.retry.initial", ["0s", "1h"]),
    ("retry-initial-huge", BASE + "    retry: {initial: 1.0e+300}\n", 4, f"{F}.retry.initial", ["366d"]),
    ("retry-max", BASE + "    retry: {max: .inf}\n", 4, f"{F}.retry.max", ["finite"]),
    ("retry-order", BASE + "    retry: {initial: 10m, max: 1m}\n", 4, f"{F}.retry.initial", ["retry.max"]),
    ("llm-timeout", BASE + "    llm: {chat: {model: m, base_url: 'https://x', timeout: 1.0e+999}}\n", 4,
     f"{F}.llm.chat.timeout", ["finite"]),
    ("llm-temperature", BASE + "    llm: {chat: {model: m, base_url: 'https://x', options: {temperature: 9}}}\n", 4,
     f"{F}.llm.chat.options.temperature", ["0", "2"]),
    ("llm-max-tokens", BASE + "    llm: {chat: {model: m, base_url: 'https://x', options: {max_tokens: 0}}}\n", 4,
     f"{F}.llm.chat.options.max_tokens", ["1"]),
    ("llm-option-type", BASE + "    llm: {chat: {model: m, base_url: 'https://x', options: {top_p: high}}}\n", 4,
     f"{F}.llm.chat.options.top_p", ["number"]),
    ("model-ctx", "models:\n  m: {backend: ggml, path: m.gguf, options: {ctx-size: 1.0e+12}}\nflows: []\n", 2,
     "models.m.options.ctx-size", ["integer"]),
    ("model-threads", "models:\n  m: {backend: onnx, path: m.onnx, options: {threads: 100000}}\nflows: []\n", 2,
     "models.m.options.threads", ["1024"]),
    ("model-parallel", "models:\n  m: {backend: ggml, path: m.gguf, options: {parallel: 0}}\nflows: []\n", 2,
     "models.m.options.parallel", ["1", "64"]),
    ("min-write-interval", "github: {app_id: 1, private_key: k, webhook_secret: s, min_write_interval: .nan}\n"
     "flows: []\n", 1, "github.min_write_interval", ["finite"]),
    ("app-id", "github: {app_id: 10000000000000000000, private_key: k, webhook_secret: s}\nflows: []\n", 1,
     "github.app_id", ["9223372036854775807"]),
    ("config-nan", BASE + "    config: {x: .nan}\n", 4, f"{F}.config.x", ["finite"]),
    ("config-inf", BASE + "    config: {x: [1, 1.0e+400]}\n", 4, f"{F}.config.x[1]", ["finite"]),
    ("config-bigint", BASE + "    config: {x: 123456789012345678901234567890}\n", 4, f"{F}.config.x",
     ["integer", "64-bit"]),
    ("github-permission", BASE + "    allow: {github: {pull_request: write}}\n", 4,
     f"{F}.allow.github.pull_request", ["did you mean 'pull_requests'"]),
    ("github-endpoint-name", BASE + "    allow: {github: {pulls: read}}\n", 4, f"{F}.allow.github.pulls",
     ["GitHub App permission"]),
    ("github-level", BASE + "    allow: {github: {contents: admin}}\n", 4, f"{F}.allow.github.contents",
     ["read", "write"]),
    ("cron-long", BASE + "    on: [{schedule: {cron: '" + "1," * 5000 + "1 * * * *'}}]\n", 4,
     f"{F}.on[0].schedule.cron", ["200"]),
    ("deep-block", deep_block(200), 65, None, ["nested", "64"]),
    ("deep-flow-lists", BASE + "    config: {x: " + "[" * 50000 + "]" * 50000 + "}\n", 4, None, ["nested", "64"]),
    ("deep-flow-maps", "x: " + "{a: " * 50000 + "1" + "}" * 50000 + "\n", 1, None, ["nested", "64"]),
    ("deep-config", BASE + "    config:\n      x: " + "[" * 80 + "]" * 80 + "\n", 5, None, ["nested", "64"]),
    ("alias-chain", alias_chain(3000), 64, None, ["nested", "64"]),
    ("merge-chain", merge_chain(3000), 66, None, ["<<", "64"]),
    ("billion-laughs", LAUGHS, 6, None, ["values", "alias"]),
    ("merge-bomb", merge_bomb(5000, 20000), 2, None, ["values", "merge"]),
    ("python-object", BASE + "    config: {x: !!python/object/apply:os.system [echo pwned]}\n", 4, f"{F}.config.x",
     ["unsupported YAML tag"]),
    ("python-name", BASE + "    config: {x: !!python/name:os.system ''}\n", 4, f"{F}.config.x",
     ["unsupported YAML tag"]),
    ("binary", BASE + "    config: {x: !!binary aGVsbG8=}\n", 4, f"{F}.config.x", ["unsupported YAML tag"]),
    ("set", BASE + "    config: !!set {a, b}\n", 4, f"{F}.config", ["unsupported YAML tag"]),
    ("complex-key", BASE + "    config:\n      ? [1, 2]\n      : b\n", 5, f"{F}.config", ["plain text"]),
    ("control-character", BASE + "    config: {x: \"a\x01b\"}\n", 4, None, ["invalid YAML"]),
    ("long-name", "flows:\n  - name: " + "N" * 200_000 + "\n    module: x.wasm\n", 2, "flows[0].name",
     ["expected a name"]),
    ("long-variable", BASE + "    config: {x: '${" + "A" * 100_000 + "}'}\n", 4, f"{F}.config.x",
     ["environment variable"]),
    ("lone-surrogate", BASE + '    config: {x: "\\ud800"}\n', 4, None, ["invalid"]),
    ("long-value", BASE + "    limits: {timeout: '" + "x" * 100_000 + "'}\n", 4, f"{F}.limits.timeout",
     ["duration"]),
]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "flows.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def problem_at(error: FlowsError, line: int, field: str | None) -> FlowsError:
    for p in error.problems:
        if p.line == line and p.field == field:
            return p
    raise AssertionError(f"no problem at line {line} for {field!r}; got: {error}")


@pytest.mark.parametrize("text, line, field, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_file_gives_a_located_error(tmp_path: Path, text: str, line: int, field: str | None,
                                            words: list[str]) -> None:
    path = write(tmp_path, text)
    started = time.monotonic()
    with PeakRss() as rss, pytest.raises(FlowsError) as info:
        load_flows(path, env={})
    assert time.monotonic() - started < 5
    assert rss.grew_mib < 100
    found = problem_at(info.value, line, field)
    for word in words:
        assert word in found.message, (word, found.message)
    assert len(str(found)) < 600 + len(str(path))  # a huge input is not echoed back whole

    result = CliRunner().invoke(validate_command, [str(path)], env={"COLUMNS": "200"})
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, result.output
    assert f"{path}:{line}:" in result.stderr
    assert "Traceback" not in result.output


def test_thousands_of_problems_are_summed_up_not_flooded(tmp_path: Path) -> None:
    path = write(tmp_path, "flows: []\n" + "".join(f"k{i}: 1\n" for i in range(60_000)))
    started = time.monotonic()
    with pytest.raises(FlowsError) as info:
        load_flows(path, env={})
    assert time.monotonic() - started < 5
    problems = info.value.problems
    assert len(problems) == 51 and problems[0].line == 2
    assert problems[-1].line is None and "59950 more problems not shown" in problems[-1].message


@pytest.mark.parametrize("case", ["deep-block", "deep-flow-lists", "deep-flow-maps", "alias-chain",
                                  "control-character", "billion-laughs"])
def test_the_pure_python_parser_is_bounded_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    """Without libyaml PyYAML parses in Python, whose composer recurses: the same limits hold."""
    import yaml

    from wasmflow.flows import loader

    monkeypatch.setattr(loader, "_YAML_LOADER", yaml.SafeLoader)
    text, line = next((c[1], c[2]) for c in CASES if c[0] == case)
    with pytest.raises(FlowsError) as info:
        load_flows(write(tmp_path, text), env={})
    assert info.value.line == line


def test_a_lone_surrogate_is_refused_by_the_pure_python_parser_too(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    from wasmflow.flows import loader

    monkeypatch.setattr(loader, "_YAML_LOADER", yaml.SafeLoader)
    path = write(tmp_path, BASE + '    config: {x: "\\ud800", "\\udc00": 1}\n')
    with pytest.raises(FlowsError) as info:
        load_flows(path, env={})
    assert [(p.line, "Unicode" in p.message) for p in info.value.problems] == [(4, True), (4, True)]


def test_a_file_over_the_size_limit_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    path = write(tmp_path, "flows: []\n# " + "x" * (8 * 1024 * 1024) + "\n")
    started = time.monotonic()
    with PeakRss() as rss, pytest.raises(FlowsError) as info:
        load_flows(path, env={})
    assert time.monotonic() - started < 1 and rss.grew_mib < 30
    assert info.value.line is None and "1 MiB" in info.value.message


@pytest.mark.parametrize("text", ["limits: {timeout: 24h, memory: 4GiB, output: 64MiB, table_elements: 10000000}",
                                  "limits: {timeout: 1ms, memory: 64KiB, output: 0, table_elements: 1}",
                                  "retry: {attempts: 100, initial: 1h, max: 24h}",
                                  "config: {x: [[[[1.5, -3, 18446744073709551615, -9223372036854775808]]]]}",
                                  "allow: {github: {workflows: write, organization_administration: read, "
                                  "secret_scanning_alerts: read, metadata: read}}"])
def test_values_at_the_edges_of_the_ranges_are_accepted(tmp_path: Path, text: str) -> None:
    load_flows(write(tmp_path, BASE + "    " + text + "\n"), env={})


def test_every_permission_the_github_host_maps_is_a_github_permission() -> None:
    from wasmflow.host_functions.github import FAMILIES, PERMISSIONS

    assert set(PERMISSIONS) | set(FAMILIES.values()) <= GITHUB_PERMISSIONS


def test_models_built_in_python_are_range_checked_too() -> None:
    with pytest.raises(ValueError, match="finite"):
        Flow(name="x", module="x.wasm", limits={"timeout": float("inf")})
    with pytest.raises(ValueError, match="4GiB"):
        Flow(name="x", module="x.wasm", limits={"memory": 2**40})


@pytest.mark.parametrize("case", ["deep-block", "deep-flow-lists", "billion-laughs", "integer-digits"])
def test_the_real_command_prints_no_traceback(tmp_path: Path, case: str) -> None:
    text, line = next((c[1], c[2]) for c in CASES if c[0] == case)
    path = write(tmp_path, text)
    cli = Path(sys.executable).with_name("wasmflow")
    proc = subprocess.run([str(cli), "validate", str(path)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert f"{path}:{line}:" in proc.stderr
