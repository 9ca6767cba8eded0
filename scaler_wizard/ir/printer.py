"""A stable text dump of a ModelIR (for golden files and `scaler-wizard ir`)."""

from __future__ import annotations

from scaler_wizard.ir.model_ir import Axis, ModelIR


def axis_str(ax: Axis) -> str:
    segs = []
    for s in ax.segments:
        if not s.factors:
            segs.append("1")
            continue
        segs.append(" x ".join(f"{f.group}({f.size})" for f in s.factors))
    body = " | ".join(segs)
    return f"{ax.role}[{body}]"


def ranges(xs) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8" (sorted, runs of consecutive integers collapsed)."""
    xs = sorted(xs)
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)


def _layers(ls) -> str:
    return "" if ls is None else " layers " + ranges(ls)


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.6g}"
    return str(x)


def render_ir(ir: ModelIR) -> str:
    L: list[str] = []
    L.append(f"model {ir.model_type} ({ir.architecture}): {ir.num_layers} layers [{ir.layers_key}], "
             f"traced {ir.traced_layers}, {ir.total_params():,} params")
    L.append("groups:")
    for g in ir.groups.values():
        bind = g.config_key or (f"= {g.derived}" if g.derived else "unbound")
        if g.override_key:
            bind += f" (set {g.override_key} to override)"
        if g.companion_keys:
            bind += " (with " + ", ".join(g.companion_keys) + ")"
        L.append(f"  {g.name:<10} {g.size:>8}  {bind:<28} {len(g.members)} members{'' if g.per_layer else ' (model-wide)'}")
        if g.fixed:
            L.append(f"    cannot grow: {g.fixed}")
    L.append("tensors (globals and one layer template):")
    for t in ir.tensors:
        axes = " ; ".join(axis_str(a) for a in t.axes)
        sub = f" {t.sublayer}" if t.sublayer else ""
        L.append(f"  {t.name} {list(t.shape)} {t.kind}{sub} <{t.module_type}>: {axes}{_layers(t.layers)}")
    L.append("norms:")
    for n in ir.norms:
        sub = f" {n.sublayer}" if n.sublayer else ""
        L.append(f"  {n.placement:<13} {n.kind:<10} over {n.group} eps={_fmt(n.eps)} [{n.eps_key}]{sub}: "
                 f"{n.weight}{' + ' + n.bias if n.bias else ''}{_layers(n.layers)}")
    a = ir.attention
    if a is not None:
        L.append(f"attention: heads {a.heads}, kv_heads {a.kv_heads}, head_dim {a.head_dim}, "
                 f"scale {_fmt(a.scaling)} ({a.scaling_source})"
                 + (f", sliding_window {a.sliding_window}" if a.sliding_window else ""))
        if a.fused_qkv:
            L.append(f"  fused qkv ({a.fused_layout}): {a.fused_qkv}")
        else:
            L.append(f"  q {a.q}\n  k {a.k}\n  v {a.v}")
        L.append(f"  o {a.o}")
        if a.rope:
            r = a.rope
            L.append(f"rope: {r.style}, rotary_dim {r.rotary_dim} of {r.head_dim}, theta {_fmt(r.theta)}"
                     + (f", partial via {r.partial_key}" if r.partial_key else "")
                     + (f", type {r.rope_type}" if r.rope_type != "default" else "")
                     + (f", attention factor {_fmt(r.attention_factor)} on cos/sin" if r.attention_factor != 1.0 else "")
                     + (f", per-frequency {'/'.join(r.per_frequency)} ({r.rotary_dim // 2} pairs)" if r.per_frequency else ""))
        else:
            L.append("rope: none")
        for k in ir.attention_shapes:
            L.append(f"  attention of another shape{' (' + k.kind + ')' if k.kind else ''}: heads {k.heads}, "
                     f"kv_heads {k.kv_heads}, head_dim {k.head_dim} (constant: no group grows it){_layers(k.layers)}")
    else:
        L.append("attention: none found")
    if ir.moe:
        m = ir.moe
        L.append(f"moe: {m.num_experts} experts [{m.experts_key}], top_k {m.top_k} [{m.top_k_key}], "
                 f"renormalize {m.renormalize}, router {m.router}{_layers(m.layers)}")
    for mx in ir.mixers:
        L.append(f"mixer (not attention): {mx.module} <{mx.module_type}>{_layers(mx.layers)}: mixes tokens with "
                 + ", ".join(mx.ops))
    r = ir.residual
    L.append(f"residual: {r.placement}-norm"
             + (f", embed scale {_fmt(r.embed_scale)} ({r.embed_scale_source})" if r.embed_scale else ""))
    L.append("  writers: " + ", ".join(r.writers))
    L.append("  readers: " + ", ".join(r.readers))
    L.append("tied: " + ("; ".join(" = ".join(s) for s in ir.tied) if ir.tied else "none"))
    if ir.layer_arrays:
        L.append("per-layer config arrays: " + ", ".join(ir.layer_arrays))
    # The config class's base_model_tp_plan is upstream data, not a discovery: it stays in the JSON form
    # (tests use it as an oracle) but not in this dump, so that an upstream release cannot change it.
    for n in ir.notes:
        L.append(f"note: {n}")
    return "\n".join(L) + "\n"
