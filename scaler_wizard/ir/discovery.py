"""From a traced graph and its dimension classes to a :class:`ModelIR`.

Nothing here is keyed by architecture: groups are named from the graph (embedding width = hidden,
embedding rows / logits = vocab, attention reshape = heads x head_dim, inner dim of the residual
writers that are not attention = ffn, indexed stacked weights = experts) and bound to config keys
by value and, when ambiguous, by differential tracing.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from scaler_wizard.ir.config import rope_dicts, rope_type_of
from scaler_wizard.ir.dims import CAT, PROD, DimGraph, op_name, owner, propagate, shape_of
from scaler_wizard.ir.errors import IRDiscoveryError
from scaler_wizard.ir.printer import ranges
from scaler_wizard.ir.model_ir import (
    AttentionInfo,
    Axis,
    Factor,
    Group,
    ModelIR,
    MoEInfo,
    NormInfo,
    ResidualInfo,
    RopeInfo,
    Segment,
    TensorInfo,
)
from scaler_wizard.ir.trace import Traced, split_layer, trace_config

_TRIVIAL = {"to", "_to_copy", "alias", "clone", "contiguous", "detach", "dropout", "native_dropout", "type_as",
            "_assert_tensor_metadata", "view", "reshape", "_unsafe_view"}
ATTN_OPS = ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
            "_scaled_dot_product_efficient_attention")


def _base(node) -> str:
    return op_name(node).split(".")[0] if node.op == "call_function" else node.op


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
                if _base(u) in _TRIVIAL or _base(u) in ("dropout", "to"):
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


@dataclass
class Analysis:
    """Structural facts of one trace, before config binding."""

    traced: Traced
    dg: DimGraph
    names: dict[int, str] = field(default_factory=dict)  # atom root -> group name
    sizes: dict[str, int] = field(default_factory=dict)
    hidden: int | None = None
    vocab: int | None = None
    attn_nodes: list[Any] = field(default_factory=list)
    topk_nodes: list[Any] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    token_embedding: str | None = None
    hidden_atom: int | None = None
    lm_head: str | None = None
    logits_node: Any = None

    def root(self, a):
        return self.dg.atoms.find(a)

    def size(self, a):
        return self.dg.atoms.size(self.root(a))

    def name_atom(self, atom, name: str) -> None:
        r = self.root(atom)
        prev = self.names.get(r)
        if prev is not None and prev != name:
            self.notes.append(f"dimension class {r} is both {prev} and {name}; kept {prev}")
            return
        self.names[r] = name
        sz = self.size(r)
        if name in self.sizes and self.sizes[name] != sz:
            self.notes.append(f"group {name} has sizes {self.sizes[name]} and {sz} in different layers")
        self.sizes.setdefault(name, sz)


# ---------------------------------------------------------------------- graph helpers
def _node_map(ep):
    return {n.name: n for n in ep.graph.nodes}


def _ancestors(ep) -> dict[str, set[str]]:
    anc: dict[str, set[str]] = {}
    for n in ep.graph.nodes:
        s: set[str] = set()
        for a in n.all_input_nodes:
            s.add(a.name)
            s |= anc[a.name]
        anc[n.name] = s
    return anc


def _skip_trivial_back(n):
    while n.op == "call_function" and _base(n) in _TRIVIAL and n.all_input_nodes:
        n = n.args[0] if hasattr(n.args[0], "op") else n.all_input_nodes[0]
    return n


def _skip_trivial_fwd(n):
    while True:
        users = [u for u in n.users if _base(u) != "_assert_tensor_metadata"]
        if len(users) == 1 and _base(users[0]) in _TRIVIAL and users[0].args and users[0].args[0] is n:
            n = users[0]
        else:
            return n


def _param_of(an: Analysis, node) -> str | None:
    """The parameter a graph value is (directly or through a view/index)."""
    o = an.dg.origin.get(node.name) if hasattr(node, "name") else None
    return o[0] if o else None


# ---------------------------------------------------------------------- analysis
def analyse(traced: Traced) -> Analysis:
    ep = traced.exported
    dg = propagate(ep)
    an = Analysis(traced, dg)
    A = dg.atoms
    nodes = list(ep.graph.nodes)
    user_inputs = [n for n in nodes if n.op == "placeholder" and n.name not in dg.placeholder_param
                   and n.name not in (ep.graph_signature.inputs_to_buffers or {})]
    input_ids = user_inputs[-1] if user_inputs else None

    # token embedding: the embedding looked up by the input ids
    tok = None
    for n in nodes:
        if _base(n) == "embedding":
            src = _skip_trivial_back(n.args[1])
            if src is input_ids:
                tok = n
                break
    if tok is None:
        raise IRDiscoveryError("no token embedding (aten.embedding of input_ids) in the traced graph", op="embedding")
    tok_w = dg.placeholder_param.get(tok.args[0].name)
    an.token_embedding = tok_w
    hidden_atom = dg.param_axes[tok_w][1]
    vocab_atom = dg.param_axes[tok_w][0]
    out = next(n for n in nodes if n.op == "output")
    logits = out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]
    an.logits_node = logits
    la = dg.values.get(logits.name)
    if not la or not la[-1]:
        raise IRDiscoveryError("logits have no vocabulary axis", op=op_name(logits))
    A.unify_lists([vocab_atom], la[-1])
    # lm head: the parameter whose out axis produced the logits
    vr = A.find(vocab_atom)
    pos = {n.name: i for i, n in enumerate(nodes)}
    for m in sorted(_ancestors_of(ep, logits) + [logits], key=lambda x: pos[x.name], reverse=True):
        if _base(m) in ("linear", "addmm"):
            p = _param_of(an, m.args[1] if _base(m) == "linear" else m.args[2])
            ax = dg.param_axes.get(p) if p else None
            if ax and any(a is not None and A.find(a) == vr for a in ax):
                an.lm_head = p
                break
    first_layer = next((n for n in nodes if n.op == "call_function" and _layer_of(traced, owner(n)) is not None), None)
    if first_layer is not None:
        for a in first_layer.all_input_nodes:
            if a.op == "call_function" and _layer_of(traced, owner(a)) is None:
                va = dg.values.get(a.name)
                if isinstance(va, list) and va and len(va[-1]) == 1:
                    hidden_atom = va[-1][0]
                    break
    an.hidden_atom = hidden_atom
    an.name_atom(hidden_atom, "hidden")
    an.name_atom(vocab_atom, "vocab")

    # attention: heads / kv_heads / head_dim from the attention op's operands
    an.attn_nodes = _find_attention(nodes)
    for at in an.attn_nodes:
        n = at.node
        qa, ka, va = (dg.values[x.name] for x in (at.q, at.k, at.v))
        if len(qa) < 3 or not qa[-3] or not qa[-1]:
            raise IRDiscoveryError("attention operands are not [batch, heads, seq, head_dim]", op=op_name(n), module=owner(n))
        h = qa[-3][0] if len(qa[-3]) == 1 else None
        if h is None:
            raise IRDiscoveryError("query heads axis is not one dimension", op=op_name(n), module=owner(n))
        e = A.expansion(h)
        if e is not None and e[0] == PROD and len(e[1]) == 2:
            an.name_atom(e[1][0], "kv_heads")
        an.name_atom(h, "heads")
        d = qa[-1][0]
        an.name_atom(d, "head_dim")
        dv = va[-1][0] if va[-1] else None
        if dv is not None and A.find(dv) != A.find(d):
            if A.size(A.find(dv)) == A.size(A.find(d)):
                A.union(dv, d)  # value head_dim: the same config value in every supported model
            else:
                an.name_atom(dv, "v_head_dim")
    if not an.attn_nodes:
        an.notes.append("no attention op found")

    # experts: stacked weights indexed by routing ids; router: the linear feeding topk
    an.topk_nodes = [n for n in nodes if _base(n) == "topk"]
    expert_atoms = []
    for u in dg.uses:
        if u.op == "index":
            for ax, r in u.axes_roles.items():
                if r == "expert":
                    expert_atoms.append(dg.param_axes[u.name][ax])
    if expert_atoms:
        for e in expert_atoms[1:]:
            A.union(expert_atoms[0], e) if A.size(A.find(e)) == A.size(A.find(expert_atoms[0])) else None
        anc = _ancestors(ep)
        nm = _node_map(ep)
        for tk in an.topk_nodes:
            for a in sorted(anc[tk.name]):
                m = nm[a]
                if _base(m) == "linear" and _param_of(an, m.args[1]):
                    wa = dg.param_axes[_param_of(an, m.args[1])]
                    for ea in expert_atoms:
                        if wa[0] is not None and A.size(A.find(wa[0])) == A.size(A.find(ea)) and _layer_of(traced, owner(m)) == _layer_of(traced, _param_owner(traced, an, ea)):
                            A.union(wa[0], ea)
        for ea in expert_atoms:
            an.name_atom(ea, "experts")
    an.names = {A.find(r): n for r, n in an.names.items()}

    # ffn: inner axis of the residual writers that are not the attention output
    hid = A.find(hidden_atom)
    for u in dg.uses:
        if u.op not in ("linear", "addmm", "matmul", "bmm", "mm"):
            continue
        axes = dg.param_axes[u.name]
        outs = [ax for ax, r in u.axes_roles.items() if r == "out"]
        ins = [ax for ax, r in u.axes_roles.items() if r == "in"]
        if len(outs) != 1 or len(ins) != 1 or axes[outs[0]] is None or axes[ins[0]] is None:
            continue
        if A.find(axes[outs[0]]) != hid:
            continue
        inner = axes[ins[0]]
        if A.find(inner) == hid or A.find(inner) in an.names and an.names[A.find(inner)] != "ffn":
            continue
        flat = {A.find(x) for x in A.flat([inner])}
        if any(an.names.get(r) in ("heads", "head_dim", "kv_heads") for r in flat):
            continue
        if _layer_of(traced, u.module) is None:
            continue  # outside the layers (e.g. a prediction-head transform)
        an.name_atom(inner, "ffn")
    an.names = {A.find(r): n for r, n in an.names.items()}
    return an


def _layer_of(traced: Traced, module: str | None):
    if not module:
        return None
    _, i = split_layer(module + ".x", traced.layer_list_path)
    return i


def _param_owner(traced, an, atom):
    r = an.dg.atoms.find(atom)
    for name, axes in an.dg.param_axes.items():
        if any(a is not None and an.dg.atoms.find(a) == r for a in axes):
            return name.rsplit(".", 1)[0]
    return None


# ---------------------------------------------------------------------- rendering
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
    f = _render_prod(an, atom, extra)
    return [f if f is not None else [Factor("const", A.size(r))]]


# ---------------------------------------------------------------------- config binding
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


def _derive(size: int, bound: dict[str, str], ikeys: dict[str, int]) -> str | None:
    """A product / quotient of bound keys (and small integers) equal to ``size``."""
    items = [(k, ikeys[k]) for k in sorted(set(bound.values())) if k in ikeys]
    for a, va in items:
        for b, vb in items:
            if a != b and vb and va // vb == size and va % vb == 0:
                return f"{a} // {b}"
    for a, va in items:
        for c in (2, 3, 4, 8):
            if va * c == size:
                return f"{c} * {a}"
    for a, va in items:
        for b, vb in items:
            if a < b and va * vb == size:
                return f"{a} * {b}"
    return None


# ---------------------------------------------------------------------- the IR
def build_ir(config, *, differential: bool = True) -> ModelIR:
    traced = trace_config(config)
    an = analyse(traced)
    return assemble(config, traced, an, differential=differential)


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


def _sizes_for(config) -> dict[str, int]:
    an = analyse(trace_config(config))
    return dict(an.sizes)


def assemble(config, traced: Traced, an: Analysis, *, differential: bool = True) -> ModelIR:
    A = an.dg.atoms
    cfg = config.to_dict()
    layers_key = traced.layers_key
    ikeys = _int_keys(cfg, layers_key)
    notes = list(an.notes)

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
                    sizes2 = _sizes_for(c2)
                    break
                except Exception:  # noqa: BLE001 - a value the model rejects tells us nothing
                    sizes2 = None
            if sizes2 is None:
                continue
            for g in ambiguous:
                if k in ambiguous[g] and sizes2.get(g) == trial and g not in bound:
                    bound[g] = k
            moved = sorted(g for g in an.sizes if sizes2.get(g) != an.sizes[g])
            moved_by[k] = moved
            notes.append(f"differential trace: {k} {how} moved " + (", ".join(moved) or "no group"))
    for g, c in ambiguous.items():
        if g not in bound:
            free = [k for k in c if k not in bound.values()]
            if len(free) == 1:
                bound[g] = free[0]
            else:
                notes.append(f"group {g}: config keys {c} all equal {an.sizes[g]}; not bound")
    # A key that shares a group's value but moved no group when changed alone is a structural
    # switch (OPT's word_embed_proj_dim adds projections when it differs from hidden_size): it
    # must follow the group when the group grows.
    companions: dict[str, list[str]] = {}
    for g, c in ambiguous.items():
        for k in c:
            if g in bound and k != bound[g] and moved_by.get(k) == []:
                companions.setdefault(g, []).append(k)
    derived = {}
    for g, sz in an.sizes.items():
        if g not in bound:
            d = _derive(sz, bound, ikeys)
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
                    sizes2 = _sizes_for(c2)
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

    # -- tensors
    tp = traced
    tied_dupe_of: dict[str, str] = {}
    for s in tp.tied_sets:
        used = {u.name for u in an.dg.uses}
        live = next((n for n in s if n in used), next((n for n in s if n in an.dg.param_axes), s[0]))
        for n in s:
            tied_dupe_of[n] = live
    roles: dict[str, dict[int, str]] = defaultdict(dict)
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
    for name, shape in tp.param_shapes.items():
        src = tied_dupe_of.get(name, name)
        axes_atoms = an.dg.param_axes.get(src)
        if axes_atoms is None:
            raise IRDiscoveryError(f"parameter {name} is not used by the traced forward", module=name.rsplit(".", 1)[0])
        mpath, mtype = tp.param_modules[name]
        r = roles_by_module.get((src, mpath)) or roles.get(src, {})
        axes = []
        for k, a in enumerate(axes_atoms):
            segs = _render_axis(an, a, extra) if a is not None else [[]]
            role = r.get(k, "other")
            axes.append(Axis(tuple(Segment(tuple(s)) for s in segs), role))
        tmpl, li = split_layer(name, tp.layer_list_path)
        mt, _ = split_layer(mpath, tp.layer_list_path)
        if name in norm_params:
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
        if tmpl in templates:
            if li is not None:
                templates[tmpl]["layers"] |= set(tp.layer_map.get(li, ()))
        else:
            info["layers"] = set(tp.layer_map.get(li, ())) if li is not None else None
            templates[tmpl] = info
    for tmpl, info in templates.items():
        if info["sublayer"] is None and info["layers"] is not None:
            sib = [o["sublayer"] for o in templates.values() if o["module"] == info["module"] and o["sublayer"]]
            if sib:
                info["sublayer"] = sib[0]
    tensors = []
    for tmpl, info in templates.items():
        layers = None if info["layers"] is None else tuple(sorted(info["layers"]))
        tensors.append(TensorInfo(**{**info, "layers": layers}))
    tensors.sort(key=lambda t: (t.layers is not None, t.name))

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


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    return str(x)


def _ancestors_of(ep, node):
    seen = {}
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n.name in seen:
            continue
        seen[n.name] = n
        stack.extend(n.all_input_nodes)
    return list(seen.values())


# ---------------------------------------------------------------------- norms
def _float_keys(cfg):
    return {k: v for k, v in cfg.items() if isinstance(v, float) and not k.startswith("_")}


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
        elif "rsqrt" in bases and any(b in ("mean", "pow") for b in bases):
            norm_mods.append((m, "rmsnorm"))
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
        if group is None:
            group = "hidden"
        # input and output of the module invocation
        in_node = next((a for n in ns for a in n.all_input_nodes if owner(a) != m and a.name not in an.dg.placeholder_param
                        and a.op != "placeholder" or (a.op == "placeholder" and a.name not in an.dg.placeholder_param
                        and a.name not in (ep.graph_signature.inputs_to_buffers or {}))), None)
        out_node = max((n for n in ns if any(owner(u) != m for u in n.users)), key=lambda n: idx[n.name], default=ns[-1])
        li = _layer_of(tp, m)
        sub = None
        if group == "head_dim":
            placement = "qk"
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
                      eps_key=_eps_key(eps, cfg), sublayer=sub if placement != "qk" else ("attn"), layers=layers)
        if tmpl_m in seen:
            old = infos[seen[tmpl_m]]
            if layers is not None:
                infos[seen[tmpl_m]] = NormInfo(**{**old.__dict__, "layers": tuple(sorted(set(old.layers or ()) | set(layers)))})
            continue
        seen[tmpl_m] = len(infos)
        infos.append(ni)
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


def _tied_src(tp, name, an=None):
    for s in tp.tied_sets:
        if name in s:
            used = {u.name for u in an.dg.uses} if an is not None else set()
            return next((n for n in s if n in used), s[0])
    return name


def _deep_atoms(A, a, out=None):
    out = [] if out is None else out
    r = A.find(a)
    out.append(r)
    e = A.exp.get(r)
    if e is not None:
        for p in e[1]:
            _deep_atoms(A, p, out)
    return out


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


# ---------------------------------------------------------------------- attention
def _linears_feeding(an, ep, target):
    res = []
    for a in _ancestors_of(ep, target) + [target]:
        if _base(a) in ("linear", "addmm"):
            w = a.args[1] if _base(a) == "linear" else a.args[2]
            p = _param_of(an, w)
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
        if _base(u) in ("linear", "addmm"):
            o = _param_of(an, u.args[1] if _base(u) == "linear" else u.args[2])
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
    if scale == 1.0:
        source = "none"
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
        if b in ("linear", "addmm"):
            continue
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
    m = owner(attn)
    for n in ep.graph.nodes:
        if _base(n) not in ("cat", "stack") or not owner(n).startswith(m.rsplit(".", 1)[0]):
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


# ---------------------------------------------------------------------- moe / residual
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
                        embed_scale=scale, embed_scale_source=source)


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
