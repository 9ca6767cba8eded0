"""`duplicate layers a..b`: layers a..b-1 copied right after b-1 (depth up-scaling). Approx.
Source: SOLAR 10.7B's depth up-scaling (Kim et al., 2023)."""

from __future__ import annotations

from dataclasses import dataclass

from scaler_wizard.compiler.methods.base import Method, register
from scaler_wizard.compiler.resolved import APPROX


@register
@dataclass(frozen=True)
class Duplicate(Method):
    kind = "op"
    name = "duplicate"
    statement = "`duplicate`"
    base = APPROX
    groups = ("layers",)
    summary = "a range of layers copied after itself (depth up-scaling)"
    source = "SOLAR (Kim et al., 2023)"
    init = "copy"

    def unread(self, group=None):
        return {"noise": f"`{self.name}` copies layers whole"}

    def exactness(self, cx):
        return APPROX, "copied layers change the function (SOLAR / G_stack style)"
