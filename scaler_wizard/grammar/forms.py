"""What the user reads about the plan language: the form of each statement, what the parser says
it expected in each parser state (a ``match_examples`` table of malformed statements), how a
token is shown. Plain text, no lark (the parser and the AST builder share it)."""

from __future__ import annotations

__all__ = ["FORMS", "SUB_FORMS", "EXAMPLES", "TERMINAL_WORDS", "FOUND", "form_help", "show"]

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
SUB_FORMS = {  # the three `insert` forms, told apart by the token after `insert`
    "LAYER": "insert layer <index> [<init>] [key=value ...]",
    "LAYERS": "insert layers every <k> [<init>] [key=value ...]",
    "NUMBER": "insert <n> layers after <index> [<init>] [key=value ...]",
}

# What was expected, by parser state: lark's UnexpectedInput.match_examples matches an error
# against these malformed statements. "KEYWORDS" is replaced by the list of statements.
EXAMPLES: dict[str, list[str]] = {
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
TERMINAL_WORDS = {"IDENT": "a name", "NUMBER": "a number", "FACTOR": "a factor like `x2`",
                   "STRING": 'a quoted string like "..."', "RANGE": "`..`", "EQ": "`=`", "LBRACE": "`{`",
                   "RBRACE": "`}`", "_SEP": "`;` or a line break"}  # fmt: skip
FOUND = {"IDENT": "name", "NUMBER": "number", "FACTOR": "factor", "STRING": "string"}


def form_help(kw: str | None, sub: str | None = None, prefix: str | None = None) -> str:
    if kw == "insert" and sub in SUB_FORMS:
        form = f"the form is `{SUB_FORMS[sub]}`"
    elif kw in FORMS:
        form = f"the form is `{FORMS[kw]}`"
    else:
        form = "a statement starts with one of: " + ", ".join(FORMS)
    return f"{prefix}; {form}" if prefix else form


def show(s: str, limit: int = 32) -> str:
    """A token or character as the user should see it in a message."""
    if len(s) == 1 and (not s.isprintable() or s.isspace()):
        return f"U+{ord(s):04X}"
    if len(s) > limit:
        s = s[: limit - 3] + "..."
    if not s.isprintable():
        s = s.encode("unicode_escape").decode("ascii")
    return f"`{s}`"
