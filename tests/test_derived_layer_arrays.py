"""Per-layer arrays the config class derives: configs written before transformers 4.53 carry no
`layer_types` (Gemma-3: `sliding_window_pattern`; Qwen2: `max_window_layers` + `use_sliding_window`),
transformers 5's config class derives it. A cached IR must be re-indexed by the derived array as a
traced one is (it lost every layer tensor: SW316 "internal error" on every plan), depth ops must
re-index and re-summarise it, and a conform verdict must not answer for other tensors than the
ones it compared (a verdict cached from a sound IR made a broken IR's plan pass `check`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import scaler_wizard.ir as I
from scaler_wizard import api
from scaler_wizard.diagnostics import PlanError

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5

QWEN2 = dict(model_type="qwen2", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=160,
             vocab_size=256, num_hidden_layers=4, max_position_embeddings=40, use_sliding_window=True,
             sliding_window=8, max_window_layers=2, tie_word_embeddings=True)
GEMMA3 = dict(model_type="gemma3_text", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              intermediate_size=96, vocab_size=128, num_hidden_layers=4, max_position_embeddings=40,
              sliding_window=8, sliding_window_pattern=2)


def _layered(ir):
    return {t.name: t.layers for t in ir.tensors if t.layers is not None}


@pytest.mark.parametrize("cfg", [QWEN2, GEMMA3], ids=["qwen2", "gemma3_text"])
def test_cached_ir_equals_the_trace_without_layer_types(cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("SCALER_WIZARD_CACHE", str(tmp_path))
    traced = I.model_ir_for(cfg)
    assert traced.layer_arrays == ("layer_types",) and "layer_types" not in cfg
    assert set(traced.config["layer_types"]) == {"full_attention", "sliding_attention"}
    cached = I.model_ir_for(cfg)
    layered = _layered(cached)
    assert layered and all(v == (0, 1, 2, 3) for v in layered.values()), layered
    assert _layered(cached) == _layered(traced)
    assert cached.config["layer_types"] == traced.config["layer_types"]


@pytest.mark.slow
def test_cache_hit_with_derived_arrays_is_torch_free(tmp_path):
    env = {**os.environ, "SCALER_WIZARD_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    code = ("import sys, scaler_wizard.ir as I\n"
            f"ir = I.model_ir_for({QWEN2!r})\n"
            "assert all(t.layers == (0, 1, 2, 3) for t in ir.tensors if t.layers is not None)\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                           timeout=600) for _ in range(2)]
    assert all(r.returncode == 0 for r in outs), outs[-1].stderr[-2000:]
    assert outs[1].stdout.strip().splitlines()[-1] == "[]"  # the trace memoised the derived layer_types


def test_other_depth_rederives_or_retraces(tmp_path, monkeypatch):
    """The exact key has no depth: Gemma-3 at depth 2 with pattern 6 traces only sliding layers; at
    depth 6 the derived array has a full layer the cached IR never saw: traced, not mis-indexed."""
    monkeypatch.setenv("SCALER_WIZARD_CACHE", str(tmp_path))
    a = {**GEMMA3, "num_hidden_layers": 2, "sliding_window_pattern": 6}
    I.model_ir_for(a)
    calls = []
    real = I.discover
    monkeypatch.setattr(I, "discover", lambda c, **kw: calls.append(1) or real(c, **kw))
    deeper = I.model_ir_for({**a, "num_hidden_layers": 3})  # still all sliding: from the cache
    assert not calls and all(v == (0, 1, 2) for v in _layered(deeper).values())
    six = I.model_ir_for({**a, "num_hidden_layers": 6})
    assert calls == [1] and six.config["layer_types"][5] == "full_attention"
    assert all(v == tuple(range(6)) for v in _layered(six).values())
    with pytest.raises(ValueError, match="not traced"):
        I.instantiate(deeper, six.config)


# ---------------------------------------------------------------------- check + apply + verify
@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    from scaler_wizard import sweep

    root = tmp_path_factory.mktemp("derived")
    out = {}
    for mt in ("gemma3_text", "qwen2"):
        sweep.build_tiny(mt, root / mt)
        out[mt] = root / mt
    return out


def _without_layer_types(base: Path, dst: Path, **keys) -> Path:
    shutil.copytree(base, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.pop("layer_types")
    cfg.update(keys)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


# gemma3: tiny layout [S, F] re-derived from the pattern 2; qwen2: [F, S] from max_window_layers 1
VARIANTS = {
    "gemma3_pattern": ("gemma3_text", dict(sliding_window_pattern=2, sliding_window=4)),
    "gemma3_private": ("gemma3_text", dict(sliding_window=4)),  # `_sliding_window_pattern` only: all sliding
    "qwen2_max_window": ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
}
CASES = [  # (variant, plan, exactness, layer_types after, summary key -> value after)
    ("gemma3_pattern", "widen hidden x2 tile", "exact", None, {}),
    ("gemma3_pattern", "insert layer 1 identity", "exact", ["sliding_attention", "sliding_attention", "full_attention"],
     {"sliding_window_pattern": 3}),
    ("gemma3_private", "insert layer 1 identity", "exact", ["sliding_attention"] * 3, {}),
    ("qwen2_max_window", "widen hidden x2 tile", "exact", None, {}),
    ("qwen2_max_window", "insert layer 1 identity", "exact", ["full_attention", "full_attention", "sliding_attention"],
     {"max_window_layers": 2}),
    ("gemma3_pattern", "duplicate layers 0..2", "approx", ["sliding_attention", "full_attention"] * 2,
     {"sliding_window_pattern": 2}),
]


SUITE = {("gemma3_pattern", "widen hidden x2 tile"), ("gemma3_pattern", "insert layer 1 identity"),
         ("qwen2_max_window", "insert layer 1 identity")}  # the rest run with the slow tests (CI)


@pytest.mark.parametrize("variant,plan,exactness,types_after,summary",
                         [pytest.param(*c, marks=() if c[:2] in SUITE else pytest.mark.slow) for c in CASES],
                         ids=[f"{c[0]}-{c[1].split()[0]}" for c in CASES])
def test_check_apply_verify_without_layer_types(bases, tmp_path, monkeypatch, variant, plan, exactness, types_after,
                                                summary):
    monkeypatch.setenv("SCALER_WIZARD_CACHE", str(tmp_path / "cache"))
    mt, keys = VARIANTS[variant]
    model = _without_layer_types(bases[mt], tmp_path / "in", **keys)
    first = api.check(plan, str(model))  # traces
    rp = api.check(plan, str(model))  # from the IR cache: the same answer
    assert rp.exactness == first.exactness == exactness
    assert rp.config_after == first.config_after
    assert all(v for v in _layered(rp.ir).values())
    res = api.apply(rp, out=str(tmp_path / "out"))
    ver = res["verification"]
    assert res["landed"], ver
    if exactness == "exact":
        assert ver["passed"] and ver["max_rel"] <= RTOL, ver
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg.get("layer_types") == types_after
    for k, v in summary.items():
        assert cfg[k] == v, (k, cfg[k])


# ---------------------------------------------------------------------- conform's verdict cache
def test_conform_verdict_is_keyed_by_the_tensors(bases, tmp_path, monkeypatch):
    """A verdict cached for one IR's tensors must not pass a plan whose IR predicts others (the IR
    that lost its layer tensors got `exact` from the verdict of the sound IR's check)."""
    from scaler_wizard.compiler.conform import conform

    monkeypatch.setenv("SCALER_WIZARD_CACHE", str(tmp_path / "cache"))
    model = _without_layer_types(bases["gemma3_text"], tmp_path / "in", sliding_window_pattern=2)
    rp = api.check("widen hidden x2 tile", str(model))  # conforms, verdict cached (exact and per structure)
    conform(rp)
    broken = replace(rp, ir=replace(rp.ir, tensors=tuple(t for t in rp.ir.tensors if t.layers is None)))
    with pytest.raises(PlanError) as e:
        conform(broken)
    assert e.value.diagnostics[0].code == "SW316" and "model.layers.0." in e.value.diagnostics[0].message
