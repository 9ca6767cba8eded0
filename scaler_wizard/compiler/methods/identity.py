"""`identity` layer init (aliases `id`, `llama-pro`): the new block's fan-in weights are copied from
an old layer (``from=``, default the neighbour before it) and its residual writers (o_proj,
down_proj, their biases) are zero, so the block adds zero to the stream: exact in Pre-LN models.
``noise=`` perturbs the copied fan-in (still exact: the writers are zero).
Source: LLaMA Pro (Wu et al., ACL 2024)."""

from __future__ import annotations

from dataclasses import dataclass

from scaler_wizard.compiler.methods.base import register
from scaler_wizard.compiler.methods.layer import LayerInit


@register
@dataclass(frozen=True)
class Identity(LayerInit):
    name = "identity"
    aliases = ("id", "llama-pro")
    reads_noise = True
    summary = "fan-in copied from the neighbouring layer, writers (o_proj, down_proj) zero: exact"
    source = "LLaMA Pro (Wu et al., ACL 2024)"
