"""The resolved (type-checked) plan: the contract between the type checker and lowering.

No torch import. Produced by :func:`scaler_wizard.compiler.typecheck.check_plan`; consumed by
:mod:`scaler_wizard.compiler.lower`, which turns each :class:`ResolvedOp` into passes.

Semantics: ops apply in plan order. Width ops name a dimension group and its old/new size.
Depth ops are folded into one final :attr:`ResolvedPlan.layer_map` (and also kept per op for
reporting): entry ``j`` says where new layer ``j`` comes from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from scaler_wizard.diagnostics import Span
from scaler_wizard.ir.model_ir import ModelIR

EXACT = "exact"
EXACT_EPS = "exact-eps"
APPROX = "approx"
EXACTNESS_ORDER = {EXACT: 0, EXACT_EPS: 1, APPROX: 2}


def worst(*classes: str) -> str:
    return max(classes, key=EXACTNESS_ORDER.__getitem__) if classes else EXACT


@dataclass(frozen=True)
class LayerSource:
    """Where a layer of the grown model comes from.

    ``init``: "original" (old layer ``src`` unchanged), "copy" (a duplicate of old layer ``src``:
    approx), "identity" (fan-in copied from old layer ``src``, writers zero: exact), "zero"
    (fan-in random, writers zero: exact), "cancel" (non-zero paired writers summing to zero: exact).
    ``src`` is always an old layer index: the layer whose weights (or shapes) seed the new one.
    ``noise``: std of the noise added to an identity layer's copied fan-in (exact: its writers are
    zero); 0 for every other init.
    """

    src: int
    init: str = "original"
    noise: float = field(default=0.0, repr=False)

    @property
    def is_new(self) -> bool:
        return self.init != "original"


@dataclass(frozen=True)
class ResolvedOp:
    index: int  # position of the statement in the plan
    kind: str  # "widen" | "insert" | "duplicate" | "stack" | "upcycle"
    span: Span
    text: str  # the statement as printed, for reports and error messages
    exactness: str  # EXACT | EXACT_EPS | APPROX
    reason: str  # why this exactness class (cites the IR fact)
    group: str | None = None  # widen/upcycle: the dimension group
    old_size: int | None = None
    new_size: int | None = None
    method: str | None = None  # widen: tile | lemon | net2net | zero | dup ; depth: the init
    options: dict[str, Any] = field(default_factory=dict)
    layer_map: tuple[LayerSource, ...] = ()  # depth ops: the map right after this op
    config_patch: dict[str, Any] = field(default_factory=dict)  # what this op changes in config


@dataclass(frozen=True)
class Costs:
    params: int
    params_non_embedding: int
    flops_per_token: int  # forward, 2 * matmul params + attention at the given context
    context: int
    apply_peak_bytes: int  # tensors held while applying (streaming: 3 x the largest tensor in fp32)
    train_bytes: int  # bf16 weights + fp32 master + fp32 Adam m, v + bf16 grads, no activations


@dataclass(frozen=True)
class ResolvedPlan:
    model_ref: str
    ir: ModelIR  # the original model's IR
    ops: tuple[ResolvedOp, ...]
    layer_map: tuple[LayerSource, ...]  # final depth map (identity when no depth op)
    config_before: dict[str, Any]
    config_after: dict[str, Any]
    costs_before: Costs
    costs_after: Costs
    seed: int = 0
    dtype: str | None = None  # output dtype; None keeps the input's
    noise: float = 0.0  # symmetry-breaking noise scale (exact in the forward pass)
    train: dict[str, Any] = field(default_factory=dict)  # `train { ... }` options, or {"ref": path}
    alternatives: tuple[str, ...] = ()  # `grow to`: other plans considered, for the report
    warnings: tuple = ()  # Diagnostic objects of severity "warning"
    sizes_after: dict[str, int] = field(default_factory=dict)  # predicted group sizes of the grown model
    plan_text: str = ""  # the plan's source, for the model card and the growth sidecar
    config_notes: tuple[str, ...] = ()  # keys written explicitly or confirmed by building (compiler/conform.py)
    stages: tuple = ()  # `at step` stages (compiler/stages.py ResolvedStage), grown from config_after on

    @property
    def exactness(self) -> str:
        return worst(*(o.exactness for o in self.ops))

    def config_diff(self) -> dict[str, tuple[Any, Any]]:
        keys = sorted(set(self.config_before) | set(self.config_after))
        return {
            k: (self.config_before.get(k), self.config_after.get(k))
            for k in keys
            if self.config_before.get(k) != self.config_after.get(k)
        }
