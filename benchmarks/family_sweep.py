"""The family sweep (issue 10): every causal-LM model type of the installed transformers, built tiny
from its config class defaults, grown by a fixed plan set; each cell exact / approx / refused / crash.

    .venv/bin/python benchmarks/family_sweep.py                          # all families, all ops
    .venv/bin/python benchmarks/family_sweep.py --families bloom,gptj --ops hidden_tile,ffn_net2net
    .venv/bin/python benchmarks/family_sweep.py --issue-nine --json sweep.json --workers 2 --timeout 900
    .venv/bin/python benchmarks/family_sweep.py --from-json benchmarks/family_sweep.json --markdown README.md

Prints the family x op table, the counts per category, each crash / refusal / approx cell with its
reason, the families that could not be built tiny (and why), and the seconds per family; writes
everything as JSON with --json. Ops: see scaler_wizard.sweep.OPS. See scaler_wizard/sweep.py for how
a cell is classified.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scaler_wizard import sweep  # noqa: E402

ISSUE_NINE = ["cohere", "gptj", "phi", "stablelm", "bloom", "falcon", "olmo2", "mamba", "gemma3_text"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", help="comma-separated model types (default: every causal-LM model type)")
    ap.add_argument("--issue-nine", action="store_true", help="the nine families named in issue 10 first, then the rest")
    ap.add_argument("--skip", default="", help="comma-separated model types to leave out")
    ap.add_argument("--ops", default=",".join(sweep.OPS), help=f"comma-separated ops from: {', '.join(sweep.OPS)}")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cold", action="store_true",
                    help="one fresh subprocess per family (default: forked from warm servers, see sweep.ForkServer)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per family (its worker is killed after)")
    ap.add_argument("--json", help="write the results here (rewritten after every family)")
    ap.add_argument("--from-json", help="print the table of a JSON file written by --json, run nothing")
    ap.add_argument("--build-only", action="store_true",
                    help="only build each family tiny (in this process, 120 s alarm each) and list the failures")
    ap.add_argument("--markdown", metavar="README",
                    help="with --from-json: rewrite the family table between the markers of this README")
    a = ap.parse_args(argv)
    if a.build_only:
        return build_only(a)
    if a.from_json:
        result = json.loads(Path(a.from_json).read_text())
        result["counts"] = sweep.counts(result["families"])
        if a.markdown:
            p = Path(a.markdown)
            p.write_text(sweep.readme_with_table(p.read_text(), result))
            print(f"wrote the family table of {a.from_json} into {p}")
            return 0
        report(result)
        return 0
    every = sweep.causal_lm_families()
    if a.families:
        fams = [f.strip() for f in a.families.split(",") if f.strip()]
        bad = [f for f in fams if f not in every]
        if bad:
            print(f"not causal-LM model types in this transformers: {', '.join(bad)}", file=sys.stderr)
            return 2
    else:
        fams = every
    if a.issue_nine:
        fams = ISSUE_NINE + [f for f in fams if f not in ISSUE_NINE] if not a.families else fams
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    fams = [f for f in fams if f not in skip]
    ops = [o.strip() for o in a.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in sweep.OPS]
    if unknown:
        print(f"unknown ops: {', '.join(unknown)}; expected some of {', '.join(sweep.OPS)}", file=sys.stderr)
        return 2

    done: dict[str, dict] = {}
    t0 = time.time()

    def progress(r):
        done[r["family"]] = r
        if r["built"]:
            summary = ", ".join(f"{o}={c['cell']}" for o, c in r["cells"].items())
        else:
            summary = f"cannot be built tiny: {r['unbuildable']}"
        print(f"[{len(done)}/{len(fams)} {time.time() - t0:.0f}s] {r['family']} ({r['seconds']}s): {summary}", flush=True)
        if a.json:
            partial = {"transformers": None, "ops": ops, "families": dict(done), "counts": sweep.counts(done),
                       "partial": True}
            Path(a.json).write_text(json.dumps(partial, indent=1, default=str) + "\n")

    result = sweep.run_sweep(fams, ops, workers=a.workers, timeout=a.timeout, progress=progress, warm=not a.cold)
    result["wall_seconds"] = round(time.time() - t0, 1)
    report(result)
    print(f"wall: {result['wall_seconds']}s over {len(fams)} families, {a.workers} workers")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


def build_only(a) -> int:
    import shutil
    import signal
    import tempfile

    fams = [f.strip() for f in a.families.split(",")] if a.families else sweep.causal_lm_families()

    def alarm(*_):
        raise TimeoutError("building took over 120 s")

    signal.signal(signal.SIGALRM, alarm)
    out = {}
    for f in fams:
        d = tempfile.mkdtemp(prefix=f"sw-build-{f}-")
        t0 = time.time()
        signal.alarm(120)
        try:
            sweep.build_tiny(f, d)
            out[f] = None
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, KeyboardInterrupt):
                raise
            out[f] = sweep._first_line(e)
        finally:
            signal.alarm(0)
            shutil.rmtree(d, ignore_errors=True)
        print(f"{f} ({time.time() - t0:.1f}s): {'built' if out[f] is None else out[f]}", flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    bad = {f: r for f, r in out.items() if r}
    print(f"\n{len(out) - len(bad)} of {len(out)} families build tiny; cannot be built tiny:")
    for f, r in bad.items():
        print(f"  {f}: {r}")
    return 0


def report(result: dict) -> None:
    print()
    print(sweep.format_table(result))
    print()
    print("cannot be built tiny:")
    for f, r in result["families"].items():
        if not r["built"]:
            print(f"  {f}: {r['unbuildable']}")
    print()
    print("seconds per family: " + ", ".join(f"{f} {r['seconds']}" for f, r in result["families"].items()))


if __name__ == "__main__":
    sys.exit(main())
