"""Checkpoints saved from a headless base class (issue 7 §6): LlamaModel / BertModel store the base
model's tensors without the `model.` / `bert.` prefix and no head. The compiler discovers the stored
class (config `architectures` + stored names), grows what is there and writes the same class."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from families import FAMILIES
from scaler_wizard import api
from scaler_wizard.diagnostics import UsageError


def _save_base(fam, d):
    import torch
    from transformers import AutoModel

    torch.manual_seed(0)
    m = AutoModel.from_config(FAMILIES[fam](), dtype=torch.float32)
    with torch.no_grad():  # norms and biases away from their init so that a dropped one would show
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    m.save_pretrained(d)
    return m


def _names(d):
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    for fam in ("llama", "bert"):
        _save_base(fam, root / fam)
    return root


@pytest.mark.parametrize("plan,cls", [("widen hidden x2", "LlamaModel"), ("insert layer 1 identity", "LlamaModel"),
                                      ("widen ffn x2 net2net\nwiden heads x2", "LlamaModel"),
                                      ("upcycle ffn experts 3 top 2", "MixtralModel")])
def test_base_llama_grows_as_llamamodel(bases, tmp_path, plan, cls):
    import torch
    from transformers import AutoModel

    out = tmp_path / "out"
    res = api.apply(plan, str(bases / "llama"), out=str(out))
    ver = res["verification"]
    assert res["exactness"] == "exact" and ver["passed"] and ver["judged"], ver
    assert {"random_ids", "padding_left", "kv_cache_vs_original"} <= {c["name"] for c in ver["checks"]}
    assert any("last hidden states" in n for n in ver["notes"])
    assert json.loads((out / "config.json").read_text())["architectures"] == [cls]
    names = _names(out)
    assert "embed_tokens.weight" in names and not any(n.startswith("model.") or "lm_head" in n for n in names)
    m, info = AutoModel.from_pretrained(str(out), dtype=torch.float32, output_loading_info=True)
    assert type(m).__name__ == cls and not any(info[k] for k in ("missing_keys", "unexpected_keys"))
    from test_disk_names import headers, reference

    assert headers(out) == reference(out, tmp_path / "ref")  # what save_pretrained of the stored class writes
    # the hidden states themselves, compared here as well as by verify
    o = AutoModel.from_pretrained(str(bases / "llama"), dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        h, h2 = o(input_ids=ids).last_hidden_state, m.eval()(input_ids=ids).last_hidden_state
    assert (h2[..., :64] - h).abs().max() <= 1e-5 * h.abs().max()


def test_base_bert_depth_plan_and_pooler(bases, tmp_path):
    import torch
    from transformers import AutoModel

    out = tmp_path / "out"
    res = api.apply("duplicate layers 0..1", str(bases / "bert"), out=str(out))
    ver = res["verification"]
    assert res["exactness"] == "approx" and ver["passed"] and not ver["judged"]
    assert 0 < ver["max_rel"] < 10  # the copied Post-LN layer changes the hidden states: drift measured
    assert "token_type_ids" in {c["name"] for c in ver["checks"]}
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertModel"]
    m, info = AutoModel.from_pretrained(str(out), dtype=torch.float32, output_loading_info=True)
    assert type(m).__name__ == "BertModel" and not any(info[k] for k in ("missing_keys", "unexpected_keys"))
    o = AutoModel.from_pretrained(str(bases / "bert"), dtype=torch.float32)
    assert torch.equal(m.pooler.dense.weight, o.pooler.dense.weight)  # copied through, not re-initialised
    assert m.config.num_hidden_layers == 3


def test_base_bert_width_refused_naming_the_pooler(bases, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="pooler.dense"):
        api.apply("widen hidden x2", str(bases / "bert"), out=str(out))
    assert not out.exists()


def test_head_class_stored_without_its_prefix(tmp_path):
    """The hub's gpt2 stores GPT2LMHeadModel as `h.0.attn...`, `wte.weight` (no `transformer.`, the
    head tied to wte): the reader adds the prefix as transformers does on load, the tie resolves, and
    the output is written as save_pretrained names it."""
    from safetensors.torch import load_file, save_file

    from families import build_model
    from test_disk_names import headers, reference

    _, m = build_model("gpt2")
    src = tmp_path / "in"
    m.save_pretrained(src)
    sd = load_file(str(src / "model.safetensors"))
    save_file({k.removeprefix("transformer."): v for k, v in sd.items()}, str(src / "model.safetensors"),
              metadata={"format": "pt"})
    assert "wte.weight" in _names(src)
    out = tmp_path / "out"
    res = api.apply("widen hidden x2\ninsert layer 1 identity", str(src), out=str(out))
    assert res["exactness"] == "exact" and res["verification"]["passed"], res["verification"]
    assert headers(out) == reference(out, tmp_path / "ref")
    assert "transformer.wte.weight" in _names(out)
