"""LESA (compiler/methods/lesa.py, `insert ... lesa`): the decomposition reconstructs every layer,
the predictor beats the neighbours' mean on structured layers, inserted layers are deterministic
bytes for a seed, the whole pipeline runs on two families (llama, qwen2) and reports its drift, and
the type checker refuses models LESA cannot decompose."""

from __future__ import annotations

import hashlib

import pytest

torch = pytest.importorskip("torch")

from scaler_wizard import api  # noqa: E402
from scaler_wizard.compiler.methods import lesa as LE  # noqa: E402
from scaler_wizard.diagnostics import PlanError  # noqa: E402


def _structured_layers(n=6, out=24, inn=16, seed=0):
    """Layers on a smooth path W_l = A + l B + l^2 C (plus noise): what LESA's association assumes."""
    g = torch.Generator().manual_seed(seed)
    A, B, C = (torch.randn(out, inn, generator=g) for _ in range(3))
    return [A + 0.3 * i * B + 0.02 * i * i * C + 0.01 * torch.randn(out, inn, generator=g) for i in range(n)]


def test_decomposition_reconstructs_every_layer():
    mats = _structured_layers()
    fit = LE.KindFit(mats, LE.LesaOptions(epochs=0))
    for i, w in enumerate(mats):
        assert torch.allclose(fit.reconstruct(i), w, atol=1e-5)
    U, S, blocks = LE.decompose(mats, rank=8, seed=0)  # randomized, truncated
    assert U.shape == (24, 8) and S.shape == (8,) and blocks[0].shape == (8, 16)


def test_predictor_beats_the_neighbours_mean_on_structured_layers():
    mats = _structured_layers(n=8)
    fit = LE.KindFit(mats, LE.LesaOptions(epochs=150, width=32, lr=3e-3))
    assert fit.report["mse"] < fit.report["baseline_mse"], fit.report
    mid = fit.layer(3, 4)
    assert mid.shape == mats[0].shape and torch.isfinite(mid).all()


def test_same_seed_same_bytes_other_seed_other_bytes():
    mats = _structured_layers()
    a = LE.KindFit(mats, LE.LesaOptions(epochs=5, seed=1)).layer(1, 2)
    b = LE.KindFit(mats, LE.LesaOptions(epochs=5, seed=1)).layer(1, 2)
    c = LE.KindFit(mats, LE.LesaOptions(epochs=5, seed=2)).layer(1, 2)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("shapes, message", [
    ([(4, 4)] * 2, "at least 3 layers"),
    ([(4, 4), (4, 4), (4, 6)], "differ in shape"),
    ([(4,)] * 3, "matrices"),
])
def test_refusals_of_the_math(shapes, message):
    with pytest.raises(LE.LesaError, match=message):
        LE.check_shapes(shapes)


def test_cost_is_bounded_by_one_kind():
    c = LE.cost(4096, 4096, 32, epochs=1, width=64)
    assert not c["full_svd"] and c["bytes"] > 8 * 4096 * 4096 * 32
    assert LE.cost(64, 64, 4)["full_svd"]
    # the predictor MLP's parameters, Adam state and activations count: width scales the bytes
    assert LE.cost(64, 64, 4, width=10**6)["bytes"] > 8 * 4 * 3 * 64 * 10**6


@pytest.fixture(scope="module")
def four_layer_models(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lesa")
    out = {}
    common = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
                  vocab_size=128, max_position_embeddings=32)
    for mt, kw in (("llama", dict(intermediate_size=96, head_dim=16)), ("qwen2", dict(intermediate_size=160,
                                                                                      tie_word_embeddings=True))):
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(AutoConfig.for_model(mt, **common, **kw), dtype=torch.float32)
        m.save_pretrained(root / mt)
        out[mt] = root / mt
    return out


def _digest(d):
    return hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.slow  # two applies with verification per family
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_lesa_apply_reports_drift_and_is_deterministic(family, four_layer_models, tmp_path):
    from transformers import AutoModelForCausalLM

    plan = "insert layer 2 lesa epochs=10 width=16"
    src = four_layer_models[family]
    res = api.apply(plan, str(src), out=str(tmp_path / "a"), progress=False)
    assert res["exactness"] == "approx"
    ver = res["verification"]
    assert ver["passed"] and ver["judged"] is False and ver["max_rel"] > 0, ver  # drift measured and reported
    api.apply(plan, str(src), out=str(tmp_path / "b"), progress=False)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    m = AutoModelForCausalLM.from_pretrained(str(tmp_path / "a"), dtype=torch.float32)
    d = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    assert m.config.num_hidden_layers == 5
    new, left, right = m.model.layers[2], d.model.layers[1], d.model.layers[2]
    # norms interpolated from the neighbours; matrices neither copies nor zero
    assert torch.allclose(new.input_layernorm.weight, 0.5 * (left.input_layernorm.weight + right.input_layernorm.weight))
    q = new.self_attn.q_proj.weight
    assert not torch.equal(q, left.self_attn.q_proj.weight) and not torch.equal(q, right.self_attn.q_proj.weight)
    assert q.abs().sum() > 0
    if family == "qwen2":  # biases: the neighbours' mean
        assert torch.allclose(new.self_attn.q_proj.bias, 0.5 * (left.self_attn.q_proj.bias + right.self_attn.q_proj.bias))
    # the old layers are untouched (moved only)
    assert torch.equal(m.model.layers[3].mlp.down_proj.weight, right.mlp.down_proj.weight)


def test_lesa_check_reports_cost_and_refuses(four_layer_models, tmp_path):
    rp = api.check("insert layers every 2 lesa epochs=5", str(four_layer_models["llama"]))
    warns = [d for d in rp.warnings if d.code == "SW630"] if hasattr(rp, "warnings") else []
    text = " ".join(str(d.message) for d in warns)
    assert warns and "GFLOP" in text and "B" in text
    with pytest.raises(PlanError) as e:
        api.check("insert layer 1 lesa width=0", str(four_layer_models["llama"]))
    assert "SW331" in str(e.value)
    with pytest.raises(PlanError) as e:  # a predictor of 10^11 hidden units: refused at check, not at apply's allocation
        api.check("insert layer 1 lesa width=99999999999", str(four_layer_models["llama"]))
    assert "SW331" in str(e.value) and "width" in str(e.value)
    with pytest.raises(PlanError) as e:
        api.check("insert layer 1 identity epochs=3", str(four_layer_models["llama"]))
    assert "SW204" in str(e.value)
    from families import build_model

    _, m2 = build_model("llama")  # 2 layers: nothing to learn from
    m2.save_pretrained(tmp_path / "two")
    with pytest.raises(PlanError) as e:
        api.check("insert layer 1 lesa", str(tmp_path / "two"))
    assert "SW330" in str(e.value)
