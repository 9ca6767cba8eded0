"""Diagnostics: positioned, coded, collected, rendered with carets. No torch import.

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

from scaler_wizard.grammar.ast import Span

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
    """Raised to abort with collected diagnostics (exit code 1)."""

    def __init__(self, diagnostics: list[Diagnostic]):
        self.diagnostics = sorted(diagnostics, key=Diagnostic.sort_key)
        super().__init__("\n".join(f"{d.code}: {d.message}" for d in self.diagnostics))


class UsageError(Exception):
    """Bad invocation or unreadable input (exit code 2). The message is shown as is."""


def suggest(name: str, candidates: Iterable[str]) -> str | None:
    """The closest candidate to a misspelt name, or None."""
    m = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return m[0] if m else None


def render(diags: Iterable[Diagnostic], sources: dict[str, str] | None = None, color: bool = False) -> str:
    """Render diagnostics sorted by position. ``sources`` maps file name -> text for the excerpt."""
    sources = sources or {}
    out: list[str] = []
    for d in sorted(diags, key=Diagnostic.sort_key):
        s = d.span
        loc = f"{s.file}:{s.line}:{s.col}" if s.line else s.file
        head = f"{loc}: {d.severity}[{d.code}]: {d.message}"
        if color:
            c = {"error": "31", "warning": "33"}.get(d.severity, "36")
            head = f"\x1b[1;{c}m{head}\x1b[0m"
        out.append(head)
        text = sources.get(s.file)
        if text is not None and s.line:
            lines = text.splitlines()
            if 1 <= s.line <= len(lines):
                src = lines[s.line - 1]
                num = str(s.line)
                pad = " " * len(num)
                end_col = s.end_col if s.end_line == s.line and s.end_col > s.col else len(src) + 1
                width = max(1, end_col - s.col)
                out.append(f"{pad} |")
                out.append(f"{num} | {src}")
                out.append(f"{pad} | {' ' * (s.col - 1)}{'^' * width}")
        for n in d.notes:
            out.append(f"  = note: {n}")
        if d.help:
            out.append(f"  = help: {d.help}")
    return "\n".join(out)


def to_json(diags: Iterable[Diagnostic]) -> str:
    return json.dumps([d.to_json() for d in sorted(diags, key=Diagnostic.sort_key)], indent=2)
