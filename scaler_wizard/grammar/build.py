"""Tree -> AST for one statement of the plan language: a ``lark.Transformer`` with
``v_args(meta=True)`` over the parse tree of ``expand.lark``, checking what the grammar cannot
express: ranges and shapes of numbers, factors and sizes (SW104), string escapes (SW108), the
separators between ``train { }`` entries (SW106) and ``prefer`` choices (SW102). Problems are
collected in ``problems``, positioned; the parser reports them with its own.
"""

from __future__ import annotations

import decimal
import functools
import math
import re

from scaler_wizard.diagnostics import Diagnostic, suggest
from scaler_wizard.grammar import ast as A
from scaler_wizard.grammar.forms import FORMS, form_help, show

__all__ = ["builder", "size_to_params", "SIZE_UNITS", "PREFER_CHOICES"]

PREFER_CHOICES = ("depth", "width")
SIZE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9}
_INT_RE = re.compile(r"[-+]?[0-9]+\Z")
_FLOAT_RE = re.compile(r"[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][-+]?[0-9]+)?\Z")
_SIZE_RE = re.compile(r"((?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][-+]?[0-9]+)?)([A-Za-z]?)\Z")
_ESCAPE_RE = re.compile(r"\\(u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)", re.S)
_SIMPLE_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "r": "\r", "t": "\t", "0": "\0"}
_MAX_DIGITS = 4000  # int() refuses longer digit strings on Python >= 3.11


def size_to_params(mantissa: str, unit: str) -> float:
    """``("1.5", "B") -> 1.5e9``, correctly rounded (exact decimal arithmetic, one rounding)."""
    with decimal.localcontext() as ctx:
        ctx.prec, ctx.Emax, ctx.Emin = 2000, decimal.MAX_EMAX, decimal.MIN_EMIN
        ctx.traps[decimal.Overflow] = False
        return float(decimal.Decimal(mantissa) * SIZE_UNITS[unit])


@functools.lru_cache(maxsize=None)
def builder():
    """The lark Transformer (``v_args(meta=True)``) from one statement's tree to its AST node,
    collecting SW104/SW106/SW108 problems in ``problems``; defined on first use (lark is
    imported lazily)."""
    from lark import Transformer, v_args

    @v_args(meta=True)
    class Build(Transformer):
        def __init__(self, lines, kw: str | None, sub: str | None):  # lines: the parser's offset -> Span map
            super().__init__()
            self.lines, self.kw, self.sub, self.problems = lines, kw, sub, []

        # ---- positions and leaves
        def _tspan(self, tok) -> A.Span:
            return self.lines.span(tok.start_pos, tok.end_pos)

        def _mspan(self, meta) -> A.Span:
            return self.lines.span(meta.start_pos, meta.end_pos)

        def _bad(self, tok, message: str, code: str = "SW104", help: str | None = None) -> None:
            self.problems.append(Diagnostic(code, message, self._tspan(tok), help=help or form_help(self.kw, self.sub)))

        def _ident(self, tok) -> A.Ident | None:
            return None if tok is None else A.Ident(str(tok), self._tspan(tok))

        def _int(self, tok, what: str, minimum: int | None) -> A.Int:
            text = str(tok)
            if not _INT_RE.match(text):
                if text.startswith(".") and self.lines.text[max(0, tok.start_pos - 2) : tok.start_pos] == "..":
                    self._bad(tok, "malformed layer range: write it with two dots, like `8..24`")
                elif _FLOAT_RE.match(text):
                    self._bad(tok, f"{what} must be a whole number, found {show(text)}")
                else:
                    self._bad(tok, f"malformed number {show(text)}: {what} must be a whole number")
                return A.Int(0, self._tspan(tok))
            if len(text) > _MAX_DIGITS:
                self._bad(tok, f"number {show(text)} is too long")
                return A.Int(0, self._tspan(tok))
            value = int(text)
            if minimum is not None and value < minimum:
                self._bad(tok, f"{what} must be {'0 or more' if minimum == 0 else f'at least {minimum}'}, found {show(text)}")
            return A.Int(value, self._tspan(tok))

        def _float(self, tok, what: str) -> float:
            if not _FLOAT_RE.match(tok):
                self._bad(tok, f"malformed number {show(str(tok))}: {what}")
                return 0.0
            if not math.isfinite(value := float(tok)):
                self._bad(tok, f"number {show(str(tok))} is too large")
                return 0.0
            return value

        def _string(self, tok) -> A.Str:
            before = len(self.problems)

            def unescape(m: re.Match) -> str:
                e = m.group(1)
                if e in _SIMPLE_ESCAPES:
                    return _SIMPLE_ESCAPES[e]
                if len(e) > 1 and int(e[1:], 16) <= 0x10FFFF:
                    return chr(int(e[1:], 16))
                start = tok.start_pos + 1 + m.start()
                if len(self.problems) > before:
                    return ""  # one diagnostic per string
                self.problems.append(Diagnostic("SW108", f"invalid escape sequence {show(m.group(0))} in a string",
                                                self.lines.span(start, start + len(m.group(0))),
                                                help='escapes are \\\\ \\" \\n \\r \\t \\0 \\uXXXX \\UXXXXXXXX; write `\\\\` for a backslash'))  # fmt: skip
                return ""

            return A.Str(_ESCAPE_RE.sub(unescape, str(tok)[1:-1]), self._tspan(tok))

        def _value(self, tok):
            if tok.type == "NUMBER":
                if _INT_RE.match(tok):
                    return self._int(tok, "an integer value", None)
                return A.Number(self._float(tok, "expected an integer like `3` or a float like `3e-4`"), self._tspan(tok))
            if tok.type == "STRING":
                return self._string(tok)
            if tok.type in ("TRUE", "FALSE"):
                return A.Bool(tok.type == "TRUE", self._tspan(tok))
            return self._ident(tok)

        def _factor_value(self, tok, whole: bool) -> float:
            text, what = str(tok)[1:], "the stack factor" if whole else "the factor"
            if not _FLOAT_RE.match(text):
                self._bad(tok, f"malformed factor {show(str(tok))}: expected `x` and a number, like `x2` or `x1.5`")
                return 1.0
            if not math.isfinite(value := float(text)):
                self._bad(tok, f"factor {show(str(tok))} is too large")
                return 1.0
            if value <= 0:
                self._bad(tok, f"{what} must be greater than 0, found {show(str(tok))}")
            elif whole and (not _INT_RE.match(text) or value < 1):
                self._bad(tok, f"{what} must be a whole number of copies like `x2`, found {show(str(tok))}")
            return value

        # ---- rules
        def statement(self, meta, ch):
            return ch[0]

        def option(self, meta, ch):
            return A.Option(self._ident(ch[0]), self._value(ch[2]), self._mspan(meta))

        def _opts(self, ch) -> tuple:
            return tuple(c for c in ch if isinstance(c, A.Option))

        def model_stmt(self, meta, ch):
            return A.ModelStmt(self._string(ch[1]), self._mspan(meta))

        def factor(self, meta, ch):
            return A.Factor(self._factor_value(ch[0], whole=False), self._tspan(ch[0]))

        def to_size(self, meta, ch):
            return A.ToSize(self._int(ch[1], "the new size", 1).value, self._mspan(meta))

        def by_delta(self, meta, ch):
            return A.ByDelta(self._int(ch[1], "the size increase", 1).value, self._mspan(meta))

        def widen_stmt(self, meta, ch):
            return A.WidenStmt(self._ident(ch[1]), ch[2], self._ident(ch[3]), self._opts(ch[4:]), self._mspan(meta))

        def insert_layer_stmt(self, meta, ch):
            index = self._int(ch[2], "a layer index", 0)
            return A.InsertLayerStmt(index, self._ident(ch[3]), self._opts(ch[4:]), self._mspan(meta))

        def insert_after_stmt(self, meta, ch):
            count, after = self._int(ch[1], "the number of new layers", 1), self._int(ch[4], "a layer index", 0)
            return A.InsertLayersAfterStmt(count, after, self._ident(ch[5]), self._opts(ch[6:]), self._mspan(meta))

        def insert_every_stmt(self, meta, ch):
            every = self._int(ch[3], "the layer interval", 1)
            return A.InsertEveryStmt(every, self._ident(ch[4]), self._opts(ch[5:]), self._mspan(meta))

        def duplicate_stmt(self, meta, ch):
            a, b = self._int(ch[2], "a layer index", 0), self._int(ch[4], "a layer index", 0)
            return A.DuplicateLayersStmt(a, b, self._opts(ch[5:]), self._mspan(meta))

        def stack_stmt(self, meta, ch):
            tok, before, k = ch[1], len(self.problems), 1
            self._factor_value(tok, whole=True)
            if len(self.problems) == before:  # a whole number: read it exactly, not via float
                if len(tok) - 1 > _MAX_DIGITS:
                    self._bad(tok, f"factor {show(str(tok))} is too long")
                else:
                    k = int(tok[1:])
            return A.StackStmt(A.Int(k, self._tspan(tok)), self._opts(ch[2:]), self._mspan(meta))

        def upcycle_stmt(self, meta, ch):
            e, k = self._int(ch[3], "the number of experts", 1), self._int(ch[5], "the number of experts per token", 1)
            return A.UpcycleStmt(self._ident(ch[1]), e, k, self._opts(ch[6:]), self._mspan(meta))

        def grow_stmt(self, meta, ch):
            size, prefer, text = ch[2], self._ident(ch[4]), str(ch[2])
            params, unit = 0.0, ""
            m = _SIZE_RE.match(text)
            if not m:
                if text[0] in "+-":
                    self._bad(size, f"the target size must be a positive parameter count, found {show(text)}")
                else:
                    self._bad(size, f"malformed size {show(text)}: expected a parameter count like `360M` or `1.5B`")
            elif m.group(2) not in SIZE_UNITS:
                self._bad(size, f"malformed size {show(text)}: unknown unit `{m.group(2)}`",
                         help="size units are K (thousand), M (million) and B (billion), upper case")
            else:
                unit, params = m.group(2), size_to_params(m.group(1), m.group(2))
                if not math.isfinite(params):
                    self._bad(size, f"size {show(text)} is too large")
                    params = 0.0
                elif params <= 0:
                    self._bad(size, f"the target size must be greater than 0, found {show(text)}")
            if prefer is not None and prefer.name not in PREFER_CHOICES:
                guess = suggest(prefer.name, PREFER_CHOICES)
                self._bad(ch[4], f"unexpected name {show(prefer.name)}; expected `depth` or `width`", code="SW102",
                         help=(f"did you mean `{guess}`? " if guess else "") + f"the form is `{FORMS['grow']}`")
            return A.GrowToStmt(params, unit, prefer, self._mspan(meta))

        def extend_stmt(self, meta, ch):
            length = self._int(ch[3], "the context length", 1)
            return A.ExtendContext(length, self._ident(ch[4]), self._opts(ch[5:]), self._mspan(meta))

        def seed_stmt(self, meta, ch):
            return A.SeedStmt(self._int(ch[1], "the seed", 0), self._mspan(meta))

        def dtype_stmt(self, meta, ch):
            return A.DtypeStmt(self._ident(ch[1]), self._mspan(meta))

        def noise_stmt(self, meta, ch):
            value = self._float(ch[1], "expected a number like `0.01`")
            if value < 0:
                self._bad(ch[1], f"the noise scale must be 0 or more, found {show(str(ch[1]))}")
            return A.NoiseStmt(A.Number(value, self._tspan(ch[1])), self._mspan(meta))

        def train_ref(self, meta, ch):
            return A.TrainStmt((), self._string(ch[1]), self._mspan(meta))

        def block(self, meta, ch):
            return self._opts(ch)

        def train_block(self, meta, ch):
            opts = ch[1]
            for a, b in zip(opts, opts[1:]):  # the grammar is lenient about separators; we are not
                gap = re.sub(r"#[^\r\n]*", "", self.lines.text[a.span.end : b.span.start])
                if not any(c in gap for c in ";\r\n"):
                    self.problems.append(Diagnostic(
                        "SW106", "malformed `train { }` block: entries must be separated by `;` or a line break",
                        b.key.span, help=f"put `;` before {show(b.key.name)}; the form is `{FORMS['train']}`"))  # fmt: skip
            return A.TrainStmt(opts, None, self._mspan(meta))

        def stage_head(self, meta, ch):
            return self._int(ch[2], "the training step", 0), self._opts(ch[3:])

    return Build
