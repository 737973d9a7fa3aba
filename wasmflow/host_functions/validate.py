"""Guest requests checked against a declared shape: a malformed argument is the guest's error.

Host functions that take JSON describe it once, as a pydantic model, and read it with `read_request`.
Anything that does not fit (a string where a number belongs, a list where an object belongs) is
INVALID with a message naming the field, before any work is done or anything is sent anywhere; it
never reaches a back end as an exception that would come out as INTERNAL with a traceback.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .spec import Code, GuestMemory, HostError, read_json

T = TypeVar("T", bound=BaseModel)


class GuestRequest(BaseModel):
    """Base of request shapes: strict types (no "10" for 10, no true for 1), unknown keys ignored
    (so a newer SDK's extra fields do not break an older host)."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


def describe(error: ValidationError, limit: int = 3) -> str:
    """The first few problems, as `field.path: what is wrong` (no input values: they can be large)."""
    parts = []
    for item in error.errors(include_url=False, include_input=False)[:limit]:
        where = ".".join(str(p) for p in item["loc"]) or "the request"
        parts.append(f"{where}: {item['msg']}")
    more = error.error_count() - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def parse_request(model: type[T], data: Any, what: str, expected: str) -> T:
    """`data` as `model`, or HostError(INVALID) saying what is wrong and what was `expected`."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise HostError(Code.INVALID, f"{what}: {describe(exc)}; expected {expected}") from None


def read_request(memory: GuestMemory, ptr: int, length: int, model: type[T], what: str, expected: str) -> T:
    """The JSON at (ptr, length) in guest memory, checked against `model` (see `parse_request`)."""
    try:
        data = read_json(memory, ptr, length)
    except HostError as err:
        if err.code != Code.INVALID:
            raise
        raise HostError(Code.INVALID, f"{what}: {err.message}; expected {expected}") from None
    return parse_request(model, data, what, expected)
