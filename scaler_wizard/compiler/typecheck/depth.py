"""Depth rules: `insert`, `duplicate`, `stack` fold into one layer map; per-layer config arrays follow it."""

from __future__ import annotations

import copy
import itertools
from dataclasses import replace
from types import SimpleNamespace

from scaler_wizard.compiler import methods as M
from scaler_wizard.diagnostics import suggest
from scaler_wizard.compiler.resolved import LayerSource, ResolvedOp
from scaler_wizard.grammar import ast as A
from scaler_wizard.grammar.printer import statement_text as _print_stmt
from scaler_wizard.compiler.typecheck.state import MAX_LAYERS, _State

# config keys mapping a layer index to that layer's overrides (transformers' heterogeneous configs)
PER_LAYER_DICTS = ("per_layer_config",)


class DepthRules:
    """Mixin of :class:`~scaler_wizard.compiler.typecheck.checker.TypeChecker`."""

    def _depth_allowed(self, st: _State, init: str, span) -> bool:
        if M.lookup("layer", init).needs_pre_ln and self.placement() == "post":
            st.bag.error(
                "SW305",
                f"`{init}` layers are identity maps only in Pre-LN models; this model normalises after the residual add (Post-LN)",
                span,
                help="no block is the identity under Post-LN; use `copy` (approx) instead",
            )
            return False
        return True

    def _layers_understood(self, st: _State, init: str | None, span) -> bool:
        """Depth growth needs the layer stack (SW353) and, for a layer that must be the identity
        (``identity`` / ``zero`` / ``cancel``: every residual writer zeroed or cancelled), no
        per-layer tensor with an axis discovery could not place (role ``other``) of the hidden size
        (SW354): such a tensor (experts run through an op without a shape rule) may write to the
        residual stream and would be left non-zero."""
        ir = self.ir
        if not any(t.layers is not None for t in ir.tensors):
            st.bag.error(
                "SW353",
                f"`{ir.model_type}` ({ir.architecture}): the layer stack was not found: the config's depth "
                f"`{ir.layers_key}` = {ir.num_layers} is not the length of any module list of the traced model, "
                "so no tensor is known to belong to a layer",
                span,
                help="layers cannot be inserted, duplicated or stacked for this model yet (its causal-LM class "
                     "takes its depth from another config key); width growth is unaffected",
            )
            return False
        if init is None or not M.lookup("layer", init).needs_pre_ln:
            return True
        hidden = ir.groups["hidden"].size if "hidden" in ir.groups else None
        for t in ir.tensors:
            if t.layers is None:
                continue
            # an output written to the stream has the hidden width: an unplaced axis of that size
            # (not a scalar such as XIELU's alpha, not a mixer's inner size) may be one
            k = next((k for k, ax in enumerate(t.axes) if ax.role == "other" and ax.size == hidden), None)
            if k is None:
                continue
            st.bag.error(
                "SW354",
                f"`{init}` layers must zero every tensor that writes to the residual stream; discovery did not "
                f"understand how `{t.name}` ({t.module_type}, shape {list(t.shape)}) is used (axis {k}, of the hidden "
                "size, has no known role), so it may write to the residual stream and would be left non-zero",
                span,
                help="use `copy` layers (approx) or `duplicate layers`; a tensor whose use discovery understands "
                     "(linear, embedding, norm, routed experts) is zeroed exactly",
            )
            return False
        for t in ir.tensors:
            # a stored buffer of the decoder layer module itself (not of a sublayer, whose output
            # reaches the stream only through its zeroed writer): it acts on the layer's output
            # (Gemma-4's layer_scalar scales it), and the new layer would copy its value
            if t.kind != "buffer" or t.layers is None or "{i}" not in t.module or not t.module.endswith("{i}"):
                continue
            st.bag.error(
                "SW382",
                f"`{init}` layers must add zero to the residual stream; `{t.name}` (shape {list(t.shape)}) is a stored "
                f"buffer of the decoder layer itself ({t.module_type}), which acts on the layer's output in a way "
                "discovery does not know (Gemma-4's `layer_scalar` scales it), and the new layer would copy its value",
                span,
                help="use `duplicate layers` or `copy` layers (approx); width growth is unaffected",
            )
            return False
        return True

    def _init(self, st: _State, ident: A.Ident | None, default: str = "identity") -> str | None:
        if ident is None:
            return default
        name = M.DEPTH_ALIASES.get(ident.name, ident.name)
        if name not in M.DEPTH_INITS:
            hint = suggest(ident.name, M.DEPTH_INITS)
            st.bag.error(
                "SW203",
                f"unknown layer init `{ident.name}`",
                ident.span,
                help=(f"did you mean `{hint}`? " if hint else "") + "inits: " + ", ".join(f"`{k}`" for k in M.DEPTH_INITS),
            )
            return None
        return name

    def _too_deep(self, st: _State, added: int, span) -> bool:
        if st.depth + added > MAX_LAYERS:
            st.bag.error(
                "SW314",
                f"this would make {st.depth + added:,} layers (the limit is {MAX_LAYERS:,})",
                span,
            )
            return True
        return False

    def _depth_op(self, i, s, st: _State, kind: str, init: str, opts: dict, new_map: list[LayerSource]):
        """Record a depth statement: ``init`` names the layer init (`copy` for duplicate / stack)."""
        if kind == "insert":
            spec = M.lookup("layer", init).from_options(opts)
            self._unread_options(st, s, opts, spec, None)
            noise = opts.get("noise", st.noise) or 0.0
            if spec.reads_noise and noise:
                old = {id(x) for x in st.layer_map}
                new_map = [x if id(x) in old else replace(x, noise=float(noise)) for x in new_map]
            if init == "lesa" and not self._lesa_check(st, s, opts):
                return
        else:
            spec = M.lookup("op", kind).from_options(opts)
        exactness, reason = spec.exactness(SimpleNamespace(placement=self.placement()))
        st.layer_map = new_map
        st.ops.append(
            ResolvedOp(
                index=i,
                kind=kind,
                span=s.span,
                text=_print_stmt(s),
                exactness=exactness,
                reason=reason,
                method=init,
                options=opts,
                layer_map=tuple(new_map),
                config_patch={self.ir.layers_key: len(new_map)},
                spec=spec,
            )
        )

    def _lesa_check(self, st: _State, s, opts: dict) -> bool:
        """LESA's requirements: >= 3 layers, every per-layer matrix kind in every layer with one shape
        (SW330), options in range (SW331); the fit's memory and time as a warning (SW630)."""
        from scaler_wizard.compiler.methods import lesa as LE
        from scaler_wizard.compiler.predict import human

        ok = True
        for key, lo in (("epochs", 0), ("width", 1), ("rank", 1), ("seed", 0)):
            v = opts.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
                span = next((o.value.span for o in s.options if o.key.name == key), s.span)
                st.bag.error("SW331", f"`{key}` must be an integer >= {lo}, got `{v}`", span)
                ok = False
        n = self.ir.num_layers
        if n < 3:
            st.bag.error("SW330", f"LESA learns its predictor from a layer between two others; this model has {n} "
                         "layers (needs 3 or more)", s.span, help="use `identity` or `copy` layers instead")
            return False
        kinds = []
        for t in self.ir.tensors:
            if t.layers is None:
                continue
            if tuple(t.layers) != tuple(range(n)):
                st.bag.error("SW330", f"`{t.name}` exists in layers {list(t.layers)[:6]} only: LESA needs every layer "
                             "to have the same tensors with the same shapes (per-layer types differ)", s.span,
                             help="use `identity` or `copy` layers for this family")
                return False
            if len(t.shape) == 2:
                kinds.append(t.shape)
        if not ok:
            return False
        epochs, width, rank = opts.get("epochs", 100), opts.get("width", 64), opts.get("rank")
        costs_ = [LE.cost(o, i, n, rank, epochs, width) for o, i in kinds]
        if costs_:
            from scaler_wizard.compiler.predict import machine_memory_bytes

            peak = max(c["bytes"] for c in costs_)
            mem = machine_memory_bytes()
            if mem is not None and peak > mem:
                st.bag.error("SW331", f"the LESA fit (predictor width {width}) needs about {human(peak, 'B')} (float64, its largest matrix "
                             f"kind), more than this machine's {human(mem, 'B')}", s.span,
                             help="lower `width=` or `rank=` (the predictor's size), or run it on a bigger machine")
                return False
            flops = sum(c["flops"] for c in costs_)
            st.bag.warning("SW630", f"LESA fits {len(costs_)} matrix kinds over {n} layers: peak about "
                           f"{human(peak, 'B')} (one kind at a time, float64), about {flops / 1e9:,.1f} GFLOP "
                           f"(~{max(flops / 2e10, 0.1):,.1f} s at 20 GFLOP/s) per inserted layer", s.span,
                           help="`rank=<r>` bounds the decomposition; `epochs=` the fit")
        return True

    def _source_for_new(self, st: _State, pos: int, opts: dict, span) -> int | None:
        """The old layer seeding a new layer inserted at position ``pos`` of the current map."""
        src = opts.get("from")
        if src is not None:
            if not isinstance(src, int) or not 0 <= src < self.ir.num_layers:
                st.bag.error(
                    "SW205",
                    f"`from={src}` is not a layer of the original model (0..{self.ir.num_layers - 1})",
                    span,
                )
                return None
            return src
        neighbour = st.layer_map[pos - 1] if pos > 0 else st.layer_map[0]
        return neighbour.src

    def _InsertLayerStmt(self, i, s: A.InsertLayerStmt, st: _State):
        init = self._init(st, s.init)
        opts = (M.lookup("layer", init) if init else M.LayerInit).parse_options(s.options, st.bag)
        idx = s.index.value
        if not 0 <= idx <= st.depth:
            st.bag.error(
                "SW205",
                f"cannot insert at layer {idx}: the model has {st.depth} layers at this point",
                s.index.span,
                help=f"the new layer's index must be 0..{st.depth} (it becomes that index)",
            )
            return
        if init is None or not self._depth_allowed(st, init, s.init.span if s.init else s.span):
            return
        if not self._layers_understood(st, init, s.span):
            return
        if self._too_deep(st, 1, s.span):
            return
        src = self._source_for_new(st, idx, opts, s.span)
        if src is None:
            return
        new_map = st.layer_map[:idx] + [LayerSource(src, init)] + st.layer_map[idx:]
        self._depth_op(i, s, st, "insert", init, opts, new_map)

    def _InsertLayersAfterStmt(self, i, s: A.InsertLayersAfterStmt, st: _State):
        init = self._init(st, s.init)
        opts = (M.lookup("layer", init) if init else M.LayerInit).parse_options(s.options, st.bag)
        n, after = s.count.value, s.after.value
        ok = True
        if n < 1:
            st.bag.error("SW302", f"inserting {n} layers does not grow the model", s.count.span)
            ok = False
        if not 0 <= after < st.depth:
            st.bag.error(
                "SW205",
                f"there is no layer {after} to insert after: the model has {st.depth} layers (0..{st.depth - 1}) at this point",
                s.after.span,
            )
            ok = False
        if not ok or init is None or not self._depth_allowed(st, init, s.init.span if s.init else s.span):
            return
        if not self._layers_understood(st, init, s.span):
            return
        if self._too_deep(st, n, s.count.span):
            return
        src = self._source_for_new(st, after + 1, opts, s.span)
        if src is None:
            return
        new_map = st.layer_map[: after + 1] + [LayerSource(src, init) for _ in range(n)] + st.layer_map[after + 1 :]
        self._depth_op(i, s, st, "insert", init, opts, new_map)

    def _InsertEveryStmt(self, i, s: A.InsertEveryStmt, st: _State):
        init = self._init(st, s.init)
        opts = (M.lookup("layer", init) if init else M.LayerInit).parse_options(s.options, st.bag)
        k = s.every.value
        if not 1 <= k <= st.depth:
            st.bag.error(
                "SW205",
                f"`every {k}` must be between 1 and the current depth {st.depth}",
                s.every.span,
            )
            return
        if init is None or not self._depth_allowed(st, init, s.init.span if s.init else s.span):
            return
        if "from" in opts:
            st.bag.error("SW204", "`from` does not apply to `insert layers every`", s.span)
            return
        if not self._layers_understood(st, init, s.span):
            return
        if self._too_deep(st, st.depth // k, s.span):
            return
        new_map: list[LayerSource] = []
        for j, src in enumerate(st.layer_map):
            new_map.append(src)
            if (j + 1) % k == 0:
                new_map.append(LayerSource(src.src, init))
        self._depth_op(i, s, st, "insert", init, opts, new_map)

    def _DuplicateLayersStmt(self, i, s: A.DuplicateLayersStmt, st: _State):
        opts = M.lookup("op", "duplicate").parse_options(s.options, st.bag)
        a, b = s.start.value, s.stop.value
        if not (0 <= a < b <= st.depth):
            st.bag.error(
                "SW205",
                f"layer range {a}..{b} is not inside 0..{st.depth} (half-open, non-empty)",
                s.span,
                help=f"e.g. `duplicate layers {st.depth // 4}..{st.depth - st.depth // 4}`",
            )
            return
        if not self._layers_understood(st, None, s.span) or self._too_deep(st, b - a, s.span):
            return
        copies = [LayerSource(src.src, "copy") for src in st.layer_map[a:b]]
        new_map = st.layer_map[:b] + copies + st.layer_map[b:]
        self._depth_op(i, s, st, "duplicate", "copy", opts, new_map)

    def _StackStmt(self, i, s: A.StackStmt, st: _State):
        opts = M.lookup("op", "stack").parse_options(s.options, st.bag)
        k = s.factor.value
        if k < 2:
            st.bag.error("SW302", f"`stack x{k}` does not grow the model", s.factor.span, help="use `stack x2` or more")
            return
        if k > MAX_LAYERS or self._too_deep(st, (k - 1) * st.depth, s.factor.span):
            if k > MAX_LAYERS:
                st.bag.error("SW314", f"`stack x{k}` is beyond any model this tool can write", s.factor.span)
            return
        if not self._layers_understood(st, None, s.span):
            return
        new_map = list(st.layer_map) + [LayerSource(src.src, "copy") for _ in range(k - 1) for src in st.layer_map]
        self._depth_op(i, s, st, "stack", "copy", opts, new_map)

    def _check_layer_kinds(self, st: _State) -> None:
        """SW368: depth growth of a model whose layers differ in kind (their tensors: a dense MLP in the
        first layers, experts after) where no per-layer config array says which layer is which: a
        scalar key (``first_k_dense_replace``) lays the kinds out from the depth, so a grown layer order
        that is not the old one continued with the last kind cannot be described by the config."""
        ir = self.ir
        n = ir.num_layers
        if [s.src for s in st.layer_map] == list(range(n)) or n < 2:
            return
        kinds = [frozenset(t.name for t in ir.tensors if t.layers is not None and i in t.layers) for i in range(n)]
        if len(set(kinds)) < 2:
            return
        arrays = [k for k in ir.layer_arrays if isinstance(ir.config.get(k), list) and len(ir.config[k]) == n]
        sig = lambda i: tuple(repr(ir.config[k][i]) for k in arrays)  # noqa: E731
        if all(sig(i) != sig(j) for i in range(n) for j in range(n) if kinds[i] != kinds[j]):
            return  # the arrays tell every kind apart: _reindex_layer_arrays carries them
        new = [kinds[s.src] for s in st.layer_map]
        if all(new[i] == kinds[min(i, n - 1)] for i in range(len(new))):
            return  # the old order continued with the last kind: what the scalar key gives at the new depth
        op = next((o for o in st.ops if o.kind in ("insert", "duplicate", "stack")), None)
        if op is None:
            return
        only = lambda a, b: sorted(x.rsplit("{i}.", 1)[-1] for x in a - b)  # noqa: E731
        i = next(i for i in range(len(new)) if new[i] != kinds[min(i, n - 1)])
        src, want = st.layer_map[i].src, min(i, n - 1)
        st.bag.error(
            "SW368",
            f"`{op.text.split('  #')[0]}`: the layers of `{ir.model_type}` differ in kind (layer {src} has "
            f"{', '.join(only(kinds[src], kinds[want])[:3]) or 'fewer tensors'}; layer {want} has "
            f"{', '.join(only(kinds[want], kinds[src])[:3]) or 'fewer tensors'}) and no per-layer config array "
            f"says which is which (a scalar key lays them out from the depth): the grown layer {i} would be a "
            f"copy of layer {src} where the config puts a layer like {want}",
            op.span,
            help="nothing was written; depth growth that continues the last layers' kind (`insert` / `duplicate` at "
                 "the end) and width growth are unaffected",
        )

    def _reindex_layer_arrays(self, st: _State, config: dict) -> None:
        """Per-layer arrays follow the layer map: new layer j takes old layer ``src``'s entry. So do
        the per-layer overrides of transformers' heterogeneous configs (``per_layer_config``: layer
        index -> {attribute: value}, Gemma-4's full-attention ``head_dim``): transformers checks that
        every layer of one ``layer_types`` kind has the same overrides, and builds layer j's shapes
        from its entry, so the grown layer j gets old layer ``src``'s overrides."""
        for key in self.ir.layer_arrays:
            arr = self.ir.config.get(key)
            if isinstance(arr, list) and len(arr) == self.ir.num_layers:
                config[key] = [arr[src.src] for src in st.layer_map]
        for key in PER_LAYER_DICTS:
            per = config.get(key)
            if not isinstance(per, dict) or [s.src for s in st.layer_map] == list(range(self.ir.num_layers)):
                continue
            by_index = {int(k): v for k, v in per.items() if str(k).lstrip("-").isdigit()}
            if len(by_index) != len(per):
                continue  # not keyed by layer index: left as it is
            config[key] = {str(j): copy.deepcopy(by_index[src.src]) for j, src in enumerate(st.layer_map)
                           if src.src in by_index}
        config.update(st.layer_summaries)

    def _layer_summaries(self, st: _State) -> None:
        """Scalar keys that summarise `layer_types` under an older config convention.

        transformers' config classes derive `layer_types` from such a key when the array is absent
        (Qwen2 / Qwen3 `max_window_layers`: the first N layers use full attention, the rest the
        sliding window; Gemma-3-style `sliding_window_pattern`: every N-th layer is full). Where the
        input's layout follows the convention, the grown layout is re-summarised: the value that
        reproduces it is written when one exists; otherwise the key keeps the closest value and
        SW604 names it (transformers 5 reads `layer_types`, which is always right). A key whose
        convention the input does not follow (sliding window off, an explicit layout) is left as is.
        """
        old = self.ir.config.get("layer_types")
        if not (isinstance(old, list) and len(old) == self.ir.num_layers):
            return
        if [s.src for s in st.layer_map] == list(range(self.ir.num_layers)):
            return  # the layout did not change
        new = [old[s.src] for s in st.layer_map]
        full = "full_attention"
        conventions = {
            "max_window_layers": lambda n, i: i < n,
            "sliding_window_pattern": lambda n, i: (i + 1) % n == 0,
        }
        for key, is_full in conventions.items():
            value = self.ir.config.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if key != "max_window_layers" else 0):
                continue
            if [full if is_full(value, i) else "x" for i in range(len(old))] != [full if t == full else "x" for t in old]:
                continue  # the input does not follow this convention: the key does not describe its layout
            target = [t == full for t in new]
            fits = [n for n in range(0, len(new) + 2) if n >= 1 or key == "max_window_layers"
                    if [is_full(n, i) for i in range(len(new))] == target]
            if fits:
                st.layer_summaries[key] = value if value in fits else fits[0]
                continue
            closest = sum(1 for _ in itertools.takewhile(bool, target)) if key == "max_window_layers" else value
            st.layer_summaries[key] = closest
            depth_ops = [o for o in st.ops if o.layer_map]
            layout = ",".join("F" if t else "S" for t in target)
            st.bag.warning(
                "SW604",
                f"`{key}` cannot describe the grown layer layout {layout} (F full, S sliding attention); "
                f"`layer_types` holds it, `{key}` is written as {closest}",
                depth_ops[-1].span if depth_ops else A.Span(),
                help=f"transformers 5 reads `layer_types`; tools reading only `{key}` would take another layout",
            )
