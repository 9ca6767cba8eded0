"""The plan language front end: AST, parser and printer. Nothing here imports torch.

``parse``, ``parse_file``, ``print_plan`` and ``print_statement`` are loaded on first use:
``scaler_wizard.compiler.diagnostics`` imports ``scaler_wizard.grammar.ast``, and an eager
import of the parser here (which needs diagnostics) would make that import circular.
"""

from __future__ import annotations

__all__ = ["parse", "parse_file", "print_plan", "print_statement"]


def __getattr__(name: str):
    if name in ("parse", "parse_file"):
        from scaler_wizard.grammar import parser

        return getattr(parser, name)
    if name in ("print_plan", "print_statement"):
        from scaler_wizard.grammar import printer

        return getattr(printer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
