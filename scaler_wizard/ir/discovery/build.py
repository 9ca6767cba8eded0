"""Assembling the :class:`ModelIR` from the analysis, the bindings, the tensors and the sublayer facts."""

from __future__ import annotations

from collections import defaultdict

from scaler_wizard.ir.discovery.analysis import Analysis, analyse
from scaler_wizard.ir.discovery.attention import _attention
from scaler_wizard.ir.discovery.binding import _int_keys, bind_groups
from scaler_wizard.ir.discovery.graph import _jsonable
from scaler_wizard.ir.discovery.residual import _moe, _residual
from scaler_wizard.ir.discovery.tensors import classify_tensors
from scaler_wizard.ir.model_ir import Group, ModelIR
from scaler_wizard.ir.printer import ranges
from scaler_wizard.ir.trace import Traced, split_layer, trace_config

def build_ir(config, *, differential: bool = True) -> ModelIR:
    traced = trace_config(config)
    an = analyse(traced)
    return assemble(config, traced, an, differential=differential)


def assemble(config, traced: Traced, an: Analysis, *, differential: bool = True) -> ModelIR:
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
    )
    return ir
