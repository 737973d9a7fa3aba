"""Webhook deliveries shaped like GitHub's documented examples, built from the stand-in's state.

Tests and the demo need deliveries whose numbers, shas and repository agree with what the stand-in
serves; these builders produce the payloads GitHub documents for `pull_request`, `issue_comment` and
`issues` (tests/fixtures/github holds examples, and a test checks these builders keep their shape), plus
the headers and `X-Hub-Signature-256` a real delivery carries.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from typing import Any, Optional

from .github_standin import GithubStandin, Repo


def sign(secret: str, body: bytes) -> str:
    """`X-Hub-Signature-256` for `body`: `sha256=` + hex HMAC-SHA256 with the webhook secret."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def delivery_headers(event: str, body: bytes, secret: Optional[str], delivery: Optional[str] = None,
                     hook_id: int = 123456, target_id: int = 4242) -> dict[str, str]:
    """The headers GitHub sends with a delivery (lower-case names, as the ingress stores them)."""
    headers = {
        "content-type": "application/json",
        "user-agent": "GitHub-Hookshot/a1b2c3d",
        "x-github-event": event,
        "x-github-delivery": delivery or str(uuid.uuid4()),
        "x-github-hook-id": str(hook_id),
        "x-github-hook-installation-target-id": str(target_id),
        "x-github-hook-installation-target-type": "integration",
    }
    if secret is not None:
        headers["x-hub-signature-256"] = sign(secret, body)
    return headers


def _common(standin: GithubStandin, repo: Repo, sender: str, base: str) -> dict[str, Any]:
    return {
        "repository": standin.repo_json(repo, base),
        "organization": {"login": repo.owner, "id": repo.id + 1, "node_id": f"O_{repo.owner}",
                         "url": f"{base}/orgs/{repo.owner}", "description": ""},
        "sender": standin._user(sender, "Bot" if sender.endswith("[bot]") else "User"),
        "installation": {"id": standin.installation_id, "node_id": f"MDIzOkludGVncmF0aW9uSW5zdGFsbGF0aW9u{standin.installation_id}"},
    }


def pull_request_event(standin: GithubStandin, full_name: str, number: int, action: str = "opened",
                       sender: Optional[str] = None, before: Optional[str] = None) -> dict[str, Any]:
    """A `pull_request` delivery body (opened, reopened, synchronize, ready_for_review, closed...)."""
    repo = standin.add_repo(full_name)
    pr = repo.pulls[number]
    base = standin.url
    payload: dict[str, Any] = {"action": action, "number": number, "pull_request": standin.pull_json(repo, pr, base)}
    if action == "synchronize":
        shas = list(pr.snapshots)
        payload["before"] = before or (shas[-2] if len(shas) > 1 else pr.base_sha)
        payload["after"] = pr.head_sha
    payload.update(_common(standin, repo, sender or pr.user, base))
    return payload


def issue_comment_event(standin: GithubStandin, full_name: str, number: int, comment: dict[str, Any],
                        action: str = "created") -> dict[str, Any]:
    """An `issue_comment` delivery for `comment` (as `add_comment` returned it) on issue or PR `number`."""
    repo = standin.add_repo(full_name)
    issue = repo.issues[number]
    base = standin.url
    public = {k: v for k, v in comment.items() if not k.startswith("_")}
    payload: dict[str, Any] = {"action": action, "issue": standin.issue_json(repo, issue, base), "comment": public}
    payload.update(_common(standin, repo, public["user"]["login"], base))
    return payload


def issues_event(standin: GithubStandin, full_name: str, number: int, action: str = "opened") -> dict[str, Any]:
    """An `issues` delivery (opened, edited, labeled...)."""
    repo = standin.add_repo(full_name)
    issue = repo.issues[number]
    base = standin.url
    payload: dict[str, Any] = {"action": action, "issue": standin.issue_json(repo, issue, base)}
    payload.update(_common(standin, repo, issue.user, base))
    return payload


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()
