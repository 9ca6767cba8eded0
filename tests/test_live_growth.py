"""Growing a live run (issue 12): the in-memory executor, the derived AdamW moment map as an oracle
against real backward passes, `at step` stage resolution and diagnostics, and (slow) training runs
that grow mid-run, resume across a growth bit for bit, and grow under two-process DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scaler_wizard import api
from scaler_wizard.compiler.program import Add, Load, TensorProgram
from scaler_wizard.diagnostics import PlanError
from scaler_wizard.runtime.live_growth import (CarryError, compose_record, execute_in_memory, grow_adam_state,
                                               grow_model, moment_map, stored_names)
from tests.families import build_model

# one plan per kind of op the brief names: hidden, ffn, heads, depth
ORACLE_PLANS = ["widen hidden x2", "widen ffn x2 net2net", "widen heads x2 dup", "insert layers every 1 identity"]


@pytest.fixture(scope="module")
def llama():
    cfg, model = build_model("llama")
    return cfg.to_dict(), model


def _grow(llama, plan):
    cfg, model = llama
    rp = api.check(plan, cfg)
    prog = api.compile(rp, stored=stored_names(model))
    return rp, prog, grow_model(model, prog, rp.config_after)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


@pytest.mark.parametrize("plan", ORACLE_PLANS)
def test_moment_map_predicts_the_grown_gradient_and_one_fresh_adam_step(llama, plan):
    cfg, model = llama
    rp, prog, grown = _grow(llama, plan)
    assert prog.exactness() == "exact"
    torch.manual_seed(1)
    ids = torch.randint(0, cfg["vocab_size"], (2, 12))
    mm = moment_map(prog)
    # gradients: one backward pass of each model on the same batch
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    grown.zero_grad()
    grown(input_ids=ids, labels=ids).loss.backward()
    pred = mm.predict({n: p.grad for n, p in model.named_parameters()})
    gp = dict(grown.named_parameters())
    claimed = sum(int(mm.claimed[n].sum()) for n in gp)
    assert claimed > 0.3 * sum(p.numel() for p in gp.values())  # the map claims a real share
    for n, p in gp.items():
        c = mm.claimed[n]
        if c.any():
            assert _rel(pred[n][c], p.grad.double()[c]) < 1e-5, n
    # AdamW with betas (0, 0) and lr 0: its state after one step is (g, g^2); the carried state of the
    # original's step equals a fresh step on the grown model on every claimed element
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, betas=(0.0, 0.0))
    opt.step()
    state = {n: opt.state[p] for n, p in model.named_parameters()}
    carried = grow_adam_state(mm, state, {n: tuple(p.shape) for n, p in gp.items()})
    fresh = torch.optim.AdamW(grown.parameters(), lr=0.0, betas=(0.0, 0.0))
    fresh.step()
    for n, p in gp.items():
        c = mm.claimed[n]
        if c.any():
            f = fresh.state[p]
            assert _rel(carried[n]["exp_avg"].double()[c], f["exp_avg"].double()[c]) < 1e-5, n
            assert _rel(carried[n]["exp_avg_sq"].double()[c], f["exp_avg_sq"].double()[c]) < 1e-5, n
            assert float(carried[n]["step"]) == 1.0
    model.zero_grad()


def test_duplicated_units_diverge_after_a_few_steps(llama):
    cfg, model = llama
    rp, prog, grown = _grow(llama, "widen ffn x2 net2net")
    ffn = model.config.intermediate_size
    up = "model.layers.0.mlp.up_proj.weight"
    src = prog.outputs[up].node  # rows [ffn:] are copies of original rows
    mm = moment_map(prog)
    copies = mm.lm.outputs[up].src[:, 0]
    pairs = [(i, j) for j in range(ffn, 2 * ffn) for i in range(ffn) if copies[i] == copies[j]]
    assert pairs and src is not None
    w = dict(grown.named_parameters())[up]
    i, j = pairs[0]
    assert torch.equal(w[i], w[j])  # an exact copy at the growth
    opt = torch.optim.AdamW(grown.parameters(), lr=1e-2)
    torch.manual_seed(2)
    for _ in range(3):
        ids = torch.randint(0, cfg["vocab_size"], (2, 12))
        opt.zero_grad()
        grown(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    assert all(not torch.allclose(w[a], w[b]) for a, b in pairs[:8])  # the split broke the symmetry


def test_in_memory_executor_equals_apply_on_disk(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from scaler_wizard.runtime.tiny import make_tiny_llama

    src = make_tiny_llama(tmp_path / "m", "to be or not to be that is the question " * 40, vocab_size=300,
                          hidden=32, ffn=64)
    plan = "widen ffn x2 net2net\nwiden heads x2 dup"
    api.apply(plan, str(src), out=str(tmp_path / "out"), verify=False)
    disk = load_file(str(tmp_path / "out" / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    prog = api.compile(plan, str(src), stored=stored_names(model))
    mem = execute_in_memory(prog, model.state_dict())
    assert set(mem) == set(disk)
    for n in disk:
        assert torch.equal(mem[n], disk[n]), n


def test_carry_refused_for_elements_without_a_derived_map():
    prog = TensorProgram()
    prog.add("w", Add(Load("a", (2, 2)), Load("b", (2, 2))), status="grown")
    mm = moment_map(prog)
    assert mm.lm.mixed_outputs() == ["w"]
    st = {"a": {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 2), "exp_avg_sq": torch.ones(2, 2)}}
    with pytest.raises(CarryError, match="optimizer = reset"):
        grow_adam_state(mm, st, {"w": (2, 2)})
    assert grow_adam_state(mm, st, {"w": (2, 2)}, mode="reset") == {}


def test_growth_record_follows_the_stages(llama):
    from scaler_wizard.runtime.recipe import TrainRecipe
    from scaler_wizard.runtime.train import _param_groups

    _, prog1, grown = _grow(llama, "widen ffn x2 zero")
    rec = compose_record(None, prog1, plan="widen ffn x2 zero")
    up = rec.tensors["model.layers.0.mlp.up_proj.weight"]
    assert up.status == "grown" and up.original_region == ((0, 96), (0, 64))
    assert rec.tensors["model.layers.0.self_attn.q_proj.weight"].status == "original"
    # --freeze-original after the growth: what the stage added trains, the rest is frozen
    groups, frozen, counts = _param_groups(grown, TrainRecipe(freeze_original=True), rec)
    params = dict(grown.named_parameters())
    assert not params["model.layers.0.self_attn.q_proj.weight"].requires_grad
    assert params["model.layers.0.mlp.up_proj.weight"].requires_grad
    assert len(frozen.regions) == 6  # 2 layers x (gate, up, down): their original halves stay frozen
    assert counts["trainable"] == 6 * 192 * 64
    # a second stage that widens the same tensor again keeps the run's original region
    cfg2 = json.loads(json.dumps(api.check("widen ffn x2 zero", llama[0]).config_after))
    prog2 = api.compile("widen ffn x2 zero", cfg2)
    rec2 = compose_record(rec, prog2, plan="widen ffn x2 zero")
    assert rec2.tensors["model.layers.0.mlp.up_proj.weight"].original_region == ((0, 96), (0, 64))
    assert rec2.tensors["model.layers.0.self_attn.q_proj.weight"].status == "original"
    assert "widen ffn x2 zero\nwiden ffn x2 zero" == rec2.plan


def _codes(text, cfg):
    with pytest.raises(PlanError) as e:
        api.check(text, cfg)
    return [(d.code, d.span.line) for d in e.value.diagnostics]


def test_stage_diagnostics_point_into_the_stage(llama):
    cfg = llama[0]
    assert _codes("train { steps = 10 }\nat step 6 { stack x2 }\nat step 4 { stack x2 }", cfg) == [("SW320", 3)]
    assert ("SW321", 2) in _codes("train { steps = 10 }\nat step 10 { stack x2 }", cfg)
    assert _codes("at step 3 optimizer=keep { stack x2 }", cfg) == [("SW322", 1)]
    assert _codes("at step 3 rewarm=-1 { stack x2 }", cfg)[0][0] in ("SW322", "SW104", "SW102")
    assert _codes("at step 3 { stack x2 }\nat step 5 {\n  widen fnn x2\n}", cfg) == [("SW201", 3)]
    assert _codes("at step 3 optimizer=carry optimizer=reset { stack x2 }", cfg) == [("SW322", 1)]  # not "last wins"
    rp = api.check("train { steps = 10 }\nat step 6 rewarm=8 { stack x2 }", cfg)
    assert "SW621" in [d.code for d in rp.stages[0].rp.warnings]  # the run ends mid-ramp: said, not refused
    # the second stage is checked against the model the first one grew: 2 -> 4 -> 8 layers
    rp = api.check("at step 3 { stack x2 }\nat step 5 { stack x2 }", cfg)
    assert [len(s.rp.layer_map) for s in rp.stages] == [4, 8]
    assert rp.stages[1].rp.costs_before.params == rp.stages[0].rp.costs_after.params


def test_train_refuses_stages_on_a_model_the_growth_before_them_was_not_applied_to(llama, tmp_path):
    # check reports the stages against the model *after* the top-level growth; training the un-grown model
    # would run them on another model (a stage 96 -> 384 instead of 192 -> 384). MODEL_DIR must be apply's output.
    from scaler_wizard.commands.train import plan_stages
    from scaler_wizard.runtime.recipe import TrainRecipe

    src = tmp_path / "m"
    llama[1].save_pretrained(str(src))
    plan = tmp_path / "p.expand"
    plan.write_text("widen ffn x2 net2net\nat step 2 { widen ffn to 384 net2net }\n")
    recipe = TrainRecipe(steps=4)
    with pytest.raises(PlanError) as e:
        plan_stages(str(plan), str(src), recipe)
    (d,) = e.value.diagnostics
    assert d.code == "SW324" and d.span.line == 1 and "apply" in d.help
    out = tmp_path / "grown"
    api.apply(plan.read_text(), str(src), out=str(out), verify=False)
    (stage,) = plan_stages(str(plan), str(out), recipe)
    assert stage.rp.config_diff()["intermediate_size"] == (192, 384)
    # a plan with no growth before its stages trains MODEL_DIR as given
    plan.write_text("at step 2 { widen ffn x2 net2net }\n")
    assert len(plan_stages(str(plan), str(src), recipe)) == 1


def test_class_changing_statement_in_a_stage_is_refused_at_check(llama):
    # a live run rebuilds the model with its own class: upcycling (llama -> mixtral) belongs before training
    assert _codes("at step 3 { upcycle ffn experts 4 top 2 }", llama[0]) == [("SW323", 1)]


def test_carry_without_a_derived_map_is_refused_before_training(llama):
    # widen vocab by mean builds new rows from several original rows: no moment map; refused when the run
    # is set up (UsageError naming the stage), not at the stage's step
    from scaler_wizard.diagnostics import UsageError
    from scaler_wizard.runtime.live_growth import refuse_uncarried

    rp = api.check("at step 3 { widen vocab by 64 mean }\nat step 5 optimizer=reset { widen vocab by 64 mean }", llama[0])
    with pytest.raises(UsageError, match="stage at step 3 .* cannot carry AdamW's moments"):
        refuse_uncarried(rp.stages)
    refuse_uncarried(rp.stages[1:])  # reset: nothing to map


# --------------------------------------------------------------------------- training (slow)
def _corpus(root: Path) -> Path:
    from scaler_wizard.runtime.tiny import write_corpus

    return write_corpus(root / "corpus")


SCHEDULE = """train {{ steps = 8; lr = 2e-3; batch_size = 2; seq_len = 32; eval_blocks = 2; seed = 1; data = "{data}" }}
at step 2 {{ widen ffn x2 net2net }}
at step 4 optimizer=carry rewarm=2 {{ widen hidden x2; insert layers every 1 identity }}
"""


@pytest.mark.slow
def test_train_grows_mid_run_and_resumes_across_a_growth_bit_for_bit(tmp_path):
    from scaler_wizard.cli import main as cli
    from scaler_wizard.runtime.tiny import make_tiny_llama

    corpus = _corpus(tmp_path)
    text = "".join(p.read_text() for p in sorted(corpus.iterdir()))
    model = make_tiny_llama(tmp_path / "tiny", text, vocab_size=320, hidden=32, ffn=64)
    plan = tmp_path / "schedule.expand"
    plan.write_text(SCHEDULE.format(data=corpus))
    base = ["train", str(model), "--plan", str(plan), "--no-progress"]
    assert cli([*base, "-o", str(tmp_path / "a")]) == 0
    assert cli([*base, "-o", str(tmp_path / "b"), "--save-every", "1", "--stop-after", "5"]) == 0
    # the plan edited before the checkpoint's step (a stage the run already did): refused, not silently continued
    edited = tmp_path / "edited.expand"
    edited.write_text(SCHEDULE.format(data=corpus).replace("widen ffn x2 net2net", "widen ffn x2 zero"))
    assert cli(["train", str(model), "--plan", str(edited), "--no-progress", "-o", str(tmp_path / "b"),
                "--resume"]) == 2
    assert cli([*base, "-o", str(tmp_path / "b"), "--save-every", "1", "--resume"]) == 0

    def recs(run):
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]

    a = recs(tmp_path / "a")
    growth = [r for r in a if r.get("event") == "growth"]
    assert [(r["step"], r["stage"]) for r in growth] == [(2, 1), (4, 2)]
    assert growth[0]["params_before"] < growth[0]["params_after"] < growth[1]["params_after"]
    steps = [r for r in a if r.get("event") is None]
    flops = [r["flops"] for r in steps]
    assert all(b > c for b, c in zip(flops[1:], flops)) and flops[-1] > 0
    # FLOPs per step grow with the model: the last step costs more than the first
    assert flops[-1] - flops[-2] > flops[0]
    cfg = json.loads((tmp_path / "a" / "final" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (64, 128, 4)
    rec = json.loads((tmp_path / "a" / "final" / "scaler_wizard_growth.json").read_text())
    assert rec["tensors"]["model.layers.1.mlp.down_proj.weight"]["status"] == "new"  # an identity layer
    # killed after the second growth (step 5) and resumed: the same trajectory, bit for bit
    b = [r for r in recs(tmp_path / "b") if r.get("event") is None]
    assert [(r["step"], r["loss"], r["flops"]) for r in b] == [(r["step"], r["loss"], r["flops"]) for r in steps]
    assert (tmp_path / "a" / "loss.png").is_file()
    from safetensors.torch import load_file

    wa, wb = load_file(str(tmp_path / "a" / "final" / "model.safetensors")), \
        load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_ddp_two_cpu_processes_grow_mid_run(tmp_path):
    from safetensors.torch import load_file

    from scaler_wizard.runtime.tiny import make_tiny_llama

    corpus = _corpus(tmp_path)
    text = "".join(p.read_text() for p in sorted(corpus.iterdir()))
    model = make_tiny_llama(tmp_path / "tiny", text, vocab_size=320, hidden=32, ffn=64)
    plan = tmp_path / "schedule.expand"
    plan.write_text(SCHEDULE.format(data=corpus).replace("steps = 8", "steps = 6"))
    run = tmp_path / "ddp"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "scaler_wizard", "train", str(model), "--plan", str(plan), "-o", str(run), "--no-progress",
           "--dump-rank-weights"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    r0 = load_file(str(run / "rank-weights" / "rank0.safetensors"))
    r1 = load_file(str(run / "rank-weights" / "rank1.safetensors"))
    final = load_file(str(run / "final" / "model.safetensors"))
    assert r0.keys() == r1.keys() and r0
    for k in r0:
        assert torch.equal(r0[k], r1[k]) and torch.equal(r0[k], final[k]), k
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["world_size"] == 2
    assert [r["step"] for r in recs if r.get("event") == "growth"] == [2, 4]
    assert final["model.embed_tokens.weight"].shape[1] == 64


@pytest.mark.slow
@pytest.mark.skipif(__import__("importlib").util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_deepspeed_run_with_stages_is_refused_before_training(tmp_path):
    from scaler_wizard.runtime.launch import emit_config
    from scaler_wizard.runtime.tiny import make_tiny_llama

    corpus = _corpus(tmp_path)
    model = make_tiny_llama(tmp_path / "tiny", "to be or not to be " * 50, vocab_size=300, hidden=32, ffn=64)
    plan = tmp_path / "schedule.expand"
    plan.write_text(SCHEDULE.format(data=corpus))
    emit_config("zero2", tmp_path / "cfg")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "scaler_wizard", "train", str(model), "--plan", str(plan), "-o", str(tmp_path / "run"),
           "--no-progress", "--deepspeed", str(tmp_path / "cfg" / "ds_zero2.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, start_new_session=True)
    assert proc.returncode != 0
    # each rank exits 2 with the message (the launcher adds its own report of the failed ranks)
    assert "scaler-wizard train: error: `at step` growth stages are not supported under DeepSpeed" in proc.stderr
    assert "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before any step


def test_rewarm_ramps_the_lr_after_a_stage_then_the_schedule_continues():
    from types import SimpleNamespace

    from scaler_wizard.runtime.live_growth import rewarm_lambda

    f = rewarm_lambda(lambda i: 1.0, [SimpleNamespace(step=4, rewarm=4), SimpleNamespace(step=8, rewarm=0)])
    # multiplier of optimizer step index i (step i + 1): steps 5..8 ramp 1/4 .. 4/4, the rest untouched
    assert [f(i) for i in range(10)] == [1, 1, 1, 1, 0.25, 0.5, 0.75, 1, 1, 1]
