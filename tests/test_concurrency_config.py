"""flows.yaml's `concurrency`, `debounce`, `rate` and `budget`: parsed, checked with line numbers, and key
templates rendered over real GitHub payload fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wasmflow.flows.keys import KeyTemplateError, parse_template
from wasmflow.flows.loader import FlowsError, load_flows

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "github"


def load(tmp_path: Path, flow_lines: str, events: str = "[pull_request]"):  # type: ignore[no-untyped-def]
    (tmp_path / "flows.yaml").write_text(
        "flows:\n  - name: r\n    module: x.wasm\n"
        f"    on: [{{github: {{events: {events}}}}}]\n" + flow_lines)
    return load_flows(tmp_path / "flows.yaml").file.flows[0]


def test_settings_parse_with_their_shorthands(tmp_path):
    flow = load(tmp_path, '    concurrency: {key: "{repo}#{pull_request.number}", limit: 2, on_conflict: skip-new}\n'
                          "    debounce: {period: 10s, max_wait: 1m}\n"
                          "    rate: 30/h\n"
                          '    budget: {llm_tokens: 200000, per: 1d, key: "{installation}"}\n')
    assert (flow.concurrency.limit, flow.concurrency.on_conflict) == (2, "skip-new")
    assert (flow.debounce.period, flow.debounce.max_wait) == (10.0, 60.0)
    assert (flow.rate.limit, flow.rate.per) == (30, 3600.0)
    assert flow.run_key == "{repo}#{pull_request.number}" and flow.budget_key == "{installation}"
    assert load(tmp_path, "    rate: 5/10m\n").rate.per == 600.0


@pytest.mark.parametrize("lines, events, line, message", [
    ('    concurrency: {key: "{repo}#{pull_request.number}"}\n', "[issues]", 5,
     "key template field {pull_request.number} can never be set: 'pull_request' is not in the payload of any "
     "event this flow takes (issues)"),
    ("    concurrency:\n      limit: 1\n      key: \"{nope}\"\n", "[push, issues]", 7, "'nope' is not in the payload"),
    ('    concurrency: {key: "{repo"}\n', "[push]", 5, "unbalanced brace"),
    ('    concurrency: {key: "static"}\n', "[push]", 5, "has no {field}"),
    ('    concurrency: {key: "{a..b}"}\n', "[push]", 5, "is not a dotted path"),
    ("    concurrency: {on_conflict: cancel-newest}\n", "[push]", 5, "cancel-running"),
    ("    concurrency: {limit: 0}\n", "[push]", 5, "from 1 to 10000"),
    ("    debounce: {period: 10s, max_wait: 5s}\n", "[push]", 5, "shorter than its period"),
    ("    rate: lots\n", "[push]", 5, "expected a rate like 30/h"),
    ('    concurrency: {key: "{repo}"}\n    rate: {limit: 3, per: 1h, key: "{sender}"}\n', "[push]", 6,
     "rate.key '{sender}' differs from concurrency.key '{repo}'"),
    ("    budget: {llm_tokens: 10, per: 0s}\n", "[push]", 5, "from 1s to 366d"),
])
def test_bad_settings_name_the_line_and_the_fix(tmp_path, lines, events, line, message):
    with pytest.raises(FlowsError) as info:
        load(tmp_path, lines, events)
    assert info.value.line == line, str(info.value)
    assert message in str(info.value)
    assert "Traceback" not in str(info.value)


def test_hostile_template_is_refused_briefly(tmp_path):
    with pytest.raises(FlowsError) as info:
        load(tmp_path, f'    concurrency: {{key: "{{{"a" * 5000}}}"}}\n', "[push]")
    assert "at most 200 characters" in str(info.value) and len(str(info.value)) < 500


def test_open_bodies_and_wildcards_allow_any_path(tmp_path):
    assert load(tmp_path, '    concurrency: {key: "{anything.at.all}"}\n', '["*"]').run_key == "{anything.at.all}"
    (tmp_path / "flows.yaml").write_text('flows:\n  - name: h\n    module: x.wasm\n    on: [http]\n'
                                         '    concurrency: {key: "{customer.id}"}\n')
    assert load_flows(tmp_path / "flows.yaml").file.flows[0].run_key == "{customer.id}"


def test_keys_render_from_real_payloads():
    pr = json.loads((FIXTURES / "pull_request.opened.json").read_text())
    comment = json.loads((FIXTURES / "issue_comment.created.json").read_text())
    template = parse_template("{repo}#{pull_request.number|issue.number}:{event}")
    repo = pr["repository"]["full_name"]
    assert template.render("pull_request", pr) == f"{repo}#{pr['pull_request']['number']}:pull_request"
    assert template.render("issue_comment", comment) == \
        f"{comment['repository']['full_name']}#{comment['issue']['number']}:issue_comment"
    # a field the event lacks renders empty, never fails; objects are not keys
    assert parse_template("{installation}/{pull_request}").render("x", {"installation": None}) == "/"
    assert parse_template("{commits.1.id}").render("push", {"commits": [{"id": "a"}, {"id": "b"}]}) == "b"
    assert len(parse_template("{a}").render("x", {"a": "k" * 1000})) == 320


def test_the_repository_flows_yaml_supersedes_reviews_per_pull_request():
    review = load_flows(ROOT / "flows.yaml").file.flow("code-review")
    assert review.concurrency.on_conflict == "cancel-running" and review.concurrency.limit == 1
    assert review.run_key.startswith("{repo}#{pull_request.number")


def test_template_errors_are_value_errors():
    with pytest.raises(KeyTemplateError):
        parse_template("")
