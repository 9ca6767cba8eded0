"""Type checker: resolve a parsed plan against a model's IR into a :class:`ResolvedPlan`.

Split by concept: ``checker`` (entry, IR facts), ``settings`` (plan-wide settings, shared options),
``width`` (widen), ``attention`` (RoPE / head_dim), ``depth`` (insert, duplicate, stack, layer arrays),
``context`` (extend context), ``moe`` (upcycle), ``grow`` (grow to, size policy), ``result`` (costs, the resolved plan), ``state``.
Growth methods themselves (options, exactness rules, lowering) are modules of ``compiler/methods``.

Every problem of the plan is collected (not just the first) and raised together as a
:class:`PlanError`. Diagnostic codes (stable):

=====  ==================================================================================
SW201  unknown dimension group
SW202  unknown or inapplicable method for the group
SW203  unknown layer init
SW204  unknown option key for the statement
SW205  layer index or range out of bounds
SW206  unknown dtype
SW207  bad option value
SW208  no model: the plan has no ``model`` statement and none was given with ``--model``
SW209  a plan-wide setting (``model``, ``seed``, ``noise``, ``dtype``, ``train``) given twice
SW210  a statement this build parses but cannot resolve yet (``at step`` stages outside ``train --plan``)
SW402  the plan's ``model`` cannot be loaded (missing, unreadable, not available offline)
SW301  the amount does not give a whole number of units (``x1.3`` of 9 heads)
SW302  the amount does not grow the group (``to`` a smaller size, ``x1``, ``by 0``)
SW303  the method needs an integer factor
SW304  grouped-query attention divisibility violated
SW305  identity-style layer insertion in a Post-LN model
SW306  non-integer LayerNorm residue in a Post-LN model
SW307  head_dim growth that RoPE (or its scaling type) makes inexact, or rope lists that no longer fit
SW308  the group's size is derived from other config values and cannot change alone
SW309  upcycling not supported for this model
SW310  experts / top-k out of range
SW311  ``grow to`` target unreachable or not larger than the model
SW312  the group does not exist in this model (``experts`` on a dense model)
SW313  the plan would leave a config value inconsistent
SW314  the result would be absurdly large (more than 10,000 layers or 2^31 units)
SW315  widening hidden with a tied LM head needs a final norm gain (or ``untie=true``)
SW316  the grown config would not describe the grown tensors (raised by compiler/conform.py)
SW317  the plan grows the parameters more than 64x (every statement, as ``grow to``), or applying
       it needs more memory than this machine has
SW318  width growth after ``upcycle`` in the same plan (write ``widen`` first)
SW320  ``at step`` stage steps do not increase (compiler/stages.py)
SW321  an ``at step`` stage step outside the training run (1 .. steps - 1)
SW322  an unknown ``at step`` option or a bad value (``optimizer=carry|reset``, ``rewarm=<steps>``)
SW323  a statement inside an ``at step`` stage that changes the model class (``upcycle``)
SW324  ``train --plan``: the plan grows the model before its ``at step`` stages, but MODEL_DIR is not
       ``apply``'s output of that growth (commands/train.py)
SW330  LESA cannot decompose this model (fewer than 3 layers, or per-layer tensors that differ)
SW331  a LESA option out of range (epochs, width, rank, seed)
SW332  ``extend context`` cannot be expressed for this model (method, options, already scaled RoPE,
       not longer, no RoPE or learned position table)
SW350  the model is not a transformer: its layers mix tokens without an attention op (state-space,
       recurrent or convolutional models such as Mamba and RWKV); nothing is grown
SW351  a norm normalises over several heads at once (OLMo-2's q/k norms over the whole projection):
       growing heads, kv_heads or head_dim would change its statistics (not supported yet)
SW352  the layers hold a softmax that discovery does not recognise as attention (Bloom's ALiBi
       baddbmm): refused, naming the module, rather than grown by guesswork
SW353  depth growth (insert / duplicate / stack) where discovery found no layer stack: the config's
       depth key is not the length of any module list of the traced model (BART-style causal LMs
       built from an encoder-decoder config take their depth from ``decoder_layers``)
SW354  an identity-style layer (``identity`` / ``zero`` / ``cancel``) in a model with a per-layer
       tensor whose use discovery did not understand (an axis of role ``other``, e.g. experts run
       through an op without a shape rule): it may write to the residual stream un-zeroed
SW355  a norm normalises over all FFN units at once (BitNet's ffn_sub_norm), or another parameter
       acts elementwise on them (Dory's suv_gate): growing ffn is not supported yet
SW356  growth of a group discovery marked as fixed: a probe trace disagreed (CodeGen: with heads ==
       its fixed 4 model-parallel chunks the fused qkv looks per-head; a trace with twice the heads
       is not), or a non-parameter table over it is re-computed from the config (CTRL's sinusoidal
       positions over hidden)
SW357  width growth of a group when a tensor has an axis discovery could not place (role ``other``)
       of exactly that group's size (Aria's grouped_mm experts over hidden)
SW358  hidden growth when a parameter acts elementwise on hidden without being a recognised norm
       gain or bias (Doge's ``input_residual`` per-channel residual scale)
SW359  head_dim growth when a tensor other than q/k/v/o and the q/k norms carries head_dim (HRM's
       attention-output gate_proj)
SW383  widen heads / kv_heads / vocab when a tensor uses the group in a role its pass does not grow
       (Dory's s_gate elementwise on heads x head_dim, its lm_head.logit_scale on vocab)
SW384  the plan's final sizes break a tie discovery's config probes found (ModelIR.config_ties): an
       axis the computation sizes by some groups and the config by others (Helium's o_proj input,
       heads x head_dim in the forward, hidden_size in __init__), one the config sizes in a way
       discovery did not understand (Zaya's q/k convolutions), or a tensor the config builds only
       for some values (ELECTRA's embeddings_project, absent once hidden_size == embedding_size)
SW385  depth growth when the config stores another number under its depth key than the layer count
       of the model it builds (Dory: each layer serialised as 2 blocks)
SW365  width growth of a group that a hybrid's non-attention token mixer carries inside it (``ModelIR.mixers``:
       Mamba / gated-delta / lightning-attention blocks, short convolutions), beyond its projections from
       and to the residual stream: the growth rules do not describe that block
SW366  the grown config would re-size a tensor of a hybrid's non-attention mixer that the program leaves as
       it is (its inner sizes follow a key the plan changes; raised by compiler/conform.py instead of SW316)
SW367  heads / kv_heads / head_dim growth when the attention output projection does not read heads x head_dim
       (DiffLlama's differential attention regroups the heads before o_proj)
SW368  depth growth of a model whose layers differ in kind (dense MLP vs experts) by a scalar config key
       (``first_k_dense_replace``), not a per-layer array, when the grown order is not the old one continued
SW369  ffn growth when a residual writer in the layers reads an inner width that is not ffn (a second FFN:
       Afmoe's shared experts, moe_intermediate_size x num_shared_experts) bound to no config key
SW370  width growth of a group that layers of one kind carry while layers of another kind lay the same
       tensor out on sizes of their own (sliding-window layers with their own head counts / head dim,
       ``swa_num_key_value_heads``; ``ModelIR.attention_shapes``): names both kinds and their keys; also
       heads / kv_heads / head_dim growth when both kinds carry the group but their attention shapes differ
       (MiMo-V2-Flash's sliding layers: 2 x num_key_value_heads kv heads, the heads map is laid out on one)
SW371  depth growth when a tensor outside the layers holds one slice per layer (Gemma-4's
       ``embed_tokens_per_layer``: [vocab, layers x per-layer width]); raised by compiler/conform.py
SW372  depth growth whose layer layout transformers' config validation refuses (per-layer overrides
       that must agree within a layer type, layer counts that must add up to the depth); compiler/conform.py
SW373  the grown tensors cannot be stored under the names transformers saves the family with (its reverse
       weight conversion uses an op the writer cannot follow); found by check, compiler/conform.py
SW601  (warning) the plan contains approximate ops
SW602  (warning) untying the LM head doubles its memory
SW603  (warning) a plan-wide setting (``noise``) does not apply to an op
SW604  (warning) a scalar config key can no longer describe the grown per-layer layout
SW605  (warning) the plan has no growth statements (``apply`` would write an unchanged copy)
SW620  (warning) an ``at step`` stage without growth statements
SW621  (warning) an ``at step`` stage's ``rewarm`` lasts past the end of the run
SW630  (warning) the memory and time a LESA fit needs (per matrix kind, per inserted layer)
SW640  (warning) ``check --hardware``: no training setup fits the devices (says what would;
       emitted by commands/check.py from runtime/hardware.py)
=====  ==================================================================================
"""

from scaler_wizard.compiler.typecheck.checker import TypeChecker, check_plan
from scaler_wizard.compiler.typecheck.state import (
    DTYPE_ALIASES, DTYPES, MAX_LAYERS, MAX_WIDTH, SEED_MAX, UPCYCLE_TARGETS, groups_summary,
)
from scaler_wizard.compiler.typecheck.width import WidenContext

__all__ = ["TypeChecker", "check_plan", "WidenContext", "DTYPES", "DTYPE_ALIASES", "MAX_LAYERS", "MAX_WIDTH",
           "SEED_MAX", "UPCYCLE_TARGETS", "groups_summary"]
