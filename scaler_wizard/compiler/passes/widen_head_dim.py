"""`widen head_dim` (zero): grow every head's dimension.

With RoPE (full rotary, integer factor k), old rotary pair i moves to new pair k*i so every old
frequency is kept (rotate_half: dim i -> k*i, dim i+hd/2 -> k*i+hd'/2; interleaved: 2i -> 2ki).
New dims: q rows zero (so scores are unchanged), k and v rows random (they still learn: q's new
rows get gradient through k), o_proj's new columns zero. The softmax scale 1/sqrt(head_dim) drops
by sqrt(k): q rows are multiplied by sqrt(k). With q/k norms over head_dim (Qwen3) the norms see
mean-square / k: k rows' new dims stay zero, k_norm gains x 1/sqrt(k), and the q scale moves into
q_norm's gain (epsilon cannot follow: exact-eps). For an integer factor k the norms keep their
statistics instead (exact, epsilon included): q and k rows' new dims copy old dims (each old dim k
times; with RoPE a new pair copies an old pair), so every mean-square is unchanged; q_norm's new
gains are zero, so q's new dims are zero after the norm and add nothing to any score, and the
softmax scale's 1/sqrt(k) is q_norm's old gains x sqrt(k).
"""

from __future__ import annotations

import math

from scaler_wizard.compiler import program as P
from scaler_wizard.compiler.methods.axisops import grow_units, random_fill
from scaler_wizard.compiler.methods.unitmap import head_dim_copy_map, rope_head_dim_map, zero_map
from scaler_wizard.compiler.passes.base import LowerState, Pass
from scaler_wizard.compiler.passes.common import rewrite_axis


def _proj_of(name: str, att) -> str | None:
    for role in ("q", "k", "v", "o"):
        t = getattr(att, role)
        if t is None:
            continue
        base = t.rsplit(".", 1)[0]
        if name.rsplit(".", 1)[0] == base:
            return role
    return None


def _is_q(norm_weight: str) -> bool:
    return "q_" in norm_weight.rsplit(".", 2)[-2] or ".q" in norm_weight


class WidenHeadDim(Pass):
    name = "widen-head-dim"

    def requires(self, st: LowerState) -> None:
        op, att = self.op, st.ir.attention
        if op.group != "head_dim" or att is None:
            raise self.fail(st, "expects `widen head_dim` on a model with attention")
        if att.fused_qkv is not None:
            raise self.fail(st, "head_dim growth of a fused qkv projection is not supported")
        if att.rope is not None:
            if att.rope.rotary_dim != att.rope.head_dim or op.new_size % op.old_size:
                raise self.fail(st, "RoPE keeps head_dim growth exact only with full rotary and an integer factor (SW307)")
        if not st.members("head_dim"):
            raise self.fail(st, "no tensor axis carries head_dim in the IR")

    def apply(self, st: LowerState) -> None:
        op, att, ir = self.op, st.ir.attention, st.ir
        d, d2 = op.old_size, op.new_size
        k = d2 / d
        if att.rope is not None:
            m = rope_head_dim_map(d, d2, style=att.rope.style, rotary_dim=att.rope.rotary_dim)
        else:
            m = zero_map(d, d2)
        qk_norms = {n.weight: n for n in ir.norms if n.group == "head_dim" and n.weight}
        scale_from_hd = att.scaling_source == "head_dim"
        # q/k norms with an integer factor: copy q/k dims so the norms' statistics (and eps) hold
        # (only rows whose own norm follows them: q without a norm keeps zero new dims and its sqrt(k))
        copy_qk = bool(qk_norms) and d2 % d == 0
        mc = head_dim_copy_map(m, style=att.rope.style if att.rope is not None else None) if copy_qk else None
        normed = {"q" if _is_q(t) else "k" for t in qk_norms}
        # c_q * c_k must make (k * c_q * c_k) / sqrt(k) (qk norms) or c_q / 1 (no norms) keep the score
        std = st.init_std()
        for name, ts, a in st.members("head_dim"):
            role = ts.axes[a].role
            tmpl = ts.info.name if ts.info is not None else name
            is_bias = len(ts.node.shape) == 1 and role == "out"
            if role == "elem":
                norm = qk_norms.get(tmpl)
                if norm is None:
                    raise self.fail(st, f"{name}: elementwise on head_dim but not a q/k norm")
                is_q = _is_q(tmpl)
                new_gain = 1.0
                if copy_qk:
                    # same statistics: q_norm carries the scale's 1/sqrt(k) and zeroes q's new dims
                    c = math.sqrt(k) if (is_q and scale_from_hd) else 1.0
                    new_gain = 0.0 if is_q else 1.0
                elif is_q:
                    c = (1 / math.sqrt(k)) * (math.sqrt(k) if scale_from_hd else 1.0)
                else:
                    c = 1 / math.sqrt(k)
                one_p = norm.kind == "rmsnorm_1p"
                coef = tuple(c for _ in range(d2))

                def fn(x, ax, coef=coef, one_p=one_p, new_gain=new_gain):
                    eff = P.Add(x, P.Full(x.shape, 1.0)) if one_p else x
                    y = grow_units(eff, ax, m, coef=coef, fresh=lambda s: P.Full(s, new_gain))
                    return P.Add(y, P.Full(y.shape, -1.0)) if one_p else y

                rewrite_axis(st, ts, a, "head_dim", m, fn, exactness=op.exactness, keeps_values=False,
                             text=f"head_dim {d}->{d2}: q/k norm gain placed by rotary pair, x{c:.4g}"
                             + (f", new gains {new_gain:g}" if copy_qk else ""))
                continue
            proj = _proj_of(tmpl, att)
            if proj is None:
                raise self.fail(st, f"{name}: carries head_dim but is not q/k/v/o")
            coef = None
            fresh = None
            if copy_qk and proj in normed:
                def fn(x, ax, mc=mc):
                    return grow_units(x, ax, mc)

                rewrite_axis(st, ts, a, "head_dim", m, fn, exactness=op.exactness, keeps_values=False,
                             text=f"head_dim {d}->{d2}: {proj} {'bias' if is_bias else 'rows'} placed by rotary pair, "
                                  f"new dims copy old ones (the {proj} norm's mean-square is unchanged)")
                continue
            if proj == "q":
                if scale_from_hd and (not qk_norms or (copy_qk and "q" not in normed)):
                    coef = tuple(math.sqrt(k) for _ in range(d2))
                text = "q rows placed by rotary pair, new dims zero" + (f", x sqrt({k:g})" if coef else "")
            elif proj == "k":
                if not qk_norms and not is_bias:
                    fresh = random_fill(f"{name}:head-dim-fan-in:{op.index}", std)
                text = "k rows placed by rotary pair, new dims " + ("random" if fresh else "zero")
            elif proj == "v":
                if not is_bias:
                    fresh = random_fill(f"{name}:head-dim-fan-in:{op.index}", std)
                text = "v rows kept, new dims " + ("random" if fresh else "zero")
            else:
                text = "o columns kept, new dims zero"

            def fn(x, ax, coef=coef, fresh=fresh):
                return grow_units(x, ax, m, coef=coef, fresh=fresh)

            rewrite_axis(st, ts, a, "head_dim", m, fn, exactness=op.exactness, keeps_values=False,
                         text=f"head_dim {d}->{d2}: {text}")
        st.sizes["head_dim"] = d2
