"""Growth methods: one module per method, registered by name.

The registry (:data:`~scaler_wizard.compiler.methods.base.REGISTRY`, keyed by ``(kind, name)``) is
read by the type checker (which method a statement names, its options, its exactness), by
``compile`` / ``explain`` (its lowering pass and summary) and by the README's method table
(:func:`methods_table`, checked by ``tests/test_methods.py``).

Kinds: ``widen`` (a width method: tile, lemon, net2net, zero, dup, mean, copy), ``layer`` (a layer
init of ``insert``: identity, zero, cancel, copy) and ``op`` (statements that are methods of their
own: stack, duplicate, upcycle, grow-to).

How to add a method
-------------------
1. Create ``scaler_wizard/compiler/methods/<name>.py`` with a frozen dataclass subclassing
   :class:`~.width.WidthMethod` (a width method), :class:`~.layer.LayerInit` (a layer init) or
   :class:`~.base.Method` (a statement of its own), decorated with :func:`~.base.register`. Set the
   class variables ``name``, ``aliases``, ``groups``, ``base`` (its exactness class when nothing in
   the model stands in its way), ``summary`` and ``source`` (the paper or library).
2. Options are dataclass fields declared with :func:`~.base.option` (``kind="nonneg" | "choice" |
   "bool" | "any"``): the type checker parses ``key=value`` into them with positioned SW204 / SW207
   errors; width methods and layer inits inherit their statement's options (``noise``, ``split``,
   ``untie`` / ``from``, ``noise``). Override :meth:`~.base.Method.unread` to say which options the
   method ignores for a group (writing one is then an error), :meth:`~.base.Method.check` for
   value checks that need the plan.
3. :meth:`~.base.Method.exactness` returns ``(EXACT | EXACT_EPS | APPROX, reason)`` from IR facts
   on the context (``cx.ir``, ``cx.group``, ``cx.old``, ``cx.new``, ``cx.norm_kinds``,
   ``cx.placement``, ...); on refusal it reports an error on ``cx.bag`` (a code from your range,
   added to the table in ``compiler/typecheck``) and returns ``(None, "")``.
4. :meth:`~.base.Method.lowering` returns the pass (``compiler/passes``: ``requires`` /
   ``apply`` / ``ensures``) that builds the tensors; width methods reuse their group's pass,
   which switches on ``op.method`` for its unit map. A method with a new construction adds a
   branch there (or its own pass class, returned here).
5. :meth:`~.base.Method.optimizer_state_map` stays ``None`` until growth during training maps
   Adam's state (issue 12).
6. Import the module below (registration happens at import), add a plan to
   ``tests/test_replay.py``'s corpus and regenerate it, and run ``tests/test_methods.py`` (the
   README's method table is generated from this registry: paste :func:`methods_table`'s output).
"""

from __future__ import annotations

# Registration happens at import; this order is the order of every list users see (help texts).
from scaler_wizard.compiler.methods import tile, lemon, net2net, zero, dup, mean, copy_experts  # noqa: F401,E401
from scaler_wizard.compiler.methods import identity, zero_layer, cancel, copy_layer, lesa  # noqa: F401,E401
from scaler_wizard.compiler.methods import stack, duplicate, upcycle, grow_to, extend_context  # noqa: F401,E401
from scaler_wizard.compiler.methods.base import REGISTRY, Method, aliases_of, lookup, methods_of, register
from scaler_wizard.compiler.methods.layer import LayerInit
from scaler_wizard.compiler.methods.upcycle import UPCYCLE_TARGETS, Upcycle, UpcycleTarget
from scaler_wizard.compiler.methods.width import WidthMethod

WIDTH_METHODS: dict[str, type[WidthMethod]] = methods_of("widen")
WIDTH_ALIASES: dict[str, str] = aliases_of("widen")
DEPTH_INITS: dict[str, str] = {name: cls.summary for name, cls in methods_of("layer").items()}
DEPTH_ALIASES: dict[str, str] = aliases_of("layer")

DEFAULT_WIDTH_METHOD = {
    "hidden": "lemon",  # tile when the factor is an integer (see the type checker)
    "ffn": "net2net",
    "heads": "dup",
    "kv_heads": "tile",
    "head_dim": "zero",
    "vocab": "mean",
    "experts": "copy",
}


def methods_table() -> str:
    """The README's method table (markdown), generated from the registry."""
    rows = ["| statement | method | groups | exactness | what it does | source |", "|---|---|---|---|---|---|"]
    order = {"widen": 0, "layer": 1, "op": 2}
    for (kind, name), cls in sorted(REGISTRY.items(), key=lambda kv: order[kv[0][0]]):
        stmt = {"widen": "widen", "layer": "insert", "op": name}[kind]
        alias = f" ({', '.join(cls.aliases)})" if cls.aliases else ""
        groups = ", ".join(cls.groups) or "-"
        rows.append(f"| {stmt} | `{name}`{alias} | {groups} | {cls.base} | {cls.summary} | {cls.source} |")
    return "\n".join(rows)


__all__ = [
    "REGISTRY", "Method", "WidthMethod", "LayerInit", "Upcycle", "UpcycleTarget", "UPCYCLE_TARGETS",
    "register", "lookup", "methods_of", "aliases_of", "WIDTH_METHODS", "WIDTH_ALIASES", "DEPTH_INITS",
    "DEPTH_ALIASES", "DEFAULT_WIDTH_METHOD", "methods_table",
]
