"""`widen ffn` (net2net / tile / lemon / zero): grow each block's FFN width.

net2net: new unit j copies a random old unit (gate/up rows and biases copied); the down
projection's columns of all copies of a unit are scaled by shares summing to 1 (unequal by default,
``split=equal`` for 1/k). Exact for any elementwise activation (SwiGLU copies act(gate)*up whole).
tile / lemon: the same with new unit j copying j mod d (lemon's residue units are fresh: random
fan-in, zero fan-out). zero: new units have random fan-in and zero fan-out.
"""

from __future__ import annotations

from scaler_wizard.compiler.methods.axisops import fan_out_coef, grow_units, random_fill
from scaler_wizard.compiler.methods.unitmap import net2net_map, rng_for, tile_map, zero_map
from scaler_wizard.compiler.passes.base import LowerState, Pass, option
from scaler_wizard.compiler.passes.common import rewrite_axis


class WidenFFN(Pass):
    name = "widen-ffn"

    def requires(self, st: LowerState) -> None:
        # an axis in another role would be a norm over the FFN, which this pass does not grow
        self.require_widen(st, "ffn", ("net2net", "tile", "lemon", "zero"), roles=("out", "in"))

    def unit_map(self, st: LowerState, layer):
        op = self.op
        d, d2 = op.old_size, op.new_size
        equal = option(op, "split") == "equal"
        rng = rng_for(st.seed, f"ffn:{op.index}:{layer}")
        if op.method == "net2net":
            return net2net_map(d, d2, equal=equal, rng=rng)
        if op.method in ("tile", "lemon"):
            return tile_map(d, d2, equal=equal, rng=rng)
        return zero_map(d, d2)

    def apply(self, st: LowerState) -> None:
        op = self.op
        d, d2 = op.old_size, op.new_size
        noise = float(option(op, "noise", st.plan.noise) or 0.0)
        std = st.init_std()
        maps = {}
        for name, ts, a in st.members("ffn"):
            m = maps.get(ts.layer) or maps.setdefault(ts.layer, self.unit_map(st, ts.layer))
            role = ts.axes[a].role
            is_bias = ts.node.shape and len(ts.node.shape) == 1 or (ts.info is not None and ts.info.kind == "bias")
            if role == "out":
                fresh = None if is_bias else random_fill(f"{name}:ffn-fan-in:{op.index}", std)

                def fn(x, ax, fresh=fresh, m=m):
                    return grow_units(x, ax, m, fresh=fresh)

                what = "rows copied" if op.method != "zero" else "old rows kept"
                rewrite_axis(st, ts, a, "ffn", m, fn, exactness=op.exactness, keeps_values=True,
                             text=f"ffn {d}->{d2} ({op.method}): {what}" + (", new units random" if m.fresh else ""))
            else:
                coef = fan_out_coef(m)

                def fn(x, ax, coef=coef, m=m, name=name):
                    return grow_units(x, ax, m, coef=coef, noise=noise, noise_key=f"{name}:ffn-noise:{op.index}",
                                      exact_sum=True)

                what = "columns of copies split to sum to the original" if op.method != "zero" else "new columns zero"
                rewrite_axis(st, ts, a, "ffn", m, fn, exactness=op.exactness, keeps_values=op.method == "zero",
                             text=f"ffn {d}->{d2} ({op.method}): fan-out {what}")
        st.sizes["ffn"] = d2
