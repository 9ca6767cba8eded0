"""Expand-then-distill: the KD term is Hinton et al.'s T^2 KL(teacher || student); with the teacher
equal to the student it is zero; a better teacher lowers held-out loss faster than plain LM loss on
the same steps; a teacher with another tokenizer is a clear exit 2 before training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from scaler_wizard.cli import main as cli
from scaler_wizard.runtime.distill import kd_loss
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


def recipe(corpus, **kw) -> TrainRecipe:
    base = dict(data=[str(corpus)], steps=3, batch_size=4, seq_len=64, lr=2e-3, eval_blocks=8, seed=1)
    base.update(kw)
    return TrainRecipe(**base)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_kd_loss_is_t2_kl_teacher_student():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    T = 2.0
    pt, ps = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    manual = (pt * (pt.log() - ps.log())).sum(-1).mean() * T * T
    assert torch.allclose(kd_loss(s, t, T), manual, atol=1e-6)
    assert float(kd_loss(t, t, T)) == pytest.approx(0.0, abs=1e-7)
    assert float(kd_loss(s, t, T)) > 0.01  # can fail: different distributions give a positive KL


def test_alpha_one_with_self_as_teacher_gives_zero_distillation_loss(tiny, corpus, tmp_path):
    run = tmp_path / "run"
    res = train(tiny, run, recipe(corpus, steps=2, teacher=str(tiny), distill_alpha=1.0), progress=False)
    assert res.status == "completed"
    first = [r for r in metrics(run) if r.get("event") is None][0]
    assert first["distill_loss"] == pytest.approx(0.0, abs=1e-6)  # teacher == student before any update
    assert first["loss"] == pytest.approx(0.0, abs=1e-6)  # alpha = 1: the KD term only
    assert first["lm_loss"] > 4.0  # both terms logged; the LM term is the untrained model's


@pytest.mark.slow
def test_better_teacher_lowers_held_out_loss_faster(tiny, corpus, tmp_path):
    teacher = train(tiny, tmp_path / "teacher", recipe(corpus, steps=30, lr=1e-2), progress=False).final_dir
    ends = {}
    for name, extra in (("plain", {}), ("distill", dict(teacher=str(teacher), distill_alpha=0.9,
                                                          distill_temperature=1.0))):
        run = tmp_path / name
        train(tiny, run, recipe(corpus, steps=10, **extra), progress=False)
        ends[name] = metrics(run)[-1]["eval_loss"]
    assert ends["distill"] < ends["plain"] - 0.02, ends


def test_teacher_with_another_tokenizer_is_exit_2(tiny, corpus, tmp_path, capsys):
    other = make_tiny_llama(tmp_path / "other", "completely different text " * 200, vocab_size=300, hidden=32,
                            ffn=64)
    rc = cli(["train", str(tiny), "--data", str(corpus), "-o", str(tmp_path / "r"), "--steps", "1",
              "--teacher", str(other), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "same tokenizer" in err and "Traceback" not in err, err
    assert not (tmp_path / "r").exists()
    # same vocabulary size, other tokens: still refused
    same_size = tmp_path / "same-size"
    shutil.copytree(tiny, same_size)
    tok = json.loads((same_size / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[100], list(vocab)[101]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (same_size / "tokenizer.json").write_text(json.dumps(tok))
    rc = cli(["train", str(tiny), "--data", str(corpus), "-o", str(tmp_path / "r"), "--steps", "1",
              "--teacher", str(same_size), "--no-progress"])
    assert rc == 2 and "tokenizer differs" in capsys.readouterr().err
    assert cli(["train", str(tiny), "--data", str(corpus), "-o", str(tmp_path / "r"),
                "--distill-alpha", "1.5"]) == 2
    assert "`distill_alpha` must be in [0, 1]" in capsys.readouterr().err
