"""`upcycle ffn experts E top k`: dense FFN -> E identical experts (sparse upcycling).

Each layer's gate/up/down become ``mlp.experts.gate_up_proj`` (E, 2F, H) = E copies of [gate; up],
``mlp.experts.down_proj`` (E, H, F) = E copies of down, and a router ``mlp.gate.weight`` (E, H)
(zero by default, ``router=random`` for small random logits). With top-k weights renormalised to sum
to 1 (Mixtral; Qwen3-MoE with norm_topk_prob) the mixture equals the dense FFN exactly, whatever the
router picks. ``noise`` (the op's, or the plan-wide one) perturbs each expert copy independently:
approx, since only k of the E perturbed experts are mixed and no zero-sum across them survives the
router's choice.
"""

from __future__ import annotations

from scaler_wizard.compiler import program as P
from scaler_wizard.compiler.passes.base import LowerState, Pass, TState, option, split_layer_name
from scaler_wizard.compiler.resolved import APPROX


class Upcycle(Pass):
    name = "upcycle"

    def requires(self, st: LowerState) -> None:
        if st.ir.moe is not None or st.upcycled:
            raise self.fail(st, "the model already has experts")
        if st.layer_prefix is None:
            raise self.fail(st, "no per-layer tensors")
        found = self._find(st)
        if not found:
            raise self.fail(st, "no gate/up/down projections found in the MLP")
        for layer, parts in found.items():
            missing = {"gate", "up", "down"} - set(parts)
            if missing:
                raise self.fail(st, f"layer {layer}: no {sorted(missing)} projection (needs a gated MLP without biases)")

    def _find(self, st: LowerState) -> dict[int, dict[str, str]]:
        out: dict[int, dict[str, str]] = {}
        for name, ts in st.tensors.items():
            sp = split_layer_name(name, st.layer_prefix)
            if sp is None or not any("ffn" in ax.groups() for ax in ts.axes):
                continue
            if len(ts.node.shape) != 2:
                raise self.fail(st, f"{name}: FFN tensor that is not a matrix (a bias?); the MoE family has none")
            leaf = sp[1].split(".")[-2]
            # down: the FFN matrix writing the residual stream (an IR fact); gate vs up: by name until
            # the IR records which linear feeds the activation
            kind = "down" if ts.writer else "gate" if "gate" in leaf else "up" if "up" in leaf else None
            if kind is None:
                raise self.fail(st, f"{name}: cannot tell gate / up / down apart")
            out.setdefault(sp[0], {})[kind] = name
        return out

    def apply(self, st: LowerState) -> None:
        op = self.op
        E = op.new_size
        noise = float(option(op, "noise", st.plan.noise) or 0.0)
        router = option(op, "router", "zero")
        std = st.init_std()
        for layer, parts in sorted(self._find(st).items()):
            g, u, dn = (st.tensors.pop(parts[k]) for k in ("gate", "up", "down"))
            F, H = g.node.shape
            gu = P.Concat((g.node, u.node), 0)
            gu = P.Tile(P.Reshape(gu, (1, 2 * F, H)), 0, E)
            down = P.Tile(P.Reshape(dn.node, (1, H, F)), 0, E)
            ex = op.exactness
            tgt = op.spec.target
            prefix = f"{st.layer_prefix}.{layer}"
            if noise:
                gu = P.Add(gu, P.Random(gu.shape, f"{prefix}.{tgt.gate_up}:noise", std=noise))
                down = P.Add(down, P.Random(down.shape, f"{prefix}.{tgt.down}:noise", std=noise))
                ex = APPROX
            notes = [f"{E} experts, copies of the dense gate/up (top-{op.options.get('top_k')}, renormalised)"]
            st.tensors[f"{prefix}.{tgt.gate_up}"] = TState(gu, None, layer, (), None, True, None, ex, notes, False, True)
            st.tensors[f"{prefix}.{tgt.down}"] = TState(down, None, layer, (), None, True, None, ex,
                                                               [f"{E} experts, copies of the dense down projection"], True, True)
            rnode = P.Zeros((E, H)) if router != "random" else P.Random((E, H), f"{prefix}.{tgt.router}:router", std=std)
            st.tensors[f"{prefix}.{tgt.router}"] = TState(rnode, None, layer, (), None, True, None, ex,
                                                         [f"router ({router}): any top-{op.options.get('top_k')} choice is exact"],
                                                         False, True)
        st.upcycled = True

    def ensures(self, st: LowerState) -> None:
        super().ensures(st)
        E, tgt = self.op.new_size, self.op.spec.target
        for name, ts in st.tensors.items():
            if name.endswith(tgt.gate_up):
                if ts.node.shape != (E, 2 * st.sizes["ffn"], st.sizes["hidden"]):
                    raise self.fail(st, f"{name}: shape {ts.node.shape}")
            if name.endswith(tgt.down):
                if ts.node.shape != (E, st.sizes["hidden"], st.sizes["ffn"]):
                    raise self.fail(st, f"{name}: shape {ts.node.shape}")
