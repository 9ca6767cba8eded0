"""LoRA through peft: roles map to modules from the IR (gate/up told apart by a probe), original
tensors stay frozen under adapters while new ones train fully, the merged checkpoint and the peft
adapter give the same logits, resume continues bit for bit, and bad combinations are exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scaler_wizard.cli import main as cli
from scaler_wizard.runtime.growth_record import GrowthRecord, TensorGrowth
from scaler_wizard.runtime.recipe import TrainRecipe
from scaler_wizard.runtime.tiny import make_tiny_llama, write_corpus
from scaler_wizard.runtime.train import train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, corpus) -> Path:
    text = "".join(p.read_text() for p in sorted(corpus.iterdir()))
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", text, vocab_size=320, hidden=32, ffn=64)


@pytest.fixture(scope="module")
def grown(tiny, tmp_path_factory) -> Path:
    """The tiny model with layer 1 recorded as new (as `apply` writes after an insert)."""
    d = tmp_path_factory.mktemp("grown") / "model"
    shutil.copytree(tiny, d)
    names = load_file(str(d / "model.safetensors")).keys()
    GrowthRecord({n: TensorGrowth("new" if n.startswith("model.layers.1.") else "original") for n in names},
                 plan="insert layer 1").save(d)
    return d


def recipe(corpus, **kw) -> TrainRecipe:
    base = dict(data=[str(corpus)], steps=3, batch_size=4, seq_len=64, lr=1e-2, eval_blocks=4, seed=1, lora_r=4)
    base.update(kw)
    return TrainRecipe(**base)


def test_roles_come_from_the_ir_and_the_probe(tiny):
    from transformers import AutoModelForCausalLM

    from scaler_wizard.ir import model_ir_for
    from scaler_wizard.runtime.lora import plan_lora

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    ir = model_ir_for(str(tiny))
    lp = plan_lora(model, ir, TrainRecipe(lora_r=4), None)
    leaf = {r: {m.rsplit(".", 1)[1] for m in ms} for r, ms in lp.roles.items()}
    assert leaf == {"q": {"q_proj"}, "k": {"k_proj"}, "v": {"v_proj"}, "o": {"o_proj"},
                    "gate": {"gate_proj"}, "up": {"up_proj"}, "down": {"down_proj"}}
    assert len(lp.targets) == 7 * 2 and not lp.full
    only = plan_lora(model, ir, TrainRecipe(lora_r=4, lora_targets="up"), None)
    assert only.targets == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]


def test_adapter_reloads_in_peft_with_the_same_logits_and_new_tensors_train_fully(grown, corpus, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    res = train(grown, run, recipe(corpus, lora_merge=False), progress=False)
    assert res.status == "completed"
    head = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert head["params"]["adapter"] > 0 and head["params"]["frozen"] > 0
    assert (run / "final" / "adapter_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(grown, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, run / "final").eval()
    merged = AutoModelForCausalLM.from_pretrained(run / "checkpoint-3", dtype=torch.float32).eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding too
    with torch.no_grad():
        a = peft_model(input_ids=ids, attention_mask=mask).logits
        b = merged(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    before, after = load_file(str(grown / "model.safetensors")), load_file(str(run / "checkpoint-3" / "model.safetensors"))
    # original, not targeted: bit-identical; original targets: moved by a rank-4 delta; new: trained fully
    assert torch.equal(before["model.layers.0.input_layernorm.weight"], after["model.layers.0.input_layernorm.weight"])
    delta = after["model.layers.0.self_attn.q_proj.weight"] - before["model.layers.0.self_attn.q_proj.weight"]
    assert delta.abs().max() > 0 and torch.linalg.matrix_rank(delta) <= 4
    assert not torch.equal(before["model.layers.1.input_layernorm.weight"], after["model.layers.1.input_layernorm.weight"])
    new_delta = after["model.layers.1.self_attn.q_proj.weight"] - before["model.layers.1.self_attn.q_proj.weight"]
    assert torch.linalg.matrix_rank(new_delta) > 4  # full update, not low rank


@pytest.mark.slow
def test_resume_with_lora_is_bit_identical(tiny, corpus, tmp_path):
    straight = train(tiny, tmp_path / "a", recipe(corpus, steps=4), progress=False)
    train(tiny, tmp_path / "b", recipe(corpus, steps=4, save_every=2), stop_after=2, progress=False)
    resumed = train(tiny, tmp_path / "b", recipe(corpus, steps=4, save_every=2), resume=True, progress=False)
    assert straight.status == resumed.status == "completed"
    a = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_lora_options_are_exit_2(tiny, grown, corpus, tmp_path, capsys):
    base = ["train", str(grown), "--data", str(corpus), "-o", str(tmp_path / "r"), "--steps", "1", "--no-progress"]
    assert cli(base + ["--lora-r", "4", "--freeze-original"]) == 2
    assert "LoRA already keeps every original tensor frozen" in capsys.readouterr().err
    assert cli(base + ["--lora-r", "4", "--lora-targets", "q,wq"]) == 2
    assert "`lora_targets` must be a comma list" in capsys.readouterr().err
    assert cli(base + ["--lora-r", "-1"]) == 2
    assert "`lora_r` must be >= 0" in capsys.readouterr().err


@pytest.mark.slow
def test_distill_lora_tensorboard_under_two_process_ddp(grown, tiny, corpus, tmp_path):
    """Two CPU ranks (torchrun, gloo): distillation from the original, LoRA with the new layer trained
    fully, TensorBoard; both ranks end with the same weights (adapters included)."""
    import os
    import signal
    import subprocess
    import sys

    run = tmp_path / "ddp"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "scaler_wizard", "train", str(grown), "--data", str(corpus), "-o", str(run), "--steps", "3",
           "--batch-size", "2", "--seq-len", "32", "--eval-blocks", "2", "--lr", "1e-2", "--no-progress",
           "--dump-rank-weights", "--teacher", str(tiny), "--lora-r", "4", "--report-to", "tensorboard"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"no result in 600 s\n{out[-3000:]}{err[-6000:]}")
    assert proc.returncode == 0, out[-3000:] + err[-6000:]
    r0 = load_file(str(run / "rank-weights" / "rank0.safetensors"))
    r1 = load_file(str(run / "rank-weights" / "rank1.safetensors"))
    assert r0.keys() == r1.keys() and any(".lora_A." in k for k in r0)
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["world_size"] == 2 and all("distill_loss" in r for r in recs if r.get("event") is None)
    assert list((run / "tb").rglob("events.out.tfevents.*"))
    assert (run / "final" / "model.safetensors").is_file()
