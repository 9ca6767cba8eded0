"""Semantic fuzzing: plans built from the language's real vocabulary (and random noise) go
through parse -> type check against real IRs. Only a resolved plan or positioned diagnostics may
come out; a resolved plan must be internally consistent."""

from __future__ import annotations

from functools import lru_cache

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from families import FAMILIES
from scaler_wizard.diagnostics import PlanError, render
from scaler_wizard.compiler.methods import DEPTH_INITS, WIDTH_METHODS
from scaler_wizard.compiler.typecheck import check_plan
from scaler_wizard.grammar import parse

FUZZ_FAMILIES = ["llama", "gpt2", "opt_postln", "qwen3", "mixtral", "phi3"]


@lru_cache(maxsize=None)
def ir_of(family):
    from scaler_wizard.ir import discover

    return discover(FAMILIES[family]())


groups = st.sampled_from(["hidden", "ffn", "heads", "kv_heads", "head_dim", "vocab", "experts", "layers", "fnn", "q"])
methods = st.sampled_from(sorted(WIDTH_METHODS) + ["dup", "bogus", ""])
inits = st.sampled_from(sorted(DEPTH_INITS) + ["", "idenity"])
small = st.integers(min_value=0, max_value=12)
sizes = st.one_of(st.integers(min_value=1, max_value=600), st.integers(min_value=1, max_value=10**15))
factors = st.sampled_from(["x2", "x3", "x1.5", "x1.25", "x0.5", "x1", "x4", "x1000000"])
opts = st.sampled_from(["", " noise=0.01", " split=equal", " split=random", " untie=true", " from=1", " from=99",
                        " noise=-1", " top=3", " split=7"])


@st.composite
def statement(draw):
    kind = draw(st.integers(min_value=0, max_value=9))
    if kind <= 3:
        amount = draw(st.one_of(factors, sizes.map(lambda n: f"to {n}"), sizes.map(lambda n: f"by {n}")))
        return f"widen {draw(groups)} {amount} {draw(methods)}{draw(opts)}"
    if kind == 4:
        return f"insert layer {draw(small)} {draw(inits)}{draw(opts)}"
    if kind == 5:
        return f"insert {draw(st.integers(min_value=1, max_value=10**12))} layers after {draw(small)} {draw(inits)}"
    if kind == 6:
        return f"insert layers every {draw(small)} {draw(inits)}"
    if kind == 7:
        a, b = draw(small), draw(small)
        return draw(st.sampled_from([f"duplicate layers {a}..{b}", f"stack x{draw(st.integers(1, 10**9))}"]))
    if kind == 8:
        return f"upcycle {draw(st.sampled_from(['ffn', 'heads']))} experts {draw(st.integers(1, 10**6))} top {draw(small)}"
    return draw(st.sampled_from(["seed 3", "dtype bf16", "dtype fp8", "noise 0.001", "grow to 300K", "grow to 1B",
                                 "grow to 150K prefer depth", "grow to 200K prefer width", "train { steps = 3 }"]))


plans = st.lists(statement(), min_size=1, max_size=5).map("\n".join)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plans, st.sampled_from(FUZZ_FAMILIES))
def test_only_plans_or_diagnostics_come_out(text, family):
    ir = ir_of(family)
    try:
        rp = check_plan(parse(text, file="f.expand"), ir, model_ref=family)
    except PlanError as e:
        assert e.diagnostics
        lines = text.count("\n") + 1
        for d in e.diagnostics:
            assert d.code.startswith("SW") and d.message
            assert 1 <= d.span.line <= lines + 1, d
        assert render(e.diagnostics, {"f.expand": text})
        return
    # A resolved plan is consistent with itself.
    assert rp.costs_after.params >= rp.costs_before.params
    assert rp.config_after[ir.layers_key] == len(rp.layer_map)
    assert {s.src for s in rp.layer_map} <= set(range(ir.num_layers))
    for op in rp.ops:
        assert op.exactness in ("exact", "exact-eps", "approx")
        if op.kind == "widen":
            assert op.new_size > op.old_size
