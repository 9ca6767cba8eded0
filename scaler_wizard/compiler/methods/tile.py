"""`tile` (alias `hypercloning`): new unit j copies unit j mod d; readers' copies split to sum to the
original. Integer factors only. Exact on hidden (tiling keeps every norm's statistics), ffn, heads
(within their GQA group) and kv_heads. Source: HyperCloning (Samragh et al., 2024), Net2Net
(Chen et al., 2016) for the fan-out split."""

from __future__ import annotations

from dataclasses import dataclass

from scaler_wizard.compiler.methods.base import register
from scaler_wizard.compiler.methods.width import WidthMethod, copy_reason
from scaler_wizard.compiler.resolved import EXACT


@register
@dataclass(frozen=True)
class Tile(WidthMethod):
    name = "tile"
    aliases = ("hypercloning",)
    groups = ("hidden", "ffn", "heads", "kv_heads")
    integer_factor_only = True
    summary = "new unit j copies unit j mod d; readers' copies split to sum to the original"
    source = "HyperCloning (Samragh et al., 2024); Net2Net (Chen et al., 2016)"

    def exactness(self, cx):
        if cx.group == "hidden":
            return EXACT, f"tiling keeps {'/'.join(cx.norm_kinds)} statistics unchanged ({cx.placement}-norm)"
        return copy_reason(cx)
