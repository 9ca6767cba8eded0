"""`copy` layer init (alias `duplicate`): the new layer is a full copy of an old layer. Approx: the
copy adds its block's output a second time. Source: SOLAR's depth up-scaling (Kim et al., 2023),
G_stack (Du et al., 2024)."""

from __future__ import annotations

from dataclasses import dataclass

from scaler_wizard.compiler.methods.base import register
from scaler_wizard.compiler.methods.layer import LayerInit
from scaler_wizard.compiler.resolved import APPROX


@register
@dataclass(frozen=True)
class CopyLayer(LayerInit):
    name = "copy"
    aliases = ("duplicate",)
    base = APPROX
    needs_pre_ln = False
    summary = "a full copy of the neighbouring layer: approx"
    source = "SOLAR (Kim et al., 2023); G_stack (Du et al., 2024)"
