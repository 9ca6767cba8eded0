"""TensorProgram: what a lowered growth plan *is* -- a DAG of small frozen tensor ops per output tensor.

A program maps every output tensor name to a node of a DAG whose leaves are :class:`Load` (a tensor of
the input checkpoint) or generators (:class:`Zeros`, :class:`Full`, :class:`Random`,
:class:`ZeroSumNoise`).  The executor (``scaler_wizard.runtime.execute``) walks it shard by shard.

Design points
-------------
* Nodes are frozen value objects, **hash-consed by content**: two separately built ``Tile(Load(w), 0, 2)``
  are equal, hash equal and share one digest, so the executor computes them once.
* Shape inference happens at construction: a bad op raises ``ValueError`` naming the op
  (``Slice: stop 9 > size 8 of axis 0 of shape (8, 4)``).
* Values are computed in float32 (integer/bool inputs stay as they are); the executor casts the
  result back to the output dtype.
* Random values are a pure function of ``(program seed, node key, shape)``: the generator is seeded
  from ``sha256(f"{seed}:{key}")``; order of execution never changes a byte.
* JSON (``to_json``/``from_json``) is stable and diffable: nodes are listed once, topologically sorted
  (depth-first from the outputs in output order), with small integer ids, one node per line.

No torch import at module level except what evaluation needs (torch is imported lazily), so the
compiler front half can build programs cheaply.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Sequence

PROGRAM_FORMAT = "scaler-wizard/tensor-program"
PROGRAM_VERSION = 1

EXACTNESS = ("exact", "exact-eps", "approx")
STATUSES = ("original", "grown", "new")

# torch dtype names accepted by Cast / Load.dtype
DTYPE_NAMES = (
    "float32", "float16", "bfloat16", "float64",
    "float8_e4m3fn", "float8_e5m2",
    "int64", "int32", "int16", "int8", "uint8", "bool",
)
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64", "float8_e4m3fn", "float8_e5m2")


def torch_dtype(name: str):
    import torch

    if name not in DTYPE_NAMES:
        raise ValueError(f"unsupported dtype {name!r}; expected one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)


def dtype_name(dt) -> str:
    """'bfloat16' for torch.bfloat16 (or for the string 'bfloat16' / 'torch.bfloat16')."""
    s = str(dt)
    if s.startswith("torch."):
        s = s[len("torch."):]
    if s not in DTYPE_NAMES:
        raise ValueError(f"unsupported dtype {dt!r}")
    return s


def _freeze(v):
    if isinstance(v, list) or isinstance(v, tuple):
        return tuple(_freeze(x) for x in v)
    return v


def _thaw(v):
    if isinstance(v, tuple):
        return [_thaw(x) for x in v]
    return v


def _axis(op: str, shape: tuple[int, ...], axis: int) -> int:
    n = len(shape)
    if not isinstance(axis, int) or not -n <= axis < n:
        raise ValueError(f"{op}: axis {axis} out of range for shape {shape}")
    return axis % n


def _check_shape(op: str, shape) -> tuple[int, ...]:
    shape = tuple(shape)
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ValueError(f"{op}: shape must be a tuple of non-negative ints, got {shape}")
    return shape


# ----------------------------------------------------------------------------------------------- nodes


@dataclass(frozen=True, eq=False, repr=False)
class Node:
    """Base class of all ops. Subclasses declare their fields; ``shape`` is inferred."""

    op: ClassVar[str] = "node"
    # names of fields holding child nodes (a Node) or tuples of child nodes (Concat.xs)
    children_fields: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if f.init:
                object.__setattr__(self, f.name, _freeze(getattr(self, f.name)))
        shape = self._infer()
        object.__setattr__(self, "_shape", tuple(shape))
        payload = json.dumps(
            [self.op, self.params(), [c.digest for c in self.children()], list(self._shape)],
            sort_keys=True, separators=(",", ":"),
        )
        object.__setattr__(self, "_digest", hashlib.sha256(payload.encode()).hexdigest()[:24])

    # -- structure
    def _infer(self) -> tuple[int, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape  # type: ignore[attr-defined]

    @property
    def digest(self) -> str:
        return self._digest  # type: ignore[attr-defined]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def children(self) -> tuple["Node", ...]:
        out: list[Node] = []
        for name in self.children_fields:
            v = getattr(self, name)
            if isinstance(v, Node):
                out.append(v)
            else:
                out.extend(v)
        return tuple(out)

    def params(self) -> dict[str, Any]:
        """Non-child init fields, JSON-ready."""
        return {
            f.name: _thaw(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.init and f.name not in self.children_fields
        }

    def __eq__(self, other):
        return isinstance(other, Node) and self.digest == other.digest

    def __hash__(self):
        return hash(self._digest)  # type: ignore[attr-defined]

    def __repr__(self):
        ps = ", ".join(f"{k}={v!r}" for k, v in self.params().items() if k != "indices" or len(v) < 8)
        return f"{type(self).__name__}({ps}{', ' if ps else ''}shape={self.shape})"

    # -- evaluation (inputs already evaluated, float32 unless integer)
    def compute(self, inputs: list, ctx: "EvalContext"):  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True, eq=False, repr=False)
class Load(Node):
    """A tensor of the input checkpoint. ``shape`` must match the checkpoint's header."""

    name: str
    shape_: tuple[int, ...]
    dtype: str | None = None
    op: ClassVar[str] = "load"

    def __init__(self, name: str, shape: Sequence[int], dtype: str | None = None):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "shape_", tuple(shape))
        object.__setattr__(self, "dtype", None if dtype is None else dtype_name(dtype))
        self.__post_init__()

    def params(self):
        return {"name": self.name, "shape": list(self.shape_), "dtype": self.dtype}

    def _infer(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("Load: name must be a non-empty string")
        return _check_shape(f"Load({self.name})", self.shape_)

    def compute(self, inputs, ctx):
        return ctx.load(self.name, self.shape)


@dataclass(frozen=True, eq=False, repr=False)
class Slice(Node):
    x: Node
    axis: int
    start: int
    stop: int
    step: int = 1
    op: ClassVar[str] = "slice"
    children_fields: ClassVar[tuple[str, ...]] = ("x",)

    def _infer(self):
        s = self.x.shape
        a = _axis("Slice", s, self.axis)
        if self.step < 1:
            raise ValueError(f"Slice: step must be >= 1, got {self.step}")
        if not (0 <= self.start <= self.stop <= s[a]):
            raise ValueError(
                f"Slice: [{self.start}:{self.stop}] is not within size {s[a]} of axis {a} of shape {s}"
            )
        n = len(range(self.start, self.stop, self.step))
        return s[:a] + (n,) + s[a + 1:]

    def compute(self, inputs, ctx):
        (x,) = inputs
        a = self.axis % x.dim()
        idx = [slice(None)] * x.dim()
        idx[a] = slice(self.start, self.stop, self.step)
        return x[tuple(idx)]


@dataclass(frozen=True, eq=False, repr=False)
class Index(Node):
    """Gather along an axis: ``out[..., j, ...] = x[..., indices[j], ...]`` (repeats allowed)."""

    x: Node
    axis: int
    indices: tuple[int, ...]
    op: ClassVar[str] = "index"
    children_fields: ClassVar[tuple[str, ...]] = ("x",)

    def _infer(self):
        s = self.x.shape
        a = _axis("Index", s, self.axis)
        bad = [i for i in self.indices if not isinstance(i, int) or not 0 <= i < s[a]]
        if bad:
            raise ValueError(f"Index: indices {bad[:5]} out of range [0, {s[a]}) on axis {a} of shape {s}")
        return s[:a] + (len(self.indices),) + s[a + 1:]

    @functools.cached_property
    def index_tensor(self):
        """``indices`` as a LongTensor (made once: the executor gathers a row block at a time)."""
        import torch

        return torch.tensor(self.indices, dtype=torch.long)

    def compute(self, inputs, ctx):
        import torch

        (x,) = inputs
        return _gather(x, self.axis % x.dim(), self.index_tensor)


Gather = Index


@dataclass(frozen=True, eq=False, repr=False)
class Tile(Node):
    """Repeat the whole tensor ``reps`` times along ``axis``: new index j copies old index j mod d."""

    x: Node
    axis: int
    reps: int
    op: ClassVar[str] = "tile"
    children_fields: ClassVar[tuple[str, ...]] = ("x",)

    def _infer(self):
        s = self.x.shape
        a = _axis("Tile", s, self.axis)
        if not isinstance(self.reps, int) or self.reps < 1:
            raise ValueError(f"Tile: reps must be an int >= 1, got {self.reps!r}")
        return s[:a] + (s[a] * self.reps,) + s[a + 1:]

    def compute(self, inputs, ctx):
        (x,) = inputs
        reps = [1] * x.dim()
        reps[self.axis % x.dim()] = self.reps
        return x.repeat(*reps)


@dataclass(frozen=True, eq=False, repr=False)
class Scale(Node):
    x: Node
    factor: float
    op: ClassVar[str] = "scale"
    children_fields: ClassVar[tuple[str, ...]] = ("x",)

    def _infer(self):
        if not isinstance(self.factor, (int, float)) or not math.isfinite(self.factor):
            raise ValueError(f"Scale: factor must be a finite number, got {self.factor!r}")
        return self.x.shape

    def compute(self, inputs, ctx):
        return inputs[0] * float(self.factor)


@dataclass(frozen=True, eq=False, repr=False)
class MulAxis(Node):
    """Multiply by a constant vector broadcast along ``axis`` (``len(vec) == shape[axis]``)."""

    x: Node
    axis: int
    vec: tuple[float, ...]
    op: ClassVar[str] = "mul_axis"
    children_fields: ClassVar[tuple[str, ...]] = ("x",)

    def _infer(self):
        s = self.x.shape
        a = _axis("MulAxis", s, self.axis)
        if len(self.vec) != s[a]:
            raise ValueError(f"MulAxis: vector of length {len(self.vec)} does not match size {s[a]} of axis {a} of shape {s}")
        return s

    def compute(self, inputs, ctx):
        import torch

        (x,) = inputs
        a = self.axis % x.dim()
        shp = [1] * x.dim()
        shp[a] = x.shape[a]
        return x * self.vec_tensor(x.dtype).reshape(shp)

    def vec_tensor(self, dtype):
        """``vec`` as a tensor of ``dtype`` (the float32 one made once: the executor multiplies a row
        block at a time)."""
        import torch

        if dtype != torch.float32:
            return torch.tensor(self.vec, dtype=dtype)
        t = self.__dict__.get("_vec32")
        if t is None:
            t = self.__dict__["_vec32"] = torch.tensor(self.vec, dtype=torch.float32)
        return t


def _broadcast(op: str, a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        x = a[-i] if i <= len(a) else 1
        y = b[-i] if i <= len(b) else 1
        if x != y and x != 1 and y != 1:
            raise ValueError(f"{op}: shapes {a} and {b} do not broadcast")
        out.append(max(x, y) if x != 0 and y != 0 else 0)
    return tuple(reversed(out))


@dataclass(frozen=True, eq=False, repr=False)
class Mul(Node):
    """Elementwise product with numpy broadcasting."""

    x: Node
    y: Node
    op: ClassVar[str] = "mul"
    children_fields: ClassVar[tuple[str, ...]] = ("x", "y")

    def _infer(self):
        return _broadcast("Mul", self.x.shape, self.y.shape)

    def compute(self, inputs, ctx):
        return inputs[0] * inputs[1]


@dataclass(frozen=True, eq=False, repr=False)
class Add(Node):
    """Elementwise sum with numpy broadcasting."""

    x: Node
    y: Node
    op: ClassVar[str] = "add"
    children_fields: ClassVar[tuple[str, ...]] = ("x", "y")

    def _infer(self):
        return _broadcast("Add", self.x.shape, self.y.shape)

    def compute(self, inputs, ctx):
        return inputs[0] + inputs[1]


@dataclass(frozen=True, eq=False, repr=False)
class Neg(Node):
    x: Node
    op: ClassVar[str] = "neg"
    children_fields: ClassVar[tuple[str, ...]] = ("x",)

    def _infer(self):
        return self.x.shape

    def compute(self, inputs, ctx):
        return -inputs[0]


@dataclass(frozen=True, eq=False, repr=False)
class Concat(Node):
    xs: tuple[Node, ...]
    axis: int
    op: ClassVar[str] = "concat"
    children_fields: ClassVar[tuple[str, ...]] = ("xs",)

    def _infer(self):
        if not self.xs:
            raise ValueError("Concat: needs at least one input")
        s0 = self.xs[0].shape
        a = _axis("Concat", s0, self.axis)
        total = 0
        for k, x in enumerate(self.xs):
            s = x.shape
            if len(s) != len(s0) or s[:a] != s0[:a] or s[a + 1:] != s0[a + 1:]:
                raise ValueError(f"Concat: input {k} has shape {s}, incompatible with {s0} along axis {a}")
            total += s[a]
        return s0[:a] + (total,) + s0[a + 1:]

    def compute(self, inputs, ctx):
        import torch

        return torch.cat(inputs, dim=self.axis % inputs[0].dim())


@dataclass(frozen=True, eq=False, repr=False)
class Reshape(Node):
    x: Node
    shape_: tuple[int, ...]
    op: ClassVar[str] = "reshape"
    children_fields: ClassVar[tuple[str, ...]] = ("x",)

    def __init__(self, x: Node, shape: Sequence[int]):
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "shape_", tuple(shape))
        self.__post_init__()

    def params(self):
        return {"shape": list(self.shape_)}

    def _infer(self):
        s = _check_shape("Reshape", self.shape_)
        if math.prod(s) != self.x.numel:
            raise ValueError(f"Reshape: cannot reshape {self.x.shape} ({self.x.numel} elements) to {s}")
        return s

    def compute(self, inputs, ctx):
        return inputs[0].reshape(self.shape_)


@dataclass(frozen=True, eq=False, repr=False)
class Permute(Node):
    x: Node
    dims: tuple[int, ...]
    op: ClassVar[str] = "permute"
    children_fields: ClassVar[tuple[str, ...]] = ("x",)

    def _infer(self):
        s = self.x.shape
        if sorted(self.dims) != list(range(len(s))):
            raise ValueError(f"Permute: dims {self.dims} is not a permutation of the {len(s)} axes of {s}")
        return tuple(s[d] for d in self.dims)

    def compute(self, inputs, ctx):
        return inputs[0].permute(*self.dims).contiguous()


@dataclass(frozen=True, eq=False, repr=False)
class Cast(Node):
    """Fix the output dtype of a value (computation itself stays float32)."""

    x: Node
    dtype: str
    op: ClassVar[str] = "cast"
    children_fields: ClassVar[tuple[str, ...]] = ("x",)

    def _infer(self):
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"Cast: unsupported dtype {self.dtype!r}")
        return self.x.shape

    def compute(self, inputs, ctx):
        # round-trip through the target dtype so the value is what will be stored
        t = inputs[0].to(torch_dtype(self.dtype))
        return t.float() if t.is_floating_point() else t


@dataclass(frozen=True, eq=False, repr=False)
class Zeros(Node):
    shape_: tuple[int, ...]
    op: ClassVar[str] = "zeros"

    def __init__(self, shape: Sequence[int]):
        object.__setattr__(self, "shape_", tuple(shape))
        self.__post_init__()

    def params(self):
        return {"shape": list(self.shape_)}

    def _infer(self):
        return _check_shape("Zeros", self.shape_)

    def compute(self, inputs, ctx):
        import torch

        return torch.zeros(self.shape_, dtype=torch.float32)


@dataclass(frozen=True, eq=False, repr=False)
class Full(Node):
    shape_: tuple[int, ...]
    value: float
    op: ClassVar[str] = "full"

    def __init__(self, shape: Sequence[int], value: float):
        object.__setattr__(self, "shape_", tuple(shape))
        object.__setattr__(self, "value", value)
        self.__post_init__()

    def params(self):
        return {"shape": list(self.shape_), "value": self.value}

    def _infer(self):
        if not isinstance(self.value, (int, float)) or not math.isfinite(self.value):
            raise ValueError(f"Full: value must be a finite number, got {self.value!r}")
        return _check_shape("Full", self.shape_)

    def compute(self, inputs, ctx):
        import torch

        return torch.full(self.shape_, float(self.value), dtype=torch.float32)


def seed_for(seed: int, key: str) -> int:
    """Stable 63-bit seed from (plan seed, node key): independent of execution order and process."""
    h = hashlib.sha256(f"{int(seed)}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _generator(seed: int):
    import torch

    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def _draw_from(g, shape, dist: str, std: float, mean: float):
    """The next ``shape`` values of generator ``g`` (float32)."""
    import torch

    # in place: the same operations in the same order as t * std + mean (bitwise equal), no temporaries
    if dist == "normal":
        t = torch.randn(shape, generator=g, dtype=torch.float32)
    else:  # uniform with the requested standard deviation: U(-a, a), a = std*sqrt(3)
        t = torch.rand(shape, generator=g, dtype=torch.float32).mul_(2).sub_(1).mul_(math.sqrt(3.0))
    return t.mul_(float(std)).add_(float(mean))


def _draw(shape, dist: str, std: float, mean: float, seed: int):
    return _draw_from(_generator(seed), shape, dist, std, mean)


_ROW_DRAWS: list = []  # [bool] once measured: see Random.draws_by_rows


def _rows_draw_like_whole() -> bool:
    """Whether drawing a tensor a block of rows at a time from one generator gives the values of one
    draw of the whole tensor, for blocks of a multiple of 16 values (torch's CPU normal kernel fills
    16 values at a time from 16 uniforms; its uniform kernel draws value by value). Measured once per
    process on small tensors of both distributions, so a torch whose kernels differ turns row-wise
    draws off instead of changing values."""
    if not _ROW_DRAWS:
        import torch

        ok = True
        for dist in ("normal", "uniform"):
            whole = _draw((40, 48), dist, 0.02, 0.0, 12345)
            g = _generator(12345)
            parts = [_draw_from(g, (k, 48), dist, 0.02, 0.0) for k in (1, 7, 16, 16)]
            ok = ok and torch.equal(whole, torch.cat(parts))
        _ROW_DRAWS.append(ok)
    return _ROW_DRAWS[0]


@dataclass(frozen=True, eq=False, repr=False)
class Random(Node):
    """Seeded random tensor. ``dist`` 'normal' (mean, std) or 'uniform' (mean, std: U(mean-a, mean+a), a=std*sqrt 3).

    Values depend only on (program seed, key, shape): give every random tensor its own key
    (conventionally the output tensor name plus a purpose)."""

    shape_: tuple[int, ...]
    key: str
    std: float = 0.02
    dist: str = "normal"
    mean: float = 0.0
    op: ClassVar[str] = "random"

    def __init__(self, shape: Sequence[int], key: str, std: float = 0.02, dist: str = "normal", mean: float = 0.0):
        object.__setattr__(self, "shape_", tuple(shape))
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "dist", dist)
        object.__setattr__(self, "mean", mean)
        self.__post_init__()

    def params(self):
        return {"shape": list(self.shape_), "key": self.key, "std": self.std, "dist": self.dist, "mean": self.mean}

    def _infer(self):
        if self.dist not in ("normal", "uniform"):
            raise ValueError(f"Random: dist must be 'normal' or 'uniform', got {self.dist!r}")
        if not isinstance(self.key, str) or not self.key:
            raise ValueError("Random: key must be a non-empty string")
        if not isinstance(self.std, (int, float)) or self.std < 0 or not math.isfinite(self.std):
            raise ValueError(f"Random: std must be a finite number >= 0, got {self.std!r}")
        return _check_shape("Random", self.shape_)

    def compute(self, inputs, ctx):
        return _draw(self.shape_, self.dist, self.std, self.mean, seed_for(ctx.seed, self.key))

    @property
    def draws_by_rows(self) -> bool:
        """Whether :meth:`row_stream` gives this tensor's values: each row is a multiple of 16 values
        and this torch's kernels draw blocks of rows as they draw the whole (checked once per process)."""
        row = 1
        for d in self.shape_[1:]:
            row *= d
        return len(self.shape_) >= 1 and row > 0 and row % 16 == 0 and _rows_draw_like_whole()

    def row_stream(self, ctx):
        """A function ``rows(n)``: the next ``n`` rows of this tensor (first call: rows ``[0, n)``), bitwise
        those of :meth:`compute` where :attr:`draws_by_rows`; rows must be taken in order, each once."""
        g = _generator(seed_for(ctx.seed, self.key))
        rest = self.shape_[1:]
        return lambda n: _draw_from(g, (n,) + rest, self.dist, self.std, self.mean)


@dataclass(frozen=True, eq=False, repr=False)
class ZeroSumNoise(Node):
    """Noise that sums to zero across the copies of each duplicated unit.

    ``groups`` lists, for the units along ``axis``, the index sets that are copies of one original unit
    (e.g. ``((0, 4), (1, 5), ...)`` after tiling 4 units twice). Within each group the noise is drawn
    i.i.d. normal(0, std) and its mean over the group subtracted, so it sums to zero across the copies
    (for every position on the other axes); indices in no group (or in a singleton) get zero noise.
    Adding it to the fan-out weights of copies keeps the forward function exact and breaks symmetry."""

    shape_: tuple[int, ...]
    axis: int
    groups: tuple[tuple[int, ...], ...]
    std: float
    key: str
    op: ClassVar[str] = "zero_sum_noise"

    def __init__(self, shape: Sequence[int], axis: int, groups, std: float, key: str):
        object.__setattr__(self, "shape_", tuple(shape))
        object.__setattr__(self, "axis", axis)
        object.__setattr__(self, "groups", groups)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "key", key)
        self.__post_init__()

    def params(self):
        return {"shape": list(self.shape_), "axis": self.axis, "groups": _thaw(self.groups), "std": self.std, "key": self.key}

    def _infer(self):
        s = _check_shape("ZeroSumNoise", self.shape_)
        a = _axis("ZeroSumNoise", s, self.axis)
        seen: set[int] = set()
        for g in self.groups:
            for i in g:
                if not isinstance(i, int) or not 0 <= i < s[a]:
                    raise ValueError(f"ZeroSumNoise: index {i!r} out of range [0, {s[a]}) on axis {a}")
                if i in seen:
                    raise ValueError(f"ZeroSumNoise: index {i} appears in two groups")
                seen.add(i)
        if not isinstance(self.std, (int, float)) or self.std < 0:
            raise ValueError(f"ZeroSumNoise: std must be >= 0, got {self.std!r}")
        if not isinstance(self.key, str) or not self.key:
            raise ValueError("ZeroSumNoise: key must be a non-empty string")
        return s

    def compute(self, inputs, ctx):
        import torch

        raw = _draw(self.shape_, "normal", self.std, 0.0, seed_for(ctx.seed, self.key))
        a = self.axis % len(self.shape_)
        out = torch.zeros_like(raw)
        for g in self.groups:
            if len(g) < 2:
                continue
            idx = torch.tensor(g, dtype=torch.long)
            part = _gather(raw, a, idx)
            part = part - part.mean(dim=a, keepdim=True)
            # make the last copy the exact negated sum of the others (pairs: exactly +n / -n)
            head = part.narrow(a, 0, len(g) - 1)
            part = torch.cat([head, -head.sum(dim=a, keepdim=True)], dim=a)
            _put(out, a, idx, part)  # the indices of a group are distinct
        return out


@dataclass(frozen=True, eq=False, repr=False)
class ExactSplit(Node):
    """Fan-out shares that add up to the original weight exactly in the dtype the output is stored in.

    ``y`` is a grown tensor whose units along ``axis`` include copies of the units of ``x`` (the tensor
    before growth, same shape but for ``axis``), scaled by fan-out shares (and maybe zero-sum noise)
    that are meant to sum to ``sums[u] * x[u]`` over the copies of unit ``u``; ``groups[u]`` lists the
    indices of those copies in ``y`` (empty or a single index: left alone). In float32 the copies sum
    to the target up to float32 rounding. Stored in bfloat16 or float16, each copy rounded on its own
    does not: unequal shares such as 0.62 / 0.38 leave a relative error of about 1e-3 (a bfloat16
    half-ulp per copy), and the grown model is no longer the original's function.

    With ``ctx.storage_dtype`` a 16-bit float (the executor sets it to the dtype of the outputs this
    node feeds) the copies are rounded one after another against the remaining target ``V`` (first
    the target ``round(sums[u] * x[u])``, which is ``x[u]`` itself when the shares sum to 1): a copy
    meant to hold at least half of ``V`` is rounded and subtracted, otherwise the rest ``V - copy`` is
    rounded and the copy is what it leaves; the last copy is the final remainder. Every subtraction
    is of two numbers within a factor of 2 of each other, exact by Sterbenz's lemma, so each copy is
    representable in the storage dtype and the copies sum *exactly* to the target. A copy that noise
    pushed outside ``[0, V]`` is first clamped into it (only where the noise outweighs the share).
    Other storage dtypes (float32, unknown): ``y`` is returned unchanged.

    ``x`` [..., d, ...], ``y`` [..., d2, ...] (float32 values); returns ``y``'s shape."""

    y: Node
    x: Node
    axis: int
    groups: tuple[tuple[int, ...], ...]
    sums: tuple[float, ...]
    op: ClassVar[str] = "exact_split"
    children_fields: ClassVar[tuple[str, ...]] = ("y", "x")
    storage_dtype_aware: ClassVar[bool] = True

    def _infer(self):
        ys, xs = self.y.shape, self.x.shape
        a = _axis("ExactSplit", ys, self.axis)
        if len(xs) != len(ys) or any(p != q for i, (p, q) in enumerate(zip(xs, ys)) if i != a):
            raise ValueError(f"ExactSplit: x {xs} and y {ys} must agree on every axis but {a}")
        if len(self.groups) != xs[a] or len(self.sums) != xs[a]:
            raise ValueError(f"ExactSplit: {len(self.groups)} groups and {len(self.sums)} sums for {xs[a]} units")
        seen: set[int] = set()
        for g in self.groups:
            for i in g:
                if not isinstance(i, int) or not 0 <= i < ys[a] or i in seen:
                    raise ValueError(f"ExactSplit: copy index {i!r} out of range [0, {ys[a]}) or repeated")
                seen.add(i)
        if not all(isinstance(c, (int, float)) and math.isfinite(c) for c in self.sums):
            raise ValueError("ExactSplit: sums must be finite numbers")
        return ys

    @functools.cached_property
    def _plan(self):
        """The copy structure, worked out once per node (the executor calls :meth:`compute` once per row
        block): selectors of the units with copies, their sums (None: all 1), per round the positions
        in ``rest`` and the copies' indices (and whether the round covers every unit), the last copies."""
        import torch

        multi = [(u, g) for u, g in enumerate(self.groups) if len(g) > 1]
        if not multi:
            return None
        us_all = [u for u, _ in multi]
        sums = (torch.tensor([self.sums[u] for u in us_all], dtype=torch.float32)
                if any(self.sums[u] != 1.0 for u in us_all) else None)
        rounds = []
        for r in range(max(len(g) for _, g in multi) - 1):
            rows = [k for k, (_, g) in enumerate(multi) if len(g) > r + 1]  # positions in rest
            rounds.append((_selector(rows), _selector([multi[k][1][r] for k in rows]), len(rows) == len(multi)))
        return _selector(us_all), sums, rounds, _selector([g[-1] for _, g in multi])

    def compute(self, inputs, ctx):
        import torch

        y, x = inputs
        rd = getattr(ctx, "storage_dtype", None)
        if rd not in (torch.bfloat16, torch.float16) or not y.is_floating_point():
            return y
        plan = self._plan
        if plan is None:
            return y
        sel_units, sums, rounds, sel_last = plan
        a = self.axis % y.dim()
        y = y.float().clone()
        # V per unit, of the units with copies only (a view where they are a run of units)
        rest = _take(x.float(), a, sel_units)
        if sums is not None:
            shp = [1] * x.dim()
            shp[a] = sums.numel()
            rest = rest * sums.reshape(shp)
        rest = rest.to(rd).float()  # a new tensor: updated in place below
        for sel_rows, sel_js, every in rounds:
            v = _take(rest, a, sel_rows)
            c = _take(y, a, sel_js)
            if isinstance(sel_js, tuple):  # a view of y: copied before it is clamped in place
                c = c.clone()
            # clamp the copy into [min(V, 0), max(V, 0)] (only where noise outweighs the share)
            c = torch.clamp(c, min=v.clamp(max=0), max=v.clamp(min=0), out=c)
            alt = torch.sub(v, c)
            alt = alt.to(rd).float()
            torch.sub(v, alt, out=alt)  # V - round(V - c): the rest rounded, the copy what it leaves
            big = c.abs().mul_(2) >= v.abs()  # the copy holds at least half of V: round it
            c = torch.where(big, c.to(rd).float(), alt, out=alt)
            del big
            _put(y, a, sel_js, c)
            if every:
                rest.sub_(c)
            else:
                _put(rest, a, sel_rows, v - c)
        _put(y, a, sel_last, rest)
        return y


def _selector(idx):
    """``(start, length)`` where ``idx`` is a run of consecutive ascending integers (taken as a view),
    else a LongTensor of the indices."""
    import torch

    if idx and idx[-1] - idx[0] == len(idx) - 1 and all(i == idx[0] + k for k, i in enumerate(idx)):
        return (idx[0], len(idx))
    return torch.tensor(idx, dtype=torch.long)


def _take(t, axis: int, sel):
    """``t.index_select(axis, idx)``; a view (``narrow``) where the selector is a run (see :func:`_selector`)."""
    if isinstance(sel, tuple):
        return t.narrow(axis, sel[0], sel[1])
    return _gather(t, axis, sel)


def _put(t, axis: int, sel, val) -> None:
    """``t.index_copy_(axis, idx, val)`` (indices distinct); a ``narrow(...).copy_`` where the selector is a run."""
    if isinstance(sel, tuple):
        t.narrow(axis, sel[0], sel[1]).copy_(val)
    elif axis == 0:
        t.index_copy_(axis, sel, val)
    else:  # distinct indices (ExactSplit checks): a scatter, 3.6x faster than index_copy_ off axis 0
        t.scatter_(axis, _along(sel, axis, val.shape), val)


def _along(idx, axis: int, shape):
    """The 1-D index ``idx`` as a view broadcast to ``shape`` (``shape[axis] == idx.numel()``)."""
    view = [1] * len(shape)
    view[axis] = idx.numel()
    return idx.view(view).expand(shape)


def _gather(t, axis: int, idx):
    """``t.index_select(axis, idx)``, the same values. Off axis 0 it is a ``gather`` with the index
    broadcast: torch's index_select loops element by element there (measured on a [23, 5632] bfloat16
    row block: 2.98 ns per value against 1.22 for the gather)."""
    if axis == 0 or t.dim() == 1:
        return t.index_select(axis, idx)
    shape = list(t.shape)
    shape[axis] = idx.numel()
    return t.gather(axis, _along(idx, axis, shape))


def storage_dtypes(roots) -> dict[str, str | None]:
    """For the nodes that round to their output's stored dtype (``storage_dtype_aware``, e.g.
    :class:`ExactSplit`): ``{digest: dtype name}`` over ``roots``, pairs of (output node, its dtype
    name); None where outputs of different dtypes share the node."""
    res: dict[str, str | None] = {}
    for root, dt in roots:
        order: list[Node] = []
        _postorder(root, set(), order)
        for n in order:
            if getattr(n, "storage_dtype_aware", False):
                res[n.digest] = dt if res.get(n.digest, dt) == dt else None
    return res


@dataclass(frozen=True, eq=False, repr=False)
class LesaLayer(Node):
    """LESA: the matrix of a layer inserted between existing layers ``left`` and ``right``, predicted
    from all ``xs`` (every layer's matrix of one kind, [out, in] each) by
    :class:`scaler_wizard.compiler.methods.lesa.KindFit` (SVD of the input-axis concatenation, an MLP
    fit on the per-layer V blocks, ``U S f(B_left, B_right)``). Deterministic for (inputs, options).

    The fit of one kind is kept on the EvalContext while the same inputs and options come again
    (one kind at a time: memory stays bounded by one kind's matrices)."""

    xs: tuple[Node, ...]
    left: int
    right: int
    epochs: int = 100
    width: int = 64
    seed: int = 0
    rank: int | None = None
    norm_weight: float = 0.01
    lr: float = 1e-3
    op: ClassVar[str] = "lesa_layer"
    children_fields: ClassVar[tuple[str, ...]] = ("xs",)

    def _infer(self):
        from scaler_wizard.compiler.methods.lesa import LesaError, check_shapes

        try:
            shape = check_shapes([x.shape for x in self.xs])
            self.options()
        except LesaError as e:
            raise ValueError(f"LesaLayer: {e}") from None
        n = len(self.xs)
        if not (isinstance(self.left, int) and isinstance(self.right, int) and 0 <= self.left < n and 0 <= self.right < n):
            raise ValueError(f"LesaLayer: neighbours {self.left}, {self.right} outside 0..{n - 1}")
        return shape

    def options(self):
        from scaler_wizard.compiler.methods.lesa import LesaOptions

        return LesaOptions(self.epochs, self.width, self.seed, self.rank, self.norm_weight, self.lr)

    def compute(self, inputs, ctx):
        from scaler_wizard.compiler.methods.lesa import KindFit

        key = (tuple(c.digest for c in self.xs), self.epochs, self.width, self.seed, self.rank, self.norm_weight,
               self.lr)
        memo = getattr(ctx, "_lesa_fit", None)
        if memo is None or memo[0] != key:
            memo = (key, KindFit(inputs, self.options()))
            ctx._lesa_fit = memo
        return memo[1].layer(self.left, self.right)


OPS: dict[str, type[Node]] = {
    cls.op: cls
    for cls in (Load, Slice, Index, Tile, Scale, MulAxis, Mul, Add, Neg, Concat, Reshape, Permute, Cast,
                Zeros, Full, Random, ZeroSumNoise, ExactSplit, LesaLayer)
}


# --------------------------------------------------------------------------------------------- helpers


def sub(x: Node, y: Node) -> Node:
    return Add(x, Neg(y))


def chunk(x: Node, n: int, axis: int = 0) -> list[Node]:
    """Split into ``n`` equal parts along ``axis`` (ValueError if not divisible)."""
    a = _axis("chunk", x.shape, axis)
    if n < 1 or x.shape[a] % n:
        raise ValueError(f"chunk: size {x.shape[a]} of axis {a} is not divisible into {n} parts")
    k = x.shape[a] // n
    return [Slice(x, a, i * k, (i + 1) * k) for i in range(n)]


def split(x: Node, sizes: Sequence[int], axis: int = 0) -> list[Node]:
    """Split along ``axis`` into consecutive parts of the given sizes (must sum to the axis size)."""
    a = _axis("split", x.shape, axis)
    if sum(sizes) != x.shape[a]:
        raise ValueError(f"split: sizes {list(sizes)} sum to {sum(sizes)}, not to size {x.shape[a]} of axis {a}")
    out, start = [], 0
    for s in sizes:
        out.append(Slice(x, a, start, start + s))
        start += s
    return out


def transpose(x: Node, a: int, b: int) -> Node:
    dims = list(range(len(x.shape)))
    dims[a], dims[b] = dims[b], dims[a]
    return Permute(x, tuple(dims))


def tile_groups(d: int, k: int) -> tuple[tuple[int, ...], ...]:
    """Copy groups after Tile(axis size d, reps k): unit j has copies j, j+d, ..., j+(k-1)d."""
    return tuple(tuple(j + c * d for c in range(k)) for j in range(d))


# --------------------------------------------------------------------------------------------- program


@dataclass
class Output:
    name: str
    node: Node
    exactness: str = "exact"
    status: str = "new"
    original_region: tuple[tuple[int, int], ...] | None = None  # [start, stop) per axis, for "grown"
    explain: str = ""

    def to_json(self, ids: dict[str, int]) -> dict:
        return {
            "name": self.name,
            "node": ids[self.node.digest],
            "shape": list(self.node.shape),
            "exactness": self.exactness,
            "status": self.status,
            "original_region": None if self.original_region is None else [list(r) for r in self.original_region],
            "explain": self.explain,
        }


class ProgramError(ValueError):
    """A malformed program (bad JSON, unknown op, duplicate output...)."""


@dataclass
class TensorProgram:
    """Outputs (ordered: the order tensors are written), a config patch and metadata."""

    outputs: dict[str, Output] = field(default_factory=dict)
    config_patch: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    # ---- building
    def add(
        self,
        name: str,
        node: Node,
        *,
        exactness: str = "exact",
        status: str | None = None,
        original_region: Iterable[Iterable[int]] | None = None,
        explain: str = "",
        replace: bool = False,
    ) -> Output:
        if not isinstance(node, Node):
            raise ProgramError(f"output {name!r}: expected a Node, got {type(node).__name__}")
        if name in self.outputs and not replace:
            raise ProgramError(f"output {name!r} defined twice")
        if exactness not in EXACTNESS:
            raise ProgramError(f"output {name!r}: exactness must be one of {EXACTNESS}, got {exactness!r}")
        if status is None:
            status = "original" if isinstance(node, Load) and node.name == name else "new"
        if status not in STATUSES:
            raise ProgramError(f"output {name!r}: status must be one of {STATUSES}, got {status!r}")
        region = None
        if original_region is not None:
            region = tuple((int(a), int(b)) for a, b in original_region)
            if len(region) != len(node.shape) or any(
                not 0 <= a <= b <= s for (a, b), s in zip(region, node.shape)
            ):
                raise ProgramError(f"output {name!r}: original_region {region} does not fit shape {node.shape}")
        if not explain:
            explain = describe(node)
        out = Output(name, node, exactness, status, region, explain)
        self.outputs[name] = out
        return out

    def copy_through(self, name: str, shape: Sequence[int], dtype: str | None = None) -> Output:
        """Output ``name`` unchanged from the input checkpoint."""
        return self.add(name, Load(name, shape, dtype), status="original", explain="unchanged")

    # ---- queries
    def nodes(self) -> list[Node]:
        """Every distinct node, topologically sorted (children first), deterministic order."""
        order: list[Node] = []
        seen: set[str] = set()
        for out in self.outputs.values():
            _postorder(out.node, seen, order)
        return order

    def inputs(self) -> dict[str, Load]:
        """Input tensor name -> Load node (first one seen)."""
        res: dict[str, Load] = {}
        for n in self.nodes():
            if isinstance(n, Load):
                res.setdefault(n.name, n)
        return res

    def exactness(self) -> str:
        """The weakest exactness of all outputs."""
        rank = {e: i for i, e in enumerate(EXACTNESS)}
        worst = "exact"
        for o in self.outputs.values():
            if rank[o.exactness] > rank[worst]:
                worst = o.exactness
        return worst

    def __len__(self):
        return len(self.outputs)

    # ---- JSON
    def to_dict(self) -> dict:
        nodes = self.nodes()
        ids = {n.digest: i for i, n in enumerate(nodes)}
        jnodes = []
        for i, n in enumerate(nodes):
            d: dict[str, Any] = {"id": i, "op": n.op}
            for cf in n.children_fields:
                v = getattr(n, cf)
                d[cf] = ids[v.digest] if isinstance(v, Node) else [ids[c.digest] for c in v]
            d.update(n.params())
            d["out_shape"] = list(n.shape)
            jnodes.append(d)
        return {
            "format": PROGRAM_FORMAT,
            "version": PROGRAM_VERSION,
            "seed": self.seed,
            "metadata": self.metadata,
            "config_patch": self.config_patch,
            "nodes": jnodes,
            "outputs": [o.to_json(ids) for o in self.outputs.values()],
        }

    def to_json(self) -> str:
        """Stable, diffable JSON text: one node / output per line."""
        d = self.to_dict()
        line = lambda x: json.dumps(x, sort_keys=False, separators=(", ", ": "))  # noqa: E731
        parts = ["{"]
        for k in ("format", "version", "seed"):
            parts.append(f"  {json.dumps(k)}: {json.dumps(d[k])},")
        parts.append(f'  "metadata": {json.dumps(d["metadata"], sort_keys=True)},')
        parts.append(f'  "config_patch": {json.dumps(d["config_patch"], sort_keys=True)},')
        for key in ("nodes", "outputs"):
            items = d[key]
            parts.append(f'  "{key}": [')
            for j, it in enumerate(items):
                parts.append("    " + line(it) + ("," if j < len(items) - 1 else ""))
            parts.append("  ]" + ("," if key == "nodes" else ""))
        parts.append("}")
        return "\n".join(parts) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> "TensorProgram":
        if not isinstance(d, dict) or d.get("format") != PROGRAM_FORMAT:
            raise ProgramError(f"not a tensor program (format must be {PROGRAM_FORMAT!r})")
        if d.get("version") != PROGRAM_VERSION:
            raise ProgramError(f"unsupported program version {d.get('version')!r} (this build reads {PROGRAM_VERSION})")
        built: dict[int, Node] = {}
        for jn in d.get("nodes", []):
            jn = dict(jn)
            nid = jn.pop("id")
            op = jn.pop("op")
            want_shape = jn.pop("out_shape", None)
            kls = OPS.get(op)
            if kls is None:
                raise ProgramError(f"node {nid}: unknown op {op!r}")
            try:
                for cf in kls.children_fields:
                    v = jn[cf]
                    jn[cf] = built[v] if isinstance(v, int) else tuple(built[c] for c in v)
                node = kls(**jn)
            except KeyError as e:
                raise ProgramError(f"node {nid} ({op}): missing or forward reference {e}") from None
            except (TypeError, ValueError) as e:
                raise ProgramError(f"node {nid} ({op}): {e}") from None
            if want_shape is not None and list(node.shape) != list(want_shape):
                raise ProgramError(f"node {nid} ({op}): inferred shape {node.shape} != recorded {want_shape}")
            built[nid] = node
        prog = cls(config_patch=dict(d.get("config_patch") or {}), metadata=dict(d.get("metadata") or {}),
                   seed=int(d.get("seed", 0)))
        for jo in d.get("outputs", []):
            try:
                node = built[jo["node"]]
            except KeyError:
                raise ProgramError(f"output {jo.get('name')!r}: unknown node {jo.get('node')!r}") from None
            prog.add(jo["name"], node, exactness=jo.get("exactness", "exact"), status=jo.get("status"),
                     original_region=jo.get("original_region"), explain=jo.get("explain", ""))
        return prog

    @classmethod
    def from_json(cls, text: str) -> "TensorProgram":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProgramError(f"program is not valid JSON: {e}") from None
        return cls.from_dict(d)

    def explain_lines(self) -> list[str]:
        return [f"{o.name} {list(o.node.shape)} [{o.status}, {o.exactness}]: {o.explain}" for o in self.outputs.values()]


def _postorder(root: Node, seen: set[str], order: list[Node]) -> None:
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        n, expanded = stack.pop()
        if n.digest in seen:
            continue
        if expanded:
            seen.add(n.digest)
            order.append(n)
            continue
        stack.append((n, True))
        for c in reversed(n.children()):
            if c.digest not in seen:
                stack.append((c, False))


def use_counts(order: list[Node]) -> dict[str, int]:
    """digest -> number of consumer edges into that node among ``order`` (an evaluation order)."""
    uses: dict[str, int] = {}
    for n in order:
        for c in n.children():
            uses[c.digest] = uses.get(c.digest, 0) + 1
    return uses


def release_last_uses(used, uses: dict[str, int], cache: dict) -> list:
    """Count one use of each node in ``used`` (one entry per consumer edge) against ``uses`` and drop
    from ``cache`` the values of those used for the last time (evaluators free each value at its last
    use this way). Returns the values dropped."""
    dropped = []
    for c in used:
        uses[c.digest] -= 1
        if uses[c.digest] == 0:
            dead = cache.pop(c.digest, None)
            if dead is not None:
                dropped.append(dead)
    return dropped


def describe(node: Node, depth: int = 0) -> str:
    """A short human-readable formula for a node (for ``explain``)."""
    if depth > 6:
        return "..."
    d = depth + 1
    if isinstance(node, Load):
        return node.name
    if isinstance(node, Slice):
        return f"{describe(node.x, d)}[axis {node.axis}: {node.start}:{node.stop}{'' if node.step == 1 else ':' + str(node.step)}]"
    if isinstance(node, Index):
        idx = list(node.indices[:6])
        more = "..." if len(node.indices) > 6 else ""
        return f"gather({describe(node.x, d)}, axis {node.axis}, {idx}{more})"
    if isinstance(node, LesaLayer):
        return f"lesa({len(node.xs)} layers of {describe(node.xs[0], d)}, between {node.left} and {node.right})"
    if isinstance(node, Tile):
        return f"tile({describe(node.x, d)}, axis {node.axis}, x{node.reps})"
    if isinstance(node, Scale):
        return f"{node.factor:g} * {describe(node.x, d)}"
    if isinstance(node, MulAxis):
        vals = sorted(set(node.vec))
        shown = ", ".join(f"{v:g}" for v in vals[:4]) + ("..." if len(vals) > 4 else "")
        return f"{describe(node.x, d)} * vec(axis {node.axis}; values {{{shown}}})"
    if isinstance(node, Mul):
        return f"({describe(node.x, d)} * {describe(node.y, d)})"
    if isinstance(node, Add):
        if isinstance(node.y, Neg):
            return f"({describe(node.x, d)} - {describe(node.y.x, d)})"
        return f"({describe(node.x, d)} + {describe(node.y, d)})"
    if isinstance(node, Neg):
        return f"-{describe(node.x, d)}"
    if isinstance(node, Concat):
        return f"concat(axis {node.axis}: " + ", ".join(describe(x, d) for x in node.xs) + ")"
    if isinstance(node, Reshape):
        return f"reshape({describe(node.x, d)}, {list(node.shape_)})"
    if isinstance(node, Permute):
        return f"permute({describe(node.x, d)}, {list(node.dims)})"
    if isinstance(node, Cast):
        return f"cast({describe(node.x, d)}, {node.dtype})"
    if isinstance(node, Zeros):
        return f"zeros{list(node.shape_)}"
    if isinstance(node, Full):
        return f"full({list(node.shape_)}, {node.value:g})"
    if isinstance(node, Random):
        return f"{node.dist}(std {node.std:g}, key {node.key!r}){list(node.shape_)}"
    if isinstance(node, ZeroSumNoise):
        return f"zero_sum_noise(std {node.std:g}, axis {node.axis}, {len(node.groups)} groups, key {node.key!r})"
    return node.op


# --------------------------------------------------------------------------------------------- eval


class EvalContext:
    """What nodes need at evaluation time: the plan seed and a loader for input tensors."""

    def __init__(self, seed: int = 0, loader=None):
        self.seed = seed
        self._loader = loader
        # the dtype (torch) the output being computed is stored in, set by the executor before a
        # node that rounds to it (``storage_dtype_aware``) runs; None: not known (float32 semantics)
        self.storage_dtype = None

    def load(self, name: str, shape: tuple[int, ...]):
        if self._loader is None:
            raise ProgramError(f"no input checkpoint to load {name!r} from")
        t = self._loader(name)
        if tuple(t.shape) != tuple(shape):
            raise ProgramError(f"Load({name}): checkpoint shape {tuple(t.shape)} != program shape {tuple(shape)}")
        return t.float() if t.is_floating_point() and t.dtype != _f32() else t


def _f32():
    import torch

    return torch.float32


def evaluate(node: Node, ctx: EvalContext, cache: dict[str, Any] | None = None):
    """Evaluate a node (float32) with a simple memo cache (no freeing). The executor has its own
    reference-counting scheduler; this is for tests and small programs."""
    cache = {} if cache is None else cache
    order: list[Node] = []
    _postorder(node, set(cache), order)
    for n in order:
        if n.digest not in cache:
            cache[n.digest] = n.compute([cache[c.digest] for c in n.children()], ctx)
    return cache[node.digest]
