"""The flows.yaml schema.

Deny by default, like Spin's manifest: a flow gets no HTTP host, model, key-value store, directory or
secret it does not list under `allow:` / `secrets:`. Every model forbids unknown keys, so a typo is an
error instead of a silently ignored setting.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2, "gb": 1000**3, "gib": 1024**3}


def parse_duration(value: Any) -> float:
    """Seconds from `300`, `300s`, `1.5m`, `250ms`, `2h`, `1d`."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s, 5m or 250ms")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"expected a duration like 30s, 5m or 250ms, got {value!r}")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_size(value: Any) -> int:
    """Bytes from `1048576`, `512MiB`, `1GB`, `64KiB`."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 512MiB or 64KiB")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ValueError(f"expected a size like 512MiB or 64KiB, got {value!r}")
        size = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()])
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size


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


def _check_dir(value: str) -> str:
    parts = value.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1] or (len(parts) == 3 and parts[2] != "ro"):
        raise ValueError(f"expected host_path:guest_path[:ro], got {value!r}")
    return value


def _check_env_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        raise ValueError(f"expected an environment variable name, got {value!r}")
    return value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(Strict):
    timeout: Duration = 30.0
    memory: Size = 256 * 1024**2
    table_elements: int = Field(default=100_000, ge=1)
    output: Size = 1024**2


class Retry(Strict):
    attempts: int = Field(default=3, ge=1, le=100)
    backoff: Literal["exponential", "fixed"] = "exponential"
    initial: Duration = 1.0
    max: Duration = 300.0
    # What is retried: timeouts and host-side transient errors by default; traps (a bug) only if listed.
    on: list[Literal["timeout", "upstream", "trap", "oom", "error", "denied"]] = ["timeout", "upstream"]


class GithubTrigger(Strict):
    # "pull_request", "pull_request.opened", "issue_comment.created"
    events: list[Annotated[str, AfterValidator(_check_event)]] = Field(min_length=1)
    repos: list[str] = ["*/*"]


class ScheduleTrigger(Strict):
    cron: str
    timezone: str = "UTC"
    overlap: Literal["skip", "queue", "allow"] = "skip"
    catch_up: Duration = 0.0

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        from croniter import croniter

        if not croniter.is_valid(value):
            raise ValueError(f"not a valid cron expression: {value!r} (expected e.g. '0 9 * * MON')")
        return value

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        from zoneinfo import ZoneInfo

        try:
            ZoneInfo(value)
        except Exception:
            raise ValueError(f"unknown time zone {value!r} (expected e.g. Europe/Berlin or UTC)") from None
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


class Allow(Strict):
    http: list[Annotated[str, AfterValidator(_check_http)]] = []  # scheme://host[:port], with * wildcards
    models: list[str] = []
    kv: bool = False
    github: dict[str, Literal["read", "write"]] = {}  # App permission → level, e.g. {pull_requests: write}
    github_repos: list[str] = []  # more repositories (owner/name globs) than the event's own
    dirs: list[Annotated[str, AfterValidator(_check_dir)]] = []  # "host_path:guest_path[:ro]"


class LlmEndpoint(Strict):
    """Where a flow's `llm_chat` / `llm_embed` calls go; chosen by the operator, never by the guest.

    With `base_url`, any OpenAI-compatible API (OpenAI, wasmflow's own /v1, llama.cpp server, Ollama)
    through the `openai` package, `model` being the id sent to it. Without, `model` names an entry of
    `models:` (listed in the flow's `allow.models`) run in-process by the WASI-NN back end.
    """

    model: str
    base_url: Optional[str] = None
    api_key_secret: Optional[str] = None  # env var holding the key; read by the host, never shown to the guest
    timeout: Duration = 120.0
    options: dict[str, Any] = {}  # defaults for requests: temperature, max_tokens, ...

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


class ModelSpec(Strict):
    backend: Literal["ggml", "onnx"]
    path: str
    target: Literal["cpu", "gpu", "auto"] = "auto"
    options: dict[str, Any] = {}


class GithubApp(Strict):
    app_id: Union[int, str]
    private_key: str  # a path to a PEM file, or the PEM itself
    webhook_secret: str
    api_url: str = "https://api.github.com"
    bot_login: Optional[str] = None
    min_write_interval: Duration = 1.0  # GitHub asks for a second between content-creating requests


class FlowsFile(Strict):
    version: Literal[1] = 1
    engine: Literal["wasmtime", "wasmedge"] = "wasmtime"
    state_dir: str = ".wasmflow"
    models: dict[str, ModelSpec] = {}
    github: Optional[GithubApp] = None
    flows: list[Flow] = []

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
