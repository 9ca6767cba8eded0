"""Mixture of experts (router, top-k) and the residual stream (writers, readers, embedding scale)."""

from __future__ import annotations

import math

from scaler_wizard.ir.dims import owner
from scaler_wizard.ir.discovery.graph import _base, _layer_of, _skip_trivial_back, _skip_trivial_fwd
from scaler_wizard.ir.model_ir import MoEInfo, ResidualInfo
from scaler_wizard.ir.trace import split_layer

def _moe(tp, an, cfg, ikeys, bound, router_params) -> MoEInfo | None:
    if "experts" not in an.sizes or not an.topk_nodes:
        return None
    tk = an.topk_nodes[0]
    top_k = int(tk.meta["val"][0].shape[-1])
    vals = [u for u in tk.users if u.args[1] == 0]
    renorm = False
    for v in vals:
        for u in v.users:
            if _base(u) == "sum":
                renorm = any(_base(w) in ("div", "div_") for w in u.users)
    cands = sorted(k for k, v in ikeys.items() if v == top_k)
    tkk = cands[0] if len(cands) == 1 else None
    if len(cands) > 1:
        free = [k for k in cands if k not in bound.values()]
        tkk = free[0] if len(free) == 1 else None
    layers = sorted({l for p in router_params for l in tp.layer_map.get(_layer_of(tp, p.rsplit(".", 1)[0]), ())})
    router = split_layer(sorted(router_params)[0], tp.layer_list_path)[0] if router_params else ""
    return MoEInfo(num_experts=an.sizes["experts"], top_k=top_k, renormalize=renorm, router=router,
                   experts_key=bound.get("experts"), top_k_key=tkk, layers=tuple(layers))


def _residual(tp, an, tensors, norms, cfg) -> ResidualInfo:
    writers, readers = [], []
    for t in tensors:
        for ax in t.axes:
            if ax.groups() == ("hidden",) or "hidden" in ax.groups():
                if ax.role == "out" and t.kind in ("weight", "embedding"):
                    writers.append(t.name)
                if ax.role == "in" and t.kind in ("weight", "lm_head", "router"):
                    readers.append(t.name)
    placements = {n.placement for n in norms}
    if "sandwich_post" in placements:
        placement = "sandwich"
    elif "post" in placements:
        placement = "post"
    else:
        placement = "pre"
    scale, source = _embed_scale(tp, an, cfg)
    return ResidualInfo(placement=placement, writers=tuple(dict.fromkeys(writers)), readers=tuple(dict.fromkeys(readers)),
                        embed_scale=scale, embed_scale_source=source, nonlinear=_hidden_nonlinear(tp, an))


# elementwise functions f with f(mean of units) != mean of f(units) (hand-written GELUs go through erf / tanh)
_NONLINEAR = {"gelu", "relu", "silu", "tanh", "sigmoid", "elu", "selu", "celu", "leaky_relu", "hardtanh",
              "hardswish", "hardsigmoid", "mish", "softplus", "erf", "relu6", "gelu_", "relu_", "silu_", "tanh_"}


def _hidden_nonlinear(tp, an) -> tuple[str, ...]:
    """Modules (layer templates) where a nonlinear elementwise function reads a value whose last axis is
    exactly the hidden dimension."""
    A = an.dg.atoms
    hid = A.find(an.hidden_atom)
    out = []
    for n in tp.exported.graph.nodes:
        if n.op != "call_function" or _base(n) not in _NONLINEAR:
            continue
        v = an.dg.values.get(n.name)
        if not v or not isinstance(v, list) or not v[-1] or len(v[-1]) != 1 or A.find(v[-1][0]) != hid:
            continue
        out.append(split_layer(owner(n) + ".x", tp.layer_list_path)[0][:-2] or _base(n))
    return tuple(dict.fromkeys(out))


def _embed_scale(tp, an, cfg):
    ep = tp.exported
    tok = next(n for n in ep.graph.nodes if _base(n) == "embedding" and an.dg.placeholder_param.get(n.args[0].name) == an.token_embedding)
    o = _skip_trivial_fwd(tok)
    for u in list(o.users):
        if _base(u) != "mul":
            continue
        other = next((x for x in u.args if x is not o), None)
        val = None
        if isinstance(other, (int, float)):
            val = float(other)
        elif hasattr(other, "name"):
            src = _skip_trivial_back(other)
            buf = (ep.graph_signature.inputs_to_buffers or {}).get(src.name)
            if buf:
                mod = dict(tp.model.named_modules()).get(buf.rsplit(".", 1)[0][2:] if buf.startswith("m.") else buf.rsplit(".", 1)[0])
                floats = [v for k, v in vars(mod).items() if isinstance(v, float) and not k.startswith("_")
                          and "scale" in k] if mod is not None else []
                if len(floats) == 1:
                    val = floats[0]
        if val is None:
            continue
        h = an.sizes.get("hidden")
        src = "sqrt(hidden_size)" if h and abs(val - math.sqrt(h)) < 1e-4 * math.sqrt(h) else None
        return val, src
    return None, None
