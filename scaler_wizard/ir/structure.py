"""Structure keys and re-binding: one trace per model *structure*, any sizes.

The IR depends on a model's structure, not on its sizes: which config keys exist, the model type,
the non-numeric values (flags, activation names, layer kinds) and which integer values coincide
(discovery binds dimension groups to config keys by value, and differential tracing kicks in
where two keys share a value, so coincidences are part of the structure). :func:`structure_key`
hashes exactly that, with every number replaced by its equality class; :func:`rebind` takes an IR
traced for one config of a structure and re-binds it to another config of the same structure:

* group sizes follow their config key (``Group.config_key``, ``override_key``), their ``derived``
  expression, or, for a size the config class derives from keys the file omits (``head_dim``
  absent from a Llama config), the one product/quotient of the file's integers that gives it;
* every tensor axis is re-sized from its factors (``Factor.group``); a constant factor (a size the
  trace could not name as a group: OPT's position table of ``max_position_embeddings + 2`` rows, a
  fused part count) follows the affine formulas ``k * v + c`` of the old config's values that give
  it, which must all agree on the new value (a size none explains is not served: the config is
  traced); a constant beside group factors (a fused part count) stays only while no formula moves;
* attention (heads, kv_heads, head_dim, the softmax scale from ``head_dim`` or a config key), rope
  (theta, the rotated dimensions of a partial rotary), norm epsilons, the MoE expert count and
  top-k, and a ``sqrt(hidden_size)`` embedding scale are re-computed from the new values with the
  formulas transformers uses, each checked first to reproduce the traced value exactly.

Anything it cannot account for (a float that differs and that the IR does not read, a number in
a note, a derived size whose formula is ambiguous, new coincidences among the sizes) returns None,
and the caller traces as before. Pure Python: no torch, no transformers.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import replace
from typing import Any

from scaler_wizard.ir.model_ir import Axis, Factor, ModelIR, Segment

_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_SKIP = ("transformers_version", "_name_or_path", "name_or_path")


def _depth(cfg: dict) -> int | None:
    return next((cfg[k] for k in _LAYER_KEYS if isinstance(cfg.get(k), int) and not isinstance(cfg.get(k), bool)), None)


def _leaves(cfg: dict) -> dict[str, Any]:
    """Flattened config (``rope_parameters.rope_theta``), without the depth and private keys; lists
    with one entry per layer become the sorted set of their entries (which kinds exist)."""
    n = _depth(cfg)
    out: dict[str, Any] = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            k = str(k)  # to_dict()'s id2label has integer keys
            if k.startswith("_") or k in _SKIP or (not prefix and k in _LAYER_KEYS):
                continue
            path = prefix + k
            if isinstance(v, dict):
                out[path + "{}"] = None  # the dict exists (even empty)
                walk(v, path + ".")
            elif isinstance(v, list) and n and len(v) == n and not prefix:
                out[path] = sorted({json.dumps(x, sort_keys=True) for x in v})
            else:
                out[path] = v
    walk(cfg, "")
    return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _classes(values: list[int]) -> list:
    """Equality pattern of ``values``: -1, 0 and 1 (flags in disguise) kept as they are, every other
    value replaced by the index of its first occurrence."""
    first: dict[int, int] = {}
    out = []
    for i, v in enumerate(values):
        if v in (-1, 0, 1) or v < 0:
            out.append(["=", v])
        else:
            out.append(first.setdefault(v, i))
    return out


def _int_paths(leaves: dict) -> list[str]:
    return sorted(p for p, v in leaves.items() if _is_int(v))


def structure_key(cfg: dict, *, transformers_version: str, format_version: int) -> str:
    """Hash of the structure of a raw config dict (as read from config.json): sizes symbolic."""
    leaves = _leaves(cfg)
    ints = _int_paths(leaves)
    shape = {p: ("int" if _is_int(v) else "float" if isinstance(v, float) else v) for p, v in leaves.items()}
    blob = json.dumps({"shape": shape, "ints": _classes([leaves[p] for p in ints]),
                       "tf": transformers_version, "fmt": format_version}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


# ------------------------------------------------------------------------------------------ rebind
_DERIVED = re.compile(r"^\s*(\w+)\s*(?:(//|\*)\s*(\w+))?\s*$")


def _eval_derived(expr: str, cfg: dict) -> int | None:
    m = _DERIVED.match(expr or "")
    if not m:
        return None
    a, op, b = m.groups()
    if op is None:
        return cfg.get(a) if _is_int(cfg.get(a)) else None
    va = int(a) if a.isdigit() else cfg.get(a)
    vb = int(b) if b.isdigit() else cfg.get(b)
    if not (_is_int(va) and _is_int(vb)):
        return None
    if op == "//":
        return va // vb if vb and va % vb == 0 else None
    return va * vb


def _derive_from_file(size: int, cfg: dict) -> list[str]:
    """The formulas of the first tier (``a``, then ``a // b``, then ``c * a``, then ``a * b``) over
    the file's top-level integers that give ``size`` (the config class's own default formula for a
    key the file omits, such as ``head_dim = hidden_size // num_attention_heads``, is among them)."""
    items = sorted((k, v) for k, v in cfg.items() if _is_int(v) and v > 1 and not k.startswith("_")
                   and k not in _LAYER_KEYS)
    tiers = [
        [a for a, va in items if va == size],
        [f"{a} // {b}" for a, va in items for b, vb in items if a != b and va % vb == 0 and va // vb == size],
        [f"{c} * {a}" for a, va in items for c in (2, 3, 4, 8) if va * c == size],
        [f"{a} * {b}" for a, va in items for b, vb in items if a < b and va * vb == size],
    ]
    return next((t for t in tiers if t), [])


_TOKEN_ID = ("_token_id", "_token_ids")


def _const_candidates(size: int, leaves: dict) -> list[tuple[str, int, int]]:
    """The affine formulas ``k * v + c`` over the config's integer values (not token ids, not the
    depth) that give ``size``: offsets ``v + c`` and ``2 v + c`` (|c| <= 2: OPT's position table of
    max_position_embeddings + 2 rows, a relative table of 2 v - 1) and multiples ``k v`` (k in 3, 4, 8):
    how a size the trace could not name as a group may depend on the config."""
    out = []
    for p, v in leaves.items():
        if not _is_int(v) or v <= 1 or p.endswith(_TOKEN_ID):
            continue
        for k in (1, 2, 3, 4, 8):
            c = size - k * v
            if c == 0 or (k <= 2 and -2 <= c <= 2):
                out.append((p, k, c))
    return out


def _rebind_const(size: int, ol: dict, nl: dict, *, multiplier: bool = False) -> int | None:
    """The new value of a constant factor (or of an axis the trace rendered without factors) of
    ``size`` in a config of the same structure: every affine formula of the old config that gives
    ``size`` must give the same value in the new one. A size of 1 stays (a singleton axis); a size
    no formula explains, or that two formulas explain differently, is unknown (None: trace).

    A ``multiplier`` (a constant beside group factors in one product: the 3 of GPT-NeoX's
    ``heads x 3 x head_dim``) is usually a count of fused parts, which a formula explains only by
    coincidence (heads - 1 when heads is 4): it stays when no formula moves, and is unknown when one
    does (a part count can follow the config too: ``q_per_kv + 2`` of a grouped fused qkv)."""
    if size <= 1:
        return size
    news = {k * nl[p] + c for p, k, c in _const_candidates(size, ol)}
    if multiplier:
        return size if news <= {size} else None
    return news.pop() if len(news) == 1 else None


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _same_formula(old_val: float, old_in: float, new_in: float, fn) -> float | None:
    """``fn(new_in)`` when ``fn(old_in)`` gives ``old_val`` exactly (in double or float32)."""
    if fn(old_in) == old_val:
        return fn(new_in)
    if _f32(fn(old_in)) == old_val:
        return _f32(fn(new_in))
    return None


def rebind(ir: ModelIR, old_raw: dict, new_raw: dict) -> ModelIR | None:
    """``ir`` (traced from ``old_raw``) with the sizes and values of ``new_raw``, a config of the
    same structure (:func:`structure_key`); None when something cannot be re-bound exactly.
    The depth and per-layer arrays are left to :func:`scaler_wizard.ir.instantiate`."""
    try:
        return _rebind(ir, old_raw, new_raw)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, OverflowError):
        return None


def _rebind(ir: ModelIR, old_raw: dict, new_raw: dict) -> ModelIR | None:
    if ir.attention_shapes:
        return None  # a layer kind's own attention sizes are constants the trace saw: traced again
    ol, nl = _leaves(old_raw), _leaves(new_raw)
    if set(ol) != set(nl):
        return None
    ints = _int_paths(ol)
    if _classes([ol[p] for p in ints]) != _classes([nl[p] for p in ints]):
        return None
    vmap = {ol[p]: nl[p] for p in ints}

    # -- groups
    sizes: dict[str, int] = {}
    for g in ir.groups.values():
        new = None
        if g.config_key and _is_int(old_raw.get(g.config_key)):
            if old_raw[g.config_key] != g.size:
                return None
            new = new_raw[g.config_key]
        elif g.override_key and _is_int(old_raw.get(g.override_key)):
            if old_raw[g.override_key] != g.size:
                return None
            new = new_raw[g.override_key]
        elif g.derived and _eval_derived(g.derived, old_raw) == g.size:
            new = _eval_derived(g.derived, new_raw)
        else:
            # a size the config class derives from keys the file states: every formula that gave
            # the old size must agree on the new one, or which one the class uses is unknown
            cands = {_eval_derived(e, new_raw) for e in _derive_from_file(g.size, old_raw)}
            if len(cands) != 1:
                return None
            new = cands.pop()
        if not _is_int(new) or new <= 0:
            return None
        sizes[g.name] = new
    # no new coincidences between the sizes the file does not state and the ones it does
    gnames = sorted(sizes)
    if (_classes([ol[p] for p in ints] + [ir.groups[g].size for g in gnames])
            != _classes([nl[p] for p in ints] + [sizes[g] for g in gnames])):
        return None

    # -- floats: those that differ must be ones the IR reads (epsilons, rope theta, partial rotary)
    att = ir.attention
    rope = att.rope if att else None
    cfg_old = ir.config  # the traced config (transformers' to_dict)
    read_floats = {n.eps for n in ir.norms}
    if rope is not None and rope.theta is not None:
        read_floats.add(rope.theta)
    partial_old = None
    if rope is not None and rope.partial_key:
        k = rope.partial_key
        partial_old = (cfg_old.get("rope_parameters") or {}).get(k.split(".", 1)[1]) if k.startswith(
            "rope_parameters.") else cfg_old.get(k)
        read_floats.add(partial_old)
    if att is not None and att.scaling_source.startswith(("config:", "config-value:")):
        read_floats.add(cfg_old.get(att.scaling_source.split(":", 1)[1]))
    fmap: dict[float, float] = {}
    for p, v in ol.items():
        if isinstance(v, float):
            w = nl[p]
            if not isinstance(w, float):
                return None
            if w != v:
                if v not in read_floats or fmap.get(v, w) != w:
                    return None
                fmap[v] = w

    def num(old):
        """A value the config states (int or float): its new value, or itself when the file does not state it."""
        if isinstance(old, float) and old in fmap:
            return fmap[old]
        if isinstance(old, float) and old.is_integer() and int(old) in vmap:
            return float(vmap[int(old)])
        if _is_int(old) and old in vmap:
            return vmap[old]
        return old

    # -- tensors: group factors follow their group; a constant factor follows the config value(s)
    # that explain it (max_position_embeddings + 2), or the entry cannot serve this config
    consts: dict[tuple[int, bool], int | None] = {}

    def const(size: int, multiplier: bool = False) -> int | None:
        if (size, multiplier) not in consts:
            consts[size, multiplier] = _rebind_const(size, ol, nl, multiplier=multiplier)
        return consts[size, multiplier]

    def factor(f: Factor, multiplier: bool) -> Factor:
        if f.group == "const":
            n = const(f.size, multiplier)
            if n is None:
                raise ValueError(f"constant factor {f.size} not explained by the config")
            return Factor("const", n)
        return Factor(f.group, sizes[f.group])

    def segment(s: Segment) -> Segment:
        multiplier = any(f.group != "const" for f in s.factors)
        return Segment(tuple(factor(f, multiplier) for f in s.factors))

    tensors = []
    for t in ir.tensors:
        axes, shape = [], []
        for d, ax in zip(t.shape, t.axes):
            nax = Axis(tuple(segment(s) for s in ax.segments), ax.role)
            if any(s.factors for s in ax.segments):
                if ax.size != d:
                    return None
                d = nax.size
            else:  # an axis the trace rendered without factors: its size is a constant too
                d = const(d)
                if d is None:
                    return None
            axes.append(nax)
            shape.append(d)
        if len(t.axes) != len(t.shape):
            return None
        tensors.append(replace(t, axes=tuple(axes), shape=tuple(shape)))
    groups = {k: replace(g, size=sizes[k]) for k, g in ir.groups.items()}

    # -- norms
    norms = []
    for n in ir.norms:
        eps = n.eps
        if n.eps_key is not None:
            eps = num(n.eps)
        norms.append(replace(n, eps=eps))

    # -- attention and rope
    attention = att
    if att is not None:
        old_heads = att.heads
        heads = sizes.get("heads", num(att.heads))
        kv = sizes["kv_heads"] if "kv_heads" in sizes else heads if att.kv_heads == old_heads else num(att.kv_heads)
        hd = sizes.get("head_dim", num(att.head_dim))
        if att.scaling_source == "head_dim":
            scaling = _same_formula(att.scaling, att.head_dim, hd, lambda x: x ** -0.5)
            if scaling is None:
                scaling = _same_formula(att.scaling, att.head_dim, hd, lambda x: 1.0 / math.sqrt(x))
        elif att.scaling_source.startswith("config:"):
            v = cfg_old.get(att.scaling_source[7:])
            scaling = _same_formula(att.scaling, v, num(v), lambda x: x ** -0.5)
        elif att.scaling_source.startswith("config-value:"):
            v = cfg_old.get(att.scaling_source.split(":", 1)[1])
            scaling = num(v) if v == att.scaling else None
        elif att.scaling == 1.0:
            scaling = 1.0
        else:
            return None
        if scaling is None:
            return None
        new_rope = rope
        if rope is not None:
            if rope.rotary_dim == rope.head_dim:
                rot = hd
            elif partial_old is not None and int(rope.head_dim * partial_old) == rope.rotary_dim:
                rot = int(hd * num(partial_old))
            else:
                return None
            if rope.per_frequency:
                return None  # longrope's per-pair factors: lists whose length follows head_dim
            new_rope = replace(rope, rotary_dim=rot, head_dim=hd,
                               theta=None if rope.theta is None else float(num(rope.theta)))
        sw = att.sliding_window
        attention = replace(att, heads=heads, kv_heads=kv, head_dim=hd, scaling=float(scaling), rope=new_rope,
                            sliding_window=None if sw is None else num(sw))

    # -- moe
    moe = ir.moe
    if moe is not None:
        top_k = num(moe.top_k)
        moe = replace(moe, num_experts=sizes.get("experts", num(moe.num_experts)), top_k=top_k)

    # -- residual (embedding scale)
    residual = ir.residual
    if residual.embed_scale is not None and residual.embed_scale_source == "sqrt(hidden_size)":
        s = _same_formula(residual.embed_scale, ir.groups["hidden"].size, sizes["hidden"], math.sqrt)
        if s is None:
            return None
        residual = replace(residual, embed_scale=s)

    # -- notes: a number in a note is a size this function does not know how to re-bind
    for note in ir.notes:
        if not note.startswith("traced layer ") and re.search(r"\b\d+\b", re.sub(r"\s[x/]\d+\s", " ", note)):
            return None
    return replace(ir, tensors=tuple(tensors), groups=groups, norms=tuple(norms), attention=attention, moe=moe,
                   residual=residual)
