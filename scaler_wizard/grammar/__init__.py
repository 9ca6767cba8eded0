"""The plan language front end: AST, parser and printer. Nothing here imports torch (and the
parser loads lark on first use)."""

from __future__ import annotations

from scaler_wizard.grammar.parser import parse, parse_file
from scaler_wizard.grammar.printer import print_plan, print_statement

__all__ = ["parse", "parse_file", "print_plan", "print_statement"]
