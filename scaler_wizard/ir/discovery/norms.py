"""Norms: kind (LayerNorm / RMSNorm / 1+w), group, placement (pre / post / sandwich / qk) and sublayer."""

from __future__ import annotations

from collections import defaultdict

from scaler_wizard.ir.dims import owner
from scaler_wizard.ir.discovery.analysis import Analysis
from scaler_wizard.ir.discovery.graph import (
    ATTN_OPS,
    _ancestors,
    _base,
    _deep_atoms,
    _float_keys,
    _layer_of,
    _param_of,
    _skip_trivial_back,
    _skip_trivial_fwd,
    _tied_src,
    _weight_of,
)
from scaler_wizard.ir.model_ir import NormInfo
from scaler_wizard.ir.trace import Traced, split_layer

def _eps_key(eps, cfg):
    if eps is None:
        return None
    for k, v in sorted(_float_keys(cfg).items()):
        if v and abs(v - eps) <= 1e-6 * abs(v) + 1e-12 and ("eps" in k or "epsilon" in k):
            return k
    for k, v in sorted(_float_keys(cfg).items()):
        if v and abs(v - eps) <= 1e-6 * abs(v):
            return k
    return None


def _norms(tp: Traced, an: Analysis, cfg, ikeys):
    ep = tp.exported
    A = an.dg.atoms
    nodes = list(ep.graph.nodes)
    by_mod: dict[str, list] = defaultdict(list)
    for n in nodes:
        if n.op == "call_function":
            by_mod[owner(n)].append(n)
    norm_mods = []
    for m, ns in by_mod.items():
        bases = [_base(n) for n in ns]
        if any(b in ("layer_norm", "native_layer_norm") for b in bases):
            norm_mods.append((m, "layernorm"))
        elif any(b in ("rms_norm", "_fused_rms_norm") for b in bases):
            # torch's own RMSNorm op (nn.RMSNorm, often without a gain: DiffLlama's per-head subln)
            norm_mods.append((m, "rmsnorm"))
        elif "rsqrt" in bases and any(b in ("mean", "pow") for b in bases):
            # x - mean(x) before the rsqrt: a LayerNorm written by hand (Cohere's, without bias)
            centred = any(b == "sub" and any(hasattr(x, "op") and _base(x) == "mean" for x in n.args[:2])
                          for n, b in zip(ns, bases))
            norm_mods.append((m, "layernorm" if centred else "rmsnorm"))
    # residual adds: adds in a layer of two [.., hidden] values where one derives from the other
    anc = _ancestors(ep)
    hid = A.find(an.hidden_atom)
    res_adds = []
    for n in nodes:
        if _base(n) != "add" or len(n.args) < 2 or not all(hasattr(x, "name") for x in n.args[:2]):
            continue
        a, b = n.args[:2]
        va, vb = an.dg.values.get(a.name), an.dg.values.get(b.name)
        if not va or not vb or not va[-1] or not vb[-1] or _param_of(an, a) or _param_of(an, b):
            continue
        if A.find(va[-1][0]) != hid or A.find(vb[-1][0]) != hid or len(va[-1]) != 1:
            continue
        if a.name in anc[b.name]:
            res_adds.append((n, a, b))
        elif b.name in anc[a.name]:
            res_adds.append((n, b, a))
    res_adds = [x for x in res_adds if _layer_of(tp, owner(x[0])) is not None]
    skip_names = {_skip_trivial_back(s).name for _, s, _ in res_adds} | {s.name for _, s, _ in res_adds}
    branch_names = {_skip_trivial_back(b).name for _, _, b in res_adds} | {b.name for _, _, b in res_adds}
    branch_of = {n.name: b for n, _, b in res_adds}
    first_layer_idx = min((i for i, n in enumerate(nodes) if _layer_of(tp, owner(n)) is not None), default=0)
    idx = {n.name: i for i, n in enumerate(nodes)}

    infos = []
    params: dict[str, str] = {}
    # per layer-template: collect one NormInfo per template module
    seen: dict[str, int] = {}
    for m, kind in norm_mods:
        ns = by_mod[m]
        mparams = [p for p, (mp, _) in tp.param_modules.items() if mp == m]
        w = next((p for p in mparams if p.endswith("weight")), None)
        b = next((p for p in mparams if p.endswith("bias")), None)
        eps = None
        for n in ns:
            if _base(n) in ("layer_norm", "native_layer_norm"):
                eps = n.args[4] if len(n.args) > 4 else n.kwargs.get("eps", 1e-5)
            elif _base(n) in ("rms_norm", "_fused_rms_norm"):
                # rms_norm(input, normalized_shape, weight=None, eps=None); None: the dtype's epsilon
                eps = n.args[3] if len(n.args) > 3 else n.kwargs.get("eps")
            elif _base(n) == "rsqrt":
                src = n.args[0]
                if _base(src) == "add" and isinstance(src.args[1], (int, float)):
                    eps = float(src.args[1])
        if kind == "rmsnorm" and w is not None:
            for n in ns:
                if _base(n) == "add" and any(isinstance(x, (int, float)) and x == 1 for x in n.args[1:]):
                    srcs = [_skip_trivial_back(x) for x in n.args if hasattr(x, "name")]
                    if any(s.name in an.dg.placeholder_param and an.dg.placeholder_param[s.name] == w for s in srcs):
                        kind = "rmsnorm_1p"
        group = None
        if w is not None:
            wa = an.dg.param_axes.get(w) or an.dg.param_axes.get(_tied_src(tp, w, an))
            if wa and wa[-1] is not None:
                group = an.names.get(A.find(wa[-1]))
        # input and output of the module invocation
        in_node = next((a for n in ns for a in n.all_input_nodes if owner(a) != m and a.name not in an.dg.placeholder_param
                        and a.op != "placeholder" or (a.op == "placeholder" and a.name not in an.dg.placeholder_param
                        and a.name not in (ep.graph_signature.inputs_to_buffers or {}))), None)
        if group is None and in_node is not None:
            # no gain to read the axis off (Llama-4's L2 q/k norm, OLMo's LayerNorm): the normalised
            # axis is the input's last one (a product after Llama-4's complex RoPE: [head_dim pairs, 2]);
            # one named group among its factors names it
            va = an.dg.values.get(in_node.name)
            if isinstance(va, list) and va and va[-1]:
                named = {an.names.get(A.find(x)) for x in va[-1]} - {None}
                if not named:
                    # an unnamed axis built from one group (DiffLlama's subln over cat(head_dim, head_dim))
                    named = {an.names.get(y) for x in va[-1] for y in _deep_atoms(A, x)} - {None}
                if len(named) == 1:
                    group = named.pop()
        if group is None:
            group = "hidden"
        out_node = max((n for n in ns if any(owner(u) != m for u in n.users)), key=lambda n: idx[n.name], default=ns[-1])
        li = _layer_of(tp, m)
        sub = None
        if group == "head_dim":
            # over q/k (or v) before the attention scores, or over the attention's output before
            # the output projection (DiffLlama's per-head subln): that one writes the stream linearly
            placement = "qk" if _reaches_attention(an, out_node) else "head_out"
        elif li is None:
            placement = "embed" if idx[ns[0].name] < first_layer_idx else "final"
        else:
            o = _skip_trivial_fwd(out_node)
            src = _skip_trivial_back(in_node) if in_node is not None else None
            consumers = list(o.users) + list(out_node.users)
            becomes_stream = o.name in skip_names or out_node.name in skip_names or any(
                _layer_of(tp, owner(u)) != li for u in consumers if u.op == "call_function")
            if o.name in branch_names or out_node.name in branch_names:
                placement = "sandwich_post"
                sub = _sublayer_back(an, in_node)
            elif becomes_stream:
                placement = "post"
                sub = _sublayer_back(an, branch_of.get(src.name, src) if src is not None else None)
            else:
                placement = "pre"
                sub = _sublayer_fwd(an, out_node)
        tmpl_m, _ = split_layer(m, tp.layer_list_path)
        wt = split_layer(w, tp.layer_list_path)[0] if w else None
        bt = split_layer(b, tp.layer_list_path)[0] if b else None
        layers = tuple(sorted(tp.layer_map.get(li, ()))) if li is not None else None
        if w:
            params[w] = "norm_weight"
        if b:
            params[b] = "norm_bias"
        ni = NormInfo(weight=wt, bias=bt, kind=kind, group=group, placement=placement, eps=float(eps) if eps is not None else 0.0,
                      eps_key=_eps_key(eps, cfg), sublayer=sub if placement not in ("qk", "head_out") else "attn", layers=layers,
                      feeds_head=placement == "final" and _reaches_head(an, out_node))
        if tmpl_m in seen:
            old = infos[seen[tmpl_m]]
            if layers is not None:
                infos[seen[tmpl_m]] = NormInfo(**{**old.__dict__, "layers": tuple(sorted(set(old.layers or ()) | set(layers)))})
            continue
        seen[tmpl_m] = len(infos)
        infos.append(ni)
    finals = [i for i, n in enumerate(infos) if n.placement == "final" and n.group == "hidden"]
    if finals and not any(infos[i].feeds_head for i in finals) and an.lm_head is None:
        # the head is not a projection discovery names (a matmul by the embedding): the last final
        # norm in execution order is the one before it
        infos[finals[-1]] = NormInfo(**{**infos[finals[-1]].__dict__, "feeds_head": True})
    if any(n.placement == "sandwich_post" for n in infos):
        infos = [NormInfo(**{**n.__dict__, "placement": "sandwich_pre"}) if n.placement == "pre" else n for n in infos]
    # norm params of every traced layer (not only the template's first)
    all_params = {}
    for p, k in params.items():
        all_params[p] = k
    for p in tp.param_shapes:
        t, _ = split_layer(p, tp.layer_list_path)
        for q, k in params.items():
            if split_layer(q, tp.layer_list_path)[0] == t:
                all_params[p] = k
    return infos, all_params


def _reaches(node, step) -> bool:
    """Walk the users of ``node`` (call_function nodes only): ``step(user)`` says True (found: stop,
    True), False (do not walk through this user) or None (walk on through it)."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        for u in n.users:
            if u.op != "call_function":
                continue
            found = step(u)
            if found:
                return True
            if found is None:
                stack.append(u)
    return False


def _reaches_attention(an: Analysis, node) -> bool:
    """Whether ``node`` feeds an attention op (or the softmax of scores) through no parameter
    projection."""

    def step(u):
        if _weight_of(an, u) is not None:
            return False
        return True if _base(u) in ATTN_OPS or _base(u) in ("softmax", "_softmax") else None

    return _reaches(node, step)


def _reaches_head(an: Analysis, node) -> bool:
    """Whether the LM head's projection reads ``node`` through no other projection (elementwise ops,
    views, slices and casts in between are fine)."""

    def step(u):
        w = _weight_of(an, u)
        if w is not None:
            return an.lm_head is not None and w in (an.lm_head, _tied_src(an.traced, an.lm_head, an))
        return False if _base(u) in ("linear", "addmm", "mm", "matmul", "bmm") else None

    return _reaches(node, step)


def _sublayer_of_param(an: Analysis, p: str | None) -> str | None:
    if p is None:
        return None
    A = an.dg.atoms
    groups = set()
    for a in an.dg.param_axes.get(p, []):
        if a is None:
            continue
        for x in _deep_atoms(A, a):
            nm = an.names.get(A.find(x))
            if nm:
                groups.add(nm)
    if "experts" in groups:
        return "moe"
    if groups & {"heads", "kv_heads", "head_dim"}:
        return "attn"
    if "ffn" in groups:
        return "mlp"
    return None


def _sublayer_fwd(an: Analysis, node):
    stack, seen = [node], set()
    found = set()
    while stack:
        n = stack.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        if _base(n) in ("linear", "addmm", "mm", "matmul", "bmm") and n is not node:
            w = n.args[1] if _base(n) == "linear" else n.args[-1] if _base(n) != "bmm" else n.args[0]
            s = _sublayer_of_param(an, _param_of(an, w)) or _sublayer_of_param(an, _param_of(an, n.args[1]))
            if s:
                found.add(s)
            continue
        if _base(n) in ATTN_OPS or _base(n) in ("softmax", "_softmax"):
            found.add("attn")
            continue
        stack.extend(n.users)
    if found == {"attn", "mlp"} or found == {"attn", "moe"}:
        return "attn+" + sorted(found - {"attn"})[0]
    if len(found) == 1:
        return found.pop()
    if "moe" in found:
        return "moe"
    return None


def _sublayer_back(an: Analysis, node):
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n is None or n.name in seen:
            continue
        seen.add(n.name)
        if _base(n) in ("linear", "addmm", "mm", "matmul", "bmm"):
            for w in n.args[:3]:
                s = _sublayer_of_param(an, _param_of(an, w)) if hasattr(w, "name") else None
                if s:
                    return s
        if _base(n) in ATTN_OPS or _base(n) in ("softmax", "_softmax"):
            return "attn"
        stack.extend(reversed(n.all_input_nodes))
    return None
