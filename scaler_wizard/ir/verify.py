"""IR invariants. ``check_ir(ir)`` returns a list of problems (empty when the IR is sound)."""

from __future__ import annotations

from scaler_wizard.ir.model_ir import ModelIR


def check_ir(ir: ModelIR) -> list[str]:
    errs: list[str] = []
    names = {t.name for t in ir.tensors}
    for t in ir.tensors:
        if len(t.axes) != len(t.shape):
            errs.append(f"{t.name}: {len(t.axes)} axes for shape {t.shape}")
            continue
        for k, (ax, n) in enumerate(zip(t.axes, t.shape)):
            if ax.size != n:
                errs.append(f"{t.name} axis {k}: layout size {ax.size} != shape {n}")
            for s in ax.segments:
                for f in s.factors:
                    if f.group != "const" and f.group in ir.groups and ir.groups[f.group].size != f.size:
                        errs.append(f"{t.name} axis {k}: {f.group}({f.size}) but the group has size {ir.groups[f.group].size}")
                    if f.group != "const" and f.group not in ir.groups:
                        errs.append(f"{t.name} axis {k}: unknown group {f.group}")
        if t.layers is not None and any(not (0 <= i < ir.num_layers) for i in t.layers):
            errs.append(f"{t.name}: layer index out of range")
    for g in ir.groups.values():
        for tn, k in g.members:
            if tn not in names:
                errs.append(f"group {g.name}: member {tn} is not a tensor")
                continue
            if g.name not in ir.tensor(tn).axes[k].groups():
                errs.append(f"group {g.name}: {tn} axis {k} does not carry it")
        if not g.members:
            errs.append(f"group {g.name}: no members")
    for s in ir.tied:
        shapes = {ir.tensor(n).shape for n in s if n in names}
        if len(shapes) > 1:
            errs.append(f"tied {s}: shapes differ {shapes}")
        for n in s:
            if n not in names:
                errs.append(f"tied {s}: {n} is not a tensor")
    for n in ir.norms:
        for w in (n.weight, n.bias):
            if w and w not in names:
                errs.append(f"norm {w}: not a tensor")
        if n.group not in ir.groups:
            errs.append(f"norm {n.weight}: group {n.group} unknown")
    a = ir.attention
    if a is not None:
        if "heads" in ir.groups and ir.groups["heads"].size != a.heads:
            errs.append("attention heads disagree with group heads")
        if a.kv_heads and a.heads % a.kv_heads:
            errs.append(f"heads {a.heads} not a multiple of kv_heads {a.kv_heads}")
        for w in (a.q, a.k, a.v, a.o, a.fused_qkv):
            if w and w not in names:
                errs.append(f"attention tensor {w} unknown")
    for w in ir.residual.writers + ir.residual.readers:
        if w not in names:
            errs.append(f"residual tensor {w} unknown")
    for g in ("hidden", "vocab"):
        if g not in ir.groups:
            errs.append(f"no {g} group")
    return errs
