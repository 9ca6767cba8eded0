"""Diagnostics: positioned, coded, collected, rendered with carets. No torch import.

The bottom layer of the package: grammar, ir, compiler, runtime and the commands import it; it
imports nothing of the project (tests/test_layering.py holds that).

Codes are stable strings (``SW1xx`` syntax, ``SW2xx`` names/resolution, ``SW3xx`` type/applicability,
``SW4xx`` model/IR, ``SW5xx`` usage/IO). A :class:`DiagnosticBag` collects every problem of a file;
:func:`render` prints them sorted by position as::

    plan.expand:3:7: error[SW201]: unknown dimension group `fnn`
      |
    3 | widen fnn x2 lemon
      |       ^^^
      = help: did you mean `ffn`? groups: hidden(576), ffn(1536 x30 layers), heads(9), ...
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from typing import Iterable


@dataclass(frozen=True, order=True)
class Span:
    """A region of a source file. Lines and columns are 1-based; ``end_col`` is exclusive.

    ``start``/``end`` are 0-based character offsets into the source text.
    """

    line: int = 0
    col: int = 0
    end_line: int = 0
    end_col: int = 0
    start: int = 0
    end: int = 0
    file: str = "<plan>"

    @staticmethod
    def unknown(file: str = "<plan>") -> "Span":
        return Span(file=file)


ERROR = "error"
WARNING = "warning"
NOTE = "note"


@dataclass(frozen=True)
class Diagnostic:
    code: str
    message: str
    span: Span
    severity: str = ERROR
    help: str | None = None
    notes: tuple[str, ...] = ()

    def sort_key(self):
        return (self.span.file, self.span.line, self.span.col, self.code)

    def to_json(self) -> dict:
        return {
            "code": self.code,
            "severity": self.severity,
            "message": self.message,
            "file": self.span.file,
            "line": self.span.line,
            "col": self.span.col,
            "end_line": self.span.end_line,
            "end_col": self.span.end_col,
            "help": self.help,
            "notes": list(self.notes),
        }


@dataclass
class DiagnosticBag:
    items: list[Diagnostic] = field(default_factory=list)

    def add(self, d: Diagnostic) -> None:
        self.items.append(d)

    def error(self, code: str, message: str, span: Span, help: str | None = None, notes=()) -> Diagnostic:
        d = Diagnostic(code, message, span, ERROR, help, tuple(notes))
        self.items.append(d)
        return d

    def warning(self, code: str, message: str, span: Span, help: str | None = None, notes=()) -> Diagnostic:
        d = Diagnostic(code, message, span, WARNING, help, tuple(notes))
        self.items.append(d)
        return d

    def extend(self, ds: Iterable[Diagnostic]) -> None:
        self.items.extend(ds)

    @property
    def has_errors(self) -> bool:
        return any(d.severity == ERROR for d in self.items)

    def sorted(self) -> list[Diagnostic]:
        return sorted(self.items, key=Diagnostic.sort_key)


class PlanError(Exception):
    """Raised to abort with collected diagnostics (exit code 1). ``sources`` maps file name -> text
    for :func:`render` (None when no one attached the text)."""

    def __init__(self, diagnostics: list[Diagnostic], sources: dict[str, str] | None = None):
        self.diagnostics = sorted(diagnostics, key=Diagnostic.sort_key)
        self.sources = sources  # file name -> text, for render's excerpts; set by whoever read the file
        super().__init__("\n".join(f"{d.code}: {d.message}" for d in self.diagnostics))


class UsageError(Exception):
    """Bad invocation or unreadable input (exit code 2). The message is shown as is."""


def suggest(name: str, candidates: Iterable[str]) -> str | None:
    """The closest candidate to a misspelt name, or None."""
    m = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return m[0] if m else None


MAX_RENDERED = 50  # diagnostics shown per file; the rest are counted
WINDOW = 100  # characters of a long source line shown around the span


def _excerpt(src: str, col: int, end_col: int) -> tuple[str, int, int]:
    """(shown text, caret column, caret width) for a source line: a window of about WINDOW
    characters around the span (``...`` marks what is cut), so a 1 MB line prints ~100 characters."""
    width = max(1, end_col - col)
    if len(src) <= WINDOW + 20:
        return src, col, width
    width = min(width, WINDOW)
    start = max(0, col - 1 - (WINDOW - width) // 2)
    stop = min(len(src), start + WINDOW)
    start = max(0, min(start, stop - WINDOW))
    left, right = ("..." if start > 0 else ""), ("..." if stop < len(src) else "")
    return left + src[start:stop] + right, col - start + len(left), width


MAX_MESSAGE = 400  # characters of a rendered message; a plan can echo a megabyte identifier


def _clip(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` whole when short, else its head and tail around a count of the characters left out."""
    if len(text) <= limit:
        return text
    head, tail = text[: limit * 2 // 3], text[-(limit // 4):]
    return f"{head} ... ({len(text) - len(head) - len(tail):,} characters) ... {tail}"


def render(diags: Iterable[Diagnostic], sources: dict[str, str] | None = None, color: bool = False,
           limit: int | None = MAX_RENDERED) -> str:
    """Render diagnostics sorted by position. ``sources`` maps file name -> text for the excerpt.
    At most ``limit`` diagnostics per file are shown (then a line counting the rest); long source
    lines are shown as a window around the span."""
    sources = sources or {}
    lines_of: dict[str, list[str]] = {}
    shown: dict[str, int] = {}
    hidden: dict[str, dict[str, int]] = {}
    out: list[str] = []
    for d in sorted(diags, key=Diagnostic.sort_key):
        s = d.span
        if limit is not None and shown.get(s.file, 0) >= limit:
            h = hidden.setdefault(s.file, {})
            h[d.severity] = h.get(d.severity, 0) + 1
            continue
        shown[s.file] = shown.get(s.file, 0) + 1
        loc = f"{s.file}:{s.line}:{s.col}" if s.line else s.file
        head = f"{loc}: {d.severity}[{d.code}]: {_clip(d.message)}"
        if color:
            c = {"error": "31", "warning": "33"}.get(d.severity, "36")
            head = f"\x1b[1;{c}m{head}\x1b[0m"
        out.append(head)
        text = sources.get(s.file)
        if text is not None and s.line:
            if s.file not in lines_of:
                lines_of[s.file] = text.splitlines()
            lines = lines_of[s.file]
            if 1 <= s.line <= len(lines):
                src = lines[s.line - 1]
                num = str(s.line)
                pad = " " * len(num)
                end_col = s.end_col if s.end_line == s.line and s.end_col > s.col else len(src) + 1
                shown_src, col, width = _excerpt(src, s.col, end_col)
                out.append(f"{pad} |")
                out.append(f"{num} | {shown_src}")
                out.append(f"{pad} | {' ' * (col - 1)}{'^' * width}")
        for n in d.notes:
            out.append(f"  = note: {_clip(n)}")
        if d.help:
            out.append(f"  = help: {_clip(d.help)}")
    for f, h in hidden.items():
        what = ", ".join(f"{n} more {sev}{'s' if n != 1 else ''}" for sev, n in sorted(h.items()))
        out.append(f"{f}: ... and {what} not shown (the first {limit} are above)")
    return "\n".join(out)

def to_json(diags: Iterable[Diagnostic]) -> str:
    return json.dumps([d.to_json() for d in sorted(diags, key=Diagnostic.sort_key)], indent=2)
