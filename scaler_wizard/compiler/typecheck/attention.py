"""Attention rules: RoPE under `widen head_dim` and the per-frequency rope lists of the grown config."""

from __future__ import annotations

from dataclasses import replace

from scaler_wizard.grammar import ast as A
from scaler_wizard.ir.model_ir import layer_kind
from scaler_wizard.compiler.typecheck.state import _State


class AttentionRules:
    """Mixin of :class:`~scaler_wizard.compiler.typecheck.checker.TypeChecker`."""

    def _rope_head_dim(self, st: _State, s: A.WidenStmt, old: int, new: int) -> str | None:
        """head_dim old -> new (an integer factor) under RoPE: None (and an SW307 error) when some old
        rotary frequency would move, else a note for the op's reason."""
        from scaler_wizard.compiler.rope import PROVEN_TYPES, frequencies_kept, grow_per_frequency

        rope = self.ir.attention.rope
        if rope.rotary_dim != rope.head_dim:
            st.bag.error(
                "SW307",
                f"head_dim growth with partial rotary ({rope.rotary_dim} of {rope.head_dim} dims rotated) is not supported: "
                "rotated and pass-through dims would need separate placement",
                s.group.span,
                help="only fully rotary models keep every frequency under `widen head_dim` (old pair i -> new pair k*i)",
            )
            return None
        k = new // old
        pairs = old // 2
        if rope.rope_type in PROVEN_TYPES and not rope.per_frequency:
            return ""
        key = self.ir.groups["head_dim"].config_key
        after = {**st.config, key: new, **grow_per_frequency(st.config, rope.per_frequency, pairs, k)}
        why = frequencies_kept(st.config, after, k, pairs)
        if why is not None:
            st.bag.error(
                "SW307",
                f"RoPE type `{rope.rope_type}` makes head_dim growth {old} -> {new} inexact: {why}",
                s.group.span,
                help="under `widen head_dim`, default, linear, llama3 and longrope keep every old frequency, "
                     "yarn only with `truncate: false`; widen `heads` instead (head_dim and every frequency kept)",
            )
            return None
        lists = f"; {'/'.join(rope.per_frequency)} grown {pairs} -> {k * pairs} entries (old entry i at k*i)" \
            if rope.per_frequency else ""
        return f"; {rope.rope_type} RoPE: old frequencies kept (checked with transformers in every regime){lists}"

    def _check_rope_lists(self, st: _State) -> None:
        """Per-frequency rope lists must have one entry per rotary pair of the grown model, or
        transformers loads the config and fails at the first forward."""
        from scaler_wizard.compiler.rope import list_length_problems

        att = self.ir.attention
        if att is None or att.rope is None or not att.rope.per_frequency or not att.rope.head_dim:
            return
        hd = st.sizes.get("head_dim", att.head_dim)
        pairs = hd * att.rope.rotary_dim // att.rope.head_dim // 2
        problems = list_length_problems(st.config, att.rope.per_frequency, pairs)
        if problems:
            culprit = next((o for o in reversed(st.ops) if o.group in ("head_dim", "hidden", "heads")), None)
            st.bag.error(
                "SW307",
                f"the grown config's rope parameters do not fit head_dim {hd}: " + "; ".join(problems),
                culprit.span if culprit else A.Span(),
                help="per-frequency rope lists (longrope's short/long factors) grow only with `widen head_dim` by an integer factor",
            )

    def _check_norms_over_ffn(self, st: _State) -> None:
        """SW355: a norm whose elementwise axis spans the FFN units (BitNet's ffn_sub_norm between the
        up and down projections) computes one statistic over all units; new units (zero, copied or
        split) change it, so no FFN growth is exact there."""
        spanning = [t for t in self.ir.tensors if any(ax.role == "elem" and "ffn" in ax.groups() for ax in t.axes)]
        if not spanning:
            return
        for op in st.ops:
            if op.kind != "widen" or op.group != "ffn":
                continue
            t = spanning[0]
            what = ("normalises over all FFN units at once; growing ffn would change its statistics"
                    if t.kind in ("norm_weight", "norm_bias") else
                    "acts elementwise on the FFN units (not a norm discovery recognised); growing ffn through it")
            st.bag.error(
                "SW355",
                f"`{op.text.split('  #')[0]}`: `{t.name}` ({t.module_type}) {what}, which is not supported yet",
                op.span,
                help="widen hidden / heads, insert / duplicate / stack layers and vocab growth leave it unchanged",
            )
            return

    def _check_unplaced_axes(self, st: _State) -> None:
        """SW357: width growth of a group when some tensor has an axis discovery could not place
        (role ``other``, constant factors only) of exactly the group's size: it is likely the same
        dimension used through an op without a shape rule (Aria's experts run through grouped_mm),
        and the grown config would re-size it while the program leaves it; in a module that holds a
        tensor of the group, also a constant axis of twice its size (two fused halves: gate and up).
        Not for a statement that a rule run before has refused with its reason (SW370: the unplaced
        axis is a layer kind's own attention dimension, MiMo-V2-Flash's sinks on its sliding layers)."""
        # a hybrid's token mixer (its stored decay tables too) is judged as a block: SW365 here, SW366
        # when the grown config re-sizes it
        in_mixer = tuple(mx.module + "." for mx in self.ir.mixers)
        refused = {(d.span.line, d.span.col) for d in st.bag.items if d.severity == "error"}
        for op in st.ops:
            if op.kind != "widen" or not op.group or not op.old_size:
                continue
            if op.span is not None and (op.span.line, op.span.col) in refused:
                continue
            grp = self.ir.groups.get(op.group)
            # modules holding a tensor of the group: a constant axis there of a small multiple of its
            # size is likely its units fused in a layout discovery does not read (gpt-oss's experts
            # interleave gate and up: gate_up_proj[..., ::2] / [..., 1::2], 2 x ffn)
            homes = {t.module for t in self.ir.tensors for name, _ in (grp.members if grp else ())
                     if t.name == name}
            for t in self.ir.tensors:
                if in_mixer and t.name.startswith(in_mixer):
                    continue
                k = next((k for k, ax in enumerate(t.axes) if ax.role == "other" and not ax.groups()
                          and ax.size == op.old_size), None)
                times = 1
                if k is None and t.module in homes and len(t.shape) > 1:
                    k = next((k for k, ax in enumerate(t.axes) if not ax.groups()
                              and ax.role in ("other", "out", "elem") and ax.size == 2 * op.old_size), None)
                    times = t.axes[k].size // op.old_size if k is not None else 1
                if k is None:
                    continue
                size = (f"has the size of `{op.group}` ({op.old_size})" if times == 1 else
                        f"is {times} x `{op.group}` ({times} x {op.old_size}: its units fused in a layout discovery "
                        "does not read)")
                st.bag.error(
                    "SW357",
                    f"`{op.text.split('  #')[0]}`" + (" (implied)" if (op.options or {}).get("implied") else "")
                    + f": discovery did not understand how `{t.name}` ({t.module_type}, shape {list(t.shape)}) is "
                    f"used; its axis {k} {size} and may be the same dimension",
                    op.span,
                    help=f"not supported yet for this model: ops that leave `{op.group}` as it is are unaffected",
                )
                return

    def _check_hybrid_mixers(self, st: _State) -> None:
        """SW365: width growth of a group that a hybrid's non-attention token mixer (``ModelIR.mixers``:
        a Mamba / gated-delta / lightning-attention block, a short convolution) carries inside it.
        The growth rules are transformer rules: a mixer may read the residual stream (an input
        projection's ``in`` axis over hidden) and write it (an output projection's ``out`` axis), and
        hold recognised norms; any other place of the group in its tensors (its heads, its inner width,
        a depthwise convolution's channels) would be grown by rules that do not describe it."""
        ir = self.ir
        if not ir.mixers:
            return
        norms = {x for n in ir.norms for x in (n.weight, n.bias) if x}
        readers, writers = set(ir.residual.readers), set(ir.residual.writers)
        tensors: dict[str, list] = {}  # a template may have one entry per layer kind
        for t in ir.tensors:
            tensors.setdefault(t.name, []).append(t)
        for op in st.ops:
            if op.kind != "widen" or not op.group:
                continue
            for mx in ir.mixers:
                hit = None
                for name, t in ((n, t) for n in mx.tensors for t in tensors.get(n, ())
                                if t.layers is None or set(t.layers) <= set(mx.layers)):
                    for k, ax in enumerate(t.axes):
                        if op.group not in ax.groups():
                            continue
                        if op.group == "hidden" and (ax.role == "in" and name in readers or ax.role == "out" and name in writers
                                                     or ax.role == "elem" and name in norms):
                            continue  # the block's boundary with the residual stream, or a norm discovery knows
                        hit = (t, k, ax)
                        break
                    if hit:
                        break
                if hit is None:
                    continue
                t, k, ax = hit
                st.bag.error(
                    "SW365",
                    f"`{op.text.split('  #')[0]}`" + (" (implied)" if (op.options or {}).get("implied") else "")
                    + f": `{ir.model_type}` is a hybrid: {_mixer_phrase(mx)}; its tensor `{t.name}` carries "
                    f"`{op.group}` on axis {k} ({ax.role}), and how that block uses `{op.group}` is not understood, so "
                    "it cannot be grown",
                    op.span,
                    help=f"nothing was written; ops that leave `{op.group}` as it is only change the attention and MLP "
                         "parts and the block's projections to and from the residual stream (`scaler-wizard ir` lists "
                         "the block's tensors)",
                )
                return

    def _check_attention_output_layout(self, st: _State) -> None:
        """SW367: heads / kv_heads / head_dim growth when the attention output projection does not read
        its input as heads x head_dim (DiffLlama's differential attention regroups the heads into
        pairs before o_proj): where the new heads' units land in o_proj's input is not known."""
        att = self.ir.attention
        if att is None or not att.o:
            return
        t = next((x for x in self.ir.tensors if x.name == att.o), None)
        ax = next((a for a in (t.axes if t else ()) if a.role == "in"), None)
        if ax is None or "heads" in ax.groups():
            return
        for op in st.ops:
            if op.kind == "insert" and op.method in ("identity", "zero", "cancel"):
                st.bag.error(
                    "SW367",
                    f"`{op.text.split('  #')[0]}`: the attention output projection `{att.o}` does not read its input "
                    "as heads x head_dim, so discovery does not understand this attention; an identity-style layer "
                    "is exact only if every other layer computes as before, which such an attention need not do when "
                    "the layers are renumbered (differential attention's lambda_init follows the layer index)",
                    op.span,
                    help="nothing was written; `duplicate` / `stack` (approx, measured by verify), widen ffn and "
                         "vocab growth are unaffected",
                )
                return
            if op.kind != "widen" or op.group not in ("heads", "kv_heads", "head_dim"):
                continue
            layout = " x ".join(f"{f.group}({f.size})" if f.group != "const" else str(f.size)
                                for seg in ax.segments for f in seg.factors)
            st.bag.error(
                "SW367",
                f"`{op.text.split('  #')[0]}`" + (" (implied)" if (op.options or {}).get("implied") else "")
                + f": the attention output projection `{att.o}` reads its input as [{layout}], not as heads x "
                "head_dim (the heads are regrouped before it, as in differential attention); where grown heads "
                "would land in it is not understood",
                op.span,
                help="nothing was written; widen ffn, insert / duplicate / stack layers and vocab growth leave the "
                     "attention as it is",
            )
            return

    def _check_layer_kind_shapes(self, st: _State) -> None:
        """SW370: width growth of a group that the layers of one kind carry and the layers of another
        kind lay out on their own sizes (a tensor template with per-kind entries: sliding-window
        layers whose attention has head counts / head dim of its own, ``swa_num_key_value_heads``).
        The program would grow one kind and leave the other, while the config keys of the two kinds
        need not follow that split (one key may size both: kv heads x 2 on sliding layers)."""
        ir = self.ir
        by_name: dict[str, list] = {}
        for t in ir.tensors:
            if t.layers is not None:
                by_name.setdefault(t.name, []).append(t)
        split = {n: ts for n, ts in by_name.items() if len(ts) > 1}
        if not split:
            return
        hints = {"heads": ("attention_heads", "num_heads", "n_head"), "kv_heads": ("key_value", "kv_head"),
                 "head_dim": ("head_dim",)}
        for op in st.ops:
            if op.kind != "widen" or not op.group:
                continue
            g = op.group
            hit = None
            for name, ts in split.items():
                have = [t for t in ts if any(g in ax.groups() for ax in t.axes)]
                lack = [t for t in ts if not any(g in ax.groups() for ax in t.axes)]
                if have and lack:
                    hit = (name, have[0], lack[0])
                    break
            att = ir.attention
            dims = ("heads", "kv_heads", "head_dim")
            first = dict(zip(dims, (att.heads, att.kv_heads, att.head_dim))) if att is not None else None
            shared = None  # the group's tensors carry it on both kinds, whose attention shapes differ
            if hit is None and first is not None and g in dims:
                shared = next((a for a in ir.attention_shapes
                               if (a.heads, a.kv_heads, a.head_dim) != tuple(first.values())), None)
            if hit is None and shared is None:
                continue
            if hit is None:
                # q_proj of MiMo-V2-Flash: heads on full and sliding layers alike, while the sliding
                # layers' kv heads (2 x num_key_value_heads) are a constant: the heads map is laid out
                # on the first shape's GQA groups, which the other kind's layers do not share
                t_have = next(t for t in ir.tensors if t.layers is not None and any(g in ax.groups() for ax in t.axes)
                              and not set(t.layers) <= set(shared.layers))
                t_lack = replace(t_have, layers=tuple(shared.layers))
                t_have = replace(t_have, layers=tuple(i for i in t_have.layers if i not in shared.layers))
                name = t_have.name
            else:
                name, t_have, t_lack = hit
            grp = ir.groups.get(g)
            key = grp.config_key if grp else None

            # the per-layer arrays whose entries set the two kinds apart
            arrays = [k for k in ir.layer_arrays
                      if layer_kind(ir.config, (k,), t_have.layers) != layer_kind(ir.config, (k,), t_lack.layers)]

            other = shared or next((a for a in ir.attention_shapes if set(t_lack.layers) <= set(a.layers)), None)
            second = dict(zip(dims, (other.heads, other.kv_heads, other.head_dim))) if other is not None else None
            bound_keys = {x.config_key for x in ir.groups.values() if x.config_key}

            def kind_of(t):
                return layer_kind(ir.config, arrays, t.layers) or "layers " + ",".join(map(str, t.layers))

            def shape_of(sz):
                return f"{sz['heads']} heads, {sz['kv_heads']} kv heads, head dim {sz['head_dim']}"

            def other_keys():
                # the other kind's own keys: for each size that differs from the first kind's, the one
                # config key of that value named like the dimension (swa_num_key_value_heads=16)
                out = []
                for d in dims:
                    if second[d] == first[d]:
                        continue
                    ks = [k for k, v in ir.config.items() if isinstance(v, int) and not isinstance(v, bool)
                          and v == second[d] and k not in bound_keys and any(h in k for h in hints[d])]
                    if len(ks) == 1:
                        out.append(f"{ks[0]}={second[d]}")
                return out

            if first is not None and g in dims:
                mine = f"{kind_of(t_have)}: {shape_of(first)}" + (f", {key}={grp.size}" if key else "")
            else:
                mine = f"{kind_of(t_have)}: `{name}` {list(t_have.shape)} on {g}"
            if second is not None and first is not None and g in dims:
                keys = other_keys()
                theirs = f"{kind_of(t_lack)}: {shape_of(second)}" + (", " + ", ".join(keys) if keys else "")
            else:
                theirs = f"{kind_of(t_lack)}: {list(t_lack.shape)} there, not laid out on {g}"
            shapes = "attention shapes" if g in ("heads", "kv_heads", "head_dim") else "shapes"
            why = (f"the program would grow `{name}` in layers {list(t_have.layers)} only, and the grown config need "
                   "not size the other kind that way") if shared is None else (
                f"the growth is laid out on the first shape's heads (its GQA groups, its head dim), which the "
                f"layers {list(shared.layers)} do not share")
            st.bag.error(
                "SW370",
                f"`{op.text.split('  #')[0]}`" + (" (implied)" if (op.options or {}).get("implied") else "")
                + f": {g} growth on layers of two {shapes} ({mine}; {theirs}) is not supported: {why}",
                op.span,
                help=f"nothing was written; ops that leave `{g}` as it is (widen ffn / vocab, insert / duplicate / "
                     "stack layers) are unaffected",
            )
            return

    def _check_second_ffn_width(self, st: _State) -> None:
        """SW369: ffn growth when a residual writer in the layers (not attention, not a hybrid's mixer)
        reads an inner axis that is not ffn: a second FFN of another width (Afmoe's shared experts,
        moe_intermediate_size x num_shared_experts, next to experts of moe_intermediate_size). No key
        binds it, and the keys ffn growth changes may size it: the grown config would re-size it."""
        ir = self.ir
        ops = [o for o in st.ops if o.kind == "widen" and o.group == "ffn"]
        if not ops or "ffn" not in ir.groups:
            return
        att = ir.attention
        skip = {x for x in (att.o, att.fused_qkv) if x} if att else set()
        skip |= {t for m in ir.mixers for t in m.tensors}
        tensors: dict[str, list] = {}  # a template may have one entry per layer kind
        for t in ir.tensors:
            tensors.setdefault(t.name, []).append(t)
        for name, t in ((n, t) for n in ir.residual.writers for t in tensors.get(n, ())):
            if t.layers is None or name in skip or t.kind != "weight":
                continue
            ax = next((a for a in t.axes if a.role == "in"), None)
            if ax is None or ax.groups():
                continue
            op = ops[0]
            st.bag.error(
                "SW369",
                f"`{op.text.split('  #')[0]}`" + (" (implied)" if (op.options or {}).get("implied") else "")
                + f": `{name}` writes the residual stream from an inner axis of {ax.size} that is not ffn "
                f"({ir.groups['ffn'].size}, `{ir.groups['ffn'].config_key or ir.groups['ffn'].derived}`): a second "
                "FFN width (shared experts, say) that no config key binds; the values ffn growth changes may size it",
                op.span,
                help="nothing was written; width growth of other groups, depth growth and vocab growth are unaffected",
            )
            return

    def _check_elementwise_on_hidden(self, st: _State) -> None:
        """SW358: hidden growth when a parameter acts elementwise on the hidden axis without being a
        norm gain or bias that discovery recognised (Doge's ``input_residual`` scaling the residual
        stream per channel): whether its new entries must be copies, ones or zeros depends on the
        op it feeds, which discovery did not establish. A bias counts too when its hidden axis is
        ``elem``, not ``out`` (gpt-oss's per-expert ``down_proj_bias``, added after the experts'
        grouped matmul): the hidden pass grows only the writers' ``out`` rows and known norms."""
        names = {x for n in self.ir.norms if n.group == "hidden" for x in (n.weight, n.bias) if x}
        odd = [t for t in self.ir.tensors if t.name not in names
               and any(ax.role == "elem" and "hidden" in ax.groups() for ax in t.axes)]
        if not odd:
            return
        for op in st.ops:
            if op.kind != "widen" or op.group != "hidden":
                continue
            t = odd[0]
            st.bag.error(
                "SW358",
                f"`{op.text.split('  #')[0]}`: `{t.name}` ({t.module_type}, shape {list(t.shape)}) acts elementwise on "
                "the hidden axis but is not a norm gain or bias discovery recognised; growing hidden is not "
                "supported for it yet",
                op.span,
                help="ops that leave hidden as it is (widen ffn, insert / duplicate / stack layers, vocab) are unaffected",
            )
            return

    def _check_head_dim_readers(self, st: _State) -> None:
        """SW359: head_dim growth when a tensor other than the q/k/v/o projections and the q/k norms
        carries head_dim (HRM's gate_proj gating the attention output per head dim): where its new
        units go is not established."""
        att = self.ir.attention
        if att is None or att.fused_qkv or "head_dim" not in self.ir.groups:
            return
        bases = {t.rsplit(".", 1)[0] for t in (att.q, att.k, att.v, att.o) if t}
        norms = {n.weight for n in self.ir.norms if n.group == "head_dim" and n.weight}
        odd = [name for name, _ in self.ir.groups["head_dim"].members
               if name.rsplit(".", 1)[0] not in bases and name not in norms]
        if not odd:
            return
        for op in st.ops:
            if op.kind != "widen" or op.group != "head_dim":
                continue
            st.bag.error(
                "SW359",
                f"`{op.text.split('  #')[0]}`: `{odd[0]}` carries head_dim but is not a q/k/v/o projection or a q/k "
                "norm; growing head_dim through it is not supported yet",
                op.span,
                help="widen heads / kv_heads (where the config allows), ffn, layers and vocab are unaffected",
            )
            return

    def _check_fixed_groups(self, st: _State) -> None:
        """SW356: growth of a group that discovery marked ``Group.fixed``: a probe trace with the key
        doubled disagreed (CodeGen's fused qkv is split into a fixed number of chunks that the traced
        head count happened to equal), or a non-parameter table over the group is re-computed from
        the config (CTRL's sinusoidal positions over hidden)."""
        for op in st.ops:
            g = self.ir.groups.get(op.group) if op.kind == "widen" and op.group else None
            if g is None or not g.fixed:
                continue
            st.bag.error(
                "SW356",
                f"`{op.text.split('  #')[0]}`" + (" (implied)" if (op.options or {}).get("implied") else "")
                + f": `{op.group}` cannot grow in this model: {g.fixed}",
                op.span,
                help=f"ops that leave `{op.group}` as it is (and imply no growth of it) are unaffected",
            )
            return

    def _check_size_constants(self, st: _State) -> None:
        """SW381: growth of a size that a constant of the forward is computed from
        (``ModelIR.size_constants``, found by differential tracing: MiniCPM3's residual branches scaled
        by ``scale_depth / sqrt(num_hidden_layers)``, its logits by ``dim_model_base / hidden_size``).
        The copied weights would be exact, but transformers re-computes the constant from the grown
        config, so the grown model computes another function."""
        facts = self.ir.size_constants
        if not facts or st.bag.has_errors:
            return  # a refusal that names the cause (ALiBi's head-count slopes: SW356) comes first
        depth_key = self.ir.layers_key
        hidden_key = (self.ir.groups.get("hidden").config_key if "hidden" in self.ir.groups else None)
        for op in st.ops:
            if op.kind in ("insert", "duplicate", "stack"):
                key = depth_key
            elif op.kind == "widen" and op.group == "hidden":
                key = hidden_key
            else:
                continue
            fact = next((f for f in facts if f[0] == key), None)
            if fact is None:
                continue
            _, mod, before, after = fact
            if key == depth_key:
                n = self.ir.traced_layers
                change = f"{before:.6g} in the {n}-layer trace, {after:.6g} with {n + 1} layers"
            else:
                h = self.ir.groups["hidden"].size
                change = f"{before:.6g} at `{key}` = {h}, {after:.6g} at {2 * h}"
            st.bag.error(
                "SW381",
                f"`{op.text.split('  #')[0]}`" + (" (implied)" if (op.options or {}).get("implied") else "")
                + f": `{self.ir.model_type}` computes a constant of its forward from `{key}` (in "
                f"`{mod or 'the model'}`: {change}); transformers would "
                "re-compute it for the grown config, so the grown model would not compute the same function",
                op.span,
                help=f"ops that leave `{key}` as it is are unaffected (muP-style scaling by the depth or the width)",
            )
            return

    def _check_norms_over_heads(self, st: _State) -> None:
        """SW351: a norm whose elementwise axis spans heads (or kv_heads) computes one statistic over
        all heads (OLMo-2's q_norm over heads x head_dim); new heads, zero head_dim units or fresh
        KV heads change that statistic, so no attention growth is exact there."""
        spanning = [t for t in self.ir.tensors if t.kind in ("norm_weight", "norm_bias") and any(
            ax.role == "elem" and set(ax.groups()) & {"heads", "kv_heads"} for ax in t.axes)]
        if not spanning:
            return
        for op in st.ops:
            if op.kind != "widen" or op.group not in ("heads", "kv_heads", "head_dim"):
                continue
            hit = [t for t in spanning if op.group == "head_dim" or any(
                ax.role == "elem" and op.group in ax.groups() for ax in t.axes)]
            if not hit:
                continue  # e.g. a k_norm over kv_heads while only query heads grow
            t = hit[0]
            over = next(" x ".join(ax.groups()) for ax in t.axes if ax.role == "elem")
            st.bag.error(
                "SW351",
                f"`{op.text.split('  #')[0]}`: `{t.name}` normalises over all heads at once ({over}); growing {op.group} "
                "would change its statistics, which is not supported yet",
                op.span,
                help="widen ffn, insert / duplicate / stack layers and vocab growth leave it unchanged",
            )
            return


def _mixer_phrase(mx) -> str:
    """"layers 0,2 mix tokens with `model.layers.{i}.linear_attn` (Qwen3NextGatedDeltaNet: conv1d, cumsum,
    matmul), not softmax attention" -- the SW365 wording of one ``MixerInfo``."""
    from scaler_wizard.ir.printer import ranges

    ops = [o for o in mx.ops if o != "softmax"]
    what = ("a softmax attention of a form discovery does not recognise" if "softmax" in mx.ops
            else "not softmax attention (a state-space, linear-attention or convolution mixer)")
    return (f"layers {ranges(mx.layers)} mix tokens with `{mx.module}` ({mx.module_type}: {', '.join(ops)}), "
            f"{what}")
