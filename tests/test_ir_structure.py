"""The structure cache: an IR traced once per structure is re-bound to other sizes without a trace,
and equals what a trace at those sizes gives (IR JSON identical), torch-free.

Configs are written the way config.json files are: keys the config class derives are left out
where real checkpoints leave them out (``head_dim`` of Llama-2 / Qwen2 / Phi-3, ``n_inner`` of
GPT-2, ``num_key_value_heads`` of MHA models), so re-binding must re-derive them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import scaler_wizard.ir as I
from scaler_wizard.ir.structure import structure_key

ROOT = Path(__file__).resolve().parents[1]

# family -> (config A as a config.json would hold it, changes giving config B of the same structure)
PAIRS = {
    # GQA, head_dim absent (hidden_size // num_attention_heads), depth and eps and theta change too
    "llama_gqa": (dict(model_type="llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=96, vocab_size=128, num_hidden_layers=2, max_position_embeddings=40,
                       rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False),
                  dict(hidden_size=128, num_attention_heads=8, intermediate_size=160, vocab_size=256,
                       num_hidden_layers=3, max_position_embeddings=48, rms_norm_eps=1e-6, rope_theta=500000.0)),
    # kv == heads, head_dim explicit and not hidden // heads
    "llama_mha": (dict(model_type="llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                       intermediate_size=96, vocab_size=128, num_hidden_layers=2, max_position_embeddings=40),
                  dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=6, head_dim=24,
                       intermediate_size=160, vocab_size=256)),
    "qwen2": (dict(model_type="qwen2", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=160, vocab_size=256, num_hidden_layers=2, max_position_embeddings=40,
                   tie_word_embeddings=True),
              dict(hidden_size=128, num_attention_heads=8, intermediate_size=352, vocab_size=512)),
    # partial rotary: rotary_dim = int(head_dim * partial_rotary_factor)
    "phi3": (dict(model_type="phi3", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                  vocab_size=128, num_hidden_layers=2, max_position_embeddings=40, pad_token_id=0,
                  partial_rotary_factor=0.5),
             dict(hidden_size=128, num_attention_heads=4, intermediate_size=160, vocab_size=256)),
    # n_inner absent: ffn = 4 * n_embd; fused qkv (Conv1D)
    "gpt2": (dict(model_type="gpt2", n_embd=64, n_head=4, n_layer=2, vocab_size=128, n_positions=40),
             dict(n_embd=96, n_head=6, n_layer=3, vocab_size=200)),
    "mixtral": (dict(model_type="mixtral", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     intermediate_size=96, vocab_size=128, num_hidden_layers=2, max_position_embeddings=40,
                     num_local_experts=5, num_experts_per_tok=3),
                dict(hidden_size=128, num_local_experts=6, intermediate_size=160, vocab_size=256)),
    # embedding scale sqrt(hidden_size)
    "gemma": (dict(model_type="gemma", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   intermediate_size=96, vocab_size=128, num_hidden_layers=2, max_position_embeddings=40),
              dict(hidden_size=100, intermediate_size=160, head_dim=20)),
    # softmax scale from query_pre_attn_scalar, sliding window, layer kinds
    "gemma2": (dict(model_type="gemma2", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    intermediate_size=96, vocab_size=128, num_hidden_layers=2, max_position_embeddings=40,
                    sliding_window=24, query_pre_attn_scalar=20, layer_types=["sliding_attention", "full_attention"]),
               dict(hidden_size=128, vocab_size=256, intermediate_size=160, sliding_window=28, query_pre_attn_scalar=36,
                    num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2)),
    "gpt_neox": (dict(model_type="gpt_neox", hidden_size=64, num_attention_heads=4, intermediate_size=160,
                      vocab_size=128, num_hidden_layers=2, max_position_embeddings=40, rotary_pct=0.25),
                 dict(hidden_size=128, intermediate_size=352, vocab_size=256)),
    "opt": (dict(model_type="opt", hidden_size=64, num_attention_heads=4, ffn_dim=96, word_embed_proj_dim=64,
                 vocab_size=128, num_hidden_layers=2, max_position_embeddings=40, do_layer_norm_before=True,
                 pad_token_id=1),
            dict(hidden_size=128, ffn_dim=160, word_embed_proj_dim=128, vocab_size=256)),
    "bert": (dict(model_type="bert", hidden_size=64, num_attention_heads=4, intermediate_size=96, vocab_size=128,
                  num_hidden_layers=2, max_position_embeddings=40, type_vocab_size=3),
             dict(hidden_size=128, num_attention_heads=8, intermediate_size=160, vocab_size=256, type_vocab_size=5)),
}
FAST = ("llama_gqa",)


def _key(cfg):
    return structure_key(cfg, transformers_version="x", format_version=0)


def test_structure_key_is_sizes_symbolic():
    a, delta = PAIRS["llama_gqa"]
    assert _key(a) == _key({**a, **delta})  # other sizes, depth, eps, theta: same structure
    assert _key(a) != _key({**a, "num_key_value_heads": 4})  # kv == heads is another structure
    assert _key(a) != _key({**a, "head_dim": 16})  # a key more
    assert _key(a) != _key({**a, "tie_word_embeddings": True})  # a flag
    assert _key(a) != _key({**a, "model_type": "mistral"})
    assert _key(a) != _key({**a, "max_position_embeddings": 96})  # a new coincidence (== intermediate_size)
    assert _key(a) != _key({**a, "rope_theta": 10000})  # int where a float was


# In the suite: the structures that differ most (GQA, kv == heads, fused qkv, MoE, partial rotary, sandwich
# norms + layer types); the rest of PAIRS (qwen2, gpt2, gemma, opt, bert: all passed when added) run with
# SW_STRUCTURE_ALL=1, to keep the suite inside its time budget.
SUITE = ("llama_gqa", "llama_mha", "phi3", "mixtral", "gpt_neox", "gemma2")


@pytest.mark.parametrize("family", [pytest.param(f, marks=() if f in FAST else pytest.mark.slow) for f in PAIRS
                                    if f in SUITE or os.environ.get("SW_STRUCTURE_ALL") == "1"])
def test_rebound_ir_equals_a_trace(family, tmp_path, monkeypatch):
    a, delta = PAIRS[family]
    b = {**a, **delta}
    monkeypatch.setenv("SCALER_WIZARD_CACHE", str(tmp_path / "exact"))
    I.model_ir_for(b)
    traced = I.model_ir_for(b)  # what a second check of B gets: the trace of B, from the cache
    monkeypatch.setenv("SCALER_WIZARD_CACHE", str(tmp_path / "structure"))
    I.model_ir_for(a)

    def no_trace(cfg):
        raise AssertionError(f"{family}: traced again although its structure is cached")

    monkeypatch.setattr(I, "discover", no_trace)
    rebound = I.model_ir_for(b)
    assert rebound.to_json() == traced.to_json()


def test_rebind_refuses_what_it_cannot_account_for(tmp_path, monkeypatch):
    """A float the IR does not read that changes, or a size whose formula is ambiguous: traced."""
    monkeypatch.setenv("SCALER_WIZARD_CACHE", str(tmp_path))
    a, delta = PAIRS["llama_gqa"]
    ir = I.model_ir_for(a)
    from scaler_wizard.ir.structure import rebind

    assert rebind(ir, a, {**a, **delta}) is not None
    assert rebind(ir, a, {**a, "initializer_range": 0.5}) is None  # not a key of a (set(leaves) differ)
    a2 = {**a, "initializer_range": 0.02}
    assert rebind(ir, a2, {**a2, "initializer_range": 0.5}) is None  # differs, and the IR does not read it
    # head_dim = 16 = hidden // heads; with max_position 32 also max_position // kv_heads: in B the two
    # formulas disagree (128 // 8 = 16 vs 48 // 2 = 24), so which one the config class uses is unknown
    a3 = {**a, "max_position_embeddings": 32}
    assert rebind(ir, a3, {**a3, **delta}) is None


@pytest.mark.slow
def test_cold_check_of_a_cached_structure_is_torch_free(tmp_path):
    """`check` of a config never seen, whose structure was checked once: no trace, no model build,
    neither torch nor transformers imported; the output equals that of a check that traced."""
    # head_dim explicit: with it implicit, growing hidden makes conform write it (a verdict with a
    # note), which is not cached per structure (that config builds its output model once)
    a, delta = PAIRS["llama_gqa"]
    a = {**a, "head_dim": 16}
    plan = tmp_path / "grow.expand"
    plan.write_text("widen hidden x2 lemon\nwiden ffn x2 net2net\ninsert layers every 2 identity\n")
    dirs = {}
    for name, cfg in (("a", a), ("b", {**a, **delta})):
        dirs[name] = tmp_path / name
        dirs[name].mkdir()
        (dirs[name] / "config.json").write_text(json.dumps(cfg))

    def check(model, cache, probe=False):
        code = ("import sys, runpy\n"
                f"sys.argv = ['scaler-wizard', 'check', {str(plan)!r}, '--model', {str(model)!r}, '--format', 'json']\n"
                "try:\n    runpy.run_module('scaler_wizard', run_name='__main__')\nexcept SystemExit as e:\n"
                "    assert not e.code, e.code\n")
        if probe:
            code += "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n"
        env = {**os.environ, "SCALER_WIZARD_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    check(dirs["a"], tmp_path / "c1")
    cold = check(dirs["b"], tmp_path / "c1", probe=True)
    check(dirs["b"], tmp_path / "c2")
    again = check(dirs["b"], tmp_path / "c2")  # B traced and built, then from its exact cache
    assert json.loads(cold) == json.loads(again)


# OPT's learned position table has max_position_embeddings + 2 rows (an offset): no config value equals
# its size, so the trace renders the axis as a constant factor, which must follow its config value
OPT_POS = dict(model_type="opt", hidden_size=64, num_attention_heads=4, ffn_dim=96, word_embed_proj_dim=64,
               vocab_size=128, num_hidden_layers=2, max_position_embeddings=32, do_layer_norm_before=True,
               pad_token_id=1, bos_token_id=2, eos_token_id=2)


def _tensors(ir):
    return {t.name: (t.shape, t.axes, t.layers) for t in ir.tensors}


def test_offset_table_follows_its_config_value(tmp_path, monkeypatch):
    """OPT traced at 32 positions, then asked for at 40: re-bound without a trace to the 42-row table,
    tensor by tensor what a fresh trace at 40 gives; and a grown plan on it conforms (no SW316)."""
    from scaler_wizard import api
    from scaler_wizard.compiler.conform import conform

    b = {**OPT_POS, "max_position_embeddings": 40}
    monkeypatch.setenv("SCALER_WIZARD_CACHE", str(tmp_path / "fresh"))
    traced = I.model_ir_for(b)
    monkeypatch.setenv("SCALER_WIZARD_CACHE", str(tmp_path / "structure"))
    first = I.model_ir_for(OPT_POS)
    assert {t.shape for t in first.tensors if "embed_positions" in t.name} == {(34, 64)}

    def no_trace(cfg):
        raise AssertionError("traced again although the structure is cached")

    with monkeypatch.context() as m:
        m.setattr(I, "discover", no_trace)
        rebound = I.model_ir_for(b)
    want, got = _tensors(traced), _tensors(rebound)
    assert set(got) == set(want)
    for name in want:
        assert got[name] == want[name], name
    assert got["model.decoder.embed_positions.weight"][0] == (42, 64)
    monkeypatch.setenv("SCALER_WIZARD_CACHE", str(tmp_path / "fresh"))
    assert rebound.to_json() == I.model_ir_for(b).to_json()  # what a second look-up of the trace gives
    monkeypatch.setenv("SCALER_WIZARD_CACHE", str(tmp_path / "structure"))

    model = tmp_path / "opt40"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(b))
    rp = api.check("widen ffn x2 net2net\nwiden hidden x2 tile\n", str(model))  # served by the structure entry
    assert {t.shape for t in rp.ir.tensors if "embed_positions" in t.name} == {(42, 64)}
    conform(rp)  # raised SW316 (the grown config builds 42 rows, the IR said 34)


def test_constant_sizes_rebind_only_when_the_config_explains_them():
    from scaler_wizard.ir.structure import _rebind_const

    old = {"max_position_embeddings": 40, "hidden_size": 64, "ffn_dim": 96, "eos_token_id": 40}
    assert _rebind_const(42, old, {**old, "max_position_embeddings": 48}) == 50  # v + 2
    assert _rebind_const(79, old, {**old, "max_position_embeddings": 48}) == 95  # 2 v - 1 (relative table)
    assert _rebind_const(42, old, {**old, "eos_token_id": 7}) == 42  # token ids are not sizes
    assert _rebind_const(1, old, {**old, "hidden_size": 128}) == 1  # a singleton axis
    assert _rebind_const(1000, old, old) is None  # explained by nothing: not served
    # 192 = 3 * hidden = 2 * ffn: which one the model uses is unknown once they move apart
    assert _rebind_const(192, old, {**old, "hidden_size": 128}) is None
    assert _rebind_const(192, old, {**old, "hidden_size": 128, "ffn_dim": 192}) == 384
    # beside group factors a constant is a part count (heads x 3 x head_dim): kept while nothing that
    # could explain it moves, unknown when something does (3 = heads - 1 is a coincidence, or not)
    assert _rebind_const(3, {"heads": 4, "hidden": 64}, {"heads": 4, "hidden": 128}, multiplier=True) == 3
    assert _rebind_const(3, {"heads": 4, "hidden": 64}, {"heads": 8, "hidden": 128}, multiplier=True) is None
    assert _rebind_const(3, {"hidden": 64}, {"hidden": 128}, multiplier=True) == 3
    assert _rebind_const(3, {"hidden": 64}, {"hidden": 128}) is None  # a whole axis of 3 rows, unexplained


def test_ambiguous_offset_table_is_traced(tmp_path, monkeypatch):
    """34 rows = max_position_embeddings + 2 = ffn_dim - 2: when only max_position_embeddings moves, the
    structure entry cannot say which, so the config is traced (and the trace is right)."""
    monkeypatch.setenv("SCALER_WIZARD_CACHE", str(tmp_path))
    from scaler_wizard.ir.structure import rebind

    a = {**OPT_POS, "ffn_dim": 36}
    ir = I.model_ir_for(a)
    assert rebind(ir, a, {**a, "max_position_embeddings": 40}) is None
    assert rebind(ir, a, {**a, "max_position_embeddings": 40, "ffn_dim": 44}) is not None


def test_fused_part_count_is_not_rebound_by_coincidence(tmp_path, monkeypatch):
    """GPT-NeoX's fused qkv is heads x 3 x head_dim; with 4 heads, 3 is also heads - 1. Re-bound to 8
    heads the entry must not answer 7 parts: it refuses (the config is traced); with the heads kept it
    serves the traced layout."""
    monkeypatch.setenv("SCALER_WIZARD_CACHE", str(tmp_path))
    from scaler_wizard.ir.structure import rebind

    a, delta = PAIRS["gpt_neox"]
    ir = I.model_ir_for(a)
    qkv = next(t for t in ir.tensors if t.name.endswith("query_key_value.weight"))
    assert [f.size for f in qkv.axes[0].segments[0].factors] == [4, 3, 16]
    assert rebind(ir, a, {**a, "hidden_size": 128, "num_attention_heads": 8}) is None
    kept = rebind(ir, a, {**a, **delta})
    qkv = next(t for t in kept.tensors if t.name.endswith("query_key_value.weight"))
    assert [f.size for f in qkv.axes[0].segments[0].factors] == [4, 3, 32] and qkv.shape == (384, 128)
