"""Fused projections whose concatenation is the outermost factor of a product (issue 10).

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
