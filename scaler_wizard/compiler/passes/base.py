"""Pass contract and lowering state.

A pass is built from one resolved plan statement and has three steps: :meth:`Pass.requires`
(preconditions on the IR / current state), :meth:`Pass.apply` (rewrite the state's tensor nodes)
and :meth:`Pass.ensures` (postconditions: every tensor has the shape predicted from the IR and the
new group sizes, the layer count matches the plan, ...). Any failure is a :class:`PassError` that
names the pass, the passes that ran before it and the plan statement.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from scaler_wizard.compiler import program as P
from scaler_wizard.compiler.predict import tensor_shape
from scaler_wizard.compiler.resolved import EXACT, LayerSource, ResolvedOp, ResolvedPlan, worst
from scaler_wizard.ir.model_ir import Axis, Factor, ModelIR, Segment, TensorInfo


class PassError(Exception):
    def __init__(self, pass_name: str, message: str, *, before: list[str] | None = None, statement: str | None = None):
        self.pass_name = pass_name
        self.before = list(before or [])
        self.statement = statement
        self.detail = message
        where = f" (plan statement `{statement}`)" if statement else ""
        prior = ", ".join(self.before) if self.before else "none"
        super().__init__(f"pass `{pass_name}`{where} failed: {message} [passes before it: {prior}]")


@dataclass
class TState:
    """One concrete tensor of the model being built."""

    node: P.Node
    info: TensorInfo | None  # the IR template it instantiates (None for tensors made by a pass)
    layer: int | None
    axes: tuple[Axis, ...]  # layout (normalised); () for tensors made by a pass
    source: str | None  # the input tensor it started from
    changed: bool = False  # values differ from the input tensor's
    region: list[tuple[int, int]] | None = None  # per axis, where the original values still are
    exactness: str = EXACT
    notes: list[str] = field(default_factory=list)
    writer: bool = False  # writes the residual stream (o_proj, down_proj, their biases, ...)
    new: bool = False  # made by a pass (new layer, new expert tensor)


@dataclass
class LowerState:
    ir: ModelIR
    plan: ResolvedPlan
    tensors: dict[str, TState]
    sizes: dict[str, int]
    layer_prefix: str | None
    aliases: dict[str, str] = field(default_factory=dict)  # tied duplicate -> stored tensor
    untied: set[str] = field(default_factory=set)
    done: list[str] = field(default_factory=list)  # names of passes applied so far
    notes: list[str] = field(default_factory=list)
    num_layers: int = 0
    layer_map: tuple[LayerSource, ...] = ()
    upcycled: bool = False
    copies: list = field(default_factory=list)  # symmetry probes: [[name, axis, start, stop], ...] groups

    @property
    def seed(self) -> int:
        return self.plan.seed

    def init_std(self) -> float:
        v = self.ir.config.get("initializer_range")
        return float(v) if isinstance(v, (int, float)) and v > 0 else 0.02

    def members(self, group: str):
        """(name, TState, axis index) for every tensor axis whose layout holds ``group``."""
        out = []
        for name, ts in self.tensors.items():
            for a, ax in enumerate(ts.axes):
                if group in ax.groups():
                    out.append((name, ts, a))
        return out


class Pass:
    name = "pass"

    def __init__(self, op: ResolvedOp | None = None):
        self.op = op

    @property
    def statement(self) -> str | None:
        return self.op.text if self.op is not None else None

    def fail(self, st: LowerState, message: str) -> PassError:
        return PassError(self.name, message, before=st.done, statement=self.statement)

    def require_widen(self, st: LowerState, group: str, methods: tuple[str, ...], roles: tuple[str, ...] | None = None):
        """The preconditions every width pass shares: the op is `widen <group>` with one of
        ``methods``, the group has the size the plan expected at this point, and (with ``roles``)
        every tensor axis on the group is used in one of those roles. Returns the members."""
        op = self.op
        if op.group != group or op.method not in methods:
            raise self.fail(st, f"expects `widen {group}` with {'/'.join(methods)}, got {op.group} {op.method}")
        if st.sizes.get(group) != op.old_size:
            raise self.fail(st, f"{group} is {st.sizes.get(group)} at this point, the plan expected {op.old_size}")
        members = st.members(group)
        if roles is not None:
            if not members:
                raise self.fail(st, f"no tensor has a {group} axis")
            for name, ts, a in members:
                if ts.axes[a].role not in roles:
                    raise self.fail(st, f"{name}: axis {a} has role `{ts.axes[a].role}` on {group}; not supported")
        return members

    def requires(self, st: LowerState) -> None:
        pass

    def apply(self, st: LowerState) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def ensures(self, st: LowerState) -> None:
        check_shapes(self, st)

    def run(self, st: LowerState) -> None:
        self.requires(st)
        try:
            self.apply(st)
        except PassError:
            raise
        except (ValueError, KeyError, IndexError) as e:
            raise self.fail(st, f"{type(e).__name__}: {e}") from e
        self.ensures(st)
        st.done.append(self.name + (f"[{self.op.index}]" if self.op is not None else ""))


def check_shapes(p: Pass, st: LowerState) -> None:
    """Every tensor made from an IR template has the shape the IR predicts at the current sizes."""
    for name, ts in st.tensors.items():
        if ts.info is None or not ts.axes:
            continue
        want = predicted_shape(ts, st.sizes)
        if tuple(ts.node.shape) != want:
            raise p.fail(st, f"{name}: built shape {ts.node.shape}, predicted {want}")


def predicted_shape(ts: TState, sizes: dict[str, int]) -> tuple[int, ...]:
    tmp = TensorInfo(ts.info.name, ts.info.shape, ts.axes, ts.info.module, ts.info.module_type, ts.info.kind)
    return tensor_shape(tmp, sizes)


def note(ts: TState, text: str, exactness: str) -> None:
    ts.notes.append(text)
    ts.exactness = worst(ts.exactness, exactness)


# ------------------------------------------------------------------------------------------ state


def layer_prefix_of(ir: ModelIR) -> str | None:
    for t in ir.tensors:
        if t.layers is not None and "{i}" in t.name:
            return t.name.split("{i}")[0].rstrip(".")
    return None


def split_layer_name(name: str, prefix: str | None) -> tuple[int, str] | None:
    """'model.layers.3.mlp.up_proj.weight' -> (3, 'mlp.up_proj.weight')."""
    if prefix is None:
        return None
    m = re.match(re.escape(prefix) + r"\.(\d+)\.(.+)$", name)
    return (int(m.group(1)), m.group(2)) if m else None


def normalise_axes(ir: ModelIR, t: TensorInfo) -> tuple[Axis, ...]:
    """Make head_dim explicit: a segment [heads|kv_heads, const...] whose consts multiply to head_dim
    becomes [heads|kv_heads, head_dim] (discovery may leave head_dim as constant factors)."""
    att = ir.attention
    if att is None or "head_dim" not in ir.groups:
        return t.axes
    hd = ir.groups["head_dim"].size
    out = []
    for ax in t.axes:
        segs = []
        for seg in ax.segments:
            fs = seg.factors
            if fs and fs[0].group in ("heads", "kv_heads") and len(fs) > 1 and all(f.group == "const" for f in fs[1:]):
                prod = 1
                for f in fs[1:]:
                    prod *= f.size
                if prod == hd:
                    seg = Segment((fs[0], Factor("head_dim", hd)))
            segs.append(seg)
        out.append(Axis(tuple(segs), ax.role))
    return tuple(out)


def is_writer(ir: ModelIR, t: TensorInfo, axes: tuple[Axis, ...]) -> bool:
    """A per-layer tensor that writes the residual stream: an `out` axis on hidden (o_proj, down_proj,
    their biases, experts' down projections)."""
    if t.layers is None:
        return False
    if t.kind in ("norm_weight", "norm_bias"):
        return False
    return any(ax.role == "out" and "hidden" in ax.groups() for ax in axes)


def initial_state(ir: ModelIR, plan: ResolvedPlan, stored: set[str] | None = None) -> LowerState:
    tensors: dict[str, TState] = {}
    aliases: dict[str, str] = {}
    # tied sets: keep the stored one (the first, or the one present in the checkpoint)
    for tset in ir.tied:
        keep = tset[0]
        if stored:
            present = [n for n in tset if n in stored]
            if present:
                keep = present[0]
        for n in tset:
            if n != keep:
                aliases[n] = keep
    for t in ir.tensors:
        axes = normalise_axes(ir, t)
        writer = is_writer(ir, t, axes)
        for i, name in zip(t.layers if t.layers is not None else (None,), t.names()):
            if name in aliases:
                continue
            if t.kind == "buffer" and stored is not None and name not in stored:
                continue  # a buffer the checkpoint does not store: transformers computes it on load
            node = P.Load(name, t.shape)
            tensors[name] = TState(node, t, i, axes, name, False, [(0, s) for s in t.shape], EXACT, [], writer)
    st = LowerState(ir, plan, tensors, {k: g.size for k, g in ir.groups.items()}, layer_prefix_of(ir), aliases)
    st.num_layers = ir.num_layers
    st.layer_map = tuple(LayerSource(i) for i in range(ir.num_layers))
    return st


def alias_info(st: LowerState, alias: str) -> TensorInfo | None:
    for t in st.ir.tensors:
        if t.name == alias:
            return t
    return None


def option(op: ResolvedOp, key: str, default: Any = None) -> Any:
    return op.options.get(key, default) if op is not None else default
