"""`cancel` layer init: the writers are non-zero but paired: the second half of the FFN units (and
of the heads, by KV group) copies the first half's fan-in and writes its negation, so the block's
output is exactly zero while every weight is non-zero (gradients flow to all of them). Where units
cannot be paired (odd sizes) the writer falls back to zero. Exact in Pre-LN models.
Source: the paired +W/-W construction of Net2Net-style function-preserving deepening."""

from __future__ import annotations

from dataclasses import dataclass

from scaler_wizard.compiler.methods.base import register
from scaler_wizard.compiler.methods.layer import LayerInit


@register
@dataclass(frozen=True)
class Cancel(LayerInit):
    name = "cancel"
    summary = "writers split into paired non-zero halves that sum to zero: exact"
    source = "Net2Net-style paired weights (Chen et al., ICLR 2016)"
