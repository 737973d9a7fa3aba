"""The flows.yaml schema.

Deny by default, like Spin's manifest: a flow gets no HTTP host, model, key-value store, directory or
secret it does not list under `allow:` / `secrets:`. Every model forbids unknown keys, so a typo is an
error instead of a silently ignored setting.

A capability owns its section: `allow.kv` (host_functions/kv.py), `allow.http` (http_allow.py),
`allow.github`/`allow.github_repos` and the file's `github:` (github.py), a flow's `llm:` (llm.py),
the file's `models:` and a flow's `allow.models`/`allow.nn` (wasi_nn/settings.py); this module
assembles them (`Allow` is made of the capabilities' parts) with what belongs to the flow itself
(triggers, limits, retry, concurrency, preopened directories). The field types they share are in
wasmflow/fields.py.
"""

from __future__ import annotations

import functools
import re
from datetime import datetime
from typing import Annotated, Any, Literal, NamedTuple, Optional
from zoneinfo import ZoneInfo

from pydantic import AfterValidator, Field, field_validator, model_validator

from wasmflow.fields import FieldError, Section, abbreviate, duration_in, format_duration, int_in, size_in
# The capabilities' sections; `GithubApp` keeps its name here, where the file's `github:` is read.
from wasmflow.host_functions.github import GithubAllow, GithubAppSettings as GithubApp
from wasmflow.host_functions.http_allow import HttpAllow
from wasmflow.host_functions.kv import KvAllow
from wasmflow.host_functions.llm import LlmEndpoint, LlmSettings  # noqa: F401  (LlmEndpoint: for importers)
from wasmflow.wasi_nn.settings import ModelSpec, WasiNnAllow

Strict = Section  # the sections of this module, as strict as the capabilities' own

MAX_CATCH_UP = 31 * 86400.0  # a schedule may make up for an outage of at most a month
MAX_CRON_CHARS = 200


NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"


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


class Allow(HttpAllow, KvAllow, GithubAllow, WasiNnAllow):
    """`allow:` of a flow: the capabilities' parts (`http`, `kv`, `github`, `github_repos`, `models`,
    `nn`) and the grant this layer checks itself: WASI's preopened directories."""

    dirs: list[Annotated[str, AfterValidator(_check_dir)]] = []  # "host_path:guest_path[:ro]"

    @property
    def dir_grants(self) -> list[DirGrant]:
        """`dirs` parsed (validated at load): what engines preopen and WASI-NN maps guest paths through."""
        return [DirGrant.parse(d) for d in self.dirs]


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
