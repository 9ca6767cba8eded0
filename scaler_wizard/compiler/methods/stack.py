"""`stack xK`: the whole layer stack repeated K times (every new layer a copy). Approx.
Source: G_stack (Du et al., NeurIPS 2024), progressive stacking (Gong et al., ICML 2019)."""

from __future__ import annotations

from dataclasses import dataclass

from scaler_wizard.compiler.methods.base import Method, register
from scaler_wizard.compiler.resolved import APPROX


@register
@dataclass(frozen=True)
class Stack(Method):
    kind = "op"
    name = "stack"
    statement = "`stack`"
    base = APPROX
    groups = ("layers",)
    summary = "the layer stack repeated K times (new layers are copies)"
    source = "G_stack (Du et al., NeurIPS 2024); progressive stacking (Gong et al., ICML 2019)"
    init = "copy"

    def unread(self, group=None):
        return {"noise": f"`{self.name}` copies layers whole"}

    def exactness(self, cx):
        return APPROX, "copied layers change the function (SOLAR / G_stack style)"
