"""Human and machine renderings of a resolved plan (the `check` output)."""

from __future__ import annotations

import io
from typing import Any

from scaler_wizard.compiler.predict import human
from scaler_wizard.compiler.resolved import ResolvedPlan


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list) and len(v) > 8:
        return f"[{', '.join(map(str, v[:4]))}, ... ({len(v)} items)]"
    return str(v)


def plan_to_dict(rp: ResolvedPlan) -> dict:
    cb, ca = rp.costs_before, rp.costs_after
    return {
        "model": rp.model_ref,
        "model_type": rp.ir.model_type,
        "exactness": rp.exactness,
        "ops": [
            {
                "statement": o.text,
                "line": o.span.line,
                "kind": o.kind,
                "group": o.group,
                "old_size": o.old_size,
                "new_size": o.new_size,
                "method": o.method,
                "exactness": o.exactness,
                "reason": o.reason,
            }
            for o in rp.ops
        ],
        "layers": {"before": rp.ir.num_layers, "after": len(rp.layer_map), "map": [[s.src, s.init] for s in rp.layer_map]},
        "config_diff": {k: {"before": a, "after": b} for k, (a, b) in rp.config_diff().items()},
        "config_notes": list(rp.config_notes),
        "params": {"before": cb.params, "after": ca.params},
        "params_non_embedding": {"before": cb.params_non_embedding, "after": ca.params_non_embedding},
        "flops_per_token": {"before": cb.flops_per_token, "after": ca.flops_per_token, "context": ca.context},
        "memory_bytes": {
            "apply_peak": ca.apply_peak_bytes,
            "train_before": cb.train_bytes,
            "train_after": ca.train_bytes,
        },
        "alternatives": list(rp.alternatives),
        "warnings": [w.message for w in rp.warnings],
        **({"stages": [st.to_dict() for st in rp.stages], "schedule": schedule_of(rp)} if rp.stages else {}),
    }


def schedule_of(rp: ResolvedPlan) -> dict | None:
    """Total training FLOPs of the plan's `at step` schedule (None unless the `train` block gives
    ``steps``, ``batch_size`` and ``seq_len``; FLOPs/token at the check's context)."""
    from scaler_wizard.compiler.stages import schedule_flops

    tr = rp.train if isinstance(rp.train, dict) else {}
    need = [tr.get(k) for k in ("steps", "batch_size", "seq_len")]
    if not rp.stages or not all(isinstance(v, int) for v in need):
        return None
    steps, bs, seq = need
    tokens = bs * seq * int(tr.get("grad_accum", 1) or 1)
    return schedule_flops(rp.costs_after.flops_per_token, rp.stages, steps=steps, tokens_per_step=tokens)


def render_stages(rp: ResolvedPlan, con) -> None:
    from rich.table import Table

    con.print()
    con.print(f"growth schedule: {len(rp.stages)} stage(s) during training (FLOPs/token at ctx {rp.costs_after.context})")
    t = Table(box=None, pad_edge=False)
    for col in ("step", "statements", "exactness", "config", "parameters", "FLOPs/token", "optimizer"):
        t.add_column(col, overflow="fold")
    for st in rp.stages:
        cb, ca = st.rp.costs_before, st.rp.costs_after
        diff = ", ".join(f"{k} {_fmt(a)}->{_fmt(b)}" for k, (a, b) in st.rp.config_diff().items()) or "unchanged"
        opt = st.optimizer + (f", rewarm {st.rewarm}" if st.rewarm else "")
        t.add_row(str(st.step), st.text.replace("\n", "; "), st.rp.exactness, diff,
                  f"{cb.params:,} -> {ca.params:,}", f"{human(cb.flops_per_token)} -> {human(ca.flops_per_token)}", opt)
    con.print(t)
    sch = schedule_of(rp)
    if sch is None:
        con.print("total training FLOPs: give steps, batch_size and seq_len in `train { }` to see it")
    else:
        con.print(f"total training FLOPs of the schedule: {human(sch['total_flops'])} "
                  f"({sch['tokens_per_step']:,} tokens/step, 3 x forward FLOPs/token)")


def render_plan(rp: ResolvedPlan, path: str = "") -> str:
    from rich.console import Console
    from rich.table import Table

    buf = io.StringIO()
    con = Console(file=buf, width=110, force_terminal=False, color_system=None, highlight=False)
    ir = rp.ir
    con.print(
        f"plan {path or '<plan>'}: model {rp.model_ref} ({ir.model_type}, {ir.architecture})  exactness: {rp.exactness}",
        soft_wrap=True,
    )

    ops = Table(title=None, show_lines=False, box=None, pad_edge=False)
    for col in ("#", "statement", "exactness", "what happens"):
        ops.add_column(col, overflow="fold")
    for n, o in enumerate(rp.ops, 1):
        if o.kind == "upcycle":
            what = f"ffn -> {o.new_size} experts, top-{o.options.get('top_k')}: {o.reason}"
        elif o.kind == "widen":
            what = f"{o.group} {o.old_size} -> {o.new_size} by {o.method}: {o.reason}"
        else:
            what = f"-> {len(o.layer_map)} layers: {o.reason}"
        ops.add_row(str(n), o.text, o.exactness, what)
    if not rp.ops:
        ops.add_row("-", "(no growth ops)", "exact", "the model is unchanged")
    con.print(ops)

    diff = rp.config_diff()
    if diff:
        t = Table(box=None, pad_edge=False)
        t.add_column("config key")
        t.add_column("before", justify="right")
        t.add_column("after", justify="right")
        for k, (a, b) in diff.items():
            t.add_row(k, _fmt(a) if k in rp.config_before else "(unset)", _fmt(b))
        con.print()
        con.print(t)
        for note in rp.config_notes:
            con.print(f"  {note}", soft_wrap=True)

    cb, ca = rp.costs_before, rp.costs_after
    ratio = ca.params / cb.params if cb.params else float("nan")
    t = Table(box=None, pad_edge=False)
    t.add_column("")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    t.add_column("ratio", justify="right")
    t.add_row("parameters", f"{cb.params:,}", f"{ca.params:,}", f"x{ratio:.2f}")
    t.add_row(
        "non-embedding",
        f"{cb.params_non_embedding:,}",
        f"{ca.params_non_embedding:,}",
        f"x{ca.params_non_embedding / max(cb.params_non_embedding, 1):.2f}",
    )
    t.add_row("layers", str(ir.num_layers), str(len(rp.layer_map)), "")
    t.add_row(
        f"FLOPs/token (ctx {ca.context})",
        human(cb.flops_per_token),
        human(ca.flops_per_token),
        f"x{ca.flops_per_token / max(cb.flops_per_token, 1):.2f}",
    )
    t.add_row("memory to train", human(cb.train_bytes, "B"), human(ca.train_bytes, "B"), "")
    t.add_row("memory to apply (tensors)", "", human(ca.apply_peak_bytes, "B"), "")
    con.print()
    con.print(t)
    con.print("memory to train: bf16 weights + grads, fp32 master + Adam moments (16 B/param), activations excluded")
    if rp.alternatives:
        con.print()
        con.print("grow-to solver:")
        for a in rp.alternatives:
            con.print(f"  {a}")
    if rp.stages:
        render_stages(rp, con)
    return buf.getvalue().rstrip()
