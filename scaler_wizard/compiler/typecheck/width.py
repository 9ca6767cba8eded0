"""Width rules: `widen <group>`: the group, the new size, the method (from the registry), the group's
rules (GQA, derived sizes) and the method's exactness, the config patch, implied growth."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from scaler_wizard.compiler import methods as M
from scaler_wizard.diagnostics import DiagnosticBag, suggest
from scaler_wizard.compiler.resolved import APPROX, EXACT, ResolvedOp
from scaler_wizard.grammar import ast as A
from scaler_wizard.grammar.printer import statement_text as _print_stmt
from scaler_wizard.ir.model_ir import ModelIR
from scaler_wizard.compiler.typecheck.state import MAX_WIDTH, _State, _eval_derived, groups_summary


@dataclass
class WidenContext:
    """What a width method's exactness rule sees (:meth:`Method.exactness`): the IR, the statement,
    the group and its sizes, and facts the group rules derived (``kv``: KV heads at this point;
    ``note``: RoPE facts for head_dim)."""

    checker: "TypeChecker"
    st: "_State"
    stmt: A.WidenStmt
    group: str
    old: int
    new: int
    kv: int = 0
    note: str = ""

    @property
    def ir(self) -> ModelIR:
        return self.checker.ir

    @property
    def bag(self) -> DiagnosticBag:
        return self.st.bag

    @property
    def placement(self) -> str:
        return self.checker.placement()

    @property
    def norm_kinds(self) -> list[str]:
        return sorted({n.kind for n in self.checker.hidden_norms()}) or ["none"]

    @property
    def eps_shared_with_other_groups(self) -> list[str]:
        return self.checker._eps_shared_with_other_groups()


class WidthRules:
    """Mixin of :class:`~scaler_wizard.compiler.typecheck.checker.TypeChecker`."""

    def _group(self, st: _State, ident: A.Ident) -> str | None:
        name = ident.name
        if name in self.ir.groups:
            return name
        if name == "layers":
            st.bag.error(
                "SW201",
                "`layers` is grown with `insert`, `duplicate` or `stack`, not `widen`",
                ident.span,
                help="e.g. `insert layers every 4 identity` or `insert 2 layers after 11`",
            )
            return None
        if name == "kv_heads" and "heads" in self.ir.groups:
            st.bag.error(
                "SW201",
                "this model has no `kv_heads` group: its key/value heads are not a config value of their own "
                "(they follow the query heads, or are one head shared by all: multi-query attention)",
                ident.span,
                help="`widen heads` (where head_dim is not derived) or `widen hidden` grow the query heads; "
                     "shared key/value heads stay shared",
            )
            return None
        hint = suggest(name, self.ir.groups)
        st.bag.error(
            "SW201" if name not in ("experts",) else "SW312",
            f"unknown dimension group `{name}`"
            if name != "experts"
            else "this model has no `experts` group (it is dense)",
            ident.span,
            help=(f"did you mean `{hint}`? " if hint else "")
            + groups_summary(self.ir, st.sizes, st.depth)
            + ("; to make experts, `upcycle ffn experts <E> top <k>`" if name == "experts" else ""),
        )
        return None

    def _WidenStmt(self, i, s: A.WidenStmt, st: _State):
        group = self._group(st, s.group)
        if group is None:
            return
        if st.upcycled:
            st.bag.error(
                "SW318",
                f"`widen {s.group.name}` after `upcycle` in the same plan: width growth of an upcycled "
                "(mixture-of-experts) model is not lowered",
                s.span,
                help="put the `widen` statements before `upcycle` (the experts are then copies of the wider FFN)",
            )
            return
        old = st.sizes[group]
        new = self._new_size(st, s.amount, old, group)
        method_name = s.method.name if s.method else None
        if method_name is not None:
            method_name = M.WIDTH_ALIASES.get(method_name, method_name)
        integer_factor = new is not None and new % old == 0
        if method_name is None:
            method_name = M.DEFAULT_WIDTH_METHOD.get(group, "tile")
            if group == "hidden" and integer_factor:
                method_name = "tile"
        opts = M.WidthMethod.parse_options(s.options, st.bag)
        cls = M.WIDTH_METHODS.get(method_name)
        if cls is None or group not in cls.groups:
            applicable = [m.name for m in M.WIDTH_METHODS.values() if group in m.groups]
            hint = suggest(method_name, applicable) if cls is None else None
            st.bag.error(
                "SW202",
                f"unknown method `{method_name}`" if cls is None else f"method `{method_name}` does not apply to `{group}`",
                s.method.span if s.method else s.span,
                help=(f"did you mean `{hint}`? " if hint else "")
                + f"methods for `{group}`: "
                + ", ".join(f"`{m}`" for m in applicable),
            )
            return
        spec = cls.from_options(opts)
        self._unread_options(st, s, opts, spec, group)
        if new is None:
            return
        if spec.integer_factor_only and not integer_factor:
            st.bag.error(
                "SW303",
                f"`{method_name}` needs an integer factor, but {old} -> {new} is x{new / old:.4g}",
                s.amount.span,
                help=f"use `x{max(2, round(new / old))}`"
                + (", or `lemon`, which handles any size" if group in ("hidden", "ffn") else ""),
            )
            return
        exactness, reason = self._widen_exactness(WidenContext(self, st, s, group, old, new), spec)
        if exactness is None:
            return
        patch = self._width_patch(st, s, group, method_name, old, new)
        if patch is None:
            return
        if spec.untie:
            if group != "hidden" or not self.ir.tied:
                st.bag.error("SW207", "`untie` applies only to `widen hidden` on a model with tied embeddings", s.span)
                return
            st.untie = True
            patch["tie_word_embeddings"] = False
            st.bag.warning(
                "SW602",
                "untying the LM head stores vocab x hidden twice",
                s.span,
                help="without `untie=true` the tie is kept: the final norm gain absorbs the readers' 1/k",
            )
        st.sizes[group] = new
        st.config.update(patch)
        st.ops.append(
            ResolvedOp(
                index=i,
                kind="widen",
                span=s.span,
                text=_print_stmt(s),
                exactness=exactness,
                reason=reason,
                group=group,
                old_size=old,
                new_size=new,
                method=method_name,
                options=opts,
                config_patch=patch,
                spec=spec,
            )
        )
        self._implied_growth(i, s, st)

    def _implied_growth(self, i, s: A.WidenStmt, st: _State) -> None:
        """Grow the groups whose size the config derives from what this statement changed.

        Some families have no config key for a group and compute it (GPT-2: head_dim = n_embd //
        n_head, ffn = 4 * n_embd). After a change, re-evaluate each derived size; where it moved,
        the plan must grow that group too, or the grown config would describe another model:
        - head_dim moved: keep head_dim and grow `heads` instead (new heads, zero fan-out: exact);
        - any other group moved: widen it to the derived size (net2net / tile: exact).
        Each becomes an explicit op in the resolved plan, marked as implied by the statement.
        """
        stmt_text = _print_stmt(s)

        def implied(group: str, old: int, new: int, method: str, exactness: str, reason: str, patch: dict):
            st.ops.append(ResolvedOp(
                index=i, kind="widen", span=s.span, text=f"widen {group} to {new} {method}  # implied by `{stmt_text}`",
                exactness=exactness, reason=reason, group=group, old_size=old, new_size=new, method=method,
                options={"implied": True}, config_patch=patch, spec=M.WIDTH_METHODS[method](),
            ))

        for name, g in self.ir.groups.items():
            if g.config_key or not g.derived:
                continue
            if g.override_key and st.config.get(g.override_key) is not None:
                continue  # already pinned
            value = _eval_derived(g.derived, st.config)
            if value is None or value == st.sizes[name]:
                continue
            if g.override_key:
                # The group has a config key that fixes it: pin it at its current size.
                st.config[g.override_key] = st.sizes[name]
                st.ops[-1].config_patch[g.override_key] = st.sizes[name]
                continue
            if name == "head_dim":
                hd = st.sizes["head_dim"]
                heads_g = self.ir.groups.get("heads")
                if heads_g is None or not heads_g.config_key:
                    st.bag.error("SW308", f"head_dim would change to {value} and heads cannot compensate", s.span)
                    return
                hidden_now = value * st.config[heads_g.config_key]
                new_heads, rem = divmod(hidden_now, hd)
                kv = st.sizes.get("kv_heads")
                if rem or (kv and new_heads % kv):
                    st.bag.error(
                        "SW313",
                        f"this model derives head_dim = {g.derived}; keeping head_dim {hd} needs "
                        f"{hidden_now / hd:g} heads" + (f", a multiple of {kv} KV heads" if kv else ""),
                        s.amount.span,
                        help=f"pick a hidden size that is a multiple of {hd * (kv or 1)}",
                    )
                    return
                old_heads = st.sizes["heads"]
                patch = {heads_g.config_key: new_heads, **{k: new_heads for k in heads_g.companion_keys}}
                st.sizes["heads"] = new_heads
                st.config.update(patch)
                implied("heads", old_heads, new_heads, "zero", EXACT,
                        f"implied: the config derives head_dim = {g.derived}, so attention widens with hidden; "
                        "new heads have zero fan-out", patch)
            else:
                old_size = st.sizes[name]
                if value < old_size:
                    st.bag.error("SW313", f"`{name}` (derived as {g.derived}) would shrink to {value}", s.span)
                    return
                method = M.DEFAULT_WIDTH_METHOD.get(name, "tile")
                st.sizes[name] = value
                implied(name, old_size, value, method, EXACT if name not in ("vocab", "experts") else APPROX,
                        f"implied: the config derives {name} = {g.derived}", {})

    def _new_size(self, st: _State, amount, old: int, group: str) -> int | None:
        if isinstance(amount, A.Factor):
            raw = old * amount.value
            new = round(raw)
            if abs(raw - new) > 1e-9:
                st.bag.error(
                    "SW301",
                    f"x{amount.value:.12g} of {group}({old}) is {raw:.12g}, not a whole number of units",
                    amount.span,
                    help=(f"use `to {math.floor(raw)}` or `to {math.ceil(raw)}`" if math.floor(raw) > old
                          else f"use `to {math.ceil(raw)}`"),
                )
                return None
        elif isinstance(amount, A.ToSize):
            new = amount.value
        else:
            new = old + amount.value
        if new > MAX_WIDTH:
            st.bag.error("SW314", f"`{group}` of {new:,} units is beyond any model this tool can write", amount.span)
            return None
        if new <= old:
            st.bag.error(
                "SW302",
                f"this does not grow `{group}`: {old} -> {new}",
                amount.span,
                help="Scaler Wizard only grows models; pruning is out of scope",
            )
            return None
        return new

    def _widen_exactness(self, cx: WidenContext, spec: M.WidthMethod):
        """The group's rules (GQA, derived sizes, RoPE), then the method's exactness rule."""
        ir = self.ir
        if cx.group == "hidden":
            exactness, reason = spec.exactness(cx)
            norms = self.hidden_norms()
            if exactness and ir.tied and not spec.untie and not any(n.placement == "final" and n.weight and n.feeds_head
                                                                          for n in norms):
                cx.bag.error(
                    "SW315",
                    "the LM head is tied to the embedding and no final norm gain can absorb the readers' split",
                    cx.stmt.span,
                    help="add `untie=true` (the head gets its own copy; memory grows by vocab x hidden)",
                )
                return None, ""
            return exactness, reason
        if not self._group_rules(cx):
            return None, ""
        return spec.exactness(cx)

    def _group_rules(self, cx: WidenContext) -> bool:
        """Checks that hold for a group whatever the method (False after an error)."""
        ir, bag, s, group, old, new, st = self.ir, cx.bag, cx.stmt, cx.group, cx.old, cx.new, cx.st
        if group in ("heads", "kv_heads"):
            att = ir.attention
            if att is None:
                bag.error("SW312", "this model has no attention heads the compiler understands", s.group.span)
                return False
            if group == "heads" and "head_dim" in ir.groups and ir.groups["head_dim"].config_key is None:
                g = ir.groups["head_dim"]
                bag.error(
                    "SW308",
                    f"`{group}` cannot grow alone: this model derives head_dim as {g.derived or 'a function of other sizes'}",
                    s.group.span,
                    help="growing heads would change head_dim and every attention score; widen `hidden` by the same factor instead",
                )
                return False
            heads = st.sizes.get("heads", att.heads)
            kv = cx.kv = st.sizes.get("kv_heads", att.kv_heads)
            if group == "heads":
                if new % kv != 0:
                    lo, hi = (new // kv) * kv, (new // kv + 1) * kv
                    bag.error(
                        "SW304",
                        f"{new} query heads cannot be shared evenly by {kv} KV heads",
                        s.amount.span,
                        help=f"grouped-query attention needs heads % kv_heads == 0: try `to {hi}`"
                        + (f" or `to {lo}`" if lo > heads else ""),
                    )
                    return False
                return True
            # kv_heads
            if new % kv != 0:
                bag.error(
                    "SW304",
                    f"kv_heads can grow only by an integer factor ({kv} -> {new})",
                    s.amount.span,
                    help=f"each query head must map to a copy of its old KV head: try `x2` (to {2 * kv})",
                )
                return False
            if heads % new != 0:
                bag.error(
                    "SW304",
                    f"{heads} query heads cannot be shared evenly by {new} KV heads",
                    s.amount.span,
                    help=f"widen `heads` first (to a multiple of {new}), or pick kv_heads dividing {heads}",
                )
                return False
            return True
        if group == "head_dim":
            att = ir.attention
            if att is None:
                bag.error("SW312", "this model has no attention head_dim the compiler understands", s.group.span)
                return False
            if ir.groups["head_dim"].config_key is None:
                g = ir.groups["head_dim"]
                bag.error(
                    "SW308",
                    f"`head_dim` cannot change alone: this model derives it as {g.derived or 'a function of other sizes'}",
                    s.group.span,
                )
                return False
            if att.rope is not None and new % old != 0:
                bag.error(
                    "SW307",
                    f"RoPE makes head_dim growth {old} -> {new} inexact: every rotary frequency changes",
                    s.amount.span,
                    help=f"an integer factor keeps every old frequency (old pair i -> new pair k*i): try `x{max(2, round(new / old))}`",
                )
                return False
            if att.rope is not None:
                note = self._rope_head_dim(st, s, old, new)
                if note is None:
                    return False
                cx.note = note
        return True

    def _width_patch(self, st: _State, s: A.WidenStmt, group: str, method: str, old: int, new: int) -> dict | None:
        g = self.ir.groups[group]
        patch: dict[str, Any] = {}
        if g.config_key or g.override_key:
            patch[g.config_key or g.override_key] = new
            for k in g.companion_keys:  # structural switches that must keep the group's value
                patch[k] = new
        else:
            st.bag.error(
                "SW308",
                f"`{group}` is not bound to a config value ({g.derived or 'derived'}), so the grown config cannot express it",
                s.group.span,
            )
            return None
        att = self.ir.attention
        if group == "head_dim" and att is not None and att.rope is not None and att.rope.per_frequency and new % old == 0:
            from scaler_wizard.compiler.rope import grow_per_frequency

            patch.update(grow_per_frequency(st.config, att.rope.per_frequency, old * att.rope.rotary_dim // att.rope.head_dim // 2,
                                            new // old))
        if group == "hidden":
            r = new % old
            if method == "lemon" and r:
                eta2 = (new // old) * old / new
                for key in sorted({n.eps_key for n in self.hidden_norms() if n.eps_key}):
                    patch[key] = st.config.get(key, self.ir.config.get(key)) * eta2
        return patch

    def _check_config_invariants(self, st: _State) -> None:
        """transformers' config classes validate hidden_size % num_attention_heads == 0 (even
        when head_dim is explicit); a plan must not produce a config that fails to load."""
        hk = self.ir.groups.get("hidden")
        qk = self.ir.groups.get("heads")
        if not (hk and qk and hk.config_key and qk.config_key):
            return
        h0, q0 = self.ir.config.get(hk.config_key), self.ir.config.get(qk.config_key)
        h1, q1 = st.config.get(hk.config_key), st.config.get(qk.config_key)
        if not all(isinstance(v, int) and v > 0 for v in (h0, q0, h1, q1)):
            return
        if h0 % q0 == 0 and h1 % q1 != 0:
            culprit = next((o for o in reversed(st.ops) if o.group in ("hidden", "heads")), None)
            kv = st.sizes.get("kv_heads", 1)
            options = [n for n in range(q0, h1 + 1) if h1 % n == 0 and n % kv == 0 and n > q0][:3]
            st.bag.error(
                "SW313",
                f"{hk.config_key}={h1} is not a multiple of {qk.config_key}={q1}; transformers refuses such a config",
                culprit.span if culprit else A.Span(),
                help=f"pick heads dividing {h1}" + (": " + ", ".join(map(str, options)) if options else ""),
            )
