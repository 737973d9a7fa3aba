"""The GitHub App's credentials as the one-click registration stores them in the state directory.

`wasmflow github register` and the console's `/setup` turn GitHub's manifest code into an App id, a private
key, a webhook secret and client credentials. They are kept in `<state_dir>/github-app/` (a 0700 directory
of 0600 files, like ~/.ssh), so no secret has to be copied into flows.yaml or the environment by hand:
the loader fills the `github:` section's unset fields from here (`fill_github`); values written in
flows.yaml (or given by its `${VAR}`s) win.

This module is the format's one reader and writer; it sits beside the loader (which reads it) and below
the platform (which writes it).
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from .model import GithubApp

DIR_NAME = "github-app"
META_FILE = "app.json"
KEY_FILE = "private-key.pem"
WEBHOOK_SECRET_FILE = "webhook-secret"
CLIENT_SECRET_FILE = "client-secret"
DEFAULT_API_URL = "https://api.github.com"
MAX_FILE_BYTES = 64 * 1024  # a PEM is ~1.7 KB; a larger file is not ours


class CredentialsError(Exception):
    """The stored credentials are unusable (unreadable, malformed, or readable by other users)."""


@dataclass(frozen=True)
class StoredApp:
    """What GitHub's conversion answered, minus the secrets (those stay in their own files)."""

    app_id: int
    slug: str
    name: str
    html_url: str
    client_id: str
    owner: str
    api_url: str
    web_url: str
    created_at: float
    directory: Path

    @property
    def private_key_path(self) -> Path:
        return self.directory / KEY_FILE

    @property
    def install_url(self) -> str:
        """Where the operator installs the App on repositories: GitHub's `/installations/new` of the App."""
        return f"{self.html_url.rstrip('/')}/installations/new"

    def webhook_secret(self) -> str:
        return _read_secret(self.directory / WEBHOOK_SECRET_FILE)

    def client_secret(self) -> str:
        return _read_secret(self.directory / CLIENT_SECRET_FILE)


def credentials_dir(state_dir: Path) -> Path:
    return Path(state_dir) / DIR_NAME


def save_app(state_dir: Path, conversion: Mapping[str, Any], api_url: str, web_url: str) -> StoredApp:
    """Store GitHub's answer to `POST /app-manifests/{code}/conversions`; returns what was stored.

    Files are written owner-only from the start (created 0600 inside a 0700 directory, never widened by
    the umask) and replaced atomically, so a crash leaves the previous App or the new one, not half of
    each. A previously stored App is kept beside it (`github-app.replaced-<time>`), never overwritten:
    its private key cannot be downloaded from GitHub again.
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    target = credentials_dir(state_dir)
    staging = state_dir / f".{DIR_NAME}.{os.getpid()}.{time.monotonic_ns()}"
    os.mkdir(staging, 0o700)
    os.chmod(staging, 0o700)
    owner = conversion.get("owner")
    meta = {
        "app_id": int(conversion["id"]),
        "slug": str(conversion["slug"]),
        "name": str(conversion.get("name") or conversion["slug"]),
        "html_url": str(conversion["html_url"]),
        "client_id": str(conversion["client_id"]),
        "owner": str(owner.get("login", "")) if isinstance(owner, dict) else "",
        "api_url": api_url.rstrip("/"),
        "web_url": web_url.rstrip("/"),
        "created_at": time.time(),
    }
    _write_private(staging / META_FILE, json.dumps(meta, indent=2) + "\n")
    _write_private(staging / KEY_FILE, str(conversion["pem"]).strip() + "\n")
    _write_private(staging / WEBHOOK_SECRET_FILE, str(conversion["webhook_secret"]))
    _write_private(staging / CLIENT_SECRET_FILE, str(conversion["client_secret"]))
    if target.exists() or target.is_symlink():
        os.rename(target, state_dir / f"{DIR_NAME}.replaced-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    os.rename(staging, target)
    return _stored(meta, target)


def load_app(state_dir: Path) -> Optional[StoredApp]:
    """The stored App, or None when none was registered. CredentialsError when the files are unusable
    or other users can read them (as ssh refuses a key others can read: the secret may already be out)."""
    directory = credentials_dir(state_dir)
    try:
        info = os.lstat(directory)
    except ValueError:  # a NUL byte: no such path can exist
        return None
    except OSError as exc:  # missing, or a state_dir no directory can have (too long, through a file): none
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise CredentialsError(f"cannot read {directory}: {exc.strerror}") from None
        return None
    if not stat.S_ISDIR(info.st_mode):
        raise CredentialsError(f"{directory} is not a directory (a link or a file); remove it and run "
                               "`wasmflow github register` again")
    _check_private(directory, info, "700")
    meta_text = _read_private(directory / META_FILE)
    try:
        meta = json.loads(meta_text)
        stored = _stored(meta, directory)
    except (ValueError, KeyError, TypeError):
        raise CredentialsError(f"{directory / META_FILE} is not what `wasmflow github register` writes; "
                               "run it again (or remove the directory)") from None
    for name in (KEY_FILE, WEBHOOK_SECRET_FILE, CLIENT_SECRET_FILE):
        _read_private(directory / name)  # present, owner-only, readable
    return stored


def fill_github(section: Optional[GithubApp], stored: Optional[StoredApp], base_dir: Path) -> Optional[GithubApp]:
    """flows.yaml's `github:` with its unset fields taken from the stored App; explicit values win.

    Unset means what flows.yaml's `${VAR:-default}`s give when the variable is not set: an App id of 0
    or empty, an empty webhook secret, an empty private key or a key path that names no file. The API URL
    follows the stored App when its id was taken from the store and flows.yaml leaves the URL at its
    default (an App registered on GitHub Enterprise lives there). No section at all and a stored App:
    the section is made from the store.
    """
    if stored is None:
        return section
    if section is None:
        return GithubApp(app_id=stored.app_id, private_key=str(stored.private_key_path),
                         webhook_secret=stored.webhook_secret(), api_url=stored.api_url)
    update: dict[str, Any] = {}
    if str(section.app_id).strip() in ("", "0"):
        update["app_id"] = stored.app_id
        if section.api_url.rstrip("/") == DEFAULT_API_URL:
            update["api_url"] = stored.api_url
    if not section.webhook_secret:
        update["webhook_secret"] = stored.webhook_secret()
    key = section.private_key.strip()
    if not key or (not key.startswith("-----BEGIN") and not _names_file(key, base_dir)):
        update["private_key"] = str(stored.private_key_path)
    return section.model_copy(update=update) if update else section


def _names_file(value: str, base_dir: Path) -> bool:
    path = Path(value)
    try:
        return (path if path.is_absolute() else base_dir / path).is_file()
    except (OSError, ValueError):  # a name too long, a NUL byte: not a file
        return False


def _stored(meta: Mapping[str, Any], directory: Path) -> StoredApp:
    fields = {k: meta[k] for k in ("app_id", "slug", "name", "html_url", "client_id", "owner", "api_url",
                                   "web_url", "created_at")}
    if not isinstance(fields["app_id"], int) or isinstance(fields["app_id"], bool) or fields["app_id"] <= 0:
        raise ValueError("app_id")
    for key in ("slug", "name", "html_url", "client_id", "owner", "api_url", "web_url"):
        if not isinstance(fields[key], str):
            raise ValueError(key)
    if not re.match(r"^https?://", fields["api_url"]):
        raise ValueError("api_url")
    return StoredApp(directory=directory, created_at=float(fields.pop("created_at")), **fields)


def as_dict(stored: StoredApp) -> dict[str, Any]:
    """The stored App without secrets, for JSON answers and tables."""
    out = asdict(stored)
    out["directory"] = str(stored.directory)
    out["install_url"] = stored.install_url
    return out


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_private(path: Path, info: os.stat_result, mode: str) -> None:
    if info.st_uid != os.getuid():
        raise CredentialsError(f"{path} belongs to another user (uid {info.st_uid}); the App's credentials "
                               "must be the owner's alone")
    if info.st_mode & 0o077:
        raise CredentialsError(f"{path} can be read by other users (mode {stat.S_IMODE(info.st_mode):o}); "
                               f"run `chmod {mode} {path}`, and if others could log in here, register a new "
                               "App or generate a new key and webhook secret on GitHub")


def _read_private(path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise CredentialsError(f"{path} is missing; run `wasmflow github register` again") from None
    except OSError as exc:
        raise CredentialsError(f"cannot read {path}: {exc.strerror} (a link is refused)") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CredentialsError(f"{path} is not a plain file")
        _check_private(path, info, "600")
        data = os.read(fd, MAX_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise CredentialsError(f"{path} is larger than {MAX_FILE_BYTES // 1024} KiB; it is not ours")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise CredentialsError(f"{path} is not text; run `wasmflow github register` again") from None


def _read_secret(path: Path) -> str:
    return _read_private(path).strip()
