"""Shared base of the `widen` methods: their options, what they read, their lowering by group.

Every width method takes the options of the `widen` statement (``noise``, ``split``, ``untie``);
which of them it reads depends on the group and on the method (:meth:`WidthMethod.unread`). The
lowering is the group's pass (``compiler/passes/widen_<group>.py``), which switches on the method
for the unit map (tile, net2net, zero, dup) it builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from scaler_wizard.compiler.methods.base import Method, option
from scaler_wizard.compiler.resolved import EXACT

# groups whose copies noise could break symmetry of; why not, for the others
_NOISE_NOT_READ = {
    "kv_heads": "copied key/value heads are read by different query groups, so no zero-sum noise "
                "cancels there; it is not applied",
    "head_dim": "the new head_dim units are zero, not copies",
    "vocab": "new vocabulary rows are means, not copies",
}


@dataclass(frozen=True)
class WidthMethod(Method):
    kind: ClassVar[str] = "widen"
    statement: ClassVar[str] = "`widen`"
    integer_factor_only: ClassVar[bool] = False
    copies: ClassVar[bool] = True  # new units copy old ones (False: fresh units)

    noise: float | None = option("symmetry-breaking noise scale (zero-sum across copies: exact in the forward pass)",
                                 kind="nonneg")
    split: str | None = option("how readers' copies share the original: `random` (default, unequal, breaks symmetry) "
                               "or `equal`", kind="choice", choices=("equal", "random"))
    untie: bool | None = option("hidden only: untie the LM head from the embedding (`true`); default keeps the tie",
                                kind="bool")

    def unread(self, group: str | None) -> dict[str, str | None]:
        return {"noise": self._noise_unused(group), "split": self._split_unused(group)}

    def _noise_unused(self, group) -> str | None:
        if group not in ("hidden", "ffn", "heads", "experts"):
            return _NOISE_NOT_READ.get(group, f"`widen {group}` makes no copies whose symmetry noise could break")
        if not self.copies:
            return f"`{self.name}` adds fresh units, not copies"
        return None

    def _split_unused(self, group) -> str | None:
        if group not in ("hidden", "ffn", "heads"):
            return f"`widen {group}` splits no fan-out among copies"
        if not self.copies:
            return f"`{self.name}` adds fresh units, not copies"
        return None

    def lowering(self, op):
        from scaler_wizard.compiler.passes import WIDTH_PASSES

        cls = WIDTH_PASSES.get(op.group)
        return cls(op) if cls is not None else None


def copy_reason(cx) -> tuple[str, str]:
    """Exactness of copying units whose readers' fan-out is split among the copies."""
    if cx.group == "ffn":
        return EXACT, "copied units' fan-out splits sum to the original (any elementwise activation, GLU included)"
    if cx.group == "heads":
        return EXACT, f"new query heads placed in their GQA group ({cx.new // cx.kv} per KV head), o_proj split"
    if cx.group == "kv_heads":
        return EXACT, f"KV heads tiled x{cx.new // cx.kv}; each query head reads a copy of its old KV head"
    return EXACT, ""
