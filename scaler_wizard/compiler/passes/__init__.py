"""Lowering passes: one per dimension group (`widen_<group>.py`, switching on the method), `upcycle`
and `depth` (every depth statement at once). Growth methods (``compiler/methods``) name their pass
through :meth:`~scaler_wizard.compiler.methods.base.Method.lowering`."""

from scaler_wizard.compiler.passes.widen_experts import WidenExperts
from scaler_wizard.compiler.passes.widen_ffn import WidenFFN
from scaler_wizard.compiler.passes.widen_head_dim import WidenHeadDim
from scaler_wizard.compiler.passes.widen_heads import WidenHeads
from scaler_wizard.compiler.passes.widen_hidden import WidenHidden
from scaler_wizard.compiler.passes.widen_kv_heads import WidenKVHeads
from scaler_wizard.compiler.passes.widen_vocab import WidenVocab

WIDTH_PASSES = {
    "hidden": WidenHidden,
    "ffn": WidenFFN,
    "heads": WidenHeads,
    "kv_heads": WidenKVHeads,
    "head_dim": WidenHeadDim,
    "experts": WidenExperts,  # approx: copies of old experts, router rows copied
    "vocab": WidenVocab,  # approx: new token rows are the mean row
}
