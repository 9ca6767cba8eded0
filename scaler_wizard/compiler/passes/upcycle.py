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

import random

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
        target = op.spec.target  # the schema the type checker chose (compiler/methods/upcycle_targets.py)
        noise = float(option(op, "noise", st.plan.noise) or 0.0)
        drop = option(op, "drop", None)
        router = option(op, "router", "zero")
        std = st.init_std()
        k = op.options.get("top_k")
        for layer, parts in sorted(self._find(st).items()):
            g, u, dn = (st.tensors.pop(parts[kk]) for kk in ("gate", "up", "down"))
            F, H = g.node.shape
            names = target.names(st.layer_prefix, layer)
            gu0 = P.Concat((g.node, u.node), 0)
            if drop:
                gu, down = _drop_upcycle(gu0, dn.node, E, float(drop), std, names, st.plan.seed, layer)
            else:
                gu = P.Tile(P.Reshape(gu0, (1, 2 * F, H)), 0, E)
                down = P.Tile(P.Reshape(dn.node, (1, H, F)), 0, E)
            ex = op.exactness
            if noise:
                gu = P.Add(gu, P.Random(gu.shape, f"{names['gate_up']}:noise", std=noise))
                down = P.Add(down, P.Random(down.shape, f"{names['down']}:noise", std=noise))
                ex = APPROX
            what = (f"{E} experts, copies of the dense gate/up" if not drop
                    else f"{E} experts, dense gate/up with {float(drop):.0%} of the units re-initialised per expert")
            st.tensors[names["gate_up"]] = TState(gu, None, layer, (), None, True, None, ex,
                                                  [f"{what} (top-{k}, renormalised)"], False, True)
            st.tensors[names["down"]] = TState(down, None, layer, (), None, True, None, ex,
                                               [what.replace("gate/up", "down projection")], True, True)
            rnode = P.Zeros((E, H)) if router != "random" else P.Random((E, H), f"{names['router']}:router", std=std)
            st.tensors[names["router"]] = TState(rnode, None, layer, (), None, True, None, ex,
                                                 [f"router ({router}): any top-{k} choice is exact"], False, True)
            if target.shared:
                st.tensors[names["shared_gate"]] = TState(g.node, None, layer, (), None, True, None, ex,
                                                          ["shared expert: the dense gate projection"], False, True)
                st.tensors[names["shared_up"]] = TState(u.node, None, layer, (), None, True, None, ex,
                                                        ["shared expert: the dense up projection"], False, True)
                st.tensors[names["shared_down"]] = TState(P.Zeros((H, F)), None, layer, (), None, True, None, ex,
                                                          ["shared expert: down projection zero (adds 0)"], True, True)
            if target.shared_gate:
                st.tensors[names["shared_gate_w"]] = TState(P.Zeros((1, H)), None, layer, (), None, True, None, ex,
                                                            ["shared-expert gate zero (sigmoid 0.5)"], False, True)
        st.upcycled = True

    def ensures(self, st: LowerState) -> None:
        super().ensures(st)
        E, tgt = self.op.new_size, self.op.spec.target
        for layer in {ts.layer for ts in st.tensors.values() if ts.layer is not None}:
            names = tgt.names(st.layer_prefix, layer)
            for key, shape in (("gate_up", (E, 2 * st.sizes["ffn"], st.sizes["hidden"])),
                               ("down", (E, st.sizes["hidden"], st.sizes["ffn"]))):
                ts = st.tensors.get(names[key])
                if ts is not None and ts.node.shape != shape:
                    raise self.fail(st, f"{names[key]}: shape {ts.node.shape}")


def _drop_upcycle(gu0, down0, E: int, drop: float, std: float, names: dict, seed, layer: int):
    """Drop-Upcycling (Nakamura et al., ICLR 2025): expert e keeps the dense FFN except a random
    ``round(drop * F)`` of its units (a different subset per expert, seeded by the plan seed, layer
    and expert), whose gate/up rows and down columns are drawn normal(0, std) afresh.

    gu0: [2F, H] dense [gate; up]; down0: [H, F]. Returns ([E, 2F, H], [E, H, F]) nodes built from
    Concat + Index (rows taken from the dense matrix or from a fresh random one)."""
    F2, H = gu0.shape
    F = F2 // 2
    n = max(1, round(drop * F))
    gus, downs = [], []
    for e in range(E):
        rng = random.Random(f"{seed}:{layer}:{e}:drop-upcycle")
        dropped = set(rng.sample(range(F), n))
        rg = P.Random((F2, H), f"{names['gate_up']}:drop:{e}", std=std)
        rd = P.Random((H, F), f"{names['down']}:drop:{e}", std=std)
        rows = tuple((F2 + i if (i % F) in dropped else i) for i in range(F2))
        cols = tuple((F + i if i in dropped else i) for i in range(F))
        gus.append(P.Reshape(P.Index(P.Concat((gu0, rg), 0), 0, rows), (1, F2, H)))
        downs.append(P.Reshape(P.Index(P.Concat((down0, rd), 1), 1, cols), (1, H, F)))
    return P.Concat(tuple(gus), 0), P.Concat(tuple(downs), 0)
