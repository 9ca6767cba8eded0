"""`widen hidden` (tile / lemon): grow the residual stream.

* residual -> [tile_k(x); residue_r]: residue 0 for RMSNorm models, mean(x) for LayerNorm (LEMON);
* writers (embedding, o_proj, down_proj, biases, position embeddings): rows tiled, residue rows
  zero (RMSNorm) or the mean of the rows (LayerNorm); Gemma-style sqrt(hidden) embedding scale is
  compensated by multiplying the embedding by sqrt(d/d');
* readers (q/k/v, gate/up, untied LM head): columns tiled and scaled by the copies' shares (unequal
  by default: breaks symmetry), residue columns random (they read a normalised residue of 0);
* norm gains: eta * [tile(g); rho] (Gemma (1+w): stored eta*(1+w) - 1), biases [tile(b); 0];
  epsilon x eta^2 comes from the type checker's config patch;
* tied LM head: the embedding is both writer and reader, so the gain of the final norm the head reads
  (``NormInfo.feeds_head``; not a final norm before a head transform) carries the readers' shares (and
  1/embedding scale) -- the tie is kept unless the op says ``untie=true``;
* a norm epsilon that is not a config value (OPT's ``nn.LayerNorm`` default 1e-5) cannot be
  rescaled by eta^2. With a residue (non-integer factor) in a Pre-LN model, the whole stream is
  scaled by 1/eta instead: every writer's rows x 1/eta make the grown stream's variance (LayerNorm)
  or mean-square (RMSNorm) equal the original's, so the fixed epsilon stays exact, and the gains
  eta * g already undo the 1/eta at every norm's output.
"""

from __future__ import annotations

import math

from scaler_wizard.compiler import program as P
from scaler_wizard.compiler.methods.axisops import fan_out_coef, grow_units, mean_fill, random_fill
from scaler_wizard.compiler.methods.unitmap import eta as eta_of, rng_for, tile_map
from scaler_wizard.compiler.passes.base import LowerState, Pass, TState, normalise_axes, option
from scaler_wizard.compiler.passes.common import rewrite_axis


class WidenHidden(Pass):
    name = "widen-hidden"

    def requires(self, st: LowerState) -> None:
        op = self.op
        self.require_widen(st, "hidden", ("tile", "lemon"))
        r = op.new_size % op.old_size
        kinds = {n.kind for n in st.ir.norms if n.group == "hidden"}
        if r and st.ir.residual.placement == "post" and "layernorm" in kinds:
            raise self.fail(st, "a LayerNorm residue is not exact in a Post-LN model (SW306)")
        if r and op.method == "tile":
            raise self.fail(st, "tile needs an integer factor")
        unknown = kinds - {"rmsnorm", "layernorm", "rmsnorm_1p"}
        if unknown:
            raise self.fail(st, f"norm kind(s) {sorted(unknown)} over hidden are not supported")
        if st.upcycled:
            raise self.fail(st, "widen hidden after upcycle is not supported; put it before `upcycle`")

    def apply(self, st: LowerState) -> None:
        op, ir = self.op, st.ir
        d, d2 = op.old_size, op.new_size
        r = d2 % d
        eta = eta_of(d, d2)
        equal = option(op, "split") == "equal"
        noise = float(option(op, "noise", st.plan.noise) or 0.0)
        m = tile_map(d, d2, equal=equal, rng=rng_for(st.seed, f"hidden:{op.index}"))
        kinds = {n.kind for n in ir.norms if n.group == "hidden"}
        mean_residue = bool(r) and "layernorm" in kinds
        std = st.init_std()
        src = ir.residual.embed_scale_source or ""
        s_emb = math.sqrt(d / d2) if "hidden" in src else 1.0
        # LEMON's eps -> eta^2 * eps comes from the type checker's config patch; it cannot reach an
        # epsilon that is not a config value (eps_key None). Then scale the stream by 1/eta (see the
        # module docstring); with both kinds of norm neither construction is exact.
        hidden_norms = [n for n in ir.norms if n.group == "hidden"]
        s_stream = 1.0
        if r and any(not n.eps_key and n.eps for n in hidden_norms):
            if any(n.eps_key for n in hidden_norms):
                raise self.fail(st, "some hidden norms take epsilon from the config and some have a fixed one; "
                                    "a residue cannot keep both exact (use an integer factor)")
            if ir.residual.placement != "pre":
                raise self.fail(st, "a fixed norm epsilon with a residue is exact only in a Pre-LN model")
            s_stream = 1.0 / eta
        norms = {}
        for n in ir.norms:
            if n.group != "hidden":
                continue
            if n.weight:
                norms[n.weight] = (n, "weight")
            if n.bias:
                norms[n.bias] = (n, "bias")

        # the LM head tied to the embedding: untie it, or let the final norm carry the shares
        tied_readers = []
        untie = option(op, "untie") in (True, "true")
        for alias, keep in list(st.aliases.items()):
            info = next((t for t in ir.tensors if t.name == alias), None)
            if info is None:
                continue
            axes = normalise_axes(ir, info)
            # untie=true writes tie_word_embeddings=false, and transformers then ties none of the
            # model's declared ties (`_tied_weights_keys`): every alias is written on its own, those
            # that do not read hidden too (BERT's `cls.predictions.decoder.bias`), as their kept copy
            if not untie and not any(ax.role == "in" and "hidden" in ax.groups() for ax in axes):
                continue
            if untie:
                base = st.tensors[keep]
                st.tensors[alias] = TState(base.node, info, None, axes, base.source, base.changed,
                                           None if base.region is None else list(base.region), base.exactness,
                                           list(base.notes))
                del st.aliases[alias]
                st.untied.add(alias)
                st.tensors[alias].notes.append("untied from " + keep)
            else:
                tied_readers.append(alias)
        head_share = fan_out_coef(m)
        # the tied head reads the embedding as stored: undo its embedding and stream scales too
        final_coef = tuple(c / (s_emb * s_stream) for c in head_share) if tied_readers else None
        if tied_readers and not any(n.placement == "final" and n.weight and n.feeds_head
                                    for n in ir.norms if n.group == "hidden"):
            raise self.fail(st, "tied LM head without a final norm gain to absorb the readers' shares; use untie=true")

        how = f"lemon {'zero' if not mean_residue else 'mean'} residue" if r else "tile"
        ex = op.exactness
        for name, ts, a in st.members("hidden"):
            role = ts.axes[a].role
            x_shape = ts.node.shape
            if role == "out":
                # the sqrt(hidden) scale multiplies the token embedding only (discovery reads it off the
                # token lookup); a learned position table (BioGPT) beside it is added unscaled
                token = ts.info is not None and ts.info.kind == "embedding" and any(
                    x.role == "index" and "vocab" in x.groups() for x in ts.axes)
                e_scale = s_emb if token else 1.0
                scale = e_scale * s_stream

                def fn(x, ax, scale=scale):
                    fresh = mean_fill(x, ax) if mean_residue else None
                    y = grow_units(x, ax, m, fresh=fresh)
                    return P.Scale(y, scale) if scale != 1.0 else y

                rewrite_axis(st, ts, a, "hidden", m, fn, exactness=ex, keeps_values=scale == 1.0,
                             text=f"hidden {d}->{d2} ({how}): stream rows copied"
                             + (f", x{e_scale:.4g} for the sqrt(hidden) embedding scale" if e_scale != 1.0 else "")
                             + (f", x1/eta={s_stream:.4g} (fixed norm epsilon)" if s_stream != 1.0 else ""))
            elif role == "in":
                def fn(x, ax, name=name):
                    return grow_units(x, ax, m, coef=head_share, fresh=random_fill(f"{name}:hidden-residue:{op.index}", std),
                                      noise=noise, noise_key=f"{name}:hidden-noise:{op.index}", exact_sum=True)

                rewrite_axis(st, ts, a, "hidden", m, fn, exactness=ex, keeps_values=False,
                             text=f"hidden {d}->{d2} ({how}): reader columns split among copies"
                             + (", residue columns random" if r else ""))
            elif role == "elem":
                tmpl = ts.info.name if ts.info is not None else name
                if tmpl not in norms:
                    raise self.fail(st, f"{name}: elementwise on hidden but not a known norm")
                norm, part = norms[tmpl]
                # only the norm the head reads carries its shares: a final norm before a head
                # transform (a dense reader, itself split) keeps its plain tiled gain
                carry = final_coef if (norm.placement == "final" and norm.feeds_head and final_coef is not None) else None
                if part == "weight":
                    coef = tuple(eta * (carry[j] if carry else 1.0) for j in range(d2))
                    one_p = norm.kind == "rmsnorm_1p"

                    # a gain carrying the tied head's shares is a fan-out split (exact sums in bf16);
                    # a 1+w gain is stored minus 1 after the split, which no split can keep exact
                    def fn(x, ax, coef=coef, one_p=one_p, exact=bool(carry) and not one_p):
                        eff = P.Add(x, P.Full(x.shape, 1.0)) if one_p else x
                        y = grow_units(eff, ax, m, coef=coef, fresh=lambda s: P.Full(s, 1.0), exact_sum=exact)
                        return P.Add(y, P.Full(y.shape, -1.0)) if one_p else y

                    text = f"hidden {d}->{d2} ({how}): norm gain tiled" + (f", x eta={eta:.4g}" if r else "")
                    if carry:
                        text += ", carries the tied LM head's shares"
                else:
                    coef = carry

                    def fn(x, ax, coef=coef):
                        return grow_units(x, ax, m, coef=coef, exact_sum=coef is not None)

                    text = f"hidden {d}->{d2} ({how}): norm bias tiled, residue 0"
                rewrite_axis(st, ts, a, "hidden", m, fn, exactness=ex, keeps_values=not r and not carry, text=text)
            else:
                raise self.fail(st, f"{name}: axis {a} has role `{role}` on hidden, which this pass cannot grow")
            del x_shape
        for alias in tied_readers:
            st.notes.append(f"{alias} stays tied to {st.aliases[alias]}: the final norm gain carries the readers' shares")
        if s_stream != 1.0:
            st.notes.append(f"hidden norms have a fixed epsilon (not in the config): residual stream scaled by "
                            f"1/eta = {s_stream:.6g} instead of rescaling epsilon")
        st.sizes["hidden"] = d2
