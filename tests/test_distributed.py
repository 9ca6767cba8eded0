"""Two CPU processes through real launchers: DDP over gloo and DeepSpeed ZeRO-2/ZeRO-3 with its CPU
accelerator. Every rank dumps its full weights at the end; they must be identical, and equal to
the saved final model. Slow: process start-up, and DeepSpeed compiles its shm op on first use
(cached in TORCH_EXTENSIONS_DIR afterwards)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scaler_wizard.runtime.launch import emit_config
from scaler_wizard.runtime.tiny import make_tiny_llama, write_corpus

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    corpus = write_corpus(root / "corpus")
    text = "".join(p.read_text() for p in sorted(corpus.iterdir()))
    model = make_tiny_llama(root / "tiny", text, vocab_size=320, hidden=32, ffn=64)
    emit_config("zero2", root / "cfg")
    emit_config("zero3", root / "cfg")
    return root, model, corpus


def launch(root: Path, model: Path, corpus: Path, name: str, *extra: str) -> Path:
    run = root / name
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "scaler_wizard", "train", str(model), "--data", str(corpus), "-o", str(run),
           "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--eval-blocks", "2", "--lr", "1e-2",
           "--no-progress", "--dump-rank-weights", *extra]
    # Its own process group, so that a timeout ends the ranks too, not just the launcher (orphaned ranks
    # would hold DeepSpeed's extension build lock and stall every later run).
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{name}: no result in 600 s\n{out[-3000:]}{err[-6000:]}")
    assert proc.returncode == 0, out[-3000:] + err[-6000:]
    return run


def check_ranks_identical(run: Path, start: Path) -> None:
    r0 = load_file(str(run / "rank-weights" / "rank0.safetensors"))
    r1 = load_file(str(run / "rank-weights" / "rank1.safetensors"))
    final = load_file(str(run / "final" / "model.safetensors"))
    init = load_file(str(start / "model.safetensors"))
    assert r0.keys() == r1.keys() and r0
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # ranks agree bit for bit
        assert torch.equal(r0[k], final[k]), k  # ... and with the saved model
    assert any(not torch.equal(init[k], final[k]) for k in init)  # and training did something
    head = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert head["world_size"] == 2


def test_ddp_two_cpu_processes_end_with_identical_weights(setup):
    root, model, corpus = setup
    run = launch(root, model, corpus, "ddp")
    check_ranks_identical(run, model)


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed not installed (make venv installs it)")


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_two_cpu_processes_end_with_identical_weights(setup, stage):
    root, model, corpus = setup
    ds = ("--deepspeed", str(root / "cfg" / f"ds_zero{stage}.json"))
    save = ("--save-every", "1") if stage == 2 else ()
    run = launch(root, model, corpus, f"zero{stage}", *ds, *save)
    check_ranks_identical(run, model)
    assert (run / "checkpoint-3" / "training_state").is_dir()
    if stage == 2:  # resuming from a DeepSpeed checkpoint (step 1) replays the rest of the trajectory exactly
        resumed = launch(root, model, corpus, "zero2-resumed", *ds, "--resume", str(run / "checkpoint-1"))

        def losses(r):
            return [(m["step"], m["loss"]) for m in map(json.loads, (r / "metrics.jsonl").read_text().splitlines())
                    if m.get("event") is None]

        assert len(losses(run)) == 3 and losses(resumed) == losses(run)[1:]
