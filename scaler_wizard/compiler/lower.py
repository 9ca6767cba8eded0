"""Lowering: a type-checked plan (:class:`ResolvedPlan`) -> verified surgery passes -> TensorProgram.

The pass manager (:func:`run_passes`) runs each pass's requires / apply / ensures and then one
shared check (:func:`check_state`); a failure names the pass and its predecessors, and
``compile --dump-after <pass>`` stops after any pass to show the program as it stands.

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
from scaler_wizard.diagnostics import UsageError
from scaler_wizard.compiler.passes.base import LowerState, Pass, PassError, initial_state, predicted_shape
from scaler_wizard.compiler.passes.depth import Depth
from scaler_wizard.compiler.resolved import APPROX, ResolvedPlan

__all__ = ["lower", "build_passes", "run_passes", "PassError"]

DEPTH_KINDS = ("insert", "duplicate", "stack")


def build_passes(plan: ResolvedPlan) -> list[Pass]:
    """One pass per width / upcycle statement (the method's :meth:`lowering`), in plan order, then
    one `depth` pass for the final layer map when it is not the identity."""
    passes: list[Pass] = []
    depth_ops = []
    upcycled = None
    for op in plan.ops:
        if op.kind in DEPTH_KINDS:
            depth_ops.append(op)
            continue
        if op.kind not in ("widen", "upcycle", "extend"):
            raise PassError(op.kind, f"unknown op kind `{op.kind}`", before=[p.name for p in passes], statement=op.text)
        p = op.spec.lowering(op) if op.spec is not None else None
        if p is None:
            raise PassError(f"{op.kind}-{op.group}", f"growing `{op.group}` is not lowered yet",
                            before=[p.name for p in passes], statement=op.text)
        if op.kind == "widen" and upcycled is not None:
            raise PassError(p.name, "width growth after `upcycle` is not supported: put `widen` first",
                            before=[p.name for p in passes], statement=op.text)
        if op.kind == "upcycle":
            upcycled = op
        passes.append(p)
    identity = all(s.init == "original" and s.src == i for i, s in enumerate(plan.layer_map)) and \
        len(plan.layer_map) == plan.ir.num_layers
    if not identity:
        passes.append(Depth(plan.layer_map, depth_ops))
    return passes


def check_state(p: Pass, st: LowerState) -> None:
    """The pass manager's check after every pass, whatever the pass's own ``ensures`` does: every
    tensor built from an IR template has the shape the IR predicts at the current group sizes, every
    node has a positive shape and a known exactness class. A failure names the pass and the passes
    before it (:class:`PassError`)."""
    before = st.done[:-1] if st.done and st.done[-1].split("[")[0] == p.name else st.done
    fail = lambda msg: PassError(p.name, msg, before=before, statement=p.statement)  # noqa: E731
    for name, ts in st.tensors.items():
        if not all(isinstance(d, int) and d > 0 for d in ts.node.shape):
            raise fail(f"{name}: shape {ts.node.shape} after the pass")
        if ts.exactness not in P.EXACTNESS:
            raise fail(f"{name}: exactness `{ts.exactness}` is not one of {', '.join(P.EXACTNESS)}")
        if ts.info is not None and ts.axes:
            want = predicted_shape(ts, st.sizes)
            if tuple(ts.node.shape) != want:
                raise fail(f"{name}: built shape {ts.node.shape}, predicted {want}")


def pass_names(passes: list[Pass]) -> list[str]:
    """The names ``--dump-after`` accepts: ``widen-ffn[1]`` (the pass of statement 1) and ``depth``."""
    return [p.name + (f"[{p.op.index}]" if p.op is not None else "") for p in passes]


def run_passes(st: LowerState, passes: list[Pass], *, after=None) -> None:
    """Run ``passes`` in order (requires / apply / ensures, then :func:`check_state`); ``after(p, st)``
    is called after each (``--dump-after``). Raises :class:`PassError`."""
    for p in passes:
        p.run(st)
        check_state(p, st)
        if after is not None and after(p, st):
            return


def lower(plan: ResolvedPlan, *, stored: set[str] | None = None, input_dtypes: dict[str, str] | None = None,
          dump_after: str | None = None) -> P.TensorProgram:
    """Lower ``plan`` to a TensorProgram. ``stored``: tensor names present in the input checkpoint
    (chooses which member of a tied set is stored); ``dump_after``: stop after the pass of that name
    (``widen-ffn``: the first such pass, ``widen-ffn[1]``: statement 1's, ``depth``) and return the
    program as it stands then. Raises :class:`PassError`, or :class:`UsageError` for an unknown
    ``dump_after`` name (the message lists the plan's passes)."""
    st = initial_state(plan.ir, plan, stored)
    passes = build_passes(plan)
    stop = None
    if dump_after is not None:
        names = pass_names(passes)
        stop = next((p for p, n in zip(passes, names) if dump_after in (n, p.name)), None)
        if stop is None:
            raise UsageError(f"--dump-after: this plan has no pass `{dump_after}`; its passes: "
                             + (", ".join(names) or "none (the plan changes nothing)"))
    run_passes(st, passes, after=(lambda p, _st: p is stop) if stop is not None else None)
    prog = emit(st, plan, input_dtypes=input_dtypes)
    if stop is not None:
        prog.metadata["dumped_after"] = pass_names([stop])[0]
    return prog


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
