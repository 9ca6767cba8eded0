"""Peak memory and wall time of verification, against a raw copy of the bytes, in one run.

Builds (once, cached under ./bench-cache/) a random Llama-shaped bf16 checkpoint on disk, tensor by
tensor through the project's CheckpointWriter (never more than one shard in memory), grows it with
``scaler-wizard apply --no-verify`` (the SOLAR-style depth plan of benchmarks/apply_speed.py), then
times, each command in its own process with its RSS sampled every 50 ms by this (small) process:

* ``copy``: a userspace byte copy of the grown model's shards (16 MiB buffers, fsync'd; each copy
  deleted after it is written), the baseline;
* ``verify``: ``scaler-wizard verify OUT --against SRC --no-symmetry`` (layer-by-layer, fp32:
  random ids, right and left padding, KV-cache decoding; each model read once);
* ``whole`` (``--whole``): the same comparison with both models loaded whole in fp32
  (``compare_models(..., layerwise=False)``), the path verification used before.

Shapes (``--shape``): ``small`` (4 layers, hidden 256: a smoke test), ``tinyllama`` (1.1B: hidden 2048,
22 layers), ``vocab128k`` (two TinyLlama layers with Llama-3's 128256-token vocabulary: ``--new-layers 3``), ``7b`` (Llama-2-7B: hidden 4096, ffn 11008, 32 layers, 32 heads, vocab 32000; 13.5 GB
in bf16, about 20 GB grown: check ``df -h`` first; ``--clean`` deletes both afterwards).

    .venv/bin/python benchmarks/verify_memory.py --shape tinyllama
    .venv/bin/python benchmarks/verify_memory.py --shape 7b --new-layers 34 --quick --clean
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SHAPES = {
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=4000),
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    # Llama-3's vocabulary on two TinyLlama layers: the embedding and the LM head (1.05 GB each in
    # fp32) dominate, so the peak shows whether they are read in chunks
    "vocab128k": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=2, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=128256),
}


def build(dst: Path, dims: dict, shard_size: str) -> None:
    """Random bf16 weights written tensor by tensor (one random block per shape, rows rolled per layer)."""
    import torch
    from transformers import LlamaConfig

    from apply_speed import shapes
    from scaler_wizard.runtime.checkpoint import CheckpointWriter

    cfg = LlamaConfig(**dims, max_position_embeddings=4096, tie_word_embeddings=False).to_dict()
    cfg["dtype"] = "bfloat16"
    cfg["architectures"] = ["LlamaForCausalLM"]
    g = torch.Generator().manual_seed(0)
    base: dict[tuple, object] = {}
    with CheckpointWriter(dst, max_shard_size=shard_size) as w:
        for k, (name, shp) in enumerate(shapes(dims)):
            if name.endswith("norm.weight"):
                t = torch.ones(shp, dtype=torch.bfloat16)
            else:
                if shp not in base:
                    base[shp] = (torch.randn(shp, generator=g) * 0.02).to(torch.bfloat16)
                t = base[shp].roll(k, 0)  # layers differ; one block per shape stays in memory
            w.add(name, t)
        w.write_config(cfg)
        w.commit()


class Sampler:
    """Peak RSS of a process (and its children), sampled every ``period`` seconds."""

    def __init__(self, pid: int, period: float = 0.05):
        import psutil

        self.proc, self.period, self.peak = psutil.Process(pid), period, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        import psutil

        while not self._stop.is_set():
            try:
                rss = self.proc.memory_info().rss + sum(c.memory_info().rss for c in self.proc.children(recursive=True))
                self.peak = max(self.peak, rss)
            except psutil.Error:
                pass
            self._stop.wait(self.period)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak


def timed(cmd: list[str], env: dict) -> dict:
    """Wall, CPU (user+sys) and peak RSS of a command: the larger of the sampled peak and the
    kernel's high-water mark from wait4 (which cannot miss a short peak)."""
    import tempfile

    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True, env=env)
        s = Sampler(p.pid)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        peak = max(s.stop(), ru.ru_maxrss * 1024)
        fo.seek(0)
        fe.seek(0)
        return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss": peak, "rc": p.returncode,
                "stdout": fo.read(), "stderr": fe.read()}


def copy_child(src: str, dst: str) -> None:
    """Userspace copy, shard by shard; each copy is deleted once written (disk space: one shard)."""
    os.makedirs(dst, exist_ok=True)
    for f in sorted(Path(src).glob("*.safetensors")):
        with open(f, "rb") as a, open(Path(dst) / f.name, "wb") as b:
            shutil.copyfileobj(a, b, 16 * 2**20)
            b.flush()
            os.fsync(b.fileno())
        os.unlink(Path(dst) / f.name)


def compare_child(out: str, src: str, layerwise: bool, quick: bool) -> None:
    from scaler_wizard.runtime.verify import compare_models

    kw = {"n_random": 2, "seq_len": 8} if quick else {}
    rep = compare_models(out, src, layerwise=layerwise, **kw)
    d = rep.to_dict()
    d["passed"] = True  # the depth plan is approx: drift reported, not judged (as `verify` does)
    print(json.dumps(d))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="tinyllama")
    ap.add_argument("--cache", default=str(ROOT / "bench-cache"))
    ap.add_argument("--shard-size", default="2GB")
    ap.add_argument("--whole", action="store_true", help="also time the whole-model verification (needs RAM)")
    ap.add_argument("--clean", action="store_true", help="delete the checkpoints afterwards")
    ap.add_argument("--quick", action="store_true",
                    help="verify with 2 random sequences of 8 tokens (same checks; for slow machines)")
    ap.add_argument("--new-layers", type=int, help="layers of the grown model (default: n * 32 // 22)")
    ap.add_argument("--child", choices=["copy", "whole", "verify", "build"], help=argparse.SUPPRESS)
    ap.add_argument("--a", help=argparse.SUPPRESS)
    ap.add_argument("--b", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child == "copy":
        copy_child(args.a, args.b)
        return 0
    if args.child in ("whole", "verify"):
        compare_child(args.a, args.b, args.child == "verify", args.quick)
        return 0
    if args.child == "build":
        build(Path(args.a), SHAPES[args.shape], args.shard_size)
        return 0

    dims = SHAPES[args.shape]
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    src = cache / f"llama-{args.shape}-random-bf16"
    out = cache / f"llama-{args.shape}-random-bf16-grown"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cli = [sys.executable, "-m", "scaler_wizard"]
    res: dict[str, dict] = {}
    if not (src / "config.json").is_file():
        res["build"] = timed([sys.executable, __file__, "--child", "build", "--shape", args.shape, "--a", str(src),
                              "--shard-size", args.shard_size], env)
        assert res["build"]["rc"] == 0, res["build"]["stderr"][-3000:]
    if not (out / "config.json").is_file():
        from apply_speed import plan_for

        n = dims["num_hidden_layers"]
        plan = cache / f"depth-{args.shape}.expand"
        plan.write_text(plan_for("depth", dims, args.new_layers or n * 32 // 22))
        res["apply"] = timed(cli + ["apply", str(plan), "--model", str(src), "-o", str(out), "--no-verify",
                                    "--no-progress", "--shard-size", args.shard_size, "--force"], env)
        assert res["apply"]["rc"] == 0, res["apply"]["stderr"][-3000:]
    bytes_out = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    bytes_in = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    tmp = cache / "copy-tmp"
    os.sync()
    res["copy"] = timed([sys.executable, __file__, "--child", "copy", "--a", str(out), "--b", str(tmp)], env)
    shutil.rmtree(tmp, ignore_errors=True)
    os.sync()
    if args.quick:  # the same checks (random ids, padding, KV cache) on fewer tokens
        res["verify"] = timed([sys.executable, __file__, "--child", "verify", "--quick", "--a", str(out), "--b", str(src)], env)
    else:
        res["verify"] = timed(cli + ["verify", str(out), "--against", str(src), "--no-symmetry", "--format", "json"], env)
    if res["verify"]["rc"] not in (0, 1):
        print(res["verify"]["stderr"][-3000:], file=sys.stderr)
        return 1
    txt = res["verify"]["stdout"]
    ver = json.loads(txt[txt.index("{"):])
    if args.whole:
        res["whole"] = timed([sys.executable, __file__, "--child", "whole", "--a", str(out), "--b", str(src)]
                             + (["--quick"] if args.quick else []), env)
    print(f"model: Llama-shaped {args.shape} random bf16, {bytes_in / 1e9:.2f} GB; grown (depth plan) "
          f"{bytes_out / 1e9:.2f} GB; verify {'PASS' if ver['passed'] else 'FAIL'} max rel {ver['max_rel']:.2e} "
          f"over {', '.join(c['name'] for c in ver['checks'])}")
    base = res["copy"]["wall_s"]
    print(f"{'run':<8} {'wall s':>8} {'x copy':>7} {'CPU s':>8} {'peak RSS GB':>12}")
    for k, r in res.items():
        if k == "build":
            continue
        print(f"{k:<8} {r['wall_s']:8.1f} {r['wall_s'] / base:7.1f} {r['cpu_s']:8.1f} {r['peak_rss'] / 1e9:12.3f}"
              + ("" if r["rc"] == 0 else f"  (exit {r['rc']})"))
    if args.clean:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
