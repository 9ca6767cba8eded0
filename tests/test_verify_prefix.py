"""Verification reuses the grown model's leading decoder layers that are byte-identical to the
original's (runtime/layerwise.identical_prefix + LayerwiseModel._reuse): the report is bitwise the
one computing every layer gives, and nothing is reused when weights, config or inputs differ."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from families import build_model
from scaler_wizard.runtime.layerwise import LayerwiseModel, identical_prefix
from scaler_wizard.runtime import layerwise
from scaler_wizard.runtime.verify import compare_models


@pytest.fixture(autouse=True)
def _products_as_the_model_computes_them(monkeypatch):
    """These tests hold the replay to the model's own forward bit for bit: its matrix products as
    ``linear`` computes them (test_layerwise_gemm.py covers the weight-major products)."""
    monkeypatch.setattr(layerwise, "WEIGHT_MAJOR_GEMM", False)


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


def test_layers_compared_ahead_are_not_read_again_and_decide_the_same(tmp_path, monkeypatch):
    """apply compares the copied leading layers while the verifier's imports run
    (layerwise.compare_leading_layers, torch-free): identical_prefix then reads nothing already
    compared and reaches the verdict it reaches alone, for equal and for differing bytes."""
    from scaler_wizard.runtime.checkpoint import open_checkpoint
    from scaler_wizard.runtime.layerwise import compare_leading_layers

    _, model = build_model("llama")
    model.save_pretrained(tmp_path / "o")
    _deeper(model, [0, 1, 1]).save_pretrained(tmp_path / "g")
    w = _deeper(model, [0, 1, 1])
    with torch.no_grad():
        w.model.layers[1].self_attn.o_proj.weight[0, 0] += 1e-6
    w.save_pretrained(tmp_path / "w")

    reads = []
    real = layerwise._equal_ranges
    monkeypatch.setattr(layerwise, "_equal_ranges", lambda a, b: reads.append(a) or real(a, b))
    o = LayerwiseModel(tmp_path / "o")
    for name, k_expected in (("g", 2), ("w", 1)):
        reads.clear()
        known = compare_leading_layers(open_checkpoint(tmp_path / "o"), open_checkpoint(tmp_path / name), "model.layers")
        ahead = len(reads)
        assert ahead == len(known) and ahead >= 9 * k_expected  # every tensor of the identical layers
        k, why = identical_prefix(o, LayerwiseModel(tmp_path / name), known)
        if name == "g":
            assert len(reads) == ahead  # every tensor it asks about was compared ahead
        assert len(set(reads)) == len(reads)  # and nothing is compared twice
        assert (k, why) == identical_prefix(o, LayerwiseModel(tmp_path / name)) and k == k_expected


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


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: sliding-window cache layers (window 40)
def test_kv_prefill_cut_from_the_random_ids_forward(tmp_path, family):
    """Job.prefill_from: the random ids' forward writes the cache, cut to the prefill's positions
    and rows; the decoding continues from it. One real forward per decoder layer fewer, the same
    logits whole and layer by layer (bitwise), every position the full forward's (within float32)."""
    from scaler_wizard.runtime.layerwise import Job, prefill_from_longer_refused
    from scaler_wizard.runtime.verify import _whole_model_logits

    _, model = build_model(family)
    model.save_pretrained(tmp_path / "m")
    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(0))
    cut = [Job("a", ids), Job("kv", ids[:2], prefill=6, steps=2, prefill_from="a")]
    apart = [Job("a", ids), Job("kv", ids[:2], prefill=6, steps=2)]
    assert prefill_from_longer_refused(model.config, 12) is None
    whole = _whole_model_logits(model, cut)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
    assert torch.equal(whole["a"], model(input_ids=ids, use_cache=True).logits)
    assert whole["kv"].shape == (2, 12, 128)
    assert torch.equal(whole["kv"][:, :6], whole["a"][:2, :6])  # the prefill positions are the source's
    assert (whole["kv"] - full[:2]).abs().max().item() < 1e-5 * full.abs().max().item()
    ref = _whole_model_logits(model, apart)["kv"]  # a prefill forward of its own
    assert (whole["kv"] - ref).abs().max().item() < 1e-5 * full.abs().max().item()

    forwards = []
    for jobs in (cut, apart):
        lm = LayerwiseModel(tmp_path / "m")
        hooks = [layer.mlp.register_forward_hook(lambda *a: forwards.append(1)) for layer in lm.layers]
        forwards.clear()
        lw = lm.run(jobs)
        for h in hooks:
            h.remove()
        if jobs is cut:
            n_cut = len(forwards)
            assert torch.equal(lw["a"], whole["a"]) and torch.equal(lw["kv"], whole["kv"])
    n_layers = len(lm.layers)
    assert n_cut == 4 * n_layers and len(forwards) == 5 * n_layers  # a, (prefill), 6..10, 10, 11


def test_kv_prefill_cut_only_where_the_cache_holds_the_prefill():
    """The cut cache stands for a prefill forward only where a longer forward writes the same keys
    and values: not past a sliding window (positions dropped), not with length-dependent RoPE
    (longrope, dynamic NTK: frequencies picked per forward), not with recurrent-state layers."""
    from transformers import AutoConfig

    from scaler_wizard.runtime.layerwise import Job, prefill_from_longer_refused, prefill_sources

    cfg = build_model("gemma2")[0]
    assert prefill_from_longer_refused(cfg, 39) is None
    assert "sliding window of 40" in prefill_from_longer_refused(cfg, 40)
    llama = build_model("llama")[0]
    llama.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    assert "dynamic" in prefill_from_longer_refused(llama, 8)
    nxt = AutoConfig.for_model("qwen3_next", num_hidden_layers=4, hidden_size=64, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=128)
    assert "LinearAttention" in prefill_from_longer_refused(nxt, 8)
    ids = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="not this job's prefill"):
        prefill_sources([Job("a", ids), Job("kv", ids + 1, prefill=4, prefill_from="a")])
    with pytest.raises(ValueError, match="no earlier job"):
        prefill_sources([Job("kv", ids, prefill=4, prefill_from="a"), Job("a", ids)])
    with pytest.raises(ValueError, match="not a plain forward"):
        prefill_sources([Job("a", ids, token_type_ids=torch.ones_like(ids)), Job("kv", ids, prefill=4, prefill_from="a")])
    # a padded source: its decoding rows must be unmasked over the prefill and at positions 0, 1, ...
    mask, pos = torch.ones_like(ids), torch.arange(8).expand(2, 8)
    assert prefill_sources([Job("a", ids, mask, pos), Job("kv", ids[:1], prefill=4, prefill_from="a")])["a"].name == "kv"
    left = mask.clone()
    left[0, 0] = 0
    with pytest.raises(ValueError, match="mask hides"):
        prefill_sources([Job("a", ids, left, pos), Job("kv", ids[:1], prefill=4, prefill_from="a")])
    with pytest.raises(ValueError, match="position ids"):
        prefill_sources([Job("a", ids, mask, pos + 1), Job("kv", ids[:1], prefill=4, prefill_from="a")])


def test_a_grown_model_whose_cache_is_broken_fails_the_kv_checks(tmp_path, monkeypatch):
    """A fault only cached decoding shows: the grown model stores keys 1 % off what its forward
    used (the forward writing the cache is right, every later forward reads wrong keys). The full
    forwards agree; both KV checks fail, with the prefill taken from the random ids' forward."""
    from transformers.cache_utils import DynamicLayer

    _, model = build_model("llama")
    model.save_pretrained(tmp_path / "o")
    model.save_pretrained(tmp_path / "g")
    broken = {"on": False}
    update = DynamicLayer.update

    def bad_update(self, k, v, *a, **kw):
        keys, values = update(self, k, v, *a, **kw)
        if not broken["on"]:
            return keys, values
        used = keys.clone()
        self.keys = self.keys * 1.01
        return used, values

    run = LayerwiseModel.run

    def run_grown_broken(self, jobs, **kw):
        broken["on"] = str(self.reader.path).endswith("g")
        try:
            return run(self, jobs, **kw)
        finally:
            broken["on"] = False

    monkeypatch.setattr(DynamicLayer, "update", bad_update)
    monkeypatch.setattr(LayerwiseModel, "run", run_grown_broken)
    # reuse_prefix=False: the grown copy is byte-identical, its layers would be taken from the original's run
    rep = compare_models(str(tmp_path / "g"), str(tmp_path / "o"), layerwise=True, reuse_prefix=False)
    assert rep.check("random_ids").passed and rep.check("padding_left").passed
    assert not rep.check("kv_cache_vs_full").passed and not rep.check("kv_cache_vs_original").passed
    assert not rep.passed
