"""Tiny random configs for every supported family, shared by the test suites.

Sizes are pairwise distinct where the family allows (hidden 64, ffn 96/160, heads 4, kv_heads 2,
head_dim 16, vocab 128/256, 2 layers) so that binding groups to config keys by value is unambiguous;
``llama_square`` has hidden_size == intermediate_size to exercise differential tracing.

    FAMILIES: dict[str, callable() -> transformers.PretrainedConfig]
    build_model(name) -> (config, model)   # seeded random fp32 weights, eval mode
"""

from __future__ import annotations

from typing import Callable

_COMMON = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=128, max_position_embeddings=32)


def _cfg(model_type: str, **kw):
    def make():
        from transformers import AutoConfig

        return AutoConfig.for_model(model_type, **kw)

    make.__name__ = f"config_{model_type}"
    return make


FAMILIES: dict[str, Callable] = {
    "llama": _cfg("llama", **_COMMON, intermediate_size=96, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False),
    "llama_square": _cfg("llama", **{**_COMMON, "hidden_size": 64}, intermediate_size=64, num_key_value_heads=2,
                         head_dim=16, tie_word_embeddings=False),
    "mistral": _cfg("mistral", **_COMMON, intermediate_size=96, num_key_value_heads=2, head_dim=16, sliding_window=40),
    "qwen2": _cfg("qwen2", **{**_COMMON, "vocab_size": 256}, intermediate_size=160, num_key_value_heads=2,
                  tie_word_embeddings=True),
    "qwen3": _cfg("qwen3", **_COMMON, intermediate_size=96, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False),
    "gemma": _cfg("gemma", **_COMMON, intermediate_size=96, num_key_value_heads=2, head_dim=16),
    "gemma2": _cfg("gemma2", **_COMMON, intermediate_size=96, num_key_value_heads=2, head_dim=16, sliding_window=40,
                   query_pre_attn_scalar=24, layer_types=["sliding_attention", "full_attention"]),
    "phi3": _cfg("phi3", **_COMMON, intermediate_size=96, num_key_value_heads=2, pad_token_id=0,
                 partial_rotary_factor=0.5),
    "gpt2": _cfg("gpt2", n_embd=64, n_head=4, n_layer=2, vocab_size=128, n_positions=32),
    "gpt_neox": _cfg("gpt_neox", **_COMMON, intermediate_size=160, rotary_pct=0.25),
    "opt": _cfg("opt", **_COMMON, ffn_dim=96, word_embed_proj_dim=64, do_layer_norm_before=True, pad_token_id=1),
    "opt_postln": _cfg("opt", **_COMMON, ffn_dim=96, word_embed_proj_dim=64, do_layer_norm_before=False, pad_token_id=1),
    "mixtral": _cfg("mixtral", **_COMMON, intermediate_size=96, num_key_value_heads=2, head_dim=16,
                    num_local_experts=5, num_experts_per_tok=3),
    "bert": _cfg("bert", **_COMMON, intermediate_size=96, type_vocab_size=3),
}


def build_model(name: str):
    """(config, model) with seeded random fp32 weights, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    config = FAMILIES[name]()
    torch.manual_seed(0)
    auto = AutoModelForMaskedLM if config.model_type == "bert" else AutoModelForCausalLM
    model = auto.from_config(config, dtype=torch.float32)
    model.eval()
    return config, model


def sweep_tiny(tmp_path_factory, family: str) -> str:
    """A directory holding ``family`` built tiny by the family sweep (scaler_wizard.sweep.build_tiny)."""
    from scaler_wizard import sweep

    d = tmp_path_factory.mktemp(family)
    sweep.build_tiny(family, d)
    return str(d)


def first_refusal(plan: str, model: str):
    """The first diagnostic of the PlanError ``api.check(plan, model)`` raises (fails when it raises none)."""
    import pytest

    from scaler_wizard import api
    from scaler_wizard.diagnostics import PlanError

    with pytest.raises(PlanError) as e:
        api.check(plan, model)
    return e.value.diagnostics[0]
