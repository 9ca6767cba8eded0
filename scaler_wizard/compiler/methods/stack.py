"""`stack xK`: the whole layer stack repeated K times (every new layer a copy). Approx.
Source: G_stack (Du et al., NeurIPS 2024), progressive stacking (Gong et al., ICML 2019)."""

from __future__ import annotations

from dataclasses import dataclass

from scaler_wizard.compiler.methods.base import LayerCopyOp, register


@register
@dataclass(frozen=True)
class Stack(LayerCopyOp):
    name = "stack"
    statement = "`stack`"
    summary = "the layer stack repeated K times (new layers are copies)"
    source = "G_stack (Du et al., NeurIPS 2024); progressive stacking (Gong et al., ICML 2019)"
