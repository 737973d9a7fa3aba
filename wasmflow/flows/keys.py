"""Key templates over an event: `"{repo}#{pull_request.number}"` -> `"acme/api#42"`.

A flow's `concurrency`, `debounce`, `rate` and `budget` group its runs by a key made from the event that
started them. The template is text with `{path}` fields: a dotted path into the event's JSON body
(`{pull_request.number}`, `{issue.user.login}`, list indexes as numbers: `{commits.0.id}`) or one of the
shorthands below; `{a|b}` takes the first alternative the event has (`{pull_request.number|issue.number}`:
the pull request of a push, or of a comment on it). Rendering never fails: a field missing from an event renders empty, so such events
share the key with the others that lack it (`{installation}` of a delivery without an App).

Validation is stricter: a field whose first step no event of the flow's triggers can carry (a
`{pull_request.number}` on a flow that only takes `issues`) is an error in flows.yaml, because every run
would get the same key and the setting would silently mean something else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from wasmflow.storage.text import storable_text

MAX_TEMPLATE_CHARS = 200
MAX_KEY_CHARS = 320  # what runs.concurrency_key holds

# Shorthand -> the path it stands for ("" for the event's name, which is not in its body).
SHORTHANDS: dict[str, str] = {
    "repo": "repository.full_name",
    "installation": "installation.id",
    "sender": "sender.login",
    "org": "organization.login",
    "event": "",
}

_FIELD = re.compile(r"\{([^{}]*)\}")
_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*(\.([A-Za-z0-9_\-]+))*")

# Top-level keys of GitHub's webhook payloads, by event (GitHub's webhook events and payloads reference).
# Every event may carry the common ones.
_COMMON = {"action", "sender", "repository", "organization", "installation", "enterprise"}
GITHUB_TOP_LEVEL: dict[str, set[str]] = {
    "pull_request": {"number", "pull_request", "assignee", "label", "requested_reviewer", "requested_team",
                     "changes", "before", "after", "reason", "milestone"},
    "pull_request_review": {"review", "pull_request", "changes"},
    "pull_request_review_comment": {"comment", "pull_request", "changes"},
    "pull_request_review_thread": {"thread", "pull_request"},
    "issues": {"issue", "changes", "assignee", "label", "milestone"},
    "issue_comment": {"issue", "comment", "changes"},
    "push": {"ref", "before", "after", "created", "deleted", "forced", "base_ref", "compare", "commits",
             "head_commit", "pusher"},
    "release": {"release", "changes"},
    "check_run": {"check_run", "requested_action"},
    "check_suite": {"check_suite"},
    "workflow_run": {"workflow_run", "workflow"},
    "workflow_job": {"workflow_job", "deployment"},
    "workflow_dispatch": {"inputs", "ref", "workflow"},
    "create": {"ref", "ref_type", "master_branch", "description", "pusher_type"},
    "delete": {"ref", "ref_type", "pusher_type"},
    "discussion": {"discussion", "answer", "changes", "label"},
    "discussion_comment": {"comment", "discussion", "changes"},
    "fork": {"forkee"},
    "star": {"starred_at"},
    "watch": set(),
    "label": {"label", "changes"},
    "milestone": {"milestone", "changes"},
    "installation": {"repositories", "requester"},
    "installation_repositories": {"repository_selection", "repositories_added", "repositories_removed",
                                  "requester"},
    "status": {"id", "sha", "name", "state", "description", "target_url", "context", "commit", "branches",
               "created_at", "updated_at", "avatar_url"},
    "ping": {"zen", "hook_id", "hook"},
    "merge_group": {"merge_group"},
    "deployment": {"deployment", "workflow", "workflow_run"},
    "deployment_status": {"deployment_status", "deployment", "check_run", "workflow", "workflow_run"},
    "member": {"member", "changes"},
    "public": set(),
    "repository": {"changes"},
}
SCHEDULE_TOP_LEVEL = {"flow", "cron", "timezone", "scheduled_at"}


class KeyTemplateError(ValueError):
    """A template that cannot be parsed, or names a field no event of the flow can have."""


@dataclass(frozen=True)
class KeyTemplate:
    """A parsed template: literal text and fields, alternating (`parts[0]` literal, `parts[1]` field ...)."""

    text: str
    parts: tuple[str, ...]

    @property
    def fields(self) -> tuple[str, ...]:
        return self.parts[1::2]

    def render(self, event_name: str, body: Any) -> str:
        """The key for one event (`body`: its decoded JSON, or None). Missing fields render empty."""
        out = []
        for i, part in enumerate(self.parts):
            if i % 2 == 0:
                out.append(part)
                continue
            value = ""
            for alternative in part.split("|"):
                path = SHORTHANDS.get(alternative, alternative)
                value = event_name if path == "" else _text(_lookup(body, path))
                if value:
                    break
            out.append(value)
        return storable_text("".join(out), MAX_KEY_CHARS)  # payload text: as the runs table can hold it


def parse_template(text: str) -> KeyTemplate:
    """Parse `text`; KeyTemplateError with what is wrong and the expected form."""
    if not isinstance(text, str) or not text.strip():
        raise KeyTemplateError('expected a key template like "{repo}#{pull_request.number}"')
    if len(text) > MAX_TEMPLATE_CHARS:
        raise KeyTemplateError(f"a key template of at most {MAX_TEMPLATE_CHARS} characters is expected, "
                               f"got {len(text)}")
    parts: list[str] = []
    pos = 0
    for match in _FIELD.finditer(text):
        literal = text[pos:match.start()]
        if "{" in literal or "}" in literal:
            raise KeyTemplateError(f"unbalanced brace in key template {text!r}")
        name = "|".join(a.strip() for a in match.group(1).split("|"))
        if not all(_PATH.fullmatch(a) for a in name.split("|")):
            raise KeyTemplateError(f"key template field {{{match.group(1)}}} is not a dotted path like "
                                   "{pull_request.number} or a shorthand ({" + "}, {".join(SHORTHANDS) + "})")
        parts += [literal, name]
        pos = match.end()
    tail = text[pos:]
    if "{" in tail or "}" in tail:
        raise KeyTemplateError(f"unbalanced brace in key template {text!r}")
    parts.append(tail)
    if len(parts) == 1:
        raise KeyTemplateError(f"key template {text!r} has no {{field}}: every run would share one key; "
                               'use e.g. "{repo}" (or leave `key` out for one key per flow)')
    return KeyTemplate(text=text, parts=tuple(parts))


def check_fields(template: KeyTemplate, github_events: Optional[Iterable[str]], schedule: bool,
                 open_body: bool) -> Optional[str]:
    """Why a field of `template` can never exist in the flow's events, or None.

    `github_events`: the event names of the flow's GitHub triggers ("pull_request.opened" counts as
    pull_request; "*" or an event not catalogued allows any field). `schedule`: it has schedule triggers.
    `open_body`: a trigger whose body the sender chooses (http, or none at all: `wasmflow run`), which
    may carry anything.
    """
    if open_body:
        return None
    allowed: set[str] = set()
    names = sorted({e.split(".", 1)[0] for e in (github_events or [])})
    for name in names:
        if name == "*" or name not in GITHUB_TOP_LEVEL:
            return None
        allowed |= GITHUB_TOP_LEVEL[name] | _COMMON
    if schedule:
        allowed |= SCHEDULE_TOP_LEVEL
    for field in template.fields:
        for name in field.split("|"):
            path = SHORTHANDS.get(name, name)
            if path == "":
                continue
            first = path.split(".", 1)[0]
            if first not in allowed:
                takes = ", ".join(names + (["schedule"] if schedule else [])) or "no events"
                return (f"key template field {{{name}}} can never be set: {first!r} is not in the payload of any "
                        f"event this flow takes ({takes})")
    return None


def _lookup(body: Any, path: str) -> Any:
    node = body
    for step in path.split("."):
        if isinstance(node, dict):
            node = node.get(step)
        elif isinstance(node, list) and step.isdigit() and int(step) < len(node):
            node = node[int(step)]
        else:
            return None
        if node is None:
            return None
    return node


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return ""  # an object is not a key; a typo'd path usually lands here
    return str(value)
