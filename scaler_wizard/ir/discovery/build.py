"""Assembling the :class:`ModelIR` from the analysis, the bindings, the tensors and the sublayer facts."""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import replace

from scaler_wizard.ir.discovery.analysis import Analysis, analyse
from scaler_wizard.ir.discovery.attention import _attention
from scaler_wizard.ir.discovery.constants import size_dependent_constants
from scaler_wizard.ir.discovery.probe import probe_config_ties
from scaler_wizard.ir.discovery.binding import _int_keys, bind_groups, fit_rope_lists
from scaler_wizard.ir.dims import _strip_wrapper
from scaler_wizard.ir.errors import IRDiscoveryError
from scaler_wizard.ir.discovery.graph import ATTN_OPS, _ancestors_of, _base, _jsonable
from scaler_wizard.ir.discovery.residual import _moe, _residual
from scaler_wizard.ir.discovery.tensors import classify_tensors
from scaler_wizard.ir.model_ir import AttentionShape, Group, MixerInfo, ModelIR, layer_kind
from scaler_wizard.ir.printer import ranges
from scaler_wizard.ir.trace import Traced, split_layer, trace_config

def build_ir(config, *, differential: bool = True, size_constants: bool = True) -> ModelIR:
    """``size_constants=False``: skip the constants question (its 2-3 extra exports); the IR's
    ``size_constants`` is then empty whatever the model does -- for callers that read only sizes."""
    traced = trace_config(config)
    an = analyse(traced)
    return assemble(config, traced, an, differential=differential, size_constants=size_constants)


def assemble(config, traced: Traced, an: Analysis, *, differential: bool = True,
             size_constants: bool = True) -> ModelIR:
    A = an.dg.atoms
    cfg = config.to_dict()
    layers_key = traced.layers_key
    ikeys = _int_keys(cfg, layers_key)
    notes = list(an.notes)

    bound, derived, overrides, companions, extra = bind_groups(config, an, cfg, ikeys, notes, differential=differential,
                                                               param_names=traced.param_shapes)
    tp = traced
    tensors, norm_infos, router_params = classify_tensors(tp, an, cfg, ikeys, extra)

    # -- groups
    members: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for t in tensors:
        for k, ax in enumerate(t.axes):
            for g in ax.groups():
                if (t.name, k) not in members[g]:
                    members[g].append((t.name, k))
    groups: dict[str, Group] = {}
    order = [g for g in ("hidden", "ffn", "heads", "kv_heads", "head_dim", "vocab", "experts") if g in an.sizes]
    order += sorted(g for g in an.sizes if g not in order)
    for g in order:
        groups[g] = Group(name=g, size=an.sizes[g], config_key=bound.get(g), derived=derived.get(g),
                          override_key=overrides.get(g), companion_keys=tuple(companions.get(g, ())),
                          per_layer=g not in ("hidden", "vocab"), members=tuple(members.get(g, ())))
    for r, k in sorted(extra.items(), key=lambda kv: kv[1]):
        if k not in groups and members.get(k):
            groups[k] = Group(name=k, size=A.size(r), config_key=k, per_layer=False, members=tuple(members[k]))

    # -- attention, moe, residual
    attention = _attention(tp, an, cfg, bound, tensors)
    if differential and attention is not None and attention.fused_qkv and attention.fused_layout == "per_head":
        why = _probe_fused_heads(config, groups.get("heads"), attention.fused_qkv)
        if why:
            groups["heads"] = replace(groups["heads"], fixed=why)
            notes.append(f"heads cannot grow: {why}")
    bias = _per_head_score_bias(tp, an) if "heads" in groups and not groups["heads"].fixed else None
    if bias:
        why = (f"the attention scores get a per-head bias `{bias}` computed from the head count, not from "
               "parameters (ALiBi slopes): new heads would need new slopes and the old heads' slopes would "
               "change, so the grown model would not compute the same function")
        groups["heads"] = replace(groups["heads"], fixed=why)
        notes.append(f"heads cannot grow: {why}")
    table = _fixed_table_on_hidden(tp, an)
    if table and "hidden" in groups:
        why = (f"the model adds a table that is not a parameter, `{table[0]}` {list(table[1])}, over the hidden "
               "axis (sinusoidal positions, say): transformers re-computes it for a new hidden size, so the "
               "grown model would not compute the same function")
        groups["hidden"] = replace(groups["hidden"], fixed=why)
        notes.append(f"hidden cannot grow: {why}")
    moe = _moe(tp, an, cfg, ikeys, bound, router_params)
    residual = _residual(tp, an, tensors, norm_infos, cfg)
    tied = tuple(tuple(split_layer(n, tp.layer_list_path)[0] for n in s) for s in tp.tied_sets)
    tied = tuple(dict.fromkeys(tied))
    if cfg.get("tie_word_embeddings") and not tied:
        notes.append("config says tie_word_embeddings but the model has no shared parameters")
    tp_plan = getattr(type(config), "base_model_tp_plan", None)
    tp_plan = dict(tp_plan) if isinstance(tp_plan, dict) and tp_plan else None
    if an.dg.unhandled:
        notes.append("ops without a rule (fresh dims): " + ", ".join(sorted(set(u.split("@")[0] for u in an.dg.unhandled))))
    for j, real in sorted(tp.layer_map.items()):
        if len(tp.layer_map) > 1:
            notes.append(f"traced layer {j} stands for layers {ranges(real)}")
    consts = ()
    if differential and size_constants:
        consts = size_dependent_constants(tp, bound.get("hidden"), an.sizes.get("hidden"),
                                          residual.embed_scale if residual.embed_scale_source else None,
                                          tuple(bound[g] for g in ("heads", "kv_heads") if bound.get(g)))
        for key, mod, before, after in consts:
            notes.append(f"differential trace: a constant of `{mod or 'the model'}` follows `{key}` "
                         f"({before:.6g} -> {after:.6g})")
    ties = ()
    if differential:
        ties, groups = probe_config_ties(config, tp, groups, tensors, ikeys, notes)
    mixers = _mixers(tp, an, tensors) if attention is not None else ()
    shapes = _attention_shapes(tp, an, cfg) if attention is not None else ()
    ir = ModelIR(
        model_type=cfg.get("model_type", ""),
        architecture=type(tp.model).__name__,
        config=_jsonable(cfg),
        num_layers=tp.num_layers,
        layers_key=layers_key,
        tensors=tuple(tensors),
        groups=groups,
        norms=tuple(norm_infos),
        attention=attention,
        residual=residual,
        moe=moe,
        tied=tied,
        layer_arrays=tp.layer_arrays,
        tp_plan=tp_plan,
        notes=tuple(notes),
        traced_layers=tp.config.num_hidden_layers,
        mixers=mixers,
        attention_shapes=shapes,
        size_constants=consts,
        config_ties=ties,
    )
    return ir


def _mixers(tp: Traced, an: Analysis, tensors) -> tuple[MixerInfo, ...]:
    """The analysis' non-attention token mixers as templates over the real layers (one entry per
    module template; a hybrid's mixers of one kind share it)."""
    mods = dict(tp.model.named_modules())
    by_tpl: dict[str, dict] = {}
    for path, ops in an.mixers.items():
        tpl, li = split_layer(path + ".x", tp.layer_list_path)
        if li is None:
            continue
        tpl = tpl[: -len(".x")]
        e = by_tpl.setdefault(tpl, {"type": type(mods.get(path)).__name__, "layers": set(), "ops": []})
        e["layers"].update(tp.layer_map.get(li, (li,)))
        e["ops"] += [o for o in ops if o not in e["ops"]]
    out = []
    for tpl, e in by_tpl.items():
        # a block name shared by every layer kind (Nemotron-H's `mixer` is Mamba, attention or MoE by layer):
        # only the tensors of the layers where it mixes tokens without attention
        owned = tuple(t.name for t in tensors if (t.module == tpl or t.module.startswith(tpl + "."))
                      and t.layers is not None and set(t.layers) <= e["layers"])
        out.append(MixerInfo(module=tpl, module_type=e["type"], layers=tuple(sorted(e["layers"])),
                             ops=tuple(e["ops"]), tensors=owned))
    return tuple(out)


def _attention_shapes(tp: Traced, an: Analysis, cfg: dict) -> tuple[AttentionShape, ...]:
    """The analysis' attention sites of another shape than the first, over the real layers (one entry
    per shape; the kind named by the per-layer arrays that set those layers apart)."""
    by_shape: dict[tuple, set[int]] = {}
    for li, shape in an.attn_shapes:
        if li is None:
            continue
        by_shape.setdefault(shape, set()).update(tp.layer_map.get(li, (li,)))
    out = []
    for (h, kv, d), layers in by_shape.items():
        ls = tuple(sorted(layers))
        out.append(AttentionShape(layers=ls, heads=h, kv_heads=kv, head_dim=d,
                                  kind=layer_kind(cfg, tp.layer_arrays, ls)))
    return tuple(out)


def _probe_fused_heads(config, heads, fused: str) -> str | None:
    """A fused q/k/v projection read as [heads x 3 x head_dim] may owe that reading to a coincidence
    of the traced sizes (CodeGen splits it into a fixed 4 model-parallel chunks: with 4 heads the
    chunks look like heads). Trace once more with the heads key doubled: when that trace does not
    discover twice the heads, growing heads would not give the layout the lowering writes. Returns
    why (None when the probe agrees, or when the config rejects the doubled value: no evidence)."""
    if heads is None or not heads.config_key or not isinstance(getattr(config, heads.config_key, None), int):
        return None
    key, trial = heads.config_key, heads.size * 2
    c2 = copy.deepcopy(config)
    try:
        setattr(c2, key, trial)
        fit_rope_lists(c2, config)
        traced = trace_config(c2)
    except Exception:  # noqa: BLE001 - the config or model rejects the value: tells nothing
        return None
    try:
        got = analyse(traced).sizes.get("heads")
    except IRDiscoveryError as e:
        return (f"a trace with {key} = {trial} is not understood ({e}): "
                f"the fused projection `{fused}` is not laid out per head the way {heads.size} heads suggest")
    if got != trial:
        return (f"a trace with {key} = {trial} discovers {got} heads: the fused projection `{fused}` is not "
                f"laid out per head the way {heads.size} heads suggest")
    return None


def _per_head_score_bias(tp: Traced, an: Analysis) -> str | None:
    """The name of a term added to attention scores that has one slice per head ([.., heads, q, k]
    with heads > 1) and no parameter among its ancestors (ALiBi's slopes, built from the head
    count: MPT, Falcon with ``alibi``), or None. Eager attention: an ``add`` between the score
    product and the softmax; SDPA: its ``attn_mask``. A causal or padding mask broadcasts over
    heads (size 1 there) and is not one."""
    heads = an.sizes.get("heads")
    if not heads or heads < 2:
        return None
    ep = tp.exported
    params = set(getattr(ep.graph_signature, "inputs_to_parameters", {}) or {})

    def per_head(t) -> bool:
        val = getattr(t, "meta", {}).get("val") if hasattr(t, "meta") else None
        shape = tuple(getattr(val, "shape", ()) or ())
        if len(shape) < 3 or int(shape[-3]) != heads:
            return False
        return not any(a.op == "placeholder" and a.name in params for a in _ancestors_of(ep, t))

    for n in ep.graph.nodes:
        b = _base(n)
        if b in ATTN_OPS:
            m = n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None)
            if m is not None and hasattr(m, "op") and per_head(m):
                return m.name
        elif b in ("softmax", "_softmax"):
            src = n.args[0]
            while hasattr(src, "op") and src.op == "call_function" and _base(src) not in ("matmul", "bmm", "baddbmm"):
                if _base(src) == "add":
                    for other in src.args[:2]:
                        if hasattr(other, "op") and per_head(other):
                            return other.name
                src = src.args[0] if hasattr(src.args[0], "op") else (src.all_input_nodes or [None])[0]
                if src is None:
                    break
    return None


def _fixed_table_on_hidden(tp: Traced, an: Analysis) -> tuple[str, tuple[int, ...]] | None:
    """(name, shape) of a buffer or lifted constant with an axis in the hidden class (CTRL's
    sinusoidal ``pos_encoding`` [n_positions, n_embd], recomputed from the config and added to
    the stream), or None."""
    if an.hidden_atom is None:
        return None
    sig = tp.exported.graph_signature
    tables = {**dict(getattr(sig, "inputs_to_buffers", {}) or {}),
              **dict(getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {})}
    h = an.root(an.hidden_atom)
    for node in tp.exported.graph.nodes:
        if node.op != "placeholder" or node.name not in tables:
            continue
        axes = an.dg.values.get(node.name)
        if not axes or not isinstance(axes, (list, tuple)):
            continue
        flat = [a for ax in axes if ax for a in (ax if isinstance(ax, (list, tuple)) else [ax])]
        if any(isinstance(a, int) and an.root(a) == h for a in flat):
            shape = tuple(int(d) for d in node.meta["val"].shape) if "val" in node.meta else ()
            return _strip_wrapper(tables[node.name]), shape
    return None
