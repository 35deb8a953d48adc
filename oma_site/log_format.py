"""Log lines that say what happened and nothing more: a name an operator or
a vCenter supplied ("vm1\\n[... INFO] job done") cannot start a line of its
own in a log, so every line is one record."""

from __future__ import annotations

import logging

# C0 controls (newline, tab, NUL, ESC...), DEL, C1 controls and Unicode's line
# and paragraph separators: shown as escapes, never acted on.
_ESCAPES = {code: f"\\x{code:02x}" for code in [*range(0x20), *range(0x7f, 0xa0)]}
_ESCAPES.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def escape_controls(text: str) -> str:
    return text.translate(_ESCAPES)


class OneLineFormatter(logging.Formatter):
    """The record's line with its control characters escaped; a traceback
    still follows on lines of its own (it comes from the code, not input)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))
