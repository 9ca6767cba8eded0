"""Verification reuses the grown model's leading decoder layers that are byte-identical to the
original's (runtime/layerwise.identical_prefix + LayerwiseModel._reuse): the report is bitwise the
one computing every layer gives, and nothing is reused when weights, config or inputs differ."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from families import build_model
from scaler_wizard.runtime.layerwise import LayerwiseModel, identical_prefix
from scaler_wizard.runtime.verify import compare_models


def _deeper(model, order):
    """A depth-grown copy: layer j of the new model is a copy of layer order[j] of ``model``."""
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = len(order)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [model.config.layer_types[i] for i in order]
    new = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    sd = model.state_dict()
    out = {}
    for k in new.state_dict():
        if ".layers." in k:
            head, rest = k.split(".layers.", 1)
            j, tail = rest.split(".", 1)
            out[k] = sd[f"{head}.layers.{order[int(j)]}.{tail}"].clone()
        else:
            out[k] = sd[k].clone()
    new.load_state_dict(out)
    return new


def _report(g, o, **kw):
    d = compare_models(g, o, n_random=2, seq_len=6, layerwise=True, **kw).to_dict()
    return d.pop("notes"), d


@pytest.mark.parametrize("family", ["gemma2"])  # per-layer layer_types, sliding window, soft-capping
def test_identical_leading_layers_are_reused_bitwise(tmp_path, family):
    _, model = build_model(family)
    model.save_pretrained(tmp_path / "o")
    grown = _deeper(model, [0, 1, 0, 1])  # the first two layers are the original's
    with torch.no_grad():  # and the rest not quite (else the drift is zero everywhere)
        for p in grown.model.layers[2].parameters():
            p.add_(1e-3)
    grown.save_pretrained(tmp_path / "g")
    a, b = LayerwiseModel(tmp_path / "o"), LayerwiseModel(tmp_path / "g")
    assert identical_prefix(a, b)[0] == 2
    notes, reused = _report(tmp_path / "g", tmp_path / "o")
    assert any("first 2 decoder layers" in n for n in notes), notes
    plain_notes, plain = _report(tmp_path / "g", tmp_path / "o", reuse_prefix=False)
    assert reused == plain  # every figure bitwise equal (floats compared with ==)
    assert not any("decoder layers" in n for n in plain_notes)
    assert reused["max_abs"] > 0 and any(c["name"] == "kv_cache_vs_original" for c in reused["checks"])


def test_nothing_reused_when_weights_config_or_inputs_differ(tmp_path):
    _, model = build_model("llama")
    model.save_pretrained(tmp_path / "o")
    o = LayerwiseModel(tmp_path / "o")

    w = _deeper(model, [0, 1, 1])
    with torch.no_grad():
        w.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-6  # one element of the first layer
    w.save_pretrained(tmp_path / "w")
    assert identical_prefix(o, LayerwiseModel(tmp_path / "w")) == (0, "layer 0: mlp.down_proj.weight differs")

    c = _deeper(model, [0, 1, 1])
    c.config.rms_norm_eps = c.config.rms_norm_eps * 2  # a key the layers read
    c.save_pretrained(tmp_path / "c")
    k, why = identical_prefix(o, LayerwiseModel(tmp_path / "c"))
    assert k == 0 and "rms_norm_eps" in why

    e = _deeper(model, [0, 1, 1])  # identical layers, but another embedding: inputs differ
    with torch.no_grad():
        e.model.embed_tokens.weight.mul_(1.5)
    e.save_pretrained(tmp_path / "e")
    assert identical_prefix(o, LayerwiseModel(tmp_path / "e"))[0] == 2
    notes, reused = _report(tmp_path / "e", tmp_path / "o")
    assert any("not reused: the hidden states entering layer 0 differ" in n for n in notes), notes
    assert reused == _report(tmp_path / "e", tmp_path / "o", reuse_prefix=False)[1]
    assert not reused["passed"]


def test_kv_decoding_schedule_prefill_chunk_then_single_steps(tmp_path):
    """The KV-cache check: prefill, one forward through the cache, then the last tokens one by one;
    every position equals the full forward (whole model and layer by layer alike)."""
    from scaler_wizard.runtime.layerwise import Job, decode_schedule
    from scaler_wizard.runtime.verify import kv_decode_logits

    assert decode_schedule(32, 16, 4) == [(0, 16), (16, 28), (28, 29), (29, 30), (30, 31), (31, 32)]
    assert decode_schedule(8, 4, 4) == [(0, 4), (4, 5), (5, 6), (6, 7), (7, 8)]
    assert decode_schedule(6, 3, 0) == [(0, 3), (3, 4), (4, 5), (5, 6)]  # steps=0: every token alone
    _, model = build_model("llama")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
    whole = kv_decode_logits(model, ids, 6, steps=2)
    assert whole.shape == full.shape and (whole - full).abs().max().item() < 1e-5
    model.save_pretrained(tmp_path / "m")
    lw = LayerwiseModel(tmp_path / "m").run([Job("kv", ids, prefill=6, steps=2)])["kv"]
    assert torch.equal(lw, whole)


def test_verification_threads_follow_the_idle_cores(monkeypatch):
    import os

    from scaler_wizard.runtime import verify
    from scaler_wizard.runtime.verify import idle_threads, torch_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    monkeypatch.setattr(verify, "busy_cores", lambda: 1e6)  # every core busy
    assert idle_threads() == 1
    monkeypatch.setattr(verify, "busy_cores", lambda: 0.0)  # idle: torch's default
    assert idle_threads() == min(before, len(os.sched_getaffinity(0)))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user chose
    assert idle_threads() is None
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_busy_cores_sees_work_happening_now():
    # /proc/stat over a short window: a thread spinning in this process counts (the load average
    # would still remember the previous minute instead)
    import os
    import threading
    import time

    from scaler_wizard.runtime.verify import busy_cores

    stop = time.monotonic() + 1.0

    def spin():
        x = 0
        while time.monotonic() < stop:
            x += 1

    t = threading.Thread(target=spin)
    t.start()
    try:
        busy = busy_cores(window=0.3)
    finally:
        t.join()
    assert busy is not None and 0.5 <= busy <= (os.cpu_count() or 1) + 1e-6
