"""Outputs are files other tools read (issue 7 §5): for every family and op kind the grown checkpoint
holds exactly the tensor names and shapes that transformers' own `save_pretrained` writes for the
output class (per-expert MoE tensors, GPT-NeoX `embed_out`), and it loads with no missing or
unexpected keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from families import FAMILIES, build_model
from scaler_wizard import api
from scaler_wizard.runtime.checkpoint import read_safetensors_header

PLANS = {  # widen + depth per family (Post-LN: copied layers, the only depth op it has)
    fam: "widen hidden x2\ninsert layer 1 identity" for fam in FAMILIES
}
PLANS["bert"] = "widen hidden x2\nduplicate layers 0..1"
PLANS["opt_postln"] = "widen hidden x2 untie=true\nduplicate layers 0..1"
CASES = sorted(PLANS.items()) + [(f, "upcycle ffn experts 3 top 2") for f in ("llama", "mistral", "qwen3")]


def headers(d: Path) -> dict[str, tuple[int, ...]]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        infos, _ = read_safetensors_header(f)
        out.update({n: tuple(i.shape) for n, i in infos.items()})
    return out


def reference(out: Path, tmp: Path) -> dict[str, tuple[int, ...]]:
    """What save_pretrained writes for a model of the output config (random weights, CPU)."""
    import torch
    from transformers import AutoConfig

    from scaler_wizard.runtime.verify import model_class_for

    cfg = AutoConfig.from_pretrained(str(out))
    torch.manual_seed(0)
    cls = model_class_for(out)
    model = cls.from_config(cfg) if hasattr(cls, "from_config") and cls.__name__.startswith("Auto") else cls(cfg)
    model.save_pretrained(str(tmp))
    return headers(tmp)


@pytest.mark.parametrize("fam,plan", CASES, ids=[f"{f}-{p.split()[0]}" for f, p in CASES])
def test_output_names_and_shapes_are_save_pretrained_s(tmp_path, fam, plan):
    import torch

    from scaler_wizard.runtime.verify import model_class_for

    _, m = build_model(fam)
    src = tmp_path / "in"
    m.save_pretrained(src)
    out = tmp_path / "out"
    api.apply(plan, str(src), out=str(out), verify=False)
    got, want = headers(out), reference(out, tmp_path / "ref")
    assert set(got) == set(want), (sorted(set(got) - set(want))[:6], sorted(set(want) - set(got))[:6])
    assert got == want
    index = out / "model.safetensors.index.json"
    if index.is_file():
        assert set(json.loads(index.read_text())["weight_map"]) == set(got)
    _, info = model_class_for(out).from_pretrained(str(out), dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
