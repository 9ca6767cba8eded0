"""Growth schedules: ``at step <N> [optimizer=carry|reset] [rewarm=<steps>] { <growth statements> }``.

A plan's stages run during ``scaler-wizard train``: after optimizer step ``N`` the trainer applies
the stage's statements to the live model (see ``scaler_wizard.runtime.live_growth``) and step
``N + 1`` trains the grown model. Each stage is type-checked by the ordinary type checker against
the model *as grown by the stages before it* (the first stage: the model the run starts from), so
its diagnostics point into the stage. Growth statements outside any stage keep their meaning
(``apply`` executes them before training; ``train`` expects MODEL_DIR to be that result).

Stage options (the header's ``key=value`` pairs):

* ``optimizer = carry`` (default): AdamW's moments are mapped through the stage's program;
  ``reset``: the grown model starts with a fresh optimizer state.
* ``rewarm = <steps>`` (default 0): the learning rate ramps linearly from 0 to the schedule's value
  over that many steps after the growth, then follows the schedule.

Codes: SW320 stage steps do not increase; SW321 a stage step outside the recipe's steps;
SW322 an unknown stage option, one given twice, or a bad value; SW620 (warning) a stage without
statements; SW621 (warning) a rewarm that lasts past the end of the run.
Random generators of stage ``k`` (1-based) draw with seed ``plan seed + k`` so that two stages never
repeat each other's noise.

FLOPs: training FLOPs per token are ``3 x`` the compiler's forward FLOPs per token
(``compiler/predict.py``: 2 x matmul parameters + attention at the context; backward = 2 x forward,
Kaplan et al. 2020), at the recipe's sequence length.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from scaler_wizard.compiler.resolved import ResolvedPlan
from scaler_wizard.diagnostics import Diagnostic, PlanError
from scaler_wizard.grammar import ast as A

OPTIMIZER_MODES = ("carry", "reset")
STAGE_OPTIONS = ("optimizer", "rewarm")
TRAIN_FLOPS_FACTOR = 3  # forward + backward (2 x forward) per token


@dataclass(frozen=True)
class ResolvedStage:
    """One resolved stage: ``rp`` grows the model of the previous stage (``rp.config_before``) into
    ``rp.config_after``; ``index`` is 1-based."""

    index: int
    step: int
    optimizer: str
    rewarm: int
    rp: ResolvedPlan
    span: A.Span
    text: str  # the stage's statements, one per line (for records and logs)

    def to_dict(self) -> dict[str, Any]:
        cb, ca = self.rp.costs_before, self.rp.costs_after
        return {"index": self.index, "step": self.step, "optimizer": self.optimizer, "rewarm": self.rewarm,
                "statements": self.text, "exactness": self.rp.exactness,
                "config_diff": {k: list(v) for k, v in self.rp.config_diff().items()},
                "params": {"before": cb.params, "after": ca.params},
                "flops_per_token": {"before": cb.flops_per_token, "after": ca.flops_per_token,
                                    "context": ca.context}}


def stages_of(plan: A.Plan) -> list[A.Stage]:
    return [s for s in plan.statements if isinstance(s, A.Stage)]


def without_stages(plan: A.Plan) -> A.Plan:
    """The plan minus its ``at step`` blocks (what ``apply`` executes)."""
    return dataclasses.replace(plan, statements=tuple(s for s in plan.statements if not isinstance(s, A.Stage)))


def _fail(diags, sources) -> PlanError:
    err = PlanError(diags)
    err.sources = sources
    return err


def _options(stage: A.Stage, diags: list[Diagnostic]) -> tuple[str, int]:
    mode, rewarm = "carry", 0
    seen: set[str] = set()
    for o in stage.options:
        key, v = o.key.name, o.value
        if key in seen and key in STAGE_OPTIONS:
            diags.append(Diagnostic("SW322", f"stage option `{key}` is given twice", o.span,
                                    help="write each option once"))
        seen.add(key)
        raw = getattr(v, "value", getattr(v, "name", v))
        if key == "optimizer":
            if raw not in OPTIMIZER_MODES:
                diags.append(Diagnostic("SW322", f"`optimizer` must be carry or reset, got `{raw}`", o.span,
                                        help="optimizer=carry maps AdamW's moments; optimizer=reset starts afresh"))
            else:
                mode = raw
        elif key == "rewarm":
            if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
                diags.append(Diagnostic("SW322", f"`rewarm` must be a whole number of steps >= 0, got `{raw}`",
                                        o.span))
            else:
                rewarm = raw
        else:
            from scaler_wizard.diagnostics import suggest

            hint = suggest(key, STAGE_OPTIONS)
            diags.append(Diagnostic("SW322", f"unknown stage option `{key}`", o.key.span,
                                    help=(f"did you mean `{hint}`? " if hint else "")
                                    + "stage options: optimizer=carry|reset, rewarm=<steps>"))
    return mode, rewarm


def resolve_stages(plan: A.Plan, sources: dict[str, str], base: str | dict[str, Any], *,
                   total_steps: int | None = None, context: int = 2048,
                   use_cache: bool = True) -> tuple[ResolvedStage, ...]:
    """Type-check every stage of ``plan`` in order, each against the model grown by the ones before
    (``base``: the model the run starts from, a model reference or a config dict).

    Raises PlanError (SW32x, or the type checker's codes positioned inside the failing stage).
    ``total_steps`` (the recipe's ``steps``), when given, bounds the stage steps."""
    from scaler_wizard.compiler.frontend import check_parsed

    stages = stages_of(plan)
    if not stages:
        return ()
    diags: list[Diagnostic] = []
    prev: A.Stage | None = None
    for s in stages:
        n = s.step.value
        if prev is not None and n <= prev.step.value:
            diags.append(Diagnostic("SW320", f"stage steps must increase: step {n} comes after step {prev.step.value}",
                                    s.step.span, help="order the `at step` blocks by step, one block per step"))
        if n < 1 or (total_steps is not None and n >= total_steps):
            bound = f"1 .. {total_steps - 1}" if total_steps is not None else ">= 1"
            diags.append(Diagnostic("SW321", f"stage step {n} is outside the training run (steps {bound})",
                                    s.step.span, help="growth before training is a statement outside `at step` "
                                                      "(applied by `apply`); a stage at the last step or later never trains"))
        _, rewarm = _options(s, diags)
        if total_steps is not None and rewarm and n + rewarm > total_steps:
            diags.append(Diagnostic("SW621", f"`rewarm={rewarm}` outlasts the run: the learning rate is still "
                                    f"ramping up when training ends at step {total_steps}", s.span,
                                    severity="warning", help=f"at most rewarm={max(total_steps - n, 0)} here"))
        if not s.statements:
            diags.append(Diagnostic("SW620", f"the stage at step {n} has no growth statements", s.span,
                                    severity="warning"))
        prev = s
    errors = [d for d in diags if d.severity == "error"]
    if errors:
        raise _fail(errors, sources)
    settings = tuple(st for st in plan.statements if isinstance(st, (A.SeedStmt, A.NoiseStmt)))
    out: list[ResolvedStage] = []
    model: str | dict[str, Any] = base
    for k, s in enumerate(stages, start=1):
        mode, rewarm = _options(s, [])
        sub = A.Plan(statements=settings + tuple(s.statements), file=plan.file, source=plan.source)
        rp = check_parsed(sub, sources, model=model, context=context, use_cache=use_cache)
        rp = dataclasses.replace(rp, seed=rp.seed + k)
        for op in rp.ops:  # the live run rebuilds the model with its own class: a class change cannot happen there
            if op.config_patch.get("model_type") not in (None, rp.config_before.get("model_type")):
                raise _fail([Diagnostic(
                    "SW323", f"`{op.text}` inside a stage changes the model class "
                    f"({rp.config_before.get('model_type')} -> {op.config_patch['model_type']}), which a live "
                    "training run cannot do", op.span,
                    help="upcycle before training (a statement outside `at step`, applied by `apply`), then train "
                         "the result")], sources)
        mine = tuple(d for d in diags if d.severity == "warning" and s.span.start <= d.span.start < s.span.end)
        if mine:
            rp = dataclasses.replace(rp, warnings=rp.warnings + mine)
        text = "\n".join(sources.get(plan.file, plan.source)[st.span.start:st.span.end] for st in s.statements)
        out.append(ResolvedStage(k, s.step.value, mode, rewarm, rp, s.span, text))
        model = dict(rp.config_after)
    return tuple(out)


def stages_for_run(plan_path: str, model: str | dict[str, Any], *, steps: int, seq_len: int) -> tuple[ResolvedStage, ...]:
    """The `at step` stages of the plan file ``plan_path`` resolved for a training run that starts from
    ``model`` (MODEL_DIR) and lasts ``steps`` steps, FLOPs at ``seq_len``; () when it has none.
    Raises PlanError (with ``.sources``) for a bad stage."""
    from scaler_wizard.compiler.frontend import parse_plan_file

    plan, sources = parse_plan_file(plan_path)
    if not stages_of(plan):
        return ()
    return resolve_stages(plan, sources, model, total_steps=steps, context=seq_len)


def compile_stage(stage: ResolvedStage, stored: set[str] | None = None):
    """The stage's TensorProgram, lowered exactly as ``apply`` lowers a plan (``stored``: the tensor
    names the live model would store, to pick the stored member of a tied set)."""
    from scaler_wizard.compiler.conform import conform
    from scaler_wizard.compiler.lower import lower

    rp = stage.rp
    prog = lower(rp, stored=stored)
    rp2 = conform(rp, prog=prog)
    if rp2.config_after != rp.config_after or rp2.config_before != rp.config_before:
        prog.config_patch = {k: after for k, (_, after) in rp2.config_diff().items()}
    prog.metadata["plan"] = stage.text
    return prog, rp2


def train_flops_per_token(flops_per_token_forward: int) -> int:
    return TRAIN_FLOPS_FACTOR * int(flops_per_token_forward)


def schedule_flops(base_forward_flops: int, stages: tuple[ResolvedStage, ...], *, steps: int,
                   tokens_per_step: int) -> dict[str, Any]:
    """Total training FLOPs of the run: per segment between growths, steps x tokens per step x
    ``3 x`` forward FLOPs per token of the model trained in that segment."""
    segs, start, fpt = [], 0, base_forward_flops
    for st in stages:
        segs.append({"from_step": start, "to_step": st.step, "flops_per_token": fpt})
        start, fpt = st.step, st.rp.costs_after.flops_per_token
    segs.append({"from_step": start, "to_step": steps, "flops_per_token": fpt})
    total = 0
    for s in segs:
        s["flops"] = (s["to_step"] - s["from_step"]) * tokens_per_step * train_flops_per_token(s["flops_per_token"])
        total += s["flops"]
    return {"segments": segs, "total_flops": total, "tokens_per_step": tokens_per_step}
