"""`scaler-wizard compile PLAN [--model M] -o program.json`: lower a plan to a TensorProgram (JSON).

``--dump-after PASS`` prints the program as it stands after one lowering pass (``widen-ffn``,
``widen-ffn[1]`` for statement 1's, ``depth``, ``upcycle``; an unknown name lists the plan's passes).
No weights are read (the model's config is enough). Exit codes: 0 ok, 1 plan / lowering errors,
2 usage / I-O errors.
"""

from __future__ import annotations

import sys

from scaler_wizard.commands import seed_arg

HELP = "lower a plan to a tensor program (JSON)"


def add_arguments(p) -> None:
    p.add_argument("plan", metavar="PLAN", help="the .expand plan file")
    p.add_argument("--model", "-m", help="model (overrides the plan's `model` statement)")
    p.add_argument("-o", "--out", help="write the program here (default: stdout)")
    p.add_argument("--seed", type=seed_arg, help="override the plan's seed")
    p.add_argument("--dump-after", metavar="PASS",
                   help="print the program after this lowering pass (e.g. widen-ffn, widen-ffn[1], depth)")


def run(args) -> int:
    from scaler_wizard import api
    from scaler_wizard.diagnostics import UsageError

    rp = api.check(args.plan, args.model, seed=args.seed)
    if args.out:
        _refuse_input_paths(args.out, args.plan, rp.model_ref)
    prog = api.compile(rp, dump_after=args.dump_after)
    text = prog.to_json()
    if args.out:
        try:
            with open(args.out, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as e:
            from scaler_wizard.runtime.preflight import os_error_reason

            raise UsageError(f"cannot write {args.out}: {os_error_reason(e)}") from None
        sys.stderr.write(f"wrote {len(prog)} outputs, {len(prog.nodes())} nodes to {args.out}\n")
    else:
        sys.stdout.write(text)
    return 0


def _refuse_input_paths(out, plan, model_ref) -> None:
    """UsageError when ``-o`` would write over the plan file or into the model's directory (or over
    its file): inputs are never modified."""
    from pathlib import Path

    from scaler_wizard.diagnostics import UsageError

    dst = Path(out).resolve()
    if Path(plan).is_file() and dst == Path(plan).resolve():
        raise UsageError(f"-o {out} is the plan file itself; write the program elsewhere")
    if model_ref is None:
        return
    m = Path(str(model_ref))
    if not m.exists():
        return
    m = m.resolve()
    if dst == m or (m.is_dir() and m in dst.parents):
        raise UsageError(f"-o {out} is inside the model directory {m}: inputs are never modified; "
                         "write the program elsewhere")
