"""`widen heads` (dup / tile / zero): add query heads with head_dim fixed.

New heads sit in the GQA group of the KV head they read (HF orders query heads group-major): each
group of n old heads becomes n' heads, the old ones first. dup/tile: a new head copies an old head of
its group (q rows and biases copied), the o_proj columns of all copies split to sum to the original.
zero: new heads get random q rows and zero o_proj columns. Fused layouts (NeoX [heads,3,head_dim],
GPT-2 [q|k|v], Phi-3 [q|k|v]) are grown in their own layout by the axis machinery.
"""

from __future__ import annotations

from scaler_wizard.compiler.methods.axisops import fan_out_coef, grow_units, random_fill
from scaler_wizard.compiler.methods.unitmap import gqa_heads_map, rng_for
from scaler_wizard.compiler.passes.base import LowerState, Pass, option
from scaler_wizard.compiler.passes.common import rewrite_axis


class WidenHeads(Pass):
    name = "widen-heads"

    def requires(self, st: LowerState) -> None:
        op = self.op
        self.require_widen(st, "heads", ("dup", "tile", "zero"))
        kv = st.sizes.get("kv_heads", 1)  # no kv_heads group: multi-head attention, K/V grow with Q
        if op.new_size % kv:
            raise self.fail(st, f"{op.new_size} query heads cannot be shared by {kv} KV heads (SW304)")

    def apply(self, st: LowerState) -> None:
        op = self.op
        d, d2 = op.old_size, op.new_size
        # Without a kv_heads group (multi-head attention) k and v are members of `heads` and grow
        # with the same map, so the whole head set is one group.
        kv = st.sizes.get("kv_heads", 1)
        equal = option(op, "split") == "equal"
        noise = float(option(op, "noise", st.plan.noise) or 0.0)
        std = st.init_std()
        m = gqa_heads_map(d, d2, kv, method=op.method, equal=equal, rng=rng_for(st.seed, f"heads:{op.index}"))
        coef = fan_out_coef(m)
        for name, ts, a in st.members("heads"):
            role = ts.axes[a].role
            is_bias = len(ts.node.shape) == 1
            if role == "out":
                fresh = None if is_bias else random_fill(f"{name}:heads-fan-in:{op.index}", std)
                rewrite_axis(st, ts, a, "heads", m, lambda x, ax, fresh=fresh: grow_units(x, ax, m, fresh=fresh),
                             exactness=op.exactness, keeps_values=True,
                             text=f"heads {d}->{d2} ({op.method}): per-head rows "
                             + ("copied within the GQA group" if op.method != "zero" else "kept, new heads random"))
            elif role == "in":
                rewrite_axis(st, ts, a, "heads", m,
                             lambda x, ax, name=name: grow_units(x, ax, m, coef=coef, noise=noise,
                                                                 noise_key=f"{name}:heads-noise:{op.index}",
                                                                 exact_sum=True),
                             exactness=op.exactness, keeps_values=op.method == "zero",
                             text=f"heads {d}->{d2} ({op.method}): o columns "
                             + ("of copies split" if op.method != "zero" else "of new heads zero"))
            elif len(ts.axes[a].groups()) == 1 and (
                    role == "elem" and (ts.info is None or ts.info.kind not in ("norm_weight", "norm_bias"))
                    or role == "other" and len(ts.node.shape) == 1 and ts.info is not None
                    and ts.info.sublayer == "attn" and ts.info.kind == "other"):
                # a per-head value (attention sinks: one logit per query head, concatenated to that
                # head's scores -- role `other` when discovery sees only the concatenation, gpt-oss)
                # goes with its head: a copied head copies it, a new zero-fan-out head's value is
                # never seen (zero)
                rewrite_axis(st, ts, a, "heads", m, lambda x, ax: grow_units(x, ax, m),
                             exactness=op.exactness, keeps_values=True,
                             text=f"heads {d}->{d2} ({op.method}): per-head values copied with their head")
            else:
                raise self.fail(st, f"{name}: axis {a} has role `{role}` on heads")
        st.sizes["heads"] = d2
