"""The resolved plan: costs before / after, the final config, the warnings."""

from __future__ import annotations


from scaler_wizard.compiler.predict import costs, identity_layer_map, original_sizes, predict_shapes
from scaler_wizard.compiler.resolved import ResolvedPlan
from scaler_wizard.compiler.typecheck.state import _State


class ResultRules:
    """Mixin of :class:`~scaler_wizard.compiler.typecheck.checker.TypeChecker`."""

    def _finish(self, st: _State, model_ref: str, warnings) -> ResolvedPlan:
        ir = self.ir
        before_shapes = predict_shapes(ir, original_sizes(ir), identity_layer_map(ir.num_layers))
        c_before = costs(ir, before_shapes, original_sizes(ir), ir.num_layers, context=self.context)
        experts = st.upcycled[0] if st.upcycled else 0
        after_shapes = predict_shapes(ir, st.sizes, tuple(st.layer_map), upcycle_experts=experts)
        frac = (st.upcycled[1] / st.upcycled[0]) if st.upcycled else 1.0
        c_after = costs(
            ir, after_shapes, st.sizes, st.depth, context=self.context, active_expert_fraction=frac, untied=st.untie
        )
        config_after = dict(st.config)
        if st.depth != ir.num_layers:
            # written only when the depth grows: a config class may serialise another number than the
            # depth of the model it builds (Dory writes 2 blocks per layer), so an unchanged depth
            # keeps the value as stored
            config_after[ir.layers_key] = st.depth
        self._reindex_layer_arrays(st, config_after)
        plan = ResolvedPlan(
            model_ref=model_ref,
            ir=ir,
            ops=tuple(st.ops),
            layer_map=tuple(st.layer_map),
            config_before=dict(ir.config),
            config_after=config_after,
            costs_before=c_before,
            costs_after=c_after,
            seed=st.seed,
            dtype=st.dtype,
            noise=st.noise,
            train=st.train,
            alternatives=st.alternatives,
            warnings=tuple(warnings),
            sizes_after=dict(st.sizes),
        )
        return plan
