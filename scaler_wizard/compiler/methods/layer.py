"""Shared base of the layer inits of `insert` (identity, zero, cancel, copy): their options and rule.

A new layer ``j`` is a :class:`~scaler_wizard.compiler.resolved.LayerSource` (the old layer seeding
it and the init); every depth statement is folded into one final layer map by the type checker and
lowered by the single ``depth`` pass (``compiler/passes/depth.py``), which switches on the init.
``identity``, ``zero`` and ``cancel`` add exactly zero to the residual stream, which makes the new
block the identity only when the norm sits inside the block (Pre-LN); Post-LN is refused (SW305).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from scaler_wizard.compiler.methods.base import Method, option
from scaler_wizard.compiler.resolved import APPROX, EXACT


@dataclass(frozen=True)
class LayerInit(Method):
    kind: ClassVar[str] = "layer"
    groups: ClassVar[tuple[str, ...]] = ("layers",)
    statement: ClassVar[str] = "`insert`"
    needs_pre_ln: ClassVar[bool] = True  # the new block is the identity only under Pre-LN
    reads_noise: ClassVar[bool] = False

    from_: int | None = option("the old layer whose fan-in weights seed the new layer (default: the neighbour "
                               "before it)", key="from")
    noise: float | None = option("identity layers only: noise on the copied fan-in weights (exact: the writers "
                                 "are zero)", kind="nonneg")

    def unread(self, group=None) -> dict[str, str | None]:
        return {"noise": None if self.reads_noise else f"`{self.name}` layers do not copy fan-in weights"}

    def exactness(self, cx):
        if self.base == APPROX:
            return APPROX, "copied layers change the function (SOLAR / G_stack style)"
        return EXACT, f"{self.name} layers add zero to the residual stream ({cx.placement}-norm)"
