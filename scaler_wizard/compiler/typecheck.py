"""Type checker: resolve a parsed plan against a model's IR into a :class:`ResolvedPlan`.

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
SW210  a statement this build parses but cannot resolve yet (``at step`` stages, ``extend context``)
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
SW320  ``at step`` stage steps do not increase (compiler/stages.py)
SW321  an ``at step`` stage step outside the training run (1 .. steps - 1)
SW322  an unknown ``at step`` option or a bad value (``optimizer=carry|reset``, ``rewarm=<steps>``)
SW601  (warning) the plan contains approximate ops
SW602  (warning) untying the LM head doubles its memory
SW603  (warning) a plan-wide setting (``noise``) does not apply to an op
SW604  (warning) a scalar config key can no longer describe the grown per-layer layout
SW620  (warning) an ``at step`` stage without growth statements
=====  ==================================================================================
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Any

from scaler_wizard.compiler import methods as M
from scaler_wizard.diagnostics import DiagnosticBag, PlanError, suggest
from scaler_wizard.compiler.predict import costs, identity_layer_map, original_sizes, predict_shapes
from scaler_wizard.compiler.resolved import (
    APPROX,
    EXACT,
    EXACT_EPS,
    LayerSource,
    ResolvedOp,
    ResolvedPlan,
)
from scaler_wizard.grammar import ast as A
from scaler_wizard.grammar.printer import statement_text as _print_stmt
from scaler_wizard.ir.model_ir import CANONICAL_GROUPS, ModelIR

DTYPES = ("float32", "bfloat16", "float16")
MAX_LAYERS = 10_000  # beyond any real model; keeps layer maps small
MAX_WIDTH = 2**31 - 1  # tensor dimensions above this are not addressable by safetensors readers
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}

# transformers' MoE family for each dense family that upcycles exactly (top-k renormalised).
UPCYCLE_TARGETS = {
    "llama": ("mixtral", "MixtralForCausalLM"),
    "mistral": ("mixtral", "MixtralForCausalLM"),
    "qwen3": ("qwen3_moe", "Qwen3MoeForCausalLM"),
}


def groups_summary(ir: ModelIR, sizes: dict[str, int] | None = None, layers: int | None = None) -> str:
    sizes = sizes or {}
    parts = []
    order = {name: i for i, name in enumerate(CANONICAL_GROUPS)}
    for name, g in sorted(ir.groups.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])):
        size = sizes.get(name, g.size)
        if g.per_layer and name in ("ffn", "experts"):
            parts.append(f"{name}({size} x{layers if layers is not None else ir.num_layers} layers)")
        else:
            parts.append(f"{name}({size})")
    return "groups: " + ", ".join(parts)


def _eval_derived(expr: str, config: dict[str, Any]) -> int | None:
    """Evaluate a derived-size expression such as ``hidden_size // num_attention_heads`` or
    ``4 * n_embd`` over config values (names, integers, + - * // only)."""
    import ast as pyast

    def ev(node):
        if isinstance(node, pyast.Expression):
            return ev(node.body)
        if isinstance(node, pyast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, pyast.Name):
            v = config.get(node.id)
            if not isinstance(v, int):
                raise ValueError(node.id)
            return v
        if isinstance(node, pyast.BinOp):
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, pyast.Add):
                return a + b
            if isinstance(node.op, pyast.Sub):
                return a - b
            if isinstance(node.op, pyast.Mult):
                return a * b
            if isinstance(node.op, pyast.FloorDiv) and b:
                return a // b
        raise ValueError(pyast.dump(node))

    try:
        return ev(pyast.parse(expr, mode="eval"))
    except (ValueError, SyntaxError):
        return None


def _opt_value(v: A.Value) -> Any:
    return v.name if isinstance(v, A.Ident) else v.value


SEED_MAX = 2**63 - 1  # what torch.Generator.manual_seed takes for every seed this project derives


def _valid_seed(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= SEED_MAX


@dataclass
class _State:
    ir: ModelIR
    bag: DiagnosticBag
    sizes: dict[str, int]
    layer_map: list[LayerSource]
    config: dict[str, Any]
    ops: list[ResolvedOp] = field(default_factory=list)
    upcycled: tuple[int, int] | None = None  # (experts, top_k)
    untie: bool = False
    seed: int = 0
    dtype: str | None = None
    noise: float = 0.0
    train: dict[str, Any] = field(default_factory=dict)
    alternatives: tuple[str, ...] = ()
    layer_summaries: dict[str, int] = field(default_factory=dict)  # scalar keys re-derived from layer_types

    @property
    def depth(self) -> int:
        return len(self.layer_map)


class TypeChecker:
    def __init__(self, ir: ModelIR, *, context: int = 2048):
        self.ir = ir
        self.context = context

    # ------------------------------------------------------------------ facts
    def hidden_norms(self):
        return [n for n in self.ir.norms if n.group == "hidden"]

    def placement(self) -> str:
        return self.ir.residual.placement

    def _eps_shared_with_other_groups(self) -> list[str]:
        keys = {n.eps_key for n in self.hidden_norms() if n.eps_key}
        return sorted({f"{n.placement} norm over {n.group}" for n in self.ir.norms if n.eps_key in keys and n.group != "hidden"})

    # ------------------------------------------------------------------ entry
    def check(self, plan: A.Plan, *, model_ref: str) -> ResolvedPlan:
        ir = self.ir
        bag = DiagnosticBag()
        st = _State(
            ir=ir,
            bag=bag,
            sizes=original_sizes(ir),
            layer_map=list(identity_layer_map(ir.num_layers)),
            config=dict(ir.config),
        )
        # Plan-wide settings hold for the whole plan wherever they are written: resolve them first,
        # so that every op sees the final `noise` / `seed` / `dtype`.
        settings = (A.SeedStmt, A.NoiseStmt, A.DtypeStmt)
        order = [(i, s) for i, s in enumerate(plan.statements) if isinstance(s, settings)]
        order += [(i, s) for i, s in enumerate(plan.statements) if not isinstance(s, settings)]
        for i, stmt in order:
            handler = getattr(self, "_" + type(stmt).__name__, None)
            if handler is not None:
                handler(i, stmt, st)
            else:  # parsed, not resolved yet: one positioned error, never silently skipped
                head = f"at step {stmt.step.value} {{ ... }}" if isinstance(stmt, A.Stage) else _print_stmt(stmt)
                bag.error("SW210", f"`{head}` is not supported by this build yet", stmt.span)
        self._plan_wide_noise(st)
        self._check_config_invariants(st)
        self._check_rope_lists(st)
        self._layer_summaries(st)
        if not bag.has_errors:
            self._check_size_policy(st)
        if bag.has_errors:
            raise PlanError(bag.items)
        approx = [o for o in st.ops if o.exactness == APPROX]
        if approx:
            first = approx[0]
            bag.warning(
                "SW601",
                f"{len(approx)} op(s) change the model's function on purpose (approx): `{first.text}`",
                first.span,
                help="`verify` reports their measured drift instead of holding them to the exact tolerance",
            )
        warnings = bag.items
        return self._finish(st, model_ref, tuple(warnings))

    @staticmethod
    def _noise_unused(kind: str, group: str | None, method: str | None) -> str | None:
        """Why an op would not read `noise` (None: it does). Noise perturbs copies: of units
        (zero-sum across them, exact), of an identity layer's fan-in (exact), of experts (approx)."""
        if kind == "widen":
            why_not = {
                "kv_heads": "copied key/value heads are read by different query groups, so no zero-sum noise "
                            "cancels there; it is not applied",
                "head_dim": "the new head_dim units are zero, not copies",
                "vocab": "new vocabulary rows are means, not copies",
            }
            if group not in ("hidden", "ffn", "heads", "experts"):
                return why_not.get(group, f"`widen {group}` makes no copies whose symmetry noise could break")
            if method == "zero":
                return f"`{method}` adds fresh units, not copies"
            return None
        if kind == "insert":
            return None if method == "identity" else f"`{method}` layers do not copy fan-in weights"
        if kind == "upcycle":
            return None
        return f"`{kind}` copies layers whole"

    @staticmethod
    def _split_unused(group: str | None, method: str | None) -> str | None:
        if group not in ("hidden", "ffn", "heads"):
            return f"`widen {group}` splits no fan-out among copies"
        if method == "zero":
            return "`zero` adds fresh units, not copies"
        return None

    def _unread_options(self, st: _State, s, opts: dict, kind: str, group, method) -> None:
        """Options the op accepts in general but would not read for this group / method / init."""
        checks = {"noise": self._noise_unused(kind, group, method)}
        if kind == "widen":
            checks["split"] = self._split_unused(group, method)
        for key, why in checks.items():
            if key in opts and why is not None:
                span = next((o.key.span for o in s.options if o.key.name == key), s.span)
                st.bag.error("SW204", f"`{key}=` has no effect on `{_print_stmt(s)}`: {why}", span,
                             help=f"remove `{key}=`")

    def _plan_wide_noise(self, st: _State) -> None:
        if not st.noise:
            return
        for op in st.ops:
            if op.kind == "widen" and op.options.get("implied"):
                continue
            why = self._noise_unused(op.kind, op.group, op.method)
            if why is not None and "noise" not in op.options:
                st.bag.warning("SW603", f"the plan-wide `noise {st.noise:g}` does not apply to `{op.text}`: {why}",
                               op.span, help="noise applies to widen hidden/ffn/heads/experts (copies), "
                               "insert identity (fan-in) and upcycle (experts)")

    def _check_size_policy(self, st: _State) -> None:
        """One size policy for every statement (``widen x1000000`` as ``grow to``): the parameters
        grow at most MAX_GROWTH times; and the memory apply needs (its largest tensors, streamed)
        fits this machine's. Positioned at the plan's last op."""
        from scaler_wizard.compiler.predict import MAX_GROWTH, human, machine_memory_bytes

        ir = self.ir
        if not st.ops:
            return
        base = costs(ir, predict_shapes(ir, original_sizes(ir), identity_layer_map(ir.num_layers)),
                     original_sizes(ir), ir.num_layers, context=self.context)
        experts = st.upcycled[0] if st.upcycled else 0
        after = costs(ir, predict_shapes(ir, st.sizes, tuple(st.layer_map), upcycle_experts=experts), st.sizes,
                      st.depth, context=self.context, untied=st.untie)
        span = max(st.ops, key=lambda o: (o.span.line, o.span.col) if o.span else (0, 0)).span if st.ops else A.Span()
        if base.params and after.params > MAX_GROWTH * base.params:
            st.bag.error("SW317", f"the plan grows the model from {base.params:,} to {after.params:,} parameters, "
                                  f"more than {MAX_GROWTH}x; grow in stages", span,
                         help=f"every plan is held to the same limit as `grow to` ({MAX_GROWTH}x the input)")
            return
        mem = machine_memory_bytes()
        if mem is not None and after.apply_peak_bytes > mem:
            st.bag.error("SW317", f"applying this plan needs about {human(after.apply_peak_bytes, 'B')} of memory "
                                  f"(its largest tensors, in fp32), more than this machine's {human(mem, 'B')}", span,
                         help="apply it on a machine with more memory, or grow less at once")

    def _check_config_invariants(self, st: _State) -> None:
        """transformers' config classes validate hidden_size % num_attention_heads == 0 (even
        when head_dim is explicit); a plan must not produce a config that fails to load."""
        hk = self.ir.groups.get("hidden")
        qk = self.ir.groups.get("heads")
        if not (hk and qk and hk.config_key and qk.config_key):
            return
        h0, q0 = self.ir.config.get(hk.config_key), self.ir.config.get(qk.config_key)
        h1, q1 = st.config.get(hk.config_key), st.config.get(qk.config_key)
        if not all(isinstance(v, int) and v > 0 for v in (h0, q0, h1, q1)):
            return
        if h0 % q0 == 0 and h1 % q1 != 0:
            culprit = next((o for o in reversed(st.ops) if o.group in ("hidden", "heads")), None)
            kv = st.sizes.get("kv_heads", 1)
            options = [n for n in range(q0, h1 + 1) if h1 % n == 0 and n % kv == 0 and n > q0][:3]
            st.bag.error(
                "SW313",
                f"{hk.config_key}={h1} is not a multiple of {qk.config_key}={q1}; transformers refuses such a config",
                culprit.span if culprit else A.Span(),
                help=f"pick heads dividing {h1}" + (": " + ", ".join(map(str, options)) if options else ""),
            )

    def _finish(self, st: _State, model_ref: str, warnings) -> ResolvedPlan:
        ir = self.ir
        before_shapes = predict_shapes(ir, original_sizes(ir), identity_layer_map(ir.num_layers))
        c_before = costs(ir, before_shapes, original_sizes(ir), ir.num_layers, context=self.context)
        experts = st.upcycled[0] if st.upcycled else 0
        after_shapes = predict_shapes(ir, st.sizes, tuple(st.layer_map), upcycle_experts=experts)
        frac = (st.upcycled[1] / st.upcycled[0]) if st.upcycled else 1.0
        c_after = costs(
            ir, after_shapes, st.sizes, st.depth, context=self.context, active_expert_fraction=frac, untied=st.untie
        )
        config_after = dict(st.config)
        config_after[ir.layers_key] = st.depth
        self._reindex_layer_arrays(st, config_after)
        plan = ResolvedPlan(
            model_ref=model_ref,
            ir=ir,
            ops=tuple(st.ops),
            layer_map=tuple(st.layer_map),
            config_before=dict(ir.config),
            config_after=config_after,
            costs_before=c_before,
            costs_after=c_after,
            seed=st.seed,
            dtype=st.dtype,
            noise=st.noise,
            train=st.train,
            alternatives=st.alternatives,
            warnings=tuple(warnings),
            sizes_after=dict(st.sizes),
        )
        return plan

    def _reindex_layer_arrays(self, st: _State, config: dict) -> None:
        """Per-layer arrays follow the layer map: new layer j takes old layer ``src``'s entry."""
        for key in self.ir.layer_arrays:
            arr = self.ir.config.get(key)
            if isinstance(arr, list) and len(arr) == self.ir.num_layers:
                config[key] = [arr[src.src] for src in st.layer_map]
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

    # ------------------------------------------------------------------ helpers
    def _options(self, st: _State, options, allowed: dict[str, str], what: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for o in options:
            key = o.key.name
            if key not in allowed:
                hint = suggest(key, allowed)
                known = ", ".join(f"`{k}`" for k in allowed) or "none"
                if key == "seed":
                    hint_text = "random choices are seeded plan-wide: write `seed <n>` on its own line; "
                else:
                    hint_text = f"did you mean `{hint}`? " if hint else ""
                st.bag.error(
                    "SW204",
                    f"unknown option `{key}` for {what}",
                    o.key.span,
                    help=hint_text + f"options of {what}: {known}",
                )
                continue
            out[key] = _opt_value(o.value)
        noise = out.get("noise")
        if noise is not None and (not isinstance(noise, (int, float)) or isinstance(noise, bool) or noise < 0):
            span = next(o.value.span for o in options if o.key.name == "noise")
            st.bag.error("SW207", f"`noise` must be a non-negative number, got `{noise}`", span)
        for key, allowed_values in (("split", ("equal", "random")), ("router", ("zero", "random")),
                                    ("untie", (True, False, "true", "false"))):
            value = out.get(key)
            if value is not None and (value not in allowed_values or isinstance(value, (int, float)) and
                                      not isinstance(value, bool)):
                span = next(o.value.span for o in options if o.key.name == key)
                names = " or ".join(f"`{v}`" for v in allowed_values if isinstance(v, str))
                st.bag.error("SW207", f"`{key}` must be {names}, got `{value}`", span)
                out.pop(key)
        return out

    def _group(self, st: _State, ident: A.Ident) -> str | None:
        name = ident.name
        if name in self.ir.groups:
            return name
        if name == "layers":
            st.bag.error(
                "SW201",
                "`layers` is grown with `insert`, `duplicate` or `stack`, not `widen`",
                ident.span,
                help="e.g. `insert layers every 4 identity` or `insert 2 layers after 11`",
            )
            return None
        hint = suggest(name, self.ir.groups)
        st.bag.error(
            "SW201" if name not in ("experts",) else "SW312",
            f"unknown dimension group `{name}`"
            if name != "experts"
            else "this model has no `experts` group (it is dense)",
            ident.span,
            help=(f"did you mean `{hint}`? " if hint else "")
            + groups_summary(self.ir, st.sizes, st.depth)
            + ("; to make experts, `upcycle ffn experts <E> top <k>`" if name == "experts" else ""),
        )
        return None

    # ------------------------------------------------------------------ statements
    def _ModelStmt(self, i, s: A.ModelStmt, st: _State):
        pass  # resolved by the front end before the IR is built

    def _SeedStmt(self, i, s: A.SeedStmt, st: _State):
        if not _valid_seed(s.value.value):
            st.bag.error("SW207", f"seed must be an integer from 0 to {SEED_MAX}, got {s.value.value}", s.value.span)
            return
        st.seed = s.value.value

    def _NoiseStmt(self, i, s: A.NoiseStmt, st: _State):
        if s.value.value < 0:
            st.bag.error("SW207", f"noise must be non-negative, got {s.value.value}", s.value.span)
        st.noise = s.value.value

    def _DtypeStmt(self, i, s: A.DtypeStmt, st: _State):
        name = DTYPE_ALIASES.get(s.name.name, s.name.name)
        if name not in DTYPES:
            hint = suggest(s.name.name, list(DTYPES) + list(DTYPE_ALIASES))
            st.bag.error(
                "SW206",
                f"unknown dtype `{s.name.name}`",
                s.name.span,
                help=(f"did you mean `{hint}`? " if hint else "") + "dtypes: " + ", ".join(DTYPES),
            )
            return
        st.dtype = name

    def _TrainStmt(self, i, s: A.TrainStmt, st: _State):
        if s.ref is not None:
            st.train = {"ref": s.ref.value}
            return
        st.train = {o.key.name: _opt_value(o.value) for o in s.options}
        # the same validation `train --plan` does, here, positioned: a plan `check` passes trains
        from scaler_wizard.runtime.recipe import RecipeError, TrainRecipe

        known = TrainRecipe.keys()
        ok = {}
        for o in s.options:
            key = o.key.name.replace("-", "_")
            if key not in known:
                hint = suggest(key, known)
                st.bag.error("SW204", f"unknown key `{o.key.name}` in the `train` block", o.key.span,
                             help=(f"did you mean `{hint}`? " if hint else "") + "keys: " + ", ".join(sorted(known)))
                continue
            try:
                TrainRecipe().update({key: _opt_value(o.value)}, where="train")
            except RecipeError as e:
                st.bag.error("SW207", str(e).removeprefix("train: "), o.value.span)
                continue
            ok[key] = _opt_value(o.value)
        if len(ok) == len(s.options):
            try:
                TrainRecipe().update(ok, where="train")
            except RecipeError as e:
                st.bag.error("SW207", str(e).removeprefix("train: "), s.span)

    # .................................................................. widen
    def _WidenStmt(self, i, s: A.WidenStmt, st: _State):
        group = self._group(st, s.group)
        if group is None:
            return
        old = st.sizes[group]
        new = self._new_size(st, s.amount, old, group)
        method_name = s.method.name if s.method else None
        if method_name is not None:
            method_name = M.WIDTH_ALIASES.get(method_name, method_name)
        integer_factor = new is not None and new % old == 0
        if method_name is None:
            method_name = M.DEFAULT_WIDTH_METHOD.get(group, "tile")
            if group == "hidden" and integer_factor:
                method_name = "tile"
        opts = self._options(st, s.options, M.WIDEN_OPTIONS, "`widen`")
        spec = M.WIDTH_METHODS.get(method_name)
        if spec is None or group not in spec.groups:
            applicable = [m.name for m in M.WIDTH_METHODS.values() if group in m.groups]
            hint = suggest(method_name, applicable) if spec is None else None
            st.bag.error(
                "SW202",
                f"unknown method `{method_name}`" if spec is None else f"method `{method_name}` does not apply to `{group}`",
                s.method.span if s.method else s.span,
                help=(f"did you mean `{hint}`? " if hint else "")
                + f"methods for `{group}`: "
                + ", ".join(f"`{m}`" for m in applicable),
            )
            return
        self._unread_options(st, s, opts, "widen", group, method_name)
        if new is None:
            return
        if spec.integer_factor_only and not integer_factor:
            st.bag.error(
                "SW303",
                f"`{method_name}` needs an integer factor, but {old} -> {new} is x{new / old:.4g}",
                s.amount.span,
                help=f"use `x{max(2, round(new / old))}`"
                + (", or `lemon`, which handles any size" if group in ("hidden", "ffn") else ""),
            )
            return
        exactness, reason = self._widen_exactness(st, s, group, method_name, old, new)
        if exactness is None:
            return
        patch = self._width_patch(st, s, group, method_name, old, new)
        if patch is None:
            return
        if opts.get("untie") in (True, "true"):
            if group != "hidden" or not self.ir.tied:
                st.bag.error("SW207", "`untie` applies only to `widen hidden` on a model with tied embeddings", s.span)
                return
            st.untie = True
            patch["tie_word_embeddings"] = False
            st.bag.warning(
                "SW602",
                "untying the LM head stores vocab x hidden twice",
                s.span,
                help="without `untie=true` the tie is kept: the final norm gain absorbs the readers' 1/k",
            )
        st.sizes[group] = new
        st.config.update(patch)
        st.ops.append(
            ResolvedOp(
                index=i,
                kind="widen",
                span=s.span,
                text=_print_stmt(s),
                exactness=exactness,
                reason=reason,
                group=group,
                old_size=old,
                new_size=new,
                method=method_name,
                options=opts,
                config_patch=patch,
            )
        )
        self._implied_growth(i, s, st)

    def _implied_growth(self, i, s: A.WidenStmt, st: _State) -> None:
        """Grow the groups whose size the config derives from what this statement changed.

        Some families have no config key for a group and compute it (GPT-2: head_dim = n_embd //
        n_head, ffn = 4 * n_embd). After a change, re-evaluate each derived size; where it moved,
        the plan must grow that group too, or the grown config would describe another model:
        - head_dim moved: keep head_dim and grow `heads` instead (new heads, zero fan-out: exact);
        - any other group moved: widen it to the derived size (net2net / tile: exact).
        Each becomes an explicit op in the resolved plan, marked as implied by the statement.
        """
        stmt_text = _print_stmt(s)

        def implied(group: str, old: int, new: int, method: str, exactness: str, reason: str, patch: dict):
            st.ops.append(ResolvedOp(
                index=i, kind="widen", span=s.span, text=f"widen {group} to {new} {method}  # implied by `{stmt_text}`",
                exactness=exactness, reason=reason, group=group, old_size=old, new_size=new, method=method,
                options={"implied": True}, config_patch=patch,
            ))

        for name, g in self.ir.groups.items():
            if g.config_key or not g.derived:
                continue
            if g.override_key and st.config.get(g.override_key) is not None:
                continue  # already pinned
            value = _eval_derived(g.derived, st.config)
            if value is None or value == st.sizes[name]:
                continue
            if g.override_key:
                # The group has a config key that fixes it: pin it at its current size.
                st.config[g.override_key] = st.sizes[name]
                st.ops[-1].config_patch[g.override_key] = st.sizes[name]
                continue
            if name == "head_dim":
                hd = st.sizes["head_dim"]
                heads_g = self.ir.groups.get("heads")
                if heads_g is None or not heads_g.config_key:
                    st.bag.error("SW308", f"head_dim would change to {value} and heads cannot compensate", s.span)
                    return
                hidden_now = value * st.config[heads_g.config_key]
                new_heads, rem = divmod(hidden_now, hd)
                kv = st.sizes.get("kv_heads")
                if rem or (kv and new_heads % kv):
                    st.bag.error(
                        "SW313",
                        f"this model derives head_dim = {g.derived}; keeping head_dim {hd} needs "
                        f"{hidden_now / hd:g} heads" + (f", a multiple of {kv} KV heads" if kv else ""),
                        s.amount.span,
                        help=f"pick a hidden size that is a multiple of {hd * (kv or 1)}",
                    )
                    return
                old_heads = st.sizes["heads"]
                patch = {heads_g.config_key: new_heads, **{k: new_heads for k in heads_g.companion_keys}}
                st.sizes["heads"] = new_heads
                st.config.update(patch)
                implied("heads", old_heads, new_heads, "zero", EXACT,
                        f"implied: the config derives head_dim = {g.derived}, so attention widens with hidden; "
                        "new heads have zero fan-out", patch)
            else:
                old_size = st.sizes[name]
                if value < old_size:
                    st.bag.error("SW313", f"`{name}` (derived as {g.derived}) would shrink to {value}", s.span)
                    return
                method = M.DEFAULT_WIDTH_METHOD.get(name, "tile")
                st.sizes[name] = value
                implied(name, old_size, value, method, EXACT if name not in ("vocab", "experts") else APPROX,
                        f"implied: the config derives {name} = {g.derived}", {})

    def _new_size(self, st: _State, amount, old: int, group: str) -> int | None:
        if isinstance(amount, A.Factor):
            raw = old * amount.value
            new = round(raw)
            if abs(raw - new) > 1e-9:
                st.bag.error(
                    "SW301",
                    f"x{amount.value:.12g} of {group}({old}) is {raw:.12g}, not a whole number of units",
                    amount.span,
                    help=(f"use `to {math.floor(raw)}` or `to {math.ceil(raw)}`" if math.floor(raw) > old
                          else f"use `to {math.ceil(raw)}`"),
                )
                return None
        elif isinstance(amount, A.ToSize):
            new = amount.value
        else:
            new = old + amount.value
        if new > MAX_WIDTH:
            st.bag.error("SW314", f"`{group}` of {new:,} units is beyond any model this tool can write", amount.span)
            return None
        if new <= old:
            st.bag.error(
                "SW302",
                f"this does not grow `{group}`: {old} -> {new}",
                amount.span,
                help="Scaler Wizard only grows models; pruning is out of scope",
            )
            return None
        return new

    def _widen_exactness(self, st: _State, s: A.WidenStmt, group: str, method: str, old: int, new: int):
        ir = self.ir
        bag = st.bag
        if group == "hidden":
            exactness, reason = self._hidden_exactness(st, s, method, old, new)
            norms = self.hidden_norms()
            untie = any(o.key.name == "untie" and getattr(o.value, "value", None) is True for o in s.options)
            if exactness and ir.tied and not untie and not any(n.placement == "final" and n.weight for n in norms):
                bag.error(
                    "SW315",
                    "the LM head is tied to the embedding and no final norm gain can absorb the readers' split",
                    s.span,
                    help="add `untie=true` (the head gets its own copy; memory grows by vocab x hidden)",
                )
                return None, ""
            return exactness, reason
        return self._other_exactness(st, s, group, method, old, new)

    def _hidden_exactness(self, st: _State, s: A.WidenStmt, method: str, old: int, new: int):
        bag = st.bag
        norms = self.hidden_norms()
        kinds = sorted({n.kind for n in norms}) or ["none"]
        place = self.placement()
        r = new % old
        if method == "tile":
            return EXACT, f"tiling keeps {'/'.join(kinds)} statistics unchanged ({place}-norm)"
        # lemon
        if r == 0:
            return EXACT, f"integer factor: lemon reduces to tiling ({'/'.join(kinds)}, {place}-norm)"
        if place == "post" and "layernorm" in kinds:
            bag.error(
                "SW306",
                f"LEMON's LayerNorm residue is exact in Post-LN models only for integer factors ({old} -> {new})",
                s.amount.span,
                help=f"this model normalises after the residual add; use `x{max(2, round(new / old))}` (or `to {old * max(2, round(new / old))}`)",
            )
            return None, ""
        shared = self._eps_shared_with_other_groups()
        eta2 = (new // old) * old / new
        if shared:
            return (
                EXACT_EPS,
                f"eps rescaled by eta^2={eta2:.4g} for the hidden norms, but the same config eps also serves "
                + ", ".join(shared),
            )
        residue = "zero" if set(kinds) <= {"rmsnorm", "rmsnorm_1p"} else "average"
        return EXACT, f"{residue} residue with gains x eta and eps x eta^2={eta2:.4g}"

    def _other_exactness(self, st: _State, s: A.WidenStmt, group: str, method: str, old: int, new: int):
        ir = self.ir
        bag = st.bag
        if group == "ffn":
            if method == "zero":
                return EXACT, "new units: random fan-in, zero fan-out (they start learning at once)"
            return EXACT, "copied units' fan-out splits sum to the original (any elementwise activation, GLU included)"
        if group in ("heads", "kv_heads"):
            att = ir.attention
            if att is None:
                bag.error("SW312", "this model has no attention heads the compiler understands", s.group.span)
                return None, ""
            if group == "heads" and "head_dim" in ir.groups and ir.groups["head_dim"].config_key is None:
                g = ir.groups["head_dim"]
                bag.error(
                    "SW308",
                    f"`{group}` cannot grow alone: this model derives head_dim as {g.derived or 'a function of other sizes'}",
                    s.group.span,
                    help="growing heads would change head_dim and every attention score; widen `hidden` by the same factor instead",
                )
                return None, ""
            heads = st.sizes.get("heads", att.heads)
            kv = st.sizes.get("kv_heads", att.kv_heads)
            if group == "heads":
                if new % kv != 0:
                    lo, hi = (new // kv) * kv, (new // kv + 1) * kv
                    bag.error(
                        "SW304",
                        f"{new} query heads cannot be shared evenly by {kv} KV heads",
                        s.amount.span,
                        help=f"grouped-query attention needs heads % kv_heads == 0: try `to {hi}`"
                        + (f" or `to {lo}`" if lo > heads else ""),
                    )
                    return None, ""
                return EXACT, f"new query heads placed in their GQA group ({new // kv} per KV head), o_proj {'split' if method == 'dup' else 'zero'}"
            # kv_heads
            if new % kv != 0:
                bag.error(
                    "SW304",
                    f"kv_heads can grow only by an integer factor ({kv} -> {new})",
                    s.amount.span,
                    help=f"each query head must map to a copy of its old KV head: try `x2` (to {2 * kv})",
                )
                return None, ""
            if heads % new != 0:
                bag.error(
                    "SW304",
                    f"{heads} query heads cannot be shared evenly by {new} KV heads",
                    s.amount.span,
                    help=f"widen `heads` first (to a multiple of {new}), or pick kv_heads dividing {heads}",
                )
                return None, ""
            return EXACT, f"KV heads tiled x{new // kv}; each query head reads a copy of its old KV head"
        if group == "head_dim":
            att = ir.attention
            if att is None:
                bag.error("SW312", "this model has no attention head_dim the compiler understands", s.group.span)
                return None, ""
            if ir.groups["head_dim"].config_key is None:
                g = ir.groups["head_dim"]
                bag.error(
                    "SW308",
                    f"`head_dim` cannot change alone: this model derives it as {g.derived or 'a function of other sizes'}",
                    s.group.span,
                )
                return None, ""
            if att.rope is not None and new % old != 0:
                bag.error(
                    "SW307",
                    f"RoPE makes head_dim growth {old} -> {new} inexact: every rotary frequency changes",
                    s.amount.span,
                    help=f"an integer factor keeps every old frequency (old pair i -> new pair k*i): try `x{max(2, round(new / old))}`",
                )
                return None, ""
            rope_note = ""
            if att.rope is not None:
                rope_note = self._rope_head_dim(st, s, old, new)
                if rope_note is None:
                    return None, ""
            qk_norms = [n for n in ir.norms if n.group == "head_dim"]
            if att.scaling_source.startswith("config:"):
                scal = f"softmax scale from {att.scaling_source[7:]} is unchanged"
            else:
                scal = "q rows scaled to keep 1/sqrt(head_dim)"
            if qk_norms:
                return EXACT_EPS, f"{scal}; q/k norms over head_dim see mean-square / k, so their eps is off by that factor" + rope_note
            return EXACT, f"new dims zero in q/k/v fan-out; {scal}" + ("; rotary pair i -> k*i" if att.rope else "") + rope_note
        if group == "vocab":
            return APPROX, "new token rows change the softmax denominator"
        if group == "experts":
            return APPROX, "copied experts and router rows change the routing distribution"
        return EXACT, ""

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

    def _width_patch(self, st: _State, s: A.WidenStmt, group: str, method: str, old: int, new: int) -> dict | None:
        g = self.ir.groups[group]
        patch: dict[str, Any] = {}
        if g.config_key or g.override_key:
            patch[g.config_key or g.override_key] = new
            for k in g.companion_keys:  # structural switches that must keep the group's value
                patch[k] = new
        else:
            st.bag.error(
                "SW308",
                f"`{group}` is not bound to a config value ({g.derived or 'derived'}), so the grown config cannot express it",
                s.group.span,
            )
            return None
        att = self.ir.attention
        if group == "head_dim" and att is not None and att.rope is not None and att.rope.per_frequency and new % old == 0:
            from scaler_wizard.compiler.rope import grow_per_frequency

            patch.update(grow_per_frequency(st.config, att.rope.per_frequency, old * att.rope.rotary_dim // att.rope.head_dim // 2,
                                            new // old))
        if group == "hidden":
            r = new % old
            if method == "lemon" and r:
                eta2 = (new // old) * old / new
                for key in sorted({n.eps_key for n in self.hidden_norms() if n.eps_key}):
                    patch[key] = st.config.get(key, self.ir.config.get(key)) * eta2
        return patch

    # .................................................................. depth
    def _depth_allowed(self, st: _State, init: str, span) -> bool:
        if init in ("identity", "zero", "cancel") and self.placement() == "post":
            st.bag.error(
                "SW305",
                f"`{init}` layers are identity maps only in Pre-LN models; this model normalises after the residual add (Post-LN)",
                span,
                help="no block is the identity under Post-LN; use `copy` (approx) instead",
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

    def _depth_op(self, i, s, st: _State, kind: str, init: str | None, opts: dict, new_map: list[LayerSource]):
        if kind == "insert":
            self._unread_options(st, s, opts, "insert", None, init)
            noise = opts.get("noise", st.noise) or 0.0
            if init == "identity" and noise:
                old = {id(x) for x in st.layer_map}
                new_map = [x if id(x) in old else replace(x, noise=float(noise)) for x in new_map]
        exactness = APPROX if init in (None, "copy") else EXACT
        reason = (
            "copied layers change the function (SOLAR / G_stack style)"
            if exactness == APPROX
            else f"{init} layers add zero to the residual stream ({self.placement()}-norm)"
        )
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
            )
        )

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
        opts = self._options(st, s.options, M.INSERT_OPTIONS, "`insert`")
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
        if self._too_deep(st, 1, s.span):
            return
        src = self._source_for_new(st, idx, opts, s.span)
        if src is None:
            return
        new_map = st.layer_map[:idx] + [LayerSource(src, init)] + st.layer_map[idx:]
        self._depth_op(i, s, st, "insert", init, opts, new_map)

    def _InsertLayersAfterStmt(self, i, s: A.InsertLayersAfterStmt, st: _State):
        init = self._init(st, s.init)
        opts = self._options(st, s.options, M.INSERT_OPTIONS, "`insert`")
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
        if self._too_deep(st, n, s.count.span):
            return
        src = self._source_for_new(st, after + 1, opts, s.span)
        if src is None:
            return
        new_map = st.layer_map[: after + 1] + [LayerSource(src, init) for _ in range(n)] + st.layer_map[after + 1 :]
        self._depth_op(i, s, st, "insert", init, opts, new_map)

    def _InsertEveryStmt(self, i, s: A.InsertEveryStmt, st: _State):
        init = self._init(st, s.init)
        opts = self._options(st, s.options, M.INSERT_OPTIONS, "`insert`")
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
        if self._too_deep(st, st.depth // k, s.span):
            return
        new_map: list[LayerSource] = []
        for j, src in enumerate(st.layer_map):
            new_map.append(src)
            if (j + 1) % k == 0:
                new_map.append(LayerSource(src.src, init))
        self._depth_op(i, s, st, "insert", init, opts, new_map)

    def _DuplicateLayersStmt(self, i, s: A.DuplicateLayersStmt, st: _State):
        opts = self._options(st, s.options, M.DUPLICATE_OPTIONS, "`duplicate`")
        a, b = s.start.value, s.stop.value
        if not (0 <= a < b <= st.depth):
            st.bag.error(
                "SW205",
                f"layer range {a}..{b} is not inside 0..{st.depth} (half-open, non-empty)",
                s.span,
                help=f"e.g. `duplicate layers {st.depth // 4}..{st.depth - st.depth // 4}`",
            )
            return
        if self._too_deep(st, b - a, s.span):
            return
        copies = [LayerSource(src.src, "copy") for src in st.layer_map[a:b]]
        new_map = st.layer_map[:b] + copies + st.layer_map[b:]
        self._depth_op(i, s, st, "duplicate", "copy", opts, new_map)

    def _StackStmt(self, i, s: A.StackStmt, st: _State):
        opts = self._options(st, s.options, M.DUPLICATE_OPTIONS, "`stack`")
        k = s.factor.value
        if k < 2:
            st.bag.error("SW302", f"`stack x{k}` does not grow the model", s.factor.span, help="use `stack x2` or more")
            return
        if k > MAX_LAYERS or self._too_deep(st, (k - 1) * st.depth, s.factor.span):
            if k > MAX_LAYERS:
                st.bag.error("SW314", f"`stack x{k}` is beyond any model this tool can write", s.factor.span)
            return
        new_map = list(st.layer_map) + [LayerSource(src.src, "copy") for _ in range(k - 1) for src in st.layer_map]
        self._depth_op(i, s, st, "stack", "copy", opts, new_map)

    # .................................................................. MoE
    def _UpcycleStmt(self, i, s: A.UpcycleStmt, st: _State):
        group = s.group.name
        opts = self._options(st, s.options, M.UPCYCLE_OPTIONS, "`upcycle`")
        if group != "ffn":
            st.bag.error(
                "SW202",
                f"only the `ffn` group can be upcycled into experts, not `{group}`",
                s.group.span,
                help="write `upcycle ffn experts <E> top <k>`",
            )
            return
        E, k = s.experts.value, s.top_k.value
        ok = True
        if E < 2:
            st.bag.error("SW310", f"a mixture needs at least 2 experts, got {E}", s.experts.span)
            ok = False
        if E > 4096:
            st.bag.error("SW314", f"{E:,} experts is beyond any model this tool can write (limit 4,096)", s.experts.span)
            ok = False
        if not 1 <= k <= max(E, 1):
            st.bag.error("SW310", f"top {k} is not between 1 and the number of experts {E}", s.top_k.span)
            ok = False
        if self.ir.moe is not None or st.upcycled:
            st.bag.error(
                "SW309",
                "this model already routes its FFN through experts",
                s.span,
                help="to add experts, `widen experts ...`",
            )
            return
        target = UPCYCLE_TARGETS.get(self.ir.model_type)
        if target is None:
            st.bag.error(
                "SW309",
                f"no mixture-of-experts family in transformers matches `{self.ir.model_type}` exactly",
                s.span,
                help="supported: " + ", ".join(f"{a} -> {b[0]}" for a, b in UPCYCLE_TARGETS.items()),
            )
            return
        cfg = self.ir.config
        if cfg.get("mlp_bias") or cfg.get("attention_bias"):
            st.bag.error(
                "SW309",
                f"`{target[0]}` has no projection biases, but this model uses them",
                s.span,
            )
            return
        if not ok:
            return
        noise = opts.get("noise", st.noise) or 0
        exactness = EXACT if not noise else APPROX
        reason = (
            f"identical experts with top-{k} weights renormalised to sum to 1 ({target[0]})"
            if exactness == EXACT
            else f"noise {noise:g}" + (" (plan-wide)" if "noise" not in opts else "")
            + " on the expert copies changes each expert: the top-k mixture no longer equals the dense FFN"
        )
        if noise:
            opts = {**opts, "noise": noise}
        patch = {
            "model_type": target[0],
            "architectures": [target[1]],
        }
        if target[0] == "mixtral":
            patch.update(num_local_experts=E, num_experts_per_tok=k)
        else:
            patch.update(
                num_experts=E,
                num_experts_per_tok=k,
                norm_topk_prob=True,
                moe_intermediate_size=st.sizes.get("ffn"),
                decoder_sparse_step=1,
                mlp_only_layers=[],
            )
        st.upcycled = (E, k)
        st.config.update(patch)
        st.ops.append(
            ResolvedOp(
                index=i,
                kind="upcycle",
                span=s.span,
                text=_print_stmt(s),
                exactness=exactness,
                reason=reason,
                group="ffn",
                old_size=1,
                new_size=E,
                method="copy",
                options={**opts, "top_k": k},
                config_patch=patch,
            )
        )

    # .................................................................. grow to
    def _GrowToStmt(self, i, s: A.GrowToStmt, st: _State):
        from scaler_wizard.compiler.solver import solve_grow_to

        prefer = s.prefer.name if s.prefer else None
        if prefer not in (None, "depth", "width"):
            hint = suggest(prefer, ["depth", "width"])
            st.bag.error(
                "SW207",
                f"`prefer` takes `depth` or `width`, not `{prefer}`",
                s.prefer.span,
                help=f"did you mean `{hint}`?" if hint else None,
            )
            return
        solution = solve_grow_to(self, st, s, prefer)
        if isinstance(solution, str):
            st.bag.error("SW311", solution, s.span, help=groups_summary(self.ir, st.sizes, st.depth))
            return
        chosen, alternatives = solution
        st.alternatives = tuple(alternatives)
        for stmt in chosen:
            handler = getattr(self, "_" + type(stmt).__name__)
            handler(i, stmt, st)


def check_plan(plan: A.Plan, ir: ModelIR, *, model_ref: str, context: int = 2048) -> ResolvedPlan:
    """Resolve ``plan`` against ``ir``; raise :class:`PlanError` with every diagnostic if it fails."""
    return TypeChecker(ir, context=context).check(plan, model_ref=model_ref)
