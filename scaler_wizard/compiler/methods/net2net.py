"""`net2net`: new FFN units copy randomly chosen old units; the fan-out of every copy set is split
among its copies (unequal random shares by default, ``split=equal`` for 1/k). Exact for any
elementwise activation (a GLU copies act(gate) * up whole). Source: Net2Net (Chen et al., ICLR 2016)."""

from __future__ import annotations

from dataclasses import dataclass

from scaler_wizard.compiler.methods.base import register
from scaler_wizard.compiler.methods.width import WidthMethod, copy_reason


@register
@dataclass(frozen=True)
class Net2Net(WidthMethod):
    name = "net2net"
    groups = ("ffn",)
    summary = "new units copy random old units; fan-out split among copies"
    source = "Net2Net (Chen et al., ICLR 2016)"

    def exactness(self, cx):
        return copy_reason(cx)
