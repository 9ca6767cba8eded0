"""Time `scaler-wizard check` on Llama-shaped configs from 135M to 405B parameters.

Target (issue 11): <= 3 s wall per check including interpreter start, cold and warm, flat in model
size, once each config *structure* has been traced once (the IR and the conform verdict are cached
per structure, sizes symbolic: scaler_wizard/ir/structure.py).

Each config is written as a plain config.json (no weights exist or are needed); every check runs in
a fresh interpreter.

* `first`: the configs are checked in order against one cache; a config whose structure was not
  seen yet is traced on the meta device and its output model built (the first-trace time per
  structure, reported separately);
* `cold`: each config against a copy of that cache holding only the per-structure entries (never
  this config's own): the IR is re-bound to the config's sizes, nothing is traced or built;
* `warm`: the same again (the exact entries the cold run wrote).

Configs whose integers coincide differently (Llama-3.1-70B: hidden_size == max_position_embeddings)
are other structures: discovery binds groups to keys by value, so such coincidences change the IR.
The baseline measured in the same run is a bare `python -c pass` interpreter start.

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
    """(wall seconds, completed process); ``p.cpu_s``: the child's user + system CPU seconds (from
    wait4), which a machine shared with other work inflates far less than the wall time."""
    import tempfile

    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, env=env, stdout=fo, stderr=fe, text=True)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        fo.seek(0)
        fe.seek(0)
        done = subprocess.CompletedProcess(cmd, os.waitstatus_to_exitcode(status), fo.read(), fe.read())
        done.cpu_s = ru.ru_utime + ru.ru_stime
        return wall, done


def _structure_only(src: Path, dst: Path) -> None:
    """A copy of the cache ``src`` with only the per-structure entries."""
    import shutil

    shutil.copytree(src / "ir" / "structure", dst / "ir" / "structure")
    (dst / "conform").mkdir(parents=True)
    for f in (src / "conform").glob("structure-*"):
        shutil.copy(f, dst / "conform" / f.name)


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
        print(f"baseline: bare interpreter start {base:.3f} s; load average {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} CPUs")
        dirs = {name: write_config(root, name) for name in SHAPES}

        def cmd(name):
            return [exe, "-m", "scaler_wizard", "check", str(plan), "--model", str(dirs[name]), "--format", "json"]

        first: dict[str, float] = {}
        seen = set()
        for name in SHAPES:
            n_before = len(list((root / "cache" / "ir" / "structure").glob("*.json"))) if seen else 0
            t, p = timed(cmd(name), env)
            if p.returncode not in (0, 1):
                print(f"{name:<16} check failed (exit {p.returncode}):\n{p.stderr[-2000:]}")
                return 1
            n_after = len(list((root / "cache" / "ir" / "structure").glob("*.json")))
            seen.add(name)
            if n_after > n_before:
                first[name] = t
        print("first trace per structure: " + ", ".join(f"{k} {v:.1f} s" for k, v in first.items()))
        print(f"{'config':<16} {'params':>10} {'cold s':>8} {'(CPU)':>7} {'warm s':>8} {'(CPU)':>7} {'cold/base':>10}  result")
        worst = 0.0
        failed = False
        for name in SHAPES:
            cache = root / f"cold-{name}"
            _structure_only(root / "cache", cache)
            cenv = dict(env, SCALER_WIZARD_CACHE=str(cache))
            cold, p = timed(cmd(name), cenv)
            if p.returncode not in (0, 1):
                print(f"{name:<16} check failed (exit {p.returncode}):\n{p.stderr[-2000:]}")
                failed = True
                continue
            out = json.loads(p.stdout)[0]
            # exit 1: the plan is refused for this model (a diagnostic, e.g. SW317: more memory than
            # this machine has): still a complete check
            result = "ok" if p.returncode == 0 else "refused: " + ", ".join(
                sorted({d["code"] for d in out.get("diagnostics", []) if d.get("severity") == "error"}))
            params = (out.get("params") or {}).get("before")
            cold_cpu = p.cpu_s
            runs = [timed(cmd(name), cenv) for _ in range(args.repeat)]
            warm = statistics.median(t for t, _ in runs)
            warm_cpu = statistics.median(q.cpu_s for _, q in runs)
            worst = max(worst, cold, warm)
            ptxt = f"{params / 1e9:>9.3f}B" if params else f"{'-':>10}"
            print(f"{name:<16} {ptxt} {cold:>8.2f} {cold_cpu:>7.2f} {warm:>8.2f} {warm_cpu:>7.2f} {cold / base:>9.1f}x  "
                  f"{result}")
        print(f"worst cold/warm check: {worst:.2f} s wall (target <= 3 s) -> {'PASS' if worst <= 3 and not failed else 'FAIL'}"
              f"; load average now {os.getloadavg()[0]:.1f}")
        return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
