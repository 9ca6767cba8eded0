"""Predict shapes and costs of a model after growth, from its IR alone (no weights, no torch).

``predict_shapes`` gives every tensor's new shape from the new group sizes and the layer map;
``costs`` turns a set of shapes into parameters, FLOPs per token and memory figures. The same
prediction is the oracle that ``verify`` compares against the IR re-traced from the output.
"""

from __future__ import annotations

import os

from dataclasses import dataclass

from scaler_wizard.compiler.resolved import Costs, LayerSource
from scaler_wizard.ir.model_ir import ModelIR, TensorInfo
from scaler_wizard.ir.discovery.probe import axis_size  # noqa: F401 - one definition, re-exported

# Bytes per parameter to train with mixed precision and AdamW: bf16 weights (2) + bf16 grads (2)
# + fp32 master weights (4) + fp32 Adam first and second moments (8). Activations excluded.
TRAIN_BYTES_PER_PARAM = 16




def tensor_shape(t: TensorInfo, sizes: dict[str, int]) -> tuple[int, ...]:
    if not t.axes:
        return t.shape
    return tuple(axis_size(a, sizes) for a in t.axes)


@dataclass(frozen=True)
class PredictedTensor:
    name: str  # template
    shape: tuple[int, ...]
    count: int  # how many layers have it (1 for globals)
    kind: str
    sublayer: str | None
    is_expert: bool = False  # one copy per expert (count already multiplied by experts)


def predict_shapes(
    ir: ModelIR,
    sizes: dict[str, int],
    layer_map: tuple[LayerSource, ...],
    *,
    upcycle_experts: int = 0,
) -> list[PredictedTensor]:
    """Shapes of every tensor of the grown model.

    ``sizes`` maps group name -> new size. ``layer_map`` is the final depth map. When
    ``upcycle_experts`` > 0, the dense MLP tensors become that many expert copies plus a router.
    """
    out: list[PredictedTensor] = []
    hidden = sizes.get("hidden", ir.groups["hidden"].size if "hidden" in ir.groups else 0)
    for t in ir.tensors:
        shape = tensor_shape(t, sizes)
        if t.layers is None:
            count = 1
        else:
            have = set(t.layers)
            count = sum(1 for src in layer_map if src.src in have)
        if upcycle_experts and t.layers is not None and t.sublayer == "mlp" and t.kind in ("weight", "bias"):
            out.append(PredictedTensor(t.name, shape, count * upcycle_experts, t.kind, t.sublayer, True))
        else:
            out.append(PredictedTensor(t.name, shape, count, t.kind, t.sublayer))
    if upcycle_experts:
        out.append(
            PredictedTensor("{i}:upcycle-router", (upcycle_experts, hidden), len(layer_map), "router", "moe")
        )
    return out


def _tied_duplicates(ir: ModelIR) -> set[str]:
    return {n for s in ir.tied for n in s[1:]}


MAX_GROWTH = 64  # one size policy for every statement: a plan may grow the parameters at most this much


def machine_memory_bytes() -> int | None:
    """Physical memory of this machine in bytes (``sysconf``, else psutil), or None when it cannot
    be read. ``sysconf`` first: importing psutil costs about 20 ms of every check and apply."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # psutil missing or no /proc: the check is skipped, not failed
        return None


def costs(
    ir: ModelIR,
    shapes: list[PredictedTensor],
    sizes: dict[str, int],
    num_layers: int,
    *,
    context: int,
    active_expert_fraction: float = 1.0,
    untied: bool = False,
) -> Costs:
    tied_dupes = set() if untied else _tied_duplicates(ir)
    params = 0
    non_embedding = 0
    matmul_active = 0.0
    largest = 0
    has_lm_head_tensor = False
    for p in shapes:
        numel = 1
        for d in p.shape:
            numel *= d
        largest = max(largest, numel)
        if p.kind == "lm_head":
            has_lm_head_tensor = True
        if p.name in tied_dupes:
            continue
        params += numel * p.count
        if p.kind not in ("embedding", "lm_head"):
            non_embedding += numel * p.count
        if p.kind in ("weight", "router", "lm_head") and len(p.shape) >= 2:
            frac = active_expert_fraction if p.is_expert else 1.0
            moe = ir.moe
            if moe is not None and p.sublayer == "moe" and p.kind == "weight":
                frac = moe.top_k / max(moe.num_experts, 1)
            matmul_active += numel * p.count * frac
    vocab = sizes.get("vocab", ir.groups["vocab"].size if "vocab" in ir.groups else 0)
    hidden = sizes.get("hidden", ir.groups["hidden"].size if "hidden" in ir.groups else 0)
    if not has_lm_head_tensor or any(p.kind == "lm_head" and p.name in tied_dupes for p in shapes):
        # Tied head: the logits matmul still costs vocab x hidden per token.
        matmul_active += vocab * hidden
    attn_width = 0
    if ir.attention is not None:
        attn_width = sizes.get("heads", ir.attention.heads) * sizes.get("head_dim", ir.attention.head_dim)
    # QK^T and AV: 2 matmuls of (context x attn_width) per token per layer, 2 FLOPs per MAC.
    attention_flops = 2 * 2 * num_layers * context * attn_width
    flops = int(2 * matmul_active + attention_flops)
    # Streaming apply: the writer streams each tensor into its shard file as it is computed, so
    # what is held is one output tensor and its inputs in fp32 (bounded by 3 x the largest tensor),
    # whatever the model size. The interpreter and torch themselves (~0.3 GB) are not counted.
    apply_peak = 3 * largest * 4
    return Costs(
        params=params,
        params_non_embedding=non_embedding,
        flops_per_token=flops,
        context=context,
        apply_peak_bytes=apply_peak,
        train_bytes=params * TRAIN_BYTES_PER_PARAM,
    )


def identity_layer_map(num_layers: int) -> tuple[LayerSource, ...]:
    return tuple(LayerSource(i) for i in range(num_layers))


def original_sizes(ir: ModelIR) -> dict[str, int]:
    return {name: g.size for name, g in ir.groups.items()}


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M'. Bytes (unit='B') use binary prefixes."""
    if unit == "B":
        for suffix in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
            if abs(n) < 1024 or suffix == "PiB":
                return f"{n:.0f} {suffix}" if suffix == "B" else f"{n:.2f} {suffix}"
            n /= 1024
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"
