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
    g = p.add_argument_group("training hardware (memory per device for continued training of the grown model)")
    g.add_argument("--hardware", metavar="SPEC", help="e.g. 8xH100-80GB, 2xA100-40GB, L4")
    g.add_argument("--gpus", type=int, metavar="N", help="number of devices (with --gpu-memory)")
    g.add_argument("--gpu-memory", metavar="SIZE", help="memory per device, e.g. 80GB")
    g.add_argument("--cpu-memory", metavar="SIZE", help="host RAM for CPU offload, e.g. 512GB")
    g.add_argument("--all-setups", action="store_true", help="list every micro-batch size, not only the recipe's")


def run(args) -> int:
    from scaler_wizard.compiler.frontend import load_and_check
    from scaler_wizard.diagnostics import PlanError, render, to_json
    from scaler_wizard.compiler.report import plan_to_dict, render_plan

    from scaler_wizard.diagnostics import UsageError

    if args.context <= 0:
        raise UsageError("--context must be a positive number of tokens")
    status = 0
    results = []
    hw = None
    if args.hardware or args.gpus is not None or args.gpu_memory or args.cpu_memory:
        from scaler_wizard.runtime.hardware import parse_hardware

        hw = parse_hardware(args.hardware, args.gpus, args.gpu_memory, args.cpu_memory)
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
        try:
            training = _training_memory(path, resolved, hw, args.all_setups)
        except UsageError as e:
            status = 2
            sys.stderr.write(f"scaler-wizard check: error: {e}\n")
            continue
        if args.format == "json":
            results.append({"plan": path, "ok": True, **plan_to_dict(resolved), **training["json"]})
        else:
            if resolved.warnings:
                sys.stderr.write(render(resolved.warnings, sources, color=sys.stderr.isatty()) + "\n")
            sys.stdout.write(render_plan(resolved, path) + "\n")
            if training["text"]:
                sys.stdout.write(training["text"] + "\n")
        for w in training["warnings"]:
            sys.stderr.write(f"{path}: warning[SW640]: {w}\n")
    if args.format == "json":
        sys.stdout.write(json.dumps(results, indent=2, default=str) + "\n")
    return status


def rp_has_train(resolved) -> bool:
    return bool(getattr(resolved, "train", None))


def _training_memory(path, resolved, hw, show_all: bool) -> dict:
    """The LoRA memory line (when the plan's recipe uses LoRA) and the hardware table (with --hardware)."""
    from scaler_wizard.diagnostics import UsageError
    from scaler_wizard.runtime.recipe import recipe_from_plan

    out: dict = {"text": "", "json": {}, "warnings": []}

    if hw is None and not rp_has_train(resolved):
        return out
    try:
        recipe = recipe_from_plan(path)
    except UsageError:
        if hw is None:  # the LoRA line is extra: a recipe problem is for `train` to report
            return out
        raise
    if not recipe.lora_r and hw is None:
        return out
    from scaler_wizard.runtime import hardware as H

    shape = H.shape_of(resolved)
    lines = []
    if recipe.lora_r:
        roles = tuple(r.strip() for r in recipe.lora_targets.split(",") if r.strip())
        n = shape.lora_params(recipe.lora_r, roles)
        b = 4 * shape.params + 16 * n
        lines.append(f"memory to train with LoRA r={recipe.lora_r} ({n:,} adapter parameters): {b / H.GiB:.2f} GiB "
                     "(frozen fp32 base 4 B/param + adapters 16 B/param, activations excluded)")
        out["json"]["lora"] = {"r": recipe.lora_r, "adapter_params": n, "train_bytes": b}
    if hw is not None:
        setups = H.setups(shape, hw, recipe)
        best = H.recommend(setups)
        lines.append(H.render(shape, hw, recipe, setups, best, show_all))
        if best is None:
            out["warnings"].append(f"no training setup fits {hw.describe()}; it would fit on "
                                   f"{H.what_would_fit(shape, hw, recipe)}")
        out["json"]["hardware"] = {
            "devices": hw.gpus, "device_bytes": hw.gpu_bytes, "cpu_bytes": hw.cpu_bytes,
            "setups": [{"name": st.name, "processes": st.processes, "micro_batch": st.micro_batch,
                        "grad_accum": st.grad_accum, "device_bytes": st.device_bytes, "cpu_bytes": st.cpu_bytes,
                        "fits": st.fits, "emit_config": st.emit, "offload": st.offload} for st in setups],
            "recommended": None if best is None else {"name": best.name, "command": H.launch_line(best)},
        }
    out["text"] = "\n".join(lines)
    return out
