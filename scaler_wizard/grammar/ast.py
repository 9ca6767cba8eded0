"""The plan language's abstract syntax tree.

Frozen dataclasses, no torch import. Every node carries a :class:`Span`; spans are excluded from
equality (``compare=False``) so that ``parse(print_plan(ast)) == ast`` holds even though printing
moves things around.

Leaf values that a diagnostic may need to point at (group names, method names, layer indices,
factors) are wrapped in small nodes with their own span (:class:`Ident`, :class:`Int`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from scaler_wizard.diagnostics import Span  # re-exported: every node carries one


def _span() -> Span:
    return field(default_factory=Span, compare=False, repr=False)


# --------------------------------------------------------------------------- leaves
@dataclass(frozen=True)
class Ident:
    """An identifier: a group, method, init, option key or dtype name. Resolved later."""

    name: str
    span: Span = _span()


@dataclass(frozen=True)
class Int:
    value: int
    span: Span = _span()


@dataclass(frozen=True)
class Number:
    """A float-valued literal (``noise 0.01``, ``lr=3e-4``)."""

    value: float
    span: Span = _span()


@dataclass(frozen=True)
class Str:
    value: str
    span: Span = _span()


@dataclass(frozen=True)
class Bool:
    value: bool
    span: Span = _span()


Value = Union[Ident, Int, Number, Str, Bool]


@dataclass(frozen=True)
class Option:
    """``key=value`` after a statement (``widen ffn x2 net2net noise=0.01 split=random``)."""

    key: Ident
    value: Value
    span: Span = _span()


# --------------------------------------------------------------------------- amounts
@dataclass(frozen=True)
class Factor:
    """``x2`` / ``x1.5``: multiply the current size."""

    value: float
    span: Span = _span()


@dataclass(frozen=True)
class ToSize:
    """``to 4096``: the new absolute size."""

    value: int
    span: Span = _span()


@dataclass(frozen=True)
class ByDelta:
    """``by 512``: add this many units."""

    value: int
    span: Span = _span()


Amount = Union[Factor, ToSize, ByDelta]


# --------------------------------------------------------------------------- statements
@dataclass(frozen=True)
class ModelStmt:
    """``model "<hub id | local dir | file.gguf>"``."""

    ref: Str
    span: Span = _span()


@dataclass(frozen=True)
class WidenStmt:
    """``widen <group> (x<f> | to <n> | by <n>) [<method>] [key=value ...]``."""

    group: Ident
    amount: Amount
    method: Ident | None = None
    options: tuple[Option, ...] = ()
    span: Span = _span()


@dataclass(frozen=True)
class InsertLayerStmt:
    """``insert layer <index> [<init>]``: the new layer gets index ``index`` in the grown model."""

    index: Int
    init: Ident | None = None
    options: tuple[Option, ...] = ()
    span: Span = _span()


@dataclass(frozen=True)
class InsertLayersAfterStmt:
    """``insert <n> layers after <index> [<init>]``: new layers follow old layer ``index``."""

    count: Int
    after: Int
    init: Ident | None = None
    options: tuple[Option, ...] = ()
    span: Span = _span()


@dataclass(frozen=True)
class InsertEveryStmt:
    """``insert layers every <k> [<init>]``: one new layer after every k old layers (LLaMA Pro)."""

    every: Int
    init: Ident | None = None
    options: tuple[Option, ...] = ()
    span: Span = _span()


@dataclass(frozen=True)
class DuplicateLayersStmt:
    """``duplicate layers <a>..<b>``: copies of old layers a..b (half-open, like Python ranges)
    are inserted right after layer b-1 (SOLAR-style depth up-scaling)."""

    start: Int
    stop: Int
    options: tuple[Option, ...] = ()
    span: Span = _span()


@dataclass(frozen=True)
class StackStmt:
    """``stack x<k>``: the whole layer stack repeated k times (G_stack)."""

    factor: Int
    options: tuple[Option, ...] = ()
    span: Span = _span()


@dataclass(frozen=True)
class UpcycleStmt:
    """``upcycle ffn experts <E> top <k>``: dense FFN to a mixture of E experts, top-k routing."""

    group: Ident
    experts: Int
    top_k: Int
    options: tuple[Option, ...] = ()
    span: Span = _span()


@dataclass(frozen=True)
class GrowToStmt:
    """``grow to <size>[M|B] [prefer depth|width]``: ask the solver for a plan reaching a size.

    ``params`` is the absolute parameter count (``grow to 1.5B`` -> 1.5e9).
    """

    params: float
    unit: str  # "", "K", "M" or "B" as written, kept for printing
    prefer: Ident | None = None
    span: Span = _span()


@dataclass(frozen=True)
class SeedStmt:
    value: Int
    span: Span = _span()


@dataclass(frozen=True)
class DtypeStmt:
    name: Ident
    span: Span = _span()


@dataclass(frozen=True)
class NoiseStmt:
    value: Number
    span: Span = _span()


@dataclass(frozen=True)
class TrainStmt:
    """``train { key = value ... }`` or ``train "recipe.toml"``: the continuation-training recipe.

    Exactly one of ``options`` (inline block) or ``ref`` (a file) is used.
    """

    options: tuple[Option, ...] = ()
    ref: Str | None = None
    span: Span = _span()


Statement = Union[
    ModelStmt,
    WidenStmt,
    InsertLayerStmt,
    InsertLayersAfterStmt,
    InsertEveryStmt,
    DuplicateLayersStmt,
    StackStmt,
    UpcycleStmt,
    GrowToStmt,
    SeedStmt,
    DtypeStmt,
    NoiseStmt,
    TrainStmt,
]


@dataclass(frozen=True)
class Plan:
    statements: tuple[Statement, ...]
    file: str = field(default="<plan>", compare=False)
    source: str = field(default="", compare=False, repr=False)

    def model_ref(self) -> str | None:
        refs = [s.ref.value for s in self.statements if isinstance(s, ModelStmt)]
        return refs[-1] if refs else None
