"""`scaler-wizard verify OUT --against M`: does the grown model compute the original's function?

Reports max |logit diff|, the same relative to max |original logit| and mean KL on random ids, a
padded batch (left and right) and KV-cache decoding (plus --texts), judged by the plan's exactness
class read from OUT/scaler_wizard_growth.json (exact: rtol 1e-5, exact-eps: 1e-3, approx: reported
only; --tolerance overrides). Also checks that duplicated units diverge after one optimizer step
(symmetry breaking) and re-traces OUT to compare its group sizes with its config.
Exit codes: 0 ok, 1 verification failed (an exact plan exceeds the tolerance, or the re-traced IR
disagrees), 2 verification could not run (a model missing, unreadable, corrupt or inconsistent with
its config.json; bad options).
"""

from __future__ import annotations

import json
import math
import os
import sys

HELP = "check that a grown model computes the same function"


def add_arguments(p) -> None:
    p.add_argument("out", metavar="OUT", help="the grown model directory")
    p.add_argument("--against", required=True, help="the original model directory")
    p.add_argument("--texts", help="a text file: one sample per line, compared too")
    p.add_argument("--tolerance", type=float, help="relative logit tolerance (default by exactness class)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--no-symmetry", action="store_true", help="skip the symmetry-breaking check")


def run(args) -> int:
    from scaler_wizard import api
    from scaler_wizard.diagnostics import UsageError

    from scaler_wizard.runtime.preflight import check_model

    # "could not run" (exit 2) is told from "verification failed" (exit 1): both models are checked
    # (config, weights present and whole, shapes as config.json says) before anything is compared.
    if not os.path.isdir(args.out) or not os.path.isfile(os.path.join(args.out, "config.json")):
        raise UsageError(f"{args.out}: not a model directory (no config.json)")
    check_model(args.out, flag="OUT")
    check_model(args.against, flag="--against")
    from scaler_wizard.runtime.hardware import verify_memory_line

    line = verify_memory_line(args.out, args.against)
    if line and args.format == "text":
        sys.stdout.write(line + "\n")  # before any work
        sys.stdout.flush()
    texts = None
    if args.texts:
        from scaler_wizard.runtime.data import check_text_file

        check_text_file(args.texts)
        try:
            with open(args.texts, encoding="utf-8") as f:
                texts = [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise UsageError(f"--texts {args.texts}: cannot read: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise UsageError(f"--texts {args.texts}: not UTF-8 text (byte {e.start})") from None
    if args.tolerance is not None and not (math.isfinite(args.tolerance) and args.tolerance > 0):
        raise UsageError(f"--tolerance must be a positive number, got {args.tolerance}")
    try:
        d = api.verify(args.out, args.against, texts=texts, tolerance=args.tolerance, symmetry=not args.no_symmetry)
    except (OSError, ValueError) as e:
        raise UsageError(f"could not run the comparison: {e}") from None
    except Exception as e:
        if type(e).__name__ != "SafetensorError":  # a weight file unreadable past its header
            raise
        raise UsageError(f"could not run the comparison: a weight file is corrupt: {e}") from None
    if args.format == "json":
        sys.stdout.write(json.dumps(d, indent=2, default=str) + "\n")
    else:
        status = "PASS" if d["passed"] else "FAIL"
        judged = f"tolerance {d['tolerance']:g} relative" if d["judged"] else "approx plan: drift reported, not judged"
        print(f"verify {args.out} against {args.against}: {status} ({d['exactness']}; {judged})")
        for c in d["checks"]:
            print(f"  {c['name']:<22} max|d|={c['max_abs']:.3e} rel={c['max_rel']:.3e} KL={c['mean_kl']:.3e}"
                  f" over {c['n_positions']} positions")
        for n in d.get("notes", []):
            print(f"  note: {n}")
        sym = d.get("symmetry")
        if sym:
            print(f"  symmetry after 1 step: {'broken' if sym.get('passed') else 'NOT broken' if sym.get('passed') is False else sym.get('error')}")
        irc = d.get("ir_check") or {}
        if irc.get("done"):
            what = "the compiler's prediction and the config" if irc.get("compared_to_prediction") else "the config"
            print(f"  re-traced IR: {'matches ' + what if irc['passed'] else 'MISMATCH: ' + '; '.join(irc['mismatches'])}")
        else:
            print(f"  re-traced IR: skipped ({irc.get('reason')})")
    ir_ok = (d.get("ir_check") or {}).get("passed") is not False
    return 0 if d["passed"] and ir_ok else 1
