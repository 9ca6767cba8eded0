"""Upcycle targets: every dense -> MoE pair of the one table (compiler/methods/upcycle_targets.py)
upcycles exactly, measured in fp32 logits (padding and KV cache included) through `apply`; the
schema matches transformers' classes (this test fails when they change); Drop-Upcycling is approx
with measured drift; refused families name the nearest supported target."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from families import FAMILIES  # noqa: E402
from scaler_wizard import api  # noqa: E402
from scaler_wizard.compiler.methods.upcycle_targets import REFUSED, UPCYCLE_TARGETS  # noqa: E402
from scaler_wizard.diagnostics import PlanError  # noqa: E402


def _config(model_type: str):
    from transformers import AutoConfig

    if model_type in FAMILIES:
        return FAMILIES[model_type]()
    common = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                  vocab_size=128, max_position_embeddings=32, intermediate_size=96, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    extra = {"granite": dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2,
                             logits_scaling=4.0)}.get(model_type, {})
    return AutoConfig.for_model(model_type, **common, **extra)


@pytest.fixture(scope="module")
def dense_dirs(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("dense")
    out = {}
    for mt in sorted(UPCYCLE_TARGETS) + sorted(k for k in REFUSED if k in ("phi3",)):
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(_config(mt), dtype=torch.float32)
        m.save_pretrained(root / mt)
        out[mt] = root / mt
    return out


@pytest.mark.parametrize("dense", sorted(UPCYCLE_TARGETS))
def test_target_schema_matches_transformers(dense):
    """The tensor names and config keys of each target exist in transformers' class (fails when they change)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    t = UPCYCLE_TARGETS[dense]
    d = _config(dense).to_dict()
    patch = t.config_patch(4, 2, 96)
    d.update(patch)
    d = {k: v for k, v in d.items() if k not in ("transformers_version",)}
    cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    assert type(cfg).model_type == t.model_type
    for key, value in patch.items():
        assert getattr(cfg, key, None) == value, f"{t.model_type} config does not read `{key}`"
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    assert type(m).__name__ == t.architecture
    sd = m.state_dict()
    H = cfg.hidden_size
    want = {"gate_up": (4, 192, H), "down": (4, H, 96), "router": (4, H), "shared_gate": (96, H),
            "shared_up": (96, H), "shared_down": (H, 96), "shared_gate_w": (1, H)}
    for layer in range(cfg.num_hidden_layers):
        for part, name in t.names("model.layers", layer).items():
            assert name in sd, f"{t.model_type}: no tensor {name}"
            assert tuple(sd[name].shape) == want[part], (name, tuple(sd[name].shape))


@pytest.mark.slow  # one apply + verification per pair
@pytest.mark.parametrize("dense", sorted(UPCYCLE_TARGETS))
def test_upcycle_pair_is_exact(dense, dense_dirs, tmp_path):
    res = api.apply("upcycle ffn experts 4 top 2", str(dense_dirs[dense]), out=str(tmp_path / "moe"), progress=False)
    assert res["exactness"] == "exact"
    ver = res["verification"]
    assert ver["passed"] and ver["max_rel"] <= 1e-5, ver
    names = {c["name"] for c in ver["checks"]}
    assert {"padding_left", "kv_cache_vs_original"} <= names
    import json

    cfg = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert cfg["model_type"] == UPCYCLE_TARGETS[dense].model_type


@pytest.mark.slow
def test_qwen2_keeps_biases_and_tied_head(dense_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    api.apply("upcycle ffn experts 3 top 1", str(dense_dirs["qwen2"]), out=str(tmp_path / "moe"), progress=False)
    m = AutoModelForCausalLM.from_pretrained(str(tmp_path / "moe"), dtype=torch.float32)
    d = AutoModelForCausalLM.from_pretrained(str(dense_dirs["qwen2"]), dtype=torch.float32)
    assert m.config.tie_word_embeddings and m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    assert torch.equal(m.model.layers[0].self_attn.q_proj.bias, d.model.layers[0].self_attn.q_proj.bias)
    assert torch.count_nonzero(m.model.layers[0].mlp.shared_expert.down_proj.weight) == 0


@pytest.mark.slow
def test_drop_upcycling_is_approx_and_drops_a_fraction(dense_dirs, tmp_path):
    res = api.apply("upcycle ffn experts 4 top 2 drop=0.5", str(dense_dirs["llama"]), out=str(tmp_path / "moe"),
                    progress=False)
    assert res["exactness"] == "approx"
    ver = res["verification"]
    assert ver["passed"] and ver["max_rel"] > 1e-4, ver  # measured drift, not zero
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(tmp_path / "moe"), dtype=torch.float32)
    d = AutoModelForCausalLM.from_pretrained(str(dense_dirs["llama"]), dtype=torch.float32)
    gate = d.model.layers[0].mlp.gate_proj.weight  # [F, H]
    gu = m.model.layers[0].mlp.experts.gate_up_proj  # [E, 2F, H]
    F = gate.shape[0]
    kept = [(gu[e, :F] == gate).all(1) for e in range(4)]
    for k in kept:
        assert int(k.sum()) == F - round(0.5 * F)
    assert not torch.equal(kept[0], kept[1])  # a different subset per expert


@pytest.mark.parametrize("drop", ["0", "1.5", "true"])
def test_drop_out_of_range(dense_dirs, drop):
    with pytest.raises(PlanError) as e:
        api.check(f"upcycle ffn experts 4 top 2 drop={drop}", str(dense_dirs["llama"]))
    assert "SW207" in str(e.value.diagnostics[0].code) if hasattr(e.value, "diagnostics") else "SW207" in str(e.value)


def test_refused_family_names_the_nearest_target(dense_dirs):
    with pytest.raises(PlanError) as e:
        api.check("upcycle ffn experts 4 top 2", str(dense_dirs["phi3"]))
    text = str(e.value) + " ".join(str(getattr(d, "help", "")) for d in getattr(e.value, "diagnostics", []))
    assert "SW309" in text and "phimoe" in text and "qwen2 -> qwen2_moe" in text
