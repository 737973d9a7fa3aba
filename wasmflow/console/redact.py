"""Secrets out of what the console shows: webhook signatures, tokens, authorization, keys, passwords.

An event's headers and payload are shown to the operator, but a signature or a token in them would be a
credential on a screen (and in a screenshot): such values are replaced by `REDACTED` wherever the name of
the header or of the JSON key says what it is.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "[redacted]"
_SECRET_NAME = re.compile(
    r"(authorization|signature|token|secret|password|passwd|private[_-]?key|api[_-]?key|cookie|credential"
    r"|client[_-]?secret|x-hub-signature)", re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def redact_headers(headers: dict[str, Any]) -> dict[str, Any]:
    """Headers with every credential-bearing value replaced (the names stay: they show what was sent)."""
    return {str(k): (REDACTED if is_secret_name(str(k)) else v) for k, v in headers.items()}


def redact_json(value: Any, depth: int = 0) -> Any:
    """A JSON value with the values of secret-named keys replaced, however deep (up to 64 levels)."""
    if depth > 64:
        return REDACTED
    if isinstance(value, dict):
        return {k: (REDACTED if isinstance(k, str) and is_secret_name(k) and value[k] not in (None, "")
                    else redact_json(value[k], depth + 1)) for k in value}
    if isinstance(value, list):
        return [redact_json(item, depth + 1) for item in value]
    return value
