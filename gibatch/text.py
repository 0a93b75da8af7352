"""Text chosen by users or sites, made safe to show on one line of a terminal or log.

Folder names, JSON keys and the site's own words are chosen by others: a newline in
one must not forge a line of output, nor an escape sequence repaint the terminal.
"""

from __future__ import annotations

import logging
import unicodedata

from rich.text import Text

# Control, format, surrogate, private-use, unassigned, line and paragraph separators.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def printable(text: str) -> str:
    """`text` with control-like characters escaped as in repr(), other Unicode kept."""
    if text.isprintable():
        return text
    return "".join(repr(c)[1:-1] if unicodedata.category(c) in _UNSAFE_CATEGORIES else c
                   for c in text)


def cell(text: object) -> Text:
    """`text` for a rich table cell, title or live line: printable, and never read as
    markup (a job named `sweep[theta=45]` shows as it is, `[blink]` restyles nothing).

    Every table cell that may hold a name or a path goes through here; rich strips only a
    few control codes itself, not ESC.
    """
    return Text(printable(str(text)))


def first_line(text: str) -> str:
    """The first line of a multi-line reason (a traceback's summary), made printable."""
    head, _, rest = text.partition("\n")
    return printable(head) + (" (details in the journal)" if rest.strip() else "")


class EscapeArgs(logging.Filter):
    """Escape the string arguments of every log record; the format string is ours.

    Tracebacks go through `exc_info`, which the formatter renders on lines of its own.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(printable(a) if isinstance(a, str) else a
                                for a in record.args)
        return True
