"""Row-tiled evaluation of output tensors: the executor's fused path for large computed outputs.

Evaluated whole, an output such as a width-grown ``down_proj`` ([2560, 11264]: a gather and a
concatenation along the fan-in axis, fan-out shares, an exact split, zero rows appended) makes a
fresh 46-115 MB float32 intermediate per op and streams each through memory a dozen times; on a
2-core machine that, not the disk, bounded the executor (issue 11: width plans 2.1-2.7x a userspace
copy). Most ops the compiler emits act along one axis and leave the others alone, so rows
``[r0, r1)`` (axis 0) of their result need only rows of their inputs. Such an output is computed
a few hundred kilobytes of rows at a time -- every intermediate of a tile stays in the CPU's cache --
and its tiles are cast into a reusable slab of the output dtype that the write-behind thread writes
(:meth:`ShardStream.write_part`). Values are bitwise those of the whole-tensor evaluation: each
tile runs the same elementwise / per-row kernels, with the same dtype rules (:func:`cast_inputs`).

A *region* is the set of nodes evaluated tile by tile under one output root: nodes that are
tileable (below) and consumed only by nodes of the region, reached through edges that map a row
range to a row range. Every other child of a region node (a ``Load``, a ``Random`` draw, a node used
elsewhere, an input a gather needs whole) is a *boundary* value, computed whole by the executor as
before and sliced per tile.

Tileable ops (rows of the result from rows of the inputs): ``Concat`` (any axis; along axis 0 a tile
takes rows of the inputs it overlaps), ``Index`` (along axis 0 it gathers rows of its input, which
is then a boundary value), ``Slice``, ``MulAxis``, ``Scale``, ``Neg``, ``Cast``, ``Add``/``Mul`` of
same-shaped inputs, ``Tile`` and ``ExactSplit`` along an axis other than 0, ``Zeros``, ``Full``, and
``Random`` where its rows can be drawn in order from one generator with the values of the whole draw
(:attr:`Random.draws_by_rows`) and one chain of single consumers leads from it to the root (so its rows
are asked for in increasing order): a LEMON residue then never exists whole, its draws go tile by tile
into the slab.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from scaler_wizard.compiler.program import (
    Add,
    Cast,
    Concat,
    ExactSplit,
    Full,
    Index,
    Mul,
    MulAxis,
    Neg,
    Node,
    Permute,
    Random,
    Reshape,
    Scale,
    Slice,
    Tile,
    Zeros,
)

MOVES = (Slice, Index, Tile, Concat, Reshape, Permute)  # ops that only move values

TILE_BYTES = 1 << 20  # float32 bytes of output rows per tile (measured: 0.5-2 MiB alike, 8 MiB slower)
# output bytes handed to the write-behind thread at once: small enough that write() copies them into
# the page cache while they are still in the CPU's cache (width benchmark, instrumented, alternating:
# the writer thread's CPU 3.7-4.9 s with 2-4 MiB slabs against 7.2-8.0 s with 32 MiB ones; 1 MiB: 5.4-6.8 s)
SLAB_BYTES = 4 << 20
SLABS = 32  # slabs in the ring per output dtype (SLABS - 1 may be queued for writing): 128 MiB
MIN_TILED_BYTES = 4 << 20  # outputs smaller than this (in float32) are evaluated whole


def cast_inputs(n: Node, ins: list, final) -> list:
    """The inputs of ``n`` as its computation takes them. Arithmetic runs in float32. Ops that only
    move values (slice, gather, tile, concat, reshape, permute) keep the input dtype (the values an
    fp32 round trip would give, at half the bytes); mixed float inputs are brought to float32 -- unless
    ``final`` (a torch dtype) is given: the op is an output's root that feeds nothing else, and each
    input is cast to the output dtype first, which rounds every element exactly as casting the
    result would."""
    import torch

    if final is not None and final.is_floating_point:
        return [v.to(final) if v.is_floating_point() and v.dtype != final else v for v in ins]
    if not isinstance(n, MOVES) or len({v.dtype for v in ins if v.is_floating_point()}) > 1:
        return [v.float() if v.is_floating_point() and v.dtype != torch.float32 else v for v in ins]
    return ins


def tileable(n: Node) -> bool:
    """Whether rows ``[r0, r1)`` of ``n`` can be computed from row ranges (or whole values) of its inputs."""
    s = n.shape
    if not s:
        return False
    a = getattr(n, "axis", 0) % len(s)
    if isinstance(n, (Concat, Index, Slice, MulAxis, Scale, Neg, Cast, Zeros, Full)):
        return True
    if isinstance(n, (ExactSplit, Tile)):
        return a != 0
    if isinstance(n, (Add, Mul)):
        return all(c.shape == s for c in n.children())
    if isinstance(n, Random):
        return n.draws_by_rows
    return False


def child_rows(n: Node, r0: int, r1: int) -> list:
    """For rows ``[r0, r1)`` of ``n``, per child (in ``n.children()`` order): a row range ``(a, b)``,
    ``None`` (the whole child is needed) or ``()`` (not needed for these rows: Concat along axis 0)."""
    kids = n.children()
    a = getattr(n, "axis", 0) % len(n.shape)
    if isinstance(n, Concat) and a == 0:
        out, off = [], 0
        for c in kids:
            lo, hi = max(r0, off), min(r1, off + c.shape[0])
            out.append((lo - off, hi - off) if lo < hi else ())
            off += c.shape[0]
        return out
    if isinstance(n, Index) and a == 0:
        return [None]
    if isinstance(n, Slice) and a == 0:
        return [(n.start + r0 * n.step, n.start + (r1 - 1) * n.step + 1)]
    return [(r0, r1)] * len(kids)


def compute_rows(n: Node, ins: list, r0: int, r1: int, ctx):
    """Rows ``[r0, r1)`` of ``n`` from its inputs as :func:`child_rows` asked for them (``()`` entries
    left out), prepared by :func:`cast_inputs`."""
    import torch

    a = n.axis % len(n.shape) if hasattr(n, "axis") else None
    if isinstance(n, Zeros):
        return torch.zeros((r1 - r0,) + n.shape[1:], dtype=torch.float32)
    if isinstance(n, Full):
        return torch.full((r1 - r0,) + n.shape[1:], float(n.value), dtype=torch.float32)
    if a == 0:
        if isinstance(n, Concat):
            return ins[0] if len(ins) == 1 else torch.cat(ins, dim=0)
        if isinstance(n, Index):
            return torch.index_select(ins[0], 0, n.index_tensor[r0:r1])
        if isinstance(n, Slice):
            return ins[0][::n.step]
        if isinstance(n, MulAxis):
            x = ins[0]
            shp = [1] * x.dim()
            shp[0] = r1 - r0
            return x * n.vec_tensor(x.dtype)[r0:r1].reshape(shp)
    return n.compute(ins, ctx)


@dataclass
class Region:
    """The nodes evaluated tile by tile under ``root`` and the boundary edges into whole values."""

    root: Node
    nodes: dict[str, Node]  # digest -> node (root included)
    boundary: list[Node] = field(default_factory=list)  # children outside, once per edge (for use counts)

    @property
    def row_numel(self) -> int:
        n = 1
        for d in self.root.shape[1:]:
            n *= d
        return n


def plan_region(root: Node, uses: dict[str, int], outputs=frozenset(),
                min_bytes: int | None = None) -> Region | None:
    """The region of ``root`` (an output's root that nothing else in its shard consumes), or None where
    the output is better evaluated whole (not tileable, small, or rows too long for a slab).
    ``uses``: digest -> number of consumer edges in the shard (the executor's count); ``outputs``:
    digests of the shard's output roots (written whole, so never inside another output's region);
    ``min_bytes``: the smallest float32 size tiled (default :data:`MIN_TILED_BYTES`)."""
    if min_bytes is None:
        min_bytes = MIN_TILED_BYTES
    if not tileable(root) or root.numel * 4 < min_bytes or len(root.shape) < 1 or root.shape[0] < 2:
        return None
    if (root.numel // root.shape[0]) * 4 > SLAB_BYTES // 2:
        return None
    nodes = {root.digest: root}
    stack = [root]
    while stack:
        n = stack.pop()
        rows = child_rows(n, 0, n.shape[0])
        for c, r in zip(n.children(), rows):
            if r is not None and c.digest not in nodes and c.digest not in outputs and tileable(c):
                nodes[c.digest] = c
                stack.append(c)
    # a node stays in the region only when every consumer of it is a region node taking row ranges
    changed = True
    while changed:
        changed = False
        edges: dict[str, int] = {}
        for n in nodes.values():
            for c, r in zip(n.children(), child_rows(n, 0, n.shape[0])):
                if r is not None:
                    edges[c.digest] = edges.get(c.digest, 0) + 1
        for d in [d for d in nodes if d != root.digest and uses.get(d, 0) != edges.get(d, 0)]:
            del nodes[d]
            changed = True
    # A random draw advances its generator, so its rows must be asked for in increasing order: it
    # stays only where one chain of single consumers leads from it to the root (every op maps a tile's
    # rows to rows of its inputs monotonically; skipped rows are drawn and dropped). A node consumed
    # twice (Concat((x, x))) could ask for rows it has passed.
    chain = {root.digest}
    stack = [root]
    while stack:
        n = stack.pop()
        for c, r in zip(n.children(), child_rows(n, 0, n.shape[0])):
            if r is not None and c.digest in nodes and c.digest not in chain and uses.get(c.digest) == 1:
                chain.add(c.digest)
                stack.append(c)
    for d in [d for d, n in nodes.items() if isinstance(n, Random) and d not in chain]:
        del nodes[d]  # a leaf: no other node's membership depends on it
    boundary = [c for n in nodes.values() for c in n.children() if c.digest not in nodes]
    return Region(root, nodes, boundary)


def tile_rows(region: Region) -> int:
    """Rows of the root per tile (about :data:`TILE_BYTES` of float32)."""
    return max(1, min(region.root.shape[0], TILE_BYTES // max(1, region.row_numel * 4)))


class TileEvaluator:
    """Evaluates tiles of one region. ``values``: digest -> whole value of every boundary child;
    ``final``: the output's torch dtype when the root only moves values (see :func:`cast_inputs`),
    else None; ``storage``: digest -> storage dtype (torch) of the nodes that round to it (ExactSplit)."""

    def __init__(self, region: Region, values: dict[str, Any], ctx, final, storage: dict):
        self.region, self.values, self.ctx, self.final, self.storage = region, values, ctx, final, storage
        self.memo: dict[tuple[str, int, int], Any] = {}
        self.draws: dict[str, list] = {}  # Random digest -> [row stream, next row]

    def rows(self, n: Node, a: int, b: int):
        """Rows ``[a, b)`` of region node ``n`` as a new tensor (dtype as whole evaluation gives it)."""
        key = (n.digest, a, b)
        got = self.memo.get(key)
        if got is not None:
            return got
        if isinstance(n, Random):
            st = self.draws.get(n.digest)
            if st is None:
                st = self.draws[n.digest] = [n.row_stream(self.ctx), 0]
            if a < st[1]:
                raise RuntimeError(f"tiles: rows [{a}, {b}) of {n!r} asked after row {st[1]} (executor bug)")
            step = max(1, (1 << 20) // max(1, n.numel // n.shape[0]))
            while st[1] < a:  # rows a consumer skips (a slice) are drawn and dropped
                k = min(step, a - st[1])
                st[0](k)
                st[1] += k
            st[1] = b
            self.memo[key] = out = st[0](b - a)
            return out
        ins = []
        for c, r in zip(n.children(), child_rows(n, a, b)):
            if r == ():
                continue
            ins.append(self._child(c, r))
        ins = cast_inputs(n, ins, self.final if n is self.region.root else None)
        self.ctx.storage_dtype = self.storage.get(n.digest)
        out = compute_rows(n, ins, a, b, self.ctx)
        self.memo[key] = out
        return out

    def _child(self, c: Node, r):
        if c.digest in self.region.nodes:
            return self.rows(c, r[0], r[1])
        v = self.values[c.digest]
        return v if r is None else v.narrow(0, r[0], r[1] - r[0])

    def fill(self, n: Node, a: int, b: int, out) -> None:
        """Write rows ``[a, b)`` of ``n`` into ``out`` (a view of the output's dtype, shape
        ``(b - a,) + n.shape[1:]``), cast as the output's root casts them. A Concat writes its inputs
        straight into the parts of ``out`` they make up (no joined copy, no separate cast); Zeros and
        Full fill in place; anything else is computed and copied. Used from the root of an output that
        only moves values (``final`` set), where every input is cast to the output dtype: the values
        are those of the whole evaluation (a float input reaches the output dtype by one rounding,
        through a concat or not)."""
        if n.digest in self.region.nodes and isinstance(n, Concat):
            ax = n.axis % len(n.shape)
            off = 0
            for c, r in zip(n.children(), child_rows(n, a, b)):
                size = c.shape[ax]
                if r != ():  # a row range (a Concat never needs a whole input)
                    part = out.narrow(ax, off, size) if ax else out.narrow(0, off, r[1] - r[0])
                    self.fill(c, r[0], r[1], part)
                off += size if ax else (0 if r == () else r[1] - r[0])
            return
        if n.digest in self.region.nodes and isinstance(n, Zeros):
            out.zero_()
            return
        out.copy_(self._child(n, (a, b)))

    def clear(self) -> None:
        self.memo.clear()


def evaluate_rows(region: Region, r0: int, r1: int, values: dict[str, Any], ctx, final, storage) -> Any:
    """Rows ``[r0, r1)`` of the region's root (see :class:`TileEvaluator` for the arguments)."""
    ev = TileEvaluator(region, values, ctx, final, storage)
    try:
        return ev.rows(region.root, r0, r1)
    finally:
        ev.clear()
