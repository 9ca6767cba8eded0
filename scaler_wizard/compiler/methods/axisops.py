"""Tensor-program building blocks for growth: grow one factor of a laid-out axis by a unit map.

An axis layout is a concatenation of segments, each a row-major product of factors (see
:mod:`scaler_wizard.ir.model_ir`). To grow group ``g`` on an axis, every segment holding ``g`` is
sliced out, reshaped so that ``g`` is its own axis, grown, reshaped back, and the segments are
re-fused in their own layout (GPT-2 ``c_attn`` [q|k|v], NeoX per-head [heads, 3, head_dim], ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

from scaler_wizard.compiler import program as P
from scaler_wizard.compiler.methods.unitmap import UnitMap
from scaler_wizard.ir.model_ir import Axis


@dataclass(frozen=True, eq=False, repr=False)
class MeanAxis(P.Node):
    """Mean over ``axis`` keeping it as size 1 (LEMON's average residue for LayerNorm models).

    Registered into ``program.OPS`` on import so programs using it round-trip through JSON."""

    x: P.Node
    axis: int
    op: ClassVar[str] = "mean_axis"
    children_fields: ClassVar[tuple[str, ...]] = ("x",)

    def _infer(self):
        s = self.x.shape
        a = P._axis("MeanAxis", s, self.axis)
        return s[:a] + (1,) + s[a + 1:]

    def compute(self, inputs, ctx):
        (x,) = inputs
        return x.mean(dim=self.axis % x.dim(), keepdim=True)


P.OPS.setdefault(MeanAxis.op, MeanAxis)


def factor_size(f, sizes: dict[str, int]) -> int:
    return f.size if f.group == "const" else sizes.get(f.group, f.size)


def map_group_on_axis(node: P.Node, axis: int, layout: Axis, group: str, sizes: dict[str, int],
                      fn: Callable[[P.Node, int], P.Node]) -> P.Node:
    """Apply ``fn(piece, sub_axis)`` to the ``group`` factor of every segment of ``axis`` holding it.

    ``sizes``: current group sizes (before this growth). ``fn`` returns the piece with the factor
    resized; everything else is re-assembled around it."""
    shape = node.shape
    seg_sizes = [math.prod(factor_size(f, sizes) for f in seg.factors) for seg in layout.segments]
    if sum(seg_sizes) != shape[axis]:
        raise ValueError(f"axis {axis} of shape {shape} is {shape[axis]}, but its layout sums to {sum(seg_sizes)}")
    pieces = []
    start = 0
    for seg, n in zip(layout.segments, seg_sizes):
        piece = P.Slice(node, axis, start, start + n) if len(layout.segments) > 1 else node
        start += n
        groups = [f.group for f in seg.factors]
        if group not in groups:
            pieces.append(piece)
            continue
        fs = tuple(factor_size(f, sizes) for f in seg.factors)
        gi = groups.index(group)
        ps = piece.shape
        if len(fs) > 1:
            piece = P.Reshape(piece, ps[:axis] + fs + ps[axis + 1:])
        piece = fn(piece, axis + gi)
        if len(fs) > 1:
            qs = piece.shape
            piece = P.Reshape(piece, qs[:axis] + (math.prod(qs[axis:axis + len(fs)]),) + qs[axis + len(fs):])
        pieces.append(piece)
    return P.Concat(tuple(pieces), axis) if len(pieces) > 1 else pieces[0]


def grow_units(x: P.Node, ax: int, m: UnitMap, *, coef=None, fresh: Callable[[tuple[int, ...]], P.Node] | None = None,
               noise: float = 0.0, noise_key: str | None = None, exact_sum: bool = False) -> P.Node:
    """New units along ``ax`` per ``m``: copies of old units times ``coef[j]`` (default 1) and fresh
    units from ``fresh(shape_of_fresh_block)`` (default zeros). ``noise`` > 0 adds zero-sum noise
    across the copies of each old unit (exact in the forward pass for fan-out weights).

    ``exact_sum``: the copies of a unit are fan-out shares whose sum is what the readers need (the
    original weight when the shares sum to 1); the result is wrapped in :class:`P.ExactSplit` so that
    the sum stays exact when the output is stored in bfloat16 / float16."""
    if x.shape[ax] != m.old:
        raise ValueError(f"unit map for {m.old} units applied to an axis of size {x.shape[ax]}")
    n_fresh = len(m.fresh)
    fresh_block = None
    if n_fresh:
        fshape = x.shape[:ax] + (n_fresh,) + x.shape[ax + 1:]
        fresh_block = fresh(fshape) if fresh is not None else P.Zeros(fshape)
    k = m.tile_reps()
    if k is not None and (not n_fresh or all(s < 0 for s in m.src[k * m.old:])):
        y = P.Tile(x, ax, k) if k > 1 else x
        if fresh_block is not None:
            y = P.Concat((y, fresh_block), ax)
    elif m.src[: m.old] == tuple(range(m.old)) and all(s >= 0 for s in m.src[m.old:]) and not n_fresh:
        extra = P.Index(x, ax, tuple(m.src[m.old:]))
        y = P.Concat((x, extra), ax)
    elif m.src[: m.old] == tuple(range(m.old)) and all(s < 0 for s in m.src[m.old:]):
        y = P.Concat((x, fresh_block), ax)
    else:
        base = P.Concat((x, fresh_block), ax) if fresh_block is not None else x
        idx, r = [], 0
        for s in m.src:
            if s >= 0:
                idx.append(s)
            else:
                idx.append(m.old + r)
                r += 1
        y = P.Index(base, ax, tuple(idx))
    if coef is not None:
        vec = tuple(float(c) for c in coef)
        if any(abs(c - 1.0) > 0 for c in vec):
            y = P.MulAxis(y, ax, vec)
    noisy = False
    if noise and noise > 0:
        groups = tuple(g for g in m.copy_groups() if len(g) > 1)
        if groups:
            y = P.Add(y, P.ZeroSumNoise(y.shape, ax, groups, float(noise), noise_key or "noise"))
            noisy = True
    if exact_sum and (noisy or isinstance(y, P.MulAxis)):
        vec = tuple(float(c) for c in coef) if coef is not None else (1.0,) * m.new
        by_unit: list[list[int]] = [[] for _ in range(m.old)]
        for j, s in enumerate(m.src):
            if s >= 0:
                by_unit[s].append(j)
        if any(len(g) > 1 for g in by_unit):
            sums = tuple(sum(vec[j] for j in g) for g in by_unit)
            y = P.ExactSplit(y, x, ax, tuple(tuple(g) for g in by_unit), sums)
    return y


def fan_out_coef(m: UnitMap) -> tuple[float, ...]:
    """Readers' multipliers: each copy's share; fresh units 1 (their fill decides)."""
    return tuple(m.split[j] if s >= 0 else 1.0 for j, s in enumerate(m.src))


def random_fill(key: str, std: float) -> Callable[[tuple[int, ...]], P.Node]:
    return lambda shape: P.Random(shape, key, std=std)


def mean_fill(x: P.Node, ax: int) -> Callable[[tuple[int, ...]], P.Node]:
    """Fresh units = mean over the old units along ``ax`` (repeated)."""

    def make(shape):
        mean = MeanAxis(x, ax)
        return P.Tile(mean, ax, shape[ax]) if shape[ax] > 1 else mean

    return make
