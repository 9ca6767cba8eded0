"""`grow to N [prefer depth|width]`: pick width and depth statements that reach N parameters
(``compiler/solver.py`` searches them, type-checking each candidate); the chosen statements are
then checked and lowered as if written, and the alternatives considered go to the report."""

from __future__ import annotations

from dataclasses import dataclass

from scaler_wizard.compiler.methods.base import Method, register


@register
@dataclass(frozen=True)
class GrowTo(Method):
    kind = "op"
    name = "grow-to"
    statement = "`grow to`"
    summary = "solve for widen / insert statements reaching a parameter count (exactness: the chosen ops')"
    source = "this project (a search over the exact methods above)"

    def exactness(self, cx):  # the chosen statements carry their own exactness
        raise NotImplementedError("`grow to` is resolved into other statements")
