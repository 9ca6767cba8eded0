"""Tensor classification: each parameter's axes rendered as group factors, its kind and sublayer."""

from __future__ import annotations

from collections import defaultdict

from scaler_wizard.ir.dims import CAT, PROD
from scaler_wizard.ir.discovery.analysis import Analysis
from scaler_wizard.ir.discovery.graph import _ancestors_of, _base, _param_of
from scaler_wizard.ir.discovery.norms import _norms
from scaler_wizard.ir.errors import IRDiscoveryError
from scaler_wizard.ir.model_ir import Axis, Factor, Segment, TensorInfo
from scaler_wizard.ir.trace import Traced, split_layer

def _render_prod(an: Analysis, atom, extra: dict[int, str]) -> list[Factor] | None:
    A = an.dg.atoms
    r = A.find(atom)
    nm = an.names.get(r) or extra.get(r)
    if nm is not None:
        return [Factor(nm, A.size(r))]
    e = A.exp.get(r)
    if e is None:
        return [Factor("const", A.size(r))]
    if e[0] == PROD:
        out: list[Factor] = []
        for p in e[1]:
            f = _render_prod(an, p, extra)
            if f is None:
                return None
            out.extend(f)
        return out
    # a concatenation inside a product: only identical parts are representable (const(n) x part)
    rendered = [_render_prod(an, p, extra) for p in e[1]]
    if all(x is not None and x == rendered[0] for x in rendered):
        return [Factor("const", len(rendered))] + rendered[0]
    return [Factor("const", A.size(r))]


def _render_axis(an: Analysis, atom, extra) -> list[list[Factor]]:
    A = an.dg.atoms
    if atom is None:
        return [[]]
    r = A.find(atom)
    e = A.exp.get(r)
    if r not in an.names and r not in extra and e is not None and e[0] == CAT:
        segs: list[list[Factor]] = []
        for p in e[1]:
            segs.extend(_render_axis(an, p, extra))
        return segs
    if r not in an.names and r not in extra and e is not None and e[0] == PROD and e[1]:
        # (a | b | c) x d, the concatenation outermost (row-major): the axis is the concatenation
        # a x d | b x d | c x d. Multi-query attention's fused projection: (heads | 1 | 1) x head_dim.
        first = A.find(e[1][0])
        fe = A.exp.get(first)
        if first not in an.names and first not in extra and fe is not None and fe[0] == CAT:
            rest: list[Factor] = []
            for p in e[1][1:]:
                f = _render_prod(an, p, extra)
                if f is None:
                    break
                rest.extend(f)
            else:
                segs = []
                for p in fe[1]:
                    segs.extend(seg + rest for seg in _render_axis(an, p, extra))
                return segs
    f = _render_prod(an, atom, extra)
    return [f if f is not None else [Factor("const", A.size(r))]]


def classify_tensors(tp: Traced, an: Analysis, cfg, ikeys, extra):
    """(tensors, norm infos, router parameter names) of one trace."""
    A = an.dg.atoms
    tied_dupe_of: dict[str, str] = {}
    for s in tp.tied_sets:
        used = {u.name for u in an.dg.uses}
        live = next((n for n in s if n in used), next((n for n in s if n in an.dg.param_axes), s[0]))
        for n in s:
            tied_dupe_of[n] = live
    roles: dict[str, dict[int, str]] = defaultdict(dict)
    use_ops: dict[str, set[str]] = defaultdict(set)
    for u in an.dg.uses:
        use_ops[u.name].add(u.op)
    roles_by_module: dict[tuple[str, str], dict[int, str]] = defaultdict(dict)
    _prio = {"elem": 0, "out": 1, "in": 1, "index": 2, "expert": 3}
    for u in an.dg.uses:
        for ax, r in u.axes_roles.items():
            for tgt in (roles[u.name], roles_by_module[(u.name, u.module)]):
                if ax not in tgt or _prio[r] > _prio[tgt[ax]]:
                    tgt[ax] = r
    norm_infos, norm_params = _norms(tp, an, cfg, ikeys)
    router_params = set()
    for tk in an.topk_nodes:
        for a in _ancestors_of(tp.exported, tk):
            if _base(a) == "linear":
                p = _param_of(an, a.args[1])
                ax = an.dg.param_axes.get(p) if p else None
                if ax and ax[0] is not None and an.names.get(A.find(ax[0])) == "experts":
                    router_params.add(p)

    templates: dict[str, dict] = {}
    buffers = getattr(tp, "buffer_shapes", {})
    for name, shape in [*tp.param_shapes.items(), *buffers.items()]:
        src = tied_dupe_of.get(name, name)
        is_buffer = name in buffers and name not in tp.param_shapes
        axes_atoms = an.dg.buffer_axes.get(name) if is_buffer else an.dg.param_axes.get(src)
        if axes_atoms is None and is_buffer:
            # a stored buffer the traced forward does not read (a layer kind without it in the trace):
            # carried as it is, its axes in no group
            axes_atoms = [None] * len(shape)
        if axes_atoms is None:
            raise IRDiscoveryError(f"parameter {name} is not used by the traced forward", module=name.rsplit(".", 1)[0])
        mpath, mtype = tp.param_modules[name]
        r = roles_by_module.get((src, mpath)) or roles.get(src, {})
        axes = []
        for k, a in enumerate(axes_atoms):
            if a is not None:
                segs = _render_axis(an, a, extra)
            else:
                segs = [[Factor("const", shape[k])]] if shape[k] > 1 else [[]]
            role = r.get(k, "other")
            axes.append(Axis(tuple(Segment(tuple(s)) for s in segs), role))
        tmpl, li = split_layer(name, tp.layer_list_path)
        mt, _ = split_layer(mpath, tp.layer_list_path)
        if is_buffer:
            kind = "buffer"  # stored state the forward reads (a router's score correction, a layer scalar)
        elif name in norm_params:
            kind = norm_params[name]
        elif name in router_params:
            kind = "router"
        elif name == an.lm_head or (name in tied_dupe_of and mpath == (an.lm_head or "").rsplit(".", 1)[0]):
            kind = "lm_head"
        elif any(x.role == "index" for x in axes):
            kind = "embedding"
        elif name.endswith("bias"):
            kind = "bias"
        elif name.endswith("weight") or any(x.role in ("in", "out", "expert") for x in axes):
            kind = "weight"
        elif li is not None and axes and all(x.role == "elem" or not x.groups() for x in axes) \
                and use_ops.get(src) == {"mul"}:
            # a per-layer gain that only multiplies (elementwise) and is no norm's: Doge's residual
            # scales (`residual * input_residual + attn_out`), layer scales. A new layer's block adds
            # 0 to the stream only when such a gain is ones (compiler.passes.depth)
            kind = "scale"
        else:
            kind = "other"
        groups_here = {f.group for x in axes for s in x.segments for f in s.factors}
        if name in router_params or "experts" in groups_here:
            sub = "moe"
        elif groups_here & {"heads", "kv_heads", "head_dim"}:
            sub = "attn"
        elif "ffn" in groups_here:
            sub = "mlp"
        else:
            sub = None
        info = dict(name=tmpl, shape=tuple(shape), axes=tuple(axes), module=mt, module_type=mtype, kind=kind,
                    sublayer=sub if li is not None else None)
        # one entry per template and shape: layers of a kind whose tensor has another shape (a
        # sliding-window layer's attention with its own head counts) get an entry of their own; the
        # same shape read with other factors in another layer (Llama-4's complex RoPE splits head_dim
        # on its RoPE layers only) stays one entry, laid out as the first layer reads it
        key = (tmpl, tuple(shape))
        if key in templates:
            if li is not None:
                templates[key]["layers"] |= set(tp.layer_map.get(li, ()))
        else:
            info["layers"] = set(tp.layer_map.get(li, ())) if li is not None else None
            templates[key] = info
    for info in templates.values():
        if info["sublayer"] is None and info["layers"] is not None:
            sib = [o["sublayer"] for o in templates.values() if o["module"] == info["module"] and o["sublayer"]]
            if sib:
                info["sublayer"] = sib[0]
    for info in templates.values():
        # a bias added by hand (FalconLinear: x @ W.T + b) is traced as an elementwise add; when its
        # module's weight has an output axis of the same factors, it is that output's bias (role out)
        ax = info["axes"]
        # Stacked experts' biases ([experts, hidden], GPT-OSS's down_proj_bias, added to x @ W[e]) are
        # the same: the leading axes are the experts, the last the output's.
        if info["kind"] == "bias" and ax and ax[-1].role == "elem" and all(x.role == "expert" for x in ax[:-1]):
            sib = [o for o in templates.values() if o["module"] == info["module"] and o["kind"] == "weight"]
            if any(x.role == "out" and x.segments == ax[-1].segments for o in sib for x in o["axes"]):
                info["axes"] = tuple(ax[:-1]) + (Axis(ax[-1].segments, "out"),)
    tensors = []
    for info in templates.values():
        layers = None if info["layers"] is None else tuple(sorted(info["layers"]))
        tensors.append(TensorInfo(**{**info, "layers": layers}))
    tensors.sort(key=lambda t: (t.layers is not None, t.name))
    return tensors, norm_infos, router_params
