"""The method contract, typed statement options and the registry.

A growth method is a frozen dataclass whose fields are its statement's ``key=value`` options
(typed: ``float``, ``bool``, a closed set of names, a layer index); its class variables describe it
(name, aliases, the groups it applies to, its base exactness class, a one-line summary and its
source). It contributes three things:

* ``exactness(cx)`` -> ``(class, reason)``: the exactness rule, decided from IR facts held by the
  type checker's context ``cx`` (norm kind and placement, RoPE, GQA, tied weights); ``(None, "")``
  after reporting an error on ``cx.bag``;
* ``lowering(op)`` -> the :class:`~scaler_wizard.compiler.passes.base.Pass` that lowers one resolved
  statement (requires / apply / ensures; the per-group pass modules under ``compiler/passes``);
* ``optimizer_state_map(op, ir)`` -> how Adam's moments of the old tensors carry over to the grown
  ones when growing during training; ``None`` means "not derived" (the hook issue 12 fills).

Options are parsed once, here, from the AST (:meth:`Method.parse_options`), with positioned
errors (SW204 unknown key, SW207 bad value); the statement's resolved op keeps the typed instance
(:attr:`ResolvedOp.spec`) and a dict of the options the user wrote (``op.options``).
"""

from __future__ import annotations

from dataclasses import Field, dataclass, field, fields
from typing import Any, Callable, ClassVar

from scaler_wizard.compiler.resolved import APPROX, EXACT
from scaler_wizard.diagnostics import DiagnosticBag, suggest
from scaler_wizard.grammar import ast as A

# --------------------------------------------------------------------------- typed options


def option(doc: str, *, key: str | None = None, kind: str = "any", choices: tuple = ()) -> Field:
    """A method option field (default ``None`` = not given).

    ``kind``: ``"nonneg"`` (a non-negative number), ``"choice"`` (one of ``choices``; the names
    users type), ``"bool"`` (``true`` / ``false``), ``"any"`` (checked later by the method, e.g. a
    layer index whose bounds depend on the plan). ``key``: the name users type when it is not the
    field's name (``from`` is a Python keyword: field ``from_``)."""
    return field(default=None, metadata={"option": True, "doc": doc, "key": key, "kind": kind, "choices": choices})


def option_fields(cls) -> list[Field]:
    return [f for f in fields(cls) if f.metadata.get("option")]


def option_key(f: Field) -> str:
    return f.metadata.get("key") or f.name


def _raw(v: A.Value) -> Any:
    return v.name if isinstance(v, A.Ident) else v.value


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _convert(f: Field, value: Any) -> tuple[bool, Any]:
    """(ok, typed value) for one option field."""
    kind = f.metadata["kind"]
    if kind == "nonneg":
        return (_is_number(value) and value >= 0), value
    if kind == "choice":
        return (isinstance(value, str) and value in f.metadata["choices"]), value
    if kind == "bool":
        if isinstance(value, bool):
            return True, value
        if value in ("true", "false"):
            return True, value == "true"
        return False, value
    return True, value


def _bad_value_message(f: Field, value: Any) -> str:
    key = option_key(f)
    kind = f.metadata["kind"]
    if kind == "nonneg":
        return f"`{key}` must be a non-negative number, got `{value}`"
    names = ("true", "false") if kind == "bool" else f.metadata["choices"]
    return f"`{key}` must be " + " or ".join(f"`{v}`" for v in names) + f", got `{value}`"


# --------------------------------------------------------------------------- the contract


@dataclass(frozen=True)
class Method:
    """Base of every growth method (see the module docstring)."""

    kind: ClassVar[str] = ""  # "widen" | "layer" (a layer init of `insert`) | "op" (stack, duplicate, upcycle, grow to)
    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    groups: ClassVar[tuple[str, ...]] = ()
    base: ClassVar[str] = EXACT  # exactness class when nothing in the model stands in its way
    summary: ClassVar[str] = ""
    source: ClassVar[str] = ""  # paper or library the maths comes from
    statement: ClassVar[str] = ""  # how error messages name the statement: "`widen`"

    # ..................................................................... options
    @classmethod
    def options_doc(cls) -> dict[str, str]:
        return {option_key(f): f.metadata["doc"] for f in option_fields(cls)}

    @classmethod
    def parse_options(cls, options, bag: DiagnosticBag, what: str | None = None) -> dict[str, Any]:
        """Typed values of the options written on a statement: ``{key: value}`` for the valid ones,
        in the order written. Unknown keys are SW204, bad values SW207 (positioned at the value)."""
        what = what or cls.statement
        by_key = {option_key(f): f for f in option_fields(cls)}
        raw: dict[str, Any] = {}
        spans: dict[str, A.Span] = {}
        for o in options:
            key = o.key.name
            if key not in by_key:
                hint = suggest(key, by_key)
                known = ", ".join(f"`{k}`" for k in by_key) or "none"
                if key == "seed":
                    hint_text = "random choices are seeded plan-wide: write `seed <n>` on its own line; "
                else:
                    hint_text = f"did you mean `{hint}`? " if hint else ""
                bag.error("SW204", f"unknown option `{key}` for {what}", o.key.span,
                          help=hint_text + f"options of {what}: {known}")
                continue
            raw[key] = _raw(o.value)
            spans.setdefault(key, o.value.span)
        out = dict(raw)
        for key, f in by_key.items():
            if key not in raw:
                continue
            ok, value = _convert(f, raw[key])
            if not ok:
                bag.error("SW207", _bad_value_message(f, raw[key]), spans[key])
                out.pop(key)
            else:
                out[key] = value
        return out

    @classmethod
    def from_options(cls, values: dict[str, Any]) -> "Method":
        """The typed instance for parsed option values (:meth:`parse_options`)."""
        names = {option_key(f): f.name for f in option_fields(cls)}
        return cls(**{names[k]: v for k, v in values.items() if k in names})

    def given(self) -> dict[str, Any]:
        """The options that were written (not None), by the names users type."""
        return {option_key(f): getattr(self, f.name) for f in option_fields(self) if getattr(self, f.name) is not None}

    # ..................................................................... rules and lowering
    def unread(self, group: str | None) -> dict[str, str | None]:
        """Per option this method accepts in general: why it would not read it for ``group`` (None:
        it does). An option written but not read is an error (SW204, "has no effect")."""
        return {}

    def exactness(self, cx) -> tuple[str | None, str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def check(self, cx) -> bool:
        """Method-specific checks of option values against the plan (positioned errors on
        ``cx.bag``); False stops the statement."""
        return True

    def lowering(self, op):
        """The pass lowering ``op`` (None: lowered by another pass, as layer inits are by `depth`)."""
        return None

    def optimizer_state_map(self, op, ir) -> Callable | None:
        """How optimizer state (Adam m, v) of the old tensors maps to the grown ones; None = not
        derived yet (growth during training must then reset the state of touched tensors)."""
        return None


# --------------------------------------------------------------------------- the registry

REGISTRY: dict[tuple[str, str], type[Method]] = {}


@dataclass(frozen=True)
class LayerCopyOp(Method):
    """A depth op whose new layers are whole copies of existing ones (``duplicate``, ``stack``):
    approx, since a copied layer adds its update to the residual stream a second time."""

    kind = "op"
    base = APPROX
    groups = ("layers",)
    init = "copy"

    def unread(self, group=None):
        return {"noise": f"`{self.name}` copies layers whole"}

    def exactness(self, cx):
        return APPROX, "copied layers change the function (SOLAR / G_stack style)"


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` known by ``(cls.kind, cls.name)`` (and its aliases)."""
    key = (cls.kind, cls.name)
    if not cls.kind or not cls.name:
        raise ValueError(f"{cls.__name__}: a method needs a kind and a name")
    if key in REGISTRY and REGISTRY[key] is not cls:
        raise ValueError(f"method {key} registered twice ({REGISTRY[key].__name__}, {cls.__name__})")
    REGISTRY[key] = cls
    return cls


def methods_of(kind: str) -> dict[str, type[Method]]:
    return {name: cls for (k, name), cls in REGISTRY.items() if k == kind}


def aliases_of(kind: str) -> dict[str, str]:
    return {a: cls.name for (k, _), cls in REGISTRY.items() if k == kind for a in cls.aliases}


def lookup(kind: str, name: str) -> type[Method] | None:
    """The method registered as ``name`` (or an alias of it) for ``kind``; None if unknown."""
    return REGISTRY.get((kind, aliases_of(kind).get(name, name)))

