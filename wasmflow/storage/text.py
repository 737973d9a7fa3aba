"""Text as both databases store it.

What a sender or a guest chose reaches text columns: a payload's `action` and repository, a concurrency
key rendered from payload fields, an error that quotes a URL a guest asked for. PostgreSQL refuses a NUL
character in text and a value longer than its column, and neither driver encodes an unpaired surrogate
(`json.loads` makes one of `"\\ud800"`). Refused, such a delivery was answered 503 at every redelivery,
and such a run's key or result could not be stored. SQLite took the NUL and the length, so the two
databases also disagreed.
"""

from __future__ import annotations

import re
from typing import Optional

_SURROGATE = re.compile("[\ud800-\udfff]")


def storable_text(text: Optional[str], limit: Optional[int] = None) -> Optional[str]:
    """`text` cut to `limit` characters (a column's length), with NUL and unpaired surrogates replaced
    by U+FFFD; None stays None. Text that needs none of it is returned as it is, after two scans."""
    if text is None:
        return None
    if limit is not None and len(text) > limit:
        text = text[:limit]
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    if not text.isascii():
        text = _SURROGATE.sub("\ufffd", text)
    return text
