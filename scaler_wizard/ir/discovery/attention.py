"""Attention: the attention sites, q/k/v/o projections (separate or fused), softmax scale, RoPE."""

from __future__ import annotations

# `Analysis` in annotations: scaler_wizard.ir.discovery.analysis (not imported: it imports this module)

import math
import re
from dataclasses import dataclass
from typing import Any

from scaler_wizard.ir.config import rope_dicts, rope_type_of
from scaler_wizard.ir.dims import owner, shape_of
from scaler_wizard.ir.discovery.graph import ATTN_OPS, _TRIVIAL, _ancestors_of, _base, _float_keys, _layer_of, _weight_of
from scaler_wizard.ir.model_ir import AttentionInfo, RopeInfo
from scaler_wizard.ir.trace import Traced, split_layer

@dataclass
class Attn:
    """One attention site: SDPA, or eager matmul -> softmax -> matmul."""

    node: Any  # the op producing the attention output
    q: Any
    k: Any
    v: Any
    scale: float | None  # None: the op's default 1/sqrt(head_dim)
    kind: str  # "sdpa" | "eager"
    softcap: float | None = None


def _drops_sinks(node) -> bool:
    """``probs[..., :-k]``: a slice of the key axis (the last) from 0 after the softmax, which drops the
    columns of attention sinks (learned per-head logits concatenated to the scores before the softmax:
    gpt-oss, MiMo-V2-Flash's sliding layers); the probabilities left are the ones ``@ v`` reads."""
    if _base(node) != "slice" or len(node.args) < 2:
        return False
    shape = shape_of(node.args[0]) if hasattr(node.args[0], "op") else None
    dim = node.args[1]
    start = node.args[2] if len(node.args) > 2 else 0
    return (shape is not None and isinstance(dim, int) and dim % len(shape) == len(shape) - 1
            and start in (0, None))


def _find_attention(nodes) -> list[Attn]:
    out = []
    for n in nodes:
        if _base(n) in ATTN_OPS:
            sc = n.kwargs.get("scale")
            if sc is None and len(n.args) > 6:
                sc = n.args[6]
            out.append(Attn(n, n.args[0], n.args[1], n.args[2], sc, "sdpa"))
        elif _base(n) in ("softmax", "_softmax"):
            # eager: scores = matmul(q, k^T) [* scale] [softcap]; out = matmul(softmax, v)
            src, scale, softcap, chain = n.args[0], 1.0, None, []
            while src.op == "call_function" and _base(src) not in ("matmul", "bmm"):
                chain.append(src)
                if not src.all_input_nodes:
                    break
                src = src.args[0] if hasattr(src.args[0], "op") else src.all_input_nodes[0]
            if _base(src) not in ("matmul", "bmm"):
                continue
            consumer = None
            stack = list(n.users)
            while stack:
                u = stack.pop(0)
                if _base(u) in ("matmul", "bmm"):
                    consumer = u
                    break
                if _base(u) in _TRIVIAL or _base(u) in ("dropout", "to") or _drops_sinks(u):
                    stack.extend(u.users)
            if consumer is None:
                continue
            fwd = list(reversed(chain))
            skip = set()
            for t_i, c in enumerate(fwd):
                if _base(c) == "tanh":
                    if t_i > 0 and _base(fwd[t_i - 1]) == "div":
                        skip.add(t_i - 1)
                        softcap = next((float(x) for x in fwd[t_i - 1].args[1:] if isinstance(x, (int, float))), None)
                    if t_i + 1 < len(fwd) and _base(fwd[t_i + 1]) == "mul":
                        skip.add(t_i + 1)
            for c_i, c in enumerate(fwd):
                f = next((x for x in c.args[1:] if isinstance(x, (int, float)) and not isinstance(x, bool)), None)
                if f is None or c_i in skip:
                    continue
                if _base(c) == "mul":
                    scale *= float(f)
                elif _base(c) == "div":
                    scale /= float(f)
            out.append(Attn(consumer, src.args[0], src.args[1], consumer.args[1], scale, "eager", softcap))
    return out


def _linears_feeding(an, ep, target):
    res = []
    for a in _ancestors_of(ep, target) + [target]:
        p = _weight_of(an, a)
        if p:
            res.append(p)
    return res


def _attention(tp: Traced, an: Analysis, cfg, bound, tensors) -> AttentionInfo | None:
    if not an.attn_nodes:
        return None
    ep = tp.exported
    at = an.attn_nodes[0]
    n = at.node
    q, k, v = at.q, at.k, at.v
    qs = _linears_feeding(an, ep, q)
    ks = _linears_feeding(an, ep, k)
    vs = _linears_feeding(an, ep, v)
    li = _layer_of(tp, owner(n))

    def nearest(ps):
        ps = [p for p in ps if _layer_of(tp, p.rsplit(".", 1)[0]) == li]
        return ps
    qs, ks, vs = nearest(qs), nearest(ks), nearest(vs)
    only = lambda ps, excl: [p for p in ps if p not in excl and not p.endswith("bias")]
    qw = only(qs, set(ks) | set(vs)) or only(qs, set())
    kw = only(ks, set(qs) | set(vs)) or only(ks, set())
    vw = only(vs, set(qs) | set(ks)) or only(vs, set())
    # o: first linear consuming the attention output
    o = None
    stack, seen = list(n.users), set()
    while stack and o is None:
        u = stack.pop(0)
        if u.name in seen:
            continue
        seen.add(u.name)
        o = _weight_of(an, u)
        if o:
            break
        stack.extend(u.users)
    t = lambda p: split_layer(p, tp.layer_list_path)[0] if p else None
    fused = None
    layout = None
    if qw and kw and vw and qw[-1] == kw[-1] == vw[-1]:
        fused = t(qw[-1])
        ti = next((x for x in tensors if x.name == fused), None)
        outax = next((ax for ax in (ti.axes if ti else ()) if ax.role == "out"), None)
        layout = "concat" if outax is not None and len(outax.segments) > 1 else "per_head"
        qn = kn = vn = None
    else:
        qn, kn, vn = (t(x[-1]) if x else None for x in (qw, kw, vw))
    heads = an.sizes.get("heads", 0)
    hd = an.sizes.get("head_dim", 0)
    kvh = an.sizes.get("kv_heads", heads)
    scale = at.scale
    if scale is None:
        scale = 1.0 / math.sqrt(hd) if hd else 1.0
    pre = _q_prescale(q, _weighted_values(an, ep))
    if pre is not None:
        scale = scale * pre
    literal = _literal_scale_key(cfg, scale)
    if scale == 1.0:
        source = "none"
    elif literal is not None:
        # the config holds the scale itself (HyperCLOVAX's attention_multiplier, set to head_dim**-0.5
        # at load when absent): a grown head_dim keeps it, whatever it equals now
        source = f"config-value:{literal}"
    elif (stated := _stated_scale_key(cfg, scale)) is not None:
        # checked before head_dim: Gemma-2 2B/9B state query_pre_attn_scalar == head_dim (256), and a
        # grown head_dim keeps the config's scale (was taken for 1/sqrt(head_dim): q rescaled, not exact)
        source = f"config:{stated}"
    elif hd and abs(scale - hd ** -0.5) < 1e-9:
        source = "head_dim"
    else:
        source = "none"
        for key, val in sorted(cfg.items()):
            if isinstance(val, (int, float)) and not isinstance(val, bool) and val > 0 and not key.startswith("_"):
                if abs(val ** -0.5 - scale) < 1e-9:
                    source = f"config:{key}"
                    break
    rope = _rope(tp, an, ep, n, cfg, hd)
    sw = cfg.get("sliding_window")
    return AttentionInfo(heads=heads, kv_heads=kvh, head_dim=hd, scaling=float(scale), scaling_source=source,
                         q=qn, k=kn, v=vn, o=t(o), fused_qkv=fused, fused_layout=layout, rope=rope,
                         sliding_window=sw if isinstance(sw, int) and not isinstance(sw, bool) else None)


# config keys that hold a softmax scale itself (not a size it is derived from)
_SCALE_KEY = re.compile(r"^(attention_multiplier|attn_multiplier|softmax_scale|attn_scale|attention_scale|"
                        r"attn_scaling|query_scale)$")


# config keys whose value is the size the softmax scale is derived from (scale = value ** -0.5), read
# by the attention module whatever head_dim is (Gemma-2, Gemma-3)
_STATED_SCALE_KEYS = ("query_pre_attn_scalar",)


def _stated_scale_key(cfg, scale) -> str | None:
    for key in _STATED_SCALE_KEYS:
        val = cfg.get(key)
        if isinstance(val, (int, float)) and not isinstance(val, bool) and val > 0 and abs(val ** -0.5 - scale) < 1e-9:
            return key
    return None


def _literal_scale_key(cfg, scale) -> str | None:
    """The float config key named like a softmax scale whose value is the scale used."""
    for key, val in sorted(cfg.items()):
        if (isinstance(val, float) and not key.startswith("_") and _SCALE_KEY.search(key)
                and "rope" not in key and "rotary" not in key and abs(val - scale) <= 1e-9 * abs(scale)):
            return key
    return None


def _q_prescale(q, weighted: set[str] | None = None):
    """A scalar multiplying the queries between their projection and the attention op.

    Only values computed from the projection count (``weighted``: names of graph values that depend
    on a parameter): rotary embeddings multiply cos and sin by their attention factor (yarn,
    longrope), which is a property of the position encoding, not a softmax scale."""
    stack, seen, f = [q], set(), None
    while stack:
        n = stack.pop()
        if n.name in seen or n.op != "call_function":
            continue
        seen.add(n.name)
        if weighted is not None and n.name not in weighted:
            continue  # cos / sin and other position-only values
        b = _base(n)
        if b in ("linear", "addmm", "matmul", "mm"):
            continue  # the projection (Falcon's x @ W.T is a matmul)
        if b == "mul" and any(isinstance(x, float) for x in n.args):
            f = (f or 1.0) * next(x for x in n.args if isinstance(x, float))
        stack.extend(n.all_input_nodes)
    return f


def _weighted_values(an: Analysis, ep) -> set[str]:
    """Names of graph values that depend on at least one model parameter."""
    params = set(an.dg.placeholder_param)
    out: set[str] = set()
    for n in ep.graph.nodes:
        if n.name in params or any(a.name in out for a in n.all_input_nodes):
            out.add(n.name)
    return out


def per_frequency_keys(cfg: dict, pairs: int) -> tuple[str, ...]:
    """Rope parameter keys whose value is a list with one number per rotary pair (longrope's
    ``short_factor`` / ``long_factor``)."""
    keys = []
    for d in rope_dicts(cfg):
        for k, v in d.items():
            if (isinstance(v, list) and v and len(v) == pairs and k not in keys
                    and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
                keys.append(k)
    return tuple(sorted(keys))


def _rotary_module_facts(model, cfg) -> tuple[str, float]:
    """(rope_type, attention_factor): the type from the config's rope dict (else the rotary module's),
    the factor from the model's rotary embedding module (the module holding an ``inv_freq`` buffer),
    which records what it multiplies cos and sin by."""
    rtype, factor = rope_type_of(cfg, default=None), None  # the config's type: the trace may use a static stand-in
    for _, mod in model.named_modules():
        if "inv_freq" not in dict(mod.named_buffers(recurse=False)):
            continue
        t = getattr(mod, "rope_type", None)
        f = getattr(mod, "attention_scaling", None)
        if isinstance(t, str) and rtype is None:
            rtype = t
        if isinstance(f, (int, float)) and not isinstance(f, bool):
            factor = float(f)
        break
    return rtype or "default", 1.0 if factor is None else factor


def _rope(tp: Traced, an: Analysis, ep, attn, cfg, hd) -> RopeInfo | None:
    """RoPE as applied in ``attn``'s layer; where that layer applies none, in any other layer of the
    stack (layers of kinds without RoPE: Flint's full-attention layers are NoPE, its sliding ones
    rotary; head_dim growth must place the rotary layers' pairs, which the NoPE layers tolerate)."""
    m = owner(attn)
    found = _rope_in(tp, ep, cfg, hd, m.rsplit(".", 1)[0])
    if found is None and tp.layer_list_path and m.startswith(tp.layer_list_path + "."):
        found = _rope_in(tp, ep, cfg, hd, tp.layer_list_path + ".")
    return found


def _rope_in(tp: Traced, ep, cfg, hd, prefix: str) -> RopeInfo | None:
    for n in ep.graph.nodes:
        if _base(n) not in ("cat", "stack") or not owner(n).startswith(prefix):
            continue
        xs = n.args[0]
        if len(xs) != 2:
            continue
        a, b = xs
        if _base(a) == "neg" and _base(b) == "slice" and _base(a.args[0]) == "slice":
            src = b.args[0]
            if a.args[0].args[0] is src:
                sh = shape_of(src)
                step = a.args[0].args[4] if len(a.args[0].args) > 4 else 1
                style = "interleaved" if step == 2 or _base(n) == "stack" else "half"
                rot = sh[-1]
                theta = cfg.get("rope_theta")
                rp = cfg.get("rope_parameters") or cfg.get("rope_scaling")
                if theta is None and isinstance(rp, dict):
                    theta = rp.get("rope_theta")
                pkey = None
                if rot != hd:
                    for k, v in sorted(_float_keys(cfg).items()):
                        if abs(v * hd - rot) < 1e-6:
                            pkey = k
                            break
                    if pkey is None and isinstance(rp, dict):
                        for k, v in rp.items():
                            if isinstance(v, float) and abs(v * hd - rot) < 1e-6:
                                pkey = f"rope_parameters.{k}"
                rtype, afactor = _rotary_module_facts(tp.model, cfg)
                return RopeInfo(rotary_dim=rot, head_dim=hd, style=style, theta=float(theta) if theta else None,
                                partial_key=pkey, rope_type=rtype, attention_factor=afactor,
                                per_frequency=per_frequency_keys(cfg, rot // 2))
    return None
