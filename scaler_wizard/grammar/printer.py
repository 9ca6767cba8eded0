"""Canonical text for a plan AST: ``parse(print_plan(plan)) == plan`` for every valid AST.

One statement per line (a non-empty ``train { }`` block or ``at step`` stage spans several
lines, a stage's statements indented by two spaces). Floats are
printed with ``repr`` (shortest round-tripping form), whole factors without ``.0``; strings are
escaped so that any value, control characters and line breaks included, reads back the same.
"""

from __future__ import annotations

import decimal
import math

from scaler_wizard.grammar import ast as A

__all__ = ["print_plan", "print_statement", "statement_text", "format_value", "quote"]

_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def quote(value: str) -> str:
    """A string literal for ``value``."""
    out = []
    for ch in value:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ch.isprintable() and ch not in "\u2028\u2029":
            out.append(ch)
        elif ord(ch) <= 0xFFFF:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return '"' + "".join(out) + '"'


def _float(value: float) -> str:
    if not math.isfinite(value):
        raise ValueError(f"cannot print non-finite number {value!r} in a plan")
    return repr(float(value))


def _factor(value: float) -> str:
    if not math.isfinite(value):
        raise ValueError(f"cannot print non-finite factor {value!r} in a plan")
    if float(value).is_integer() and abs(value) < 2**53:
        return f"x{int(value)}"
    return "x" + repr(float(value))


def _size(params: float, unit: str) -> str:
    """Text for ``grow to``: a mantissa that, times the unit, gives back exactly ``params``."""
    from scaler_wizard.grammar.parser import SIZE_UNITS, size_to_params

    if not math.isfinite(params):
        raise ValueError(f"cannot print non-finite size {params!r} in a plan")
    mult = SIZE_UNITS[unit]
    m = params / mult
    candidates = []
    if m.is_integer() and abs(m) < 2**63:
        candidates.append(str(int(m)))
    candidates.append(repr(m))
    for c in candidates:
        if size_to_params(c, unit) == params:
            return c + unit
    # Exact fallback: a double is an exact decimal, and dividing by a power of ten stays exact.
    with decimal.localcontext() as ctx:
        ctx.prec = 2000
        exact = decimal.Decimal(params) / mult
    return format(exact, "f" if abs(exact.adjusted()) < 30 else "e") + unit


def format_value(v: A.Value) -> str:
    if isinstance(v, A.Bool):
        return "true" if v.value else "false"
    if isinstance(v, A.Int):
        return str(v.value)
    if isinstance(v, A.Number):
        return _float(v.value)
    if isinstance(v, A.Str):
        return quote(v.value)
    if isinstance(v, A.Ident):
        return v.name
    raise TypeError(f"not a plan value: {v!r}")


def _tail(*parts: A.Ident | None, options: tuple[A.Option, ...] = ()) -> str:
    words = [p.name for p in parts if p is not None]
    words += [f"{o.key.name}={format_value(o.value)}" for o in options]
    return "".join(" " + w for w in words)


def print_statement(s: A.Statement) -> str:
    """One statement in canonical form (no trailing newline)."""
    if isinstance(s, A.ModelStmt):
        return f"model {quote(s.ref.value)}"
    if isinstance(s, A.WidenStmt):
        a = s.amount
        if isinstance(a, A.Factor):
            amount = _factor(a.value)
        elif isinstance(a, A.ToSize):
            amount = f"to {a.value}"
        else:
            amount = f"by {a.value}"
        return f"widen {s.group.name} {amount}" + _tail(s.method, options=s.options)
    if isinstance(s, A.InsertLayerStmt):
        return f"insert layer {s.index.value}" + _tail(s.init, options=s.options)
    if isinstance(s, A.InsertLayersAfterStmt):
        return f"insert {s.count.value} layers after {s.after.value}" + _tail(s.init, options=s.options)
    if isinstance(s, A.InsertEveryStmt):
        return f"insert layers every {s.every.value}" + _tail(s.init, options=s.options)
    if isinstance(s, A.DuplicateLayersStmt):
        return f"duplicate layers {s.start.value}..{s.stop.value}" + _tail(options=s.options)
    if isinstance(s, A.StackStmt):
        return f"stack x{s.factor.value}" + _tail(options=s.options)
    if isinstance(s, A.UpcycleStmt):
        return (
            f"upcycle {s.group.name} experts {s.experts.value} top {s.top_k.value}"
            + _tail(options=s.options)
        )
    if isinstance(s, A.GrowToStmt):
        text = f"grow to {_size(s.params, s.unit)}"
        return text + (f" prefer {s.prefer.name}" if s.prefer is not None else "")
    if isinstance(s, A.ExtendContext):
        return f"extend context to {s.length.value}" + _tail(s.method, options=s.options)
    if isinstance(s, A.Stage):
        head = f"at step {s.step.value}" + _tail(options=s.options)
        if not s.statements:
            return head + " {}"
        body = "".join(f"  {print_statement(t)}\n" for t in s.statements)
        return head + " {\n" + body + "}"
    if isinstance(s, A.SeedStmt):
        return f"seed {s.value.value}"
    if isinstance(s, A.DtypeStmt):
        return f"dtype {s.name.name}"
    if isinstance(s, A.NoiseStmt):
        return f"noise {_float(s.value.value)}"
    if isinstance(s, A.TrainStmt):
        if s.ref is not None:
            return f"train {quote(s.ref.value)}"
        if not s.options:
            return "train {}"
        body = "".join(f"  {o.key.name} = {format_value(o.value)}\n" for o in s.options)
        return "train {\n" + body + "}"
    raise TypeError(f"not a plan statement: {s!r}")


def print_plan(plan: A.Plan) -> str:
    """The whole plan, one statement per line, ending with a newline (empty plan: ``""``)."""
    return "".join(print_statement(s) + "\n" for s in plan.statements)


def statement_text(s) -> str:
    """``print_statement(s)`` for messages, or the node's class name when it cannot be printed."""
    try:
        return print_statement(s)
    except Exception:  # an unusual node: fall back to the class name
        return type(s).__name__
