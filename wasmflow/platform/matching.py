"""Which flows an incoming event starts.

Kept apart from ingress and the queue so the rule is one pure function: the webhook handler calls it once
per delivery, replays and tests call it the same way, and nothing here touches the network or the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Optional

from wasmflow.flows.model import FlowsFile, GithubTrigger


@dataclass(frozen=True)
class GithubEventInfo:
    """What matching needs from a delivery: `X-GitHub-Event`, the payload's `action` and repository."""

    name: str
    action: Optional[str]
    repo: Optional[str]  # "owner/name"

    @classmethod
    def from_payload(cls, name: str, payload: Any) -> "GithubEventInfo":
        action = repo = None
        if isinstance(payload, dict):
            if isinstance(payload.get("action"), str):
                action = payload["action"]
            repository = payload.get("repository")
            if isinstance(repository, dict) and isinstance(repository.get("full_name"), str):
                repo = repository["full_name"]
        return cls(name=name, action=action, repo=repo)

    @property
    def qualified(self) -> str:
        """`pull_request.opened`, or just `push` for events without an action."""
        return f"{self.name}.{self.action}" if self.action else self.name


def _event_matches(pattern: str, info: GithubEventInfo) -> bool:
    if pattern == "*":
        return True
    name, _, action = pattern.partition(".")
    if name != info.name:
        return False
    return not action or action == info.action


def _repo_matches(patterns: list[str], repo: Optional[str]) -> bool:
    if repo is None:  # installation-level events (no repository): only flows that take every repository
        return any(p in ("*", "*/*") for p in patterns)
    repo = repo.lower()
    return any(fnmatchcase(repo, p.lower()) for p in patterns)


def trigger_matches(trigger: GithubTrigger, info: GithubEventInfo) -> bool:
    return any(_event_matches(p, info) for p in trigger.events) and _repo_matches(trigger.repos, info.repo)


def match_github(flows: FlowsFile, info: GithubEventInfo) -> list[str]:
    """Names of the flows with a github trigger that takes this event, in flows.yaml order, each once."""
    matched: list[str] = []
    for flow in flows.flows:
        for trigger in flow.on:
            if trigger.github is not None and trigger_matches(trigger.github, info):
                matched.append(flow.name)
                break
    return matched
