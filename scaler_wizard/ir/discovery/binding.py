"""Binding named groups to config keys: by value, and by differential tracing when ambiguous."""

from __future__ import annotations

import copy

from scaler_wizard.ir.discovery.analysis import Analysis, analyse
from scaler_wizard.ir.trace import trace_config

_SKIP_KEY_SUFFIX = ("_token_id", "_token_ids")


def _int_keys(cfg: dict, layers_key: str) -> dict[str, int]:
    out = {}
    for k, v in cfg.items():
        if k.startswith("_") or isinstance(v, bool) or not isinstance(v, int) or k.endswith(_SKIP_KEY_SUFFIX):
            continue
        if k == layers_key or k in ("num_hidden_layers",):
            continue
        out[k] = v
    return out


def _formulas(size: int, keys: list[str], ikeys: dict[str, int]) -> list[str]:
    """Every product / quotient of ``keys`` (and small integers) equal to ``size``, in order of preference."""
    items = [(k, ikeys[k]) for k in sorted(set(keys)) if k in ikeys]
    out = [f"{a} // {b}" for a, va in items for b, vb in items if a != b and vb and va // vb == size and va % vb == 0]
    out += [f"{c} * {a}" for a, va in items for c in (2, 3, 4, 8) if va * c == size]
    out += [f"{a} * {b}" for a, va in items for b, vb in items if a < b and va * vb == size]
    return out


def _evaluate(expr: str, values: dict[str, int]) -> int | None:
    a, op, b = expr.split(" ")
    va = int(a) if a.isdigit() else values.get(a)
    vb = int(b) if b.isdigit() else values.get(b)
    if not isinstance(va, int) or not isinstance(vb, int):
        return None
    if op == "//":
        return va // vb if vb and va % vb == 0 else None
    return va * vb


def _derive(size: int, bound: dict[str, str], ikeys: dict[str, int], group: str | None = None,
            trials: dict[str, tuple[int, dict[str, int]]] | None = None) -> str | None:
    """A product / quotient of bound keys (and small integers) equal to ``size``.

    With differential traces (``trials``: key -> (trial value, group sizes it gave)), keys whose
    change moved ``group`` may appear too, and a formula must predict the group's size in every
    trace where the group still exists: a coincidence of the tiny sizes (ffn 192 = 3 * hidden 64 =
    2 shared experts * 96) is not taken for the config's formula."""
    trials = trials or {}
    movers = [k for k, (_, sz) in trials.items() if group is not None and sz.get(group) != size]
    pool = list(bound.values()) + (list(ikeys) if movers else [])
    for expr in _formulas(size, pool, ikeys):
        keys = [x for x in expr.split(" ")[::2] if not x.isdigit()]
        if movers and not any(k in keys for k in movers):
            continue  # a formula without the key that moved the group is a coincidence
        ok = True
        for k, (trial, sz) in trials.items():
            if group is None or group not in sz:
                continue
            if _evaluate(expr, {**ikeys, k: trial}) != sz[group]:
                ok = False
                break
        if ok:
            return expr
    return None


def _rotary_pairs(config) -> int | None:
    """Rotary pairs a transformers config gives its rotary module: int(head_dim * partial) // 2, with
    head_dim = config.head_dim or hidden_size // num_attention_heads (as every rope init function
    in transformers computes it)."""
    try:
        hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    except (AttributeError, TypeError, ZeroDivisionError):
        return None
    rp = getattr(config, "rope_parameters", None)
    partial = rp.get("partial_rotary_factor") if isinstance(rp, dict) else None
    if partial is None:
        partial = getattr(config, "partial_rotary_factor", None) or 1.0
    return int(hd * partial) // 2 if isinstance(hd, int) else None


def fit_rope_lists(changed, original) -> None:
    """Differential tracing changes one size of a config copy; when that moves the rotary dimension,
    per-frequency rope lists (longrope's factors) must follow or the copy cannot be built at all (the
    reason a Phi-3 with kv_heads == heads used to leave heads unbound). Their values do not matter to
    a shape trace: resampled to the new number of pairs."""
    old_pairs, new_pairs = _rotary_pairs(original), _rotary_pairs(changed)
    if not old_pairs or not new_pairs or old_pairs == new_pairs:
        return
    for key in ("rope_parameters", "rope_scaling"):
        d = getattr(changed, key, None)
        if not isinstance(d, dict):
            continue
        d = copy.deepcopy(d)
        for sub in [d] + [v for v in d.values() if isinstance(v, dict)]:
            for k, v in list(sub.items()):
                if isinstance(v, list) and len(v) == old_pairs and all(isinstance(x, (int, float)) for x in v):
                    sub[k] = [v[i * old_pairs // new_pairs] for i in range(new_pairs)]
        setattr(changed, key, d)


def _sizes_for(config) -> tuple[dict[str, int], frozenset[str]]:
    """(group sizes, parameter names) of a differential trace of ``config``."""
    tp = trace_config(config)
    return dict(analyse(tp).sizes), frozenset(tp.param_shapes)


def bind_groups(config, an: Analysis, cfg, ikeys, notes, *, differential: bool = True, param_names=None):
    """(bound, derived, overrides, companions, extra): each group's config key, derived formula,
    overriding key, companion keys, and the extra (non-canonical) axis classes named by their key.
    Appends what differential tracing found to ``notes``."""
    A = an.dg.atoms
    # -- bind named groups to config keys
    bound: dict[str, str] = {}
    ambiguous: dict[str, list[str]] = {}
    for g, sz in an.sizes.items():
        cands = sorted(k for k, v in ikeys.items() if v == sz)
        if len(cands) == 1:
            bound[g] = cands[0]
        elif len(cands) > 1:
            ambiguous[g] = cands
    moved_by: dict[str, list[str]] = {}
    trials: dict[str, tuple[int, dict[str, int]]] = {}
    switches: set[str] = set()  # keys whose change added or removed parameters
    if ambiguous and differential:
        keys = sorted({k for c in ambiguous.values() for k in c})
        for k in keys:
            old = getattr(config, k)
            # x2 first; when the model rejects that (num_key_value_heads == num_attention_heads cannot
            # double), /2 tells as much about which groups follow the key.
            sizes2, trial = None, None
            for trial, how in ((old * 2, "x2"), (old // 2 if old % 2 == 0 and old > 1 else None, "/2")):
                if trial is None:
                    continue
                c2 = copy.deepcopy(config)
                try:
                    setattr(c2, k, trial)
                    fit_rope_lists(c2, config)  # per-frequency rope lists follow a moved rotary dim
                    sizes2, names2 = _sizes_for(c2)
                    break
                except Exception:  # noqa: BLE001 - a value the model rejects tells us nothing
                    sizes2 = None
            if sizes2 is None:
                continue
            trials[k] = (trial, sizes2)
            if param_names is not None and names2 != frozenset(param_names):
                switches.add(k)
            for g in ambiguous:
                if k in ambiguous[g] and sizes2.get(g) == trial and g not in bound:
                    bound[g] = k
            moved = sorted(g for g in an.sizes if sizes2.get(g) != an.sizes[g])
            moved_by[k] = moved
            notes.append(f"differential trace: {k} {how} moved " + (", ".join(moved) or "no group"))
    for g in sorted(bound):
        # a group bound by a unique value whose size another key's change moved is a coincidence
        # of the sizes (a Phi-3 with head_dim 16 == original_max_position_embeddings 16: head_dim
        # follows num_attention_heads); unbound, it gets its formula below
        if g in ambiguous:
            continue
        if any(k != bound[g] and sz.get(g) not in (None, an.sizes[g]) for k, (_, sz) in trials.items()):
            rest = {o: k for o, k in bound.items() if o != g}
            if _derive(an.sizes[g], rest, ikeys, g, trials):  # only when a formula explains every trace
                notes.append(f"group {g}: {bound[g]} == {an.sizes[g]} is a coincidence (another key moved {g}); "
                             "not bound")
                del bound[g]
    for g, c in ambiguous.items():
        # a key whose change made the group vanish (kv_heads x2 == heads: grouped-query attention
        # became multi-head) moved it; when it is the only candidate that did, it is the group's key
        movers = [k for k in c if k in trials and trials[k][1].get(g) is None]
        if g not in bound and len(movers) == 1 and movers[0] not in bound.values() \
                and not any(k in trials and trials[k][1].get(g) not in (None, an.sizes[g]) for k in c if k != movers[0]):
            bound[g] = movers[0]
            notes.append(f"differential trace: {movers[0]} x2 merged {g} into another group: bound")
    for g, c in ambiguous.items():
        if g not in bound:
            free = [k for k in c if k not in bound.values()]
            if len(free) == 1:
                bound[g] = free[0]
            else:
                notes.append(f"group {g}: config keys {c} all equal {an.sizes[g]}; not bound")
    derived = {}
    for g, sz in an.sizes.items():
        if g not in bound:
            d = _derive(sz, bound, ikeys, g, trials)
            if d:
                derived[g] = d
    # -- a derived group may still have a config key that overrides it when set (GPT-2's n_inner
    # is None and ffn = 4 * n_embd): try each None-valued key with a distinct value and see
    # whether exactly that group follows.
    overrides: dict[str, str] = {}
    if derived and differential:
        none_keys = sorted(k for k, v in cfg.items() if v is None and not k.startswith("_"))
        for g in sorted(derived):
            if g == "head_dim":
                continue  # head_dim follows heads (see the type checker), never an override
            want = an.sizes[g] * 3
            for k in none_keys:
                if k in overrides.values():
                    continue
                c2 = copy.deepcopy(config)
                try:
                    setattr(c2, k, want)
                    fit_rope_lists(c2, config)
                    sizes2, _ = _sizes_for(c2)
                except Exception:  # noqa: BLE001 - the model rejects this key: not an override
                    continue
                if sizes2.get(g) == want and all(sizes2.get(o) == an.sizes[o] for o in an.sizes if o != g):
                    overrides[g] = k
                    notes.append(f"differential trace: setting {k} overrides derived {g}")
                    break

    # -- extra (non-canonical) classes of parameter axes, named by their config key
    extra: dict[int, str] = {}
    for name, axes in an.dg.param_axes.items():
        for a in axes:
            if a is None:
                continue
            r = A.find(a)
            if r in an.names or r in extra or A.exp.get(r) is not None:
                continue
            sz = A.size(r)
            cands = [k for k, v in ikeys.items() if v == sz and k not in bound.values()]
            if len(cands) == 1:
                extra[r] = cands[0]
    # A key that shares a group's value but moved no group when changed alone is a structural
    # switch (OPT's word_embed_proj_dim adds projections when it differs from hidden_size): it
    # must follow the group when the group grows. Only a key whose change added or removed
    # parameters is a switch (when the traced names are known): Aria's moe_topk == kv_heads moves
    # nothing and its moe_num_experts == heads only re-sizes the experts axis; neither may follow.
    companions: dict[str, list[str]] = {}
    for g, c in ambiguous.items():
        for k in c:
            if g in bound and k != bound[g] and moved_by.get(k) == [] \
                    and (param_names is None or k in switches):
                companions.setdefault(g, []).append(k)
    return bound, derived, overrides, companions, extra
