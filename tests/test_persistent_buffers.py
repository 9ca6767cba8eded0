"""Persistent buffers the checkpoint stores are carried by growth and read by verification (issue 10).

A persistent buffer is in ``state_dict`` and ``save_pretrained`` stores it: DeepSeek-V3-style routers'
``e_score_correction_bias`` (GLM-4-MoE, Kimi, MiniMax-M2, ... about thirty model types), Gemma-4's
``layer_scalar``. Discovery listed parameters only, so every program dropped these tensors; the
output then reloaded them at their config default (zero bias, scalar 1), and the layer-by-layer
verifier built them from the config on both sides too, so a trained router bias lost by growth
verified as exact. Now discovery lists them (kind ``buffer``, axes from the traced graph), programs
carry them, the verifier loads the stored values, and a checkpoint that does not store one (older
files) is grown without it, as transformers would load it.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from scaler_wizard import api, sweep
from scaler_wizard.runtime.verify import compare_models

BIAS = "model.layers.1.mlp.gate.e_score_correction_bias"  # layer 0 is dense (first_k_dense_replace)


def _rewrite(model_dir, fn):
    path = f"{model_dir}/model.safetensors"
    tensors = load_file(path)
    save_file({k: fn(k, v) for k, v in tensors.items()}, path, metadata={"format": "pt"})


def _stored(model_dir) -> dict:
    with safe_open(f"{model_dir}/model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    """A tiny GLM-4-MoE whose router correction bias is trained-like (non-zero, not the default)."""
    d = tmp_path_factory.mktemp("glm")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALER_WIZARD_CACHE", str(d / "cache"))
        sweep.build_tiny("glm4_moe", d / "model")
        g = torch.Generator().manual_seed(3)
        _rewrite(d / "model", lambda k, v: torch.randn(v.shape, generator=g) if k == BIAS else v)
        yield str(d / "model")


@pytest.mark.slow
def test_discovery_lists_the_stored_buffer(glm):
    ir = api.ir(glm)
    (t,) = [t for t in ir.tensors if t.name == "model.layers.{i}.mlp.gate.e_score_correction_bias"]
    assert t.kind == "buffer" and t.layers == (1,) and t.shape == (4,)
    assert t.axes[0].groups() == ("experts",)  # the traced graph ties it to the experts axis


@pytest.mark.slow
@pytest.mark.parametrize("plan", ["widen ffn x2 net2net", "widen hidden x2 tile"])
def test_growth_carries_the_buffer_and_verifies(glm, plan, tmp_path):
    out = tmp_path / "o"
    r = api.apply(plan, model=glm, out=str(out), verify=True)
    assert r["passed"] and r["exactness"] == "exact", r["verification"]
    assert torch.equal(_stored(out)[BIAS], _stored(glm)[BIAS])


@pytest.mark.slow
def test_layerwise_verification_reads_the_stored_buffer(glm, tmp_path):
    """The same weights with the bias at its config default (zeros) are a different function: the
    layer-by-layer verifier must see it (it built buffers from the config before)."""
    other = tmp_path / "zero-bias"
    other.mkdir()
    for f in ("config.json", "generation_config.json"):
        src = f"{glm}/{f}"
        try:
            (other / f).write_bytes(open(src, "rb").read())
        except FileNotFoundError:
            pass
    save_file({k: (torch.zeros_like(v) if k == BIAS else v) for k, v in _stored(glm).items()},
              str(other / "model.safetensors"), metadata={"format": "pt"})
    same = compare_models(glm, glm, layerwise=True, check_padding=False)
    assert same.passed
    rep = compare_models(str(other), glm, layerwise=True, check_padding=False)
    assert not rep.passed and rep.max_rel > 1e-3


@pytest.mark.slow
def test_checkpoint_without_the_buffer_grows_without_it(glm, tmp_path):
    """Files saved before a model type had the buffer: transformers computes it on load, so does
    the grown model (not written, not an error)."""
    src = tmp_path / "old"
    src.mkdir()
    (src / "config.json").write_bytes(open(f"{glm}/config.json", "rb").read())
    save_file({k: v for k, v in _stored(glm).items() if k != BIAS}, str(src / "model.safetensors"),
              metadata={"format": "pt"})
    out = tmp_path / "o"
    r = api.apply("widen ffn x2 net2net", model=str(src), out=str(out), verify=True)
    assert r["passed"] and r["exactness"] == "exact", r["verification"]
    assert BIAS not in _stored(out)


@pytest.mark.slow
def test_identity_layer_refused_when_the_layer_itself_stores_a_buffer(tmp_path_factory, tmp_path):
    """Gemma-4's decoder layer multiplies its output by its stored `layer_scalar`: an inserted layer
    with zeroed writers would still scale the stream by the copied scalar (5e-2 drift once the scalar
    is not 1), so `identity` is refused (SW382); ops that keep the layers as they are stay exact."""
    from scaler_wizard.diagnostics import PlanError

    d = tmp_path_factory.mktemp("g4u")
    sweep.build_tiny("gemma4_unified_text", d / "model")  # layer_scalar moved off 1 by the sweep's build
    model = str(d / "model")
    with pytest.raises(PlanError) as e:
        api.check("widen ffn x2 net2net\ninsert layer 1 identity", model)
    (diag,) = [x for x in e.value.diagnostics if x.code == "SW382"]
    assert diag.span.line == 2 and "layer_scalar" in diag.message
    r = api.apply("widen ffn x2 net2net", model=model, out=str(tmp_path / "o"), verify=True)
    assert r["passed"] and r["exactness"] == "exact", r["verification"]
