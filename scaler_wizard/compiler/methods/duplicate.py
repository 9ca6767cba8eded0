"""`duplicate layers a..b`: layers a..b-1 copied right after b-1 (depth up-scaling). Approx.
Source: SOLAR 10.7B's depth up-scaling (Kim et al., 2023)."""

from __future__ import annotations

from dataclasses import dataclass

from scaler_wizard.compiler.methods.base import LayerCopyOp, register


@register
@dataclass(frozen=True)
class Duplicate(LayerCopyOp):
    name = "duplicate"
    statement = "`duplicate`"
    summary = "a range of layers copied after itself (depth up-scaling)"
    source = "SOLAR (Kim et al., 2023)"
