"""Growing a live training run: a stage's tensor program executed in memory over the model's state
dict, and the AdamW state carried through the same program.

In-memory execution
-------------------
:func:`execute_in_memory` walks the same :class:`~scaler_wizard.compiler.program.TensorProgram`
that ``scaler-wizard apply`` streams to disk (same nodes, same fp32 arithmetic, same seeded
generators, so the values equal ``apply``'s output bit for bit for fp32 models), reading its
``Load`` leaves from a ``{name: tensor}`` dict instead of a checkpoint and freeing every
intermediate value at its last use. :func:`grow_model` rebuilds the model from the grown config
(the real ``transformers`` class) and loads the outputs into it.

How an op maps the gradient (the derivation)
--------------------------------------------
Every op of a growth program is affine in the loaded tensors: moves (slice, index, tile, concat,
reshape, permute), constant scalings (scale, mul_axis, neg, mul by a generated constant), sums and
generators (zeros, full, random, zero-sum noise: constants). Write the grown parameters as
``W' = A W + c`` with ``A`` the linear part. :func:`linear_map` recovers, for every element ``j``
of every output, the single source element ``src(j)`` and the coefficient ``a_j`` with
``W'_j = a_j W_src(j) + c_j`` -- or marks ``j`` as *new* (no source: a generated value) or
*mixed* (a sum of several sources, or a product of two loaded values: no single-source form).

An **exact** growth is function preserving for every ``W``: ``L'(A W + c) = L(W)``. By the chain
rule the original gradient is ``g = A^T g'`` (``g'`` the grown model's gradient at the grown
point): for each original element ``i``, ``g_i = sum_{j: src(j)=i} a_j g'_j`` over its copies ``j``.
Tensors the program marks ``new`` (a whole new layer, even one built from copies) start at zero
and are not counted as copies: in an exact growth a new tensor that copies old values sits behind
a zeroed output (an identity layer's zero ``o_proj``/``down_proj``), so its gradient at the growth
is zero and drops out of the sum. Per element of the other outputs:

1. **One copy** (unchanged tensors, the old part of zero-padded or LEMON-scaled widening, the old
   layers around inserted identity layers): the sum has one term, so ``g'_j = g_i / a_j`` exactly.
2. **Split copies** -- copies whose coefficients sum to one, ``sum_k a_k = 1`` (the fan-out side
   of Net2Net / ``dup`` / hidden ``tile``, whatever the split): the weight multiplies a unit whose
   copies all carry the original unit's activation (the fan-in side copies it exactly, that is
   what makes the growth exact), so each copy's gradient is the original's: ``g'_j = g_i``.
3. **Plain duplicates** (the fan-in side, ``a_k = 1`` for n copies): ``g'_j = alpha_k g_i`` with
   ``alpha_k`` the split of the *paired* fan-out copy, which lives in another tensor -- not
   derivable from this element alone (and with zero-sum noise on the fan-out, not proportional to
   ``g_i`` at all). Carried by the least-norm solution of ``A^T g' = g``,
   ``g'_j = (a_j / sum_k a_k^2) g_i`` (``g_i / n``), and *not claimed*.

Cases 1 and 2 are what the map *claims*; the tests measure them (``tests/test_live_growth.py``:
one backward pass of the grown model equals the mapped gradient of the original to 1e-5 relative
on every claimed element, for hidden, ffn, heads and depth growth; about 40-65 % of the grown
parameters' elements are claimed, the rest are new units or plain duplicates).

Adam's moments follow the map: ``exp_avg`` is a linear combination of past gradients, so it maps
like a gradient, ``m'_j = f_j m_i``; ``exp_avg_sq`` is a combination of squared gradients, so it
maps with the squared factor, ``v'_j = f_j^2 v_i`` (exact for claimed elements:
``(f g)^2 = f^2 g^2`` step by step). New elements start at zero in both; ``step`` is kept, so bias
correction continues where it was. Adam's step ``m / sqrt(v)`` is invariant to the factor, so every
copy of a unit, claimed or not, takes the original unit's step direction at first; the uneven
split or the symmetry-breaking noise makes the copies' gradients differ and they diverge (tested).
For **approximate** ops (``stack``, Net2Net with free noise) ``g = A^T g'`` does not hold; the same
rules are applied (for ``stack x2``: old layers keep their moments, the new copies start at zero)
and nothing is claimed. *Mixed* elements have no derived map: ``optimizer = carry`` is refused for
them (:class:`CarryError`), ``reset`` starts them at zero.

The growth record follows the stage: see :func:`compose_record`.

No torch import at module level is needed by callers that only inspect programs, but this module
imports torch (it runs inside training).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from scaler_wizard.compiler.program import (
    Add, Cast, EvalContext, ExactSplit, Full, Load, Mul, MulAxis, Neg, Node, Random,
    Scale, TensorProgram, ZeroSumNoise, Zeros, _postorder, dtype_name, release_last_uses, storage_dtypes,
    torch_dtype, use_counts,
)
from scaler_wizard.runtime.growth_record import GrowthRecord, TensorGrowth

NEW, MIXED = -1, -2
from scaler_wizard.runtime.tiles import MOVES as _MOVES  # ops that only move values
_GENERATORS = (Zeros, Full, Random, ZeroSumNoise)


class LiveGrowthError(ValueError):
    """A stage cannot be applied to the live run (bad state, shapes the program does not expect)."""


class CarryError(LiveGrowthError):
    """``optimizer = carry`` for an output whose elements have no derived moment map."""


# --------------------------------------------------------------------------- in-memory executor
def execute_in_memory(program: TensorProgram, state: dict[str, torch.Tensor], *,
                      dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
    """Run ``program`` over ``state`` (name -> tensor, e.g. a model's state dict) in memory.

    Returns ``{output name: tensor}`` in program order, computed in fp32 exactly as
    ``runtime.execute.execute`` computes them, cast to ``dtype`` (None: the output's ``Cast`` dtype or
    its first input's dtype). Values are freed at their last use, so what is held beyond the
    outputs is the working set of one output. Raises :class:`LiveGrowthError` when a ``Load`` names a
    tensor ``state`` lacks or has another shape."""
    bad = []
    for name, load in program.inputs().items():
        if name not in state:
            bad.append(f"{name}: missing")
        elif tuple(state[name].shape) != tuple(load.shape):
            bad.append(f"{name}: program expects {tuple(load.shape)}, the model has {tuple(state[name].shape)}")
    if bad:
        raise LiveGrowthError("the stage's program does not fit the model being trained: " + "; ".join(bad[:4]))
    ctx = EvalContext(seed=program.seed, loader=lambda n: state[n].detach())
    order: list[Node] = []
    seen: set[str] = set()
    for out in program.outputs.values():
        _postorder(out.node, seen, order)
    uses = use_counts(order)
    roots: dict[str, list[str]] = {}
    for name, out in program.outputs.items():
        roots.setdefault(out.node.digest, []).append(name)
    want: dict[str, torch.dtype] = {}
    for name, out in program.outputs.items():
        n = out.node
        want[name] = dtype
        if isinstance(n, Cast):
            want[name] = torch_dtype(n.dtype)
        elif dtype is None:
            first = next((x for x in _leaves(n) if isinstance(x, Load)), None)
            want[name] = state[first.name].dtype if first is not None else torch.float32
    # nodes that round to the stored dtype (fan-out shares, ExactSplit) see the dtype of their output
    sdts = storage_dtypes((out.node, _dtype_name_or_none(want[name])) for name, out in program.outputs.items())
    cache: dict[str, torch.Tensor] = {}
    res: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for n in order:
            sdt = sdts.get(n.digest)
            ctx.storage_dtype = torch_dtype(sdt) if sdt else None
            val = n.compute([cache[c.digest] for c in n.children()], ctx)
            release_last_uses(n.children(), uses, cache)
            for name in roots.get(n.digest, []):
                res[name] = val.to(want[name]).clone() if val.is_floating_point() else val.clone()
            if uses.get(n.digest, 0) > 0:
                cache[n.digest] = val
    return {name: res[name] for name in program.outputs}


def _dtype_name_or_none(dt) -> str | None:
    try:
        return dtype_name(dt)
    except ValueError:  # a dtype programs do not name (no node rounds to it)
        return None


def _leaves(node: Node):
    stack = [node]
    while stack:
        n = stack.pop()
        if not n.children():
            yield n
        stack.extend(reversed(n.children()))


# --------------------------------------------------------------------------- the linear map
@dataclass
class ElementMap:
    """For one output tensor: per element the source (input name index, flat index) and coefficient."""

    src: torch.Tensor  # int64, output shape: global source index, NEW (-1) or MIXED (-2)
    coef: torch.Tensor  # float64, output shape


@dataclass
class LinearMap:
    inputs: list[str]  # input tensor names, in the order their global indices are laid out
    offsets: dict[str, int]  # input name -> first global index
    shapes: dict[str, tuple[int, ...]]
    outputs: dict[str, ElementMap] = field(default_factory=dict)

    def mixed_outputs(self) -> list[str]:
        return [n for n, m in self.outputs.items() if bool((m.src == MIXED).any())]


def _combine_add(a, b):
    sa, ca, ka, sb, cb, kb = torch.broadcast_tensors(a[0], a[1], a[2], b[0], b[1], b[2])
    src = torch.where(sa >= 0, sa, sb)
    coef = torch.where(sa >= 0, ca, cb)
    both = (sa >= 0) & (sb >= 0)
    same = both & (sa == sb)
    coef = torch.where(same, ca + cb, coef)
    src = torch.where(both & ~same, torch.full_like(src, MIXED), src)
    src = torch.where((sa == MIXED) | (sb == MIXED), torch.full_like(src, MIXED), src)
    return src, coef, ka + kb


def _combine_mul(a, b):
    sa, ca, ka, sb, cb, kb = torch.broadcast_tensors(a[0], a[1], a[2], b[0], b[1], b[2])
    # an element is coef*W + const; a product is affine only when one factor is a constant
    src = torch.where(sa >= 0, sa, sb)
    coef = torch.where(sa >= 0, ca * kb, cb * ka)
    src = torch.where(((sa >= 0) & (sb >= 0)) | (sa == MIXED) | (sb == MIXED), torch.full_like(src, MIXED), src)
    return src, coef, ka * kb


def linear_map(program: TensorProgram) -> LinearMap:
    """Per output element: ``W'_j = coef_j * W_src(j) + const_j`` (see the module docstring), found by
    evaluating the program on (source index, coefficient, constant) triples instead of values.
    Memory: three numbers per element of the largest values alive (fine for the models a live run
    trains; the out-of-core executor is for checkpoints that do not fit)."""
    inputs = program.inputs()
    names = list(inputs)
    offsets, shapes, off = {}, {}, 0
    for n in names:
        offsets[n], shapes[n] = off, tuple(inputs[n].shape)
        off += inputs[n].numel
    lm = LinearMap(names, offsets, shapes)
    ctx = EvalContext(seed=program.seed)
    order: list[Node] = []
    seen: set[str] = set()
    for out in program.outputs.values():
        _postorder(out.node, seen, order)
    uses = use_counts(order)
    roots: dict[str, list[str]] = {}
    for name, out in program.outputs.items():
        roots.setdefault(out.node.digest, []).append(name)
    cache: dict[str, tuple] = {}
    for n in order:
        ins = [cache[c.digest] for c in n.children()]
        if isinstance(n, Load):
            k = n.numel
            val = (torch.arange(offsets[n.name], offsets[n.name] + k, dtype=torch.int64).reshape(n.shape),
                   torch.ones(n.shape, dtype=torch.float64), torch.zeros(n.shape, dtype=torch.float64))
        elif isinstance(n, _GENERATORS):
            v = n.compute([], ctx).double()
            val = (torch.full(n.shape, NEW, dtype=torch.int64), torch.zeros(n.shape, dtype=torch.float64), v)
        elif isinstance(n, _MOVES):
            val = tuple(n.compute([x[i] for x in ins], ctx) for i in range(3))
        elif isinstance(n, (Cast, ExactSplit)):  # ExactSplit moves values by a rounding error only
            val = ins[0]
        elif isinstance(n, Scale):
            val = (ins[0][0], ins[0][1] * float(n.factor), ins[0][2] * float(n.factor))
        elif isinstance(n, MulAxis):
            val = (ins[0][0], n.compute([ins[0][1]], ctx), n.compute([ins[0][2]], ctx))
        elif isinstance(n, Neg):
            val = (ins[0][0], -ins[0][1], -ins[0][2])
        elif isinstance(n, Add):
            val = _combine_add(ins[0], ins[1])
        elif isinstance(n, Mul):
            val = _combine_mul(ins[0], ins[1])
        else:  # an op this map does not know: no claim on any element
            val = (torch.full(n.shape, MIXED, dtype=torch.int64), torch.zeros(n.shape, dtype=torch.float64),
                   torch.zeros(n.shape, dtype=torch.float64))
        release_last_uses(n.children(), uses, cache)
        for name in roots.get(n.digest, []):
            lm.outputs[name] = ElementMap(val[0].contiguous(), val[1].contiguous())
        if uses.get(n.digest, 0) > 0:
            cache[n.digest] = val
    return lm


@dataclass
class MomentMap:
    """``moment'_j = factor_j * moment[src_j]`` (``exp_avg``) and ``factor_j**2 * ...`` (``exp_avg_sq``)."""

    lm: LinearMap
    factor: dict[str, torch.Tensor]  # output -> float64 factor a_j / d_i (0 where no claim)
    claimed: dict[str, torch.Tensor]  # output -> bool: elements the map claims (a single source, d > 0)

    def predict(self, values: dict[str, torch.Tensor], squared: bool = False) -> dict[str, torch.Tensor]:
        """Map per-input tensors (gradients, ``exp_avg``; ``squared``: ``exp_avg_sq``) to the outputs.
        Inputs missing from ``values`` count as zero (frozen parameters have no moments)."""
        flat = torch.zeros(sum(torch.Size(s).numel() for s in self.lm.shapes.values()), dtype=torch.float64)
        for n in self.lm.inputs:
            if n in values and values[n] is not None:
                o = self.lm.offsets[n]
                flat[o:o + values[n].numel()] = values[n].detach().reshape(-1).double().cpu()
        out = {}
        for name, em in self.lm.outputs.items():
            f = self.factor[name]
            f = f * f if squared else f
            idx = em.src.clamp(min=0)
            out[name] = torch.where(self.claimed[name], f * flat[idx], torch.zeros((), dtype=torch.float64))
        return out


def moment_map(program: TensorProgram, lm: LinearMap | None = None) -> MomentMap:
    """The moment map of the module docstring: per output element the factor ``f_j`` with
    ``g'_j = f_j g_src(j)``; ``claimed`` marks the elements where the derivation proves it."""
    lm = lm if lm is not None else linear_map(program)
    total = sum(torch.Size(s).numel() for s in lm.shapes.values())
    count = torch.zeros(total, dtype=torch.int64)
    asum = torch.zeros(total, dtype=torch.float64)
    asq = torch.zeros(total, dtype=torch.float64)
    for name, em in lm.outputs.items():
        if program.outputs[name].status == "new":
            continue  # new tensors start at zero and take nothing from their source
        ok = (em.src >= 0) & (em.coef != 0)
        src, a = em.src[ok], em.coef[ok]
        count.index_add_(0, src, torch.ones(len(src), dtype=torch.int64))
        asum.index_add_(0, src, a)
        asq.index_add_(0, src, a * a)
    factor, claimed = {}, {}
    for name, em in lm.outputs.items():
        if program.outputs[name].status == "new":
            factor[name] = torch.zeros(em.src.shape, dtype=torch.float64)
            claimed[name] = torch.zeros(em.src.shape, dtype=torch.bool)
            continue
        ok = (em.src >= 0) & (em.coef != 0)
        i = em.src.clamp(min=0)
        n = torch.where(ok, count[i], torch.zeros_like(em.src))
        a = torch.where(ok, em.coef, torch.ones_like(em.coef))
        single = ok & (n == 1)
        split = ok & (n > 1) & ((asum[i] - 1.0).abs() < 1e-9)
        least_norm = a / torch.where(ok, asq[i], torch.ones_like(a))
        factor[name] = torch.where(single, 1.0 / a, torch.where(split, torch.ones_like(a),
                                                                torch.where(ok, least_norm, torch.zeros_like(a))))
        # approximate outputs: g = A^T g' does not hold, the map is a carry rule there, not a claim
        claimed[name] = (single | split) & (program.outputs[name].exactness != "approx")
    return MomentMap(lm, factor, claimed)


# --------------------------------------------------------------------------- optimizer state
def grow_adam_state(mm: MomentMap, state: dict[str, dict[str, Any]], new_shapes: dict[str, tuple[int, ...]], *,
                    mode: str = "carry", outputs_of: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """AdamW state per parameter name (``{"step", "exp_avg", "exp_avg_sq"}``, as ``torch.optim.AdamW``
    keeps it) of the original model -> state of the grown model, named by ``new_shapes``' names.

    ``mode="carry"``: moments mapped by ``mm`` (new elements zero, ``step`` kept); raises
    :class:`CarryError` naming the outputs with *mixed* elements. ``mode="reset"``: empty state (AdamW
    starts afresh for every parameter). ``outputs_of`` maps a parameter name to the program output
    that holds it (tied aliases); default: the same name."""
    if mode == "reset":
        return {}
    if mode != "carry":
        raise ValueError(f"optimizer mode must be carry or reset, got {mode!r}")
    outputs_of = outputs_of or {}
    mixed = [n for n in mm.lm.mixed_outputs() if outputs_of.get(n, n) in new_shapes or n in new_shapes]
    if mixed:
        raise CarryError(
            "optimizer = carry: no derived moment map for " + ", ".join(mixed[:4])
            + (f" (and {len(mixed) - 4} more)" if len(mixed) > 4 else "")
            + " (an element there is a sum of several original elements or a product of two); "
            "use `optimizer = reset` for this stage")
    steps = [s["step"] for s in state.values() if "step" in s]
    step = steps[0].clone() if steps and torch.is_tensor(steps[0]) else (steps[0] if steps else None)
    m = mm.predict({n: s.get("exp_avg") for n, s in state.items()})
    v = mm.predict({n: s.get("exp_avg_sq") for n, s in state.items()}, squared=True)
    ref = next((s["exp_avg"] for s in state.values() if "exp_avg" in s), None)
    dt = ref.dtype if ref is not None else torch.float32
    out: dict[str, dict[str, Any]] = {}
    if step is None:  # the optimizer has not stepped yet: nothing to carry
        return out
    for name, shape in new_shapes.items():
        src = outputs_of.get(name, name)
        if src in m:
            em, ev = m[src].to(dt), v[src].to(dt)
        else:
            em = torch.zeros(shape, dtype=dt)
            ev = torch.zeros(shape, dtype=dt)
        if tuple(em.shape) != tuple(shape):
            raise LiveGrowthError(f"{name}: mapped state has shape {tuple(em.shape)}, the grown model {tuple(shape)}")
        out[name] = {"step": step.clone() if torch.is_tensor(step) else step, "exp_avg": em.contiguous(),
                     "exp_avg_sq": ev.clamp(min=0).contiguous()}
    return out


def optimizer_state_by_name(model, optimizer) -> dict[str, dict[str, Any]]:
    """The optimizer's per-parameter state keyed by every name the parameter has (tied aliases too)."""
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        st = optimizer.state.get(p)
        if st:
            out[name] = {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in st.items()}
    return out


def load_optimizer_state(model, optimizer, state: dict[str, dict[str, Any]]) -> None:
    """Install ``state`` (by parameter name) into ``optimizer`` built over ``model``'s parameters."""
    for name, p in model.named_parameters():
        if name in state and p.requires_grad:
            optimizer.state[p] = {k: (v.to(p.device) if torch.is_tensor(v) and v.dim() else v)
                                  for k, v in state[name].items()}


# --------------------------------------------------------------------------- model and record
def stored_names(model) -> set[str]:
    """State-dict names as ``save_pretrained`` would store them: one name per tied tensor (the first)."""
    seen, out = set(), set()
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.data_ptr(), tuple(t.shape)) if t.device.type != "meta" else (name,)
        if key in seen:
            continue
        seen.add(key)
        out.add(name)
    return out


def grow_model(model, program: TensorProgram, config_after: dict[str, Any]):
    """The grown model: ``program`` run in memory over ``model``'s state dict, loaded into a fresh
    instance of the same ``transformers`` class built from ``config_after``. The global torch RNG is
    left as it was (building the model draws its random init)."""
    from transformers import AutoConfig

    sd = model.state_dict()
    outs = execute_in_memory(program, sd, dtype=None)
    cfg_dict = dict(config_after)
    model_type = cfg_dict.pop("model_type", model.config.model_type)
    for k in ("transformers_version", "architectures", "_name_or_path"):
        cfg_dict.pop(k, None)
    cfg = AutoConfig.for_model(model_type, **cfg_dict)
    cfg.architectures = getattr(model.config, "architectures", None)
    cfg.use_cache = getattr(model.config, "use_cache", False)
    rng = torch.random.get_rng_state()
    try:
        new = type(model)._from_config(cfg, dtype=next(model.parameters()).dtype)
    finally:
        torch.random.set_rng_state(rng)
    missing, unexpected = new.load_state_dict(outs, strict=False)
    tied = _tied_names(new)
    missing = [m for m in missing if m not in tied and not _is_buffer(new, m)]
    if missing or unexpected:
        raise LiveGrowthError(f"the grown tensors do not fit {type(new).__name__} built from the grown config: "
                              f"missing {missing[:4]}, unexpected {list(unexpected)[:4]}")
    new.train(model.training)
    return new


def _tied_names(model) -> set[str]:
    by_ptr: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        by_ptr.setdefault(t.data_ptr(), []).append(name)
    return {n for names in by_ptr.values() if len(names) > 1 for n in names[1:]}


def _is_buffer(model, name: str) -> bool:
    return name in dict(model.named_buffers())


def compose_record(prev: GrowthRecord | None, program: TensorProgram, *, plan: str = "") -> GrowthRecord:
    """The growth record after a stage, relative to the model the run STARTED from.

    An output the stage copies unchanged keeps its previous status; a tensor the stage grows is
    ``grown`` with the region that still holds the run's original values (the stage's
    ``original_region`` when the previous status was ``original``; the previous region when it lies
    inside the stage's unchanged region, else none); a new tensor is ``new``; a tensor that was
    already ``new`` stays ``new``."""
    prev_t = prev.tensors if prev is not None else {}
    out: dict[str, TensorGrowth] = {}
    for name, o in program.outputs.items():
        node = o.node
        before = prev_t.get(name, TensorGrowth("original"))
        if o.status == "original":
            src = node.name if isinstance(node, Load) else name
            out[name] = prev_t.get(src, TensorGrowth("original"))
        elif o.status == "new" or before.status == "new":
            out[name] = TensorGrowth("new")
        else:  # grown
            region = o.original_region
            if before.status == "grown":
                pr = before.original_region
                # the earlier region keeps its coordinates when the stage kept the old values at the
                # front of every axis (as widening does) and the earlier region lies inside them
                region = pr if (pr is not None and region is not None and all(
                    ra == 0 and b <= rb for (a, b), (ra, rb) in zip(pr, region))) else None
            out[name] = TensorGrowth("grown", tuple(region) if region is not None else None)
    plan_text = ((prev.plan + "\n") if prev is not None and prev.plan else "") + plan
    return GrowthRecord(out, plan_text, prev.base_model if prev is not None else None)


# --------------------------------------------------------------------------- the training-loop hook
def refuse_engine(accelerator, stages) -> None:
    """Growing a live run needs every rank to hold the whole model and optimizer state (one process,
    or DDP). Sharded engines are refused before training starts (UsageError)."""
    from scaler_wizard.diagnostics import UsageError

    if not stages:
        return
    dist = str(accelerator.distributed_type)
    if accelerator.state.deepspeed_plugin is not None or dist.endswith("DEEPSPEED"):
        raise UsageError("`at step` growth stages are not supported under DeepSpeed yet (ZeRO partitions the "
                         "optimizer state; gathering and re-partitioning it is not implemented): run the schedule "
                         "in one process or under DDP (torchrun / accelerate launch without a DeepSpeed config)")
    if dist.endswith("FSDP"):
        raise UsageError("`at step` growth stages are not supported under FSDP (sharded parameters): run the "
                         "schedule in one process or under DDP")


def refuse_uncarried(stages) -> None:
    """``optimizer = carry`` needs a derived moment map for every grown tensor: a stage whose program
    builds an element from several original elements (``widen vocab ... mean``, ...) is refused before
    training starts (UsageError naming the stage and the tensors), not at its step."""
    from scaler_wizard.compiler.stages import compile_stage
    from scaler_wizard.diagnostics import UsageError

    for stage in stages:
        if stage.optimizer != "carry":
            continue
        prog, _ = compile_stage(stage)
        mixed = linear_map(prog).mixed_outputs()
        if mixed:
            raise UsageError(
                f"the stage at step {stage.step} (`{stage.text.strip()}`) cannot carry AdamW's moments: no derived "
                "moment map for " + ", ".join(mixed[:4]) + (f" (and {len(mixed) - 4} more)" if len(mixed) > 4 else "")
                + " (an element there is a sum of several original elements or a product of two); give that "
                "stage `optimizer=reset`")


def rewarm_lambda(base, stages):
    """LR multiplier of optimizer step index ``i`` (0-based; step ``i + 1``): the recipe's schedule
    ``base(i)``, times ``(step - N) / R`` for the ``R`` steps after a stage at step ``N`` with
    ``rewarm = R`` (a linear re-warmup from 0; the schedule continues unchanged after it)."""
    ramps = [(s.step, s.rewarm) for s in stages if s.rewarm > 0]

    def f(i: int) -> float:
        step, m = i + 1, base(i)
        for n, r in ramps:
            if n < step <= n + r:
                m *= (step - n) / r
        return m

    return f


def forward_flops(stage_or_none, *, after: bool) -> int | None:
    if stage_or_none is None:
        return None
    c = stage_or_none.rp.costs_after if after else stage_or_none.rp.costs_before
    return int(c.flops_per_token)


@dataclass
class GrowthResult:
    model: Any
    state: dict[str, dict[str, Any]]
    record: GrowthRecord
    params_before: int
    params_after: int
    claimed_fraction: float  # of the grown parameters' elements whose moments the derivation claims
    program: TensorProgram | None = None


def grow_live(model, optimizer, stage, record: GrowthRecord | None) -> GrowthResult:
    """Apply ``stage`` (a compiler ``ResolvedStage``) to the unwrapped ``model`` and its ``optimizer``:
    program lowered as ``apply`` lowers it, executed in memory, model rebuilt from the grown config,
    AdamW state mapped (``optimizer=carry``) or dropped (``reset``), growth record composed.
    Raises :class:`CarryError` / :class:`LiveGrowthError`."""
    from scaler_wizard.compiler.stages import compile_stage

    prog, rp2 = compile_stage(stage, stored=stored_names(model))
    config_after = dict(rp2.config_after)
    state = optimizer_state_by_name(model, optimizer) if stage.optimizer == "carry" else {}
    new = grow_model(model, prog, config_after)
    new_shapes = {n: tuple(p.shape) for n, p in new.named_parameters()}
    mm = moment_map(prog)
    new_state = grow_adam_state(mm, state, new_shapes, mode=stage.optimizer)
    claimed = sum(int(mm.claimed[n].sum()) for n in new_shapes if n in mm.claimed) if new_state else 0
    total = sum(torch.Size(s).numel() for s in new_shapes.values())
    rec = compose_record(record, prog, plan=stage.text)
    return GrowthResult(new, new_state, rec, sum(p.numel() for p in model.parameters()),
                        sum(p.numel() for p in new.parameters()), claimed / max(total, 1), prog)
