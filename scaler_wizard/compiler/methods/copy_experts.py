"""`copy` on `experts`: new experts copy old ones and their router rows are copied. Approx: the
copied router rows change the routing distribution (softmax over more logits). Source: sparse
upcycling's expert copies (Komatsuzaki et al., ICLR 2023)."""

from __future__ import annotations

from dataclasses import dataclass

from scaler_wizard.compiler.methods.base import register
from scaler_wizard.compiler.methods.width import WidthMethod
from scaler_wizard.compiler.resolved import APPROX


@register
@dataclass(frozen=True)
class CopyExperts(WidthMethod):
    name = "copy"
    groups = ("experts",)
    base = APPROX
    summary = "new experts copy old ones; router rows copied"
    source = "Sparse upcycling (Komatsuzaki et al., ICLR 2023)"

    def exactness(self, cx):
        return APPROX, "copied experts and router rows change the routing distribution"
