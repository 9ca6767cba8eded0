"""`grow to` (through compiler/solver.py) and the one size policy every plan is held to (SW317)."""

from __future__ import annotations


from scaler_wizard.diagnostics import suggest
from scaler_wizard.compiler.predict import costs, identity_layer_map, original_sizes, predict_shapes
from scaler_wizard.grammar import ast as A
from scaler_wizard.compiler.typecheck.state import _State, groups_summary


class GrowRules:
    """Mixin of :class:`~scaler_wizard.compiler.typecheck.checker.TypeChecker`."""

    def _GrowToStmt(self, i, s: A.GrowToStmt, st: _State):
        from scaler_wizard.compiler.solver import solve_grow_to

        prefer = s.prefer.name if s.prefer else None
        if prefer not in (None, "depth", "width"):
            hint = suggest(prefer, ["depth", "width"])
            st.bag.error(
                "SW207",
                f"`prefer` takes `depth` or `width`, not `{prefer}`",
                s.prefer.span,
                help=f"did you mean `{hint}`?" if hint else None,
            )
            return
        solution = solve_grow_to(self, st, s, prefer)
        if isinstance(solution, str):
            st.bag.error("SW311", solution, s.span, help=groups_summary(self.ir, st.sizes, st.depth))
            return
        chosen, alternatives = solution
        st.alternatives = tuple(alternatives)
        for stmt in chosen:
            handler = getattr(self, "_" + type(stmt).__name__)
            handler(i, stmt, st)

    def _check_size_policy(self, st: _State) -> None:
        """One size policy for every statement (``widen x1000000`` as ``grow to``): the parameters
        grow at most MAX_GROWTH times; and the memory apply needs (its largest tensors, streamed)
        fits this machine's. Positioned at the plan's last op."""
        from scaler_wizard.compiler.predict import MAX_GROWTH, human, machine_memory_bytes

        ir = self.ir
        if not st.ops:
            return
        base = costs(ir, predict_shapes(ir, original_sizes(ir), identity_layer_map(ir.num_layers)),
                     original_sizes(ir), ir.num_layers, context=self.context)
        experts = st.upcycled[0] if st.upcycled else 0
        after = costs(ir, predict_shapes(ir, st.sizes, tuple(st.layer_map), upcycle_experts=experts), st.sizes,
                      st.depth, context=self.context, untied=st.untie)
        span = max(st.ops, key=lambda o: (o.span.line, o.span.col) if o.span else (0, 0)).span if st.ops else A.Span()
        if base.params and after.params > MAX_GROWTH * base.params:
            st.bag.error("SW317", f"the plan grows the model from {base.params:,} to {after.params:,} parameters, "
                                  f"more than {MAX_GROWTH}x; grow in stages", span,
                         help=f"every plan is held to the same limit as `grow to` ({MAX_GROWTH}x the input)")
            return
        mem = machine_memory_bytes()
        if mem is not None and after.apply_peak_bytes > mem:
            st.bag.error("SW317", f"applying this plan needs about {human(after.apply_peak_bytes, 'B')} of memory "
                                  f"(its largest tensors, in fp32), more than this machine's {human(mem, 'B')}", span,
                         help="apply it on a machine with more memory, or grow less at once")
