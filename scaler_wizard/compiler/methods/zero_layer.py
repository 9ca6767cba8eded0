"""`zero` layer init: the new block's fan-in is random (norm gains copied), biases and residual
writers zero: the block adds zero to the stream (exact, Pre-LN). Source: the zero-init residual
branch of Goyal et al. (2017) / Fixup (Zhang et al., ICLR 2019), as used by MSG's depth growth."""

from __future__ import annotations

from dataclasses import dataclass

from scaler_wizard.compiler.methods.base import register
from scaler_wizard.compiler.methods.layer import LayerInit


@register
@dataclass(frozen=True)
class ZeroLayer(LayerInit):
    name = "zero"
    summary = "fan-in random, writers zero: exact"
    source = "Fixup (Zhang et al., ICLR 2019); MSG (Yao et al., 2023)"
