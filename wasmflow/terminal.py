"""Showing text that a guest (or a webhook sender, or an HTTP caller) controls on an operator's terminal.

Such text is data. Parsed as Rich markup it could fake a status line or crash the command (a stray
`[/x]`); passed through raw, escape sequences could clear the screen, retitle the window, plant OSC 8
links or reorder what is read (bidi overrides). Every command prints it through `guest_text` (a Rich
`Text`, never markup) or `clean`, and server log lines go through `GuestSafeFormatter`.
"""

from __future__ import annotations

import logging
import re
from typing import Optional, Union

from rich.text import Text

# Order matters: whole sequences first (so their parameters go too), then any control left on its own.
_UNSAFE = re.compile(
    r"(?:\x1b\]|\x9d)[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"  # OSC (titles, OSC 8 links): to BEL or ST
    r"|(?:\x1b[PX^_]|[\x90\x98\x9e\x9f])[^\x1b\x9c]*(?:\x1b\\|\x9c)?"  # DCS, SOS, PM, APC strings
    r"|(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"  # CSI: colours, cursor moves, screen clearing
    r"|\x1b[ -/]*[0-~]?"  # any other escape, or a lone ESC
    r"|[\x00-\x08\x0b-\x1f\x7f-\x9f]"  # other C0 controls (\t and \n are kept), DEL, C1 controls
    r"|[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]"  # bidi marks, embeddings, overrides, isolates
)


def clean(text: str) -> str:
    """`text` without terminal control sequences or bidi controls; tabs, newlines and all else kept."""
    return _UNSAFE.sub("", text)


def guest_text(data: Union[str, bytes, bytearray, memoryview, None], style: str = "",
               indent: Optional[int] = None) -> Text:
    """Printable Rich Text of guest-controlled `data` (bytes are read as UTF-8, bad bytes replaced).

    `indent`: continuation lines start with that many spaces, so a newline in a log message cannot
    start a line that looks like the command's own output (a status line, say).
    """
    if data is None:
        data = ""
    if not isinstance(data, str):
        data = bytes(data).decode("utf-8", errors="replace")
    text = clean(data)
    if indent is not None:
        text = text.replace("\n", "\n" + " " * indent)
    return Text(text, style=style)


class GuestSafeFormatter(logging.Formatter):
    """A logging formatter for the servers' stderr: run errors, URLs and names in log lines may carry a
    guest's escape sequences, which must not reach the operator's terminal or log viewer."""

    def format(self, record: logging.LogRecord) -> str:
        return clean(super().format(record))
