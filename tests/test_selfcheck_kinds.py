"""The kinds of SW316 (the grown config would not describe the grown tensors) the family sweep found,
each now understood before lowering: tiny configs of real transformers classes.

* a tensor axis the computation sizes by some groups while the config builds it from another key
  (Helium's o_proj: heads x head_dim in the forward, hidden_size in __init__) -> SW384 at the
  statement, and growing the groups together is accepted;
* an axis the config sizes in a way discovery did not understand (Zaya's q/k convolutions) -> SW384;
* a tensor the config builds only for some values (ELECTRA's embeddings_project, absent once
  hidden_size == embedding_size) -> SW384;
* a derived formula that was a coincidence of the tiny sizes (Moshi's ffn = 3 x head_dim) -> dropped,
  so head_dim growth is exact;
* a config class that serialises another depth than its model's layer count (Dory) -> the depth is
  not rewritten, kv_heads growth lands exact; tensors a width pass cannot grow -> SW383.
"""

from __future__ import annotations

import pytest

from scaler_wizard import sweep


from families import first_refusal as _refusal, sweep_tiny as _tiny  # noqa: E402


def _ir(model):
    from scaler_wizard import api

    return api.ir(model)


def test_axis_sized_by_another_key_is_a_config_tie(tmp_path_factory, tmp_path):
    from scaler_wizard import api

    model = _tiny(tmp_path_factory, "helium")
    ties = _ir(model).config_ties
    assert ("axis", "model.layers.{i}.self_attn.o_proj.weight", 1, (("hidden", 2.0),)) in ties, ties
    for plan in ("widen hidden x2 tile", "widen heads x2 dup", "widen head_dim x2"):
        d = _refusal(plan, model)
        assert d.code == "SW384", (plan, d.code, d.message)
        assert d.message.startswith(f"`{plan}`") and "o_proj.weight" in d.message and "hidden_size" in d.message
        assert d.span.start == 0 and d.span.end == len(plan)
    # second statement: the refusal is positioned on it
    plan = "widen ffn x2 net2net\nwiden hidden x2 tile"
    d = _refusal(plan, model)
    assert d.code == "SW384" and d.span.line == 2, d
    # grown together, heads x head_dim stays equal to hidden: accepted and exact
    out = tmp_path / "out"
    r = api.apply("widen hidden x2 tile\nwiden heads x2 dup", model, out=str(out), verify=True)
    assert r["passed"] and r.get("exactness") in ("exact", "exact-eps", None), r.get("exactness")


def test_axis_the_config_sizes_in_a_way_not_understood(tmp_path_factory):
    model = _tiny(tmp_path_factory, "zaya")
    d = _refusal("widen heads x2 dup", model)
    assert d.code == "SW384" and "conv_qk" in d.message and "did not understand" in d.message, d.message


def test_tensor_built_only_for_some_values(tmp_path_factory):
    model = _tiny(tmp_path_factory, "electra")
    ties = _ir(model).config_ties
    assert ("exists", "electra.embeddings_project.weight", "hidden", "absent") in ties, ties
    d = _refusal("widen hidden x2 tile", model)
    assert d.code == "SW384" and "embeddings_project" in d.message and "hidden = 128" in d.message, d.message


def test_coincidental_derived_formula_is_dropped(tmp_path_factory, tmp_path):
    from scaler_wizard import api

    model = _tiny(tmp_path_factory, "moshi")
    ir = _ir(model)
    assert ir.groups["ffn"].derived is None, ir.groups["ffn"]
    assert any("coincidence" in n for n in ir.notes)
    r = api.apply("widen head_dim x2", model, out=str(tmp_path / "out"), verify=True)
    assert r["passed"]


def test_serialised_depth_other_than_layer_count(tmp_path_factory, tmp_path):
    from scaler_wizard import api

    model = _tiny(tmp_path_factory, "dory")
    rp = api.check("widen kv_heads x2", model)
    assert rp.config_after["num_hidden_layers"] == rp.config_before["num_hidden_layers"]
    r = api.apply("widen kv_heads x2", model, out=str(tmp_path / "out"), verify=True)
    assert r["passed"]
    d = _refusal("widen heads x2 dup", model)
    assert d.code == "SW383" and "s_gate" in d.message, d.message
    d = _refusal("widen vocab by 64 mean", model)
    assert d.code == "SW383" and "logit_scale" in d.message, d.message


def test_plain_decoder_has_no_config_ties(tmp_path_factory):
    from scaler_wizard import api

    model = _tiny(tmp_path_factory, "llama")
    assert _ir(model).config_ties == ()
    api.check("widen hidden x2 tile\nwiden heads x2 dup\nwiden head_dim x2", model)


def test_rope_found_when_the_first_layer_is_nope(tmp_path):
    """Flint's full-attention layers apply no RoPE, its sliding ones do: discovery took RoPE from the
    first layer only, so head_dim growth appended the new dims and broke the rotary layers' pairs
    (the sweep's `exact but fails verification`). RoPE is now found in any layer of the stack."""
    import json

    from scaler_wizard import api, sweep
    from scaler_wizard.ir import model_ir_for

    sweep.build_tiny("flint", tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["layer_types"][0] == "full_attention" and "sliding_attention" in cfg["layer_types"]
    ir = model_ir_for(str(tmp_path / "m"), use_cache=False)
    assert ir.attention.rope is not None and ir.attention.rope.rotary_dim == cfg["head_dim"]
    r = api.apply("widen head_dim x2", str(tmp_path / "m"), out=str(tmp_path / "o"))
    assert r["exactness"] == "exact" and r["verification"]["passed"], r["verification"]
