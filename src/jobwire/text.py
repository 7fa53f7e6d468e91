"""Text from guests and servers made safe to show on a terminal or in a log line."""

from __future__ import annotations

import re

# C0 controls (newline and tab too: in a one-line display they are spoofing vectors), DEL,
# C1 controls, and the bidi controls that reorder what a reader sees (Trojan Source).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    c = match.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def printable(text: str) -> str:
    """`text` with every control, ESC and bidi override shown as a visible escape
    (ESC as `\\x1b`, a newline as `\\n`), so it cannot move the cursor, retitle the
    terminal or reorder a line."""
    return _UNSAFE.sub(_escape, text)


def clip(text: str, limit: int = 200) -> str:
    """`printable(text)` of at most `limit` characters of the original, marked when cut."""
    return printable(text[:limit]) + ("…" if len(text) > limit else "")
