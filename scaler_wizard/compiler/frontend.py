"""The compiler's front half as one call: plan file -> AST -> IR -> resolved plan.

Shared by `check`, `explain`, `compile` and `apply`, and by the Python API.
"""

from __future__ import annotations

from dataclasses import replace

from scaler_wizard.compiler.diagnostics import Diagnostic, PlanError, UsageError
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


def model_ref_for(plan: A.Plan, model: str | None, sources: dict[str, str]) -> str:
    if model:
        return model
    ref = plan.model_ref()
    if ref:
        return ref
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

    try:
        return model_ir_for(ref, use_cache=use_cache)
    except IRDiscoveryError as e:
        stmt = next((s for s in plan.statements if isinstance(s, A.ModelStmt)), None)
        span = stmt.span if stmt is not None else A.Span(line=1, col=1, end_line=1, end_col=1, file=plan.file)
        raise _fail(
            [Diagnostic("SW401", f"cannot understand model `{ref}`: {e}", span, help="discovery stopped there; see `scaler-wizard ir`")],
            sources,
        ) from None


def check_parsed(plan: A.Plan, sources: dict[str, str], *, model: str | None = None, context: int = 2048, use_cache: bool = True) -> ResolvedPlan:
    from scaler_wizard.compiler.typecheck import check_plan

    ref = model_ref_for(plan, model, sources)
    ir = ir_for(ref, plan, sources, use_cache=use_cache)
    from scaler_wizard.compiler.conform import conform

    try:
        rp = check_plan(plan, ir, model_ref=ref, context=context)
    except PlanError as e:
        e.sources = sources
        raise
    # the config the writer will produce must rebuild exactly the grown tensors (SW316 otherwise)
    rp = conform(rp, sources=sources, use_cache=use_cache)
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


__all__ = ["load_and_check", "check_text", "check_parsed", "parse_plan_file", "UsageError"]
