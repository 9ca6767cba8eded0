"""Parser for the plan language: text -> :class:`~scaler_wizard.grammar.ast.Plan`.

How it works (everything below is lark: ``expand.lark``, LALR(1))
-----------------------------------------------------------------
1. lark's lexer tokenizes the whole file once. Characters no terminal matches become ``BAD``
   tokens (SW101 when a statement reaches them), a string without its closing quote a
   ``BADSTR`` token (SW105).
2. The token stream is cut into statements at separators (``;``, line breaks) outside braces.
   A block still open when a line starts with a statement keyword is taken to have lost its
   ``}`` (SW106); in an ``at step`` stage only an ``at`` no deeper than the stage's own does.
3. Each statement is fed to lark's interactive LALR parser, so every bad statement gets its
   own diagnostic and all are reported together, sorted by position. A keyword the parser
   does not expect where it expects a name is a name (what lark's contextual lexer does).
   A stage's header is parsed (start ``stage_head``), then its statements one by one.
4. A ``lark.Transformer`` (``v_args(meta=True)``) builds the AST and checks what the grammar
   cannot: ranges and shapes of numbers, factors and sizes (SW104), escapes (SW108).
   Names (groups, methods, inits, dtypes, option keys) are the type checker's business.

Which words are statement keywords and which may stand in a stage comes from the grammar's
LALR table; what the user is told was expected comes from :data:`_EXAMPLES`, a
``match_examples`` table of malformed statements, with a wording of the terminals as fallback.

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
         ``1.5Q``, ``12abc``, a negative layer index or step, ``stack x1.5``, an infinite float.
SW105    Unterminated string (no closing ``"`` on the line).
SW106    Unterminated or malformed block: ``{`` never closed, a ``train { }`` entry that is not
         ``key = value``, two entries without ``;`` or a line break between them, a stray ``}``.
SW107    Unknown statement keyword (``widn hidden x2``), with a "did you mean" help.
SW108    Invalid escape sequence in a string (``"C:\\models"``: write ``\\\\``).
SW109    A statement that cannot stand inside an ``at step <N> { }`` growth stage: ``model``,
         ``seed``, ``dtype``, ``noise``, ``train`` (plan-wide settings) or a nested ``at``.
=======  =====================================================================================

Every syntax diagnostic carries a help line with the expected form of the statement.

Public API: :func:`parse`, :func:`parse_file`, :data:`FORMS`, :func:`statement_keywords`,
:func:`growth_keywords`, :func:`get_lark` (the cached lark object, for tools and fuzzing).
"""

from __future__ import annotations

import bisect
import decimal
import functools
import math
import os
import re
from pathlib import Path

from scaler_wizard.diagnostics import Diagnostic, PlanError, UsageError, suggest
from scaler_wizard.grammar import ast as A

__all__ = ["parse", "parse_file", "get_lark", "statement_keywords", "growth_keywords", "FORMS", "size_to_params"]

# --------------------------------------------------------------------------- help texts
FORMS: dict[str, str] = {  # the form of each statement, in the order help lines list them
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
_SUB_FORMS = {  # the three `insert` forms, told apart by the token after `insert`
    "LAYER": "insert layer <index> [<init>] [key=value ...]",
    "LAYERS": "insert layers every <k> [<init>] [key=value ...]",
    "NUMBER": "insert <n> layers after <index> [<init>] [key=value ...]",
}
PREFER_CHOICES = ("depth", "width")
SIZE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9}

# What was expected, by parser state: lark's UnexpectedInput.match_examples matches an error
# against these malformed statements. "KEYWORDS" is replaced by the list of statements.
_EXAMPLES: dict[str, list[str]] = {
    "a statement keyword (KEYWORDS)": [""],
    "a factor like `x2`, `to <size>` or `by <delta>`": ["widen a"],
    "`layer <index>`, `<n> layers after <index>` or `layers every <k>`": ["insert"],
    'a value (a number, a "string", a name, `true` or `false`)': ["widen a x2 k="],
    '`{ key = value ... }` or a quoted recipe file like "recipe.toml"': ["train"],
    "a size like `3072`": ["widen a to"],
    "a number of units to add like `512`": ["widen a by"],
    "a parameter count like `360M` or `1.5B`": ["grow to"],
    "a context length in tokens like `8192`": ["extend context to"],
    "a layer index like `12`": ["insert layer", "insert 2 layers after"],
    "a layer count like `4`": ["insert layers every"],
    "a layer range like `8..24`": ["duplicate layers"],
    "the end of the layer range, like `24` in `8..24`": ["duplicate layers 8.."],
    "a number of experts like `8`": ["upcycle a experts"],
    "a number of experts per token like `2`": ["upcycle a experts 8 top"],
    "an integer seed like `42`": ["seed"],
    "a number like `0.01`": ["noise"],
    "a training step like `1000`": ["at step"],
    "a dimension group name like `hidden` or `ffn`": ["widen", "upcycle"],
    "a dtype name like `bfloat16`": ["dtype"],
    "`depth` or `width`": ["grow to 1M prefer"],
    'a quoted model reference like "SmolLM2-135M"': ["model"],
    "a factor like `x2`": ["stack"],
    "a method name like `lemon`, `key=value` options or the end of the statement": [
        "widen a x2 @", "widen a to 8 @", "widen a by 8 @"],
    "an init like `identity`, `zero`, `cancel` or `copy`, `key=value` options or the end of the statement": [
        "insert layer 1 @", "insert 1 layers after 1 @", "insert layers every 1 @"],
    "a method name like `yarn`, `key=value` options or the end of the statement": ["extend context to 8 @"],
    "`prefer depth|width` or the end of the statement": ["grow to 1M @"],
    "`key=value` options or `{`": ["at step 1 @"],
}  # fmt: skip
_TERMINAL_WORDS = {"IDENT": "a name", "NUMBER": "a number", "FACTOR": "a factor like `x2`",
                   "STRING": 'a quoted string like "..."', "RANGE": "`..`", "EQ": "`=`", "LBRACE": "`{`",
                   "RBRACE": "`}`", "_SEP": "`;` or a line break"}  # fmt: skip
_FOUND = {"IDENT": "name", "NUMBER": "number", "FACTOR": "factor", "STRING": "string"}

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INT_RE = re.compile(r"[-+]?[0-9]+\Z")
_FLOAT_RE = re.compile(r"[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][-+]?[0-9]+)?\Z")
_SIZE_RE = re.compile(r"((?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][-+]?[0-9]+)?)([A-Za-z]?)\Z")
_ESCAPE_RE = re.compile(r"\\(u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)", re.S)
_SIMPLE_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "r": "\r", "t": "\t", "0": "\0"}
_MAX_DIGITS = 4000  # int() refuses longer digit strings on Python >= 3.11


# --------------------------------------------------------------------------- lark and its vocabulary
@functools.lru_cache(maxsize=None)
def get_lark():
    """The lark parser, built once (lazily, so importing this module stays cheap)."""
    from lark import Lark

    grammar = Path(__file__).with_name("expand.lark").read_text(encoding="utf-8")
    return Lark(grammar, parser="lalr", lexer="contextual", start=["plan", "statement", "stage_head"],
                propagate_positions=True, maybe_placeholders=True)  # fmt: skip


@functools.lru_cache(maxsize=None)
def _keywords() -> dict[str, str]:
    """Keyword terminal -> its word, read from the grammar (``WIDEN.2: /widen(?!...)/``)."""
    out = {}
    for t in get_lark().terminals:
        m = re.fullmatch(r"([a-z]+)\(\?!\[A-Za-z0-9_\]\)", t.pattern.value)
        if m:
            out[t.name] = m.group(1)
    return out


def _choices(ip) -> set[str]:
    return {c for c in ip.choices() if c.isupper()}


@functools.lru_cache(maxsize=None)
def statement_keywords() -> tuple[str, ...]:
    """The keyword terminals a statement may start with (the grammar's ``statement`` rule)."""
    return tuple(sorted(_choices(get_lark().parse_interactive(start="statement")) & set(_keywords())))


@functools.lru_cache(maxsize=None)
def growth_keywords() -> tuple[str, ...]:
    """The keyword terminals a statement inside an ``at step`` stage may start with."""
    ip = get_lark().parse_interactive(start="statement")
    for t in _lex("at step 1 {"):
        ip.feed_token(t)
    return tuple(sorted(_choices(ip) & set(_keywords())))


# --------------------------------------------------------------------------- positions
class _Lines:
    """Offset -> (line, col), counting line breaks like str.splitlines (and so like render)."""

    def __init__(self, text: str, file: str):
        self.text, self.file, self.starts = text, file, [0]
        for line in text.splitlines(keepends=True):
            self.starts.append(self.starts[-1] + len(line))
        if len(self.starts) > 1 and (text + "x").splitlines()[-1] != "x":
            self.starts.pop()  # the last line has no terminator: no empty line after it

    def pos(self, offset: int) -> tuple[int, int]:
        offset = max(0, min(offset, len(self.text)))
        i = bisect.bisect_right(self.starts, offset) - 1
        return i + 1, offset - self.starts[i] + 1

    def span(self, start: int, end: int | None = None) -> A.Span:
        end = start if end is None else end
        return A.Span(*self.pos(start), *self.pos(end), start, end, self.file)

    def point(self, offset: int) -> A.Span:
        """A one-column span at ``offset`` (where something is missing)."""
        line, col = self.pos(offset)
        return A.Span(line, col, line, col + 1, offset, offset, self.file)


# --------------------------------------------------------------------------- tokens and statements
def _lex(text: str) -> list:
    """lark's tokens for ``text``; what no terminal matches becomes a BAD or BADSTR token."""
    from lark import Token
    from lark.exceptions import UnexpectedCharacters

    out, base = [], 0
    while True:
        try:
            for t in get_lark().lex(text[base:]):
                t.start_pos, t.end_pos = t.start_pos + base, t.end_pos + base
                out.append(t)
            return out
        except UnexpectedCharacters as e:
            i = base + e.pos_in_stream
            j = i + 1
            if text[i] == '"':  # no closing quote on this line (or a backslash ends the line)
                while j < len(text) and text[j] not in "\r\n":
                    j += 2 if text[j] == "\\" and j + 1 < len(text) and text[j + 1] not in "\r\n" else 1
                    if text[j - 1] == "\\" and (j >= len(text) or text[j] in "\r\n"):
                        break
            out.append(Token("BADSTR" if text[i] == '"' else "BAD", text[i:j], start_pos=i, end_pos=j))
            base = j


def _split(toks: list, lines: _Lines, diags: list, stage_body: bool = False) -> list[tuple[list, bool]]:
    """Statements (token lists, broken?) cut at separators outside braces. A statement marked
    broken was reported here (unclosed block) and is not parsed."""
    kws = statement_keywords()
    out: list[tuple[list, bool]] = []
    cur: list = []
    opens: list = []

    def unclosed(where: str) -> None:
        word = cur[0] if cur[0].type in ("TRAIN", "AT") else ""
        what = {"train": "`train { }` block", "at": "`at step` block"}.get(word, "`{ }` block")
        diags.append(Diagnostic("SW106", f"{what} is not closed: {where}", lines.span(opens[0].start_pos, opens[0].end_pos),
                                help=f"close the block with `}}`; the form is `{FORMS[word or 'train']}`"))  # fmt: skip

    for k, t in enumerate(toks):
        if t.type == "_SEP" and not opens:
            if cur:
                out.append((cur, False))
            cur = []
            continue
        if t.type == "_SEP" and t != ";" and not stage_body and k + 1 < len(toks):
            nxt, after = toks[k + 1], toks[k + 2].type if k + 2 < len(toks) else None
            if cur[0].type == "AT":  # a stage holds statements: only an `at` ends it early
                lost = nxt.type == "AT" and lines.pos(nxt.start_pos)[1] <= lines.pos(cur[0].start_pos)[1]
            else:
                lost = nxt.type in kws and after != "EQ"
            if lost:
                unclosed(f"`}}` expected before line {lines.pos(nxt.start_pos)[0]}")
                out.append((cur, True))
                cur, opens = [], []
                continue
        cur.append(t)
        if t.type == "LBRACE":
            opens.append(t)
        elif t.type == "RBRACE" and opens:
            opens.pop()
    if opens and not stage_body:
        unclosed("the file ends before its `}`")
    if cur:
        out.append((cur, bool(opens)))
    return out


# --------------------------------------------------------------------------- messages
def _form_help(kw: str | None, sub: str | None = None, prefix: str | None = None) -> str:
    if kw == "insert" and sub in _SUB_FORMS:
        form = f"the form is `{_SUB_FORMS[sub]}`"
    elif kw in FORMS:
        form = f"the form is `{FORMS[kw]}`"
    else:
        form = "a statement starts with one of: " + ", ".join(FORMS)
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


def _found(tok) -> str:
    if tok.type in _keywords():
        return f"keyword {_show(tok)}"
    if tok.type in _FOUND:
        return f"{_FOUND[tok.type]} {_show(tok)}"
    if tok.type == "_SEP":
        return "`;`" if tok == ";" else "a line break"
    return _show(tok)


def _parse_example(text: str) -> None:
    _feed(_lex(text), "stage_head" if text.startswith("at ") else "statement")


_LABELS: dict[int, str | None] = {}  # LALR state -> label of _EXAMPLES


def _expected(error, kw: str | None, in_block: bool) -> str:
    """What the parser wanted, in the user's words: the example table, else the terminals."""
    if error.state not in _LABELS:
        label = error.match_examples(_parse_example, _EXAMPLES, use_accepts=False)
        _LABELS[error.state] = label and label.replace("KEYWORDS", ", ".join(FORMS))
    if _LABELS[error.state]:
        return _LABELS[error.state]
    exp = set(error.expected)
    if not in_block:  # outside a block a separator means the statement may end; `}` is foreign
        exp.discard("RBRACE")
        if "_SEP" in exp:
            exp.discard("_SEP")
            exp.add("$END")
    end_ok = "$END" in exp and "_SEP" not in exp  # in a block, a separator is the end
    exp.discard("$END")
    if kw == "at" and "LBRACE" in exp:
        return "`key=value` options or `{`"
    if "RBRACE" in exp:
        return "a `key = value` entry or `}`" if "IDENT" in exp else "`;`, a line break or `}`"
    if exp == {"EQ"}:
        return "`=` and a value (options are written `key=value`)"
    if exp == {"EQ", "IDENT"} and end_ok:
        return "`=`, more `key=value` options or the end of the statement"
    if exp == {"IDENT"} and end_ok:
        return "`key=value` options or the end of the statement"
    words = [_TERMINAL_WORDS.get(e) or f"`{_keywords().get(e, e.lower())}`" for e in sorted(exp)]
    words += ["the end of the statement"] if end_ok or not words else []
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


# --------------------------------------------------------------------------- parsing
def _feed(toks: list, start: str, on_token=None):
    """Feed ``toks`` to lark's interactive LALR parser; the tree, or lark's UnexpectedToken.

    A keyword or factor where the parser wants a name and not it is a name (lark's contextual
    lexer does the same when it lexes a statement by itself). ``on_token`` sees every token fed.
    """
    from lark import Token
    from lark.exceptions import UnexpectedToken

    ip = get_lark().parse_interactive(start=start)
    try:
        for t in toks:
            choices = ip.choices()
            if t.type not in choices and "IDENT" in choices and _WORD.fullmatch(t):
                t = Token.new_borrow_pos("IDENT", str(t), t)
            if t.type not in choices:  # BAD, BADSTR or simply unexpected: say it as lark would
                raise UnexpectedToken(t, {c for c in choices if c.isupper()}, state=ip.parser_state)
            if on_token:
                on_token(t)
            ip.feed_token(t)
        return ip.feed_eof(toks[-1] if toks else None)
    except UnexpectedToken as e:
        # The LALR state alone decides what was expected (lark's ParserState also compares the
        # stack depth, which grows with every `key=value` before the error).
        e.state = e.state.position
        raise


def _first_word(toks: list) -> str | None:
    m = _WORD.match(toks[0])
    return m.group(0) if m and toks[0].type not in ("STRING", "NUMBER", "BADSTR") else None


def _statement(toks: list, lines: _Lines, diags: list, start: str = "statement"):
    """One statement's tokens -> AST node (a (step, options) pair for a stage header), or None
    after reporting its diagnostics."""
    from lark.exceptions import UnexpectedToken

    kw = _first_word(toks)
    if kw is not None and kw not in FORMS:
        guess = suggest(kw, FORMS) or suggest(kw.lower(), FORMS)
        help = f"did you mean `{guess}`? the form is `{FORMS[guess]}`" if guess else _form_help(None)
        diags.append(Diagnostic("SW107", f"unknown statement {_show(kw)}", lines.span(toks[0].start_pos, toks[0].start_pos + len(kw)), help=help))
        return None
    if start == "statement" and toks[0].type == "AT":
        return _stage(toks, lines, diags)
    sub = toks[1].type if kw == "insert" and len(toks) > 1 else None
    opened: list = []  # a `train {` block was entered before the error
    try:
        tree = _feed(toks, start, lambda t: opened.append(t) if t.type == "LBRACE" and kw == "train" else None)
    except UnexpectedToken as e:
        diags.append(_syntax_error(e, kw, sub, bool(opened), toks, lines))
        return None
    build = _builder()(lines, kw, sub)
    node = build.transform(tree)
    node = node if start == "stage_head" else node.children[0] if hasattr(node, "children") else node
    diags.extend(build.problems)
    return None if build.problems else node


def _syntax_error(e, kw, sub, in_block: bool, toks, lines) -> Diagnostic:
    tok = e.token
    if tok.type == "$END":
        what = f"`{kw}` statement" if kw in FORMS else "statement"
        return Diagnostic("SW103", f"{what} ends too early: expected {_expected(e, kw, in_block)}", lines.point(toks[-1].end_pos),
                          help=_form_help(kw, sub))  # fmt: skip
    span = lines.span(tok.start_pos, tok.end_pos)
    expected = _expected(e, kw, in_block)
    if tok.type == "BAD":
        hint = "write the factor with the letter x, like `x2`" if tok == "×" else None
        code, prefix = ("SW106", "malformed `train { }` block: ") if in_block else ("SW101", "")
        return Diagnostic(code, f"{prefix}unexpected character {_show(tok)}; expected {expected}", span,
                          help=_form_help(kw, sub, prefix=hint))  # fmt: skip
    if tok.type == "RBRACE" and not in_block:
        return Diagnostic("SW106", "unexpected `}` without a matching `{`", span, help=_form_help(kw, sub))
    if in_block:
        return Diagnostic("SW106", f"malformed `train {{ }}` block: unexpected {_found(tok)}; expected {expected}", span,
                          help=f"each entry is `key = value`; the form is `{FORMS['train']}`")  # fmt: skip
    hint = None
    if tok.type == "NUMBER" and "FACTOR" in e.expected:
        hint = f"write the factor with an `x`, like `x{tok}`"
    elif tok.type == "IDENT" and tok == "x" and "FACTOR" in e.expected:
        hint = "write the factor without a space, like `x2`"
    return Diagnostic("SW102", f"unexpected {_found(tok)}; expected {expected}", span, help=_form_help(kw, sub, prefix=hint))


_PLAN_WIDE = "plan-wide settings (`model`, `seed`, `dtype`, `noise`, `train`) go outside any stage"


def _stage(toks: list, lines: _Lines, diags: list):
    """``at step <N> [key=value ...] { ... }``: the header through ``{`` (start ``stage_head``),
    then the statements between the braces one by one, like the file's."""
    opening = next((k for k, t in enumerate(toks) if t.type == "LBRACE"), None)
    head = _statement(toks if opening is None else toks[: opening + 1], lines, diags, start="stage_head")
    if opening is None:
        return None
    depth, close = 0, len(toks) - 1
    for k in range(opening, len(toks)):
        depth += {"LBRACE": 1, "RBRACE": -1}.get(toks[k].type, 0)
        if depth == 0:
            close = k
            break
    body, ok = [], head is not None
    growth = growth_keywords()
    for inner, _broken in _split(toks[opening + 1 : close], lines, diags, stage_body=True):
        first = inner[0]
        if first.type in statement_keywords() and first.type not in growth:
            if first.type == "AT":
                msg, help = "an `at step` block cannot hold another `at step` block", "close this stage with `}` first: stages are written one after another"
            else:
                msg, help = f"`{first}` cannot be used inside an `at step` block", f"{_PLAN_WIDE}; a stage holds growth statements: " + ", ".join(w for w in FORMS if w.upper() in growth)
            diags.append(Diagnostic("SW109", msg, lines.span(first.start_pos, first.end_pos), help=f"{help}; the form is `{FORMS['at']}`"))
            ok = False
            continue
        node = _statement(inner, lines, diags)
        ok = ok and node is not None
        body.append(node)
    if close + 1 < len(toks):
        t = toks[close + 1]
        diags.append(Diagnostic("SW102", f"unexpected {_found(t)} after the stage's closing `}}`; expected `;` or a line break",
                                lines.span(t.start_pos, t.end_pos), help=f"start the next statement on its own line; the form is `{FORMS['at']}`"))  # fmt: skip
        return None
    return A.Stage(head[0], head[1], tuple(body), lines.span(toks[0].start_pos, toks[-1].end_pos)) if ok else None


# --------------------------------------------------------------------------- tree -> AST
def size_to_params(mantissa: str, unit: str) -> float:
    """``("1.5", "B") -> 1.5e9``, correctly rounded (exact decimal arithmetic, one rounding)."""
    with decimal.localcontext() as ctx:
        ctx.prec, ctx.Emax, ctx.Emin = 2000, decimal.MAX_EMAX, decimal.MIN_EMIN
        ctx.traps[decimal.Overflow] = False
        return float(decimal.Decimal(mantissa) * SIZE_UNITS[unit])


@functools.lru_cache(maxsize=None)
def _builder():
    """The lark Transformer (``v_args(meta=True)``) from one statement's tree to its AST node,
    collecting SW104/SW106/SW108 problems in ``problems``; defined on first use (lark is
    imported lazily)."""
    from lark import Transformer, v_args

    @v_args(meta=True)
    class Build(Transformer):
        def __init__(self, lines: _Lines, kw: str | None, sub: str | None):
            super().__init__()
            self.lines, self.kw, self.sub, self.problems = lines, kw, sub, []

        # ---- positions and leaves
        def _tspan(self, tok) -> A.Span:
            return self.lines.span(tok.start_pos, tok.end_pos)

        def _mspan(self, meta) -> A.Span:
            return self.lines.span(meta.start_pos, meta.end_pos)

        def _bad(self, tok, message: str, code: str = "SW104", help: str | None = None) -> None:
            self.problems.append(Diagnostic(code, message, self._tspan(tok), help=help or _form_help(self.kw, self.sub)))

        def _ident(self, tok) -> A.Ident | None:
            return None if tok is None else A.Ident(str(tok), self._tspan(tok))

        def _int(self, tok, what: str, minimum: int | None) -> A.Int:
            text = str(tok)
            if not _INT_RE.match(text):
                if text.startswith(".") and self.lines.text[: tok.start_pos].endswith(".."):
                    self._bad(tok, "malformed layer range: write it with two dots, like `8..24`")
                elif _FLOAT_RE.match(text):
                    self._bad(tok, f"{what} must be a whole number, found {_show(text)}")
                else:
                    self._bad(tok, f"malformed number {_show(text)}: {what} must be a whole number")
                return A.Int(0, self._tspan(tok))
            if len(text) > _MAX_DIGITS:
                self._bad(tok, f"number {_show(text)} is too long")
                return A.Int(0, self._tspan(tok))
            value = int(text)
            if minimum is not None and value < minimum:
                self._bad(tok, f"{what} must be {'0 or more' if minimum == 0 else f'at least {minimum}'}, found {_show(text)}")
            return A.Int(value, self._tspan(tok))

        def _float(self, tok, what: str) -> float:
            if not _FLOAT_RE.match(tok):
                self._bad(tok, f"malformed number {_show(str(tok))}: {what}")
                return 0.0
            if not math.isfinite(value := float(tok)):
                self._bad(tok, f"number {_show(str(tok))} is too large")
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
                self.problems.append(Diagnostic("SW108", f"invalid escape sequence {_show(m.group(0))} in a string",
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
                self._bad(tok, f"malformed factor {_show(str(tok))}: expected `x` and a number, like `x2` or `x1.5`")
                return 1.0
            if not math.isfinite(value := float(text)):
                self._bad(tok, f"factor {_show(str(tok))} is too large")
                return 1.0
            if value <= 0:
                self._bad(tok, f"{what} must be greater than 0, found {_show(str(tok))}")
            elif whole and (not _INT_RE.match(text) or value < 1):
                self._bad(tok, f"{what} must be a whole number of copies like `x2`, found {_show(str(tok))}")
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
                    self._bad(tok, f"factor {_show(str(tok))} is too long")
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
                    self._bad(size, f"the target size must be a positive parameter count, found {_show(text)}")
                else:
                    self._bad(size, f"malformed size {_show(text)}: expected a parameter count like `360M` or `1.5B`")
            elif m.group(2) not in SIZE_UNITS:
                self._bad(size, f"malformed size {_show(text)}: unknown unit `{m.group(2)}`",
                         help="size units are K (thousand), M (million) and B (billion), upper case")
            else:
                unit, params = m.group(2), size_to_params(m.group(1), m.group(2))
                if not math.isfinite(params):
                    self._bad(size, f"size {_show(text)} is too large")
                    params = 0.0
                elif params <= 0:
                    self._bad(size, f"the target size must be greater than 0, found {_show(text)}")
            if prefer is not None and prefer.name not in PREFER_CHOICES:
                guess = suggest(prefer.name, PREFER_CHOICES)
                self._bad(ch[4], f"unexpected name {_show(prefer.name)}; expected `depth` or `width`", code="SW102",
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
                self._bad(ch[1], f"the noise scale must be 0 or more, found {_show(str(ch[1]))}")
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
                        b.key.span, help=f"put `;` before {_show(b.key.name)}; the form is `{FORMS['train']}`"))  # fmt: skip
            return A.TrainStmt(opts, None, self._mspan(meta))

        def stage_head(self, meta, ch):
            return self._int(ch[2], "the training step", 0), self._opts(ch[3:])

    return Build


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
    for toks, broken in _split(_lex(text), lines, diags):
        strings = [t for t in toks if t.type == "BADSTR"]  # the statement is not parsed further
        for t in strings:
            diags.append(Diagnostic("SW105", "unterminated string: no closing `\"` on this line", lines.span(t.start_pos, t.end_pos),
                                    help=_form_help(_first_word(toks), prefix='close the string with `"`')))  # fmt: skip
        node = None if broken or strings else _statement(toks, lines, diags)
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
        raise UsageError(f"plan file {str(p)!r} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line})") from None
    return parse(text, file=str(p))
