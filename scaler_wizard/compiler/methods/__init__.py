"""Registry of growth methods: which methods apply to which group, their defaults and options.

This is the table the type checker consults; the lowering passes implement the maths. The
exactness of a method on a given model is decided by :func:`scaler_wizard.compiler.typecheck`
from IR facts (norm kind and placement, RoPE, GQA, tied weights); the ``base`` class here is what
the method is when nothing in the model stands in its way.
"""

from __future__ import annotations

from dataclasses import dataclass

from scaler_wizard.compiler.resolved import APPROX, EXACT


@dataclass(frozen=True)
class MethodSpec:
    name: str
    groups: tuple[str, ...]
    base: str  # exactness class when the model allows it
    summary: str
    options: tuple[str, ...] = ("noise", "split")
    integer_factor_only: bool = False


WIDTH_METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        MethodSpec(
            "tile",
            ("hidden", "ffn", "heads", "kv_heads"),
            EXACT,
            "new unit j copies unit j mod d; readers' copies split to sum to the original",
            integer_factor_only=True,
        ),
        MethodSpec(
            "lemon",
            ("hidden", "ffn"),
            EXACT,
            "tile + residue (zero for RMSNorm, mean for LayerNorm) with eta-rescaled norm gains and eps",
        ),
        MethodSpec("net2net", ("ffn",), EXACT, "new units copy random old units; fan-out split among copies"),
        MethodSpec("zero", ("ffn", "heads", "head_dim"), EXACT, "new units: random fan-in, zero fan-out"),
        MethodSpec("dup", ("heads", "kv_heads"), EXACT, "new heads copy old heads (in their GQA group); o_proj split"),
        MethodSpec("mean", ("vocab",), APPROX, "new embedding / LM-head rows set to the mean row"),
        MethodSpec("copy", ("experts",), APPROX, "new experts copy old ones; router rows copied"),
    )
}

# Aliases users may reasonably type.
WIDTH_ALIASES = {"duplicate": "dup", "hypercloning": "tile", "random": "zero"}

DEFAULT_WIDTH_METHOD = {
    "hidden": "lemon",  # tile when the factor is an integer (see typecheck)
    "ffn": "net2net",
    "heads": "dup",
    "kv_heads": "tile",
    "head_dim": "zero",
    "vocab": "mean",
    "experts": "copy",
}

DEPTH_INITS: dict[str, str] = {
    "identity": "fan-in copied from the neighbouring layer, writers (o_proj, down_proj) zero: exact",
    "zero": "fan-in random, writers zero: exact",
    "cancel": "writers split into paired non-zero halves that sum to zero: exact",
    "copy": "a full copy of the neighbouring layer: approx",
    "lesa": "LESA: each matrix predicted from all layers' matrices of its kind (SVD + MLP), norms interpolated: "
            "approx",
}
DEPTH_ALIASES = {"id": "identity", "llama-pro": "identity", "duplicate": "copy"}

WIDEN_OPTIONS = {
    "noise": "symmetry-breaking noise scale (zero-sum across copies: exact in the forward pass)",
    "split": "how readers' copies share the original: `random` (default, unequal, breaks symmetry) or `equal`",
    "untie": "hidden only: untie the LM head from the embedding (`true`); default keeps the tie",
}
INSERT_OPTIONS = {
    "from": "the old layer whose fan-in weights seed the new layer (default: the neighbour before it)",
    "noise": "identity layers only: noise on the copied fan-in weights (exact: the writers are zero)",
    "epochs": "lesa only: passes of the predictor fit over the training columns (default 100)",
    "width": "lesa only: hidden units of the predictor MLP (default 64)",
    "rank": "lesa only: singular triplets kept (default all; randomized SVD when set or when the matrix is large)",
    "seed": "lesa only: seed of the predictor fit (default: the plan seed)",
}
LESA_OPTIONS = ("epochs", "width", "rank", "seed")
UPCYCLE_OPTIONS = {
    "noise": "noise on expert copies (breaks expert symmetry; makes the op approx)",
    "router": "router initialisation: `zero` (default) or `random`",
    "drop": "Drop-Upcycling: fraction (0, 1] of each expert's FFN units re-initialised, a different subset per "
            "expert (approx)",
}
DUPLICATE_OPTIONS: dict[str, str] = {}
