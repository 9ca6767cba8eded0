"""The model IR discovered by tracing: every family against its real model, goldens, cache."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from families import FAMILIES, build_model

from scaler_wizard.ir import discover, model_ir_for
from scaler_wizard.ir.model_ir import ModelIR
from scaler_wizard.ir.printer import render_ir
from scaler_wizard.ir.verify import check_ir

GOLDEN = Path(__file__).parent / "golden" / "ir"
ROOT = Path(__file__).resolve().parents[1]
_IRS: dict[str, ModelIR] = {}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALER_WIZARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def ir_of(name: str) -> ModelIR:
    if name not in _IRS:
        _IRS[name] = discover(FAMILIES[name]())
    return _IRS[name]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_matches_real_model(name):
    ir = ir_of(name)
    assert check_ir(ir) == []
    _, model = build_model(name)
    sd = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    params = dict(model.named_parameters(remove_duplicate=False))
    covered = set()
    for t in ir.tensors:
        for real in t.names():
            assert real in sd, f"{real} is not in the real state_dict"
            assert sd[real] == t.shape, real
            for k, ax in enumerate(t.axes):
                assert ax.size == sd[real][k], (real, k)
            covered.add(real)
    assert set(params) <= covered
    # every canonical group found has members and, where a key binds, the config agrees
    cfg = ir.config
    for g in ir.groups.values():
        assert g.members, g.name
        if g.config_key:
            assert cfg[g.config_key] == g.size, g


def _tp_groups(ir: ModelIR, pattern: str):
    rx = re.compile(re.escape(pattern).replace(r"\*", r"\{i\}") + r"$")
    for t in ir.tensors:
        if t.kind in ("weight", "router") and (rx.search(t.module) and t.name.endswith(".weight") or rx.search(t.name)):
            yield t


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_tp_plan_oracle(name):
    ir = ir_of(name)
    if not ir.tp_plan:
        pytest.skip("config class has no base_model_tp_plan")
    sharded = {"heads", "kv_heads", "ffn", "experts", "head_dim"}
    checked = 0
    for pat, style in ir.tp_plan.items():
        if not style.startswith(("colwise", "rowwise", "packed_colwise", "packed_rowwise")):
            continue
        for t in _tp_groups(ir, pat):
            role = "out" if "colwise" in style else "in"
            ax = [a for a in t.axes if a.role == role]
            assert ax, (t.name, style)
            assert set(ax[0].groups()) & sharded, (t.name, style, ax[0])
            checked += 1
    assert checked, "no tp_plan entry matched a tensor"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_golden_dump(name):
    text = render_ir(ir_of(name))
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("SW_UPDATE_GOLDEN") == "1" or not path.exists():
        if os.environ.get("SW_UPDATE_GOLDEN") != "1":
            pytest.fail(f"missing golden {path}; regenerate with SW_UPDATE_GOLDEN=1")
        path.write_text(text)
    assert text == path.read_text()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_json_round_trip(name):
    ir = ir_of(name)
    assert ModelIR.from_json(ir.to_json()) == ir


def test_facts_per_family():
    ll = ir_of("llama")
    assert ll.attention.rope.rotary_dim == 16 and ll.attention.rope.style == "half"
    assert ll.residual.placement == "pre"
    assert [n.placement for n in ll.norms] == ["pre", "pre", "final"]
    sq = ir_of("llama_square")
    assert sq.groups["hidden"].config_key == "hidden_size"
    assert sq.groups["ffn"].config_key == "intermediate_size"
    assert any("differential trace" in n for n in sq.notes)
    g2 = ir_of("gpt2")
    assert g2.groups["head_dim"].derived == "n_embd // n_head"
    assert g2.attention.fused_layout == "concat"
    nx = ir_of("gpt_neox")
    qkv = nx.tensor(nx.attention.fused_qkv)
    assert [f.group for f in qkv.axes[0].segments[0].factors] == ["heads", "const", "head_dim"]
    assert nx.attention.rope.rotary_dim == 4
    p3 = ir_of("phi3")
    assert len(p3.tensor("model.layers.{i}.self_attn.qkv_proj.weight").axes[0].segments) == 3
    assert [s.factors[0].group for s in p3.tensor("model.layers.{i}.mlp.gate_up_proj.weight").axes[0].segments] == ["ffn", "ffn"]
    assert p3.attention.rope.partial_key == "partial_rotary_factor"
    q3 = ir_of("qwen3")
    assert {n.placement for n in q3.norms if n.group == "head_dim"} == {"qk"}
    gm = ir_of("gemma")
    assert {n.kind for n in gm.norms} == {"rmsnorm_1p"}
    assert gm.residual.embed_scale == pytest.approx(8.0) and gm.residual.embed_scale_source == "sqrt(hidden_size)"
    gm2 = ir_of("gemma2")
    assert gm2.residual.placement == "sandwich"
    assert gm2.attention.scaling_source == "config:query_pre_attn_scalar"
    assert gm2.traced_layers == 2
    mx = ir_of("mixtral")
    assert mx.moe.num_experts == 5 and mx.moe.top_k == 3 and mx.moe.renormalize is True
    assert mx.moe.experts_key == "num_local_experts" and mx.moe.top_k_key == "num_experts_per_tok"
    assert ir_of("opt").residual.placement == "pre"
    assert ir_of("opt_postln").residual.placement == "post"
    bert = ir_of("bert")
    assert bert.residual.placement == "post"
    assert {n.placement for n in bert.norms} == {"embed", "post", "final"}


def test_cache_hit_is_torch_free(tmp_path):
    cfg = FAMILIES["llama"]().to_dict()
    cfg["num_hidden_layers"] = 5
    ir = model_ir_for(cfg)
    assert ir.num_layers == 5 and ir.tensor("model.layers.{i}.mlp.up_proj.weight").layers == (0, 1, 2, 3, 4)
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps(cfg))
    code = (
        "import sys, json\n"
        "from scaler_wizard.ir import model_ir_for\n"
        f"ir = model_ir_for({str(cfg_path)!r})\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import on cache hit'\n"
        "print(ir.to_json())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert ModelIR.from_json(out.stdout) == ModelIR.from_json(ir.to_json())


def test_cache_other_depth_instantiates(tmp_path):
    cfg = FAMILIES["gemma2"]().to_dict()
    model_ir_for(cfg)
    cfg2 = dict(cfg, num_hidden_layers=6, layer_types=["sliding_attention", "full_attention"] * 3)
    ir = model_ir_for(cfg2)  # cache hit: depth and arrays do not change the key
    assert ir.num_layers == 6
    assert ir.tensor("model.layers.{i}.self_attn.q_proj.weight").layers == tuple(range(6))
    assert check_ir(ir) == []


def test_usage_errors(tmp_path):
    from scaler_wizard.diagnostics import UsageError
    from scaler_wizard.ir.config import load_config_dict

    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(UsageError, match="malformed"):
        load_config_dict(str(bad))
    with pytest.raises(UsageError, match="not available offline"):
        load_config_dict("some-org/some-model")
    fake = tmp_path / "x.gguf"
    fake.write_bytes(b"NOPE" + b"\0" * 32)
    with pytest.raises(UsageError, match="not a GGUF"):
        load_config_dict(str(fake))


def test_cli_exit_codes(tmp_path):
    env = {**os.environ, "SCALER_WIZARD_CACHE": str(tmp_path / "c"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "scaler_wizard", "ir", "--model", str(tmp_path / "missing.json")],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_smollm2_from_gguf():
    ir = model_ir_for("SmolLM2-135M")
    g = {k: v.size for k, v in ir.groups.items()}
    assert g == {"hidden": 576, "ffn": 1536, "heads": 9, "kv_heads": 3, "head_dim": 64, "vocab": 49152}
    assert ir.num_layers == 30
    assert ("model.embed_tokens.weight", "lm_head.weight") in ir.tied
    assert {n.kind for n in ir.norms} == {"rmsnorm"} and ir.residual.placement == "pre"
    assert check_ir(ir) == []


def test_export_skips_stack_traces_and_restores_the_flag():
    """The export discovery runs records no per-node Python stack trace (25-45 % of its time, never
    read) but keeps what discovery reads (shapes, module paths), and leaves torch's flag as it was."""
    import torch.fx.config as fx_config

    from scaler_wizard import sweep
    from scaler_wizard.ir.trace import build_meta_model, export_model, reduced_config

    cfg, _ = sweep.tiny_config("llama")
    before = fx_config.do_not_emit_stack_traces
    ep = export_model(build_meta_model(reduced_config(cfg)[0]))
    assert fx_config.do_not_emit_stack_traces == before
    calls = [n for n in ep.graph.nodes if n.op == "call_function"]
    assert calls and not any(n.meta.get("stack_trace") for n in calls)
    assert any("layers.0" in str(n.meta.get("nn_module_stack")) for n in calls)
    assert all("val" in n.meta for n in calls)


@pytest.mark.parametrize("model_type,kw,coincident", [
    # Phi-3, kv == heads, longrope: head_dim 16 == original_max_position_embeddings 16
    ("phi3", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2, vocab_size=128,
                  intermediate_size=96, max_position_embeddings=128, original_max_position_embeddings=16, pad_token_id=0,
                  rope_scaling={"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}),
     "original_max_position_embeddings"),
    # Qwen2: head_dim 16 == max_window_layers 16 (hidden 64 == max_position_embeddings 64 traces hidden_size)
    ("qwen2", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, vocab_size=128,
                   intermediate_size=160, max_position_embeddings=64, max_window_layers=16), "max_window_layers"),
])
def test_unique_value_coincidence_is_not_a_binding(model_type, kw, coincident, tmp_path):
    """A key that merely equals a derived group's size is not the group's key when a differential
    trace of another key moved the group (was: head_dim bound to the coincident key, and
    `widen hidden x2` refused with SW384)."""
    import warnings

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from scaler_wizard import api

    cfg = AutoConfig.for_model(model_type, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ir = discover(cfg)
    # Phi-3's longrope module assigns an attribute in forward: torch.export's warning is not the user's
    assert not [w for w in caught if "assigned during export" in str(w.message)]
    assert ir.groups["head_dim"].config_key != coincident
    assert ir.groups["head_dim"].derived == "hidden_size // num_attention_heads"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(tmp_path / "m")
    rp = api.check("widen hidden x2 lemon", model=str(tmp_path / "m"))
    assert rp.config_after["hidden_size"] == 128 and rp.config_after["num_attention_heads"] == 8


def test_query_pre_attn_scalar_equal_to_head_dim_is_the_scale_source(tmp_path):
    """Gemma-2 2B/9B state query_pre_attn_scalar == head_dim (256): the scale was taken for
    1/sqrt(head_dim), so `widen head_dim x2` rescaled q, was called exact and failed verify (break-it)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from scaler_wizard import api

    cfg = AutoConfig.for_model("gemma2", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               num_hidden_layers=2, vocab_size=128, intermediate_size=96, query_pre_attn_scalar=16,
                               max_position_embeddings=32, layer_types=["sliding_attention", "full_attention"],
                               sliding_window=8)
    ir = discover(cfg)
    assert ir.attention.scaling_source == "config:query_pre_attn_scalar"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(tmp_path / "m")
    res = api.apply("widen head_dim x2", str(tmp_path / "m"), out=str(tmp_path / "out"))
    assert res["passed"] and res["landed"], res["verification"]
