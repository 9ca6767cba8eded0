"""Time `scaler-wizard check` on Llama-shaped configs from 135M to 405B parameters.

Target (issue 2): flat in model size, <= 3 s wall per check including interpreter start.

Each config is written as a plain config.json (no weights exist or are needed). Every check runs
in a fresh interpreter, twice: `cold` with an empty IR cache (the model is traced on the meta
device) and `warm` (the IR comes from the cache, torch is not imported). The baseline measured in
the same run is a bare `python -c pass` interpreter start.

    .venv/bin/python benchmarks/check_speed.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Published shapes (hidden, layers, heads, kv heads, ffn, vocab, tied embeddings).
SHAPES = {
    "SmolLM2-135M": (576, 30, 9, 3, 1536, 49152, True),
    "SmolLM2-360M": (960, 32, 15, 5, 2560, 49152, True),
    "Llama-3.2-1B": (2048, 16, 32, 8, 8192, 128256, True),
    "Llama-3.1-8B": (4096, 32, 32, 8, 14336, 128256, False),
    "Llama-3.1-70B": (8192, 80, 64, 8, 28672, 128256, False),
    "Llama-3.1-405B": (16384, 126, 128, 8, 53248, 128256, False),
}

PLAN = """widen hidden x2 lemon
widen ffn x2 net2net
insert layers every 8 identity
"""


def write_config(root: Path, name: str) -> Path:
    h, L, H, KV, F, V, tied = SHAPES[name]
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h,
        "num_hidden_layers": L,
        "num_attention_heads": H,
        "num_key_value_heads": KV,
        "head_dim": h // H,
        "intermediate_size": F,
        "vocab_size": V,
        "tie_word_embeddings": tied,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    }
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    return d


def timed(cmd: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    return time.perf_counter() - t0, p


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3, help="warm runs per config (median reported)")
    args = ap.parse_args()
    exe = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        plan = root / "grow.expand"
        plan.write_text(PLAN)
        env = dict(os.environ, SCALER_WIZARD_CACHE=str(root / "cache"), HF_HUB_OFFLINE="1")
        base = statistics.median(timed([exe, "-c", "pass"], env)[0] for _ in range(3))
        print(f"baseline: bare interpreter start {base:.3f} s")
        print(f"{'config':<16} {'params':>10} {'cold s':>8} {'warm s':>8} {'warm/base':>10}  result")
        worst_warm = 0.0
        failed = False
        for name in SHAPES:
            d = write_config(root, name)
            cmd = [exe, "-m", "scaler_wizard", "check", str(plan), "--model", str(d), "--format", "json"]
            cold, p = timed(cmd, env)
            if p.returncode != 0:
                print(f"{name:<16} check failed (exit {p.returncode}):\n{p.stderr[-2000:]}")
                failed = True
                continue
            params = json.loads(p.stdout)[0]["params"]["before"]
            warm = statistics.median(timed(cmd, env)[0] for _ in range(args.repeat))
            worst_warm = max(worst_warm, warm)
            print(f"{name:<16} {params / 1e9:>9.3f}B {cold:>8.2f} {warm:>8.2f} {warm / base:>9.1f}x  ok")
        print(f"worst warm check: {worst_warm:.2f} s (target <= 3 s) -> {'PASS' if worst_warm <= 3 and not failed else 'FAIL'}")
        return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
