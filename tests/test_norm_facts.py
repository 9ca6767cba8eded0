"""Facts about norms and the softmax scale that decide exactness (issue 10's last crash cells).

* a BERT-style head transform (dense + act + LayerNorm before the LM head): only the final norm the
  head reads carries a tied head's split (``NormInfo.feeds_head``), and the activation on the hidden
  stream (``ResidualInfo.nonlinear``) makes a LEMON residue approx;
* a norm without a gain takes its group from its input (Llama-4's L2 q/k norm is over head_dim);
* a softmax scale the config states literally (``config-value:<key>``) does not follow head_dim;
* q/k norms keep their statistics under integer head_dim growth (new q/k dims are copies).

Each grown model is verified by ``api.apply(verify=True)``: fp32 logits against the original's.
"""

from __future__ import annotations

import pytest

from scaler_wizard import api, sweep
from scaler_wizard.compiler.methods.unitmap import head_dim_copy_map, rope_head_dim_map, zero_map


def _tiny(tmp_path_factory, family):
    d = tmp_path_factory.mktemp(family)
    sweep.build_tiny(family, d)
    return str(d)


def _grow(plan, model, tmp_path):
    r = api.apply(plan, model=model, out=str(tmp_path / "out"), verify=True)
    ver = r["verification"]
    drift = max(c["max_rel"] for c in ver["checks"] if isinstance(c, dict) and "max_rel" in c)
    return r, drift


def _ir(model):
    from scaler_wizard.ir import model_ir_for

    return model_ir_for(model, use_cache=False)


def test_final_norm_before_a_head_transform_keeps_its_gain(tmp_path_factory, tmp_path):
    # Megatron-BERT: encoder.ln (final) -> cls.predictions.transform (dense, gelu, LayerNorm) -> the
    # decoder tied to the embedding. Both final norms carried the tied head's split: 0.11 relative.
    model = _tiny(tmp_path_factory, "megatron-bert")
    ir = _ir(model)
    feeds = {n.weight: n.feeds_head for n in ir.norms if n.placement == "final"}
    assert feeds == {"bert.encoder.ln.weight": False, "cls.predictions.transform.LayerNorm.weight": True}
    assert ir.residual.nonlinear == ("cls.predictions.transform.transform_act_fn",)
    r, drift = _grow("widen hidden x2 tile", model, tmp_path)
    assert r["exactness"] == "exact" and r["passed"], r["verification"]
    assert drift < 1e-5


def test_lemon_residue_through_a_head_activation_is_approx(tmp_path_factory, tmp_path):
    # gelu(mean of the units) != mean of gelu(units): the head's LayerNorm sees other statistics
    model = _tiny(tmp_path_factory, "roberta-prelayernorm")
    op = api.check("widen hidden x1.5 lemon", model).ops[0]
    assert op.exactness == "approx" and "nonlinear" in op.reason, op.reason
    assert api.check("widen hidden x2 lemon", model).exactness == "exact"
    r, drift = _grow("widen hidden x1.5 lemon", model, tmp_path)
    assert r["exactness"] == "approx" and drift > 1e-4  # really not exact (measured 3.7e-3)


def test_gainless_qk_norm_is_over_head_dim(tmp_path_factory, tmp_path):
    # Llama-4's L2 q/k norm (no weight, after its complex RoPE) was a "pre" norm over hidden
    model = _tiny(tmp_path_factory, "llama4_text")
    gainless = [n for n in _ir(model).norms if n.weight is None]
    assert [(n.group, n.placement) for n in gainless] == [("head_dim", "qk")]
    op = api.check("widen head_dim x2", model).ops[0]
    assert op.exactness == "approx" and "without a gain" in op.reason, op.reason  # measured 0.33
    # LEMON rescales rms_norm_eps, which the L2 norm shares: exact-eps (was exact, drift 7e-5 > 1e-5)
    r, drift = _grow("widen hidden x1.5 lemon", model, tmp_path)
    assert r["exactness"] == "exact-eps" and r["passed"], r["verification"]


def test_literal_softmax_scale_does_not_follow_head_dim(tmp_path_factory, tmp_path):
    # HyperCLOVAX's attention_multiplier (head_dim**-0.5 filled in at load, then stored): the grown
    # config keeps it, so q must not be rescaled (was: x sqrt(2), drift 1.7e-2)
    model = _tiny(tmp_path_factory, "hyperclovax")
    assert _ir(model).attention.scaling_source == "config-value:attention_multiplier"
    r, drift = _grow("widen head_dim x2", model, tmp_path)
    assert r["exactness"] == "exact" and r["passed"], r["verification"]
    assert drift < 1e-5


def test_qk_norms_keep_their_statistics_under_head_dim_growth(tmp_path_factory, tmp_path):
    # HY-V3: q/k RMSNorms with eps 1e-5 over small projections (init std 0.006): zero new dims halve
    # the mean-square, an eps effect of 1.3e-3 (over the exact-eps tolerance). Copied dims keep it.
    model = _tiny(tmp_path_factory, "hy_v3")
    r, drift = _grow("widen head_dim x2", model, tmp_path)
    assert r["exactness"] == "exact" and r["passed"], r["verification"]
    assert drift < 1e-5


@pytest.mark.parametrize("style", ["half", "interleaved", None])
def test_head_dim_copy_map_copies_whole_rotary_pairs(style):
    d, k = 8, 3
    base = zero_map(d, d * k) if style is None else rope_head_dim_map(d, d * k, style=style, rotary_dim=d)
    m = head_dim_copy_map(base, style=style)
    assert [m.src.count(u) for u in range(d)] == [k] * d
    assert all(m.src[j] == s for j, s in enumerate(base.src) if s >= 0)  # old dims stay where RoPE wants them
    if style == "half":  # pair (j, j + d'/2) copies pair (i, i + d/2)
        assert all(m.src[j + d * k // 2] == m.src[j] + d // 2 for j in range(d * k // 2))
    if style == "interleaved":  # pair (2p, 2p+1) copies pair (2i, 2i+1)
        assert all(m.src[2 * p] % 2 == 0 and m.src[2 * p + 1] == m.src[2 * p] + 1 for p in range(d * k // 2))


def test_gainless_attention_output_norm_is_seen_and_lemon_is_not_exact(tmp_path_factory, tmp_path):
    # DiffLlama: a gainless torch RMSNorm (aten rms_norm) over 2*head_dim on the attention's output,
    # sharing rms_norm_eps with the hidden norms. Undiscovered, LEMON's eps x eta^2 changed it unseen
    # and x1.5 was called exact (verification: 9.6e-4 relative against a 6e-6 tolerance).
    model = _tiny(tmp_path_factory, "diffllama")
    sub = [n for n in _ir(model).norms if n.group != "hidden"]
    assert [(n.weight, n.kind, n.group, n.placement, n.eps_key, n.sublayer) for n in sub] == [
        (None, "rmsnorm", "head_dim", "head_out", "rms_norm_eps", "attn")]
    op = api.check("widen hidden x1.5 lemon", model).ops[0]
    assert op.exactness == "approx" and "head_out norm over head_dim" in op.reason, op.reason
    assert api.check("widen hidden x2 lemon", model).exactness == "exact"
    r, drift = _grow("widen hidden x1.5 lemon", model, tmp_path)
    assert r["exactness"] == "approx" and drift > 1e-4  # really not exact
    r, drift = _grow("widen hidden x2 tile", model, tmp_path / "tile")
    assert r["exactness"] == "exact" and r["passed"] and drift < 1e-5
