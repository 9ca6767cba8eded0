"""Mixture-of-experts rules: `upcycle ffn experts E top k` (targets: compiler/methods/upcycle.py)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

from scaler_wizard.compiler import methods as M
from scaler_wizard.compiler.methods.upcycle_targets import nearest_supported
from scaler_wizard.compiler.resolved import ResolvedOp
from scaler_wizard.grammar import ast as A
from scaler_wizard.grammar.printer import statement_text as _print_stmt
from scaler_wizard.compiler.typecheck.state import UPCYCLE_TARGETS, _State


class MoERules:
    """Mixin of :class:`~scaler_wizard.compiler.typecheck.checker.TypeChecker`."""

    def _UpcycleStmt(self, i, s: A.UpcycleStmt, st: _State):
        group = s.group.name
        opts = M.Upcycle.parse_options(s.options, st.bag)
        if group != "ffn":
            st.bag.error(
                "SW202",
                f"only the `ffn` group can be upcycled into experts, not `{group}`",
                s.group.span,
                help="write `upcycle ffn experts <E> top <k>`",
            )
            return
        E, k = s.experts.value, s.top_k.value
        ok = True
        if E < 2:
            st.bag.error("SW310", f"a mixture needs at least 2 experts, got {E}", s.experts.span)
            ok = False
        if E > 4096:
            st.bag.error("SW314", f"{E:,} experts is beyond any model this tool can write (limit 4,096)", s.experts.span)
            ok = False
        if not 1 <= k <= max(E, 1):
            st.bag.error("SW310", f"top {k} is not between 1 and the number of experts {E}", s.top_k.span)
            ok = False
        if self.ir.moe is not None or st.upcycled:
            st.bag.error(
                "SW309",
                "this model already routes its FFN through experts",
                s.span,
                help="to add experts, `widen experts ...`",
            )
            return
        target = UPCYCLE_TARGETS.get(self.ir.model_type)
        if target is None:
            st.bag.error(
                "SW309",
                f"no mixture-of-experts family in transformers matches `{self.ir.model_type}` exactly",
                s.span,
                help=nearest_supported(self.ir.model_type),
            )
            return
        cfg = self.ir.config
        if cfg.get("mlp_bias") or (cfg.get("attention_bias") and "qkv_bias" not in target.fixed):
            st.bag.error(
                "SW309",
                f"`{target.model_type}` has no projection biases, but this model uses them",
                s.span,
            )
            return
        drop = opts.get("drop")
        if drop is not None and (isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0 < drop <= 1):
            st.bag.error("SW207", f"`drop` must be a fraction in (0, 1], got {drop!r}", s.span,
                         help="e.g. `drop=0.5` re-initialises half of each expert's FFN units (Drop-Upcycling)")
            ok = False
        if not ok:
            return
        spec = replace(M.Upcycle.from_options(opts), target=target)
        noise = opts.get("noise", st.noise) or 0
        exactness, reason = spec.exactness(SimpleNamespace(noise=noise, plan_wide="noise" not in opts, top_k=k,
                                                           target=target))
        if noise:
            opts = {**opts, "noise": noise}
        patch = target.config_patch(E, k, st.sizes.get("ffn"))
        st.upcycled = (E, k)
        st.config.update(patch)
        st.ops.append(
            ResolvedOp(
                index=i,
                kind="upcycle",
                span=s.span,
                text=_print_stmt(s),
                exactness=exactness,
                reason=reason,
                group="ffn",
                old_size=1,
                new_size=E,
                method="copy",
                options={**opts, "top_k": k},
                config_patch=patch,
                spec=spec,
            )
        )
