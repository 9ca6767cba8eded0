"""`scaler-wizard eval` through real lm-eval, offline: the built-in perplexity and multiple-choice
tasks and a user YAML task, several models in one table, JSON output, clear errors."""

from __future__ import annotations

import json

import pytest

from scaler_wizard.cli import main as cli
from scaler_wizard.runtime.evaluate import evaluate
from scaler_wizard.runtime.recipe import TrainRecipe
from scaler_wizard.runtime.tiny import make_tiny_llama, shakespeare_texts
from scaler_wizard.runtime.train import train


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    text = shakespeare_texts()[0].read_text(errors="replace")[:40_000]
    (root / "corpus.txt").write_text(text)
    base = make_tiny_llama(root / "base", text, vocab_size=320, hidden=32, ffn=64)
    train(base, root / "run", TrainRecipe(data=[str(root / "corpus.txt")], steps=30, batch_size=8, seq_len=64,
                                          lr=3e-3, eval_blocks=4), progress=False)
    mc = root / "mc.jsonl"
    mc.write_text("".join(json.dumps(d) + "\n" for d in [
        {"question": "Who loves Romeo?", "choices": ["Juliet", "a table"], "answer": 0},
        {"question": "The king's crown is made of", "choices": ["water", "gold", "ice"], "answer": "gold"},
        {"question": "Thou art", "choices": ["a villain", "seventeen kilograms"], "answer": 0},
    ]))
    return root, base, root / "run" / "final", mc


def test_builtin_tasks_compare_models(models, tmp_path, capsys):
    root, base, trained, mc = models
    held_out = tmp_path / "held_out.txt"
    held_out.write_text(shakespeare_texts()[0].read_text(errors="replace")[40_000:46_000])
    out = tmp_path / "r.json"
    code = cli(["eval", f"original={base}", f"continued={trained}", "--tasks", "perplexity,mc", "--text",
                str(held_out), "--mc", str(mc), "--limit", "2", "--batch-size", "2", "--json", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "original" in table and "continued" in table and "word_perplexity" in table and "acc" in table
    r = json.loads(out.read_text())
    assert r["models"] == ["original", "continued"]
    ppl = {m: r["results"][m]["perplexity"]["word_perplexity"] for m in r["models"]}
    assert ppl["continued"] < ppl["original"]  # training on Shakespeare helps on held-out Shakespeare
    for m in r["models"]:
        assert 0.0 <= r["results"][m]["mc"]["acc"] <= 1.0
        assert r["results"][m]["perplexity"]["bits_per_byte"] > 0


def test_local_yaml_task_via_include_path(models, tmp_path):
    root, base, _, mc = models
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "lines.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in
                                               ["To be, or not to be.", "All the world's a stage."]))
    (tasks / "my_lines.yaml").write_text(
        "task: my_lines\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tasks / 'lines.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: byte_perplexity\n")
    rep = evaluate([str(base)], ["my_lines"], include_paths=[str(tasks)], batch_size=2)
    assert rep.results["base"]["my_lines"]["byte_perplexity"] > 1.0


def test_eval_bad_input_is_exit_2(models, tmp_path, capsys):
    root, base, _, mc = models
    assert cli(["eval", str(base), "--tasks", "perplexity"]) == 2
    assert "needs --text" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": 5}\n')
    assert cli(["eval", str(base), "--tasks", "mc", "--mc", str(bad)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert cli(["eval", str(tmp_path), "--tasks", "mc", "--mc", str(mc)]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert cli(["eval", str(base), "--tasks", "no_such_task_xyz", "--include-path", str(tmp_path)]) == 2
    assert "unknown lm-eval task `no_such_task_xyz`" in capsys.readouterr().err
