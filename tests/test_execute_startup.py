"""Start-up of programs that only move bytes (issue 11): a depth plan applied with --no-verify,
once the model's structure and class facts are cached, imports neither torch nor transformers, and
writes exactly what the path that computes every fact writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from scaler_wizard import api
from tests.families import FAMILIES

ROOT = Path(__file__).resolve().parents[1]


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.mark.parametrize("family", ["qwen2"])  # tied embeddings: the ties fact is used too
def test_cached_depth_apply_is_torch_free(family, tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES[family](), dtype=torch.bfloat16)
    src = tmp_path / "in"
    model.save_pretrained(src)
    plan = tmp_path / "d.expand"
    plan.write_text("duplicate layers 0..2\n")
    # in this process (torch imported anyway): traces the structure and computes every fact
    first = api.apply(str(plan), str(src), out=str(tmp_path / "o1"), verify=False)
    assert first["report"].byte_copies == first["report"].n_outputs  # every output a byte copy
    code = ("import sys, runpy\n"
            f"sys.argv = ['scaler-wizard', 'apply', {str(plan)!r}, '--model', {str(src)!r}, '-o', "
            f"{str(tmp_path / 'o2')!r}, '--no-verify', '--format', 'json']\n"
            "try:\n    runpy.run_module('scaler_wizard', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
            "assert not heavy, f'imported {heavy}'\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["landed"]
    a, b = _files(tmp_path / "o1"), _files(tmp_path / "o2")
    assert a.keys() == b.keys() and "model.safetensors" in a
    for name in a:
        if name == "README.md":  # the card names the output path
            continue
        assert a[name] == b[name], name  # byte for byte: weights, config, growth record (groups sorted)


def test_fact_cache_is_keyed_by_transformers_version_and_survives_corruption(tmp_path, monkeypatch):
    import scaler_wizard.ir as I
    from scaler_wizard.runtime.io import facts

    monkeypatch.setenv("SCALER_WIZARD_CACHE", str(tmp_path))
    calls = []

    def compute():
        calls.append(1)
        return [len(calls)]

    assert facts.cached_fact("t", ["x"], compute) == [1]
    assert facts.cached_fact("t", ["x"], compute) == [1] and len(calls) == 1  # from the cache
    assert facts.cached_fact("t", ["y"], compute) == [2]  # other inputs: another entry
    monkeypatch.setattr(I, "_transformers_version", lambda: "0.0-other")
    assert facts.cached_fact("t", ["x"], compute) == [3]  # another transformers: computed again
    monkeypatch.undo()
    monkeypatch.setenv("SCALER_WIZARD_CACHE", str(tmp_path))
    for p in (tmp_path / "ir" / "facts").glob("*.json"):
        p.write_text("{not json")
    assert facts.cached_fact("t", ["x"], compute) == [4]  # a corrupt entry is recomputed
    assert facts.cached_fact("t", ["x"], compute) == [4]
    # a well-formed entry of the wrong type (edited by hand) is rejected by the caller's validator
    import json
    for p in (tmp_path / "ir" / "facts").glob("*.json"):
        if p.read_text().startswith("{\""):  # the entry rewritten above (the others stay corrupt)
            p.write_text(json.dumps({**json.loads(p.read_text()), "value": 5}))
    assert facts.cached_fact("t", ["x"], compute, lambda v: isinstance(v, list)) == [5]
    monkeypatch.setenv("SCALER_WIZARD_NO_FACT_CACHE", "1")
    assert facts.cached_fact("t", ["x"], compute) == [6]


@pytest.mark.parametrize("family", ["gpt_neox", "mixtral", "qwen2", "llama"])
def test_cached_facts_equal_computed_ones(family, tmp_path, monkeypatch):
    """The cached facts (conversion table non-empty, class names and prefix, ties, save_pretrained
    names) equal what transformers computes, for families with and without renamed / merged weights."""
    from scaler_wizard.runtime.io.conversion import has_conversions
    from scaler_wizard.runtime.io.ties import tied_pairs
    from scaler_wizard.runtime.naming import _class_facts, saves_memory_names

    cfg = FAMILIES[family]().to_dict()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cfg["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[cfg["model_type"]]]  # as save_pretrained writes

    def facts():
        arch = (cfg.get("architectures") or [None])[0]
        return (has_conversions(arch, cfg["model_type"]), _class_facts(cfg), tied_pairs(cfg), saves_memory_names(cfg))

    monkeypatch.setenv("SCALER_WIZARD_CACHE", str(tmp_path))
    stored = facts()
    again = facts()  # from the cache
    monkeypatch.setenv("SCALER_WIZARD_NO_FACT_CACHE", "1")
    assert stored == again == facts()
    if family in ("gpt_neox", "mixtral"):  # embed_out / per-expert tensors on disk
        assert stored[0] and not stored[3]
    if family == "llama":
        assert not stored[0] and stored[3]
