"""`extend context to <N> [linear | dynamic | yarn | llama3 | longrope | copy | interpolate] [k=v ...]`:
a longer context window.

RoPE models: the config's rope parameters (``rope_parameters`` / ``rope_scaling``, whichever the
config uses, flat or per layer type) and ``max_position_embeddings`` are rewritten the way the
installed transformers reads them (:func:`scaler_wizard.compiler.rope.extend_rope`); no tensor
changes. Learned absolute position tables (GPT-2's ``wpe``, OPT's, BERT's) grow to N rows
(:func:`~scaler_wizard.compiler.rope.table_row_map`): ``copy`` repeats the old rows, ``interpolate``
stretches them.

Exactness from the mathematics, on the original model's domain (sequences up to the old length L0,
the only positions both models define): ``dynamic`` (NTK scaling starts past L0), ``copy`` (old rows
untouched) and ``longrope attention_factor=1`` leave every output there unchanged: exact, and
``verify`` checks it at the exact tolerance; ``linear``, ``yarn``, ``llama3``, ``longrope`` and
``interpolate`` move every position: approx, drift reported. Positions past L0 are new in any case
(train them: ``train --curriculum``). Sources: transformers' ``modeling_rope_utils``; Chen et al.
2023 (position interpolation); bloc97 / emozilla (dynamic NTK); Peng et al. 2023 (YaRN); Meta's
Llama 3.1 (llama3); Ding et al. 2024 (LongRoPE).
"""

from __future__ import annotations

from dataclasses import dataclass

from scaler_wizard.compiler.methods.base import Method, option, register
from scaler_wizard.compiler.resolved import APPROX, EXACT


def position_table(ir, length_key: str):
    """(tensor name, length key, offset rows) of the learned absolute position table, or None for a
    model without one (RoPE, ALiBi). The table is the global embedding whose row axis is bound to
    ``length_key`` (GPT-2's ``n_positions``), or, where tracing could not bind it (OPT stores
    ``max_position_embeddings + 2`` rows), the global embedding with an unbound row axis of
    ``length + 0..2`` rows that is not the token embedding."""
    old = ir.config.get(length_key)
    if not isinstance(old, int):
        return None
    for t in ir.tensors:
        if t.layers is not None or len(t.shape) != 2 or not t.axes or t.kind != "embedding":
            continue
        ax = t.axes[0]
        if ax.role != "index":
            continue
        if length_key in ax.groups() or (not ax.groups() and 0 <= t.shape[0] - old <= 2):
            return t.name, length_key, t.shape[0] - old
    return None


@register
@dataclass(frozen=True)
class ExtendContext(Method):
    kind = "op"
    name = "extend"
    statement = "`extend context`"
    groups = ("context",)
    base = APPROX
    summary = ("longer context: RoPE parameters rewritten (linear, dynamic, yarn, llama3, longrope) or a learned "
               "position table grown (copy, interpolate); exact below the old length for dynamic / copy")
    source = ("transformers modeling_rope_utils; position interpolation (Chen et al., 2023); YaRN (Peng et al., "
              "2023); LongRoPE (Ding et al., 2024)")

    beta_fast: float | None = option("yarn: fast boundary of the correction range (transformers' default 32)",
                                     kind="nonneg")
    beta_slow: float | None = option("yarn: slow boundary of the correction range (default 1)", kind="nonneg")
    attention_factor: float | None = option("yarn / longrope: the cos/sin multiplier (default from the factor; "
                                            "longrope with 1 is exact below the old length)", kind="nonneg")
    truncate: bool | None = option("yarn: floor/ceil the correction range (default true)", kind="bool")
    low_freq_factor: float | None = option("llama3: low-frequency factor (default 1)", kind="nonneg")
    high_freq_factor: float | None = option("llama3: high-frequency factor (default 4)", kind="nonneg")

    def exactness(self, cx):
        """``cx.extension``: the :class:`~scaler_wizard.compiler.rope.Extension`."""
        ext = cx.extension
        if ext.exact_below >= ext.old_length:
            return EXACT, (f"{ext.reason}; positions past {ext.old_length} are new (the original model has none)")
        return APPROX, ext.reason

    def lowering(self, op):
        from scaler_wizard.compiler.passes.extend_context import ExtendContextPass

        return ExtendContextPass(op)
