"""The `identity` / `zero` / `cancel` layer inits are declared exact: every one must verify in fp32
logits on the families whose layers hold more than q/k/v/o and a gated MLP (the session-10 sweep
found three false exact cells):

* GPT-OSS: stacked experts' biases (``down_proj_bias`` [experts, hidden], added to x @ W[e]) write
  the stream; the experts' ``gate_up_proj`` interleaves gate and up columns (ffn x 2, read with
  ``[..., ::2]`` / ``[..., 1::2]``); the attention has per-head ``sinks``.
* Doge: the residual stream is scaled by learnable gains (``residual * input_residual + attn``),
  ones at init but not in a trained model -- a copied gain rescales the stream.
* ALiBi (MPT, Falcon with ``alibi``): the slopes follow the head index, so a cancel pair of heads
  does not cancel.

Every tensor the tiny models initialise to a constant (biases, sinks, Doge's gains) is moved off it
before saving, as training would."""

from __future__ import annotations

import glob

import pytest
import torch

from scaler_wizard import api, sweep

RTOL = 1e-5
PLANS = ("insert 1 layers after 0 zero", "insert layer 1 cancel", "insert layer 1 identity")


def _tiny(root, family, perturb=lambda n: False, **over):
    from transformers import AutoModelForCausalLM

    cfg, _ = sweep.tiny_config(family)
    for k, v in over.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if perturb(n):  # gains around 1, everything else around 0
                base = 1.0 if n.endswith("_residual") else 0.0
                p.copy_(base + 0.3 * torch.randn(p.shape, generator=g))
    d = root / (family + "".join(f"_{k}" for k in over))
    m.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("inits")
    return {
        "gpt_oss": _tiny(root, "gpt_oss", lambda n: n.endswith("bias") or n.endswith("sinks")),
        "doge": _tiny(root, "doge", lambda n: n.endswith("_residual")),
        "mpt": _tiny(root, "mpt"),
        "falcon_alibi": _tiny(root, "falcon", alibi=True),
    }


def _layer(out, i: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd = {}
    for f in glob.glob(str(out / "*.safetensors")):
        sd.update(load_file(f))
    return {k.split(f".{i}.", 1)[1]: v for k, v in sd.items() if f"layers.{i}." in k or f"blocks.{i}." in k
            or f".h.{i}." in k}


@pytest.mark.parametrize("fam", ["gpt_oss", "doge", "mpt", "falcon_alibi"])
@pytest.mark.parametrize("plan", PLANS)
def test_exact_layer_inits_verify(models, tmp_path, fam, plan):
    res = api.apply(plan, str(models[fam]), out=str(tmp_path / "out"), progress=False)
    ver = res["verification"]
    assert res["exactness"] == "exact"
    assert res["passed"], api.failed_checks(ver)
    assert ver["max_rel"] <= RTOL


def test_gpt_oss_cancel_pairs_interleaved_units_and_sinks(models, tmp_path):
    """The cancel layer is not the identity one in disguise: the experts' ffn units and the heads
    are paired (writers non-zero), gate_up's interleaved (gate, up) columns of unit f + F/2 copy unit
    f's, and head h + n/2's sink copies head h's."""
    res = api.apply("insert layer 1 cancel", str(models["gpt_oss"]), out=str(tmp_path / "out"), progress=False)
    assert res["passed"]
    new = _layer(tmp_path / "out", 1)
    down = new["mlp.experts.down_proj"]  # [experts, ffn, hidden]
    f = down.shape[1] // 2
    assert down.abs().max() > 0
    assert torch.equal(down[:, f:], -down[:, :f])
    gu = new["mlp.experts.gate_up_proj"]  # [experts, hidden, ffn x 2]: columns 2u (gate), 2u + 1 (up)
    units = gu.reshape(gu.shape[0], gu.shape[1], 2 * f, 2)
    assert torch.equal(units[:, :, f:], units[:, :, :f])
    b = new["mlp.experts.gate_up_proj_bias"].reshape(gu.shape[0], 2 * f, 2)
    assert torch.equal(b[:, f:], b[:, :f]) and b.abs().max() > 0
    assert new["mlp.experts.down_proj_bias"].abs().max() == 0  # a writer
    sinks = new["self_attn.sinks"]
    h = sinks.shape[0] // 2
    assert torch.equal(sinks[h:], sinks[:h]) and sinks.abs().max() > 0
    assert new["self_attn.o_proj.weight"].abs().max() > 0


def test_doge_stream_gains_are_ones(models, tmp_path):
    """A trained Doge's residual gains are not ones; the new layer's are (copied gains rescale the
    stream: 0.52 relative drift for identity / cancel before the fix, 1.0 for zero)."""
    for plan in ("insert layer 1 identity", "insert layer 1 cancel"):
        out = tmp_path / plan.split()[-1]
        api.apply(plan, str(models["doge"]), out=str(out), progress=False, verify=False)
        new, old = _layer(out, 1), _layer(out, 0)
        for k in ("input_residual", "post_attention_residual"):
            assert torch.equal(new[k], torch.ones_like(new[k]))
            assert not torch.equal(old[k], torch.ones_like(old[k]))  # the source layer's are not


def test_alibi_cancel_leaves_heads_unpaired(models, tmp_path):
    """Under ALiBi a copy of head h at h + n/2 attends with another slope: cancel pairs the FFN units
    only; the attention's writer is zero."""
    res = api.apply("insert layer 1 cancel", str(models["mpt"]), out=str(tmp_path / "out"), progress=False)
    assert res["passed"]
    new = _layer(tmp_path / "out", 1)
    assert new["attn.out_proj.weight"].abs().max() == 0
    down = new["ffn.down_proj.weight"]
    f = down.shape[1] // 2
    assert down.abs().max() > 0 and torch.equal(down[:, f:], -down[:, :f])


def test_ir_kinds(models):
    """What discovery now tells the compiler: the stacked experts' biases write the stream (role out
    on hidden), gate_up's interleaved axis is ffn x 2, Doge's residual gains are kind `scale`."""
    from scaler_wizard.ir import model_ir_for

    ir = model_ir_for(str(models["gpt_oss"]))
    t = ir.tensor("model.layers.{i}.mlp.experts.down_proj_bias")
    assert [a.role for a in t.axes] == ["expert", "out"] and t.axes[1].groups() == ("hidden",)
    gu = ir.tensor("model.layers.{i}.mlp.experts.gate_up_proj")
    assert [(f.group, f.size) for f in gu.axes[2].segments[0].factors] == [("ffn", ir.groups["ffn"].size), ("const", 2)]
    ir = model_ir_for(str(models["doge"]))
    assert ir.tensor("model.layers.{i}.input_residual").kind == "scale"
    assert ir.tensor("model.layers.{i}.post_attention_residual").kind == "scale"
