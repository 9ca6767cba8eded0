"""`widen kv_heads` (tile): KV head j' copies old KV head j' // n, so every query head h (which reads
KV head h // (heads/kv')) still reads a copy of the KV head it read before. Exact."""

from __future__ import annotations

from scaler_wizard.compiler.methods.axisops import grow_units
from scaler_wizard.compiler.methods.unitmap import kv_interleave_map
from scaler_wizard.compiler.passes.base import LowerState, Pass
from scaler_wizard.compiler.passes.common import rewrite_axis


class WidenKVHeads(Pass):
    name = "widen-kv-heads"

    def requires(self, st: LowerState) -> None:
        op = self.op
        if op.group != "kv_heads":
            raise self.fail(st, f"expects `widen kv_heads`, got {op.group}")
        if op.new_size % op.old_size or st.sizes.get("heads", 0) % op.new_size:
            raise self.fail(st, f"kv_heads {op.old_size}->{op.new_size} with {st.sizes.get('heads')} query heads (SW304)")
        for name, ts, a in st.members("kv_heads"):
            if ts.axes[a].role != "out":
                raise self.fail(st, f"{name}: axis {a} reads kv_heads (role `{ts.axes[a].role}`); not supported")

    def apply(self, st: LowerState) -> None:
        op = self.op
        m = kv_interleave_map(op.old_size, op.new_size)
        for name, ts, a in st.members("kv_heads"):
            rewrite_axis(st, ts, a, "kv_heads", m, lambda x, ax: grow_units(x, ax, m), exactness=op.exactness,
                         keeps_values=False,
                         text=f"kv_heads {op.old_size}->{op.new_size}: each KV head repeated x{op.new_size // op.old_size}")
        st.sizes["kv_heads"] = op.new_size
