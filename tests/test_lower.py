"""Lowering + apply end to end on tiny models: every exact plan preserves fp32 logits (padding +
KV cache), approx plans report drift, outputs load with no missing / unexpected keys, same plan +
seed gives byte-identical safetensors, refusals come from the type checker."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from families import build_model

from scaler_wizard import api
from scaler_wizard.diagnostics import PlanError, UsageError

RTOL = 1e-5

LLAMA_EXACT = [
    "widen hidden x2",
    "widen hidden to 96 lemon",
    "widen ffn x2 net2net",
    "widen ffn to 130 zero",
    "widen ffn to 150 lemon split=equal",
    "widen heads x2 dup",
    "widen heads to 8 zero",
    "widen kv_heads x2",
    "widen head_dim x2",
    "insert layers every 1 identity",
    "insert 2 layers after 0 zero",
    "insert layer 1 cancel",
    "upcycle ffn experts 4 top 2",
    "widen hidden x2\nwiden ffn x2 net2net\nwiden heads x2\ninsert layers every 2 identity",
]
LLAMA_APPROX = ["duplicate layers 0..2", "stack x2"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lower")
    out = {}
    for fam in ("llama", "qwen2", "gemma", "phi3", "gpt2", "mixtral", "bert", "opt", "mistral", "qwen3", "gemma2",
                "gpt_neox", "opt_postln"):
        _, m = build_model(fam)
        d = root / fam
        m.save_pretrained(d)
        out[fam] = d
    return out


def _apply(plan, model_dir, out, **kw):
    return api.apply(plan, str(model_dir), out=str(out), progress=False, **kw)


def _load_clean(out):
    import torch

    from scaler_wizard.runtime.verify import model_class_for

    # the model's own class for an encoder (BertForMaskedLM), AutoModelForCausalLM otherwise
    m, info = model_class_for(out).from_pretrained(str(out), dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not bad, bad
    return m


@pytest.mark.parametrize("plan", LLAMA_EXACT)
def test_llama_exact(models, tmp_path, plan):
    res = _apply(plan, models["llama"], tmp_path / "out")
    assert res["exactness"] == "exact"
    ver = res["verification"]
    assert ver["passed"], ver
    assert ver["max_rel"] <= RTOL
    names = {c["name"] for c in ver["checks"]}
    assert {"padding_left", "padding_right", "kv_cache_vs_original"} <= names
    m = _load_clean(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert m.config.num_hidden_layers == cfg["num_hidden_layers"]
    side = json.loads((tmp_path / "out" / "scaler_wizard_growth.json").read_text())
    assert side["format"] == 1 and side["plan"].strip() == plan.strip()
    assert set(side["tensors"]) == set(dict(m.named_parameters())) - {"lm_head.weight"} | (
        {"lm_head.weight"} if "lm_head.weight" in side["tensors"] else set())
    assert "kv_cache_vs_original" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize("plan", LLAMA_APPROX)
def test_llama_approx_reports_drift(models, tmp_path, plan):
    res = _apply(plan, models["llama"], tmp_path / "out")
    assert res["exactness"] == "approx"
    ver = res["verification"]
    assert ver["judged"] is False and ver["passed"]
    assert ver["max_rel"] > 1e-4  # a copied layer really changes the function
    _load_clean(tmp_path / "out")


@pytest.mark.parametrize("fam,plan", [
    ("qwen2", "widen hidden x2"),  # tied embeddings: final norm carries the shares
    ("qwen2", "widen hidden x2 untie=true"),
    ("qwen2", "widen ffn x2 net2net\ninsert layers every 1 identity"),
    ("gemma", "widen hidden x2"),  # (1+w) norms, sqrt(hidden) embedding scale, tied head
    ("gemma", "widen hidden to 96 lemon"),
    ("phi3", "widen hidden x2\nwiden ffn x2 net2net"),  # fused qkv_proj / gate_up_proj
    ("phi3", "widen ffn to 150 zero\ninsert 1 layers after 0 zero"),
    ("gpt2", "widen hidden x2\ninsert layers every 1 identity"),  # Conv1D, c_attn [q|k|v], LayerNorm
    ("gpt2", "widen ffn x2"),  # ffn = 4 * n_embd unless n_inner is set: the plan sets it
    ("gpt2", "widen hidden to 96 lemon"),  # LayerNorm average residue; implied heads 4 -> 6
    ("phi3", "widen kv_heads x2"),
    # cancel layers on fused projections: phi3's qkv_proj holds heads and KV heads, and both are
    # paired (pairing only the heads left 0.6 relative drift, found by test_growth_property)
    ("phi3", "insert layer 1 cancel"),
    ("gpt_neox", "insert layer 1 cancel"),
    ("gpt2", "insert layer 1 cancel"),
    ("mistral", "widen hidden x2\nwiden kv_heads x2"),
    ("gemma2", "widen hidden x2\ninsert layer 1 identity"),  # sandwich norms, softcapping, sliding window
    ("gpt_neox", "widen hidden x2\nwiden ffn x2 net2net\ninsert layers every 1 identity"),  # [heads,3,hd]
    ("opt_postln", "widen hidden x2 untie=true"),  # Post-LN, tied head without a final norm
    ("qwen3", "widen hidden to 96 lemon"),  # exact-eps: rms_norm_eps also serves q/k norms
    ("qwen3", "widen head_dim x2"),  # q/k norms over head_dim: new q/k dims copies, q_norm new gains 0
])
def test_other_families_exact(models, tmp_path, fam, plan):
    res = _apply(plan, models[fam], tmp_path / "out")
    ver = res["verification"]
    assert ver["exactness"] in ("exact", "exact-eps")
    assert ver["passed"], ver
    _load_clean(tmp_path / "out")


def _digest(d: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(d.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def test_deterministic_and_seed(models, tmp_path):
    plan = "widen ffn x2 net2net\ninsert 1 layers after 0 zero"
    a = _apply(plan, models["llama"], tmp_path / "a", verify=False)
    b = _apply(plan, models["llama"], tmp_path / "b", verify=False)
    c = _apply(plan, models["llama"], tmp_path / "c", verify=False, seed=7)
    assert _digest(Path(a["out"])) == _digest(Path(b["out"]))
    assert _digest(Path(a["out"])) != _digest(Path(c["out"]))


def test_symmetry_broken_after_one_step(models, tmp_path):
    _apply("widen ffn x2 net2net", models["llama"], tmp_path / "out", verify=False)
    d = api.verify(tmp_path / "out", models["llama"])
    assert d["passed"]
    assert d["symmetry"]["passed"] is True


def test_refusals_and_overwrite(models, tmp_path):
    with pytest.raises(PlanError) as e:
        api.check("widen heads to 5", model=str(models["llama"]))
    assert any(d.code == "SW304" for d in e.value.diagnostics)
    with pytest.raises(PlanError) as e:
        api.check("widen hidden x1.5 tile", model=str(models["llama"]))
    assert any(d.code == "SW303" for d in e.value.diagnostics)
    out = tmp_path / "o"
    _apply("widen ffn x2", models["llama"], out, verify=False)
    with pytest.raises(UsageError):
        _apply("widen ffn x2", models["llama"], out, verify=False)
    _apply("widen ffn x2", models["llama"], out, verify=False, force=True)


def test_program_shapes_match_prediction(models):
    from scaler_wizard.compiler.predict import predict_shapes

    rp = api.check("widen hidden to 96 lemon\nwiden ffn x2\ninsert layers every 1 identity", model=str(models["llama"]))
    prog = api.compile(rp)
    sizes = {"hidden": 96, "ffn": 192}
    pred = {p.name: p for p in predict_shapes(rp.ir, {**{k: g.size for k, g in rp.ir.groups.items()}, **sizes},
                                                rp.layer_map)}
    for name, o in prog.outputs.items():
        tmpl = ".".join("{i}" if part.isdigit() else part for part in name.split("."))
        if tmpl in pred:
            assert tuple(o.node.shape) == tuple(pred[tmpl].shape), name
    again = type(prog).from_json(prog.to_json())
    assert again.to_json() == prog.to_json()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "scaler_wizard", *args], capture_output=True, text=True, timeout=300)


def _main(capsys, *args):
    """The CLI in-process (same entry point as the console script, without a fresh interpreter)."""
    from scaler_wizard.cli import main

    rc = main(list(args))
    cap = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, cap.out, cap.err)


def test_cli(models, tmp_path, capsys):
    plan = tmp_path / "p.expand"
    plan.write_text("widen ffn x2 net2net\ninsert layers every 1 identity\n")
    out = tmp_path / "out"
    r = _cli("apply", str(plan), "--model", str(models["llama"]), "-o", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    r = _main(capsys, "apply", str(plan), "--model", str(models["llama"]), "-o", str(out), "--no-progress")
    assert r.returncode == 2 and "already exists" in r.stderr
    r = _cli("verify", str(out), "--against", str(models["llama"]), "--format", "json", "--no-symmetry")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["passed"] is True
    r = _main(capsys, "explain", str(plan), "--model", str(models["llama"]))
    assert r.returncode == 0 and "identity" in r.stdout
    r = _main(capsys, "compile", str(plan), "--model", str(models["llama"]), "-o", str(tmp_path / "prog.json"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "prog.json").read_text())["format"] == "scaler-wizard/tensor-program"
    bad = tmp_path / "bad.expand"
    bad.write_text("widen fnn x2\n")
    r = _main(capsys, "apply", str(bad), "--model", str(models["llama"]), "-o", str(tmp_path / "x"))
    assert r.returncode == 1 and "SW201" in r.stderr and not (tmp_path / "x").exists()
    r = _main(capsys, "apply", str(plan), "--model", str(tmp_path / "nope"), "-o", str(tmp_path / "y"))
    assert r.returncode in (1, 2) and "Traceback" not in r.stderr


# ---------------------------------------------------------------- legacy MoE checkpoints, BERT, OPT


@pytest.mark.parametrize("plan", [
    "widen hidden x2",
    "widen hidden to 96 lemon",
    "widen ffn x2 net2net",  # the experts' FFN
    "insert layers every 1 identity",
])
def test_mixtral_legacy_checkpoint_exact(models, tmp_path, plan):
    """transformers saves Mixtral per expert (block_sparse_moe.experts.E.w1/w2/w3); the reader's
    virtual tensors give the stacked in-memory names the program reads."""
    from scaler_wizard.runtime.checkpoint import open_checkpoint

    assert open_checkpoint(models["mixtral"]).virtual  # the input really is in the legacy layout
    res = _apply(plan, models["mixtral"], tmp_path / "out")
    ver = res["verification"]
    assert res["exactness"] == "exact" and ver["passed"], ver
    assert ver["max_rel"] <= RTOL
    assert "kv_cache_vs_original" in {c["name"] for c in ver["checks"]}
    _load_clean(tmp_path / "out")


def test_mixtral_widen_experts_copy(models, tmp_path):
    res = _apply("widen experts to 8", models["mixtral"], tmp_path / "out")
    ver = res["verification"]
    assert res["exactness"] == "approx" and ver["judged"] is False
    assert ver["max_rel"] > 1e-4  # the routing really changes
    m = _load_clean(tmp_path / "out")
    assert m.config.num_local_experts == 8
    assert tuple(m.model.layers[0].mlp.experts.gate_up_proj.shape) == (8, 192, 64)
    # the five old experts and their router rows are kept in place
    orig = _load_clean(models["mixtral"])
    import torch

    for a, b in ((m.model.layers[1].mlp.experts.down_proj, orig.model.layers[1].mlp.experts.down_proj),
                 (m.model.layers[1].mlp.gate.weight, orig.model.layers[1].mlp.gate.weight)):
        assert torch.equal(a[:5], b)
    new_rows = m.model.layers[1].mlp.gate.weight[5:]
    assert all(any(torch.equal(r, o) for o in orig.model.layers[1].mlp.gate.weight) for r in new_rows)


def test_qwen3_moe_legacy_checkpoint(tmp_path):
    """Qwen3-MoE is saved per expert too (mlp.experts.E.gate_proj/up_proj/down_proj)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen3_moe", hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                               vocab_size=128, max_position_embeddings=32, num_key_value_heads=2, head_dim=16,
                               intermediate_size=96, moe_intermediate_size=48, num_experts=5, num_experts_per_tok=3,
                               norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                               tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(tmp_path / "in")
    res = _apply("widen hidden x2\ninsert layers every 1 identity", tmp_path / "in", tmp_path / "out")
    assert res["exactness"] == "exact" and res["verification"]["passed"], res["verification"]
    assert res["verification"]["max_rel"] <= RTOL
    _load_clean(tmp_path / "out")


@pytest.mark.parametrize("plan", ["widen hidden x2", "widen hidden x2\nwiden ffn x2 net2net"])
def test_bert_masked_lm_exact(models, tmp_path, plan):
    """BERT (Post-LN, embedding LayerNorm, token-type and position embeddings, tied decoder +
    cls.predictions.bias) is verified through BertForMaskedLM's MLM logits; the KV-cache checks do
    not apply to a bidirectional encoder and are skipped with a note."""
    res = _apply(plan, models["bert"], tmp_path / "out")
    ver = res["verification"]
    assert res["exactness"] == "exact" and ver["passed"], ver
    assert ver["max_rel"] <= RTOL
    names = {c["name"] for c in ver["checks"]}
    assert {"random_ids", "padding_left", "padding_right", "token_type_ids"} <= names
    assert not any(n.startswith("kv_cache") for n in names)
    assert any("KV-cache checks skipped" in n and "BertForMaskedLM" in n for n in ver["notes"])
    m = _load_clean(tmp_path / "out")
    assert type(m).__name__ == "BertForMaskedLM" and m.config.hidden_size == 128


def test_bert_untie_writes_every_declared_tie(models, tmp_path):
    """``untie=true`` writes tie_word_embeddings=false, and transformers then ties none of BERT's
    declared ties: the MLM decoder's bias is written on its own (a copy of cls.predictions.bias),
    besides the untied decoder weight (before: SW316, the grown config's model has a tensor the
    program did not write)."""
    res = _apply("widen hidden x2 lemon untie=true", models["bert"], tmp_path / "out")
    assert res["exactness"] == "exact" and res["verification"]["passed"], res["verification"]
    m = _load_clean(tmp_path / "out")
    assert not m.config.tie_word_embeddings
    head = m.cls.predictions
    assert head.decoder.bias.data_ptr() != head.bias.data_ptr()
    assert torch.equal(head.decoder.bias, head.bias)
    assert head.decoder.weight.data_ptr() != m.bert.embeddings.word_embeddings.weight.data_ptr()


@pytest.mark.parametrize("plan", [
    "widen hidden to 96 lemon",
    "widen hidden to 96 lemon untie=true",
    "widen hidden to 80 lemon\nwiden ffn x2\ninsert layers every 1 identity",
])
def test_opt_lemon_fixed_epsilon(models, tmp_path, plan):
    """OPT's LayerNorm epsilon is not a config value, so LEMON cannot rescale it; the stream is
    scaled by 1/eta instead (before the fix: max_rel 2e-3)."""
    res = _apply(plan, models["opt"], tmp_path / "out")
    ver = res["verification"]
    assert res["exactness"] == "exact" and ver["passed"], ver
    assert ver["max_rel"] <= RTOL
    assert any("fixed epsilon" in n for n in res["program"].metadata["notes"])
    _load_clean(tmp_path / "out")


@pytest.mark.parametrize("fam", ["llama", "qwen2", "gpt2"])  # untied head; tied head; tied Conv1D family
def test_widen_vocab_appends_mean_rows(models, tmp_path, fam):
    import torch

    res = _apply("widen vocab by 32", models[fam], tmp_path / "out")
    ver = res["verification"]
    assert res["exactness"] == "approx" and ver["judged"] is False
    # The old tokens' logits are unchanged (verify compares the old vocabulary's slice); what is
    # approximate is the softmax, which now also sums over the new rows.
    assert ver["max_rel"] <= RTOL
    grown, orig = _load_clean(tmp_path / "out"), _load_clean(models[fam])
    e_new, e_old = grown.get_input_embeddings().weight, orig.get_input_embeddings().weight
    v = e_old.shape[0]
    assert e_new.shape[0] == v + 32 and grown.config.vocab_size == v + 32
    assert torch.equal(e_new[:v], e_old)  # old rows kept exactly
    assert torch.allclose(e_new[v:], e_old.mean(0, keepdim=True).expand(32, -1), atol=1e-6)
    h_new, h_old = grown.get_output_embeddings().weight, orig.get_output_embeddings().weight
    assert torch.allclose(h_new[v:], h_old.mean(0, keepdim=True).expand(32, -1), atol=1e-6)


def test_plan_wide_noise_reaches_upcycle_and_identity_layers(models, tmp_path):
    """issue 7 §4: examples/moe-upcycle.expand's plan-wide `noise` used to leave identical experts
    (reported exact). Now the experts differ, the op is approx and its drift is measured; on
    identity layers the same noise perturbs only the copied fan-in (still exact)."""
    import torch

    res = _apply("upcycle ffn experts 4 top 2\nnoise 0.001", models["llama"], tmp_path / "moe")
    assert res["exactness"] == "approx"
    ver = res["verification"]
    assert ver["judged"] is False and ver["passed"]
    assert 0 < ver["max_rel"] < 0.05, ver["max_rel"]  # small, measured, not zero
    m = _load_clean(tmp_path / "moe")
    gu = m.model.layers[0].mlp.experts.gate_up_proj.detach()
    assert not torch.equal(gu[0], gu[1])
    assert (gu[0] - gu[1]).abs().max() < 0.02  # copies plus noise of std 0.001

    res = _apply("noise 0.01\ninsert layer 1 identity", models["llama"], tmp_path / "id")
    assert res["exactness"] == "exact" and res["verification"]["passed"]
    m = _load_clean(tmp_path / "id")
    q0, q1 = m.model.layers[0].self_attn.q_proj.weight, m.model.layers[1].self_attn.q_proj.weight
    assert not torch.equal(q0, q1) and (q0 - q1).abs().max() < 0.1
    assert torch.count_nonzero(m.model.layers[1].mlp.down_proj.weight) == 0
