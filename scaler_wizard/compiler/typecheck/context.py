"""Context-window rules: `extend context to <n> [method] [k=v]` (the mathematics: compiler/rope.py;
the method: compiler/methods/extend_context.py)."""

from __future__ import annotations

from types import SimpleNamespace

from scaler_wizard.compiler.resolved import ResolvedOp
from scaler_wizard.grammar import ast as A
from scaler_wizard.grammar.printer import statement_text as _print_stmt
from scaler_wizard.compiler.typecheck.state import _State


class ContextRules:
    """Mixin of :class:`~scaler_wizard.compiler.typecheck.checker.TypeChecker`."""

    def _ExtendContext(self, i, s: A.ExtendContext, st: _State):
        from scaler_wizard.compiler import rope as R
        from scaler_wizard.compiler.methods.extend_context import ExtendContext, position_table

        opts = ExtendContext.parse_options(s.options, st.bag)
        if any(o.kind == "extend" for o in st.ops):
            st.bag.error("SW332", "the context is extended twice", s.span, help="keep one `extend context` statement")
            return
        n = s.length.value
        rope = self.ir.attention.rope if self.ir.attention is not None else None
        try:
            key, old = R.context_length(st.config)
        except R.ExtendError as e:
            st.bag.error("SW332", str(e), s.span)
            return
        table = position_table(self.ir, key)
        method = s.method.name if s.method is not None else ("yarn" if rope is not None else "copy")
        try:
            if rope is not None:
                if method in R.TABLE_EXTEND_METHODS:
                    raise R.ExtendError(f"`{method}` grows a learned position table; this model uses RoPE: use one of "
                                        + ", ".join(R.ROPE_EXTEND_METHODS))
                ext = R.extend_rope(st.config, n, method, opts, rotary_pairs=rope.rotary_dim // 2)
            elif table is not None:
                if method in R.ROPE_EXTEND_METHODS:
                    raise R.ExtendError(f"`{method}` rescales RoPE; this model has a learned position table: use "
                                        + " or ".join(R.TABLE_EXTEND_METHODS))
                ext = R.extend_table(st.config, n, method, opts)
            else:
                raise R.ExtendError("this model has neither RoPE nor a learned position table the compiler "
                                    "understands (ALiBi and relative positions are not supported)")
        except R.ExtendError as e:
            where = s.method.span if s.method is not None and "method" in str(e) else s.span
            st.bag.error("SW332", str(e), where)
            return
        if n > 16 * 1024 * 1024:
            st.bag.error("SW314", f"a context of {n:,} tokens is beyond any model this tool can write", s.length.span)
            return
        spec = ExtendContext.from_options(opts)
        exactness, reason = spec.exactness(SimpleNamespace(extension=ext))
        if table is not None and table[1] in st.sizes:
            st.sizes[table[1]] = n
        st.config.update(ext.patch)
        st.ops.append(
            ResolvedOp(
                index=i,
                kind="extend",
                span=s.span,
                text=_print_stmt(s),
                exactness=exactness,
                reason=reason,
                group=table[1] if table is not None else "context",
                old_size=old,
                new_size=n,
                method=method,
                options=opts,
                config_patch=ext.patch,
                spec=spec,
            )
        )
