"""Plan-wide settings (`model`, `seed`, `noise`, `dtype`, `train`) and the options every op shares."""

from __future__ import annotations

from dataclasses import replace

from scaler_wizard.compiler import methods as M
from scaler_wizard.diagnostics import suggest
from scaler_wizard.grammar import ast as A
from scaler_wizard.grammar.printer import statement_text as _print_stmt
from scaler_wizard.compiler.typecheck.state import (
    DTYPE_ALIASES, DTYPES, SEED_MAX, _State, _opt_value, _valid_seed,
)


class SettingsRules:
    """Mixin of :class:`~scaler_wizard.compiler.typecheck.checker.TypeChecker`."""

    def _ModelStmt(self, i, s: A.ModelStmt, st: _State):
        pass  # resolved by the front end before the IR is built

    def _SeedStmt(self, i, s: A.SeedStmt, st: _State):
        if not _valid_seed(s.value.value):
            st.bag.error("SW207", f"seed must be an integer from 0 to {SEED_MAX}, got {s.value.value}", s.value.span)
            return
        st.seed = s.value.value

    def _NoiseStmt(self, i, s: A.NoiseStmt, st: _State):
        if s.value.value < 0:
            st.bag.error("SW207", f"noise must be non-negative, got {s.value.value}", s.value.span)
        st.noise = s.value.value

    def _DtypeStmt(self, i, s: A.DtypeStmt, st: _State):
        name = DTYPE_ALIASES.get(s.name.name, s.name.name)
        if name not in DTYPES:
            hint = suggest(s.name.name, list(DTYPES) + list(DTYPE_ALIASES))
            st.bag.error(
                "SW206",
                f"unknown dtype `{s.name.name}`",
                s.name.span,
                help=(f"did you mean `{hint}`? " if hint else "") + "dtypes: " + ", ".join(DTYPES),
            )
            return
        st.dtype = name

    def _TrainStmt(self, i, s: A.TrainStmt, st: _State):
        """Validate the block against the recipe schema (positioned: a plan `check` passes trains)
        and resolve it into ``ResolvedPlan.train`` (typed values; a referenced file read)."""
        from scaler_wizard.compiler.recipe import RecipeError, TrainRecipe, train_block

        if s.ref is not None:
            try:
                st.train = train_block(s, s.span.file)
            except RecipeError as e:
                st.bag.error("SW207", str(e), s.ref.span, help="the `train` statement names a TOML / JSON recipe")
            return
        known = TrainRecipe.keys()
        ok = {}
        for o in s.options:
            key = o.key.name.replace("-", "_")
            if key not in known:
                hint = suggest(key, known)
                st.bag.error("SW204", f"unknown key `{o.key.name}` in the `train` block", o.key.span,
                             help=(f"did you mean `{hint}`? " if hint else "") + "keys: " + ", ".join(sorted(known)))
                continue
            try:
                TrainRecipe().update({key: _opt_value(o.value)}, where="train")
            except RecipeError as e:
                st.bag.error("SW207", str(e).removeprefix("train: "), o.value.span)
                continue
            ok[key] = _opt_value(o.value)
        if len(ok) == len(s.options):
            try:
                TrainRecipe().update(ok, where="train")
                st.train = train_block(s, s.span.file)
            except RecipeError as e:
                st.bag.error("SW207", str(e).removeprefix("train: "), s.span)

    def _plan_wide_noise(self, st: _State) -> None:
        if not st.noise:
            return
        for op in st.ops:
            if op.kind == "widen" and op.options.get("implied"):
                continue
            why = op.spec.unread(op.group).get("noise") if op.spec is not None else None
            if why is not None and "noise" not in op.options:
                st.bag.warning("SW603", f"the plan-wide `noise {st.noise:g}` does not apply to `{op.text}`: {why}",
                               op.span, help="noise applies to widen hidden/ffn/heads/experts (copies), "
                               "insert identity (fan-in) and upcycle (experts)")

    def _unread_options(self, st: _State, s, opts: dict, spec: M.Method, group) -> None:
        """Options the op accepts in general but would not read for this group / method / init."""
        for key, why in spec.unread(group).items():
            if key in opts and why is not None:
                span = next((o.key.span for o in s.options if o.key.name == key), s.span)
                st.bag.error("SW204", f"`{key}=` has no effect on `{_print_stmt(s)}`: {why}", span,
                             help=f"remove `{key}=`")
