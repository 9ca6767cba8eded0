"""The original's half of verification run ahead (runtime/verify.OriginalAhead, started by `apply`
while it writes the output): the report is bitwise the one a plain comparison gives, and the
result is used only where its guess (batches, identical leading layers) holds."""

import copy

import torch
from transformers import AutoModelForCausalLM

from families import build_model
from scaler_wizard import api
from scaler_wizard.api import _predicted_prefix
from scaler_wizard.runtime.tiny import make_tiny_llama
from scaler_wizard.runtime.verify import OriginalAhead, compare_models

TEXT = "To be, or not to be, that is the question. " * 200
AHEAD_NOTE = "run ahead"


def _deeper(model, order, bump_layer=None):
    """Layer j of the copy is layer order[j] of ``model``; ``bump_layer`` gets a small offset."""
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = len(order)
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
    if bump_layer is not None:
        with torch.no_grad():
            for p in new.model.layers[bump_layer].parameters():
                p.add_(1e-3)
    return new


def _pair(tmp_path):
    _, model = build_model("llama")
    model.save_pretrained(tmp_path / "o")
    _deeper(model, [0, 1, 0, 1], bump_layer=2).save_pretrained(tmp_path / "g")  # 2 identical leading layers
    return tmp_path / "g", tmp_path / "o"


def _split(rep):
    d = rep.to_dict()
    return d.pop("notes"), d


def test_ahead_report_is_bitwise_the_plain_one(tmp_path):
    g, o = _pair(tmp_path)
    ahead = OriginalAhead(o, capture=2)
    notes, with_ahead = _split(compare_models(str(g), str(o), layerwise=True, ahead=ahead))
    plain_notes, plain = _split(compare_models(str(g), str(o), layerwise=True))
    assert with_ahead == plain  # every figure bitwise equal (floats compared with ==)
    assert with_ahead["max_abs"] > 0
    assert any(AHEAD_NOTE in n for n in notes), notes
    assert any("first 2 decoder layers" in n for n in notes), notes  # the capture was reused
    assert not any(AHEAD_NOTE in n for n in plain_notes)


def test_ahead_is_not_used_where_its_guess_is_wrong(tmp_path):
    g, o = _pair(tmp_path)
    _, plain = _split(compare_models(str(g), str(o), layerwise=True))
    # it captured three leading layers, but only two are identical: reusing three would be unsound
    notes, got = _split(compare_models(str(g), str(o), layerwise=True, ahead=OriginalAhead(o, capture=3)))
    assert got == plain and not any(AHEAD_NOTE in n for n in notes)
    assert any("first 2 decoder layers" in n for n in notes)
    # other batches than it ran (another sequence length): the original runs again
    _, plain16 = _split(compare_models(str(g), str(o), layerwise=True, seq_len=16))
    notes, got = _split(compare_models(str(g), str(o), layerwise=True, seq_len=16, ahead=OriginalAhead(o)))
    assert got == plain16 and not any(AHEAD_NOTE in n for n in notes)
    # another original than it ran
    _deeper(build_model("llama")[1], [0, 1]).save_pretrained(tmp_path / "other")
    notes, got = _split(compare_models(str(g), str(o), layerwise=True, ahead=OriginalAhead(tmp_path / "other")))
    assert got == plain and not any(AHEAD_NOTE in n for n in notes)


def test_ahead_that_cannot_run_leaves_no_result(tmp_path):
    ahead = OriginalAhead(tmp_path / "missing")
    assert ahead.result() is None and ahead.error is not None


def test_predicted_prefix_from_the_plan(tmp_path):
    model = str(make_tiny_llama(tmp_path / "tiny", TEXT))
    n = api.ir(model).num_layers
    assert _predicted_prefix(api.check("insert layer 1 identity", model=model)) == 1
    assert _predicted_prefix(api.check("widen ffn x2 net2net\ninsert layer 1 identity", model=model)) == 0
    assert _predicted_prefix(api.check("widen vocab by 64 mean", model=model)) == n  # layers do not read it


def test_apply_runs_the_original_ahead_and_verifies_the_same(tmp_path):
    model = str(make_tiny_llama(tmp_path / "tiny", TEXT))
    res = api.apply(api.check("insert layer 1 identity", model=model), out=str(tmp_path / "grown"))
    assert res["passed"] is True
    notes = res["verification"]["notes"]
    assert any(AHEAD_NOTE in n for n in notes), notes
    plain = api.verify(str(tmp_path / "grown"), model)
    assert plain["max_abs"] == res["verification"]["max_abs"]
    assert [c["max_abs"] for c in plain["checks"]] == [c["max_abs"] for c in res["verification"]["checks"]]
