"""From a traced graph and its dimension classes to a :class:`ModelIR`.

Nothing here is keyed by architecture: groups are named from the graph (embedding width = hidden,
embedding rows / logits = vocab, attention reshape = heads x head_dim, inner dim of the residual
writers that are not attention = ffn, indexed stacked weights = experts) and bound to config keys
by value and, when ambiguous, by differential tracing.

The package is split by concept: ``graph`` (helpers), ``analysis`` (naming groups from the trace),
``binding`` (config keys, differential tracing), ``tensors`` (classification), ``norms``,
``attention`` (incl. RoPE), ``residual`` (MoE and the residual stream), ``build`` (the IR).
"""

from scaler_wizard.ir.discovery.analysis import Analysis, analyse
from scaler_wizard.ir.discovery.attention import ATTN_OPS, Attn, per_frequency_keys
from scaler_wizard.ir.discovery.binding import fit_rope_lists
from scaler_wizard.ir.discovery.build import assemble, build_ir

__all__ = ["ATTN_OPS", "Analysis", "Attn", "analyse", "assemble", "build_ir", "fit_rope_lists", "per_frequency_keys"]
