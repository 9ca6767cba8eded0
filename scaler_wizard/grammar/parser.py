"""Parser for the plan language: text -> :class:`~scaler_wizard.grammar.ast.Plan`.

How it works
------------
1. A small hand-written scanner splits the file into statements. It knows about strings,
   ``#`` comments, ``;`` and line breaks as separators, and ``{ ... }`` blocks (inside which
   line breaks do not end the statement). It reports unterminated strings (SW105) and
   unclosed blocks (SW106) itself, and recovers: a block that is still open when a line
   starts with a statement keyword (``widen hidden x2``, not ``seed = 3``) is taken to have
   lost its ``}``.
2. Each statement is parsed on its own by the lark LALR parser (``expand.lark``, start
   symbol ``statement``, contextual lexer), so every bad statement gets its own diagnostic
   and all of them are reported together, sorted by position.
3. A tree walker builds the AST, checking the shape of numbers, factors and sizes (SW104).
   Names (groups, methods, inits, dtypes, option keys) are not checked here: the type
   checker resolves them against the model.

Positions: lines and columns are 1-based, ``end_col`` exclusive, offsets 0-based. Lines are
counted the way :meth:`str.splitlines` counts them, so carets drawn by
:func:`~scaler_wizard.diagnostics.render` always sit under the right character.

Diagnostic codes
----------------

=======  =====================================================================================
Code     Meaning
=======  =====================================================================================
SW101    Unexpected character: something no token can start with (``@``, ``×``, a NUL byte,
         a non-ASCII letter in a name).
SW102    Unexpected token: a well-formed token where the statement needs something else. The
         message says what was found and what was expected (``expected a factor like `x2`,
         `to <size>` or `by <delta>```). Also an unknown ``prefer`` choice.
SW103    The statement ends too early (``widen hidden``); the caret sits just after its end.
SW104    Malformed or out-of-range number, factor or size: ``x0``, ``x-2``, ``to 0``,
         ``1.5Q``, ``12abc``, a negative layer index, ``stack x1.5``, an infinite float.
SW105    Unterminated string (no closing ``"`` on the line).
SW106    Unterminated or malformed ``train { }`` block: ``{`` never closed, an entry that is
         not ``key = value``, two entries without ``;`` or a line break between them, a
         stray ``}``.
SW107    Unknown statement keyword (``widn hidden x2``), with a "did you mean" help.
SW108    Invalid escape sequence in a string (``"C:\\models"``: write ``\\\\``).
SW109    A statement that cannot stand inside an ``at step <N> { }`` growth stage: ``model``,
         ``seed``, ``dtype``, ``noise``, ``train`` (plan-wide settings) or a nested ``at``.
=======  =====================================================================================

Every syntax diagnostic carries a help line with the expected form of the statement.

Public API: :func:`parse`, :func:`parse_file`, :data:`STATEMENT_KEYWORDS`, :data:`FORMS`,
:func:`get_lark` (the cached lark object, for tools and fuzzing).
"""

from __future__ import annotations

import bisect
import decimal
import functools
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from scaler_wizard.diagnostics import Diagnostic, PlanError, UsageError, suggest
from scaler_wizard.grammar import ast as A

__all__ = ["parse", "parse_file", "get_lark", "STATEMENT_KEYWORDS", "FORMS", "size_to_params"]

# --------------------------------------------------------------------------- vocabulary
FORMS: dict[str, str] = {
    "model": 'model "<hub id, local dir or file.gguf>"',
    "widen": "widen <group> (x<factor> | to <size> | by <delta>) [<method>] [key=value ...]",
    "insert": (
        "insert layer <index> [<init>] [key=value ...], "
        "insert <n> layers after <index> [<init>] or insert layers every <k> [<init>]"
    ),
    "duplicate": "duplicate layers <a>..<b> [key=value ...]",
    "stack": "stack x<k> [key=value ...]",
    "upcycle": "upcycle <group> experts <E> top <k> [key=value ...]",
    "grow": "grow to <size>[K|M|B] [prefer depth|width]",
    "extend": "extend context to <tokens> [<method>] [key=value ...]",
    "seed": "seed <int>",
    "dtype": "dtype <name>  (bfloat16, float16 or float32)",
    "noise": "noise <float>",
    "train": 'train { key = value ... } or train "recipe.toml"',
    "at": "at step <N> [optimizer=carry|reset] [rewarm=<steps>] { <growth statements> }",
}
STATEMENT_KEYWORDS: tuple[str, ...] = tuple(FORMS)
#: The statements a growth stage (`at step N { ... }`) may hold.
GROWTH_KEYWORDS: tuple[str, ...] = ("widen", "insert", "duplicate", "stack", "upcycle", "grow", "extend")
# The three `insert` forms, told apart by the word after `insert` (for help lines).
_SUB_FORMS = {
    "insert layer": "insert layer <index> [<init>] [key=value ...]",
    "insert layers": "insert layers every <k> [<init>] [key=value ...]",
    "insert <n>": "insert <n> layers after <index> [<init>] [key=value ...]",
}
_INSERT_SUB = re.compile(r"insert[ \t]+(?:(layers|layer)(?![A-Za-z0-9_])|([-+]?[0-9]))")


def _form_key(kw: str | None, src: str) -> str | None:
    """``kw``, refined to one of the ``insert`` forms when the statement says which."""
    if kw == "insert":
        m = _INSERT_SUB.match(src)
        if m:
            return f"insert {m.group(1)}" if m.group(1) else "insert <n>"
    return kw
PREFER_CHOICES = ("depth", "width")
SIZE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9}

_WORD_END = r"(?![A-Za-z0-9_])"
_FIRST_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INT_RE = re.compile(r"[-+]?[0-9]+\Z")
_FLOAT_RE = re.compile(r"[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][-+]?[0-9]+)?\Z")
_SIZE_RE = re.compile(r"((?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][-+]?[0-9]+)?)([A-Za-z]?)\Z")
_ESCAPE_RE = re.compile(r"\\(u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)", re.S)
_SIMPLE_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "r": "\r", "t": "\t", "0": "\0"}
_MAX_DIGITS = 4000  # int() refuses longer digit strings on Python >= 3.11


# --------------------------------------------------------------------------- lark
@functools.lru_cache(maxsize=None)
def get_lark():
    """The lark parser, built once (lazily, so importing this module stays cheap)."""
    from lark import Lark

    grammar = Path(__file__).with_name("expand.lark").read_text(encoding="utf-8")
    return Lark(
        grammar,
        parser="lalr",
        lexer="contextual",
        start=["plan", "statement", "stage_head"],
        propagate_positions=True,
        maybe_placeholders=True,
    )


# --------------------------------------------------------------------------- positions
class _Lines:
    """Offset -> (line, col), counting line breaks like str.splitlines (and so like render)."""

    def __init__(self, text: str, file: str):
        self.text = text
        self.file = file
        self.starts = [0]
        pos = 0
        for line in text.splitlines(keepends=True):
            pos += len(line)
            self.starts.append(pos)
        if self.starts[-1] == len(text) and len(self.starts) > 1 and not _ends_with_break(text):
            self.starts.pop()  # the last line has no terminator: no empty line after it

    def pos(self, offset: int) -> tuple[int, int]:
        offset = max(0, min(offset, len(self.text)))
        i = bisect.bisect_right(self.starts, offset) - 1
        return i + 1, offset - self.starts[i] + 1

    def span(self, start: int, end: int | None = None) -> A.Span:
        end = start if end is None else end
        line, col = self.pos(start)
        end_line, end_col = self.pos(end)
        return A.Span(line, col, end_line, end_col, start, end, self.file)

    def point(self, offset: int) -> A.Span:
        """A one-column span at ``offset`` (where something is missing)."""
        line, col = self.pos(offset)
        return A.Span(line, col, line, col + 1, offset, offset, self.file)


def _ends_with_break(text: str) -> bool:
    return (text + "x").splitlines()[-1] == "x"


# --------------------------------------------------------------------------- scanner
@dataclass
class _Chunk:
    start: int
    end: int
    broken: bool = False  # already reported by the scanner: do not parse
    block: tuple[int, int] | None = None  # offsets of the first `{` and its matching `}`


def _scan(text: str, lines: _Lines, diags: list[Diagnostic], lo: int = 0, hi: int | None = None) -> list[_Chunk]:
    """Split ``text[lo:hi]`` into statements (see the module docstring)."""
    chunks: list[_Chunk] = []
    n = len(text) if hi is None else hi
    i = lo
    start: int | None = None
    last = 0  # end offset of the last significant character of the current statement
    broken = False
    braces: list[int] = []
    block: list[int] = []  # the first block's `{` and `}` offsets

    def finish() -> None:
        nonlocal start, broken
        if start is not None:
            chunks.append(_Chunk(start, last, broken, tuple(block) if len(block) == 2 else None))
        start, broken = None, False
        braces.clear()
        block.clear()

    def keyword_of(s: int) -> str | None:
        m = _FIRST_WORD.match(text, s)
        return m.group(0) if m else None

    def unclosed(where: str) -> None:
        """SW106 for the innermost open block of the current statement; marks it broken."""
        nonlocal broken
        open_at = braces[0]
        kw = keyword_of(start) if start is not None else None
        what = {"train": "`train { }` block", "at": "`at step` block"}.get(kw, "`{ }` block")
        diags.append(
            Diagnostic(
                "SW106",
                f"{what} is not closed: {where}",
                lines.span(open_at, open_at + 1),
                help=f"close the block with `}}`; the form is `{FORMS['at' if kw == 'at' else 'train']}`",
            )
        )
        broken = True

    while i < n:
        c = text[i]
        if c in " \t":
            i += 1
        elif c == "#":
            while i < n and text[i] not in "\r\n":
                i += 1
        elif c in "\r\n":
            i += 2 if text.startswith("\r\n", i) else 1
            if not braces:
                finish()
                continue
            # Inside a block: does the next line look like a new statement? (A stage holds
            # statements: only an `at` indented no deeper than the stage's own ends it early.)
            j = i
            while j < n and text[j] in " \t":
                j += 1
            m = _FIRST_WORD.match(text, j)
            if keyword_of(start) == "at":
                lost = m and m.group(0) == "at" and lines.pos(j)[1] <= lines.pos(start)[1]
            else:
                lost = m and m.group(0) in FORMS
            if lost:
                k = m.end()
                while k < n and text[k] in " \t":
                    k += 1
                if not text.startswith("=", k):
                    unclosed(f"`}}` expected before line {lines.pos(j)[0]}")
                    finish()
        elif c == ";" and not braces:
            i += 1
            finish()
        else:
            if start is None:
                start = i
            if c == '"':
                j = i + 1
                closed = False
                while j < n:
                    d = text[j]
                    if d == '"':
                        closed = True
                        j += 1
                        break
                    if d in "\r\n":
                        break
                    if d == "\\":
                        if j + 1 < n and text[j + 1] not in "\r\n":
                            j += 2
                            continue
                        j += 1
                        break
                    j += 1
                if not closed:
                    kw = keyword_of(start)
                    diags.append(
                        Diagnostic(
                            "SW105",
                            "unterminated string: no closing `\"` on this line",
                            lines.span(i, j),
                            help=_form_help(kw, prefix='close the string with `"`'),
                        )
                    )
                    broken = True
                i = j
                last = i
                continue
            if c == "{":
                braces.append(i)
                if not block:
                    block.append(i)
            elif c == "}" and braces:
                braces.pop()
                if not braces and len(block) == 1:
                    block.append(i)
            i += 1
            last = i
    if braces and start is not None:
        unclosed("the file ends before its `}`")
    finish()
    return chunks


# --------------------------------------------------------------------------- messages
def _form_help(kw: str | None, prefix: str | None = None) -> str:
    if kw in _SUB_FORMS:
        form = f"the form is `{_SUB_FORMS[kw]}`"
    elif kw in FORMS:
        form = f"the form is `{FORMS[kw]}`"
    else:
        form = "a statement starts with one of: " + ", ".join(STATEMENT_KEYWORDS)
    return f"{prefix}; {form}" if prefix else form


def _show(s: str, limit: int = 32) -> str:
    """A token or character as the user should see it in a message."""
    if len(s) == 1 and (not s.isprintable() or s.isspace()):
        return f"U+{ord(s):04X}"
    if len(s) > limit:
        s = s[: limit - 3] + "..."
    if not s.isprintable():
        s = s.encode("unicode_escape").decode("ascii")
    return f"`{s}`"


_KEYWORD_TERMINALS = {
    "MODEL", "WIDEN", "INSERT", "DUPLICATE", "STACK", "UPCYCLE", "GROW", "SEED", "DTYPE",
    "NOISE", "TRAIN", "LAYER", "LAYERS", "AFTER", "EVERY", "EXPERTS", "TOP", "TO", "BY",
    "PREFER", "TRUE", "FALSE", "EXTEND", "CONTEXT", "AT", "STEP",
}  # fmt: skip
_TERMINAL_WORDS = {
    "IDENT": "a name",
    "NUMBER": "a number",
    "FACTOR": "a factor like `x2`",
    "STRING": 'a quoted string like "..."',
    "RANGE": "`..`",
    "EQ": "`=`",
    "LBRACE": "`{`",
    "RBRACE": "`}`",
    "_SEP": "`;` or a line break",
    "$END": "the end of the statement",
}


def _found(tok_type: str, value: str) -> str:
    if tok_type in _KEYWORD_TERMINALS:
        return f"keyword {_show(value)}"
    if tok_type == "IDENT":
        return f"name {_show(value)}"
    if tok_type == "NUMBER":
        return f"number {_show(value)}"
    if tok_type == "FACTOR":
        return f"factor {_show(value)}"
    if tok_type == "STRING":
        return f"string {_show(value)}"
    if tok_type == "_SEP":
        return "`;`" if value == ";" else "a line break"
    return _show(value)


def _join_or(items: list[str]) -> str:
    items = list(dict.fromkeys(items))
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " or " + items[-1]


_NUMBER_AFTER = {
    "layer": "a layer index like `12`",
    "after": "a layer index like `12`",
    "every": "a layer count like `4`",
    "experts": "a number of experts like `8`",
    "top": "a number of experts per token like `2`",
    "by": "a number of units to add like `512`",
    "seed": "an integer seed like `42`",
    "noise": "a number like `0.01`",
    "..": "the end of the layer range, like `24` in `8..24`",
    "layers": "a layer range like `8..24`",
    "insert": "a number of layers",
    "=": "a value",
    "step": "a training step like `1000`",
}


def _expected(kw: str | None, prev: str, expected: set[str]) -> str:
    """What the parser wanted, in the user's words."""
    exp = {e for e in expected if e not in ("WS", "COMMENT")}
    end_ok = "$END" in exp
    exp.discard("$END")
    if {"FACTOR", "TO", "BY"} <= exp:
        return "a factor like `x2`, `to <size>` or `by <delta>`"
    if {"LAYER", "LAYERS", "NUMBER"} <= exp:
        return "`layer <index>`, `<n> layers after <index>` or `layers every <k>`"
    if {"NUMBER", "STRING", "IDENT", "TRUE"} <= exp:
        return 'a value (a number, a "string", a name, `true` or `false`)'
    if {"STRING", "LBRACE"} <= exp:
        return '`{ key = value ... }` or a quoted recipe file like "recipe.toml"'
    if exp & {"MODEL", "WIDEN", "INSERT"}:
        return "a statement keyword (" + ", ".join(STATEMENT_KEYWORDS) + ")"
    if "RBRACE" in exp:
        return "a `key = value` entry or `}`" if "IDENT" in exp else "`;`, a line break or `}`"
    if exp == {"NUMBER"} and not end_ok:
        if prev == "to":
            if kw == "extend":
                return "a context length in tokens like `8192`"
            if kw == "grow":
                return "a parameter count like `360M` or `1.5B`"
            return "a size like `3072`"
        return _NUMBER_AFTER.get(prev, "a number")
    if exp == {"IDENT"} and not end_ok:
        if prev in ("widen", "upcycle"):
            return "a dimension group name like `hidden` or `ffn`"
        if prev == "dtype":
            return "a dtype name like `bfloat16`"
        if prev == "prefer":
            return "`depth` or `width`"
        return "a name"
    if exp == {"STRING"} and kw == "model":
        return 'a quoted model reference like "SmolLM2-135M"'
    if exp == {"FACTOR"}:
        return "a factor like `x2`"
    if exp <= {"IDENT"} and end_ok:
        if kw == "widen":
            return "a method name like `lemon`, `key=value` options or the end of the statement"
        if kw == "insert":
            return (
                "an init like `identity`, `zero`, `cancel` or `copy`, `key=value` options "
                "or the end of the statement"
            )
        return "`key=value` options or the end of the statement"
    if kw == "at" and "LBRACE" in exp:
        return "`key=value` options or `{`" if "IDENT" in exp else "`{`"
    if exp == {"EQ"}:
        return "`=` and a value (options are written `key=value`)"
    if exp == {"EQ", "IDENT"} and end_ok:
        return "`=`, more `key=value` options or the end of the statement"
    if exp == {"PREFER"} and end_ok:
        return "`prefer depth|width` or the end of the statement"
    words = [_TERMINAL_WORDS.get(e, f"`{e.lower()}`") for e in sorted(exp)]
    if end_ok:
        words.append("the end of the statement")
    return _join_or(words) or "the end of the statement"


_PREV_TOKEN = re.compile(
    r'"(?:[^"\\\r\n]|\\[^\r\n])*"?|#[^\r\n]*|\.\.|[A-Za-z0-9_+\-]+(?:\.(?!\.)[A-Za-z0-9_+\-]*)*|\S'
)


def _prev_token(src: str) -> str:
    toks = [t for t in _PREV_TOKEN.findall(src) if not t.startswith("#")]
    return toks[-1] if toks else ""


# --------------------------------------------------------------------------- values
class _Bad(Exception):
    """A malformed literal inside a statement (becomes SW104 / SW108)."""

    def __init__(self, code: str, message: str, start: int, end: int, help: str | None = None):
        super().__init__(message)
        self.code, self.message, self.start, self.end, self.help = code, message, start, end, help


def size_to_params(mantissa: str, unit: str) -> float:
    """``("1.5", "B") -> 1.5e9``, correctly rounded (exact decimal arithmetic, one rounding)."""
    with decimal.localcontext() as ctx:
        ctx.prec = 2000
        ctx.Emax = decimal.MAX_EMAX
        ctx.Emin = decimal.MIN_EMIN
        ctx.traps[decimal.Overflow] = False
        return float(decimal.Decimal(mantissa) * SIZE_UNITS[unit])


def _unescape(body: str, offset: int) -> str:
    """The value of a string literal's body; ``offset`` is where the body starts."""

    def repl(m: re.Match) -> str:
        e = m.group(1)
        if e in _SIMPLE_ESCAPES:
            return _SIMPLE_ESCAPES[e]
        if len(e) > 1:
            cp = int(e[1:], 16)
            if cp <= 0x10FFFF:
                return chr(cp)
        raise _Bad(
            "SW108",
            f"invalid escape sequence {_show(m.group(0))} in a string",
            offset + m.start(),
            offset + m.end(),
            help='escapes are \\\\ \\" \\n \\r \\t \\0 \\uXXXX \\UXXXXXXXX; write `\\\\` for a backslash',
        )

    return _ESCAPE_RE.sub(repl, body)


class _Walker:
    """Tree (one statement) -> AST node, collecting SW104/SW108 problems."""

    def __init__(self, lines: _Lines, base: int, kw: str | None):
        self.lines = lines
        self.base = base
        self.kw = kw
        self.problems: list[Diagnostic] = []

    # ---- positions
    def tspan(self, tok) -> A.Span:
        return self.lines.span(self.base + tok.start_pos, self.base + tok.end_pos)

    def nspan(self, tree) -> A.Span:
        return self.lines.span(self.base + tree.meta.start_pos, self.base + tree.meta.end_pos)

    def bad(self, tok, message: str, code: str = "SW104", help: str | None = None) -> None:
        self.problems.append(
            Diagnostic(code, message, self.tspan(tok), help=help or _form_help(self.kw))
        )

    # ---- leaves
    def ident(self, tok) -> A.Ident:
        return A.Ident(str(tok), self.tspan(tok))

    def int_(self, tok, what: str, minimum: int | None) -> A.Int:
        text = str(tok)
        if not _INT_RE.match(text):
            if text.startswith(".") and self.lines.text[: self.base + tok.start_pos].endswith(".."):
                self.bad(tok, "malformed layer range: write it with two dots, like `8..24`")
            elif _FLOAT_RE.match(text):
                self.bad(tok, f"{what} must be a whole number, found {_show(text)}")
            else:
                self.bad(tok, f"malformed number {_show(text)}: {what} must be a whole number")
            return A.Int(0, self.tspan(tok))
        if len(text) > _MAX_DIGITS:
            self.bad(tok, f"number {_show(text)} is too long")
            return A.Int(0, self.tspan(tok))
        value = int(text)
        if minimum is not None and value < minimum:
            bound = "0 or more" if minimum == 0 else f"at least {minimum}"
            self.bad(tok, f"{what} must be {bound}, found {_show(text)}")
        return A.Int(value, self.tspan(tok))

    def float_(self, tok, text: str, what: str) -> float:
        if not _FLOAT_RE.match(text):
            self.bad(tok, f"malformed number {_show(str(tok))}: {what}")
            return 0.0
        value = float(text)
        if not math.isfinite(value):
            self.bad(tok, f"number {_show(str(tok))} is too large")
            return 0.0
        return value

    def string(self, tok) -> A.Str:
        text = str(tok)
        try:
            value = _unescape(text[1:-1], self.base + tok.start_pos + 1)
        except _Bad as e:
            self.problems.append(
                Diagnostic(e.code, e.message, self.lines.span(e.start, e.end), help=e.help)
            )
            value = ""
        return A.Str(value, self.tspan(tok))

    def value(self, node):
        t = node.type
        if t == "NUMBER":
            text = str(node)
            if _INT_RE.match(text):
                return self.int_(node, "an integer value", None)
            return A.Number(self.float_(node, text, "expected an integer like `3` or a float like `3e-4`"), self.tspan(node))
        if t == "STRING":
            return self.string(node)
        if t in ("TRUE", "FALSE"):
            return A.Bool(t == "TRUE", self.tspan(node))
        return self.ident(node)

    def options(self, trees) -> tuple[A.Option, ...]:
        out = []
        for tr in trees:
            if tr is None or getattr(tr, "data", None) != "option":
                continue
            key, _eq, val = tr.children
            out.append(A.Option(self.ident(key), self.value(val), self.nspan(tr)))
        return tuple(out)

    def factor(self, tok, *, whole: bool) -> float:
        text = str(tok)[1:]
        what = "the stack factor" if whole else "the factor"
        if not _FLOAT_RE.match(text):
            self.bad(tok, f"malformed factor {_show(str(tok))}: expected `x` and a number, like `x2` or `x1.5`")
            return 1.0
        value = float(text)
        if not math.isfinite(value):
            self.bad(tok, f"factor {_show(str(tok))} is too large")
            return 1.0
        if value <= 0:
            self.bad(tok, f"{what} must be greater than 0, found {_show(str(tok))}")
            return value
        if whole and (not _INT_RE.match(text) or value < 1):
            self.bad(tok, f"{what} must be a whole number of copies like `x2`, found {_show(str(tok))}")
        return value

    # ---- statements
    def statement(self, tree, span: A.Span):
        kind = tree.data
        ch = tree.children
        meth = getattr(self, "s_" + str(kind))
        return meth(ch, span)

    def s_model_stmt(self, ch, span):
        return A.ModelStmt(self.string(ch[1]), span)

    def s_widen_stmt(self, ch, span):
        _kw, group, amount, method, *opts = ch
        tok = amount.children[-1]
        if amount.data == "factor":
            am = A.Factor(self.factor(tok, whole=False), self.tspan(tok))
        elif amount.data == "to_size":
            am = A.ToSize(self.int_(tok, "the new size", 1).value, self.nspan(amount))
        else:
            am = A.ByDelta(self.int_(tok, "the size increase", 1).value, self.nspan(amount))
        return A.WidenStmt(
            self.ident(group), am, self.ident(method) if method is not None else None,
            self.options(opts), span,
        )  # fmt: skip

    def s_insert_layer_stmt(self, ch, span):
        _ins, _layer, index, init, *opts = ch
        return A.InsertLayerStmt(
            self.int_(index, "a layer index", 0),
            self.ident(init) if init is not None else None,
            self.options(opts),
            span,
        )

    def s_insert_after_stmt(self, ch, span):
        _ins, count, _layers, _after, after, init, *opts = ch
        return A.InsertLayersAfterStmt(
            self.int_(count, "the number of new layers", 1),
            self.int_(after, "a layer index", 0),
            self.ident(init) if init is not None else None,
            self.options(opts),
            span,
        )

    def s_insert_every_stmt(self, ch, span):
        _ins, _layers, _every, every, init, *opts = ch
        return A.InsertEveryStmt(
            self.int_(every, "the layer interval", 1),
            self.ident(init) if init is not None else None,
            self.options(opts),
            span,
        )

    def s_duplicate_stmt(self, ch, span):
        _dup, _layers, a, _rng, b, *opts = ch
        return A.DuplicateLayersStmt(
            self.int_(a, "a layer index", 0), self.int_(b, "a layer index", 0), self.options(opts), span
        )

    def s_stack_stmt(self, ch, span):
        _stack, tok, *opts = ch
        before = len(self.problems)
        self.factor(tok, whole=True)
        digits = str(tok)[1:]
        k = 1
        if len(self.problems) == before and _INT_RE.match(digits):  # exact, not via float
            if len(digits) > _MAX_DIGITS:
                self.bad(tok, f"factor {_show(str(tok))} is too long")
            else:
                k = int(digits)
        return A.StackStmt(A.Int(k, self.tspan(tok)), self.options(opts), span)

    def s_upcycle_stmt(self, ch, span):
        _up, group, _experts, e, _top, k, *opts = ch
        return A.UpcycleStmt(
            self.ident(group),
            self.int_(e, "the number of experts", 1),
            self.int_(k, "the number of experts per token", 1),
            self.options(opts),
            span,
        )

    def s_grow_stmt(self, ch, span):
        _grow, _to, size, _prefer, prefer = ch
        text = str(size)
        params, unit = 0.0, ""
        m = _SIZE_RE.match(text)
        if not m:
            if text.startswith("-") or text.startswith("+"):
                self.bad(size, f"the target size must be a positive parameter count, found {_show(text)}")
            else:
                self.bad(size, f"malformed size {_show(text)}: expected a parameter count like `360M` or `1.5B`")
        elif m.group(2) not in SIZE_UNITS:
            unit_help = "size units are K (thousand), M (million) and B (billion), upper case"
            self.bad(size, f"malformed size {_show(text)}: unknown unit `{m.group(2)}`", help=unit_help)
        else:
            unit = m.group(2)
            params = size_to_params(m.group(1), unit)
            if not math.isfinite(params):
                self.bad(size, f"size {_show(text)} is too large")
                params = 0.0
            elif params <= 0:
                self.bad(size, f"the target size must be greater than 0, found {_show(text)}")
        pref = None
        if prefer is not None:
            pref = self.ident(prefer)
            if pref.name not in PREFER_CHOICES:
                guess = suggest(pref.name, PREFER_CHOICES)
                hint = f"did you mean `{guess}`? " if guess else ""
                self.bad(
                    prefer,
                    f"unexpected name {_show(pref.name)}; expected `depth` or `width`",
                    code="SW102",
                    help=f"{hint}the form is `{FORMS['grow']}`",
                )
        return A.GrowToStmt(params, unit, pref, span)

    def s_extend_stmt(self, ch, span):
        _ext, _ctx, _to, length, method, *opts = ch
        return A.ExtendContext(
            self.int_(length, "the context length", 1),
            self.ident(method) if method is not None else None,
            self.options(opts),
            span,
        )

    def s_stage_head(self, ch, span):
        """(step, options) of a stage; the parser assembles the :class:`~A.Stage`."""
        _at, _step, step, *rest = ch
        return self.int_(step, "the training step", 0), self.options(rest)

    def s_seed_stmt(self, ch, span):
        return A.SeedStmt(self.int_(ch[1], "the seed", 0), span)

    def s_dtype_stmt(self, ch, span):
        return A.DtypeStmt(self.ident(ch[1]), span)

    def s_noise_stmt(self, ch, span):
        tok = ch[1]
        value = self.float_(tok, str(tok), "expected a number like `0.01`")
        if value < 0:
            self.bad(tok, f"the noise scale must be 0 or more, found {_show(str(tok))}")
        return A.NoiseStmt(A.Number(value, self.tspan(tok)), span)

    def s_train_ref(self, ch, span):
        return A.TrainStmt((), self.string(ch[1]), span)

    def s_train_block(self, ch, span):
        block = ch[1]
        items = block.children  # LBRACE, (option | _SEP filtered out)..., RBRACE
        opts = [c for c in items if getattr(c, "data", None) == "option"]
        # Entries need a `;` or a line break between them: the grammar is lenient, we are not.
        src = self.lines.text
        for a, b in zip(opts, opts[1:]):
            gap = src[self.base + a.meta.end_pos : self.base + b.meta.start_pos]
            gap = re.sub(r"#[^\r\n]*", "", gap)
            if ";" not in gap and "\n" not in gap and "\r" not in gap:
                key = b.children[0]
                self.problems.append(
                    Diagnostic(
                        "SW106",
                        "malformed `train { }` block: entries must be separated by `;` or a line break",
                        self.tspan(key),
                        help=f"put `;` before {_show(str(key))}; the form is `{FORMS['train']}`",
                    )
                )
        return A.TrainStmt(self.options(opts), None, span)


# --------------------------------------------------------------------------- statements
def _ends(expected, in_block: bool) -> set[str]:
    """Outside a block a separator just means the statement may end here, and a `}` (which LALR
    lookahead merges in from the statements of a stage) is not expected."""
    exp = set(expected or ())
    if not in_block:
        exp.discard("RBRACE")
    if "_SEP" in exp and not in_block:
        exp.discard("_SEP")
        exp.add("$END")
    return exp


def _parses(src: str, start: str = "statement") -> bool:
    from lark.exceptions import LarkError

    try:
        get_lark().parse(src, start=start)
    except LarkError:
        return False
    return True


def _parse_chunk(text: str, chunk: _Chunk, lines: _Lines, diags: list[Diagnostic], start: str = "statement"):
    from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedToken

    src = text[chunk.start : chunk.end]
    m = _FIRST_WORD.match(src)
    kw = m.group(0) if m else None
    if kw is not None and kw not in FORMS:
        guess = suggest(kw, STATEMENT_KEYWORDS) or suggest(kw.lower(), STATEMENT_KEYWORDS)
        if guess:
            help = f"did you mean `{guess}`? the form is `{FORMS[guess]}`"
        else:
            help = _form_help(None)
        diags.append(
            Diagnostic(
                "SW107",
                f"unknown statement {_show(kw)}",
                lines.span(chunk.start, chunk.start + len(kw)),
                help=help,
            )
        )
        return None
    brace = src.find("{") if kw == "train" else -1
    fk = _form_key(kw, src)

    def in_block(pos: int) -> bool:
        return 0 <= brace < pos

    try:
        tree = get_lark().parse(src, start=start)
    except UnexpectedCharacters as e:
        pos = e.pos_in_stream
        ch = src[pos] if pos < len(src) else ""
        allowed = _ends(e.allowed, in_block(pos))
        if _parses(src[:pos], start):  # the statement could also end right here
            allowed.add("$END")
        expected = _expected(kw, _prev_token(src[:pos]), allowed)
        code = "SW106" if in_block(pos) else "SW101"
        prefix = "malformed `train { }` block: " if code == "SW106" else ""
        hint = None
        if ch == "×":
            hint = "write the factor with the letter x, like `x2`"
        diags.append(
            Diagnostic(
                code,
                f"{prefix}unexpected character {_show(ch)}; expected {expected}",
                lines.span(chunk.start + pos, chunk.start + pos + 1),
                help=_form_help(fk, prefix=hint),
            )
        )
        return None
    except UnexpectedToken as e:
        tok = e.token
        expected_set = _ends(e.expected, in_block(tok.start_pos if tok.type != "$END" else len(src)))
        if tok.type == "$END":
            prev = _prev_token(src)
            expected = _expected(kw, prev, expected_set)
            what = f"`{kw}` statement" if kw in FORMS else "statement"
            diags.append(
                Diagnostic(
                    "SW103",
                    f"{what} ends too early: expected {expected}",
                    lines.point(chunk.end),
                    help=_form_help(fk),
                )
            )
            return None
        pos = tok.start_pos
        expected = _expected(kw, _prev_token(src[:pos]), expected_set)
        found = _found(tok.type, str(tok))
        span = lines.span(chunk.start + pos, chunk.start + tok.end_pos)
        if tok.type == "RBRACE" and not in_block(pos):
            diags.append(
                Diagnostic("SW106", "unexpected `}` without a matching `{`", span,
                           help=_form_help(fk))
            )  # fmt: skip
        elif in_block(pos):
            diags.append(
                Diagnostic(
                    "SW106",
                    f"malformed `train {{ }}` block: unexpected {found}; expected {expected}",
                    span,
                    help=f"each entry is `key = value`; the form is `{FORMS['train']}`",
                )
            )
        else:
            hint = None
            if tok.type == "NUMBER" and expected_set >= {"FACTOR"}:
                hint = f"write the factor with an `x`, like `x{tok}`"
            elif tok.type == "IDENT" and str(tok) == "x" and "FACTOR" in expected_set:
                hint = "write the factor without a space, like `x2`"
            diags.append(
                Diagnostic("SW102", f"unexpected {found}; expected {expected}", span,
                           help=_form_help(fk, prefix=hint))
            )  # fmt: skip
        return None
    except LarkError as e:  # pragma: no cover - defensive: lark's other errors
        diags.append(
            Diagnostic("SW102", f"cannot parse this statement ({type(e).__name__})",
                       lines.span(chunk.start, chunk.end), help=_form_help(fk))
        )  # fmt: skip
        return None

    walker = _Walker(lines, chunk.start, fk)
    node = walker.statement(tree if start == "stage_head" else tree.children[0], lines.span(chunk.start, chunk.end))
    if walker.problems:
        diags.extend(walker.problems)
        return None
    return node


_PLAN_WIDE = "plan-wide settings (`model`, `seed`, `dtype`, `noise`, `train`) go outside any stage"


def _parse_stage(text: str, chunk: _Chunk, lines: _Lines, diags: list[Diagnostic]):
    """``at step <N> [key=value ...] { ... }``: the header through ``{`` is parsed by lark
    (start ``stage_head``), the statements between the braces one by one like the file's."""
    end = chunk.block[0] + 1 if chunk.block else chunk.end
    head = _parse_chunk(text, _Chunk(chunk.start, end), lines, diags, start="stage_head")
    if chunk.block is None:
        return None
    open_at, close_at = chunk.block
    body, ok = [], head is not None
    for inner in _scan(text, lines, diags, open_at + 1, close_at):
        if inner.broken:
            ok = False
            continue
        kw = _FIRST_WORD.match(text, inner.start)
        kw = kw.group(0) if kw else None
        if kw in FORMS and kw not in GROWTH_KEYWORDS:
            span = lines.span(inner.start, inner.start + len(kw))
            if kw == "at":
                msg = "an `at step` block cannot hold another `at step` block"
                help = "close this stage with `}` first: stages are written one after another"
            else:
                msg = f"`{kw}` cannot be used inside an `at step` block"
                help = f"{_PLAN_WIDE}; a stage holds growth statements: {', '.join(GROWTH_KEYWORDS)}"
            diags.append(Diagnostic("SW109", msg, span, help=f"{help}; the form is `{FORMS['at']}`"))
            ok = False
            continue
        node = _parse_chunk(text, inner, lines, diags)
        ok = ok and node is not None
        body.append(node)
    rest = _PREV_TOKEN.search(text, close_at + 1, chunk.end)
    while rest and rest.group(0).startswith("#"):
        rest = _PREV_TOKEN.search(text, rest.end(), chunk.end)
    if rest:
        diags.append(
            Diagnostic(
                "SW102",
                f"unexpected {_show(rest.group(0))} after the stage's closing `}}`; expected `;` or a line break",
                lines.span(rest.start(), rest.end()),
                help=f"start the next statement on its own line; the form is `{FORMS['at']}`",
            )
        )
        return None
    if not ok:
        return None
    step, options = head
    return A.Stage(step, options, tuple(body), lines.span(chunk.start, chunk.end))


# --------------------------------------------------------------------------- API
def parse(text: str, file: str = "<plan>") -> A.Plan:
    """Parse plan text. Raises :class:`PlanError` carrying every syntax error of the file.

    The raised error also has ``sources = {file: text}`` for :func:`render`.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse() needs str, not {type(text).__name__}")
    lines = _Lines(text, file)
    diags: list[Diagnostic] = []
    statements = []
    for chunk in _scan(text, lines, diags):
        if chunk.broken:
            continue
        m = _FIRST_WORD.match(text, chunk.start)
        if m and m.group(0) == "at":
            node = _parse_stage(text, chunk, lines, diags)
        else:
            node = _parse_chunk(text, chunk, lines, diags)
        if node is not None:
            statements.append(node)
    if diags:
        err = PlanError(diags)
        err.sources = {file: text}
        raise err
    return A.Plan(tuple(statements), file=file, source=text)


def parse_file(path: str | os.PathLike) -> A.Plan:
    """Read and parse a plan file. Unreadable or non-UTF-8 files raise :class:`UsageError`."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except IsADirectoryError:
        raise UsageError(f"cannot read plan file {str(p)!r}: it is a directory") from None
    except FileNotFoundError:
        raise UsageError(f"cannot read plan file {str(p)!r}: no such file") from None
    except OSError as e:
        raise UsageError(f"cannot read plan file {str(p)!r}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UsageError(
            f"plan file {str(p)!r} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line})"
        ) from None
    return parse(text, file=str(p))
