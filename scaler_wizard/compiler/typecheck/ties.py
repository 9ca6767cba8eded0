"""Rules on what the config can express and what the width passes can grow (SW383, SW384).

* SW383 -- a width op on a group one of whose tensors uses it in a role the group's pass does not
  grow (Dory's ``self_attn.s_gate`` acting elementwise on heads x head_dim, its ``lm_head.logit_scale``
  elementwise on vocab): refused here, at the statement, instead of a pass failure in lowering.
* SW384 -- the plan's final sizes break a tie discovery's config probes found
  (``ModelIR.config_ties``, see :mod:`scaler_wizard.ir.discovery.probe`): a tensor axis the
  computation sizes by some groups while the config builds it from others (Helium's ``o_proj``
  input is heads x head_dim, built from hidden_size), an axis the config sizes in a way discovery
  did not understand (Zaya's q/k convolutions), or a tensor the config builds only for some
  values (ELECTRA's ``embeddings_project``). Without this rule conform refuses after lowering with
  SW316 (the compiler contradicting itself).
"""

from __future__ import annotations

from scaler_wizard.ir.discovery.probe import axis_size
from scaler_wizard.compiler.typecheck.state import _State

# the roles each width pass grows (compiler/passes: widen_kv_heads, widen_vocab, widen_heads)
_PASS_ROLES = {"kv_heads": ("out",), "vocab": ("index", "out")}
_GROWN = {"kv_heads": "it grows the k/v projections' rows only",
          "vocab": "it grows embedding rows and LM-head rows only",
          "heads": "it grows q/k/v rows, o columns and per-head values on a heads-only axis"}


def _factors(ax) -> str:
    """An IR axis as the product the computation reads: "heads x head_dim", "kv_heads x 2 x 8"
    (constant factors as numbers)."""
    parts = []
    for seg in ax.segments:
        parts.append(" x ".join(f.group if f.group != "const" else str(f.size) for f in seg.factors) or "1")
    return " + ".join(f"({p})" if len(ax.segments) > 1 else p for p in parts)


def _stmt(op) -> str:
    return f"`{op.text.split('  #')[0]}`" + (" (implied)" if (op.options or {}).get("implied") else "")


class TieRules:
    """Mixin of :class:`~scaler_wizard.compiler.typecheck.checker.TypeChecker`."""

    def _heads_role_ok(self, t, ax) -> bool:
        """Whether the widen-heads pass grows axis ``ax`` of ``t`` (passes/widen_heads.py): q/k/v
        rows and o columns, or a per-head value on an axis of heads alone."""
        if ax.role in ("out", "in"):
            return True
        if len(ax.groups()) != 1:
            return False
        if ax.role == "elem":
            return t.kind not in ("norm_weight", "norm_bias")
        return ax.role == "other" and len(t.shape) == 1 and t.sublayer == "attn" and t.kind == "other"

    def _check_pass_roles(self, st: _State) -> None:
        """SW383: widen heads / kv_heads / vocab when a tensor carries the group in a role its pass
        does not grow (an elementwise gate over heads x head_dim, a per-logit scale over vocab):
        what its new entries must be is not established, so the op is refused at its statement.
        Norms over heads are SW351's; groups with their own rules (hidden SW358, ffn SW355,
        head_dim SW359) are not checked here."""
        if st.bag.has_errors:
            return
        for op in st.ops:
            if op.kind != "widen" or op.group not in ("heads", "kv_heads", "vocab"):
                continue
            for t in self.ir.tensors:
                if op.group == "heads" and t.kind in ("norm_weight", "norm_bias"):
                    continue  # SW351
                for a, ax in enumerate(t.axes):
                    if op.group not in ax.groups():
                        continue
                    ok = (self._heads_role_ok(t, ax) if op.group == "heads"
                          else ax.role in _PASS_ROLES[op.group])
                    if ok:
                        continue
                    over = " x ".join(ax.groups())
                    st.bag.error(
                        "SW383",
                        f"{_stmt(op)}: `{t.name}` ({t.module_type}, shape {list(t.shape)}) uses {op.group} "
                        f"on axis {a} ({over}) in role `{ax.role}`, which the `widen {op.group}` pass does not "
                        f"grow ({_GROWN[op.group]}): what its new entries must be is not established, so "
                        f"growing {op.group} is not supported for this model yet",
                        op.span,
                        help=f"nothing was written; ops that leave `{op.group}` as it is are unaffected",
                    )
                    return

    def _check_config_ties(self, st: _State) -> None:
        """SW384: the plan's final sizes break a tie of ``ModelIR.config_ties``: the grown config
        would build a tensor of another shape than the program writes, or build a tensor the program
        does not write (or not build one it does). Positioned on the first statement growing a group
        the tie involves."""
        ir = self.ir
        if not ir.config_ties or st.bag.has_errors:
            return
        orig = {g: x.size for g, x in ir.groups.items()}
        final = dict(st.sizes)
        grown = [op for op in st.ops if op.kind == "widen" and op.group]

        def changed(g):
            return g in final and g in orig and final[g] != orig[g]

        def culprit(groups):
            return next((op for op in grown if op.group in groups), None) or next(
                (op for op in st.ops if op.kind == "widen"), None)

        def key(g):
            x = ir.groups.get(g)
            return (x.config_key or x.derived or g) if x else g

        def in_mixer(tpl):
            # a hybrid's non-attention token mixer is judged as a block (SW365 here, SW366 in
            # conform, which names the block): its sizes follow the config by rules of its own
            return any(tpl in mx.tensors or tpl.startswith(mx.module + ".") for mx in ir.mixers)

        for tie in ir.config_ties:
            if in_mixer(tie[1]):
                continue
            if tie[0] == "axis":
                _, tpl, a, movers = tie
                try:
                    t = ir.tensor(tpl)
                except (KeyError, ValueError, StopIteration):
                    continue
                ax = t.axes[a]
                movers = tuple((h, float(f)) for h, f in movers)
                involved = set(ax.groups()) | {h for h, _ in movers}
                if not any(changed(g) for g in involved):
                    continue
                ir_after = axis_size(ax, final)
                linear = all(f == 2.0 for _, f in movers)
                cfg_after = None
                if linear:
                    num, den = ax.size, 1
                    for h, _ in movers:
                        num *= final.get(h, orig.get(h, 1))
                        den *= orig.get(h, 1)
                    cfg_after = num // den if num % den == 0 else None
                if cfg_after is not None and cfg_after == ir_after:
                    continue
                op = culprit(involved)
                if op is None:
                    continue
                comp = _factors(ax)
                if linear and movers and not ax.groups():
                    by = " x ".join(f"{h} (`{key(h)}`)" for h, _ in movers)
                    msg = (f"{_stmt(op)}: `{tpl}` axis {a} is a dimension of its own in the computation ({ax.size}, "
                           f"in no group discovery grows), but the config builds it from {by}: the program would "
                           f"leave it at {ir_after} where the grown config builds {cfg_after}")
                    help_ = (f"nothing was written; ops that leave {', '.join(h for h, _ in movers)} as it is are "
                             "unaffected")
                elif linear and movers:
                    by = " x ".join(f"{h} (`{key(h)}`)" for h, _ in movers)
                    msg = (f"{_stmt(op)}: `{tpl}` axis {a} is {comp} in the computation ({ax.size}), but the config "
                           f"builds it from {by}; after this plan {comp} = {ir_after} while the config would build "
                           f"{cfg_after}: the grown config cannot describe the grown tensor")
                    if set(ax.groups()) & {h for h, _ in movers}:
                        help_ = (f"nothing was written; discovery read the axis as {comp}, which no growth of "
                                 f"{op.group} keeps equal to what the config builds: ops that leave {op.group} as "
                                 "it is are unaffected")
                    else:
                        cfg_side = " and ".join(h for h, _ in movers)
                        help_ = (f"nothing was written; grow {cfg_side} together with {' or '.join(ax.groups())} so that "
                                 f"{comp} stays equal to {' x '.join(h for h, _ in movers)} (e.g. `widen "
                                 f"{sorted(involved - set(ax.groups()))[0]}` with `widen {ax.groups()[0]}` by the "
                                 "same factor)")
                elif movers:
                    by = ", ".join(f"{h} (`{key(h)}`)" for h, _ in movers)
                    msg = (f"{_stmt(op)}: `{tpl}` ({t.module_type}) axis {a} is {comp} in the computation as discovery "
                           f"read it, but the config sizes it from {by} in a way discovery did not understand; "
                           f"growing {op.group} is not supported for this model")
                    help_ = f"nothing was written; ops that leave {', '.join(sorted(involved))} as they are are unaffected"
                else:
                    msg = (f"{_stmt(op)}: `{tpl}` axis {a} is {comp} in the computation, but the config sizes it by "
                           f"no key discovery bound (its size coincides with theirs only at these sizes): the grown "
                           f"config would build it at {ax.size}, the program at {ir_after}")
                    help_ = f"nothing was written; ops that leave {', '.join(sorted(ax.groups()))} as they are are unaffected"
                st.bag.error("SW384", msg, op.span, help=help_)
                return
            if tie[0] == "exists":
                _, tpl, g, how = tie
                if not changed(g) or final[g] != 2 * orig[g]:
                    continue
                op = culprit({g})
                if op is None:
                    continue
                what = ("builds no" if how == "absent" else "builds a new")
                st.bag.error(
                    "SW384",
                    f"{_stmt(op)}: at {g} = {final[g]} (`{key(g)}`) the config {what} `{tpl}` (a tensor it builds "
                    f"only for some values of its keys, e.g. while two sizes differ), so the grown config cannot "
                    f"describe the grown model",
                    op.span,
                    help=f"nothing was written; grow {g} to another size",
                )
                return

    def _check_serialised_depth(self, st: _State) -> None:
        """SW385: depth growth when the config serialises another number under its depth key than
        the layer count of the model it builds (Dory's config.json stores each layer as an attention
        block and an MLP block: `num_hidden_layers` 2 for 1 layer, and re-reads its own dict on load):
        the grown depth cannot be written as a plain layer count."""
        ir = self.ir
        stored = ir.config.get(ir.layers_key)
        if not isinstance(stored, int) or isinstance(stored, bool) or stored == ir.num_layers or st.bag.has_errors:
            return
        op = next((o for o in st.ops if o.kind in ("insert", "duplicate", "stack")), None)
        if op is None:
            return
        st.bag.error(
            "SW385",
            f"{_stmt(op)}: `{ir.model_type}`'s config stores `{ir.layers_key}` = {stored} for a model of "
            f"{ir.num_layers} layer(s) (the config class re-reads its own dict when it loads it), so the grown "
            "depth cannot be written as a layer count; depth growth is not supported for this model",
            op.span,
            help="nothing was written; width growth is unaffected",
        )
