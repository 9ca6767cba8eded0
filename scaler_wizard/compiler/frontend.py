"""The compiler's front half as one call: plan file -> AST -> IR -> resolved plan.

Shared by `check`, `explain`, `compile` and `apply`, and by the Python API.
"""

from __future__ import annotations

from dataclasses import replace

from scaler_wizard.diagnostics import Diagnostic, PlanError, UsageError
from scaler_wizard.compiler.resolved import ResolvedPlan
from scaler_wizard.grammar import ast as A


def _fail(diags: list[Diagnostic], sources: dict[str, str]) -> PlanError:
    err = PlanError(diags)
    err.sources = sources
    return err


def parse_plan_file(path: str) -> tuple[A.Plan, dict[str, str]]:
    from scaler_wizard.grammar import parse_file

    try:
        plan = parse_file(path)
    except PlanError as e:
        if not getattr(e, "sources", None):
            e.sources = {}
        raise
    return plan, {plan.file: plan.source}


_SETTINGS = {A.ModelStmt: "model", A.SeedStmt: "seed", A.NoiseStmt: "noise", A.DtypeStmt: "dtype",
             A.TrainStmt: "train"}


def duplicate_settings(plan: A.Plan) -> list[Diagnostic]:
    """A plan-wide setting (``model``, ``seed``, ``noise``, ``dtype``, ``train``) given twice is an
    error at the second, naming the first's position (no silent "last one wins")."""
    first: dict[str, A.Span] = {}
    out = []
    for st in plan.statements:
        what = _SETTINGS.get(type(st))
        if what is None:
            continue
        if what in first:
            f = first[what]
            out.append(Diagnostic("SW209", f"`{what}` is given twice", st.span,
                                  help=f"the first is at line {f.line}; keep one",
                                  notes=(f"first `{what}` at {f.file}:{f.line}:{f.col}",)))
        else:
            first[what] = st.span
    return out


def plan_relative(ref: str, plan: A.Plan) -> str:
    """A relative path in a plan names a file relative to the plan file (as `train "file"` does);
    hub ids and short names stay as written."""
    import os

    if not ref or os.path.isabs(ref) or not plan.file or plan.file.startswith("<"):
        return ref
    base = os.path.dirname(os.path.abspath(plan.file))
    cand = os.path.normpath(os.path.join(base, ref))
    if os.path.exists(cand) or ref.startswith(".") or ref.endswith((".gguf", ".json")):
        return cand
    return ref


def model_ref_for(plan: A.Plan, model: str | None, sources: dict[str, str]) -> str:
    if model:
        return model
    ref = plan.model_ref()
    if ref:
        return plan_relative(ref, plan)
    raise _fail(
        [
            Diagnostic(
                "SW208",
                "no model to check against",
                A.Span(line=1, col=1, end_line=1, end_col=1, file=plan.file),
                help='add `model "<hub id, local dir or .gguf>"` to the plan, or pass --model',
            )
        ],
        sources,
    )


def ir_for(ref: str, plan: A.Plan, sources: dict[str, str], *, use_cache: bool = True):
    from scaler_wizard.ir import model_ir_for
    from scaler_wizard.ir.errors import IRDiscoveryError

    stmt = next((s for s in plan.statements if isinstance(s, A.ModelStmt)), None)
    from_plan = stmt is not None and plan_relative(stmt.ref.value, plan) == ref
    try:
        return model_ir_for(ref, use_cache=use_cache)
    except UsageError as e:
        if not from_plan:
            raise
        where = f" (relative to the plan's directory)" if ref != stmt.ref.value else ""
        raise _fail([Diagnostic("SW402", f"cannot load model `{stmt.ref.value}`{where}: {e}", stmt.ref.span,
                                help="fix the `model` statement, or pass --model")], sources) from None
    except IRDiscoveryError as e:
        stmt = next((s for s in plan.statements if isinstance(s, A.ModelStmt)), None)
        span = stmt.span if stmt is not None else A.Span(line=1, col=1, end_line=1, end_col=1, file=plan.file)
        raise _fail(
            [Diagnostic("SW401", f"cannot understand model `{ref}`: {e}", span, help="discovery stopped there; see `scaler-wizard ir`")],
            sources,
        ) from None


def plan_train(path: str) -> tuple[dict, str]:
    """The resolved options of the plan's ``train`` statement (``{}`` without one) and where they
    come from, without a model: what :attr:`ResolvedPlan.train` holds for the same plan (one
    resolution, :func:`scaler_wizard.compiler.recipe.train_block`). Raises PlanError (a setting
    given twice, syntax), RecipeError (a bad key or value, named with its position)."""
    from scaler_wizard.compiler.recipe import train_block

    plan, sources = parse_plan_file(path)
    dup = duplicate_settings(plan)
    if dup:
        raise _fail(dup, sources)
    stmt = next((s for s in plan.statements if isinstance(s, A.TrainStmt)), None)
    if stmt is None:
        return {}, path
    where = stmt.ref.value if stmt.ref is not None else f"{path}: train"
    return train_block(stmt, plan.file), where


def check_parsed(plan: A.Plan, sources: dict[str, str], *, model: str | None = None, context: int = 2048, use_cache: bool = True) -> ResolvedPlan:
    from scaler_wizard.compiler.typecheck import check_plan

    dup = duplicate_settings(plan)
    if dup:
        raise _fail(dup, sources)
    ref = model_ref_for(plan, model, sources)
    ir = ir_for(ref, plan, sources, use_cache=use_cache)
    from scaler_wizard.compiler.conform import conform

    from scaler_wizard.compiler.stages import resolve_stages, stages_of, without_stages

    staged = bool(stages_of(plan))
    checked = without_stages(plan) if staged else plan
    try:
        rp = check_plan(checked, ir, model_ref=ref, context=context)
    except PlanError as e:
        e.sources = sources
        raise

    def prefix(dropped: set[int]):
        """The plan resolved without the statements at the indices ``dropped`` (conform's culprit search)."""
        kept = [s for i, s in enumerate(checked.statements) if i not in dropped]
        return check_plan(replace(checked, statements=tuple(kept)), ir, model_ref=ref, context=context)

    # the config the writer will produce must rebuild exactly the grown tensors (SW316 otherwise)
    rp = conform(rp, sources=sources, use_cache=use_cache, prefix=prefix)
    if staged:  # each `at step` stage against the model grown by everything before it
        steps = rp.train.get("steps") if isinstance(rp.train, dict) else None
        rp = replace(rp, stages=resolve_stages(plan, sources, dict(rp.config_after), context=context,
                                               total_steps=steps if isinstance(steps, int) else None,
                                               use_cache=use_cache))
    return replace(rp, plan_text="\n".join(sources.values()))


def load_and_check(path: str, *, model: str | None = None, context: int = 2048, use_cache: bool = True):
    """Parse and type-check ``path``. Returns (ResolvedPlan, sources); raises PlanError / UsageError."""
    plan, sources = parse_plan_file(path)
    return check_parsed(plan, sources, model=model, context=context, use_cache=use_cache), sources


def check_text(text: str, *, model: str | None = None, file: str = "<plan>", context: int = 2048) -> ResolvedPlan:
    """Python API: type-check plan text (raises PlanError with ``.sources`` set)."""
    from scaler_wizard.grammar import parse

    sources = {file: text}
    try:
        plan = parse(text, file=file)
    except PlanError as e:
        e.sources = sources
        raise
    return check_parsed(plan, sources, model=model, context=context)


__all__ = ["load_and_check", "check_text", "check_parsed", "parse_plan_file", "plan_train", "UsageError"]
