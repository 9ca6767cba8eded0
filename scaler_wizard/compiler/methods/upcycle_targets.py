"""The one table of sparse-upcycling targets: which mixture-of-experts family of the installed
transformers each dense family becomes, and the schema (config keys, tensor names) of that target.

Sparse upcycling (Komatsuzaki et al., ICLR 2023): every expert starts as a copy of the dense FFN. With
top-k weights renormalised to sum to 1, any router choice mixes k identical experts, so the MoE
layer equals the dense FFN exactly. A target is listed here only when transformers' class computes
that mixture (softmax over the top-k logits, or ``norm_topk_prob``) and the rest of its decoder layer
is the dense family's (same norms, placement, attention, biases); tests/test_upcycle_targets.py
builds every pair from the real classes, measures the fp32 logits and fails when transformers'
classes change (tensor names or shapes of the schema).

Families with an MoE sibling whose layer differs are listed in :data:`REFUSED` with the reason and
the nearest supported target. Drop-Upcycling (Nakamura et al., ICLR 2025): ``drop=<fraction>``
re-initialises that fraction of each expert's FFN units (a different subset per expert; gate/up rows
and down columns), which breaks expert symmetry: approx.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class UpcycleTarget:
    """Schema of one dense -> MoE pair.

    dense: the dense model_type; model_type / architecture: the target's;
    experts_key / top_k_key: config keys of E and k; ffn_key: config key of the per-expert FFN width
    (None: the dense ``intermediate_size`` is read); block: module under the layer holding the MoE
    (``mlp``, ``block_sparse_moe``); router: the router's name in it; fixed: config values the exact
    construction needs (renormalised top-k, every layer sparse); shared: name of a shared expert
    (gate/up copy the dense ones, its down projection and its gate are zero: contributes nothing at
    first) and shared_ffn_key its width key; biases_ok: the target keeps the dense attention biases."""

    dense: str
    model_type: str
    architecture: str
    experts_key: str
    top_k_key: str
    ffn_key: str | None = None
    block: str = "mlp"
    router: str = "gate"
    fixed: dict = field(default_factory=dict)
    shared: str | None = None
    shared_gate: str | None = None
    shared_ffn_key: str | None = None
    note: str = ""

    def names(self, layer_prefix: str, layer: int) -> dict[str, str]:
        """Output tensor names of one layer: gate_up, down, router (+ shared_gate/up/down, shared_gate_w)."""
        p = f"{layer_prefix}.{layer}.{self.block}"
        out = {"gate_up": f"{p}.experts.gate_up_proj", "down": f"{p}.experts.down_proj",
               "router": f"{p}.{self.router}.weight"}
        if self.shared:
            for part in ("gate", "up", "down"):
                out[f"shared_{part}"] = f"{p}.{self.shared}.{part}_proj.weight"
        if self.shared_gate:
            out["shared_gate_w"] = f"{p}.{self.shared_gate}.weight"
        return out

    def config_patch(self, experts: int, top_k: int, ffn: int) -> dict:
        """Config keys to set on the dense config (model_type, architectures, E, k, widths, fixed)."""
        patch = {"model_type": self.model_type, "architectures": [self.architecture],
                 self.experts_key: experts, self.top_k_key: top_k}
        if self.ffn_key:
            patch[self.ffn_key] = ffn
        if self.shared_ffn_key:
            patch[self.shared_ffn_key] = ffn
        patch.update(self.fixed)
        return patch


_QWEN_MOE_FIXED = {"norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []}

UPCYCLE_TARGETS: dict[str, UpcycleTarget] = {
    t.dense: t
    for t in (
        UpcycleTarget("llama", "mixtral", "MixtralForCausalLM", "num_local_experts", "num_experts_per_tok",
                      note="softmax over the top-k logits"),
        UpcycleTarget("mistral", "mixtral", "MixtralForCausalLM", "num_local_experts", "num_experts_per_tok",
                      note="softmax over the top-k logits"),
        UpcycleTarget("qwen3", "qwen3_moe", "Qwen3MoeForCausalLM", "num_experts", "num_experts_per_tok",
                      "moe_intermediate_size", fixed=_QWEN_MOE_FIXED, note="norm_topk_prob"),
        UpcycleTarget("qwen2", "qwen2_moe", "Qwen2MoeForCausalLM", "num_experts", "num_experts_per_tok",
                      "moe_intermediate_size", fixed={**_QWEN_MOE_FIXED, "qkv_bias": True},
                      shared="shared_expert", shared_gate="shared_expert_gate",
                      shared_ffn_key="shared_expert_intermediate_size",
                      note="norm_topk_prob; q/k/v biases and the tied head kept; the shared expert copies the "
                           "dense gate/up with a zero down projection (adds 0 until trained)"),
        UpcycleTarget("granite", "granitemoe", "GraniteMoeForCausalLM", "num_local_experts", "num_experts_per_tok",
                      block="block_sparse_moe", router="router",
                      note="softmax over the top-k logits; Granite's multipliers carry over"),
    )
}

# dense families with an MoE sibling in transformers that cannot reproduce the dense function
REFUSED: dict[str, tuple[str, str]] = {
    "phi3": ("phimoe", "PhiMoE normalises with LayerNorm (Phi-3: RMSNorm) and routes with sparsemixer, whose "
                       "top-2 weights do not sum to 1"),
    "olmo2": ("olmoe", "OLMoE normalises before each sublayer, OLMo-2 after it"),
    "olmo": ("olmoe", "OLMoE uses RMSNorm with q/k norms, OLMo a parameter-free LayerNorm without them"),
    "glm4": ("glm4_moe", "GLM-4 has sandwich norms around each sublayer, GLM-4-MoE does not"),
    "phi": ("phimoe", "Phi-1/2 run attention and MLP in parallel from one LayerNorm, PhiMoE sequentially"),
}


def nearest_supported(model_type: str) -> str:
    """One line naming the closest supported pair for a refused or unknown dense family."""
    if model_type in REFUSED:
        moe, why = REFUSED[model_type]
        return f"`{model_type} -> {moe}` cannot be exact: {why}; supported: " + supported_pairs()
    return "supported: " + supported_pairs()


def supported_pairs() -> str:
    return ", ".join(f"{t.dense} -> {t.model_type}" for t in UPCYCLE_TARGETS.values())
