"""The layer-by-layer verifier computes float32 matrix products weight-major
(runtime/layerwise._linear: (W @ x^T)^T, faster with MKL on 2 cores than x @ W^T): the same
products summed in another order, so logits agree with the model's own forward to float32
rounding, and verdicts do not change."""

import copy

import pytest
import torch

from families import build_model
from scaler_wizard.runtime import layerwise
from scaler_wizard.runtime.layerwise import Job, LayerwiseModel, _linear
from scaler_wizard.runtime.verify import compare_models


@pytest.mark.parametrize("shape,bias", [((3, 5, 16), True), ((7, 16), False), ((2, 1, 16), True)])
def test_weight_major_linear_matches_linear(shape, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(24, 16, generator=g)
    b = torch.randn(24, generator=g) if bias else None
    y = _linear(x, w, b)
    ref = torch.nn.functional.linear(x, w, b)
    assert y.shape == ref.shape and y.is_contiguous()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_one_row_and_other_dtypes_are_linear_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 16, generator=g)
    x1 = torch.randn(1, 1, 16, generator=g)
    assert torch.equal(_linear(x1, w), torch.nn.functional.linear(x1, w))  # a decoding step
    x64, w64 = torch.randn(4, 16, dtype=torch.float64, generator=g), w.double()
    assert torch.equal(_linear(x64, w64), torch.nn.functional.linear(x64, w64))


def test_weight_major_run_matches_the_model_and_is_what_verification_uses(tmp_path, monkeypatch):
    _, model = build_model("llama")
    model.save_pretrained(str(tmp_path / "o"))
    ids = torch.randint(0, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(2))
    lw = LayerwiseModel(tmp_path / "o")
    calls = []
    real = layerwise._linear
    monkeypatch.setattr(layerwise, "_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    try:
        out = lw.run([Job("a", ids)])["a"]
    finally:
        lw.close()
    with torch.no_grad():
        ref = model(ids).logits
    assert calls, "the decoder layers' Linear modules did not go through the weight-major product"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the subclass check: only plain nn.Linear modules are rerouted, and they are restored afterwards
    assert all("forward" not in m.__dict__ for m in model.modules())

    same = compare_models(str(tmp_path / "o"), str(tmp_path / "o"), layerwise=True)
    assert same.passed  # the same model, the same products: bitwise against the original
    assert all(same.check(n).max_abs == 0.0 for n in ("random_ids", "padding_right", "padding_left"))
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    broken.save_pretrained(str(tmp_path / "b"))
    assert not compare_models(str(tmp_path / "b"), str(tmp_path / "o"), layerwise=True).passed


def test_reading_the_next_layer_ahead_changes_no_bit(tmp_path, monkeypatch):
    """The next decoder layer is read and converted in a thread while one runs (where a layer's
    float32 weights fit LayerwiseModel.READ_AHEAD_MAX_BYTES): the same weights in the same slots,
    so every logit is the one reading layer by layer on demand gives, and no buffer leaks."""
    _, model = build_model("qwen2")  # biases too
    model.save_pretrained(str(tmp_path / "o"))
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    jobs = [Job("a", ids), Job("kv", ids[:1], prefill=4, steps=2)]
    outs, threads = {}, []
    real = LayerwiseModel._read_ahead
    monkeypatch.setattr(LayerwiseModel, "_read_ahead", lambda self, m: threads.append(m) or real(self, m))
    for limit in (0, 1 << 30):
        monkeypatch.setattr(LayerwiseModel, "READ_AHEAD_MAX_BYTES", limit)
        lw = LayerwiseModel(tmp_path / "o")
        try:
            outs[limit] = lw.run(jobs)
            assert all(p.device.type == "meta" for layer in lw.layers for p in layer.parameters())
        finally:
            lw.close()
    assert len(threads) == model.config.num_hidden_layers - 1  # only with the limit above a layer's size
    for k in ("a", "kv"):
        assert torch.equal(outs[0][k], outs[1 << 30][k])
