"""`upcycle ffn experts E top k`: a dense FFN becomes E identical experts (sparse upcycling).

With the top-k weights renormalised to sum to 1 the mixture equals the dense FFN whatever the router
picks, so the op is exact; ``noise`` (the op's or the plan-wide one) perturbs each expert copy and
makes it approx. ``router``: ``zero`` (default) or ``random`` (small random logits).
Source: Sparse Upcycling (Komatsuzaki et al., ICLR 2023).

:data:`UPCYCLE_TARGETS` (``compiler/methods/upcycle_targets.py``) is the one table of family names past
the IR: transformers' MoE class a dense family upcycles into, the config keys and tensor names that
class reads. ``tests/test_upcycle_targets.py`` builds every target with transformers, measures each
pair's fp32 logits and fails when a class or key changes. ``drop=<fraction>`` re-initialises that
fraction of each expert's FFN units, a different subset per expert (Drop-Upcycling, Nakamura et al.,
ICLR 2025): approx.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scaler_wizard.compiler.methods.base import Method, option, register
from scaler_wizard.compiler.methods.upcycle_targets import REFUSED, UPCYCLE_TARGETS, UpcycleTarget  # noqa: F401
from scaler_wizard.compiler.resolved import APPROX, EXACT


# the table and its schemas: compiler/methods/upcycle_targets.py (re-exported here)


@register
@dataclass(frozen=True)
class Upcycle(Method):
    kind = "op"
    name = "upcycle"
    statement = "`upcycle`"
    groups = ("ffn",)
    summary = ("dense FFN -> E identical experts, top-k renormalised (exact); router zero or random; `drop=<f>` "
               "re-initialises that fraction of each expert's units (approx)")
    source = "Sparse Upcycling (Komatsuzaki et al., ICLR 2023); Drop-Upcycling (Nakamura et al., ICLR 2025)"

    noise: float | None = option("noise on expert copies (breaks expert symmetry; makes the op approx)", kind="nonneg")
    router: str | None = option("router initialisation: `zero` (default) or `random`", kind="choice",
                                choices=("zero", "random"))
    drop: float | None = option("Drop-Upcycling: fraction (0, 1] of each expert's FFN units re-initialised, a "
                                "different subset per expert (approx)", kind="nonneg")
    target: UpcycleTarget | None = field(default=None, compare=False)  # set by the type checker

    def unread(self, group=None):
        return {"noise": None}

    def exactness(self, cx):
        """``cx``: ``noise`` (the effective one), ``plan_wide`` (it came from the plan), ``top_k``, ``target``."""
        if self.drop:
            return APPROX, (f"drop={self.drop:g}: each expert re-initialises {self.drop:.0%} of its FFN units "
                            "(Drop-Upcycling); the experts differ from the dense FFN")
        if not cx.noise:
            return EXACT, f"identical experts with top-{cx.top_k} weights renormalised to sum to 1 ({cx.target.model_type})"
        return APPROX, (f"noise {cx.noise:g}" + (" (plan-wide)" if cx.plan_wide else "")
                        + " on the expert copies changes each expert: the top-k mixture no longer equals the dense FFN")

    def lowering(self, op):
        from scaler_wizard.compiler.passes.upcycle import Upcycle as UpcyclePass

        return UpcyclePass(op)
