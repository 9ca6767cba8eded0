"""What the user reads about the plan language's statements: the form of each statement, and
how a token is shown in a message. Plain text, no lark (the parser and the AST builder share it)."""

from __future__ import annotations

__all__ = ["FORMS", "SUB_FORMS", "form_help", "show"]

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
