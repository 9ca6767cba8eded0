"""The type checker's state and its small helpers (constants, derived-size evaluation)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from scaler_wizard.compiler import methods as M
from scaler_wizard.compiler.resolved import LayerSource, ResolvedOp
from scaler_wizard.diagnostics import DiagnosticBag
from scaler_wizard.grammar import ast as A
from scaler_wizard.ir.model_ir import CANONICAL_GROUPS, ModelIR

DTYPES = ("float32", "bfloat16", "float16")
MAX_LAYERS = 10_000  # beyond any real model; keeps layer maps small
MAX_WIDTH = 2**31 - 1  # tensor dimensions above this are not addressable by safetensors readers
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}

UPCYCLE_TARGETS = M.UPCYCLE_TARGETS  # the one table of target families (compiler/methods/upcycle.py)


def groups_summary(ir: ModelIR, sizes: dict[str, int] | None = None, layers: int | None = None) -> str:
    sizes = sizes or {}
    parts = []
    order = {name: i for i, name in enumerate(CANONICAL_GROUPS)}
    for name, g in sorted(ir.groups.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])):
        size = sizes.get(name, g.size)
        if g.per_layer and name in ("ffn", "experts"):
            parts.append(f"{name}({size} x{layers if layers is not None else ir.num_layers} layers)")
        else:
            parts.append(f"{name}({size})")
    return "groups: " + ", ".join(parts)


def _eval_derived(expr: str, config: dict[str, Any]) -> int | None:
    """Evaluate a derived-size expression such as ``hidden_size // num_attention_heads`` or
    ``4 * n_embd`` over config values (names, integers, + - * // only)."""
    import ast as pyast

    def ev(node):
        if isinstance(node, pyast.Expression):
            return ev(node.body)
        if isinstance(node, pyast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, pyast.Name):
            v = config.get(node.id)
            if not isinstance(v, int):
                raise ValueError(node.id)
            return v
        if isinstance(node, pyast.BinOp):
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, pyast.Add):
                return a + b
            if isinstance(node.op, pyast.Sub):
                return a - b
            if isinstance(node.op, pyast.Mult):
                return a * b
            if isinstance(node.op, pyast.FloorDiv) and b:
                return a // b
        raise ValueError(pyast.dump(node))

    try:
        return ev(pyast.parse(expr, mode="eval"))
    except (ValueError, SyntaxError):
        return None


def _opt_value(v: A.Value) -> Any:
    return v.name if isinstance(v, A.Ident) else v.value


SEED_MAX = 2**63 - 1  # what torch.Generator.manual_seed takes for every seed this project derives


def _valid_seed(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= SEED_MAX


@dataclass
class _State:
    ir: ModelIR
    bag: DiagnosticBag
    sizes: dict[str, int]
    layer_map: list[LayerSource]
    config: dict[str, Any]
    ops: list[ResolvedOp] = field(default_factory=list)
    upcycled: tuple[int, int] | None = None  # (experts, top_k)
    untie: bool = False
    seed: int = 0
    dtype: str | None = None
    noise: float = 0.0
    train: dict[str, Any] = field(default_factory=dict)
    alternatives: tuple[str, ...] = ()
    layer_summaries: dict[str, int] = field(default_factory=dict)  # scalar keys re-derived from layer_types

    @property
    def depth(self) -> int:
        return len(self.layer_map)

