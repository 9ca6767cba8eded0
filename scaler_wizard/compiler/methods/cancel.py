"""`cancel` layer init: the writers are non-zero but paired: the second half of the FFN units (and
of the heads, by KV group) copies the first half's fan-in and writes its negation, so the block's
output is exactly zero while every weight is non-zero (gradients flow to all of them). Where units
cannot be paired (odd sizes) the writer falls back to zero. Exact in Pre-LN models; exact-eps where a
norm follows the block's writers (sandwich norms: Gemma-2/3, GLM-4, OLMo-2's post-norms): the paired
halves cancel in exact arithmetic, but float32 products summed in blocks leave a rounding residue
(~1e-7 of the terms) that the post-norm rescales by up to 1/sqrt(eps) (measured: 9.8e-6 relative
logit error on the family sweep's tiny GLM-4, against the exact tolerance of 1e-5).
Source: the paired +W/-W construction of Net2Net-style function-preserving deepening."""

from __future__ import annotations

from dataclasses import dataclass

from scaler_wizard.compiler.methods.base import register
from scaler_wizard.compiler.methods.layer import LayerInit
from scaler_wizard.compiler.resolved import APPROX, EXACT_EPS


@register
@dataclass(frozen=True)
class Cancel(LayerInit):
    name = "cancel"
    summary = "writers split into paired non-zero halves that sum to zero: exact"
    source = "Net2Net-style paired weights (Chen et al., ICLR 2016)"

    def exactness(self, cx):
        got = super().exactness(cx)
        if got[0] != APPROX and cx.placement == "sandwich":
            return EXACT_EPS, ("cancel layers add zero to the residual stream in exact arithmetic; in float32 the "
                               "paired halves leave a rounding residue that the norm after the block "
                               "(sandwich-norm) scales up")
        return got
