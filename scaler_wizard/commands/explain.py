"""`scaler-wizard explain PLAN [--model M]`: what the plan does to every tensor.

Per layer template (layers with the same treatment are folded: ``model.layers.{0,1,3}.mlp...``):
old shape -> new shape, status, exactness and the operations applied; each statement's method with
its summary and source, from the method registry (``compiler/methods``). Exit codes as `compile`.
"""

from __future__ import annotations

import re
import sys

from scaler_wizard.commands import seed_arg

from scaler_wizard.ir.printer import ranges

HELP = "show what a plan does to every tensor"


def _template(name: str) -> tuple[str, int | None]:
    m = re.match(r"^(.*?\.)(\d+)(\..*)$", name)
    if not m:
        return name, None
    return f"{m.group(1)}{{i}}{m.group(3)}", int(m.group(2))


def explain_lines(prog, rp) -> list[str]:
    ir = rp.ir
    old_shapes = {}
    for t in ir.tensors:
        for n in t.names():
            old_shapes[n] = t.shape
    groups: dict[tuple, list[int]] = {}
    order = []
    for name, o in prog.outputs.items():
        tmpl, layer = _template(name)
        src = o.node
        explain = re.sub(r"(new layer |old layer \d+ moved to )\d+", r"\1#", o.explain)
        old = old_shapes.get(name)
        if old is None and layer is not None:
            old = old_shapes.get(tmpl.replace("{i}", "0"))
        key = (tmpl, tuple(old) if old else None, tuple(o.node.shape), o.status, o.exactness, explain)
        if key not in groups:
            groups[key] = []
            order.append(key)
        if layer is not None:
            groups[key].append(layer)
        del src
    lines = [f"plan against {rp.model_ref} ({ir.model_type}): {rp.exactness}"]
    for o in rp.ops:
        lines.append(f"  {o.text}: {o.exactness} -- {o.reason}")
        spec = o.spec  # the method's registry entry (compiler/methods)
        if spec is not None and not o.options.get("implied"):
            lines.append(f"    method `{spec.name}`: {spec.summary} [{spec.source}]")
    diff = rp.config_diff()
    if diff:
        lines.append("config: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items() if k != "architectures"))
    lines.append("")
    for key in order:
        tmpl, old, new, status, ex, explain = key
        layers = groups[key]
        name = tmpl.replace("{i}", "{" + ranges(layers) + "}") if layers else tmpl
        shape = f"{list(old) if old else '-'} -> {list(new)}"
        lines.append(f"{name}  {shape}  [{status}, {ex}]")
        if explain and explain != "unchanged":
            lines.append(f"    {explain}")
    return lines


def add_arguments(p) -> None:
    p.add_argument("plan", metavar="PLAN", help="the .expand plan file")
    p.add_argument("--model", "-m", help="model (overrides the plan's `model` statement)")
    p.add_argument("--seed", type=seed_arg, help="override the plan's seed")


def run(args) -> int:
    from scaler_wizard import api

    rp = api.check(args.plan, args.model, seed=args.seed)
    prog = api.compile(rp)
    sys.stdout.write("\n".join(explain_lines(prog, rp)) + "\n")
    return 0
