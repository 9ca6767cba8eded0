"""Continuation training on a tiny seeded LLaMA, in this process: the loss falls, resume replays
the trajectory bit for bit, frozen tensors stay bit-identical, the breaker trips and rolls back,
and bad input is a clear exit 2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scaler_wizard.cli import main as cli
from scaler_wizard.runtime.growth_record import GrowthRecord, TensorGrowth
from scaler_wizard.runtime.recipe import TrainRecipe
from scaler_wizard.runtime.tiny import make_tiny_llama, shakespeare_texts
from scaler_wizard.runtime.train import EXIT_BREAKER, train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    files = shakespeare_texts()
    for f in files[:3]:
        (d / f.name).write_text(f.read_text(errors="replace")[:60_000])
    return d


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, corpus) -> Path:
    text = "".join(p.read_text() for p in sorted(corpus.iterdir()))
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", text, vocab_size=384)


def recipe(corpus, **kw) -> TrainRecipe:
    base = dict(data=[str(corpus)], steps=8, batch_size=4, seq_len=64, lr=2e-3, eval_blocks=8, seed=1)
    base.update(kw)
    return TrainRecipe(**base)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "model.safetensors"))


def test_loss_falls_and_run_dir_layout(tiny, corpus, tmp_path):
    run = tmp_path / "run"
    res = train(tiny, run, recipe(corpus, steps=24, warmup_steps=2, eval_every=8, save_every=12), progress=False)
    assert res.status == "completed" and res.exit_code == 0
    m = metrics(run)
    steps = [r for r in m if r.get("event") is None]
    assert [r["step"] for r in steps] == list(range(1, 25))
    assert all("loss" in r and "step" in r for r in m)
    first, last = steps[0]["loss"], sum(r["loss"] for r in steps[-4:]) / 4
    assert last < first - 0.5, (first, last)
    assert res.last_eval_ppl < res.baseline_ppl
    evals = [r["eval_ppl"] for r in m if "eval_ppl" in r]
    assert evals == sorted(evals, reverse=True)  # held-out perplexity improves at every eval
    assert steps[0]["lr"] == pytest.approx(1e-3)  # half of the peak in a 2-step warmup
    assert {p.name for p in run.iterdir()} >= {"metrics.jsonl", "loss.png", "checkpoint-12", "checkpoint-24",
                                               "final", "summary.json"}
    assert not list(run.glob(".tmp-*"))
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(run / "checkpoint-12").state_dict()  # a loadable HF dir
    assert torch.equal(loaded["model.norm.weight"], weights(run / "checkpoint-12")["model.norm.weight"])
    assert torch.equal(weights(run / "final")["model.norm.weight"], weights(run / "checkpoint-24")["model.norm.weight"])
    from scaler_wizard.diagnostics import UsageError

    with pytest.raises(UsageError, match="already holds checkpoints"):  # never mix two runs in one dir
        train(tiny, run, recipe(corpus), progress=False)


def test_resume_reproduces_trajectory_bit_for_bit(tiny, corpus, tmp_path):
    kw = dict(steps=8, grad_accum=2, save_every=4, eval_every=2, curriculum=[(32, 3)], warmup_steps=2,
              weight_decay=0.1)
    full = train(tiny, tmp_path / "a", recipe(corpus, **kw), progress=False)
    part = train(tiny, tmp_path / "b", recipe(corpus, **kw), stop_after=3, progress=False)
    assert part.status == "stopped" and (tmp_path / "b" / "checkpoint-3").is_dir()
    resumed = train(tiny, tmp_path / "b", recipe(corpus, **kw), resume=True, progress=False)
    assert full.status == resumed.status == "completed"

    def trajectory(run):
        return [(r["step"], r["loss"], r.get("lr"), r.get("seq_len")) for r in metrics(run)]

    def evals(run):  # scheduled evals (the interrupted run also evaluated the step-3 checkpoint)
        return {r["step"]: r["eval_loss"] for r in metrics(run) if "eval_loss" in r and r["step"] % 2 == 0}

    a, b = trajectory(tmp_path / "a"), trajectory(tmp_path / "b")
    assert a == b  # exact float equality, curriculum switch (32 -> 64) included
    assert evals(tmp_path / "a") == evals(tmp_path / "b") and len(evals(tmp_path / "a")) == 5
    assert [x[3] for x in a[1:]] == [32, 32, 32, 64, 64, 64, 64, 64]
    wa, wb = weights(tmp_path / "a" / "final"), weights(tmp_path / "b" / "final")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _record_layer1_new(model_dir: Path) -> GrowthRecord:
    """Pretend layer 1 was inserted and layer 0's up_proj grew from 64 to 128 rows."""
    names = weights(model_dir).keys()
    t = {}
    for n in names:
        if n.startswith("model.layers.1."):
            t[n] = TensorGrowth("new")
        elif n == "model.layers.0.mlp.up_proj.weight":
            t[n] = TensorGrowth("grown", ((0, 64), (0, 64)))
        elif n == "model.layers.0.mlp.down_proj.weight":
            t[n] = TensorGrowth("grown")  # rescaled by a widening: no slice kept its values, so it trains
        else:
            t[n] = TensorGrowth("original")
    rec = GrowthRecord(t, plan="insert layer 1", base_model="tiny")
    rec.save(model_dir)
    return rec


@pytest.fixture
def grown(tiny, tmp_path) -> Path:
    import shutil

    d = tmp_path / "grown"
    shutil.copytree(tiny, d)
    _record_layer1_new(d)
    return d


def test_freeze_original_keeps_original_tensors_bit_identical(grown, corpus, tmp_path):
    before = weights(grown)
    res = train(grown, tmp_path / "run", recipe(corpus, steps=5, lr=1e-2, weight_decay=0.5, freeze_original=True),
                progress=False)
    after = weights(tmp_path / "run" / "final")
    assert res.status == "completed"
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    up = "model.layers.0.mlp.up_proj.weight"
    down = "model.layers.0.mlp.down_proj.weight"
    assert down in changed
    for n in before:
        if n.startswith("model.layers.1."):
            assert n in changed, n  # new: trained
        elif n not in (up, down):
            assert n not in changed, n  # original: bit-identical
    assert torch.equal(before[up][:64, :64], after[up][:64, :64])  # the original region of a grown tensor
    assert not torch.equal(before[up][64:], after[up][64:])  # ... while the rest of it trains
    assert (tmp_path / "run" / "final" / "scaler_wizard_growth.json").is_file()  # travels with the weights
    params = metrics(tmp_path / "run")[0]["params"]
    assert params["frozen"] > 0 and params["trainable"] < params["original"] + params["new"] + params["grown"]


def test_new_lr_is_a_separate_group(grown, corpus, tmp_path):
    before = weights(grown)
    train(grown, tmp_path / "run", recipe(corpus, steps=3, new_lr=0.0, eval_fraction=0.05), progress=False)
    after = weights(tmp_path / "run" / "final")
    assert all(torch.equal(before[n], after[n]) for n in before if n.startswith("model.layers.1."))
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.weight"],
                           after["model.layers.0.self_attn.q_proj.weight"])


def test_breaker_trips_on_poisoned_lr_and_rolls_back(tiny, corpus, tmp_path, capsys):
    run = tmp_path / "run"
    code = cli(["train", str(tiny), "--data", str(corpus), "-o", str(run), "--steps", "12", "--batch-size", "4",
                "--seq-len", "64", "--lr", "3", "--max-grad-norm", "0", "--eval-every", "1", "--save-every", "2",
                "--breaker-patience", "2", "--eval-blocks", "4", "--no-progress"])
    assert code == EXIT_BREAKER == 3
    err = capsys.readouterr().err
    assert "breaker tripped" in err
    m = metrics(run)
    trip = [r for r in m if r.get("event") == "breaker_trip"]
    assert len(trip) == 1 and trip[0]["restored"] == "initial" and "consecutive" in trip[0]["reason"]
    assert trip[0]["step"] < 12 and trip[0]["eval_ppl"] > trip[0]["limit_ppl"]
    w0, wf = weights(tiny), weights(run / "final")
    assert all(torch.equal(w0[k], wf[k]) for k in w0)  # rolled back to the last good weights
    assert not list(run.glob("checkpoint-*"))  # bad checkpoints are set aside, not resumable
    assert json.loads((run / "summary.json").read_text())["status"] == "breaker"


def test_breaker_restores_last_good_checkpoint(tiny, corpus, tmp_path):
    # a sane first phase leaves good checkpoints; then a poisoned LR (via a resumed run whose
    # recipe differs) trips the breaker, which restores the newest good checkpoint
    run = tmp_path / "run"
    train(tiny, run, recipe(corpus, steps=10, save_every=2, eval_every=2), stop_after=4, progress=False)
    good = weights(run / "checkpoint-4")
    res = train(tiny, run, recipe(corpus, steps=10, save_every=2, eval_every=1, lr=3.0, max_grad_norm=0.0,
                                  breaker_patience=2), resume=True, progress=False)
    assert res.status == "breaker" and res.restored == "checkpoint-4"
    wf = weights(run / "final")
    assert all(torch.equal(good[k], wf[k]) for k in good)
    assert (run / "rejected-checkpoint-6").is_dir() or not list(run.glob("checkpoint-6"))


# --------------------------------------------------------------------------- CLI and recipe errors
def test_cli_bad_input_is_exit_2_without_traceback(tiny, corpus, tmp_path, capsys):
    assert cli(["train", str(tiny), "--data", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "r")]) == 2
    assert "missing.txt does not exist" in capsys.readouterr().err
    assert cli(["train", str(tmp_path), "--data", str(corpus), "-o", str(tmp_path / "r")]) == 2
    assert "not a Hugging Face model directory" in capsys.readouterr().err
    assert cli(["train", str(tiny), "--data", str(corpus), "-o", str(tmp_path / "r"), "--steps", "0"]) == 2
    assert "`steps` must be >= 1" in capsys.readouterr().err
    assert cli(["train", str(tiny), "--data", str(corpus), "-o", str(tmp_path / "r"), "--steps", "1",
                "--freeze-original"]) == 2
    assert "scaler_wizard_growth.json" in capsys.readouterr().err
    assert cli(["train", str(tiny), "--data", str(corpus), "-o", str(tmp_path / "r"), "--curriculum", "a:b"]) == 2
    assert "SEQ_LEN:UNTIL_STEP" in capsys.readouterr().err


def test_recipe_file_validation_and_cli_override(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('steps = 50\nlr = 1e-4\ncurriculum = "128:10,256:20"\nfreeze_original = true\n')
    r = TrainRecipe.from_file(p)
    assert (r.steps, r.lr, r.curriculum, r.freeze_original) == (50, 1e-4, [(128, 10), (256, 20)], True)
    assert [r.seq_len_at(s) for s in (1, 10, 11, 20, 21)] == [128, 128, 256, 256, 512]
    r.override(steps=7, lr=None)
    assert (r.steps, r.lr) == (7, 1e-4)
    from scaler_wizard.diagnostics import UsageError

    p.write_text("lrr = 1\n")
    with pytest.raises(UsageError, match=r"unknown key `lrr` \(did you mean `lr`\?\)"):
        TrainRecipe.from_file(p)
    with pytest.raises(UsageError, match="`batch_size` must be a int"):
        TrainRecipe.from_options({"batch_size": "eight"})
    j = tmp_path / "r.json"
    j.write_text(json.dumps({"train": {"steps": 3, "data": "a.txt,b.txt"}}))
    assert TrainRecipe.from_file(j).data == ["a.txt", "b.txt"]


def test_recipe_from_plan_options():
    from scaler_wizard.grammar.ast import Ident, Int, Number, Option

    opts = {o.key.name: o.value for o in (Option(Ident("steps"), Int(9)), Option(Ident("lr"), Number(5e-4)),
                                          Option(Ident("freeze_original"), Ident("true")))}
    r = TrainRecipe.from_options(opts)
    assert (r.steps, r.lr, r.freeze_original) == (9, 5e-4, True)


def test_emit_config_writes_launcher_files(tmp_path, capsys):
    for kind in ("ddp", "cpu-ddp", "zero1", "zero2", "zero3", "fsdp2"):
        assert cli(["train", "--emit-config", kind, "-o", str(tmp_path)]) == 0
    assert (tmp_path / "accelerate_zero3.yaml").is_file()
    ds = json.loads((tmp_path / "ds_zero3.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_micro_batch_size_per_gpu"] == "auto"
    assert 'mixed_precision: "no"' in (tmp_path / "accelerate_cpu-ddp.yaml").read_text()
    assert "fsdp_version: 2" in (tmp_path / "accelerate_fsdp2.yaml").read_text()
    assert cli(["train", "--emit-config", "zero4", "-o", str(tmp_path)]) == 2


def test_streaming_local_files_train_and_resume(tiny, corpus, tmp_path):
    kw = dict(steps=4, streaming=True, eval_blocks=2, save_every=2)
    full = train(tiny, tmp_path / "a", recipe(corpus, **kw), progress=False)
    train(tiny, tmp_path / "b", recipe(corpus, **kw), stop_after=2, progress=False)
    train(tiny, tmp_path / "b", recipe(corpus, **kw), resume=True, progress=False)
    assert full.status == "completed"
    la = [(r["step"], r["loss"]) for r in metrics(tmp_path / "a") if r.get("event") is None]
    lb = [(r["step"], r["loss"]) for r in metrics(tmp_path / "b") if r.get("event") is None]
    assert la == lb and len(la) == 4  # the stream is fast-forwarded past the consumed blocks


def test_plan_train_block_is_the_recipe(tmp_path, capsys):
    from scaler_wizard.runtime.recipe import recipe_from_plan

    plan = tmp_path / "grow.expand"
    (tmp_path / "recipe.toml").write_text("steps = 11\nlr = 2e-4\n")
    plan.write_text('model "m"\ninsert layer 1 identity\ntrain "recipe.toml"\n')
    r = recipe_from_plan(plan)
    assert (r.steps, r.lr) == (11, 2e-4)
    (tmp_path / "c.txt").write_text("x")
    plan.write_text('model "m"\ntrain {\n  steps = 5\n  freeze_original = true\n  curriculum = "64:2"\n'
                    '  data = "c.txt"\n}\n')
    r = recipe_from_plan(plan)
    assert (r.steps, r.freeze_original, r.curriculum, r.data) == (5, True, [(64, 2)], [str(tmp_path / "c.txt")])
    plan.write_text('model "m"\ntrain {\n  stepz = 5\n}\n')
    assert cli(["train", str(tmp_path), "--plan", str(plan), "-o", str(tmp_path / "r")]) == 2
    assert "unknown key `stepz` (did you mean `steps`?)" in capsys.readouterr().err


def test_gradient_checkpointing_bf16_and_original_baseline(grown, tiny, corpus, tmp_path):
    plain = train(tiny, tmp_path / "p", recipe(corpus, steps=3), progress=False)
    ckpt = train(tiny, tmp_path / "c", recipe(corpus, steps=3, gradient_checkpointing=True), progress=False)
    lp = [r["loss"] for r in metrics(tmp_path / "p") if r.get("event") is None]
    lc = [r["loss"] for r in metrics(tmp_path / "c") if r.get("event") is None]
    assert lc == pytest.approx(lp, rel=1e-5) and plain.status == ckpt.status == "completed"
    # bf16 autocast runs on CPU too
    res = train(tiny, tmp_path / "b", recipe(corpus, steps=2, precision="bf16"), progress=False)
    assert res.status == "completed" and math.isfinite(res.last_eval_ppl)
    # the original (un-grown) model's perplexity becomes the breaker's reference
    res = train(grown, tmp_path / "g", recipe(corpus, steps=2, baseline_model=str(tiny)), progress=False)
    head = metrics(tmp_path / "g")[0]
    assert head["event"] == "baseline" and head["original_ppl"] == pytest.approx(head["eval_ppl"])
    assert [r for r in metrics(tmp_path / "g") if "breaker_limit_ppl" in r][0]["breaker_limit_ppl"] == \
        pytest.approx(head["original_ppl"] * 1.25)
