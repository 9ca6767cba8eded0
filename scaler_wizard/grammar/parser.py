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
4. A ``lark.Transformer`` (``v_args(meta=True)``, :mod:`.build`) builds the AST and checks what
   the grammar cannot: ranges and shapes of numbers, factors and sizes (SW104), escapes
   (SW108). Names (groups, methods, inits, option keys) are the type checker's business.

Which words are statement keywords and which may stand in a stage comes from the grammar's
LALR table; what the user is told was expected comes from :data:`~.forms.EXAMPLES`, a
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
import functools
import os
import re
from pathlib import Path

from scaler_wizard.diagnostics import Diagnostic, PlanError, UsageError, suggest
from scaler_wizard.grammar import ast as A
from scaler_wizard.grammar.build import builder
from scaler_wizard.grammar.forms import EXAMPLES, FORMS, FOUND, TERMINAL_WORDS, form_help, show

__all__ = ["parse", "parse_file", "get_lark", "statement_keywords", "growth_keywords", "FORMS"]

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TO_EOL = re.compile(r"[^\r\n]*")


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
    words = {t.name: re.fullmatch(r"([a-z]+)\(\?!\[A-Za-z0-9_\]\)", t.pattern.value) for t in get_lark().terminals}
    return {name: m.group(1) for name, m in words.items() if m}


@functools.lru_cache(maxsize=None)
def _starting(prefix: str) -> tuple[str, ...]:
    """The keyword terminals the grammar's LALR table lets a statement start with after ``prefix``."""
    ip = get_lark().parse_interactive(start="statement")
    for t in _lex(prefix):
        ip.feed_token(t)
    return tuple(sorted(set(ip.choices()) & set(_keywords())))


def statement_keywords() -> tuple[str, ...]:
    """The keyword terminals a statement may start with (``MODEL``, ``WIDEN``, ...)."""
    return _starting("")


def growth_keywords() -> tuple[str, ...]:
    """The keyword terminals a statement inside an ``at step`` stage may start with."""
    return _starting("at step 1 {")


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
            i = base + e.pos_in_stream  # a string that fails STRING has no closing quote on its line
            j = _TO_EOL.match(text, i).end() if text[i] == '"' else i + 1
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


def _found(tok) -> str:
    if tok.type == "BAD":
        return f"character {show(tok)}"
    if tok.type in _keywords():
        return f"keyword {show(tok)}"
    if tok.type in FOUND:
        return f"{FOUND[tok.type]} {show(tok)}"
    if tok.type == "_SEP":
        return "`;`" if tok == ";" else "a line break"
    return show(tok)


def _parse_example(text: str) -> None:
    _feed(_lex(text), "stage_head" if text.startswith("at ") else "statement")


_LABELS: dict[int, str | None] = {}  # LALR state -> label of EXAMPLES


def _expected(error, kw: str | None, in_block: bool) -> str:
    """What the parser wanted, in the user's words: the example table, else the terminals."""
    if error.state not in _LABELS:
        label = error.match_examples(_parse_example, EXAMPLES, use_accepts=False)
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
    words = [TERMINAL_WORDS.get(e) or f"`{_keywords().get(e, e.lower())}`" for e in sorted(exp)]
    words += ["the end of the statement"] if end_ok or not words else []
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


# --------------------------------------------------------------------------- parsing
def _feed(toks: list, start: str):
    """Feed ``toks`` to lark's interactive LALR parser; the tree, or lark's UnexpectedToken.

    A keyword or factor where the parser wants a name and not it is a name (lark's contextual
    lexer does the same when it lexes a statement by itself).
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
        help = f"did you mean `{guess}`? the form is `{FORMS[guess]}`" if guess else form_help(None)
        span = lines.span(toks[0].start_pos, toks[0].start_pos + len(kw))
        diags.append(Diagnostic("SW107", f"unknown statement {show(kw)}", span, help=help))
        return None
    if start == "statement" and toks[0].type == "AT":
        return _stage(toks, lines, diags)
    sub = toks[1].type if kw == "insert" and len(toks) > 1 else None
    try:
        tree = _feed(toks, start)
    except UnexpectedToken as e:
        at = toks[-1].end_pos if e.token.type == "$END" else e.token.start_pos
        in_block = kw == "train" and any(t.type == "LBRACE" and t.start_pos < at for t in toks)
        diags.append(_syntax_error(e, kw, sub, in_block, toks, lines))
        return None
    build = builder()(lines, kw, sub)
    node = build.transform(tree)
    diags.extend(build.problems)
    return None if build.problems else node


def _syntax_error(e, kw, sub, in_block: bool, toks, lines) -> Diagnostic:
    tok = e.token
    if tok.type == "$END":
        what = f"`{kw}` statement" if kw in FORMS else "statement"
        return Diagnostic("SW103", f"{what} ends too early: expected {_expected(e, kw, in_block)}", lines.point(toks[-1].end_pos),
                          help=form_help(kw, sub))  # fmt: skip
    span = lines.span(tok.start_pos, tok.end_pos)
    expected = _expected(e, kw, in_block)
    if tok.type == "BAD":
        hint = "write the factor with the letter x, like `x2`" if tok == "×" else None
        code, prefix = ("SW106", "malformed `train { }` block: ") if in_block else ("SW101", "")
        return Diagnostic(code, f"{prefix}unexpected character {show(tok)}; expected {expected}", span,
                          help=form_help(kw, sub, prefix=hint))  # fmt: skip
    if tok.type == "RBRACE" and not in_block:
        return Diagnostic("SW106", "unexpected `}` without a matching `{`", span, help=form_help(kw, sub))
    if in_block:
        return Diagnostic("SW106", f"malformed `train {{ }}` block: unexpected {_found(tok)}; expected {expected}", span,
                          help=f"each entry is `key = value`; the form is `{FORMS['train']}`")  # fmt: skip
    hint = None
    if tok.type == "NUMBER" and "FACTOR" in e.expected:
        num = re.match(r"[0-9.]*[0-9]", str(tok).lstrip("+"))  # `2x` (the x on the wrong side) -> `x2`
        hint = f"write the factor with an `x`, like `x{num.group(0) if num else tok}`"
    elif tok.type == "IDENT" and tok == "x" and "FACTOR" in e.expected:
        hint = "write the factor without a space, like `x2`"
    return Diagnostic("SW102", f"unexpected {_found(tok)}; expected {expected}", span, help=form_help(kw, sub, prefix=hint))


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
                msg = "an `at step` block cannot hold another `at step` block"
                help = "close this stage with `}` first: stages are written one after another"
            else:
                msg = f"`{first}` cannot be used inside an `at step` block"
                help = f"{_PLAN_WIDE}; a stage holds growth statements: " + ", ".join(w for w in FORMS if w.upper() in growth)
            span = lines.span(first.start_pos, first.end_pos)
            diags.append(Diagnostic("SW109", msg, span, help=f"{help}; the form is `{FORMS['at']}`"))
            ok = False
            continue
        node = _statement(inner, lines, diags)
        ok = ok and node is not None
        body.append(node)
    if close + 1 < len(toks):
        t = toks[close + 1]
        msg = f"unexpected {_found(t)} after the stage's closing `}}`; expected `;` or a line break"
        diags.append(Diagnostic("SW101" if t.type == "BAD" else "SW102", msg, lines.span(t.start_pos, t.end_pos),
                                help=f"start the next statement on its own line; the form is `{FORMS['at']}`"))  # fmt: skip
        return None
    return A.Stage(head[0], head[1], tuple(body), lines.span(toks[0].start_pos, toks[-1].end_pos)) if ok else None


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
                                    help=form_help(_first_word(toks), prefix='close the string with `"`')))  # fmt: skip
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
