"""Helpers shared by the width passes: rewrite one tensor axis and keep its bookkeeping."""

from __future__ import annotations

from typing import Callable

from scaler_wizard.compiler import program as P
from scaler_wizard.compiler.methods.axisops import map_group_on_axis
from scaler_wizard.compiler.methods.unitmap import UnitMap
from scaler_wizard.compiler.passes.base import LowerState, TState, note


def rewrite_axis(st: LowerState, ts: TState, a: int, group: str, m: UnitMap,
                 fn: Callable[[P.Node, int], P.Node], *, text: str, exactness: str, keeps_values: bool) -> None:
    """Grow ``group`` on axis ``a`` of ``ts`` with ``fn`` and update status / original region.

    ``keeps_values``: the old units keep their values and positions (unscaled identity prefix), so
    the original region survives when ``group`` is the outermost factor of a single segment."""
    layout = ts.axes[a]
    if ts.source and layout.role == "out" and ts.node.shape and len(ts.node.shape) == 2 and len(layout.segments) == 1 \
            and len(layout.segments[0].factors) == 1 and not any(g for g in st.copies if g[0][0] == group):
        grp = next((g for g in m.copy_groups() if len(g) > 1), None)
        if grp is not None:  # a probe for `verify`'s symmetry check: rows that start as copies
            st.copies.append([[group], *[[ts.source, a, j, j + 1] for j in grp[:2]]])
    ts.node = map_group_on_axis(ts.node, a, layout, group, st.sizes, fn)
    ts.changed = True
    if ts.region is not None:
        seg = layout.segments
        outer = len(seg) == 1 and seg[0].factors[0].group == group
        if keeps_values and outer and m.is_identity_prefix():
            pass  # the original block stays at [0, old size) of this axis
        else:
            ts.region = None
    note(ts, text, exactness)
