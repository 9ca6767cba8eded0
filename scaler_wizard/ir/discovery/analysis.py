"""Structural analysis of one trace: hidden, vocab, heads / kv_heads / head_dim, experts and ffn
named from the graph (before any config key is bound)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from scaler_wizard.ir.dims import PROD, DimGraph, op_name, owner, propagate
from scaler_wizard.ir.discovery.attention import _find_attention
from scaler_wizard.ir.discovery.graph import (
    _ancestors,
    _ancestors_of,
    _base,
    _layer_of,
    _node_map,
    _param_of,
    _skip_trivial_back,
)
from scaler_wizard.ir.errors import IRDiscoveryError
from scaler_wizard.ir.trace import Traced

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
    # token mixers that are not attention: module path (one per traced layer) -> sequence-mixing ops in it
    mixers: dict[str, list[str]] = field(default_factory=dict)
    # attention sites whose (heads, kv_heads, head_dim) differ from the first site's: (traced layer, sizes)
    attn_shapes: list[tuple[int | None, tuple[int, int, int]]] = field(default_factory=list)

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
    first_shape = None
    for at in an.attn_nodes:
        n = at.node
        qa, ka, va = (dg.values[x.name] for x in (at.q, at.k, at.v))
        if len(qa) < 3 or not qa[-3] or not qa[-1]:
            raise IRDiscoveryError("attention operands are not [batch, heads, seq, head_dim]", op=op_name(n), module=owner(n))
        h = qa[-3][0] if len(qa[-3]) == 1 else None
        if h is None:
            raise IRDiscoveryError("query heads axis is not one dimension", op=op_name(n), module=owner(n))
        e = A.expansion(h)
        kvh = e[1][0] if e is not None and e[0] == PROD and len(e[1]) == 2 else None
        d = qa[-1][0]
        # the head width as the whole last axis of q: a rotary layer may split it into factors
        # (Llama-4's complex RoPE: 16 = 8 x 2) where a layer without RoPE does not; what is compared
        # is the sizes, not their factorisation
        width = 1
        for x in qa[-1]:
            width *= an.size(x) or 1
        shape = (an.size(h), an.size(kvh) if kvh is not None else an.size(h), width)
        if first_shape is None:
            first_shape = shape
        elif shape != first_shape and not any(an.root(x) in an.names for x in (h, d) + ((kvh,) if kvh is not None else ())):
            # a layer kind with an attention shape of its own (sliding-window layers with their own
            # head counts / head dim: swa_num_key_value_heads): its dims are not the groups of the
            # first attention's layers; left unnamed (constant factors: nothing grows them) and recorded
            an.attn_shapes.append((_layer_of(traced, owner(n)), shape))
            continue
        if kvh is not None:
            an.name_atom(kvh, "kv_heads")
        an.name_atom(h, "heads")
        an.name_atom(d, "head_dim")
        dv = va[-1][0] if va[-1] else None
        if dv is not None and A.find(dv) != A.find(d):
            if A.size(A.find(dv)) == A.size(A.find(d)):
                A.union(dv, d)  # value head_dim: the same config value in every supported model
            else:
                an.name_atom(dv, "v_head_dim")
    if not an.attn_nodes:
        # A softmax inside the layers without a recognised attention pattern (Bloom's baddbmm with
        # ALiBi) is attention discovery does not understand, not the absence of attention.
        sm = next((n for n in nodes if _base(n) in ("softmax", "_softmax") and _layer_of(traced, owner(n)) is not None),
                  None)
        if sm is not None:
            an.notes.append(f"attention not recognised: the softmax in {owner(sm)} ({op_name(sm)}) is not between "
                            "q @ k and @ v in a form discovery knows (matmul / bmm / scaled_dot_product_attention)")
        else:
            an.notes.append("no attention op found")

    # experts: stacked weights indexed by routing ids; router: the linear feeding topk
    an.topk_nodes = [n for n in nodes if _base(n) == "topk"]
    an.mixers = _token_mixers(an, nodes)
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
    cands = []
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
        if any((u.module == m or u.module.startswith(m + ".")) and m.count(".") > (traced.layer_list_path or "").count(".") + 1
               for m in list(an.mixers) + [owner(a.node) for a in an.attn_nodes]):
            # a state-space / linear-attention block's output projection, or an attention output
            # projection whose input is not laid out as heads x head_dim (DiffLlama's differential
            # attention): their inner size is not ffn
            continue
        cands.append((inner, _layer_of(traced, u.module), A.size(A.find(inner))))
    # One FFN width per layer: a second writer of another width in a layer that has one of the first
    # width is a different block (Afmoe's shared experts, moe_intermediate_size x num_shared_experts,
    # next to its experts), not the ffn; widths that differ between layers stay ffn (noted).
    first = cands[0][2] if cands else None
    layers_with_first = {li for _, li, size in cands if size == first}
    for inner, li, size in cands:
        if size != first and li in layers_with_first:
            continue
        an.name_atom(inner, "ffn")
    an.names = {A.find(r): n for r, n in an.names.items()}
    return an


# Ops that combine positions of the sequence (outside an attention site they make a token mixer that
# is not attention): convolutions (over the sequence: a short causal conv), running sums / products
# (a scan's decay), higher-order loops, and products of two computed values (a state update
# k^T v, a chunked scan's intra-chunk scores). Products count only when both operands depend on
# parameters: rotary tables (inv_freq x positions) and masks depend on none.
_MIXING_OPS = ("conv1d", "conv2d", "convolution", "cumsum", "cumprod", "logcumsumexp")
_PRODUCT_OPS = ("matmul", "bmm", "einsum", "mm", "baddbmm")


def _token_mixers(an: Analysis, nodes) -> dict[str, list[str]]:
    """{module path: [op, ...]} -- per traced layer, the module holding sequence-mixing ops that lie
    outside every recognised attention module and every routed (top-k) block (a hybrid's Mamba /
    gated-delta / convolution mixer). Empty for a transformer."""
    traced = an.traced
    attn_mods = {owner(a.node) for a in an.attn_nodes}
    routed = {owner(t).rsplit(".", 1)[0] for t in an.topk_nodes if "." in owner(t)}
    params = set(an.dg.placeholder_param)
    weighted: set[str] = set()
    for n in nodes:
        if n.name in params or any(a.name in weighted for a in n.all_input_nodes):
            weighted.add(n.name)
    by_layer: dict[int, dict[str, list[str]]] = {}
    for n in nodes:
        if n.op != "call_function":
            continue
        li = _layer_of(traced, owner(n))
        if li is None:
            continue
        b = _base(n)
        target = str(getattr(n, "target", ""))
        if b in _MIXING_OPS or "while_loop" in target or "scan" in target:
            pass
        elif b in _PRODUCT_OPS:
            ins = [x for x in n.args if hasattr(x, "op")]
            if isinstance(n.args[-1], (list, tuple)):  # einsum(equation, [operands])
                ins = [x for x in n.args[-1] if hasattr(x, "op")]
            if len(ins) < 2 or any(_param_of(an, x) for x in ins) or not all(x.name in weighted for x in ins):
                continue
        else:
            continue
        mod = owner(n)
        if any(mod == m or mod.startswith(m + ".") for m in attn_mods | routed):
            continue
        by_layer.setdefault(li, {}).setdefault(mod, []).append(b)
    softmax_owners = [owner(n) for n in nodes if n.op == "call_function" and _base(n) in ("softmax", "_softmax")]
    depth = (traced.layer_list_path or "").count(".") + 2  # components of a layer's own path
    out: dict[str, list[str]] = {}
    for li, mods in by_layer.items():
        paths = [m.split(".") for m in mods]
        common = []
        for parts in zip(*paths):
            if len(set(parts)) != 1:
                break
            common.append(parts[0])
        # one block holding every mixing op (model.layers.3.mamba), else each module on its own
        # (convolutions on the attention and MLP branches, ops of the layer itself)
        groups = {".".join(common): [o for m in mods.values() for o in m]} if len(common) > depth else mods
        for path, ops in groups.items():
            ops = list(dict.fromkeys(ops))
            if any(o == path or o.startswith(path + ".") for o in softmax_owners):
                ops.append("softmax")  # attention of a form discovery does not recognise (sinks, say)
            out[path] = ops
    return out


def _param_owner(traced, an, atom):
    r = an.dg.atoms.find(atom)
    for name, axes in an.dg.param_axes.items():
        if any(a is not None and an.dg.atoms.find(a) == r for a in axes):
            return name.rsplit(".", 1)[0]
    return None
