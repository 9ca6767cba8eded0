"""Graph helpers shared by every discovery step: op names, trivial views, ancestors, layers."""

from __future__ import annotations

# `Analysis` in annotations: scaler_wizard.ir.discovery.analysis (not imported: it imports this module)

from scaler_wizard.ir.dims import op_name
from scaler_wizard.ir.trace import Traced, split_layer

_TRIVIAL = {"to", "_to_copy", "alias", "clone", "contiguous", "detach", "dropout", "native_dropout", "type_as",
            "_assert_tensor_metadata", "view", "reshape", "_unsafe_view"}
ATTN_OPS = ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
            "_scaled_dot_product_efficient_attention")


def _base(node) -> str:
    return op_name(node).split(".")[0] if node.op == "call_function" else node.op


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


def _layer_of(traced: Traced, module: str | None):
    if not module:
        return None
    _, i = split_layer(module + ".x", traced.layer_list_path)
    return i


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


def _float_keys(cfg):
    return {k: v for k, v in cfg.items() if isinstance(v, float) and not k.startswith("_")}


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


def _weight_of(an: Analysis, node) -> str | None:
    """The parameter a projection op multiplies by: ``linear``'s weight, ``addmm``'s mat2, or a
    ``matmul`` / ``mm`` operand that is a parameter through views and transposes (Falcon's
    ``FalconLinear`` computes ``x @ W.T``). None for any other op."""
    b = _base(node)
    if b == "linear":
        return _param_of(an, node.args[1])
    if b == "addmm":
        return _param_of(an, node.args[2])
    if b in ("matmul", "mm"):
        for x in node.args[:2]:
            p = _param_of(an, x) if hasattr(x, "name") else None
            if p:
                return p
    return None
