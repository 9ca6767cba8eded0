"""Layer kinds with attention of their own shape (issue 10).

MiMo-V2-Flash's sliding-window layers have twice the kv heads of its full-attention layers; Inkling's
sliding layers take ``swa_num_attention_heads`` / ``swa_num_key_value_heads`` / ``swa_head_dim``. The
same tensor template (``model.layers.{i}.self_attn.k_proj.weight``) then has one shape per layer
kind. Discovery merged every layer into the first kind's template, so the program wrote the other
kind's attention at the first kind's shape and every op, even `widen vocab`, failed the compiler's
own self-check (SW316). Now each kind has its own entry (the other kind's sizes as constants,
``ModelIR.attention_shapes``): ops that leave the attention as it is are exact and verified (fp32
logits), and growth of a group only one kind carries is refused at check (SW370), naming both kinds.
"""

from __future__ import annotations

import pytest

from scaler_wizard import api, sweep
from scaler_wizard.diagnostics import PlanError

RTOL = 1e-5


@pytest.fixture(scope="module")
def mimo(tmp_path_factory):
    d = tmp_path_factory.mktemp("mimo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALER_WIZARD_CACHE", str(d / "cache"))
        sweep.build_tiny("mimo_v2_flash", d / "model")  # layer 0 full (2 kv heads), layer 1 sliding (4)
        yield str(d / "model")


def _entries(ir, suffix):
    return sorted(((t.layers, t.shape) for t in ir.tensors if t.name.endswith(suffix)), key=repr)


@pytest.mark.slow
def test_kinds_keep_their_own_attention_shapes(mimo):
    ir = api.ir(mimo)
    assert _entries(ir, "self_attn.k_proj.weight") == [((0,), (32, 64)), ((1,), (64, 64))]
    kv = next(t for t in ir.tensors if t.name.endswith("k_proj.weight") and t.layers == (0,))
    assert kv.axes[0].groups() == ("kv_heads", "head_dim")
    other = next(t for t in ir.tensors if t.name.endswith("k_proj.weight") and t.layers == (1,))
    assert other.axes[0].groups() == () and other.axes[1].groups() == ("hidden",)


@pytest.mark.slow
@pytest.mark.parametrize("plan", ["widen ffn x2 net2net", "insert layer 1 identity"])
def test_ops_that_leave_the_attention_are_exact(mimo, plan, tmp_path):
    r = api.apply(plan, model=mimo, out=str(tmp_path / "o"), verify=True)
    ver = r["verification"]
    assert r["passed"] and r["exactness"] == "exact", ver
    assert ver["max_rel"] <= RTOL, ver


@pytest.mark.slow
def test_growth_of_one_kinds_group_is_refused_with_both_kinds(mimo):
    plan = "widen ffn x2 net2net\nwiden kv_heads x2\n"
    with pytest.raises(PlanError) as e:
        api.check(plan, mimo)
    (d,) = [x for x in e.value.diagnostics if x.code == "SW370"]
    assert d.span.line == 2  # the `widen kv_heads` statement
    assert "layer_types=full_attention" in d.message and "layer_types=sliding_attention" in d.message
    assert "num_key_value_heads=2" in d.message


@pytest.mark.slow
def test_inkling_sliding_keys_are_named(tmp_path, monkeypatch):
    # Inkling's layer 0 is sliding (swa_* keys), layer 1 full: the first kind binds the groups, the
    # other is recorded with its own sizes (check needs the config only: no weights are built)
    monkeypatch.setenv("SCALER_WIZARD_CACHE", str(tmp_path / "cache"))
    cfg, _ = sweep.tiny_config("inkling_text")
    cfg.save_pretrained(tmp_path / "m")
    model = str(tmp_path / "m")
    ir = api.ir(model)
    (other,) = ir.attention_shapes
    assert (other.layers, other.heads, other.kv_heads, other.head_dim) == ((1,), 4, 2, 16)
    assert ir.groups["kv_heads"].config_key == "swa_num_key_value_heads"
    assert _entries(ir, "self_attn.k_proj.weight") == [((0,), (256, 64)), ((1,), (32, 64))]
    with pytest.raises(PlanError) as e:
        api.check("widen kv_heads x2", model)
    (d,) = e.value.diagnostics
    assert d.code == "SW370"
    assert "swa_num_key_value_heads=16" in d.message and "num_key_value_heads=2" in d.message
    assert "layer_types=hybrid_sliding" in d.message and "layer_types=hybrid:" in d.message
