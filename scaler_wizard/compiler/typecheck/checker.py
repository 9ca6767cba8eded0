"""The type checker: resolve a parsed plan against a model's IR (the rules live in the mixins)."""

from __future__ import annotations


from scaler_wizard.diagnostics import DiagnosticBag, PlanError, Span
from scaler_wizard.compiler.predict import identity_layer_map, original_sizes
from scaler_wizard.compiler.resolved import APPROX, ResolvedPlan
from scaler_wizard.grammar import ast as A
from scaler_wizard.grammar.printer import statement_text as _print_stmt
from scaler_wizard.ir.model_ir import ModelIR
from scaler_wizard.compiler.typecheck.state import _State
from scaler_wizard.compiler.typecheck.attention import AttentionRules
from scaler_wizard.compiler.typecheck.context import ContextRules
from scaler_wizard.compiler.typecheck.depth import DepthRules
from scaler_wizard.compiler.typecheck.grow import GrowRules
from scaler_wizard.compiler.typecheck.moe import MoERules
from scaler_wizard.compiler.typecheck.result import ResultRules
from scaler_wizard.compiler.typecheck.settings import SettingsRules
from scaler_wizard.compiler.typecheck.ties import TieRules
from scaler_wizard.compiler.typecheck.width import WidthRules


class TypeChecker(SettingsRules, WidthRules, AttentionRules, ContextRules, DepthRules, MoERules, GrowRules,
                  TieRules, ResultRules):
    """Statements are dispatched to ``_<AST class name>`` handlers of the mixins; every problem is
    collected on a :class:`DiagnosticBag` and raised together."""

    def __init__(self, ir: ModelIR, *, context: int = 2048):
        self.ir = ir
        self.context = context

    def hidden_norms(self):
        return [n for n in self.ir.norms if n.group == "hidden"]

    def placement(self) -> str:
        return self.ir.residual.placement

    def _eps_shared_with_other_groups(self) -> list[str]:
        keys = {n.eps_key for n in self.hidden_norms() if n.eps_key}
        return sorted({f"{n.placement} norm over {n.group}" for n in self.ir.norms if n.eps_key in keys and n.group != "hidden"})

    def check(self, plan: A.Plan, *, model_ref: str) -> ResolvedPlan:
        ir = self.ir
        bag = DiagnosticBag()
        st = _State(
            ir=ir,
            bag=bag,
            sizes=original_sizes(ir),
            layer_map=list(identity_layer_map(ir.num_layers)),
            config=dict(ir.config),
        )
        self._check_is_transformer(plan, st)
        # Plan-wide settings hold for the whole plan wherever they are written: resolve them first,
        # so that every op sees the final `noise` / `seed` / `dtype`.
        settings = (A.SeedStmt, A.NoiseStmt, A.DtypeStmt)
        order = [(i, s) for i, s in enumerate(plan.statements) if isinstance(s, settings)]
        order += [(i, s) for i, s in enumerate(plan.statements) if not isinstance(s, settings)]
        for i, stmt in order:
            handler = getattr(self, "_" + type(stmt).__name__, None)
            if handler is not None:
                handler(i, stmt, st)
            else:  # parsed, not resolved yet: one positioned error, never silently skipped
                head = f"at step {stmt.step.value} {{ ... }}" if isinstance(stmt, A.Stage) else _print_stmt(stmt)
                bag.error("SW210", f"`{head}` is not supported by this build yet", stmt.span)
        self._plan_wide_noise(st)
        self._check_hybrid_mixers(st)
        self._check_attention_output_layout(st)
        self._check_layer_kind_shapes(st)
        self._check_layer_kinds(st)
        self._check_second_ffn_width(st)
        self._check_norms_over_heads(st)
        self._check_norms_over_ffn(st)
        self._check_fixed_groups(st)
        self._check_size_constants(st)
        self._check_unplaced_axes(st)
        self._check_elementwise_on_hidden(st)
        self._check_head_dim_readers(st)
        self._check_config_invariants(st)
        self._check_rope_lists(st)
        self._check_pass_roles(st)
        self._check_config_ties(st)
        self._check_serialised_depth(st)
        self._layer_summaries(st)
        if not bag.has_errors:
            self._check_size_policy(st)
        if bag.has_errors:
            raise PlanError(bag.items)
        approx = [o for o in st.ops if o.exactness == APPROX]
        if approx:
            first = approx[0]
            bag.warning(
                "SW601",
                f"{len(approx)} op(s) change the model's function on purpose (approx): `{first.text}`",
                first.span,
                help="`verify` reports their measured drift instead of holding them to the exact tolerance",
            )
        if not st.ops and not any(isinstance(s, A.Stage) for s in plan.statements):
            first_line = len(plan.source.split("\n", 1)[0])  # the span: the plan's first line
            bag.warning(
                "SW605",
                "the plan has no growth statements: `apply` would write an unchanged copy of the model",
                Span(line=1, col=1, end_line=1, end_col=first_line + 1, start=0, end=first_line, file=plan.file),
                help="add one, such as `widen hidden x2 lemon` or `insert layer 12 identity`",
            )
        warnings = bag.items
        return self._finish(st, model_ref, tuple(warnings))

    def _check_is_transformer(self, plan: A.Plan, st: _State) -> None:
        """SW350 (raised at once): discovery found no attention op in the layers, so the growth
        rules (which are transformer rules: heads, residual writers, norms) do not describe how
        this model mixes tokens."""
        ir = self.ir
        if ir.attention is not None or not ir.num_layers:
            return
        ops = [s for s in plan.statements if not isinstance(s, (A.SeedStmt, A.NoiseStmt, A.DtypeStmt, A.ModelStmt))]
        if not ops:
            return
        span = ops[0].span
        unknown = next((n for n in ir.notes if n.startswith("attention not recognised")), None)
        if unknown is not None:
            st.bag.error(
                "SW352",
                f"`{ir.model_type}` ({ir.architecture}): {unknown}; a model whose attention is not understood "
                "cannot be grown",
                span,
                help="nothing was written; `scaler-wizard ir` shows what discovery found (please report the family)",
            )
            raise PlanError(st.bag.items)
        st.bag.error(
            "SW350",
            f"`{ir.model_type}` ({ir.architecture}) is not a transformer: its layers mix tokens without an "
            "attention op (a state-space, recurrent or convolutional model); scaler-wizard grows transformer "
            "language models only",
            span,
            help="nothing was written; `scaler-wizard ir` shows what discovery found in its layers",
        )
        raise PlanError(st.bag.items)


def check_plan(plan: A.Plan, ir: ModelIR, *, model_ref: str, context: int = 2048) -> ResolvedPlan:
    """Resolve ``plan`` against ``ir``; raise :class:`PlanError` with every diagnostic if it fails."""
    return TypeChecker(ir, context=context).check(plan, model_ref=model_ref)
