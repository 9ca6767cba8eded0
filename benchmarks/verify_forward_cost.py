"""What one decoder layer's float32 matrix products cost the layer-by-layer verifier, by row count.

The seven matrices of a TinyLlama-1.1B decoder layer (q 2048x2048, k and v 256x2048, o 2048x2048,
gate and up 5632x2048, down 2048x5632) and its LM head (32000x2048), random float32, multiplied by
random activations of ``rows`` rows, two ways, alternating, ``--rounds`` times each:

* ``linear``: ``torch.nn.functional.linear`` (x @ W^T), what the model's own forward computes;
* ``weight-major``: ``scaler_wizard.runtime.layerwise._linear`` ((W @ x^T)^T), what the verifier
  computes (``layerwise.WEIGHT_MAJOR_GEMM``).

Row counts: 128 (the random ids' forward with the padded rows: 4 x 32), 28 (session 9's cached
multi-token middle), 2 and 1 (decoding steps: one row is a matrix-vector product, left to
``linear``). Prints the best and median milliseconds per layer (and for the head) and the ratio
weight-major / linear of the medians, for each thread count in ``--threads``.

    .venv/bin/python benchmarks/verify_forward_cost.py --threads 1,2 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from scaler_wizard.runtime.layerwise import _linear

LAYER = [(2048, 2048), (256, 2048), (256, 2048), (2048, 2048), (5632, 2048), (5632, 2048), (2048, 5632)]
HEAD = [(32000, 2048)]


def _time(fn, weights, xs) -> float:
    t = time.perf_counter()
    for w in weights:
        fn(xs[w.shape[1]], w)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rows", default="128,28,2,1")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    mats = {"layer": [torch.randn(o, i, generator=g) for o, i in LAYER],
            "head": [torch.randn(o, i, generator=g) for o, i in HEAD]}
    ways = {"linear": torch.nn.functional.linear, "weight-major": _linear}
    print(f"{'threads':>7} {'what':>5} {'rows':>5} {'linear ms (best/median)':>24} {'weight-major ms':>20} {'ratio':>6}")
    for n in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(n)
        for what, weights in mats.items():
            for rows in (int(r) for r in args.rows.split(",")):
                xs = {i: torch.randn(rows, i, generator=g) for i in (2048, 5632)}
                res: dict[str, list[float]] = {k: [] for k in ways}
                for fn in ways.values():  # warm-up
                    _time(fn, weights, xs)
                for r in range(args.rounds):
                    order = list(ways.items()) if r % 2 == 0 else list(ways.items())[::-1]
                    for name, fn in order:
                        res[name].append(_time(fn, weights, xs) * 1e3)
                a, b = res["linear"], res["weight-major"]
                print(f"{n:>7} {what:>5} {rows:>5} {min(a):11.1f} / {statistics.median(a):8.1f}"
                      f" {min(b):9.1f} / {statistics.median(b):8.1f} {statistics.median(b) / statistics.median(a):6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
