"""The plan language's abstract syntax tree.

Frozen dataclasses, no torch import. Every node carries a :class:`Span`; spans are excluded from
equality (``compare=False``) so that ``parse(print_plan(ast)) == ast`` holds even though printing
moves things around.

Leaf values that a diagnostic may need to point at (group names, method names, layer indices,
factors) are wrapped in small nodes with their own span (:class:`Ident`, :class:`Int`).

Contract for later phases
-------------------------
- :attr:`Plan.statements` holds the file's statements in source order. Growth statements
  (:data:`GROWTH_STATEMENTS`) at the top level are applied before step 0, as they always were.
- A :class:`Stage` (``at step <N> [key=value ...] { ... }``) holds only growth statements, in
  source order; the parser refuses anything else inside a stage (SW109), so a consumer may rely
  on ``isinstance(s, GROWTH_STATEMENTS)`` for every ``s`` in ``stage.statements``. Stages are
  never nested. The parser does not check that stage steps increase, lie inside the recipe's
  ``steps``, or that the header options (``optimizer=carry|reset``, ``rewarm=<steps>``) are
  known: names and values are the type checker's business, like every other option.
- Names (groups, methods, inits, option keys, the context-extension method) are :class:`Ident`
  and are resolved by the type checker; numbers whose range the grammar cannot express are
  checked by the parser (SW104): layer indices and stage steps are ``>= 0``, counts, sizes and
  context lengths ``>= 1``.
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


@dataclass(frozen=True)
class ExtendContext:
    """``extend context to <N> [<method>] [key=value ...]``: a longer context window.

    ``length`` is the new ``max_position_embeddings`` in tokens (an :class:`Int` >= 1, its own
    span). ``method`` is the RoPE scaling as written (``linear``, ``dynamic``, ``yarn``,
    ``llama3``, ``longrope`` in transformers' ``rope_parameters`` / ``rope_scaling`` naming) or
    ``None`` for the default; the type checker resolves the name and the ``key=value`` options
    (e.g. ``factor=``, ``original_max_position_embeddings=``), not the parser.
    """

    length: Int
    method: Ident | None = None
    options: tuple[Option, ...] = ()
    span: Span = _span()


GrowthStatement = Union[
    WidenStmt,
    InsertLayerStmt,
    InsertLayersAfterStmt,
    InsertEveryStmt,
    DuplicateLayersStmt,
    StackStmt,
    UpcycleStmt,
    GrowToStmt,
    ExtendContext,
]
#: The statement classes a :class:`Stage` may hold (for ``isinstance``).
GROWTH_STATEMENTS: tuple[type, ...] = (
    WidenStmt,
    InsertLayerStmt,
    InsertLayersAfterStmt,
    InsertEveryStmt,
    DuplicateLayersStmt,
    StackStmt,
    UpcycleStmt,
    GrowToStmt,
    ExtendContext,
)


@dataclass(frozen=True)
class Stage:
    """``at step <N> [key=value ...] { <growth statements> }``: growth in the middle of training.

    ``step`` is the training step (an :class:`Int` >= 0 with its own span) at which the stage's
    statements are applied, in order, to the model as grown by the stages before it. ``options``
    are the header's ``key=value`` pairs as written (``optimizer=carry|reset``,
    ``rewarm=<steps>``; validated by the type checker). ``statements`` holds only growth
    statements (see :data:`GROWTH_STATEMENTS`), each with its own span; it may be empty
    (``at step 100 {}``). ``span`` covers the header to the closing ``}``. Statements inside
    the braces are separated by ``;`` or line breaks; a stage never contains another stage.
    (Staged Training, Shen et al. 2022; MSG, Yao et al. 2023; G_stack, Du et al. 2024.)
    """

    step: Int
    options: tuple[Option, ...] = ()
    statements: tuple[GrowthStatement, ...] = ()
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
    ExtendContext,
    SeedStmt,
    DtypeStmt,
    NoiseStmt,
    TrainStmt,
    Stage,
]


@dataclass(frozen=True)
class Plan:
    statements: tuple[Statement, ...]
    file: str = field(default="<plan>", compare=False)
    source: str = field(default="", compare=False, repr=False)

    def model_ref(self) -> str | None:
        refs = [s.ref.value for s in self.statements if isinstance(s, ModelStmt)]
        return refs[-1] if refs else None
