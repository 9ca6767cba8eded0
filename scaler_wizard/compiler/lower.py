"""Lowering: a type-checked plan (:class:`ResolvedPlan`) -> verified surgery passes -> TensorProgram.

The state is ``{concrete tensor name -> program node}`` (initially a ``Load`` of every input tensor),
the current group sizes and the layer map. Width / upcycle statements become one pass each, in plan
order; depth statements are folded by the type checker into one final layer map and lowered by a
single :class:`~scaler_wizard.compiler.passes.depth.Depth` pass at the end (new layers are functions
of old layers, so building them from the grown old layers gives the same model). Every pass checks
its preconditions and postconditions (see :mod:`scaler_wizard.compiler.passes.base`).

The program records, per output tensor, its status (new / grown / original), the region still
holding original values, its exactness and a one-line explanation; its config patch is the type
checker's ``config_after`` minus what did not change.
"""

from __future__ import annotations

from scaler_wizard.compiler import program as P
from scaler_wizard.compiler.passes.base import LowerState, Pass, PassError, initial_state
from scaler_wizard.compiler.passes.depth import Depth
from scaler_wizard.compiler.passes.upcycle import Upcycle
from scaler_wizard.compiler.passes.widen_experts import WidenExperts
from scaler_wizard.compiler.passes.widen_ffn import WidenFFN
from scaler_wizard.compiler.passes.widen_head_dim import WidenHeadDim
from scaler_wizard.compiler.passes.widen_heads import WidenHeads
from scaler_wizard.compiler.passes.widen_hidden import WidenHidden
from scaler_wizard.compiler.passes.widen_kv_heads import WidenKVHeads
from scaler_wizard.compiler.passes.widen_vocab import WidenVocab
from scaler_wizard.compiler.resolved import APPROX, ResolvedPlan

WIDTH_PASSES = {
    "hidden": WidenHidden,
    "ffn": WidenFFN,
    "heads": WidenHeads,
    "kv_heads": WidenKVHeads,
    "head_dim": WidenHeadDim,
    "experts": WidenExperts,  # approx: copies of old experts, router rows copied
    "vocab": WidenVocab,  # approx: new token rows are the mean row
}

__all__ = ["lower", "build_passes", "PassError"]


def build_passes(plan: ResolvedPlan) -> list[Pass]:
    passes: list[Pass] = []
    depth_ops = []
    upcycled = None
    for op in plan.ops:
        if op.kind == "widen":
            cls = WIDTH_PASSES.get(op.group)
            if cls is None:
                raise PassError(f"widen-{op.group}", f"growing `{op.group}` is not lowered yet",
                                before=[p.name for p in passes], statement=op.text)
            if upcycled is not None:
                raise PassError(cls.name, "width growth after `upcycle` is not supported: put `widen` first",
                                before=[p.name for p in passes], statement=op.text)
            passes.append(cls(op))
        elif op.kind == "upcycle":
            upcycled = op
            passes.append(Upcycle(op))
        elif op.kind in ("insert", "duplicate", "stack"):
            depth_ops.append(op)
        else:
            raise PassError(op.kind, f"unknown op kind `{op.kind}`", before=[p.name for p in passes], statement=op.text)
    identity = all(s.init == "original" and s.src == i for i, s in enumerate(plan.layer_map)) and \
        len(plan.layer_map) == plan.ir.num_layers
    if not identity:
        passes.append(Depth(plan.layer_map, depth_ops))
    return passes


def lower(plan: ResolvedPlan, *, stored: set[str] | None = None, input_dtypes: dict[str, str] | None = None) -> P.TensorProgram:
    """Lower ``plan`` to a TensorProgram. ``stored``: tensor names present in the input checkpoint
    (chooses which member of a tied set is stored); raises :class:`PassError`."""
    st = initial_state(plan.ir, plan, stored)
    for p in build_passes(plan):
        p.run(st)
    return emit(st, plan, input_dtypes=input_dtypes)


def _status(ts) -> str:
    if ts.new:
        return "new"
    return "grown" if ts.changed else "original"


def emit(st: LowerState, plan: ResolvedPlan, *, input_dtypes: dict[str, str] | None = None) -> P.TensorProgram:
    prog = P.TensorProgram(seed=plan.seed)
    for name, ts in st.tensors.items():
        node = ts.node
        if plan.dtype is not None:
            node = P.Cast(node, plan.dtype)
        status = _status(ts)
        if status == "original" and isinstance(ts.node, P.Load) and ts.node.name != name:
            status = "original"  # a layer moved to a new index keeps its values
        region = None
        if status == "grown" and ts.region is not None and len(ts.region) == len(node.shape):
            region = ts.region
        explain = "; ".join(ts.notes) if ts.notes else ("unchanged" if status == "original" else P.describe(node))
        exactness = ts.exactness if ts.exactness in P.EXACTNESS else APPROX
        prog.add(name, node, exactness=exactness, status=status, original_region=region, explain=explain)
    patch = {k: after for k, (before, after) in plan.config_diff().items()}
    if st.aliases and not st.untied:
        pass  # the tie is kept: the duplicate is not written (HF re-ties on load)
    prog.config_patch = patch
    prog.metadata = {
        "model": plan.model_ref,
        "model_type": plan.ir.model_type,
        "exactness": plan.exactness,
        "ops": [{"statement": o.text, "kind": o.kind, "group": o.group, "method": o.method,
                 "exactness": o.exactness, "reason": o.reason} for o in plan.ops],
        "passes": list(st.done),
        "layers": {"before": plan.ir.num_layers, "after": len(plan.layer_map),
                   "map": [[s.src, s.init] for s in plan.layer_map]},
        "tied": {a: k for a, k in st.aliases.items()},
        "untied": sorted(st.untied),
        "sizes": dict(st.sizes),
        "notes": list(st.notes),
        "symmetry_probes": [g[1:] for g in st.copies if all(n[0] in st.tensors for n in g[1:])],
    }
    return prog
