"""Attention layouts found by the family sweep (issue 10): fused multi-query projections, ALiBi, hand-added biases.

Falcon's multi-query attention fuses q, k and v into one projection viewed as
``[heads + 2, head_dim]``: the axis is ``(heads | 1 | 1) x head_dim``. Discovery renders it as the
concatenation ``heads x head_dim | const(2) x head_dim`` (the product distributed over the
concatenation, valid because the concatenation is outermost in row-major order), so hidden growth
(which grows the query heads) is lowered and verified exact; it used to be ``const(6) x head_dim``
and refused by the compiler's own consistency check (SW316)."""

from __future__ import annotations

import pytest

from scaler_wizard import sweep


@pytest.fixture(scope="module")
def falcon(tmp_path_factory):
    d = tmp_path_factory.mktemp("falcon")
    sweep.build_tiny("falcon", d)
    return str(d)


def test_multi_query_fused_projection_is_a_concatenation(falcon):
    from scaler_wizard import api

    ir = api.ir(falcon, use_cache=False)
    t = next(x for x in ir.tensors if x.name.endswith("query_key_value.weight"))
    out = next(ax for ax in t.axes if ax.role == "out")
    segs = [[(f.group, f.size) for f in s.factors] for s in out.segments]
    assert segs == [[("heads", 4), ("head_dim", 16)], [("const", 2), ("head_dim", 16)]]
    assert ir.attention.fused_layout == "concat"


@pytest.mark.slow
def test_multi_query_hidden_growth_is_exact(falcon, tmp_path):
    from scaler_wizard import api
    from scaler_wizard.diagnostics import PlanError

    r = api.apply("widen hidden x2 tile", model=falcon, out=str(tmp_path / "o"), verify=True)
    assert r["passed"] and r["exactness"] == "exact"
    with pytest.raises(PlanError) as e:
        api.check("widen kv_heads x2", falcon)
    (d,) = e.value.diagnostics
    assert d.code == "SW201" and "multi-query" in d.message


def test_alibi_heads_cannot_grow(tmp_path):
    # MPT's ALiBi: a per-head score bias built from the head count (not parameters). Growing heads
    # (or hidden, which implies heads here) was called exact and drifted 0.25; now refused at check.
    from scaler_wizard import api
    from scaler_wizard.diagnostics import PlanError

    sweep.build_tiny("mpt", tmp_path / "mpt")
    with pytest.raises(PlanError) as e:
        api.check("widen hidden x2 tile", str(tmp_path / "mpt"))
    (d,) = e.value.diagnostics
    assert d.code == "SW356" and "ALiBi" in d.message
    api.check("insert layer 1 identity", str(tmp_path / "mpt"))  # heads unchanged: fine


@pytest.mark.slow
def test_hand_added_bias_is_its_writers_output_bias(tmp_path):
    # FalconLinear adds its bias by hand (x @ W.T + b): traced as elementwise, it is the output
    # bias of its module's weight; hidden growth used to fail inside the pass after check said exact.
    import torch
    from transformers import AutoModelForCausalLM

    from scaler_wizard import api

    cfg, _ = sweep.tiny_config("falcon")
    cfg.bias = True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    ir = api.ir(str(tmp_path / "m"), use_cache=False)
    b = next(t for t in ir.tensors if t.name.endswith("dense_4h_to_h.bias"))
    assert [ax.role for ax in b.axes] == ["out"]
    r = api.apply("widen hidden x1.5 lemon", model=str(tmp_path / "m"), out=str(tmp_path / "o"), verify=True)
    assert r["passed"] and r["exactness"] == "exact"
