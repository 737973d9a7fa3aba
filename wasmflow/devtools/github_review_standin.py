"""The GitHub stand-in's part for the code-review bot's second generation: check runs, collaborator
permission, file contents per branch, pull request edits and replies to review comments.

- `POST /repos/{o}/{r}/check-runs`, `PATCH`/`GET .../check-runs/{id}`, `GET .../commits/{ref}/check-runs`:
  checked as GitHub does (name and a head_sha of the repository, status and conclusion values, a
  conclusion completes the run, a completed run needs one, output needs title and summary of at most
  65,535 characters); every status change is kept in `_history` for tests.
- `GET .../collaborators/{user}/permission`: `{"permission": admin|write|read|none, "role_name": ...}`;
  `octocat` is the repository's admin, anyone not set with `set_permission` reads as `read`, as on a
  public repository.
- `GET .../contents/{path}?ref=BRANCH_OR_SHA`: what `set_file` put on that branch (a PR's head or base
  sha reads as its branch), as JSON with base64 content, or the text itself for the `raw` media type.
- `PATCH .../pulls/{n}` (title, body) and `POST .../pulls/{n}/comments/{id}/replies`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from typing import Any, Optional

from aiohttp import web

CHECK_STATUSES = ("queued", "in_progress", "completed")
CHECK_CONCLUSIONS = ("success", "failure", "neutral", "cancelled", "skipped", "timed_out", "action_required")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


async def _body(request: web.Request) -> dict[str, Any]:
    """The JSON object of the request (the host's middleware has read and checked it; aiohttp keeps the
    bytes, so reading them again costs nothing)."""
    raw = await request.read()
    data = json.loads(raw) if raw else None
    return data if isinstance(data, dict) else {}


class ReviewStandin:
    """Mixed into GithubStandin: its state is created on first use, so the host class needs no setup."""

    def _review_state(self) -> dict[str, Any]:
        state = self.__dict__.get("_review")
        if state is None:
            state = self.__dict__.setdefault("_review", {"checks": {}, "perms": {}, "files": {}, "lock": threading.RLock()})
        return state

    def add_review_routes(self, r: web.UrlDispatcher) -> None:
        r.add_post("/repos/{o}/{r}/check-runs", self.h_create_check_run)
        r.add_get("/repos/{o}/{r}/check-runs/{cid:\\d+}", self.h_check_run)
        r.add_patch("/repos/{o}/{r}/check-runs/{cid:\\d+}", self.h_update_check_run)
        r.add_get("/repos/{o}/{r}/commits/{ref}/check-runs", self.h_commit_check_runs)
        r.add_get("/repos/{o}/{r}/collaborators/{user}/permission", self.h_collaborator_permission)
        r.add_get("/repos/{o}/{r}/contents/{path:.+}", self.h_contents)
        r.add_patch("/repos/{o}/{r}/pulls/{n:\\d+}", self.h_update_pull)
        r.add_post("/repos/{o}/{r}/pulls/{n:\\d+}/comments/{cid:\\d+}/replies", self.h_review_comment_reply)

    # -- state for tests ----------------------------------------------------------------------------

    def set_file(self, full_name: str, ref: str, path: str, text: Optional[str]) -> None:
        """Put `text` at `path` on branch `ref` (None removes it): what the contents API then serves."""
        state = self._review_state()
        with state["lock"]:
            files = state["files"].setdefault((full_name.lower(), ref), {})
            if text is None:
                files.pop(path, None)
            else:
                files[path] = text

    def set_permission(self, full_name: str, login: str, permission: Optional[str]) -> None:
        """`login`'s role on the repository (admin, maintain, write, triage, read; None: not a collaborator)."""
        state = self._review_state()
        with state["lock"]:
            state["perms"][(full_name.lower(), login.lower())] = permission or "none"

    def check_runs(self, full_name: str, head_sha: Optional[str] = None) -> list[dict[str, Any]]:
        """The repository's check runs (of one commit), oldest first, with their `_history`."""
        state = self._review_state()
        with state["lock"]:
            return [dict(c) for (repo, _), c in sorted(state["checks"].items(), key=lambda kv: kv[0][1])
                    if repo == full_name.lower() and (head_sha is None or c["head_sha"] == head_sha)]

    # -- handlers -----------------------------------------------------------------------------------

    @staticmethod
    def _public(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if not k.startswith("_")}

    def _apply_check(self, data: dict[str, Any], run: dict[str, Any]) -> Optional[web.Response]:
        """Apply a create/update body to `run`, or GitHub's 422 for what it refuses."""
        err = self._error  # type: ignore[attr-defined]
        status = data.get("status", run.get("status", "queued"))
        conclusion = data.get("conclusion", run.get("conclusion"))
        if status not in CHECK_STATUSES:
            return err(422, f"Invalid request: status {status!r}")
        if conclusion is not None and conclusion not in CHECK_CONCLUSIONS:
            return err(422, f"Invalid request: conclusion {conclusion!r}")
        if data.get("conclusion") is not None:
            status = "completed"  # GitHub: a conclusion completes the check
        if status == "completed" and conclusion is None:
            return err(422, "Invalid request: a completed check run needs a conclusion")
        output = data.get("output")
        if output is not None:
            if not isinstance(output, dict) or not isinstance(output.get("title"), str) or not isinstance(output.get("summary"), str):
                return err(422, "Invalid request: output needs a title and a summary")
            if len(output["summary"]) > 65535:
                return err(422, "Invalid request: output.summary is over 65535 characters")
            run["output"] = {"title": output["title"], "summary": output["summary"], "text": output.get("text")}
        run["status"], run["conclusion"] = status, (conclusion if status == "completed" else None)
        if status == "completed":
            run["completed_at"] = run.get("completed_at") or _now()
        run.setdefault("_history", []).append((status, run["conclusion"]))
        return None

    async def h_create_check_run(self, request: web.Request) -> web.Response:
        data = await _body(request)
        state = self._review_state()
        repo = self._repo(request)  # type: ignore[attr-defined]
        if not isinstance(data.get("name"), str) or not data["name"] or not isinstance(data.get("head_sha"), str):
            return self._error(422, "Invalid request: name and head_sha are required")  # type: ignore[attr-defined]
        with self._lock:  # type: ignore[attr-defined]
            known = {sha for pr in repo.pulls.values() for sha in pr.snapshots}
        if data["head_sha"] not in known:
            return self._error(422, "No commit found for SHA: " + data["head_sha"][:40])  # type: ignore[attr-defined]
        cid = self._next_id()  # type: ignore[attr-defined]
        run: dict[str, Any] = {"id": cid, "node_id": f"CR_{cid}", "name": data["name"], "head_sha": data["head_sha"],
                               "external_id": data.get("external_id"), "status": "queued", "conclusion": None,
                               "started_at": _now(), "completed_at": None,
                               "html_url": f"https://github.com/{repo.full_name}/runs/{cid}",
                               "app": {"id": self.app_id, "slug": self.app_slug},  # type: ignore[attr-defined]
                               "output": {"title": None, "summary": None, "text": None}}
        with state["lock"]:
            refusal = self._apply_check(data, run)
            if refusal is not None:
                return refusal
            state["checks"][(repo.full_name.lower(), cid)] = run
            return web.json_response(self._public(run), status=201)

    def _find_check(self, request: web.Request) -> Optional[dict[str, Any]]:
        repo = self._repo(request)  # type: ignore[attr-defined]
        run: Optional[dict[str, Any]] = self._review_state()["checks"].get((repo.full_name.lower(), int(request.match_info["cid"])))
        return run

    async def h_check_run(self, request: web.Request) -> web.Response:
        with self._review_state()["lock"]:
            run = self._find_check(request)
            return self._error(404, "Not Found") if run is None else web.json_response(self._public(run))  # type: ignore[attr-defined]

    async def h_update_check_run(self, request: web.Request) -> web.Response:
        body = await _body(request)
        with self._review_state()["lock"]:
            run = self._find_check(request)
            if run is None:
                return self._error(404, "Not Found")  # type: ignore[attr-defined]
            refusal = self._apply_check(body, run)
            return refusal if refusal is not None else web.json_response(self._public(run))

    async def h_commit_check_runs(self, request: web.Request) -> web.Response:
        repo = self._repo(request)  # type: ignore[attr-defined]
        runs = [self._public(c) for c in self.check_runs(repo.full_name, request.match_info["ref"])]
        return web.json_response({"total_count": len(runs), "check_runs": runs})

    async def h_collaborator_permission(self, request: web.Request) -> web.Response:
        repo = self._repo(request)  # type: ignore[attr-defined]
        login = request.match_info["user"]
        state = self._review_state()
        with state["lock"]:
            default = "admin" if login.lower() in ("octocat", repo.owner.lower()) else "read"
            role = state["perms"].get((repo.full_name.lower(), login.lower()), default)
        permission = {"maintain": "write", "triage": "read"}.get(role, role)
        return web.json_response({"permission": permission, "role_name": role,
                                  "user": self._user(login)})  # type: ignore[attr-defined]

    async def h_contents(self, request: web.Request) -> web.Response:
        repo = self._repo(request)  # type: ignore[attr-defined]
        path = request.match_info["path"]
        ref = request.query.get("ref", "main")
        with self._lock:  # type: ignore[attr-defined]
            for pr in repo.pulls.values():  # a commit sha reads as its branch
                ref = pr.head_ref if ref == pr.head_sha else pr.base_ref if ref == pr.base_sha else ref
        with self._review_state()["lock"]:
            text = self._review_state()["files"].get((repo.full_name.lower(), ref), {}).get(path)
        if text is None:
            return self._error(404, "Not Found")  # type: ignore[attr-defined]
        if "raw" in request.headers.get("Accept", ""):
            return web.Response(text=text, content_type="application/vnd.github.raw", charset="utf-8")
        data = text.encode()
        return web.json_response({"type": "file", "encoding": "base64", "size": len(data), "name": path.rsplit("/", 1)[-1],
                                  "path": path, "sha": hashlib.sha1(data).hexdigest(),
                                  "content": base64.encodebytes(data).decode()})

    async def h_update_pull(self, request: web.Request) -> web.Response:
        data = await _body(request)
        err = self._error  # type: ignore[attr-defined]
        with self._lock:  # type: ignore[attr-defined]
            repo, pr = self._pr(request)  # type: ignore[attr-defined]
            if "title" in data and (not isinstance(data["title"], str) or not data["title"].strip()):
                return err(422, "Validation Failed: title")
            if "body" in data and data["body"] is not None and not isinstance(data["body"], str):
                return err(422, "Validation Failed: body")
            if len(data.get("body") or "") > 65536:
                return err(422, "Validation Failed: body is too long (maximum is 65536 characters)")
            if "title" in data:
                pr.title = repo.issues[pr.number].title = data["title"]
            if "body" in data:
                pr.body = repo.issues[pr.number].body = data["body"] or ""
            pr.updated_at = time.time()
            return web.json_response(self.pull_json(repo, pr, self._base(request)))  # type: ignore[attr-defined]

    async def h_review_comment_reply(self, request: web.Request) -> web.Response:
        body = (await _body(request)).get("body")
        if not isinstance(body, str) or not body:
            return self._error(422, "Validation Failed: body")  # type: ignore[attr-defined]
        with self._lock:  # type: ignore[attr-defined]
            repo, pr = self._pr(request)  # type: ignore[attr-defined]
            target = next((c for c in repo.review_comments.get(pr.number, []) if c["id"] == int(request.match_info["cid"])), None)
            if target is None:
                return self._error(404, "Not Found")  # type: ignore[attr-defined]
            reply = {**target, "id": self._next_id(), "body": body, "in_reply_to_id": target["id"],  # type: ignore[attr-defined]
                     "user": self.bot_user(), "created_at": _now(), "updated_at": _now()}  # type: ignore[attr-defined]
            repo.review_comments[pr.number].append(reply)
            return web.json_response(reply, status=201)
