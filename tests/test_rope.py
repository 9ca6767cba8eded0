"""RoPE scaling variants (issue 7 section 2): discovery of the rope type, the attention factor folded
into cos/sin and per-frequency lists; what `widen hidden / heads / head_dim` do under each type
transformers supports (default, linear, dynamic, yarn, longrope, llama3), on Llama and Mistral
(explicit head_dim, separate q/k/v), Qwen2 (derived head_dim, tied embeddings) and Phi-3 (derived
head_dim, fused qkv, partial rotary; its config class accepts only default and longrope).

Exact plans are applied and verified in fp32 (the usual verify: 32 tokens, which crosses
original_max_position_embeddings = 20, so longrope's long factors and yarn's scaled range are
exercised; the KV-cache prefill of 16 tokens stays in the short regime), and where the frequencies
moved or depend on length, compared again at 100 tokens (past max_position_embeddings = 80: dynamic
NTK re-basing). Refusals are diagnostics with nothing written.
"""

from __future__ import annotations

import json
import math
import os

import pytest

from scaler_wizard import api
from scaler_wizard.diagnostics import PlanError

RTOL = 1e-5
OMPE, MPE = 20, 80  # no model size equals either (binding by value stays unambiguous)
FIGURES = os.environ.get("SW_ROPE_FIGURES")  # a path: append measured figures (README table)


def rope_params(rtype: str, pairs: int) -> dict:
    p = {
        "default": {"rope_type": "default"},
        "linear": {"rope_type": "linear", "factor": 2.0},
        "dynamic": {"rope_type": "dynamic", "factor": 2.0},
        # beta_slow 0.25: the correction range ends at pair 2.21 of 8, ceil'd to 3 (4.42 -> 5 of 16 when
        # head_dim doubles), so truncation moves old frequencies; truncate=false scales the range with dim
        "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": OMPE, "beta_fast": 32.0,
                 "beta_slow": 0.25},
        "yarn_notrunc": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": OMPE, "beta_fast": 32.0,
                         "beta_slow": 0.25, "truncate": False},
        "longrope": {"rope_type": "longrope", "original_max_position_embeddings": OMPE,
                     "short_factor": [1.0 + 0.1 * i for i in range(pairs)],
                     "long_factor": [2.0 + 0.5 * i for i in range(pairs)]},
        "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": OMPE},
    }[rtype]
    return {**p, "rope_theta": 10000.0}


def make_config(fam: str, rtype: str):
    from transformers import AutoConfig

    common = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, vocab_size=128,
                  intermediate_size=96, max_position_embeddings=MPE)
    if fam == "llama":  # head_dim 16, full rotary: 8 pairs
        return AutoConfig.for_model("llama", head_dim=16, tie_word_embeddings=False,
                                    rope_parameters=rope_params(rtype, 8), **common)
    if fam == "mistral":  # a second family with an explicit head_dim (separate q/k/v, full rotary: 8 pairs)
        return AutoConfig.for_model("mistral", head_dim=16, sliding_window=None, rope_parameters=rope_params(rtype, 8),
                                    **common)
    if fam == "qwen2":  # head_dim = hidden // heads = 16, tied embeddings
        return AutoConfig.for_model("qwen2", tie_word_embeddings=True, rope_parameters=rope_params(rtype, 8),
                                    **{**common, "intermediate_size": 160})
    # phi3: head_dim = hidden // heads = 16, partial_rotary_factor 0.5: 4 pairs
    extra = {"original_max_position_embeddings": OMPE} if rtype == "longrope" else {}
    return AutoConfig.for_model("phi3", pad_token_id=0, partial_rotary_factor=0.5,
                                rope_parameters=rope_params(rtype, 4), **extra, **common)


_SAVED: dict = {}


def saved_model(tmp_path_factory, fam: str, rtype: str):
    key = (fam, rtype)
    if key not in _SAVED:
        import torch
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(make_config(fam, rtype), dtype=torch.float32)
        d = tmp_path_factory.mktemp(f"rope-{fam}-{rtype}")
        m.save_pretrained(d)
        _SAVED[key] = d
    return _SAVED[key]


# (family, op) -> types refused, with the diagnostic code; every other type must be exact.
REFUSED = {
    ("llama", "widen head_dim x2"): {"dynamic": "SW307", "yarn": "SW307"},
    ("mistral", "widen head_dim x2"): {"dynamic": "SW307", "yarn": "SW307"},
    # Phi-3 and Qwen2 derive head_dim = hidden // heads: heads and head_dim cannot grow alone (the
    # type checker refuses before looking at the rope); hidden grows with implied heads, head_dim kept
    ("phi3", "widen heads x2"): "all:SW308",
    ("phi3", "widen head_dim x2"): "all:SW308",
    ("qwen2", "widen heads x2"): "all:SW308",
    ("qwen2", "widen head_dim x2"): "all:SW308",
}
TYPES = ("default", "linear", "dynamic", "yarn", "yarn_notrunc", "longrope", "llama3")
# Phi3Config itself accepts only default and longrope (it rewrites yarn to longrope, rejects the rest)
FAMILY_TYPES = {"llama": TYPES, "mistral": TYPES, "qwen2": TYPES, "phi3": ("default", "longrope")}
OPS = ("widen hidden x2", "widen heads x2", "widen head_dim x2")
FAMILY_OPS = {"mistral": OPS[1:]}  # Mistral's hidden growth is Llama's: only what touches attention


def expected(fam: str, op: str, rtype: str) -> str | None:
    """None: exact; else the diagnostic code of the refusal."""
    r = REFUSED.get((fam, op))
    if isinstance(r, str):
        return r.split(":")[1]
    return (r or {}).get(rtype)


def _record(fam, rtype, op, value):
    if FIGURES:
        with open(FIGURES, "a") as f:
            f.write(json.dumps({"family": fam, "type": rtype, "op": op, "result": value}) + "\n")


def run_case(tmp_path_factory, tmp_path, fam: str, rtype: str, op: str):
    from scaler_wizard.runtime.verify import compare_models

    src = saved_model(tmp_path_factory, fam, rtype)
    out = tmp_path / "out"
    want = expected(fam, op, rtype)
    if want is not None:
        with pytest.raises(PlanError) as e:
            api.apply(op, str(src), out=str(out), progress=False)
        codes = [d.code for d in e.value.diagnostics]
        assert want in codes, codes
        d = next(d for d in e.value.diagnostics if d.code == want)
        assert d.span.line == 1 and d.message  # positioned, with a reason
        assert not out.exists()
        _record(fam, rtype, op, f"refused {want}: {d.message}")
        return None
    res = api.apply(op, str(src), out=str(out), progress=False)
    ver = res["verification"]
    assert res["exactness"] == "exact", res["exactness"]
    assert ver["passed"], ver
    names = {c["name"] for c in ver["checks"]}
    assert {"random_ids", "padding_left", "kv_cache_vs_original"} <= names
    if rtype == "longrope":  # the original's own cached decoding switches factors past 20 tokens
        assert "kv_cache_vs_full" not in names
        assert any("kv_cache_vs_full not judged" in n for n in ver["notes"]), ver["notes"]
    else:
        assert "kv_cache_vs_full" in names
    worst = ver["max_rel"]
    if op == "widen head_dim x2" or rtype == "dynamic":  # the frequencies moved, or depend on length:
        rep = compare_models(str(out), str(src), seq_len=MPE + 20, check_kv=False)  # past max_position
        assert rep.passed, rep.summary()
        worst = max(worst, rep.max_rel)
    assert worst <= RTOL
    cfg_in = json.loads((src / "config.json").read_text())
    cfg_out = json.loads((out / "config.json").read_text())
    rp_in, rp_out = cfg_in["rope_parameters"], cfg_out["rope_parameters"]
    assert rp_out["rope_type"] == rp_in["rope_type"]
    if op != "widen head_dim x2":  # head_dim kept: every rope parameter stays as it was
        assert rp_out == rp_in
    _record(fam, rtype, op, worst)
    return cfg_in, cfg_out


FAST = {("llama", "longrope", "widen head_dim x2"), ("llama", "yarn", "widen head_dim x2"),
        ("phi3", "longrope", "widen hidden x2"), ("phi3", "longrope", "widen heads x2")}


@pytest.mark.parametrize("fam,rtype,op", [
    pytest.param(f, t, o, marks=() if (f, t, o) in FAST else pytest.mark.slow)
    for f in ("llama", "mistral", "qwen2", "phi3") for t in FAMILY_TYPES[f] for o in FAMILY_OPS.get(f, OPS)
])
def test_rope_type_x_op(tmp_path_factory, tmp_path, fam, rtype, op):
    got = run_case(tmp_path_factory, tmp_path, fam, rtype, op)
    if got and fam == "llama" and rtype == "longrope" and op == "widen head_dim x2":
        cfg_in, cfg_out = got
        for key in ("short_factor", "long_factor"):
            old, new = cfg_in["rope_parameters"][key], cfg_out["rope_parameters"][key]
            assert len(new) == 2 * len(old) == 16
            assert new[0::2] == old  # old factor i at new pair 2i, where the lowering puts old pair i


def test_longrope_lists_are_placed_where_the_pairs_go(tmp_path_factory, tmp_path):
    """The control: the same grown tensors with the long factors placed naively (old list repeated
    element-wise is right; old list + a copy of itself is not) differ past the original length and
    agree before it, so the regime checks above can fail."""
    from scaler_wizard.runtime.verify import compare_models

    src = saved_model(tmp_path_factory, "llama", "longrope")
    out = tmp_path / "out"
    api.apply("widen head_dim x2", str(src), out=str(out), progress=False, verify=False)
    cfg = json.loads((out / "config.json").read_text())
    old = json.loads((src / "config.json").read_text())["rope_parameters"]["long_factor"]
    cfg["rope_parameters"]["long_factor"] = old + old
    (out / "config.json").write_text(json.dumps(cfg))
    short = compare_models(str(out), str(src), seq_len=OMPE - 4, check_kv=False, check_padding=False)
    long = compare_models(str(out), str(src), seq_len=OMPE + 20, check_kv=False, check_padding=False)
    assert short.max_rel <= RTOL
    assert long.max_rel > 1e-3


def test_discovery_of_rope_facts():
    """The IR names the rope type, the factor the rotary module folds into cos/sin, and the
    per-frequency lists; the softmax scale stays 1/sqrt(head_dim) (the cos/sin factor is not it)."""
    from scaler_wizard.ir import discover

    ir = discover(make_config("llama", "longrope"))
    r = ir.attention.rope
    assert r.rope_type == "longrope" and r.per_frequency == ("long_factor", "short_factor")
    # longrope: factor = max_position / original = 4, attention factor sqrt(1 + ln 4 / ln 20)
    assert abs(r.attention_factor - (1 + math.log(4) / math.log(20)) ** 0.5) < 1e-6
    assert ir.attention.scaling_source == "head_dim" and abs(ir.attention.scaling - 0.25) < 1e-9
    from scaler_wizard.ir.model_ir import ModelIR

    assert ModelIR.from_json(ir.to_json()) == ir  # the cached form keeps the rope facts
    y = discover(make_config("llama", "yarn")).attention
    assert y.rope.rope_type == "yarn" and y.rope.attention_factor > 1.0 and y.scaling_source == "head_dim"


def test_grow_per_frequency_lists():
    from scaler_wizard.compiler.rope import grow_per_frequency, list_length_problems

    cfg = {"rope_scaling": {"type": "longrope", "short_factor": [1.0, 2.0, 4.0], "long_factor": [3.0, 3.0, 5.0]},
           "rope_parameters": {"rope_type": "longrope", "short_factor": [1.0, 2.0, 4.0], "long_factor": [3.0, 3.0, 5.0]}}
    p = grow_per_frequency(cfg, ("long_factor", "short_factor"), 3, 2)
    assert set(p) == {"rope_scaling", "rope_parameters"}  # both spellings follow (rope_scaling wins on load)
    assert p["rope_parameters"]["short_factor"] == [1.0, 1.5, 2.0, 3.0, 4.0, 4.0]
    assert p["rope_scaling"]["long_factor"][0::2] == [3.0, 3.0, 5.0]
    assert cfg["rope_parameters"]["short_factor"] == [1.0, 2.0, 4.0]  # the input is not modified
    assert list_length_problems({**cfg, **p}, ("short_factor",), 6) == []
    assert list_length_problems(cfg, ("short_factor",), 6) == ["short_factor has 3 entries for 6 rotary pairs"] * 2


def issue_phi3(tmp_path, kv: int):
    """The issue's input: Phi-3 hidden 96, ffn 160, heads 4, layers 2, vocab 200, max_position 512,
    original 64, longrope with 12-entry factor lists."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "phi3", hidden_size=96, intermediate_size=160, num_attention_heads=4, num_key_value_heads=kv,
        num_hidden_layers=2, vocab_size=200, max_position_embeddings=512, original_max_position_embeddings=64,
        pad_token_id=0, rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(12)],
                                      "long_factor": [2.0 + 0.3 * i for i in range(12)]})
    torch.manual_seed(0)
    d = tmp_path / f"phi3-kv{kv}"
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(d)
    return d


@pytest.mark.slow
def test_issue_phi3_longrope_kv_equals_heads(tmp_path):
    """kv == heads left heads unbound: differential tracing doubled num_attention_heads, which moved
    head_dim (24 -> 12) while the 12-entry factor lists stayed, so the traced copy failed to build.
    Now the lists follow, heads binds, num_key_value_heads is found to follow heads (/2 moves no
    group), and `widen hidden x2 tile` applies exactly, checked in both regimes (original length 64)."""
    from scaler_wizard.runtime.verify import compare_models

    src = issue_phi3(tmp_path, 4)
    ir = api.ir(str(src))
    assert ir.groups["heads"].config_key == "num_attention_heads"
    # num_key_value_heads follows heads: a companion key, or (since the binding only counts keys that
    # change parameters) written with heads by the conformance step -- the grown config below says which
    assert ir.groups["heads"].companion_keys in ((), ("num_key_value_heads",))
    assert ir.groups["head_dim"].derived == "hidden_size // num_attention_heads"
    assert ir.attention.rope.per_frequency == ("long_factor", "short_factor")
    out = tmp_path / "out"
    res = api.apply("widen hidden x2 tile", str(src), out=str(out), progress=False)
    assert res["exactness"] == "exact" and res["verification"]["passed"], res["verification"]
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (192, 8, 8)
    assert len(cfg["rope_parameters"]["short_factor"]) == 12  # head_dim 24 kept: lists unchanged
    long = compare_models(str(out), str(src), seq_len=80, check_kv=False)  # past original length 64
    assert long.passed and long.max_rel <= RTOL, long.summary()
