"""`dup` (alias `duplicate`): new attention heads copy old heads of their own GQA group (query heads)
or are tiled (KV heads); o_proj columns of the copies split to sum to the original. Exact.
Source: the head-duplication of bert2BERT's function-preserving init (Chen et al., ACL 2022)."""

from __future__ import annotations

from dataclasses import dataclass

from scaler_wizard.compiler.methods.base import register
from scaler_wizard.compiler.methods.width import WidthMethod, copy_reason


@register
@dataclass(frozen=True)
class Dup(WidthMethod):
    name = "dup"
    aliases = ("duplicate",)
    groups = ("heads", "kv_heads")
    summary = "new heads copy old heads (in their GQA group); o_proj split"
    source = "bert2BERT (Chen et al., ACL 2022)"

    def exactness(self, cx):
        return copy_reason(cx)
