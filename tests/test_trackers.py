"""--report-to through accelerate's trackers: TensorBoard writes RUN_DIR/tb with the same scalars as
metrics.jsonl and the recipe as hyperparameters (read back with tensorboard's EventAccumulator); a
tracker whose package is missing is a clear exit 2."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from scaler_wizard.cli import main as cli
from scaler_wizard.runtime import trackers
from scaler_wizard.runtime.recipe import TrainRecipe
from scaler_wizard.runtime.tiny import make_tiny_llama, shakespeare_texts
from scaler_wizard.runtime.train import train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trk")
    corpus = root / "corpus"
    corpus.mkdir()
    for f in shakespeare_texts()[:2]:
        (corpus / f.name).write_text(f.read_text(errors="replace")[:30_000])
    text = "".join(p.read_text() for p in sorted(corpus.iterdir()))
    return make_tiny_llama(root / "tiny", text, vocab_size=320, hidden=32, ffn=64), corpus


def test_tensorboard_event_file_holds_the_metrics_and_hparams(setup, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, corpus = setup
    run = tmp_path / "run"
    r = TrainRecipe(data=[str(corpus)], steps=4, batch_size=2, seq_len=32, eval_blocks=2, eval_every=2,
                    lr=1e-2, report_to="tensorboard")
    assert train(model, run, r, progress=False).status == "completed"
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    files = sorted((run / "tb").rglob("events.out.tfevents.*"))
    assert files
    scalars: dict[str, dict[int, float]] = {}
    hparams = None
    for f in files:
        acc = EventAccumulator(str(f.parent), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
        hp = acc.summary_metadata.get("_hparams_/session_start_info")
        if hp is not None:
            from tensorboard.plugins.hparams import plugin_data_pb2

            hparams = plugin_data_pb2.HParamsPluginData.FromString(hp.plugin_data.content).session_start_info.hparams
    for key in ("loss", "lr", "tokens_per_s", "eval_loss", "eval_ppl"):
        logged = {r["step"]: r[key] for r in recs if isinstance(r.get(key), (int, float))}
        assert logged and scalars[key] == pytest.approx(logged, rel=1e-6), key
    assert scalars["event/baseline"] == {0: 1.0}
    assert hparams is not None and hparams["steps"].number_value == 4 and hparams["report_to"].string_value == "tensorboard"


def test_missing_tracker_package_is_exit_2(setup, tmp_path, capsys):
    model, corpus = setup
    for name in ("wandb", "mlflow", "aim"):
        if importlib.util.find_spec(name) is not None:
            continue
        rc = cli(["train", str(model), "--data", str(corpus), "-o", str(tmp_path / name), "--steps", "1",
                  "--report-to", name, "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and f"pip install {name}" in err and "Traceback" not in err, err
        assert not (tmp_path / name).exists()
    assert cli(["train", str(model), "--data", str(corpus), "-o", str(tmp_path / "x"), "--report-to", "tb"]) == 2
    assert "`report_to` must be one of" in capsys.readouterr().err
    assert trackers.resolve("none") == []
    assert trackers.resolve("all") == [n for n in ("tensorboard", "wandb", "mlflow", "aim")
                                        if importlib.util.find_spec(n) is not None]
