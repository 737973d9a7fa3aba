"""The flows.yaml schema.

Deny by default, like Spin's manifest: a flow gets no HTTP host, model, key-value store, directory or
secret it does not list under `allow:` / `secrets:`. Every model forbids unknown keys, so a typo is an
error instead of a silently ignored setting.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from datetime import datetime
from typing import Annotated, Any, Callable, Literal, NamedTuple, Optional, Union
from zoneinfo import ZoneInfo

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2, "gb": 1000**3, "gib": 1024**3}
# Outer bounds of any duration or size in the file, whatever the field: past them timers and the
# database overflow. Each field narrows them to what makes sense for it (see the *_in types below).
MAX_DURATION = 366 * 86400.0
MAX_SIZE = 1024**4
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_CATCH_UP = 31 * 86400.0  # a schedule may make up for an outage of at most a month
MAX_CRON_CHARS = 200


def abbreviate(value: Any, limit: int = 40) -> str:
    """A value for an error message, cut short: hostile input must not be echoed back whole."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


def format_duration(seconds: float) -> str:
    """`30s`, `5m`, `250ms`, `1d`: a duration as flows.yaml would write it."""
    if seconds == 0:
        return "0s"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s" if seconds >= 1 else f"{seconds * 1000:g}ms"


def format_size(size: int) -> str:
    """`64KiB`, `4GiB`, `1048577B`: a size as flows.yaml would write it."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def parse_duration(value: Any) -> float:
    """Seconds from `300`, `300s`, `1.5m`, `250ms`, `2h`, `1d`: finite, not negative, at most 366d."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s, 5m or 250ms")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"expected a duration like 30s, 5m or 250ms, got {abbreviate(value)}")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"expected a finite duration like 30s, got {abbreviate(value)}")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    if seconds > MAX_DURATION:
        raise ValueError(f"a duration of at most {format_duration(MAX_DURATION)} is expected, got {abbreviate(value)}")
    return seconds


def parse_size(value: Any) -> int:
    """Bytes from `1048576`, `512MiB`, `1GB`, `64KiB`: not negative, at most 1 TiB."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 512MiB or 64KiB")
    if isinstance(value, int):
        size = value
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"expected a finite size like 512MiB, got {abbreviate(value)}")
        size = int(min(value, MAX_SIZE + 1.0))
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ValueError(f"expected a size like 512MiB or 64KiB, got {abbreviate(value)}")
        number = float(match.group(1))
        if not math.isfinite(number):
            raise ValueError(f"a size of at most {format_size(MAX_SIZE)} is expected, got {abbreviate(value)}")
        size = int(number * _SIZE_UNITS[(match.group(2) or "b").lower()])
    if size < 0:
        raise ValueError("a size cannot be negative")
    if size > MAX_SIZE:
        raise ValueError(f"a size of at most {format_size(MAX_SIZE)} is expected, got {abbreviate(value)}")
    return size


def _between(lo: Any, hi: Any, show: Callable[[Any], str], what: str) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if not lo <= value <= hi:
            raise ValueError(f"{what} from {show(lo)} to {show(hi)} is expected, got {show(value)}")
        return value

    return check


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected a number, not true/false")
    return value


def duration_in(lo: float, hi: float) -> Any:
    """A duration field allowed from `lo` to `hi` seconds; the message names the range."""
    check = _between(lo, hi, format_duration, "a duration")
    return Annotated[float, BeforeValidator(parse_duration), AfterValidator(check)]


def size_in(lo: int, hi: int) -> Any:
    """A size field allowed from `lo` to `hi` bytes; the message names the range."""
    return Annotated[int, BeforeValidator(parse_size), AfterValidator(_between(lo, hi, format_size, "a size"))]


def int_in(lo: int, hi: int) -> Any:
    """An integer field allowed from `lo` to `hi`; the message names the range."""
    return Annotated[int, BeforeValidator(_no_bool), AfterValidator(_between(lo, hi, str, "an integer"))]


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class FieldError(ValueError):
    """A ValueError about one part of a model's input, given as `loc` relative to that model.

    A model-level validator can only fail the whole model, which would point the user at the top of it;
    pydantic keeps the exception in the error's ctx, so the loader appends `loc` and reports the line of
    the entry that is actually wrong.
    """

    def __init__(self, message: str, loc: tuple[Union[str, int], ...]) -> None:
        super().__init__(message)
        self.loc = loc


# GitHub's repository and organization permission names for Apps, as its REST API spells them (account
# permissions such as email_addresses are not for an installation's token and are left out).
GITHUB_PERMISSIONS = frozenset({
    # repository
    "actions", "actions_variables", "administration", "artifact_metadata", "attestations", "checks",
    "codespaces", "codespaces_lifecycle_admin", "codespaces_metadata", "codespaces_secrets", "contents",
    "custom_properties", "dependabot_secrets", "deployments", "discussions", "environments", "issues",
    "merge_queues", "metadata", "packages", "pages", "pull_requests", "repository_advisories",
    "repository_custom_properties", "repository_hooks", "repository_projects", "secret_scanning_alerts",
    "secrets", "security_events", "single_file", "statuses", "team_discussions", "vulnerability_alerts",
    "workflows",
    # organization
    "custom_properties_for_organizations", "members", "organization_actions_variables",
    "organization_administration", "organization_announcement_banners", "organization_campaigns",
    "organization_codespaces", "organization_codespaces_secrets", "organization_codespaces_settings",
    "organization_copilot_agent_settings", "organization_copilot_seat_management",
    "organization_custom_org_roles", "organization_custom_properties", "organization_custom_roles",
    "organization_dependabot_secrets", "organization_events", "organization_hooks", "organization_packages",
    "organization_personal_access_token_requests", "organization_personal_access_tokens", "organization_plan",
    "organization_projects", "organization_secrets", "organization_self_hosted_runners",
    "organization_user_blocking",
})

# Options the platform reads from `models.*.options` and `llm.*.options`: name -> (kind, low, high).
_Option = tuple[str, Any, Any]
_GGML_OPTIONS: dict[str, _Option] = {
    "n-gpu-layers": ("int", -1, 100_000), "main-gpu": ("int", 0, 1024), "ctx-size": ("int", 0, 4_194_304),
    "batch-size": ("int", 1, 4_194_304), "ubatch-size": ("int", 1, 4_194_304), "threads": ("int", 1, 1024),
    "parallel": ("int", 1, 64), "n-predict": ("int", -2, 4_194_304), "top-k": ("int", 0, 1_000_000),
    "seed": ("int", -1, 2**32 - 1), "temp": ("number", 0, 100), "top-p": ("number", 0, 1),
    "min-p": ("number", 0, 1), "repeat-penalty": ("number", 0, 100), "presence-penalty": ("number", -100, 100),
    "frequency-penalty": ("number", -100, 100), "embedding": ("bool", None, None),
    "stream-stdout": ("bool", None, None), "ignore-eos": ("bool", None, None), "enable-log": ("bool", None, None),
    "enable-debug-log": ("bool", None, None),
    # continuous batching (wasi_nn/batch_scheduler.py)
    "batching": ("bool", None, None), "sequences": ("int", 1, 64), "kv-size": ("int", 16, 4_194_304),
    "prefix-cache-mib": ("int", 0, 65_536),
}
_GGML_ALIASES = {"ngl": "n-gpu-layers"}
_ONNX_OPTIONS: dict[str, _Option] = {"threads": ("int", 1, 1024)}
_LLM_OPTIONS: dict[str, _Option] = {  # the OpenAI API's ranges
    "context": ("int", 1, 16_777_216), "max_tokens": ("int", 1, 4_194_304), "temperature": ("number", 0, 2),
    "top_p": ("number", 0, 1), "presence_penalty": ("number", -2, 2), "frequency_penalty": ("number", -2, 2),
    "seed": ("int", INT64_MIN, INT64_MAX),
}


def _check_option(value: Any, option: _Option) -> Optional[str]:
    """What is wrong with one option value, or None."""
    kind, lo, hi = option
    if kind == "bool":
        return None if isinstance(value, bool) else f"expected true or false, got {abbreviate(value)}"
    ok_type = isinstance(value, int) if kind == "int" else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not lo <= value <= hi:
        article = "an integer" if kind == "int" else "a number"
        return f"{article} from {lo} to {hi} is expected, got {abbreviate(value)}"
    return None


def _check_options(options: dict[str, Any], known: dict[str, _Option], normalise: Callable[[str], str] = str) -> None:
    for key, value in options.items():
        option = known.get(normalise(key))
        problem = _check_option(value, option) if option else None
        if problem:
            raise FieldError(problem, ("options", key))


def _ggml_name(key: str) -> str:
    return _GGML_ALIASES.get(key, key.replace("_", "-"))


def _check_app_id(value: Any) -> Any:
    """The App's numeric id (0: no App, as `${GITHUB_APP_ID:-0}` gives) or, as text, its id or client id."""
    number = int(value) if isinstance(value, str) and value.strip().isdigit() and len(value) < 40 else value
    if isinstance(value, (bool, float)) or (isinstance(number, int) and not 0 <= number <= INT64_MAX):
        raise ValueError(f"expected the App's id, an integer from 0 to {INT64_MAX}, got {abbreviate(value)}")
    if isinstance(value, str) and len(value) > 64:
        raise ValueError(f"expected the App's id or client id (at most 64 characters), got {abbreviate(value)}")
    return value


def _check_github_permissions(value: Any) -> Any:
    """Keys of `allow.github` must be GitHub App permissions: a typo would otherwise grant nothing, silently."""
    if not isinstance(value, dict):
        return value
    for key in value:
        if isinstance(key, str) and key in GITHUB_PERMISSIONS:
            continue
        close = difflib.get_close_matches(str(key), sorted(GITHUB_PERMISSIONS), n=1, cutoff=0.6)
        hint = f", did you mean {close[0]!r}?" if close else ""
        if not close:
            from wasmflow.host_functions.github import FAMILIES

            family = FAMILIES.get(str(key))
            hint = f" ({key} is an API path; its permission is {family!r})" if family else ""
        raise FieldError(f"{abbreviate(key)} is not a GitHub App permission{hint} (expected a repository or "
                         "organization permission such as pull_requests, issues, contents, checks, metadata)",
                         (key,))
    return value


# Item validators run per list element, so an error's loc carries the index and points at its line.
def _check_name(value: str) -> str:
    if not re.match(NAME_PATTERN, value):
        raise ValueError(f"expected a name of lowercase letters, digits, - and _ (at most 63, starting "
                         f"with a letter or digit) such as code-review, got {value!r}")
    return value


def _check_event(value: str) -> str:
    if not re.fullmatch(r"[a-z_]+(\.[a-z_]+)?|\*", value):
        raise ValueError(f"expected event or event.action like pull_request.opened, got {value!r}")
    return value


def _check_http(value: str) -> str:
    from wasmflow.host_functions.http_allow import parse_pattern

    parse_pattern(value)  # raises ValueError with the expected form
    return value


class DirGrant(NamedTuple):
    """One `allow.dirs` entry, `host_path:guest_path[:ro]`: the host directory preopened at `guest`."""

    host: str
    guest: str
    read_only: bool

    @staticmethod
    @functools.lru_cache(maxsize=1024)
    def parse(value: str) -> "DirGrant":
        """The one parser of the entry form (validation at load and every engine use it); ValueError if
        malformed. Cached: engines ask for a flow's grants on every run."""
        parts = value.split(":")
        if len(parts) not in (2, 3) or not parts[0] or not parts[1] or (len(parts) == 3 and parts[2] != "ro"):
            raise ValueError(f"expected host_path:guest_path[:ro], got {value!r}")
        return DirGrant(parts[0], parts[1], len(parts) == 3)


def _check_dir(value: str) -> str:
    DirGrant.parse(value)
    return value


def _check_env_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        raise ValueError(f"expected an environment variable name, got {value!r}")
    return value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(Strict):
    timeout: duration_in(0.001, 86400.0) = 30.0
    memory: size_in(64 * 1024, 4 * 1024**3) = 256 * 1024**2  # one wasm page to the wasm32 address space
    table_elements: int_in(1, 10_000_000) = 100_000
    output: size_in(0, 64 * 1024**2) = 1024**2
    # What a guest may push out per run (docs/security.md): over a cap the call answers LIMIT or TOO_LARGE,
    # and what was cut is marked and counted (wasmflow_guest_output_truncated_total).
    log_lines: int_in(0, 1_000_000) = 1000
    log_bytes: size_in(0, 256 * 1024**2) = 1024**2
    response_headers: int_in(0, 10_000) = 64
    response_header_bytes: size_in(0, 16 * 1024**2) = 64 * 1024
    response_body: size_in(0, 1024**3) = 8 * 1024**2
    # The run's transcript of host calls (offline replay, docs/replay.md): past it the transcript is marked
    # truncated and a replay says it cannot be exact; 0 records nothing.
    transcript: size_in(0, 1024**3) = 4 * 1024**2


class Retry(Strict):
    attempts: int_in(1, 100) = 3
    backoff: Literal["exponential", "fixed"] = "exponential"
    initial: duration_in(0.0, 3600.0) = 1.0
    max: duration_in(0.0, 86400.0) = 300.0
    # What is retried: timeouts and host-side transient errors by default; traps (a bug) only if listed.
    on: list[Literal["timeout", "upstream", "trap", "oom", "error", "denied"]] = ["timeout", "upstream"]

    @model_validator(mode="after")
    def _order(self) -> "Retry":
        if self.initial > self.max:
            raise FieldError(f"retry.initial ({format_duration(self.initial)}) is longer than retry.max "
                             f"({format_duration(self.max)}); every wait would be cut to retry.max", ("initial",))
        return self


class GithubTrigger(Strict):
    # "pull_request", "pull_request.opened", "issue_comment.created"
    events: list[Annotated[str, AfterValidator(_check_event)]] = Field(min_length=1)
    repos: list[str] = ["*/*"]


class ScheduleTrigger(Strict):
    cron: str
    timezone: str = "UTC"
    overlap: Literal["skip", "queue", "allow"] = "skip"
    catch_up: duration_in(0.0, MAX_CATCH_UP) = 0.0

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        from croniter import croniter

        if len(value) > MAX_CRON_CHARS:
            raise ValueError(f"a cron expression of at most {MAX_CRON_CHARS} characters is expected, "
                             f"got {len(value)}")
        if not croniter.is_valid(value):
            raise ValueError(f"not a valid cron expression: {abbreviate(value)} (expected e.g. '0 9 * * MON')")
        return value

    @model_validator(mode="after")
    def _fires(self) -> "ScheduleTrigger":
        """Refuse a schedule that never fires (31 February, a year gone by): the scheduler could only
        fail on it, pass after pass."""
        from croniter import CroniterError, croniter

        try:
            croniter(self.cron, datetime.now(ZoneInfo(self.timezone))).get_next(datetime)
        except CroniterError:
            raise FieldError(f"cron {self.cron!r} never fires: no date from now on matches it (such as "
                             "31 February, or a year gone by); fix its day, month or year", ("cron",)) from None
        return self

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        from zoneinfo import ZoneInfo

        try:
            ZoneInfo(value)
        except Exception:
            raise ValueError(f"unknown time zone {abbreviate(value)} (expected e.g. Europe/Berlin or UTC)") from None
        return value


class HttpTrigger(Strict):
    methods: list[Literal["GET", "POST", "PUT", "PATCH", "DELETE"]] = ["GET", "POST"]


class Trigger(Strict):
    """One entry of `on:`; exactly one of its keys is set."""

    github: Optional[GithubTrigger] = None
    schedule: Optional[ScheduleTrigger] = None
    http: Optional[HttpTrigger] = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        """`- http` and `- http:` (no settings) mean the trigger with its defaults, not "no trigger".

        Only a lone key is widened: a dumped Trigger lists the unset kinds as None and must stay as it is.
        """
        kinds = ("github", "schedule", "http")
        if isinstance(data, str) and data in kinds:
            return {data: {}}
        if isinstance(data, dict) and len(data) == 1:
            ((key, value),) = data.items()
            if key in kinds and value is None:
                return {key: {}}
        return data

    @model_validator(mode="after")
    def _one(self) -> "Trigger":
        set_ = [k for k in ("github", "schedule", "http") if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError("each trigger needs exactly one of: github, schedule, http")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("github", "schedule", "http") if getattr(self, k) is not None)


class NnAllow(Strict):
    """`allow.nn:` what a flow may do through WASI-NN beyond the named models of `allow.models`.

    Loading a graph from bytes (or from a file in `allow.dirs`) hands a guest-chosen model to ONNX
    Runtime's and llama.cpp's parsers, so it is a capability of its own, off unless granted.
    """

    load_bytes: bool = False
    max_bytes: Size = Field(default=64 * 1024**2, ge=1, le=4 * 1024**3)  # largest model a guest may load


class Allow(Strict):
    http: list[Annotated[str, AfterValidator(_check_http)]] = []  # scheme://host[:port], with * wildcards
    models: list[str] = []
    kv: bool = False
    github: Annotated[dict[str, Literal["read", "write"]],  # App permission → level, e.g. {pull_requests: write}
                      BeforeValidator(_check_github_permissions)] = {}
    github_repos: list[str] = []  # more repositories (owner/name globs) than the event's own
    dirs: list[Annotated[str, AfterValidator(_check_dir)]] = []  # "host_path:guest_path[:ro]"
    nn: NnAllow = NnAllow()

    @property
    def dir_grants(self) -> list[DirGrant]:
        """`dirs` parsed (validated at load): what engines preopen and WASI-NN maps guest paths through."""
        return [DirGrant.parse(d) for d in self.dirs]


class LlmEndpoint(Strict):
    """Where a flow's `llm_chat` / `llm_embed` calls go; chosen by the operator, never by the guest.

    With `base_url`, any OpenAI-compatible API (OpenAI, wasmflow's own /v1, llama.cpp server, Ollama)
    through the `openai` package, `model` being the id sent to it. Without, `model` names an entry of
    `models:` (listed in the flow's `allow.models`) run in-process by the WASI-NN back end.
    """

    model: str
    base_url: Optional[str] = None
    api_key_secret: Optional[str] = None  # env var holding the key; read by the host, never shown to the guest
    timeout: duration_in(0.001, 3600.0) = 120.0
    options: dict[str, Any] = {}  # defaults for requests: temperature, max_tokens, ...

    @model_validator(mode="after")
    def _options(self) -> "LlmEndpoint":
        _check_options(self.options, _LLM_OPTIONS)
        return self

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not value.strip():
            return None  # `${VAR:-}` left empty: the local route
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"expected an http(s) URL like https://api.openai.com/v1, got {value!r}")
        return value

    @field_validator("api_key_secret")
    @classmethod
    def _secret(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not value.strip():
            return None
        if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError(f"expected an environment variable name, got {value!r}")
        return value


class LlmSettings(Strict):
    """`llm:` of a flow: the endpoint for chat and the one for embeddings (each optional)."""

    chat: Optional[LlmEndpoint] = None
    embeddings: Optional[LlmEndpoint] = None


def _check_key(value: Optional[str]) -> Optional[str]:
    from .keys import parse_template

    if value is not None:
        parse_template(value)  # KeyTemplateError is a ValueError: pydantic reports it at the field
    return value


KeyText = Annotated[str, AfterValidator(_check_key)]
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*(?:\.\d+)?\s*(?:ms|s|m|h|d))\s*$")


class Concurrency(Strict):
    """`concurrency:` how runs of the flow that share a key relate (docs/control-plane.md).

    At most `limit` run at once per key, across every worker. A new run over the limit: `queue` waits
    its turn; `cancel-running` cancels the running ones (the newest event wins); `skip-new` is not run
    (recorded `cancelled`, skipped); `replace-queued` replaces the runs of the key still waiting.
    """

    key: Optional[KeyText] = None  # None: one key for the whole flow
    limit: int_in(1, 10_000) = 1
    on_conflict: Literal["queue", "cancel-running", "skip-new", "replace-queued"] = "queue"


class Debounce(Strict):
    """`debounce:` events of one key arriving within `period` of each other become one run, on the
    newest event; a run still starts at the latest `max_wait` after its first event."""

    period: duration_in(0.001, 86400.0)
    max_wait: Optional[duration_in(0.001, 7 * 86400.0)] = None
    key: Optional[KeyText] = None  # default: the concurrency key (they must agree)

    @model_validator(mode="after")
    def _order(self) -> "Debounce":
        if self.max_wait is not None and self.max_wait < self.period:
            raise FieldError(f"debounce.max_wait ({format_duration(self.max_wait)}) is shorter than its period "
                             f"({format_duration(self.period)}); no event could ever be merged", ("max_wait",))
        return self


class Rate(Strict):
    """`rate: 30/h` (or `{limit: 30, per: 1h, key: ...}`): runs started per key and period; over it a run
    is recorded `denied` and never executed."""

    limit: int_in(1, 1_000_000)
    per: duration_in(0.001, 366 * 86400.0)
    key: Optional[KeyText] = None  # default: the concurrency key

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, str):
            match = _RATE.match(data)
            if not match:
                raise ValueError(f"expected a rate like 30/h, 100/d or 5/10m, got {abbreviate(data)}")
            count, per = match.groups()
            per = per.strip()
            return {"limit": int(count), "per": per if per[0].isdigit() else f"1{per}"}
        return data


class Budget(Strict):
    """`budget: {llm_tokens: 200000, per: 1d, key: "{installation}"}`: LLM tokens the flow's runs of one key
    may spend per period; once spent, LLM calls are refused ("budget exhausted")."""

    llm_tokens: int_in(1, 10**12)
    per: duration_in(1.0, 366 * 86400.0)
    key: Optional[KeyText] = None  # default: the concurrency key


class Flow(Strict):
    name: Annotated[str, AfterValidator(_check_name)]
    module: str  # a crate directory to build (guest-examples/hello) or a .wasm path
    engine: Optional[Literal["wasmtime", "wasmedge"]] = None
    on: list[Trigger] = []
    allow: Allow = Allow()
    config: dict[str, Any] = {}
    secrets: list[Annotated[str, AfterValidator(_check_env_name)]] = []
    args: list[str] = []
    limits: Limits = Limits()
    retry: Retry = Retry()
    llm: Optional[LlmSettings] = None
    concurrency: Optional[Concurrency] = None
    debounce: Optional[Debounce] = None
    rate: Optional[Rate] = None
    budget: Optional[Budget] = None

    @model_validator(mode="after")
    def _key_fields(self) -> "Flow":
        """A key field no event of the flow's triggers can carry is an error: every run would share a key."""
        from .keys import check_fields, parse_template

        github = [e for t in self.on if t.github is not None for e in t.github.events]
        schedule = any(t.schedule is not None for t in self.on)
        open_body = not self.on or any(t.http is not None for t in self.on)
        first: Optional[tuple[str, str]] = None
        for section in ("concurrency", "debounce", "rate", "budget"):
            key = getattr(getattr(self, section), "key", None)
            if key is None:
                continue
            problem = check_fields(parse_template(key), github, schedule, open_body)
            if problem:
                raise FieldError(problem, (section, "key"))
            if section == "budget":
                continue
            if first is not None and key != first[1]:
                raise FieldError(f"{section}.key {key!r} differs from {first[0]}.key {first[1]!r}: concurrency, "
                                 f"debounce and rate group runs by one key; give it once", (section, "key"))
            first = first or (section, key)
        return self

    @property
    def run_key(self) -> Optional[str]:
        """The key template runs are grouped by for `concurrency`, `debounce` and `rate` (None: one key)."""
        for section in ("concurrency", "debounce", "rate"):
            key = getattr(getattr(self, section), "key", None)
            if key is not None:
                return key
        return None

    @property
    def budget_key(self) -> Optional[str]:
        """The key template of `budget` (its own, else the run key)."""
        own = self.budget.key if self.budget is not None else None
        return own or self.run_key


class ModelSpec(Strict):
    backend: Literal["ggml", "onnx"]
    path: str
    target: Literal["cpu", "gpu", "auto"] = "auto"
    options: dict[str, Any] = {}

    @model_validator(mode="after")
    def _options(self) -> "ModelSpec":
        if self.backend == "ggml":
            _check_options(self.options, _GGML_OPTIONS, _ggml_name)
        else:
            _check_options(self.options, _ONNX_OPTIONS)
        return self


class GithubApp(Strict):
    app_id: Annotated[Union[int, str], BeforeValidator(_check_app_id)]
    private_key: str  # a path to a PEM file, or the PEM itself
    webhook_secret: str
    api_url: str = "https://api.github.com"
    # GitHub's web pages (the App manifest form): derived from api_url when unset (github.com for
    # api.github.com, https://HOST for https://HOST/api/v3); set it for other layouts.
    web_url: Optional[str] = None
    bot_login: Optional[str] = None
    min_write_interval: duration_in(0.0, 60.0) = 1.0  # GitHub asks for a second between content-creating requests


class ConsoleSettings(Strict):
    """`console:` - the web console's operator token (`${WASMFLOW_CONSOLE_TOKEN}`); empty: none set, and
    `wasmflow up` prints a one-time login link instead (on loopback only)."""

    token: Optional[str] = None

    @field_validator("token")
    @classmethod
    def _token(cls, value: Optional[str]) -> Optional[str]:
        if value is None or value == "":
            return None
        if len(value) < 16 or value != value.strip():
            raise ValueError("console.token must be at least 16 characters without surrounding spaces "
                             "(generate one: python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        return value


class FlowsFile(Strict):
    version: Literal[1] = 1
    engine: Literal["wasmtime", "wasmedge"] = "wasmtime"
    state_dir: str = ".wasmflow"
    models: dict[str, ModelSpec] = {}
    github: Optional[GithubApp] = None
    flows: list[Flow] = []
    console: ConsoleSettings = ConsoleSettings()

    @model_validator(mode="after")
    def _unique(self) -> "FlowsFile":
        seen: set[str] = set()
        for i, flow in enumerate(self.flows):
            if flow.name in seen:
                raise FieldError(f"flow name {flow.name!r} is used twice; flow names must be unique",
                                 ("flows", i, "name"))
            seen.add(flow.name)
            for j, model in enumerate(flow.allow.models):
                if model not in self.models:
                    known = ", ".join(self.models) or "none defined"
                    raise FieldError(f"flow {flow.name!r} allows model {model!r}, which `models:` does not "
                                     f"define (models: {known})", ("flows", i, "allow", "models", j))
            for kind in ("chat", "embeddings"):
                endpoint = getattr(flow.llm, kind, None) if flow.llm else None
                if endpoint is not None and endpoint.base_url is None and endpoint.model not in flow.allow.models:
                    raise FieldError(f"flow {flow.name!r}: llm.{kind} uses the local model {endpoint.model!r}, "
                                     f"which the flow's allow.models does not list (or set llm.{kind}.base_url "
                                     f"for an OpenAI-compatible endpoint)", ("flows", i, "llm", kind, "model"))
        return self

    def flow(self, name: str) -> Flow:
        for flow in self.flows:
            if flow.name == name:
                return flow
        known = ", ".join(f.name for f in self.flows) or "none"
        raise KeyError(f"no flow named {name!r} (flows: {known})")
