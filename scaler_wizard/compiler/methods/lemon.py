"""`lemon`: tiling plus a residue for non-integer factors. The residue units are zero (RMSNorm) or
the mean (LayerNorm) in the residual stream; norm gains are rescaled by eta = sqrt(k*d/d') and
their epsilon by eta^2, so every norm's output is unchanged. Exact in Pre-LN models; a LayerNorm
residue in a Post-LN model is exact only for integer factors (SW306); a nonlinear function of the
hidden stream (a head transform's activation, IR ``residual.nonlinear``) makes any residue approx.
Where one config epsilon also serves norms over other groups it cannot be rescaled for the hidden
norms alone: exact-eps (approx where such a norm is over the attention's output, IR placement
``head_out``, or no norm precedes the sublayers).
Source: LEMON (Wang et al., ICLR 2023)."""

from __future__ import annotations

from dataclasses import dataclass

from scaler_wizard.compiler.methods.base import register
from scaler_wizard.compiler.methods.width import WidthMethod, copy_reason
from scaler_wizard.compiler.resolved import APPROX, EXACT, EXACT_EPS


@register
@dataclass(frozen=True)
class Lemon(WidthMethod):
    name = "lemon"
    groups = ("hidden", "ffn")
    summary = "tile + residue (zero for RMSNorm, mean for LayerNorm) with eta-rescaled norm gains and eps"
    source = "LEMON (Wang et al., ICLR 2023)"

    def exactness(self, cx):
        if cx.group != "hidden":
            return copy_reason(cx)
        old, new = cx.old, cx.new
        kinds = cx.norm_kinds
        if new % old == 0:
            return EXACT, f"integer factor: lemon reduces to tiling ({'/'.join(kinds)}, {cx.placement}-norm)"
        if cx.placement == "post" and "layernorm" in kinds:
            cx.bag.error(
                "SW306",
                f"LEMON's LayerNorm residue is exact in Post-LN models only for integer factors ({old} -> {new})",
                cx.stmt.amount.span,
                help=f"this model normalises after the residual add; use `x{max(2, round(new / old))}` "
                     f"(or `to {old * max(2, round(new / old))}`)",
            )
            return None, ""
        hidden_norms = [n for n in cx.ir.norms if n.group == "hidden"]
        fixed = [n for n in hidden_norms if not n.eps_key and n.eps]
        if fixed and any(n.eps_key for n in hidden_norms):
            # a residue needs every hidden norm's epsilon x eta^2 (config eps) or the stream scaled by
            # 1/eta (fixed eps): with both kinds neither construction keeps both exact (DeepSeek-V2-style
            # MLA's kv_a_layernorm has a fixed eps next to the config's rms_norm_eps)
            cx.bag.error(
                "SW380",
                f"LEMON's residue ({old} -> {new}) cannot keep this model exact: some hidden norms take epsilon "
                f"from the config (`{next(n.eps_key for n in hidden_norms if n.eps_key)}`), `{fixed[0].weight or fixed[0].placement}` "
                f"has a fixed one ({fixed[0].eps:g})",
                cx.stmt.amount.span,
                help=f"use an integer factor: `x{max(2, round(new / old))}` tiles, which is exact whatever the epsilons",
            )
            return None, ""
        gainless = [n for n in hidden_norms if not n.weight]
        if gainless:
            # LEMON puts eta = sqrt(old/new)-style factors into the norm gains; a norm without a gain
            # (OLMo's non-parametric LayerNorm) has nowhere to put it (measured: 0.34 relative drift)
            return APPROX, (f"{len(gainless)} hidden norm(s) without a gain ({gainless[0].placement}-norm): the "
                            "residue's scale cannot be absorbed; use an integer factor (tiling is exact)")
        nonlinear = cx.ir.residual.nonlinear
        if nonlinear:
            # the residue is a linear function of the units (their mean, or zero with a 1/eta-scaled
            # stream); after a writer of the stream a nonlinear f (a head transform's dense + act before
            # its LayerNorm) gives f(mean) != mean(f), so the next norm's statistics change (measured
            # 3.7e-3 relative on Megatron-BERT's tiny model)
            return APPROX, (f"the hidden stream passes through a nonlinear function ({nonlinear[0]}) after a writer: "
                            "the residue units do not stay the mean of the copies; use an integer factor "
                            "(tiling is exact)")
        if cx.ir.mixers:
            # a hybrid's token mixers (gated delta, Mamba) normalise inside themselves, often with the
            # same config eps; discovery does not attribute those norms, so the eps rescale reaches
            # them unaccounted (measured on tiny Qwen3-Next / Qwen3.5: 5e-2 to 9e-2 relative)
            return APPROX, (f"this hybrid's {cx.ir.mixers[0].module_type} mixers normalise inside themselves with the config "
                            "eps that LEMON rescales; use an integer factor (tiling is exact)")
        shared = cx.eps_shared_with_other_groups
        eta2 = (new // old) * old / new
        if shared and not any(n.placement in ("pre", "sandwich_pre") for n in cx.ir.norms):
            # No norm before the sublayers: the other norms (q/k norms) see raw-stream projections
            # whose scale nothing bounds, so the epsilon change is not a small effect (EXAONE-4's
            # post-sublayer-only norms: 0.12 relative on a tiny model).
            return (
                APPROX,
                f"eps rescaled by eta^2={eta2:.4g} for the hidden norms, but the same config eps also serves "
                + ", ".join(shared) + ", which read un-normalised projections of the stream",
            )
        writes = [n for n in cx.ir.norms if n.group != "hidden" and n.placement == "head_out"
                  and n.eps_key in {h.eps_key for h in cx.ir.norms if h.group == "hidden" and h.eps_key}]
        if shared and writes:
            # A norm over the attention's output (DiffLlama's per-head subln) reads attention values,
            # not the normalised stream, and its output reaches the stream through o_proj alone: the
            # epsilon change passes on linearly, unbounded by the stream's scale (measured 9.6e-4
            # relative on DiffLlama's tiny model, at the exact-eps tolerance of 1e-3).
            return (
                APPROX,
                f"eps rescaled by eta^2={eta2:.4g} for the hidden norms, but the same config eps also serves "
                f"the {writes[0].placement} norm over {writes[0].group}, whose output the stream receives "
                "through the output projection; use an integer factor (tiling is exact)",
            )
        if shared:
            return (
                EXACT_EPS,
                f"eps rescaled by eta^2={eta2:.4g} for the hidden norms, but the same config eps also serves "
                + ", ".join(shared),
            )
        residue = "zero" if set(kinds) <= {"rmsnorm", "rmsnorm_1p"} else "average"
        return EXACT, f"{residue} residue with gains x eta and eps x eta^2={eta2:.4g}"
