"""`upcycle ffn experts E top k`: a dense FFN becomes E identical experts (sparse upcycling).

With the top-k weights renormalised to sum to 1 the mixture equals the dense FFN whatever the router
picks, so the op is exact; ``noise`` (the op's or the plan-wide one) perturbs each expert copy and
makes it approx. ``router``: ``zero`` (default) or ``random`` (small random logits).
Source: Sparse Upcycling (Komatsuzaki et al., ICLR 2023).

:data:`UPCYCLE_TARGETS` is the one table of family names past the IR: transformers' MoE class a dense
family upcycles into, and the config keys that class reads. ``tests/test_methods.py`` builds every
target with transformers and fails when its class or keys change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from scaler_wizard.compiler.methods.base import Method, option, register
from scaler_wizard.compiler.resolved import APPROX, EXACT


@dataclass(frozen=True)
class UpcycleTarget:
    """transformers' MoE family that a dense family upcycles into exactly (top-k renormalised).

    ``experts_key`` / ``top_k_key``: its config keys for E and k; ``ffn_key``: the key holding each
    expert's width (None: the dense ``intermediate_size`` carries over); ``fixed``: keys written
    with these values (renormalised top-k, every layer sparse). ``gate_up`` (E, 2F, H: [gate; up]),
    ``down`` (E, H, F) and ``router`` (E, H): the MoE block's tensor names under a layer, as the
    class's ``save_pretrained`` writes them."""

    model_type: str
    architecture: str
    experts_key: str
    top_k_key: str
    ffn_key: str | None = None
    fixed: dict[str, Any] = field(default_factory=dict)
    gate_up: str = "mlp.experts.gate_up_proj"
    down: str = "mlp.experts.down_proj"
    router: str = "mlp.gate.weight"

    def config_patch(self, experts: int, top_k: int, ffn: int | None) -> dict[str, Any]:
        patch: dict[str, Any] = {"model_type": self.model_type, "architectures": [self.architecture],
                                 self.experts_key: experts, self.top_k_key: top_k}
        for k, v in self.fixed.items():
            patch[k] = v
        if self.ffn_key:
            patch[self.ffn_key] = ffn
        return patch


_MIXTRAL = UpcycleTarget("mixtral", "MixtralForCausalLM", "num_local_experts", "num_experts_per_tok")
_QWEN3_MOE = UpcycleTarget("qwen3_moe", "Qwen3MoeForCausalLM", "num_experts", "num_experts_per_tok",
                           ffn_key="moe_intermediate_size",
                           fixed={"norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []})

UPCYCLE_TARGETS: dict[str, UpcycleTarget] = {
    "llama": _MIXTRAL,
    "mistral": _MIXTRAL,
    "qwen3": _QWEN3_MOE,
}
"""Dense ``model_type`` -> the MoE family it upcycles into exactly."""


@register
@dataclass(frozen=True)
class Upcycle(Method):
    kind = "op"
    name = "upcycle"
    statement = "`upcycle`"
    groups = ("ffn",)
    summary = "dense FFN -> E identical experts, top-k renormalised (exact); router zero or random"
    source = "Sparse Upcycling (Komatsuzaki et al., ICLR 2023)"

    noise: float | None = option("noise on expert copies (breaks expert symmetry; makes the op approx)", kind="nonneg")
    router: str | None = option("router initialisation: `zero` (default) or `random`", kind="choice",
                                choices=("zero", "random"))
    target: UpcycleTarget | None = field(default=None, compare=False)  # set by the type checker

    def unread(self, group=None):
        return {"noise": None}

    def exactness(self, cx):
        """``cx``: ``noise`` (the effective one), ``plan_wide`` (it came from the plan), ``top_k``, ``target``."""
        if not cx.noise:
            return EXACT, f"identical experts with top-{cx.top_k} weights renormalised to sum to 1 ({cx.target.model_type})"
        return APPROX, (f"noise {cx.noise:g}" + (" (plan-wide)" if cx.plan_wide else "")
                        + " on the expert copies changes each expert: the top-k mixture no longer equals the dense FFN")

    def lowering(self, op):
        from scaler_wizard.compiler.passes.upcycle import Upcycle as UpcyclePass

        return UpcyclePass(op)
