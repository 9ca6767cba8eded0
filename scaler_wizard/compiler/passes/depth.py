"""Depth: build the grown model's layers from the final layer map (insert / duplicate / stack).

New layer j <- LayerSource(src, init):

* original: old layer ``src``'s tensors (after the width passes), renamed to index j;
* copy: the same values as a new layer (approx: SOLAR / G_stack);
* identity: fan-in copied from layer ``src`` (LLaMA Pro), every residual writer (o_proj, down_proj,
  their biases, stacked experts' biases: tensors with an `out` axis on hidden) zero -> the block
  adds 0 to the stream;
* zero: fan-in random, norm gains copied, biases and writers zero;
* in identity / zero / cancel layers a *stream gain* (a per-layer tensor of kind ``scale`` laid out
  on hidden only: an elementwise gain that is no norm's, Doge's ``residual * input_residual``) is
  ones: were it the residual's scale, any other value (a trained Doge's, copied) would rescale the
  stream; were it the block output's or its input's, the block still adds 0;
* lesa: LESA (:mod:`scaler_wizard.compiler.methods.lesa`): each matrix predicted from every old
  layer's matrix of its kind (SVD + MLP on the per-layer V blocks) between the old layers on either
  side (after the last layer: the last layer on both sides); vectors (norm gains, biases) the mean of
  the two neighbours. Approx.
* cancel: writers non-zero but paired so they cancel: the second half of the FFN units (and of the
  heads, by KV group) copies the first half's fan-in, and their fan-out columns are the negated
  first half's, so the block output is exactly zero. Every other tensor carrying a paired group on
  an axis it does not read (an `out` bias, GPT-OSS's per-head attention ``sinks``, a gain) copies
  the first half into the second half too. Where units cannot be paired (odd sizes) the writer
  falls back to zero (identity); so does the attention writer when the heads cannot grow (a
  per-head score bias computed from the head index: ALiBi's slopes, MPT / Falcon with ``alibi`` --
  head i + n/2, a copy of head i, would attend with another slope and not cancel it).

Only valid for Pre-LN models (the type checker refuses Post-LN, SW305).
"""

from __future__ import annotations

from scaler_wizard.compiler import program as P
from scaler_wizard.compiler.methods.axisops import map_group_on_axis
from scaler_wizard.compiler.passes.base import LowerState, Pass, TState, split_layer_name
from scaler_wizard.compiler.resolved import APPROX


class Depth(Pass):
    name = "depth"

    def __init__(self, layer_map, ops=()):
        super().__init__(None)
        self.layer_map = tuple(layer_map)
        self.ops = tuple(ops)

    @property
    def statement(self):
        return "; ".join(o.text for o in self.ops) or None

    def requires(self, st: LowerState) -> None:
        n = st.ir.num_layers
        for j, s in enumerate(self.layer_map):
            if not 0 <= s.src < n:
                raise self.fail(st, f"new layer {j} comes from old layer {s.src}, outside 0..{n - 1}")
            if s.init not in ("original", "copy", "identity", "zero", "cancel", "lesa"):
                raise self.fail(st, f"unknown layer init `{s.init}`")
            if s.init in ("identity", "zero", "cancel") and st.ir.residual.placement == "post":
                raise self.fail(st, f"`{s.init}` layers need a Pre-LN model (SW305)")
        if st.layer_prefix is None and any(s.init != "original" for s in self.layer_map):
            raise self.fail(st, "the IR names no per-layer tensors")

    def apply(self, st: LowerState) -> None:
        by_layer: dict[int, list[tuple[str, str, TState]]] = {}
        globals_: dict[str, TState] = {}
        for name, ts in st.tensors.items():
            sp = split_layer_name(name, st.layer_prefix)
            if sp is None:
                globals_[name] = ts
            else:
                by_layer.setdefault(sp[0], []).append((sp[1], name, ts))
        new: dict[str, TState] = dict(globals_)
        std = st.init_std()
        lesa_opts = _lesa_options(self.ops, st.plan.seed)
        for j, s in enumerate(self.layer_map):
            noise = float(s.noise or 0.0)  # per new layer: the op that made it (or the plan-wide noise)
            for suffix, old_name, ts in by_layer.get(s.src, []):
                name = f"{st.layer_prefix}.{j}.{suffix}"
                node = ts.node
                init = s.init
                if init == "original":
                    nt = TState(node, ts.info, j, ts.axes, ts.source, ts.changed, ts.region, ts.exactness,
                                list(ts.notes) + ([f"old layer {s.src} moved to {j}"] if j != s.src else []),
                                ts.writer, ts.new)
                    new[name] = nt
                    continue
                nt = TState(node, ts.info, j, ts.axes, ts.source, True, None, ts.exactness, list(ts.notes), ts.writer, True)
                if init == "lesa":
                    right = _right_neighbour(self.layer_map, j, s.src)
                    nt.node, text = _lesa(by_layer, suffix, node, s.src, right, lesa_opts, st.ir.num_layers)
                    nt.notes.append(f"new layer {j} (lesa): {text}")
                    nt.exactness = APPROX
                    new[name] = nt
                    continue
                if init == "copy":
                    nt.notes.append(f"new layer {j}: copy of old layer {s.src} (approx)")
                    nt.exactness = APPROX
                elif init in ("identity", "zero", "cancel") and _is_stream_gain(ts):
                    nt.node = P.Full(node.shape, 1.0)
                    nt.notes.append(f"new layer {j} ({init}): stream gain ones (the block adds 0 to an unscaled stream)")
                elif init == "identity":
                    if ts.writer:
                        nt.node = P.Zeros(node.shape)
                        nt.notes.append(f"new layer {j} (identity): residual writer zero")
                    else:
                        if noise and len(node.shape) >= 2 and not _is_norm(ts):
                            nt.node = P.Add(node, P.Random(node.shape, f"{name}:insert-noise", std=noise))
                        nt.notes.append(f"new layer {j} (identity): fan-in copied from old layer {s.src}")
                elif init == "zero":
                    if ts.writer:
                        nt.node = P.Zeros(node.shape)
                        nt.notes.append(f"new layer {j} (zero): residual writer zero")
                    elif _is_norm(ts):
                        nt.notes.append(f"new layer {j} (zero): norm copied from old layer {s.src}")
                    elif len(node.shape) >= 2:
                        nt.node = P.Random(node.shape, f"{name}:zero-layer", std=std)
                        nt.notes.append(f"new layer {j} (zero): random fan-in")
                    else:
                        nt.node = P.Zeros(node.shape)
                        nt.notes.append(f"new layer {j} (zero): bias zero")
                elif init == "cancel":
                    nt.node, text = _cancel(st, ts, node)
                    nt.notes.append(f"new layer {j} (cancel): {text}")
                if init != "copy":
                    nt.exactness = ts.exactness if ts.exactness != APPROX else APPROX
                new[name] = nt
        st.tensors = new
        st.num_layers = len(self.layer_map)
        st.layer_map = self.layer_map

    def ensures(self, st: LowerState) -> None:
        super().ensures(st)
        layers = set()
        for name in st.tensors:
            sp = split_layer_name(name, st.layer_prefix)
            if sp is not None:
                layers.add(sp[0])
        if layers and layers != set(range(len(self.layer_map))):
            raise self.fail(st, f"built layers {sorted(layers)[:8]}..., expected 0..{len(self.layer_map) - 1}")


def _is_norm(ts: TState) -> bool:
    return ts.info is not None and ts.info.kind in ("norm_weight", "norm_bias")


def _is_stream_gain(ts: TState) -> bool:
    """A per-layer elementwise gain (kind ``scale``) laid out on hidden only, not a writer."""
    if ts.info is None or ts.info.kind != "scale" or ts.writer or not ts.axes:
        return False
    gs = {g for ax in ts.axes for g in ax.groups()}
    return gs == {"hidden"}


def _heads_fixed(st: LowerState) -> str | None:
    """Why the heads cannot grow (the IR's ``fixed``: ALiBi's per-head slopes, a fused projection not
    laid out per head), or None: then head i + n/2 is no interchangeable copy of head i."""
    g = st.ir.groups.get("heads")
    return g.fixed if g is not None and g.fixed else None


def _pair_map(n: int) -> tuple[int, ...] | None:
    """Units 0..n-1 -> second half copies first half (None if n is odd)."""
    if n % 2:
        return None
    h = n // 2
    return tuple(list(range(h)) + list(range(h)))


def _cancel(st: LowerState, ts: TState, node):
    """Cancel-pair construction on the FFN units / heads of one tensor (see module doc). A tensor
    holding several groups (a fused [q | k | v] projection: heads and KV heads) is paired in each of
    them, so the second half of the KV groups reads the first half's keys and values too."""
    sizes = st.sizes
    texts: list[str] = []
    fixed = _heads_fixed(st)
    for group in ("ffn", "heads", "kv_heads"):
        for a, ax in enumerate(ts.axes):
            if group not in ax.groups():
                continue
            n = sizes.get(group)
            pm = _pair_map(n) if n else None
            if group in ("heads", "kv_heads") and fixed:
                if ts.writer:
                    return P.Zeros(node.shape), f"heads not paired ({fixed}): writer zero"
                continue
            if group == "heads" and pm is not None:
                kv = sizes.get("kv_heads", n)
                per = n // kv
                if kv % 2 == 0:
                    pm = _pair_map(n)  # heads of the second half of KV groups copy the first half's
                elif per % 2 == 0:
                    pm = tuple(g * per + (i % (per // 2)) for g in range(kv) for i in range(per))
                else:
                    pm = None
            if pm is None:
                if ts.writer:
                    return P.Zeros(node.shape), "no pairing possible: writer zero"
                continue  # the writer is zero: what this tensor reads does not matter
            role = ax.role
            if role != "in" and not ts.writer:
                def fn(x, sub, pm=pm):
                    return P.Index(x, sub, pm)
                node = map_group_on_axis(node, a, ax, group, sizes, fn)
                texts.append(f"second half of {group} copies the first")
            elif role == "in":
                half = len(pm) // 2
                sign = tuple([1.0] * half + [-1.0] * half) if group != "heads" or sizes.get("kv_heads", 0) % 2 == 0 \
                    else None
                if sign is None:
                    per = sizes["heads"] // sizes.get("kv_heads", sizes["heads"])
                    sign = tuple(1.0 if (i % per) < per // 2 else -1.0 for i in range(sizes["heads"]))

                def fn(x, sub, pm=pm, sign=sign):
                    return P.MulAxis(P.Index(x, sub, pm), sub, sign)
                node = map_group_on_axis(node, a, ax, group, sizes, fn)
                texts.append(f"{group} fan-out paired +W/-W")
    if texts:
        return node, "; ".join(texts)
    if ts.writer:
        return P.Zeros(node.shape), "writer zero"
    return node, "copied"


def _lesa_options(ops, seed) -> dict:
    """The LESA fit options of the plan's `... lesa k=v` statements (the first statement that sets a
    key wins); the seed defaults to the plan seed."""
    out: dict = {}
    for o in ops:
        if getattr(o, "method", None) == "lesa":
            for k in ("epochs", "width", "seed", "rank"):
                if k in o.options and k not in out:
                    out[k] = o.options[k]
    out.setdefault("seed", int(seed or 0))
    return out


def _right_neighbour(layer_map, j: int, left: int) -> int:
    """The old layer after new layer j (the next original layer in the map; ``left`` at the end)."""
    for s in layer_map[j + 1:]:
        if s.init == "original":
            return s.src
    return left


def _lesa(by_layer, suffix: str, node, left: int, right: int, opts: dict, n_old: int):
    """One tensor of a LESA layer: matrices predicted from every old layer's matrix of this kind;
    vectors (norm gains, biases) the neighbours' mean."""
    same = {}
    for layer, items in by_layer.items():
        for suf, _, ts in items:
            if suf == suffix:
                same[layer] = ts.node
    if len(node.shape) == 2 and len(same) == n_old:
        xs = tuple(same[i] for i in range(n_old))
        return (P.LesaLayer(xs, left, right, **opts),
                f"{suffix} predicted by LESA from {n_old} layers between old layers {left} and {right}")
    a, b = same.get(left, node), same.get(right, node)
    if a is b:
        return a, f"{suffix} copied from old layer {left}"
    return P.Scale(P.Add(a, b), 0.5), f"{suffix}: mean of old layers {left} and {right}"
