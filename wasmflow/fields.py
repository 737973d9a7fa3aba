"""The field vocabulary of flows.yaml: durations, sizes, bounded integers, options, strict sections.

Below every part that owns a section of the file (`wasmflow/flows/model.py` for the flow itself, each
capability for its own: `allow.kv` in host_functions/kv.py, `allow.http` in http_allow.py, `allow.github`
and `github:` in github.py, `llm:` in llm.py), so that they all parse and report alike. Errors say what
was expected and never echo hostile input whole (`abbreviate`).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Callable, Optional, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict

_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2, "gb": 1000**3, "gib": 1024**3}
# Outer bounds of any duration or size in the file, whatever the field: past them timers and the
# database overflow. Each field narrows them to what makes sense for it (see the *_in types below).
MAX_DURATION = 366 * 86400.0
MAX_SIZE = 1024**4
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


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


class FieldError(ValueError):
    """A ValueError about one part of a model's input, given as `loc` relative to that model.

    A model-level validator can only fail the whole model, which would point the user at the top of it;
    pydantic keeps the exception in the error's ctx, so the loader appends `loc` and reports the line of
    the entry that is actually wrong.
    """

    def __init__(self, message: str, loc: tuple[Union[str, int], ...]) -> None:
        super().__init__(message)
        self.loc = loc


class Section(BaseModel):
    """A part of flows.yaml: unknown keys are errors (a typo must not be a silently ignored setting),
    and a loaded file cannot change."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# An option of `models.*.options` or `llm.*.options`: (kind, low, high), kind "int", "number" or "bool".
Option = tuple[str, Any, Any]


def check_option(value: Any, option: Option) -> Optional[str]:
    """What is wrong with one option value, or None."""
    kind, lo, hi = option
    if kind == "bool":
        return None if isinstance(value, bool) else f"expected true or false, got {abbreviate(value)}"
    ok_type = isinstance(value, int) if kind == "int" else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not lo <= value <= hi:
        article = "an integer" if kind == "int" else "a number"
        return f"{article} from {lo} to {hi} is expected, got {abbreviate(value)}"
    return None


def check_options(options: dict[str, Any], known: dict[str, Option], normalise: Callable[[str], str] = str) -> None:
    for key, value in options.items():
        option = known.get(normalise(key))
        problem = check_option(value, option) if option else None
        if problem:
            raise FieldError(problem, ("options", key))
