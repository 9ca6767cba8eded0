"""Tiny models whose config leaves tensor sizes implicit or lets values coincide (issue 7 section 1).

Each input is saved with ``save_pretrained`` (seeded random fp32 weights, every 1-D tensor -- norm
gains and biases -- perturbed so that no op can pass by accident), then config.json is edited as a
real checkpoint ships it (``head_dim`` deleted, as in Llama-2 / TinyLlama / Mistral-7B-v0.1).

    ISSUE_INPUTS: name -> (builder kwargs, plan)      # the inputs of the issue, each a test
    save_input(name_or_spec, out_dir) -> Path
"""

from __future__ import annotations

import json
from pathlib import Path

from families import FAMILIES

_BASE = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=128, max_position_embeddings=32)


def spec(model_type: str, drop: tuple[str, ...] = (), family: str | None = None, **kw) -> dict:
    """A model description: ``model_type`` with config ``kw``, or FAMILIES[family] updated by ``kw``;
    ``drop``: keys deleted from the saved config.json."""
    return {"model_type": model_type, "family": family, "kw": kw, "drop": tuple(drop)}


ISSUE_INPUTS: dict[str, tuple[dict, str]] = {
    # a) head_dim left implicit: transformers re-derives hidden // heads from the written config
    "a_llama_no_head_dim": (spec("llama", drop=("head_dim",), **_BASE, intermediate_size=96, num_key_value_heads=2,
                                 tie_word_embeddings=False), "widen hidden x2 tile"),
    # b) multi-head attention written out explicitly (kv == heads)
    "b_phi_kv_eq_heads": (spec("phi", **_BASE, intermediate_size=96, num_key_value_heads=4,
                               partial_rotary_factor=0.5), "widen hidden x2 tile"),
    "b_llama_kv4_heads": (spec("llama", **_BASE, intermediate_size=96, num_key_value_heads=4, head_dim=16,
                               tie_word_embeddings=False), "widen heads x2 dup"),
    "b_phi3_kv_eq_heads": (spec("phi3", family="phi3", num_key_value_heads=4),
                           "widen hidden x2 lemon; widen ffn x2 lemon; insert layer 1 identity"),
    # c) a key whose value coincides with a group's size (gpt2-medium: n_embd == n_positions)
    "c_gpt2_n_positions_eq_n_embd": (spec("gpt2", n_embd=64, n_head=4, n_layer=2, vocab_size=128, n_positions=64),
                                     "widen hidden x2 tile"),
    # d) a derived size pinned through an override key the input lacks (n_inner = None -> 4 * n_embd)
    "d_gptj_widen_ffn": (spec("gptj", drop=("n_inner",), n_embd=64, n_head=4, n_layer=2, vocab_size=128, n_positions=32,
                              rotary_dim=8), "widen ffn x2"),
}


def make_config(s: dict):
    from transformers import AutoConfig

    if s.get("family"):
        cfg = FAMILIES[s["family"]]()
        for k, v in s["kw"].items():
            setattr(cfg, k, v)
        return cfg
    return AutoConfig.for_model(s["model_type"], **s["kw"])


def save_input(s, out_dir, *, seed: int = 0) -> Path:
    """Build the model of spec ``s`` (or of ISSUE_INPUTS[s]), perturb 1-D tensors, save, drop keys."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    if isinstance(s, str):
        s = ISSUE_INPUTS[s][0]
    cfg = make_config(s)
    torch.manual_seed(seed)
    auto = AutoModelForMaskedLM if cfg.model_type == "bert" else AutoModelForCausalLM
    model = auto.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    out = Path(out_dir)
    model.save_pretrained(out)
    if s["drop"]:
        cj = out / "config.json"
        d = json.loads(cj.read_text())
        for k in s["drop"]:
            d.pop(k, None)
        cj.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    return out
