"""`widen vocab` (mean): add token rows to the embedding and the LM head.

Every tensor with an axis on the ``vocab`` group (the input embedding's rows, the LM head's rows and
an output bias, a single tensor when the head is tied) gets the new rows appended, each equal to the
mean of the old rows along that axis: the common default for new tokens. Approx by design (the type
checker says so): the new head rows add terms to the softmax denominator, so every probability
shifts a little; ``verify`` compares the old vocabulary's logits and reports the drift.
"""

from __future__ import annotations

from scaler_wizard.compiler import program as P
from scaler_wizard.compiler.methods.axisops import MeanAxis
from scaler_wizard.compiler.methods.unitmap import zero_map
from scaler_wizard.compiler.passes.base import LowerState, Pass
from scaler_wizard.compiler.passes.common import rewrite_axis


class WidenVocab(Pass):
    name = "widen-vocab"

    def requires(self, st: LowerState) -> None:
        self.require_widen(st, "vocab", ("mean",), roles=("index", "out"))

    def apply(self, st: LowerState) -> None:
        op = self.op
        d, d2 = op.old_size, op.new_size
        m = zero_map(d, d2)  # old rows in place, new rows appended

        def fn(x, ax):
            return P.Concat((x, P.Tile(MeanAxis(x, ax), ax, d2 - d)), ax)

        for name, ts, a in st.members("vocab"):
            rewrite_axis(st, ts, a, "vocab", m, fn, exactness=op.exactness, keeps_values=True,
                         text=f"vocab {d}->{d2} (mean): {d2 - d} new rows, each the mean of the old rows")
        st.sizes["vocab"] = d2
