"""Property: random family x random tiny config x random valid plan -> apply -> load -> exact plans
preserve the function (exact-eps plans within their looser tolerance); refusals are diagnostics."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from families import FAMILIES

from scaler_wizard import api
from scaler_wizard.diagnostics import PlanError

FAMS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox", "opt", "mixtral")

STATEMENTS = st.sampled_from([
    "widen hidden x2",
    "widen hidden to 96 lemon",
    "widen ffn x2 net2net",
    "widen ffn to 200 zero",
    "widen ffn to 220 net2net split=equal",
    "widen heads x2 dup",
    "widen kv_heads x2",
    "widen head_dim x2",
    "insert layers every 1 identity",
    "insert 1 layers after 0 zero",
    "insert layer 0 identity",
    "insert layer 1 cancel",
])

# Tiny configs drawn around each family's base config (tests/families.py): depth, FFN width and
# vocabulary vary; hidden / heads stay at the base values so every draw is a valid config.
LAYER_KEYS = ("num_hidden_layers", "n_layer")
FFN_KEYS = ("intermediate_size", "ffn_dim", "n_inner")


def tiny_config(fam: str, layers: int, ffn: int, vocab: int):
    cfg = FAMILIES[fam]()
    for k in LAYER_KEYS:
        if hasattr(cfg, k):
            setattr(cfg, k, layers)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i % len(cfg.layer_types)] for i in range(layers)]
    for k in FFN_KEYS:
        if hasattr(cfg, k):
            setattr(cfg, k, ffn)
    cfg.vocab_size = vocab
    return cfg


@pytest.mark.slow
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fam=st.sampled_from(FAMS), layers=st.integers(1, 3), ffn=st.sampled_from([80, 96, 112]),
       vocab=st.sampled_from([96, 128]), stmts=st.lists(STATEMENTS, min_size=1, max_size=3, unique=True),
       seed=st.integers(0, 1000))
def test_exact_plans_preserve_function(tmp_path_factory, fam, layers, ffn, vocab, stmts, seed):
    import torch
    from transformers import AutoModelForCausalLM

    # at most one hidden statement (a second would see the new size); width before depth
    hidden = [s for s in stmts if "hidden" in s][:1]
    rest = [s for s in stmts if "hidden" not in s]
    plan = "\n".join(hidden + rest)
    cfg = tiny_config(fam, layers, ffn, vocab)
    torch.manual_seed(seed)
    src = tmp_path_factory.mktemp("src") / fam
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(src)
    try:
        rp = api.check(plan, model=str(src), seed=seed)
    except PlanError as e:  # refusals are diagnostics with reasons, never another exception
        assert all(d.code.startswith("SW") and d.message for d in e.diagnostics)
        event("refused by the type checker")
        return
    event(f"applied ({rp.exactness})")
    out = tmp_path_factory.mktemp("o") / "out"
    res = api.apply(rp, out=str(out), progress=False)
    ver = res["verification"]
    assert ver["passed"], (fam, plan, ver["max_rel"])
    if rp.exactness == "exact":
        assert ver["max_rel"] <= 1e-5, (fam, plan, ver["max_rel"])
    elif rp.exactness == "exact-eps":
        assert ver["max_rel"] <= 1e-3, (fam, plan, ver["max_rel"])
    assert res["verification"]["ir_check"]["passed"] is not False
    loaded, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
