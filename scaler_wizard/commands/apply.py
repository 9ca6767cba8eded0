"""`scaler-wizard apply PLAN --model M -o OUT`: grow a checkpoint out-of-core.

Reads the input lazily, writes through the atomic writer (never into the input, never over an
existing OUT without --force), then config.json, generation/tokenizer files, README.md (model card
with the plan, config diff and verification figures) and the training sidecar
OUT/scaler_wizard_growth.json. The output is verified in a staging directory and lands at OUT only
when it passes (approx plans: drift reported, lands); otherwise nothing is left at OUT (the output
goes to OUT.failed with --keep-failed). --no-verify lands it unverified.
Exit codes: 0 ok, 1 plan errors or a failed verification, 2 usage / I-O errors.
"""

from __future__ import annotations

import json
import sys

from scaler_wizard.commands import seed_arg, size_arg

HELP = "grow a checkpoint: execute a plan out-of-core"


def add_arguments(p) -> None:
    p.add_argument("plan", metavar="PLAN", help="the .expand plan file")
    p.add_argument("--model", "-m", help="input model (overrides the plan's `model` statement)")
    p.add_argument("-o", "--out", required=True, help="output directory (created atomically)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--allow-bin", action="store_true", help="allow reading pickle (pytorch_model.bin) checkpoints")
    p.add_argument("--seed", type=seed_arg, help="override the plan's seed")
    p.add_argument("--dtype", help="output dtype (float32, bfloat16, float16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-verify", action="store_true", help="land the output without verifying it")
    p.add_argument("--keep-failed", action="store_true", help="keep an output that fails verification at OUT.failed")
    p.add_argument("--shard-size", default="5GB", type=size_arg, help="maximum shard size (default 5GB)")
    p.add_argument("--format", choices=("text", "json"), default="text")


def run(args) -> int:
    from scaler_wizard import api
    from scaler_wizard.runtime.hardware import apply_memory_line

    rp = api.check(args.plan, args.model, seed=args.seed, dtype=args.dtype)
    if rp.warnings and args.format == "text":  # what `check` would warn about, before any work
        from scaler_wizard.diagnostics import render

        try:
            sources = {args.plan: open(args.plan, encoding="utf-8").read()}
        except (OSError, UnicodeDecodeError):
            sources = None
        sys.stderr.write(render(rp.warnings, sources, color=sys.stderr.isatty()) + "\n")
    needs = apply_memory_line(rp, verify=not args.no_verify)
    if args.format == "text":  # before any work (JSON: a field of the result)
        sys.stdout.write(needs + "\n")
        sys.stdout.flush()
    res = api.apply(rp, args.model, out=args.out, force=args.force, allow_bin=args.allow_bin,
                    seed=args.seed, dtype=args.dtype, progress=not args.no_progress, verify=not args.no_verify,
                    shard_size=args.shard_size, keep_failed=args.keep_failed)
    rep, ver = res["report"], res["verification"]
    failed = ver is not None and not ver["passed"]
    if args.format == "json":
        out = {"out": res["out"], "landed": res["landed"], "kept": res["kept"], "exactness": res["exactness"],
               "execution": rep.to_dict(), "verification": ver, "memory_needs": needs}
        sys.stdout.write(json.dumps(out, indent=2, default=str) + "\n")
    else:
        sys.stdout.write(rep.summary() + "\n")
        if ver is None:
            sys.stdout.write(f"not verified (--no-verify): landed at {res['out']} unverified\n")
        elif ver.get("error"):
            sys.stdout.write(f"verify ({ver['exactness']}): FAIL: {ver['error']}\n")
        else:
            status = "PASS" if ver["passed"] else "FAIL"
            judged = f"tolerance {ver['tolerance']:g}" if ver["judged"] else "approx: drift reported, not judged"
            sys.stdout.write(f"verify ({ver['exactness']}): {status} max|d|={ver['max_abs']:.3e} "
                             f"rel={ver['max_rel']:.3e} KL={ver['mean_kl']:.3e} ({judged})\n")
            for n in ver.get("notes") or []:
                if n.startswith("output dtype"):  # why the tolerance is not the exactness class's
                    sys.stdout.write(f"  note: {n}\n")
            if not failed:
                sys.stdout.write(f"landed at {res['out']}\n")
    if failed:
        where = (f"the output is kept at {res['kept']} for inspection" if res["kept"]
                 else "nothing was written at " + str(args.out) + " (--keep-failed keeps it at OUT.failed)")
        sys.stderr.write("scaler-wizard apply: verification failed: " + "; ".join(api.failed_checks(ver))
                         + f"\n{where}\n")
        if ver.get("hint"):
            sys.stderr.write(f"hint: {ver['hint']}\n")
        return 1
    return 0
