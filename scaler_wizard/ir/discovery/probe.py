"""Config probes: does the config build what the traced computation says?

Discovery binds each group to a config key and reads every tensor axis as a product of groups from
the traced computation. transformers, though, sizes a tensor from config keys in its ``__init__``,
and the two readings can agree at the traced sizes only: Helium's ``o_proj`` is built
``Linear(hidden_size, hidden_size)`` while the computation feeds it heads x head_dim (equal in the
trace); Moshi's FFN width was derived as 3 x head_dim (a coincidence: the config sizes it by
``ffn_dim``); Zaya's depthwise conv over q and k has (heads + kv_heads) x head_dim channels, an axis
discovery did not place; ELECTRA builds ``embeddings_project`` only while ``embedding_size !=
hidden_size``. Any of them makes the grown config describe other tensors than the grown program
writes (conform's SW316: the compiler contradicting itself).

:func:`probe_config_ties` builds the (reduced) model on the meta device once per bound group with
its key doubled -- no forward, only ``__init__`` -- and compares every parameter with the shape the
IR predicts for that growth. What disagrees is returned as *ties* (see ``ModelIR.config_ties``),
which the type checker turns into positioned refusals (SW384), and derived formulas that the
probes contradict are dropped (a coincidence of the tiny sizes, not the config's formula).
"""

from __future__ import annotations

import copy
import warnings

from scaler_wizard.ir.discovery.binding import _evaluate, fit_rope_lists
from scaler_wizard.ir.trace import build_meta_model, split_layer


def axis_size(ax, sizes: dict[str, int]) -> int:
    """The size of IR axis ``ax`` when the groups have ``sizes`` (group -> size; a group not in
    ``sizes`` keeps its traced size; ``const`` factors are fixed)."""
    total = 0
    for seg in ax.segments:
        n = 1
        for f in seg.factors:
            n *= f.size if f.group == "const" else sizes.get(f.group, f.size)
        total += n
    return total


def _shapes(model, layer_list_path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """parameter name -> (IR template, shape) of a meta model."""
    return {name: (split_layer(name, layer_list_path)[0], tuple(p.shape)) for name, p in model.named_parameters()}


def _probe_sizes(groups, g: str, ikeys: dict[str, int], derive: bool) -> dict[str, int]:
    """Group sizes with ``g`` doubled; with ``derive``, the derived groups that follow its key too."""
    sizes = {n: x.size for n, x in groups.items()}
    key = groups[g].config_key
    sizes[g] = 2 * groups[g].size
    if derive:
        for n, x in groups.items():
            if x.derived and not x.config_key:
                v = _evaluate(x.derived, {**ikeys, key: 2 * ikeys.get(key, groups[g].size)})
                if v is not None:
                    sizes[n] = v
    return sizes


def probe_config_ties(config, tp, groups: dict, tensors, ikeys: dict[str, int], notes: list[str]):
    """(ties, groups): :func:`_probe` guarded -- a config class that refuses plain attribute reads
    (Gemma-4's per-layer attributes raise on the global value) gives no evidence: no ties, groups
    unchanged."""
    mine: list[str] = []
    try:
        ties, out = _probe(config, tp, groups, tensors, ikeys, mine)
    except Exception:  # noqa: BLE001 - no evidence
        return (), groups
    notes.extend(mine)
    return ties, out


def _probe(config, tp, groups: dict, tensors, ikeys: dict[str, int], notes: list[str]):
    """(ties, groups) -- what the config builds differently from what the IR predicts.

    ``config``: the full transformers config; ``tp``: its Traced (reduced config and meta model);
    ``groups``: name -> Group; ``tensors``: the IR's TensorInfos; ``ikeys``: the config's integer
    keys. For each group bound to an integer key (the depth excepted), the reduced config with that
    key doubled (companion keys following) is built on the meta device; a probe the config class
    or the model rejects gives no evidence. Returns the ties (``ModelIR.config_ties`` entries) and
    ``groups`` with the derived formulas the probes contradict removed. Appends what it found to
    ``notes``. Never raises for a model that does not build: no probe, no ties."""
    by_tpl = {t.name: t for t in tensors}
    try:
        base = _shapes(tp.model, tp.layer_list_path)
    except Exception:  # noqa: BLE001 - nothing to compare with
        return (), groups
    probed: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
    bound_keys = {x.config_key for x in groups.values() if x.config_key}

    def build(changes: dict[str, int]):
        c2 = copy.deepcopy(tp.config)
        for k, v in changes.items():
            setattr(c2, k, v)
        fit_rope_lists(c2, tp.config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _shapes(build_meta_model(c2), tp.layer_list_path)

    def mismatches(shapes, sizes: dict[str, int]) -> list[tuple[str, int]]:
        out = []
        for name, (tpl, shape) in base.items():
            t = by_tpl.get(tpl)
            got = shapes.get(name)
            if t is None or got is None or tuple(t.shape) != shape or len(got[1]) != len(shape):
                continue
            for a, ax in enumerate(t.axes):
                if axis_size(ax, sizes) != got[1][a]:
                    out.append((tpl, a))
        return out

    for g, grp in groups.items():
        key = grp.config_key
        if not key or not isinstance(getattr(tp.config, key, None), int) or isinstance(getattr(tp.config, key), bool):
            continue
        if getattr(tp.config, key) != grp.size:
            continue  # an extra axis class named by its key, or a key the reduced config re-derives
        changes = {key: 2 * grp.size}
        changes.update({k: 2 * grp.size for k in grp.companion_keys if isinstance(getattr(tp.config, k, None), int)})
        try:
            shapes = build(changes)
        except Exception:  # noqa: BLE001 - the config class or the model rejects the value: no evidence
            continue
        # keys of the group's value that no group binds follow it when building confirms it (conform's
        # second step: Llama with num_key_value_heads == num_attention_heads, whose k/v rows are heads)
        sizes = _probe_sizes(groups, g, ikeys, True)
        diffs = mismatches(shapes, sizes)
        cands = [k for k, v in ikeys.items() if v == grp.size and k not in bound_keys and k not in changes
                 and isinstance(getattr(tp.config, k, None), int)]
        while diffs and cands:
            best = None
            for k in cands:
                try:
                    s2 = build({**changes, k: 2 * grp.size})
                except Exception:  # noqa: BLE001
                    continue
                d2 = mismatches(s2, sizes)
                if len(d2) < len(diffs) and (best is None or len(d2) < len(best[2])):
                    best = (k, s2, d2)
            if best is None:
                break
            k, shapes, diffs = best
            changes[k] = 2 * grp.size
            cands.remove(k)
        probed[g] = shapes

    # -- derived formulas the config contradicts: with the derived group following the probed key the
    # IR mispredicts its members; without, it predicts them (Moshi: ffn = 3 * head_dim by coincidence)
    groups = dict(groups)
    for g in probed:
        with_d = set(mismatches(probed[g], _probe_sizes(groups, g, ikeys, True)))
        without = set(mismatches(probed[g], _probe_sizes(groups, g, ikeys, False)))
        if with_d == without:
            continue
        key = groups[g].config_key
        for n, x in list(groups.items()):
            if x.derived and not x.config_key and key in x.derived.split(" ") \
                    and any(n in by_tpl[tpl].axes[a].groups() for tpl, a in with_d - without):
                notes.append(f"config probe: {key} x2 does not move `{n}` in the model the config builds: "
                             f"its formula {x.derived} was a coincidence of the traced sizes; not bound")
                groups[n] = type(x)(**{**x.__dict__, "derived": None})

    ties: list[tuple] = []
    seen_axes: set[tuple[str, int]] = set()
    for g in probed:
        for tpl, a in mismatches(probed[g], _probe_sizes(groups, g, ikeys, True)):
            seen_axes.add((tpl, a))
    followers: dict[str, dict | None] = {}

    def follows_unbound_key(tpl: str, a: int) -> bool:
        # An axis of one group that the config sizes by an unbound key of the same value (DeepSeek's
        # experts by moe_intermediate_size where ffn binds intermediate_size): conform moves such a
        # key with the group (its value coincides with the group's old size), so it is no tie.
        gs = by_tpl[tpl].axes[a].groups()
        if len(gs) != 1 or gs[0] not in groups:
            return False
        name = next((n for n, (t, _) in base.items() if t == tpl), None)
        for k, v in ikeys.items():
            if k in bound_keys or v != groups[gs[0]].size or not isinstance(getattr(tp.config, k, None), int):
                continue
            if k not in followers:
                c2 = copy.deepcopy(tp.config)
                try:
                    setattr(c2, k, 2 * v)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        followers[k] = _shapes(build_meta_model(c2), tp.layer_list_path)
                except Exception:  # noqa: BLE001 - no evidence
                    followers[k] = None
            got = (followers[k] or {}).get(name)
            if got is not None and len(got[1]) > a and got[1][a] == 2 * base[name][1][a]:
                return True
        return False

    for tpl, a in sorted(seen_axes):
        movers = []
        for h, shapes in probed.items():
            name = next((n for n, (t, _) in base.items() if t == tpl and n in shapes), None)
            if name is None:
                continue
            before, after = base[name][1][a], shapes[name][1][a]
            if before != after:
                movers.append((h, round(after / before, 6)))
        if not movers and follows_unbound_key(tpl, a):
            continue
        ties.append(("axis", tpl, a, tuple(movers)))
        notes.append(f"config probe: `{tpl}` axis {a} is {' x '.join(by_tpl[tpl].axes[a].groups()) or 'fixed'} in "
                     f"the computation; the config sizes it by "
                     + (", ".join(f"{h} (x{f:g} when doubled)" for h, f in movers) or "no bound key"))
    for g, shapes in probed.items():
        base_t = {t for t, _ in base.values()}
        new_t = {t for t, _ in shapes.values()}
        for tpl in sorted(base_t - new_t):
            if tpl in by_tpl:
                ties.append(("exists", tpl, g, "absent"))
                notes.append(f"config probe: with {groups[g].config_key} doubled the config builds no `{tpl}`")
        for tpl in sorted(new_t - base_t):
            ties.append(("exists", tpl, g, "new"))
            notes.append(f"config probe: with {groups[g].config_key} doubled the config builds a new `{tpl}`")
    return tuple(ties), groups
