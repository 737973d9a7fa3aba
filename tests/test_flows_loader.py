"""flows.yaml loading: real files in tmp_path, every error located by file, line and field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from wasmflow.flows import FlowsError, LoadedFlows, load_flows
from wasmflow.flows.cli_commands import validate_command

FULL = """\
models:
  default: {backend: ggml, path: models/review.gguf, target: auto, options: {ctx-size: 8192}}
github:
  app_id: ${GITHUB_APP_ID}
  private_key: ${GITHUB_APP_PRIVATE_KEY_FILE}
  webhook_secret: ${GITHUB_WEBHOOK_SECRET}
flows:
  - name: code-review
    module: guest-examples/code-review
    on:
      - github: {events: [pull_request.opened, pull_request.synchronize, issue_comment.created], repos: ["*/*"]}
    allow:
      models: [default]
      http: ["https://api.openai.com"]
      github: {pull_requests: write, issues: write, contents: read}
    config: {trigger_phrase: "/review", max_patch_tokens: 24000}
    secrets: [OPENAI_API_KEY]
    limits: {timeout: 300s, memory: 512MiB}
    retry: {attempts: 5, backoff: exponential}
  - name: weekly-digest
    module: guest-examples/digest
    on:
      - schedule: {cron: "0 9 * * MON", timezone: Europe/Berlin, overlap: skip, catch_up: 1h}
"""
ENV = {"GITHUB_APP_ID": "1234", "GITHUB_APP_PRIVATE_KEY_FILE": "app.pem", "GITHUB_WEBHOOK_SECRET": "s3cret"}


def write(tmp_path: Path, text: str, name: str = "flows.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def line_of(path: Path, needle: str, occurrence: int = 1) -> int:
    """1-based line of the n-th line containing `needle`, so tests do not hard-code line numbers."""
    hits = [n for n, line in enumerate(path.read_text().splitlines(), 1) if needle in line]
    return hits[occurrence - 1]


def load_error(path: Path, env: dict[str, str] | None = None) -> FlowsError:
    with pytest.raises(FlowsError) as info:
        load_flows(path, env=ENV if env is None else env)
    return info.value


def problem(error: FlowsError, field: str) -> FlowsError:
    """The problem reported for `field`; fails listing what was reported instead."""
    for p in error.problems:
        if p.field == field:
            return p
    raise AssertionError(f"no problem for {field!r}; got: {error}")


def flow_yaml(body: str, name: str = "hello") -> str:
    """A minimal valid file with `body` (already indented by 4) added to its one flow."""
    return f"flows:\n  - name: {name}\n    module: hello.wasm\n{body}"


# --- valid files ---------------------------------------------------------------------------------------


def test_full_example_round_trips(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    loaded = load_flows(path, env=ENV)
    assert isinstance(loaded, LoadedFlows)
    assert loaded.path == path.resolve()
    assert loaded.base_dir == tmp_path.resolve()
    assert loaded.state_dir == tmp_path.resolve() / ".wasmflow"
    assert loaded.resolve("guest-examples/digest") == tmp_path.resolve() / "guest-examples" / "digest"

    f = loaded.file
    assert f.github is not None
    assert (f.github.app_id, f.github.private_key, f.github.webhook_secret) == ("1234", "app.pem", "s3cret")
    assert f.models["default"].options == {"ctx-size": 8192}
    review = f.flow("code-review")
    assert review.module == "guest-examples/code-review"  # kept as written; resolve() against base_dir
    assert review.on[0].kind == "github"  # the key `on:` is not read as YAML 1.1's boolean True
    assert review.on[0].github is not None and review.on[0].github.events[2] == "issue_comment.created"
    assert review.allow.github == {"pull_requests": "write", "issues": "write", "contents": "read"}
    assert review.config == {"trigger_phrase": "/review", "max_patch_tokens": 24000}
    assert (review.limits.timeout, review.limits.memory) == (300.0, 512 * 1024**2)
    assert (review.retry.attempts, review.retry.backoff) == (5, "exponential")
    digest = f.flow("weekly-digest")
    schedule = digest.on[0].schedule
    assert schedule is not None
    assert (schedule.cron, schedule.timezone, schedule.catch_up) == ("0 9 * * MON", "Europe/Berlin", 3600.0)
    # The validated model dumps and re-validates to itself.
    assert type(f).model_validate(f.model_dump()) == f


@pytest.mark.parametrize(
    "timeout, seconds", [("250ms", 0.25), ("300s", 300.0), ("1.5m", 90.0), ("2h", 7200.0), ("1d", 86400.0), ("45", 45.0)]
)
def test_durations(tmp_path: Path, timeout: str, seconds: float) -> None:
    path = write(tmp_path, flow_yaml(f"    limits: {{timeout: {timeout}}}\n"))
    assert load_flows(path, env={}).file.flows[0].limits.timeout == seconds


@pytest.mark.parametrize(
    "memory, size", [("64KiB", 65536), ("512MiB", 512 * 1024**2), ("1GB", 10**9), ("1048576", 1048576), ("2 GiB", 2 * 1024**3)]
)
def test_sizes(tmp_path: Path, memory: str, size: int) -> None:
    path = write(tmp_path, flow_yaml(f"    limits: {{memory: {memory}}}\n"))
    assert load_flows(path, env={}).file.flows[0].limits.memory == size


def test_trigger_shorthand_and_empty_settings_mean_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, flow_yaml("    on:\n      - http\n      - http:\n      - http: {methods: [PUT]}\n"))
    triggers = load_flows(path, env={}).file.flows[0].on
    assert [t.http.methods for t in triggers if t.http] == [["GET", "POST"], ["GET", "POST"], ["PUT"]]


def test_merge_keys_share_settings_and_explicit_keys_win(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        flows:
          - name: one
            module: one.wasm
            limits: &limits {timeout: 10s, memory: 64MiB}
          - name: two
            module: two.wasm
            limits: {<<: *limits, timeout: 20s}
        """)
    flows = load_flows(path, env={}).file.flows
    assert (flows[1].limits.timeout, flows[1].limits.memory) == (20.0, 64 * 1024**2)


def test_errors_in_merged_keys_point_at_the_line_that_says_them(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        flows:
          - name: one
            module: one.wasm
            limits: &limits
              timeout: 10s
              memory: lots
          - name: two
            module: two.wasm
            limits:
              timeout: never
              <<: *limits
        """)
    error = load_error(path)
    assert [(p.field, p.line) for p in error.problems] == [
        ("flows[one].limits.memory", line_of(path, "memory: lots")),
        ("flows[two].limits.memory", line_of(path, "memory: lots")),  # merged in from the anchor
        ("flows[two].limits.timeout", line_of(path, "timeout: never")),  # its own key, not the anchor's
    ]


def test_config_dates_stay_text_so_they_reach_the_guest_as_written(tmp_path: Path) -> None:
    path = write(tmp_path, flow_yaml("    config: {since: 2024-01-31, count: 3, on: yes}\n"))
    assert load_flows(path, env={}).file.flows[0].config == {"since": "2024-01-31", "count": 3, "on": True}


# --- ${VAR} substitution ---------------------------------------------------------------------------------


def test_env_substitution_defaults_and_literal(tmp_path: Path) -> None:
    path = write(tmp_path, flow_yaml(
        "    config:\n"
        "      a: ${A}\n"
        "      b: \"x-${A}-${B:-fallback}\"\n"
        "      c: ${EMPTY:-used when empty}\n"
        "      d: $${NOT_A_VAR}\n"
        "      e: ${MULTI}\n"
        "    limits: {timeout: \"${TIMEOUT}\"}\n"
    ))
    env = {"A": "alpha", "EMPTY": "", "MULTI": "${A}", "TIMEOUT": "90s"}
    flow = load_flows(path, env=env).file.flows[0]
    assert flow.config == {"a": "alpha", "b": "x-alpha-fallback", "c": "used when empty", "d": "${NOT_A_VAR}",
                           "e": "${A}"}  # a value is not substituted again
    assert flow.limits.timeout == 90.0


def test_env_defaults_to_the_process_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WASMFLOW_TEST_MODULE", "from-env.wasm")
    path = write(tmp_path, "flows:\n  - name: hello\n    module: ${WASMFLOW_TEST_MODULE}\n")
    assert load_flows(path).file.flows[0].module == "from-env.wasm"


def test_missing_variables_are_named_with_their_lines(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    error = load_error(path, env={"GITHUB_APP_ID": "1"})
    key = problem(error, "github.private_key")
    assert key.line == line_of(path, "private_key:")
    assert "GITHUB_APP_PRIVATE_KEY_FILE is not set" in key.message
    secret = problem(error, "github.webhook_secret")
    assert secret.line == line_of(path, "webhook_secret:")
    assert "GITHUB_WEBHOOK_SECRET" in secret.message
    assert str(error).startswith(f"{path}:{key.line}: github.private_key: environment variable "
                                 "GITHUB_APP_PRIVATE_KEY_FILE is not set")


def test_missing_variable_in_a_literal_block_points_at_its_own_line(tmp_path: Path) -> None:
    path = write(tmp_path, flow_yaml("    config:\n      prompt: |\n        first line\n        uses ${NOPE}\n"))
    error = load_error(path, env={})
    assert (error.line, error.field) == (line_of(path, "${NOPE}"), "flows[hello].config.prompt")


@pytest.mark.parametrize("value", ["${1BAD}", "${}", "${UNTERMINATED", "${A B}"])
def test_malformed_references_are_errors(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, flow_yaml(f"    config: {{x: \"{value}\"}}\n"))
    error = load_error(path, env={"A": "a"})
    assert error.line == line_of(path, "config:")
    assert "invalid variable reference" in error.message and "$${" in error.message


# --- schema errors: line, field, message ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text, needle, field, expected",
    [
        ("verison: 1\nflows: []\n", "verison", "verison",
         "unknown key 'verison', did you mean 'version'? (expected one of: version, engine, state_dir, models, "
         "github, flows, console)"),
        (flow_yaml("    modle: x.wasm\n"), "modle", "flows[hello].modle",
         "(expected one of: name, module, engine, on, allow, config, secrets, args, limits, retry"),
        (flow_yaml("    limits:\n      timout: 5s\n"), "timout", "flows[hello].limits.timout",
         "unknown key 'timout', did you mean 'timeout'? (expected one of: timeout, memory, table_elements, output, "
         "log_lines, log_bytes, response_headers, response_header_bytes, response_body, transcript)"),
        (flow_yaml("    on:\n      - github: {events: [push], repo: [a/b]}\n"), "repo:", "flows[hello].on[0].github.repo",
         "(expected one of: events, repos)"),
        (flow_yaml("    on:\n      - cron: {cron: '* * * * *'}\n"), "- cron", "flows[hello].on[0].cron",
         "(expected one of: github, schedule, http)"),
        ("models:\n  m:\n    backend: ggml\n    path: m.gguf\n    device: gpu\n", "device", "models.m.device",
         "(expected one of: backend, path, target, options)"),
    ],
)
def test_unknown_keys_name_the_allowed_keys(tmp_path: Path, text: str, needle: str, field: str, expected: str) -> None:
    path = write(tmp_path, text)
    p = problem(load_error(path), field)
    assert p.line == line_of(path, needle)
    assert p.message.startswith("unknown key")
    assert expected in p.message


@pytest.mark.parametrize(
    "body, needle, field, expected",
    [
        ("    limits: 5\n", "limits", "flows[hello].limits", "expected a mapping (key: value), got 5"),
        ("    limits: {memory: lots}\n", "memory", "flows[hello].limits.memory",
         "expected a size like 512MiB or 64KiB, got 'lots'"),
        ("    limits: {timeout: soon}\n", "timeout", "flows[hello].limits.timeout", "expected a duration like 30s"),
        ("    retry: {attempts: many}\n", "attempts", "flows[hello].retry.attempts", "got 'many'"),
        ("    retry: {backoff: linear}\n", "backoff", "flows[hello].retry.backoff",
         "expected 'exponential' or 'fixed', got 'linear'"),
        ("    allow: {kv: maybe}\n", "kv", "flows[hello].allow.kv", "got 'maybe'"),
        ("    allow: {http: https://api.github.com}\n", "allow", "flows[hello].allow.http", "expected a list"),
        ("    secrets: [OK, not-ok]\n", "secrets", "flows[hello].secrets[1]", "expected an environment variable name"),
        ("    on: [push]\n", "on:", "flows[hello].on[0]", "a trigger is one of"),
        ("    on:\n      - github: {events: []}\n", "github", "flows[hello].on[0].github.events", "at least 1 item"),
    ],
)
def test_wrong_types_and_values(tmp_path: Path, body: str, needle: str, field: str, expected: str) -> None:
    path = write(tmp_path, flow_yaml(body))
    p = problem(load_error(path), field)
    assert p.line == line_of(path, needle)
    assert expected in p.message


def test_missing_required_key_points_at_its_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "flows:\n  - name: hello\n    engine: wasmtime\n")
    p = problem(load_error(path), "flows[hello].module")
    assert (p.line, p.message) == (2, "missing required key 'module'")


def test_flows_without_a_usable_name_are_named_by_index(tmp_path: Path) -> None:
    path = write(tmp_path, "flows:\n  - module: a.wasm\n  - name: Bad Name\n    module: b.wasm\n")
    error = load_error(path)
    assert problem(error, "flows[0].name").message == "missing required key 'name'"
    bad = problem(error, "flows[Bad Name].name")
    assert bad.line == 3 and "expected a name of lowercase letters" in bad.message


def test_bad_cron(tmp_path: Path) -> None:
    path = write(tmp_path, flow_yaml("    on:\n      - schedule:\n          cron: '0 25 * * MON'\n"))
    p = problem(load_error(path), "flows[hello].on[0].schedule.cron")
    assert p.line == line_of(path, "cron:")
    assert "not a valid cron expression: '0 25 * * MON'" in p.message


def test_bad_timezone(tmp_path: Path) -> None:
    path = write(tmp_path, flow_yaml("    on:\n      - schedule: {cron: '0 9 * * *',\n                   timezone: Europe/Berlinn}\n"))
    p = problem(load_error(path), "flows[hello].on[0].schedule.timezone")
    assert p.line == line_of(path, "Berlinn")
    assert "unknown time zone 'Europe/Berlinn' (expected e.g. Europe/Berlin or UTC)" == p.message


def test_bad_http_pattern_points_at_the_entry(tmp_path: Path) -> None:
    path = write(tmp_path, flow_yaml("    allow:\n      http:\n        - https://ok.example.com\n"
                                     "        - https://api.github.com/repos\n"))
    p = problem(load_error(path), "flows[hello].allow.http[1]")
    assert p.line == line_of(path, "/repos")
    assert p.message.startswith("expected scheme://host[:port] such as https://api.github.com")
    assert "drop the path (write https://api.github.com)" in p.message


def test_duplicate_flow_name_points_at_the_second(tmp_path: Path) -> None:
    path = write(tmp_path, "flows:\n  - name: twin\n    module: a.wasm\n  - name: twin\n    module: b.wasm\n")
    error = load_error(path)
    assert (error.line, error.field) == (line_of(path, "name: twin", 2), "flows[twin].name")
    assert "flow name 'twin' is used twice" in error.message


def test_allowed_model_must_be_defined(tmp_path: Path) -> None:
    path = write(tmp_path, "models:\n  default: {backend: ggml, path: m.gguf}\n"
                           + flow_yaml("    allow:\n      models:\n        - default\n        - big\n"))
    error = load_error(path)
    assert (error.line, error.field) == (line_of(path, "- big"), "flows[hello].allow.models[1]")
    assert "allows model 'big', which `models:` does not define (models: default)" in error.message


def test_several_problems_are_reported_together_in_file_order(tmp_path: Path) -> None:
    path = write(tmp_path, flow_yaml("    limits: {memory: lots}\n    retry: {attempts: 0}\n"))
    error = load_error(path)
    assert [p.field for p in error.problems] == ["flows[hello].limits.memory", "flows[hello].retry.attempts"]
    assert str(error).splitlines()[1].startswith(f"{path}:{line_of(path, 'retry')}: flows[hello].retry.attempts: ")


# --- YAML-level errors ---------------------------------------------------------------------------------


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, flow_yaml("    limits:\n      timeout: 5s\n      memory: 1MiB\n      timeout: 10s\n"))
    error = load_error(path)
    assert (error.line, error.field) == (line_of(path, "timeout", 2), "flows[hello].limits.timeout")
    assert f"duplicate key 'timeout' (first at line {line_of(path, 'timeout')})" in error.message


def test_duplicate_top_level_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "flows: []\nengine: wasmtime\nflows: []\n")
    error = load_error(path)
    assert (error.line, error.field) == (3, "flows")
    assert "duplicate key 'flows' (first at line 1)" in error.message


def test_yaml_syntax_error_has_a_line(tmp_path: Path) -> None:
    path = write(tmp_path, "flows:\n  - name: hello\n    module: [unclosed\n    limits: {}\n")
    error = load_error(path)
    assert error.line is not None and error.line >= 3
    assert error.message.startswith("invalid YAML:")
    assert str(error).startswith(f"{path}:{error.line}: invalid YAML:")


def test_tabs_are_a_syntax_error_with_a_line(tmp_path: Path) -> None:
    path = write(tmp_path, "flows:\n  - name: hello\n\tmodule: x.wasm\n")
    error = load_error(path)
    assert error.line == 3 and "invalid YAML" in error.message


def test_unknown_and_non_json_tags_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, flow_yaml("    config:\n      x: !vault secret/path\n      y: !!binary aGVsbG8=\n"))
    error = load_error(path)
    assert [(p.line, p.field) for p in error.problems] == [
        (line_of(path, "!vault"), "flows[hello].config.x"), (line_of(path, "!!binary"), "flows[hello].config.y")]


def test_recursive_alias_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, flow_yaml("    config: &loop {self: *loop}\n"))
    error = load_error(path)
    assert "alias refers to a value that contains it" in error.message


def test_missing_file(tmp_path: Path) -> None:
    error = load_error(tmp_path / "nope.yaml")
    assert (error.file, error.line, error.field) == (tmp_path / "nope.yaml", None, None)
    assert str(error) == f"{tmp_path / 'nope.yaml'}: file not found (pass the path of your flows.yaml, or set $WASMFLOW_FLOWS)"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    assert "is a directory" in load_error(tmp_path).message


@pytest.mark.parametrize("text, expected", [
    ("", "the file is empty"),
    ("# only a comment\n", "the file is empty"),
    ("- name: hello\n", "expected a mapping at the top level (flows:, models:, github:), got a list"),
])
def test_file_that_is_not_a_mapping(tmp_path: Path, text: str, expected: str) -> None:
    error = load_error(write(tmp_path, text))
    assert error.line == 1 and expected in error.message


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "flows.yaml"
    path.write_bytes(b"flows: []\n# caf\xe9\n")
    error = load_error(path)
    assert (error.line, error.message) == (2, "not UTF-8 text; save the file as UTF-8")


# --- wasmflow validate -----------------------------------------------------------------------------------


def invoke(args: list[str], env: dict[str, str | None] | None = None):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(validate_command, args, env={"COLUMNS": "200", **ENV, **(env or {})})


def test_validate_prints_the_flows(tmp_path: Path) -> None:
    (tmp_path / "guest-examples" / "code-review").mkdir(parents=True)
    (tmp_path / "guest-examples" / "digest").mkdir(parents=True)
    path = write(tmp_path, FULL + "  - name: hook\n    module: guest-examples/digest\n    on: [http]\n"
                           "    llm: {chat: {model: gpt-4o-mini, base_url: 'https://api.openai.com/v1'}}\n")
    result = invoke([str(path)])
    assert result.exit_code == 0, result.output
    for text in ("code-review", "weekly-digest", "hook", "github: pull_request.opened",
                 "cron 0 9 * * MON Europe/Berlin", "http: https://api.openai.com", "models: default",
                 "secrets: OPENAI_API_KEY", "llm chat: gpt-4o-mini at https://api.openai.com/v1", "timeout 5m", "memory 512MiB", f"valid: {path} (3 flows"):
        assert text in result.stdout, text
    assert "warning" not in result.output


def test_validate_warns_about_modules_that_are_not_there(tmp_path: Path) -> None:
    path = write(tmp_path, flow_yaml(""))
    result = invoke([str(path)])
    assert result.exit_code == 0
    assert "warning: flow 'hello': module 'hello.wasm' not found" in result.stderr


def test_validate_reports_errors_with_exit_2(tmp_path: Path) -> None:
    path = write(tmp_path, flow_yaml("    limits: {timout: 5s}\n    retry: {attempts: 0}\n"))
    result = invoke([str(path)])
    assert result.exit_code == 2
    assert (f"error: {path}:{line_of(path, 'timout')}: flows[hello].limits.timout: unknown key 'timout'"
            in result.stderr)  # brackets survive rich's markup
    assert "flows[hello].retry.attempts" in result.stderr
    assert "2 problems" in result.stderr
    assert "valid:" not in result.output


def test_validate_defaults_to_wasmflow_flows_then_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, flow_yaml("", name="from-cwd"))
    write(tmp_path, flow_yaml("", name="from-env"), name="other.yaml")
    for unset in (None, ""):
        result = invoke([], env={"WASMFLOW_FLOWS": unset})
        assert result.exit_code == 0 and "from-cwd" in result.stdout
    result = invoke([], env={"WASMFLOW_FLOWS": str(tmp_path / "other.yaml")})
    assert result.exit_code == 0 and "from-env" in result.stdout


def test_validate_missing_file_exits_2(tmp_path: Path) -> None:
    result = invoke([str(tmp_path / "absent.yaml")])
    assert result.exit_code == 2
    assert "file not found" in result.stderr
