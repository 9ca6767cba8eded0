"""`extend context`: grow a learned absolute position table to the new length (RoPE models change
only their config: nothing to build). Rows per :func:`scaler_wizard.compiler.rope.table_row_map`."""

from __future__ import annotations

from scaler_wizard.compiler import program as P
from scaler_wizard.compiler.passes.base import LowerState, Pass
from scaler_wizard.compiler.resolved import APPROX
from scaler_wizard.compiler.rope import table_row_map


class ExtendContextPass(Pass):
    name = "extend-context"

    def _table(self, st: LowerState):
        from scaler_wizard.compiler.methods.extend_context import position_table

        return position_table(st.ir, self.op.group) if self.op.method in ("copy", "interpolate") else None

    def requires(self, st: LowerState) -> None:
        t = self._table(st)
        if t is not None and t[0] not in st.tensors:
            raise self.fail(st, f"no position table `{t[0]}` in the model")

    def apply(self, st: LowerState) -> None:
        t = self._table(st)
        if t is None:
            return
        name, group, offset = t
        ts = st.tensors[name]
        old_rows = ts.node.shape[0]
        new_rows = self.op.new_size + offset
        rows = table_row_map(old_rows, new_rows, self.op.method, offset)
        a = P.Index(ts.node, 0, tuple(r[0] for r in rows))
        if any(r[2] for r in rows):
            b = P.Index(ts.node, 0, tuple(r[1] for r in rows))
            node = P.Add(P.MulAxis(a, 0, tuple(1.0 - r[2] for r in rows)), P.MulAxis(b, 0, tuple(r[2] for r in rows)))
        else:
            node = a
        ts.node = node
        ts.changed = True
        ts.region = [(0, old_rows)] + [(0, d) for d in node.shape[1:]] if self.op.method == "copy" else None
        if self.op.exactness == APPROX:
            ts.exactness = APPROX
        ts.notes.append(f"position table {old_rows} -> {new_rows} rows ({self.op.method})")
        if group in st.sizes:
            st.sizes[group] = self.op.new_size
        elif not any(group in ax.groups() for ax in ts.axes):
            ts.axes = ()  # an unbound row count (OPT's length + 2): the config, not a group, describes it

    def ensures(self, st: LowerState) -> None:
        super().ensures(st)
        t = self._table(st)
        if t is not None and st.tensors[t[0]].node.shape[0] != self.op.new_size + t[2]:
            raise self.fail(st, f"{t[0]}: {st.tensors[t[0]].node.shape[0]} rows")
