"""`zero` (alias `random`): new units get random fan-in and zero fan-out, so they add nothing until
trained. FFN units, query heads (within their GQA group, o_proj columns zero) and head_dim (new dims
zero in the q/k/v fan-out; the softmax scale and every RoPE frequency are kept, see
``compiler/rope.py``; approx where a q/k norm over head_dim has no gain to rescale). Source: the
zero-init expansion of bert2BERT (Chen et al., ACL 2022) and MSG (Yao et al., 2023)."""

from __future__ import annotations

from dataclasses import dataclass

from scaler_wizard.compiler.methods.base import register
from scaler_wizard.compiler.methods.width import WidthMethod
from scaler_wizard.compiler.resolved import APPROX, EXACT, EXACT_EPS


@register
@dataclass(frozen=True)
class Zero(WidthMethod):
    name = "zero"
    aliases = ("random",)
    groups = ("ffn", "heads", "head_dim")
    copies = False
    summary = "new units: random fan-in, zero fan-out"
    source = "bert2BERT (Chen et al., ACL 2022); MSG (Yao et al., 2023)"

    def exactness(self, cx):
        if cx.group == "ffn":
            return EXACT, "new units: random fan-in, zero fan-out (they start learning at once)"
        if cx.group == "heads":
            return EXACT, f"new query heads placed in their GQA group ({cx.new // cx.kv} per KV head), o_proj zero"
        if cx.group == "head_dim":
            att = cx.ir.attention
            qk_norms = [n for n in cx.ir.norms if n.group == "head_dim"]
            if att.scaling_source.startswith(("config:", "config-value:")):
                scal = f"softmax scale from {att.scaling_source.split(':', 1)[1]} is unchanged"
            else:
                scal = "q rows scaled to keep 1/sqrt(head_dim)"
            gainless = [n for n in qk_norms if not n.weight]
            if gainless:
                # the zero dims lower the norm's mean-square by k and nothing can scale the output back
                # (Llama-4's L2 q/k norm: every score x sqrt(k), 0.33 relative drift on a tiny model)
                return APPROX, (f"q/k norm over head_dim without a gain ({gainless[0].kind}): the new zero dims "
                                f"scale every normalised q and k by sqrt({cx.new}/{cx.old}) and no gain can undo it")
            if qk_norms and cx.new % cx.old == 0:
                if not att.scaling_source.startswith(("config:", "config-value:")):
                    scal = "q_norm's gains x sqrt(k) keep 1/sqrt(head_dim)"
                return EXACT, (f"{scal}; q/k rows' new dims copy old ones, so the q/k norms' mean-square and "
                               "eps are unchanged; q_norm's new gains zero" + cx.note)
            if qk_norms:
                return EXACT_EPS, (f"{scal}; q/k norms over head_dim see mean-square / k, so their eps is off by "
                                   "that factor" + cx.note)
            return EXACT, f"new dims zero in q/k/v fan-out; {scal}" + ("; rotary pair i -> k*i" if att.rope else "") + cx.note
        return EXACT, ""
