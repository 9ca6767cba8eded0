"""Union-find over atomic dimensions, driven by an op-rule table keyed by ATen op.

Every tensor axis of every graph value is a list of *atoms* (row-major product, outermost first;
axes of size 1 are the empty list). An atom is a union-find element with a size; its class may be
*refined* into a product of atoms (a view that splits an axis: ``64 -> 4 x 16``) or into a
concatenation of atoms (a slice of a fused projection: ``192 -> 64 | 64 | 64``). The op rules unify
atoms that must be equal, and record how parameters use their axes (roles).

No torch import at module level: the graph is read through node attributes only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

PROD = "prod"
CAT = "cat"


class Atoms:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.sz: list[int] = []
        self.exp: dict[int, tuple[str, list[int]]] = {}

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.sz.append(int(size))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def size(self, a: int) -> int:
        return self.sz[a]

    def expansion(self, a: int):
        return self.exp.get(self.find(a))

    # ------------------------------------------------------------------ unification
    def union(self, a: int, b: int) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return True
        if self.sz[ra] != self.sz[rb]:
            return False
        ea, eb = self.exp.pop(ra, None), self.exp.pop(rb, None)
        self.parent[rb] = ra
        if ea and eb:
            self.exp[ra] = ea
            self._unify_exp(ea, eb)
        elif ea or eb:
            self.exp[ra] = ea or eb
        return True

    def _unify_exp(self, ea, eb) -> None:
        (ka, la), (kb, lb) = ea, eb
        if ka == PROD and kb == PROD:
            self.unify_lists(la, lb)
        elif ka == CAT and kb == CAT and [self.sz[x] for x in la] == [self.sz[x] for x in lb]:
            for x, y in zip(la, lb):
                self.union(x, y)

    def unify_lists(self, l1: list[int], l2: list[int]) -> bool:
        """Unify two row-major atom products of equal total size."""
        l1, l2 = list(l1), list(l2)
        i = j = 0
        ok = True
        while i < len(l1) and j < len(l2):
            pa, pb = self.sz[l1[i]], self.sz[l2[j]]
            ii, jj = i + 1, j + 1
            while pa != pb:
                if pa < pb:
                    if ii >= len(l1):
                        return False
                    pa *= self.sz[l1[ii]]
                    ii += 1
                else:
                    if jj >= len(l2):
                        return False
                    pb *= self.sz[l2[jj]]
                    jj += 1
            s1, s2 = l1[i:ii], l2[j:jj]
            if len(s1) == 1 and len(s2) == 1:
                ok &= self.union(s1[0], s2[0])
            elif len(s1) == 1:
                ok &= self.refine(s1[0], s2)
            elif len(s2) == 1:
                ok &= self.refine(s2[0], s1)
            else:
                f1, f2 = self.flat(s1), self.flat(s2)
                if f1 != s1 or f2 != s2:
                    ok &= self.unify_lists(f1, f2)
                else:
                    ok = False
            i, j = ii, jj
        return ok

    def refine(self, a: int, parts: list[int]) -> bool:
        """Declare atom ``a`` to be the row-major product of ``parts``."""
        ra = self.find(a)
        if any(self.find(p) == ra for p in parts):
            return False
        e = self.exp.get(ra)
        if e is None:
            self.exp[ra] = (PROD, list(parts))
            return True
        if e[0] == PROD:
            return self.unify_lists(e[1], parts)
        return False

    def flat(self, atoms: list[int]) -> list[int]:
        """Expand product refinements recursively (not concatenations)."""
        out: list[int] = []
        for a in atoms:
            e = self.exp.get(self.find(a))
            if e and e[0] == PROD:
                out.extend(self.flat(e[1]))
            else:
                out.append(a)
        return out

    # ------------------------------------------------------------------ slicing
    def cat_slice(self, a: int, start: int, end: int) -> int | None:
        """The atom standing for ``a[start:end]``, refining ``a`` into a concatenation."""
        n = self.sz[self.find(a)]
        if start == 0 and end == n:
            return a
        r = self.find(a)
        e = self.exp.get(r)
        if e is None:
            cuts = sorted({0, start, end, n})
            parts = [self.new(cuts[k + 1] - cuts[k]) for k in range(len(cuts) - 1)]
            self.exp[r] = (CAT, parts)
            return parts[cuts.index(start)]
        if e[0] == CAT:
            off = 0
            for p in e[1]:
                ps = self.sz[self.find(p)]
                if off <= start and end <= off + ps:
                    return self.cat_slice(p, start - off, end - off)
                off += ps
            return None
        # product: slice aligned to the outermost factor
        first, rest = e[1][0], e[1][1:]
        inner = 1
        for x in rest:
            inner *= self.sz[self.find(x)]
        if start % inner == 0 and end % inner == 0:
            sub = self.cat_slice(first, start // inner, end // inner)
            if sub is None:
                return None
            new = self.new(end - start)
            self.exp[new] = (PROD, [sub] + list(rest))
            return new
        return None

    def cat_cut(self, a: int, cuts: list[int]) -> None:
        """Refine an unrefined atom into the concatenation given by ``cuts`` (offsets)."""
        r = self.find(a)
        n = self.sz[r]
        if r in self.exp:
            return
        cs = sorted({0, n, *[c for c in cuts if 0 <= c <= n]})
        if len(cs) > 2:
            self.exp[r] = (CAT, [self.new(cs[k + 1] - cs[k]) for k in range(len(cs) - 1)])

    def cat_of(self, parts: list[int]) -> int:
        """An atom that is the concatenation of ``parts``: an existing parent when they are
        consecutive parts of one, else a new atom."""
        roots = [self.find(p) for p in parts]
        for r, (k, lst) in list(self.exp.items()):
            if k != CAT or self.find(r) != r:
                continue
            lr = [self.find(x) for x in lst]
            if lr == roots:
                return r
        new = self.new(sum(self.sz[r] for r in roots))
        self.exp[new] = (CAT, list(parts))
        return new


Axes = list  # list[list[int]]: per axis, the atoms


@dataclass
class ParamUse:
    name: str  # parameter FQN
    axes_roles: dict[int, str]  # param axis -> role
    op: str
    module: str  # owning module of the op


@dataclass
class DimGraph:
    """The result of propagation: atoms, per-node axes, per-parameter axes, param uses."""

    atoms: Atoms
    values: dict[str, Any]  # node name -> Axes, or tuple of Axes for multi-output ops
    param_axes: dict[str, list[int | None]]  # param FQN -> atom per axis (None for size 1)
    placeholder_param: dict[str, str]  # placeholder node name -> param FQN
    uses: list[ParamUse] = field(default_factory=list)
    unhandled: list[str] = field(default_factory=list)  # ops that got fresh atoms
    origin: dict[str, tuple[str, list[int | None]]] = field(default_factory=dict)
    buffer_axes: dict[str, list[int | None]] = field(default_factory=dict)  # buffer FQN -> atom per axis


def _shape(node) -> tuple[int, ...] | None:
    v = node.meta.get("val") if hasattr(node, "meta") else None
    if v is None or not hasattr(v, "shape"):
        return None
    try:
        return tuple(int(d) for d in v.shape)
    except TypeError:
        return None


def _op_name(node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    name = getattr(t, "__name__", None) or str(t)
    overload = getattr(t, "_overloadname", None)
    pkt = getattr(t, "_schema", None)
    if pkt is not None:
        return f"{pkt.name.split('::')[-1]}.{overload or 'default'}" if overload else pkt.name.split("::")[-1]
    return name


def _owner(node) -> str:
    st = node.meta.get("nn_module_stack") if hasattr(node, "meta") else None
    if not st:
        return ""
    path = list(st.values())[-1][0]
    return _strip_wrapper(path)


def _owner_type(node) -> str:
    st = node.meta.get("nn_module_stack") if hasattr(node, "meta") else None
    if not st:
        return ""
    return list(st.values())[-1][1].rsplit(".", 1)[-1] if isinstance(list(st.values())[-1][1], str) else ""


def _strip_wrapper(path: str) -> str:
    # the tracing wrapper holds the model as attribute "m"
    if path == "m":
        return ""
    if path.startswith("m."):
        return path[2:]
    return path


class Propagator:
    """Walks an exported graph once, applying the op-rule table."""

    def __init__(self, ep) -> None:
        self.ep = ep
        self.a = Atoms()
        self.values: dict[str, Any] = {}
        self.param_axes: dict[str, list[int | None]] = {}
        self.placeholder_param: dict[str, str] = {}
        self.uses: list[ParamUse] = []
        self.unhandled: list[str] = []
        self.origin: dict[str, tuple[str, list[int | None]]] = {}
        self.buffer_axes: dict[str, list[int | None]] = {}
        self.nodes_by_name = {n.name: n for n in ep.graph.nodes}

    # -------------------------------------------------------------- helpers
    def fresh(self, shape) -> Axes:
        return [[self.a.new(d)] if d > 1 else [] for d in shape]

    def ax(self, x) -> Axes | None:
        if hasattr(x, "name") and x.name in self.values:
            v = self.values[x.name]
            return v if isinstance(v, list) else None
        return None

    def set(self, node, axes) -> None:
        self.values[node.name] = axes

    def role(self, node_arg, axis_roles: dict[int, str], op: str, node) -> None:
        """Record the use of a parameter (directly or through a view/index) on some axes."""
        if not hasattr(node_arg, "name"):
            return
        o = self.origin.get(node_arg.name)
        if o is None:
            return
        pname, amap = o
        roles: dict[int, str] = {}
        for nax, r in axis_roles.items():
            if nax < 0:
                nax += len(amap)
            if 0 <= nax < len(amap) and amap[nax] is not None:
                roles[amap[nax]] = r
        if roles:
            self.uses.append(ParamUse(pname, roles, op, _owner(node)))

    def broadcast(self, arrs: list[Axes], out_shape) -> Axes:
        """Elementwise with broadcasting: unify aligned axes of size > 1."""
        rank = len(out_shape)
        out: Axes = [None] * rank  # type: ignore[list-item]
        for k in range(1, rank + 1):
            lst = [ar[-k] for ar in arrs if len(ar) >= k and ar[-k]]
            if not lst:
                out[-k] = []
                continue
            base = lst[0]
            for other in lst[1:]:
                self.a.unify_lists(base, other)
            out[-k] = base
        return out

    # -------------------------------------------------------------- reshape
    def reshape(self, in_axes: Axes, out_shape) -> Axes:
        work = [x for axis in in_axes for x in axis]
        out: Axes = []
        A = self.a
        for s in out_shape:
            if s == 1:
                out.append([])
                continue
            acc: list[int] = []
            p = 1
            while p < s:
                if not work:
                    return self.fresh(out_shape)
                a = work.pop(0)
                sa = A.size(A.find(a))
                if s % (p * sa) == 0:
                    acc.append(a)
                    p *= sa
                    continue
                need = s // p
                e = A.expansion(a)
                if e is not None and e[0] == PROD:
                    work = list(e[1]) + work
                    continue
                if e is None and sa % need == 0:
                    parts = [A.new(need), A.new(sa // need)]
                    A.refine(a, parts)
                    work = parts + work
                    continue
                return self.fresh(out_shape)
            if p != s:
                return self.fresh(out_shape)
            out.append(acc)
        if work:
            return self.fresh(out_shape)
        return out

    # -------------------------------------------------------------- slicing
    def slice_axis(self, axis: list[int], start: int, end: int) -> list[int]:
        if end - start <= 1:
            return []
        if not axis:
            return [self.a.new(end - start)]
        if len(axis) == 1:
            r = self.a.cat_slice(axis[0], start, end)
            return [r] if r is not None else [self.a.new(end - start)]
        # several atoms: aligned to the outermost one
        inner = 1
        for x in axis[1:]:
            inner *= self.a.size(self.a.find(x))
        if start % inner == 0 and end % inner == 0:
            r = self.a.cat_slice(axis[0], start // inner, end // inner)
            if r is not None:
                return ([r] if end // inner - start // inner > 1 else []) + list(axis[1:])
        return [self.a.new(end - start)]

    # -------------------------------------------------------------- main loop
    def run(self) -> DimGraph:
        sig = self.ep.graph_signature
        i2p = dict(getattr(sig, "inputs_to_parameters", {}) or {})
        i2b = dict(getattr(sig, "inputs_to_buffers", {}) or {})
        for node in self.ep.graph.nodes:
            if node.op == "placeholder":
                shape = _shape(node)
                axes = self.fresh(shape) if shape is not None else None
                if node.name in i2p:
                    fqn = _strip_wrapper(i2p[node.name])
                    self.placeholder_param[node.name] = fqn
                    self.param_axes[fqn] = [ax[0] if ax else None for ax in axes]
                    self.origin[node.name] = (fqn, list(range(len(axes))))
                elif node.name in i2b and axes is not None:
                    # a buffer's axes, for the persistent ones the checkpoint stores (carried like
                    # parameters); it is not a parameter use, so analysis does not see it as one
                    self.buffer_axes[_strip_wrapper(i2b[node.name])] = [ax[0] if ax else None for ax in axes]
                if axes is not None:
                    self.set(node, axes)
                continue
            if node.op in ("output", "get_attr"):
                continue
            if node.op == "call_function":
                self.apply(node)
        return DimGraph(self.a, self.values, self.param_axes, self.placeholder_param, self.uses, self.unhandled, self.origin,
                        self.buffer_axes)

    def apply(self, node) -> None:
        name = _op_name(node)
        base = name.split(".")[0]
        rule = RULES.get(name) or RULES.get(base)
        shape = _shape(node)
        if rule is not None:
            try:
                res = rule(self, node, shape)
            except (IndexError, TypeError, KeyError, ValueError):
                res = None
            if res is not None:
                return
        if node.target.__class__.__name__ == "builtin_function_or_method" and getattr(node.target, "__name__", "") == "getitem":
            src, idx = node.args
            v = self.values.get(getattr(src, "name", ""))
            if isinstance(v, tuple) and isinstance(idx, int) and idx < len(v):
                self.set(node, v[idx])
                return
        # fallback: unary elementwise if the output matches the first tensor input's shape
        if shape is not None:
            first = next((x for x in node.args if hasattr(x, "name") and _shape(x) is not None), None)
            if first is not None and _shape(first) == shape and self.ax(first) is not None and base not in _NO_FALLBACK:
                self.set(node, self.ax(first))
                if first.name in self.origin and base in _VIEWLIKE_UNARY:
                    self.origin[node.name] = self.origin[first.name]
                return
            self.set(node, self.fresh(shape))
            if base not in _QUIET:
                self.unhandled.append(f"{name}@{_owner(node) or '<root>'}")
        else:
            val = node.meta.get("val")
            if isinstance(val, (tuple, list)):
                self.set_tuple(node, val)

    def set_tuple(self, node, val) -> None:
        outs = []
        for v in val:
            if hasattr(v, "shape"):
                outs.append(self.fresh(tuple(int(d) for d in v.shape)))
            else:
                outs.append(None)
        self.values[node.name] = tuple(outs)


_QUIET = {"arange", "zeros", "ones", "full", "empty", "new_ones", "new_zeros", "scalar_tensor", "_assert_tensor_metadata",
          "lift_fresh_copy", "sym_size", "eq", "ne", "le", "lt", "ge", "gt", "diff", "cumsum", "index", "__and__",
          "__or__", "one_hot", "nonzero", "tril", "triu", "zeros_like", "ones_like", "full_like", "empty_like", "bitwise_and",
          "gather", "logical_and", "logical_or", "logical_not", "argmax", "wrap_with_set_grad_enabled", "wrap_with_autocast"}
_NO_FALLBACK = {"sum", "mean", "amax", "max", "min", "var_mean"}
_VIEWLIKE_UNARY = {"to", "_to_copy", "alias", "clone", "contiguous", "detach", "type_as", "float", "lift_fresh_copy"}


# ---------------------------------------------------------------------- rules
RULES: dict[str, Callable] = {}


def rule(*names):
    def deco(fn):
        for n in names:
            RULES[n] = fn
        return fn

    return deco


def _t(p: Propagator, x):
    return p.ax(x)


@rule("linear")
def _linear(p: Propagator, node, shape):
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    xa, wa = _t(p, x), _t(p, w)
    if xa is None or wa is None:
        return None
    wa2 = wa if len(wa) == 2 else [[], wa[0]] if len(wa) == 1 else wa
    if xa[-1] or wa2[1]:
        p.a.unify_lists(xa[-1] or [], wa2[1] or []) if xa[-1] and wa2[1] else None
    out = list(xa[:-1]) + [wa2[0]]
    if b is not None and _t(p, b) is not None:
        ba = _t(p, b)
        if ba and ba[0] and wa2[0]:
            p.a.unify_lists(ba[0], wa2[0])
        p.role(b, {0: "out"}, "linear", node)
    p.role(w, {0: "out", 1: "in"} if len(wa) == 2 else {0: "in"}, "linear", node)
    p.role(x, {-1: "in"}, "linear", node)
    p.set(node, out)
    return True


@rule("addmm")
def _addmm(p: Propagator, node, shape):
    b, x, w = node.args[:3]
    xa, wa, ba = _t(p, x), _t(p, w), _t(p, b)
    if xa is None or wa is None:
        return None
    if xa[-1] and wa[0]:
        p.a.unify_lists(xa[-1], wa[0])
    if ba and ba[-1] and wa[1]:
        p.a.unify_lists(ba[-1], wa[1])
    p.role(w, {0: "in", 1: "out"}, "addmm", node)
    p.role(b, {-1: "out"}, "addmm", node)
    p.set(node, [xa[0], wa[1]])
    return True


def _matmul_like(p: Propagator, node, shape, x, y):
    xa, ya = _t(p, x), _t(p, y)
    if xa is None or ya is None or shape is None:
        return None
    if len(ya) == 1:  # matrix @ vector
        if xa[-1] and ya[0]:
            p.a.unify_lists(xa[-1], ya[0])
        p.set(node, list(xa[:-1]))
        return True
    if xa[-1] and ya[-2]:
        p.a.unify_lists(xa[-1], ya[-2])
    batch = p.broadcast([xa[:-2], ya[:-2]], shape[:-2]) if len(shape) > 2 else []
    out = list(batch) + ([xa[-2]] if len(xa) >= 2 else []) + [ya[-1]]
    if len(out) != len(shape):
        out = p.fresh(shape)
    # roles: a parameter-derived operand
    p.role(x, {-1: "in", -2: "out"}, "matmul", node)
    p.role(y, {-2: "in", -1: "out"}, "matmul", node)
    p.set(node, out)
    return True


@rule("mm", "bmm", "matmul")
def _mm(p, node, shape):
    return _matmul_like(p, node, shape, node.args[0], node.args[1])


@rule("embedding")
def _embedding(p: Propagator, node, shape):
    w, ids = node.args[0], node.args[1]
    wa, ia = _t(p, w), _t(p, ids)
    if wa is None or ia is None:
        return None
    p.role(w, {0: "index", 1: "out"}, "embedding", node)
    p.set(node, list(ia) + [wa[1]])
    return True


_ELEMENTWISE = [
    "add", "sub", "mul", "div", "where", "pow", "neg", "silu", "gelu", "tanh", "relu", "sigmoid", "exp", "rsqrt",
    "sqrt", "masked_fill", "softmax", "_softmax", "log_softmax", "dropout", "clone", "contiguous", "alias", "to",
    "_to_copy", "detach", "type_as", "maximum", "minimum", "clamp", "erf", "abs", "reciprocal", "sin", "cos",
    "mul_", "add_", "div_", "copy_", "gelu_", "relu_", "silu_", "tanh_", "sub_", "rsub", "hardtanh", "leaky_relu",
    "native_dropout", "float", "square", "log", "sign", "floor_divide", "fill_", "zero_",
]


def _elementwise(p: Propagator, node, shape):
    if shape is None:
        return None
    tens = [x for x in list(node.args) + list(node.kwargs.values()) if hasattr(x, "name") and p.ax(x) is not None]
    if not tens:
        p.set(node, p.fresh(shape))
        return True
    arrs = [p.ax(x) for x in tens]
    out = p.broadcast(arrs, shape)
    if any(o is None for o in out):
        out = p.fresh(shape)
    base = _op_name(node).split(".")[0]
    if len(tens) > 1 or base in ("mul", "add", "sub", "div"):
        for x in tens:
            xa = p.ax(x)
            p.role(x, {k - len(xa): "elem" for k in range(len(xa))}, base, node)
    if len(tens) == 1 and tens[0].name in p.origin and base in _VIEWLIKE_UNARY:
        p.origin[node.name] = p.origin[tens[0].name]
    p.set(node, out)
    return True


for _n in _ELEMENTWISE:
    RULES[_n] = _elementwise


@rule("view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "flatten", "unflatten", "view_as", "reshape_as",
      "expand_as", "squeeze_")
def _view(p: Propagator, node, shape):
    if shape is None:
        return None
    xa = _t(p, node.args[0])
    if xa is None:
        return None
    insz = _shape(node.args[0])
    import math

    if insz is not None and math.prod(insz) != math.prod(shape):
        return _expand(p, node, shape)
    out = p.reshape(xa, shape)
    src = node.args[0].name
    if src in p.origin:
        pname, amap = p.origin[src]
        # keep provenance only when non-trivial axes map one to one
        nz_in = [amap[k] for k, a in enumerate(xa) if a]
        nz_out = [k for k, a in enumerate(out) if a]
        if len(nz_in) == len(nz_out):
            m: list[int | None] = [None] * len(out)
            for k, pa in zip(nz_out, nz_in):
                m[k] = pa
            p.origin[node.name] = (pname, m)
    p.set(node, out)
    return True


@rule("transpose", "t", "numpy_T", "permute", "swapaxes", "movedim")
def _permute(p: Propagator, node, shape):
    xa = _t(p, node.args[0])
    if xa is None:
        return None
    n = len(xa)
    name = _op_name(node).split(".")[0]
    if name in ("t", "numpy_T"):  # numpy_T: `x.T` (FalconLinear), all dims reversed
        perm = list(range(n))[::-1]
    elif name == "permute":
        perm = [d % n for d in node.args[1]]
    else:
        d0, d1 = node.args[1] % n, node.args[2] % n
        perm = list(range(n))
        perm[d0], perm[d1] = perm[d1], perm[d0]
    p.set(node, [xa[k] for k in perm])
    if node.args[0].name in p.origin:
        pname, amap = p.origin[node.args[0].name]
        p.origin[node.name] = (pname, [amap[k] for k in perm])
    return True


@rule("expand")
def _expand(p: Propagator, node, shape):
    xa = _t(p, node.args[0])
    if xa is None or shape is None:
        return None
    out: Axes = []
    for k in range(1, len(shape) + 1):
        if k <= len(xa) and (xa[-k] or shape[-k] == 1):
            out.insert(0, xa[-k])
        else:
            out.insert(0, [p.a.new(shape[-k])] if shape[-k] > 1 else [])
    p.set(node, out)
    return True


@rule("slice")
def _slice(p: Propagator, node, shape):
    xa = _t(p, node.args[0])
    insh = _shape(node.args[0])
    if xa is None or shape is None or insh is None:
        return None
    dim = node.args[1] if len(node.args) > 1 else 0
    dim %= len(insh)
    start = node.args[2] if len(node.args) > 2 else 0
    end = node.args[3] if len(node.args) > 3 else insh[dim]
    step = node.args[4] if len(node.args) > 4 else 1
    start = 0 if start is None else start
    end = insh[dim] if end is None else end
    if not isinstance(start, int) or not isinstance(end, int):
        return None
    n = insh[dim]
    start = max(0, start + n if start < 0 else start)
    end = min(n, end + n if end < 0 else end)
    out = list(xa)
    if step != 1:
        out[dim] = _strided(p, xa[dim], n, start, end, step, shape[dim])
    else:
        out[dim] = p.slice_axis(xa[dim], start, end)
    p.set(node, out)
    return True


def _strided(p: Propagator, axis: list[int], n: int, start: int, end: int, step: int, size: int) -> list[int]:
    """The atoms of ``x[start::step]`` along an axis of ``n``: with ``step`` dividing ``n``,
    ``start < step`` and the slice running to the end, the axis is the row-major product
    (n / step) x step and the slice picks one inner index: its axis is the outer factor (GPT-OSS's
    interleaved ``gate_up[..., ::2]`` / ``[..., 1::2]``: the ffn units, each a (gate, up) pair).
    Anything else is a fresh atom."""
    if size <= 1:
        return []
    if not isinstance(step, int) or step < 2 or n % step or not 0 <= start < step or end != n \
            or size != n // step or len(axis) != 1:
        return [p.a.new(size)]
    A = p.a
    r = A.find(axis[0])
    e = A.exp.get(r)
    if e is None:
        outer, inner = A.new(size), A.new(step)
        A.exp[r] = (PROD, [outer, inner])
        return [outer]
    if e[0] == PROD and len(e[1]) >= 2 and A.size(A.find(e[1][-1])) == step:
        return list(e[1][:-1])  # the outer factors, row-major
    return [p.a.new(size)]


@rule("narrow")
def _narrow(p: Propagator, node, shape):
    xa = _t(p, node.args[0])
    if xa is None:
        return None
    dim, start, length = node.args[1], node.args[2], node.args[3]
    dim %= len(xa)
    out = list(xa)
    out[dim] = p.slice_axis(xa[dim], start, start + length)
    p.set(node, out)
    return True


@rule("select")
def _select(p: Propagator, node, shape):
    xa = _t(p, node.args[0])
    insh = _shape(node.args[0])
    if xa is None or insh is None:
        return None
    dim, idx = node.args[1] % len(xa), node.args[2]
    idx = idx + insh[dim] if idx < 0 else idx
    p.slice_axis(xa[dim], idx, idx + 1)
    p.set(node, [a for k, a in enumerate(xa) if k != dim])
    return True


@rule("split", "split_with_sizes", "chunk", "unbind", "tensor_split")
def _split(p: Propagator, node, shape):
    xa = _t(p, node.args[0])
    insh = _shape(node.args[0])
    val = node.meta.get("val")
    if xa is None or insh is None or not isinstance(val, (list, tuple)):
        return None
    name = _op_name(node).split(".")[0]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if name == "unbind":
        dim = node.args[1] if len(node.args) > 1 else 0
    dim %= len(insh)
    if name != "unbind" and len(xa[dim]) == 1:
        cuts, off = [], 0
        for v in val:
            off += int(v.shape[dim])
            cuts.append(off)
        p.a.cat_cut(xa[dim][0], cuts)
    outs = []
    off = 0
    for v in val:
        sz = int(v.shape[dim]) if name != "unbind" else 1
        o = list(xa)
        seg = p.slice_axis(xa[dim], off, off + sz)
        if name == "unbind":
            o.pop(dim)
        else:
            o[dim] = seg
        outs.append(o)
        off += sz
    p.values[node.name] = tuple(outs)
    return True


@rule("cat", "concat", "concatenate")
def _cat(p: Propagator, node, shape):
    xs = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if shape is None:
        return None
    dim %= len(shape)
    arrs = [p.ax(x) for x in xs]
    if any(a is None for a in arrs):
        return None
    others = [[a[k] for k in range(len(a)) if k != dim] for a in arrs]
    rest = p.broadcast(others, [s for k, s in enumerate(shape) if k != dim])
    parts = []
    for a in arrs:
        ax = a[dim]
        if len(ax) == 1:
            parts.append(ax[0])
        elif not ax:
            continue
        else:
            na = p.a.new(p.a.size(p.a.find(ax[0])) * 0 + _prod(p, ax))
            p.a.refine(na, ax)
            parts.append(na)
    catax = [p.a.cat_of(parts)] if len(parts) > 1 else ([parts[0]] if parts else [])
    out = list(rest)
    out.insert(dim, catax if shape[dim] > 1 else [])
    p.set(node, out)
    return True


def _prod(p, ax):
    n = 1
    for x in ax:
        n *= p.a.size(p.a.find(x))
    return n


@rule("stack")
def _stack(p: Propagator, node, shape):
    xs = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else 0
    arrs = [p.ax(x) for x in xs]
    if any(a is None for a in arrs) or shape is None:
        return None
    dim %= len(shape)
    rest = p.broadcast(arrs, [s for k, s in enumerate(shape) if k != dim])
    out = list(rest)
    out.insert(dim, [p.a.new(shape[dim])] if shape[dim] > 1 else [])
    p.set(node, out)
    return True


def _reduced_axes(xa, dims, keep: bool):
    """The input's axis lists after reducing over ``dims`` (kept as size-1 axes with ``keep``)."""
    dims = {d % len(xa) for d in dims}
    return [([] if k in dims else a) for k, a in enumerate(xa) if keep or k not in dims]


@rule("mean", "sum", "amax", "amin", "max", "min", "prod", "var", "std", "all", "any", "argmax")
def _reduce(p: Propagator, node, shape):
    xa = _t(p, node.args[0])
    if xa is None or shape is None:
        return None
    dims = node.args[1] if len(node.args) > 1 else None
    if isinstance(dims, int):
        dims = [dims]
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if dims is None or dims == []:
        p.set(node, [[] for _ in shape])
        return True
    out = _reduced_axes(xa, dims, keep)
    if len(out) != len(shape):
        return None
    p.set(node, out)
    return True


@rule("var_mean")
def _var_mean(p: Propagator, node, shape):
    xa = _t(p, node.args[0])
    if xa is None:
        return None
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    out = _reduced_axes(xa, dims if isinstance(dims, (list, tuple)) else [dims], node.kwargs.get("keepdim", False))
    p.values[node.name] = (out, out)
    return True


@rule("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm")
def _layer_norm(p: Propagator, node, shape):
    x = node.args[0]
    xa = _t(p, x)
    if xa is None:
        return None
    nshape = node.args[1]
    k = len(nshape)
    for extra in node.args[2:4]:
        if hasattr(extra, "name") and p.ax(extra) is not None:
            ea = p.ax(extra)
            for j in range(1, k + 1):
                if ea[-j] and xa[-j]:
                    p.a.unify_lists(ea[-j], xa[-j])
            p.role(extra, {j: "elem" for j in range(len(ea))}, "layer_norm", node)
    if _op_name(node).startswith("native_layer_norm") or _op_name(node).startswith("_fused"):
        stat = [a if j < len(xa) - k else [] for j, a in enumerate(xa)]
        p.values[node.name] = (list(xa), stat, stat)
    else:
        p.set(node, list(xa))
    return True


@rule("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention")
def _sdpa(p: Propagator, node, shape):
    q, k, v = node.args[:3]
    qa, ka, va = _t(p, q), _t(p, k), _t(p, v)
    if qa is None or ka is None or va is None:
        return None
    if qa[-1] and ka[-1]:
        p.a.unify_lists(qa[-1], ka[-1])
    if ka[-2] and va[-2]:
        p.a.unify_lists(ka[-2], va[-2])
    batch = p.broadcast([qa[:-2], ka[:-2], va[:-2]], [1] * (len(qa) - 2) if False else _shape(q)[:-2])
    out = list(batch) + [qa[-2], va[-1]]
    if _op_name(node).startswith("scaled_dot_product_attention"):
        p.set(node, out)
    else:
        p.values[node.name] = (out,)
    return True


@rule("index")
def _index(p: Propagator, node, shape):
    x, idx = node.args[0], node.args[1]
    xa = _t(p, x)
    if xa is None or shape is None:
        return None
    idx = list(idx)
    # only the common case: one index tensor on the first axis
    if len(idx) == 1 and idx[0] is not None and p.ax(idx[0]) is not None:
        ia = p.ax(idx[0])
        out = list(ia) + list(xa[1:])
        if len(out) == len(shape):
            p.set(node, out)
            if x.name in p.origin:
                pname, amap = p.origin[x.name]
                p.origin[node.name] = (pname, [None] * len(ia) + list(amap[1:]))
                p.uses.append(ParamUse(pname, {amap[0]: "expert"} if amap[0] is not None else {}, "index", _owner(node)))
            return True
    p.set(node, p.fresh(shape))
    return True


@rule("topk")
def _topk(p: Propagator, node, shape):
    xa = _t(p, node.args[0])
    val = node.meta.get("val")
    if xa is None or not isinstance(val, (tuple, list)):
        return None
    k = int(val[0].shape[-1])
    last = [p.a.new(k)] if k > 1 else []
    out = list(xa[:-1]) + [last]
    p.values[node.name] = (out, out)
    return True


@rule("repeat_interleave", "repeat")
def _repeat(p: Propagator, node, shape):
    if shape is None:
        return None
    xa = _t(p, node.args[0])
    if xa is None:
        return None
    insh = _shape(node.args[0])
    out = [a if insh is not None and k < len(insh) and insh[k] == shape[k] else ([p.a.new(shape[k])] if shape[k] > 1 else [])
           for k, a in enumerate(xa)] if len(xa) == len(shape) else p.fresh(shape)
    p.set(node, out)
    return True


def propagate(ep) -> DimGraph:
    return Propagator(ep).run()


def op_name(node) -> str:
    return _op_name(node)


def owner(node) -> str:
    return _owner(node)


def owner_type(node) -> str:
    return _owner_type(node)


def shape_of(node):
    return _shape(node)
