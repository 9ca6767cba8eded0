"""`widen experts` (copy): grow the number of experts of every mixture-of-experts layer.

New expert j copies a random old expert (Net2Net order: the old experts keep their indices, each
new one copies an old one, spread as evenly as possible). Every tensor with an axis on the
``experts`` group is grown the same way: the stacked expert weights (``experts.gate_up_proj``,
``experts.down_proj``, per-expert biases) along their ``expert`` axis and the router's rows (its
``out`` axis), so a copy gets exactly its original's router logit. Approx (the type checker says
so): with the copies in the softmax the routing weights and the top-k choice change. ``noise``
adds zero-sum noise across the copies of each expert so that they can diverge in training.
"""

from __future__ import annotations

from scaler_wizard.compiler.methods.axisops import grow_units
from scaler_wizard.compiler.methods.unitmap import net2net_map, rng_for
from scaler_wizard.compiler.passes.base import LowerState, Pass, option
from scaler_wizard.compiler.passes.common import rewrite_axis


class WidenExperts(Pass):
    name = "widen-experts"

    def requires(self, st: LowerState) -> None:
        op = self.op
        self.require_widen(st, "experts", ("copy",), roles=("expert", "out"))
        if op.new_size < op.old_size:
            raise self.fail(st, f"cannot shrink experts {op.old_size} -> {op.new_size}")

    def apply(self, st: LowerState) -> None:
        op = self.op
        d, d2 = op.old_size, op.new_size
        noise = float(option(op, "noise", st.plan.noise) or 0.0)
        maps = {}
        for name, ts, a in st.members("experts"):
            # one map per layer, shared by the layer's expert weights and its router rows
            m = maps.get(ts.layer) or maps.setdefault(
                ts.layer, net2net_map(d, d2, equal=True, rng=rng_for(st.seed, f"experts:{op.index}:{ts.layer}")))

            def fn(x, ax, m=m, name=name):
                return grow_units(x, ax, m, noise=noise, noise_key=f"{name}:experts-noise:{op.index}")

            what = "router rows" if ts.axes[a].role == "out" else "expert weights"
            rewrite_axis(st, ts, a, "experts", m, fn, exactness=op.exactness, keeps_values=not noise,
                         text=f"experts {d}->{d2} (copy): new {what} copy random old ones")
        st.sizes["experts"] = d2
