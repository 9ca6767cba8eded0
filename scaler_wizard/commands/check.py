"""`scaler-wizard check PLAN... [--model M]`: type-check plans, print the resolved plan or diagnostics.

Needs only the model's config (config.json or a GGUF header); no weights are read. Exit codes:
0 every plan resolves, 1 at least one plan has errors, 2 a plan or model could not be read (the
other plans are still checked; with --format json each such plan is ``{"plan", "ok": false,
"error"}``).
"""

from __future__ import annotations

import json
import sys

HELP = "type-check plans against a model; print the resolved plan"


def add_arguments(p) -> None:
    p.add_argument("plans", nargs="+", metavar="PLAN", help="one or more .expand plan files")
    p.add_argument("--model", "-m", help="model to check against (overrides the plan's `model` statement)")
    p.add_argument("--format", choices=("text", "json"), default="text", help="output format (json for CI)")
    p.add_argument("--context", type=int, default=2048, help="context length for FLOPs per token (default 2048)")
    p.add_argument("--no-cache", action="store_true", help="re-trace the model instead of using the IR cache")


def run(args) -> int:
    from scaler_wizard.compiler.frontend import load_and_check
    from scaler_wizard.diagnostics import PlanError, render, to_json
    from scaler_wizard.compiler.report import plan_to_dict, render_plan

    from scaler_wizard.diagnostics import UsageError

    if args.context <= 0:
        raise UsageError("--context must be a positive number of tokens")
    status = 0
    results = []
    for path in args.plans:
        try:
            resolved, sources = load_and_check(path, model=args.model, context=args.context, use_cache=not args.no_cache)
        except UsageError as e:  # this plan (or its model) could not be read: the others are still checked
            status = 2
            if args.format == "json":
                results.append({"plan": path, "ok": False, "error": str(e)})
            else:
                sys.stderr.write(f"scaler-wizard check: error: {e}\n")
            continue
        except PlanError as e:
            status = max(status, 1)
            if args.format == "json":
                results.append({"plan": path, "ok": False, "diagnostics": json.loads(to_json(e.diagnostics))})
            else:
                sys.stderr.write(render(e.diagnostics, getattr(e, "sources", None), color=sys.stderr.isatty()) + "\n")
                n = sum(1 for d in e.diagnostics if d.severity == "error")
                sys.stderr.write(f"{path}: {n} error{'s' if n != 1 else ''}\n")
            continue
        if args.format == "json":
            results.append({"plan": path, "ok": True, **plan_to_dict(resolved)})
        else:
            if resolved.warnings:
                sys.stderr.write(render(resolved.warnings, sources, color=sys.stderr.isatty()) + "\n")
            sys.stdout.write(render_plan(resolved, path) + "\n")
    if args.format == "json":
        sys.stdout.write(json.dumps(results, indent=2, default=str) + "\n")
    return status
