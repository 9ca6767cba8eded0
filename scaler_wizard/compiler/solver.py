"""The `grow to <size>` solver: find exact plans that reach a parameter count.

Candidates are built from exact ops only: identity layers interleaved every k layers (depth) and
`widen hidden`/`widen ffn` by lemon/net2net to a multiple of a size quantum (width), and their
combinations. Each candidate is type-checked on a scratch copy of the checker state, so it obeys
every rule a hand-written plan obeys (GQA, Post-LN, derived sizes). The closest candidate to the
target (preferring the requested axis) wins; the runners-up are reported.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

from scaler_wizard.compiler.diagnostics import DiagnosticBag
from scaler_wizard.compiler.predict import costs, predict_shapes
from scaler_wizard.grammar import ast as A

TOLERANCE = 0.05  # a candidate within 5% of the target counts as reaching it


def _params(checker, st) -> int:
    shapes = predict_shapes(checker.ir, st.sizes, tuple(st.layer_map))
    return costs(checker.ir, shapes, st.sizes, st.depth, context=checker.context).params


def _simulate(checker, st, stmts):
    scratch = copy.copy(st)
    scratch.bag = DiagnosticBag()
    scratch.sizes = dict(st.sizes)
    scratch.layer_map = list(st.layer_map)
    scratch.config = dict(st.config)
    scratch.ops = list(st.ops)
    for s in stmts:
        getattr(checker, "_" + type(s).__name__)(-1, s, scratch)
    checker._check_config_invariants(scratch)
    if scratch.bag.has_errors:
        return None
    return _params(checker, scratch)


def _fmt(stmts) -> str:
    from scaler_wizard.compiler.typecheck import _print_stmt

    return "; ".join(_print_stmt(s) for s in stmts) or "(nothing)"


def _quantum(checker, st) -> int:
    """Hidden sizes the solver tries are multiples of this: head_dim (so derived head_dims stay
    whole) and the head count (transformers requires hidden % heads == 0)."""
    att = checker.ir.attention
    q = att.head_dim if att is not None else 64
    heads = st.sizes.get("heads")
    return math.lcm(q, heads) if heads else q


def solve_grow_to(checker, st, stmt: A.GrowToStmt, prefer: str | None):
    span = stmt.span
    target = stmt.params
    base = _params(checker, st)
    if target <= base:
        return f"the model already has {base:,} parameters; `grow to` needs a larger target than {int(target):,}"
    if target > base * 64:
        return f"{int(target):,} parameters is more than 64x the model's {base:,}; grow in stages"

    depth_opts: list[list] = [[]]
    L = st.depth
    for k in range(L, 0, -1):
        depth_opts.append([A.InsertEveryStmt(A.Int(k, span), A.Ident("identity", span), span=span)])
    for n in (2, 3, 4):  # deeper than 2x: stack of identity insertions every layer, then again
        depth_opts.append([A.InsertEveryStmt(A.Int(1, span), A.Ident("identity", span), span=span)] * (n - 1))

    width_opts: list[list] = [[]]
    if "hidden" in checker.ir.groups:
        h = st.sizes["hidden"]
        q = _quantum(checker, st)
        ffn = st.sizes.get("ffn")
        for mult in (1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0):
            new_h = int(round(h * mult / q)) * q
            if new_h <= h:
                continue
            method = "tile" if new_h % h == 0 else "lemon"
            stmts = [A.WidenStmt(A.Ident("hidden", span), A.ToSize(new_h, span), A.Ident(method, span), span=span)]
            if ffn:
                new_f = int(round(ffn * new_h / h / 64)) * 64
                if new_f > ffn:
                    stmts.append(A.WidenStmt(A.Ident("ffn", span), A.ToSize(new_f, span), A.Ident("net2net", span), span=span))
            width_opts.append(stmts)

    scored = []
    seen: set[str] = set()
    for d in depth_opts:
        for w in width_opts:
            if not d and not w:
                continue
            stmts = w + d
            key = _fmt(stmts)
            if key in seen:
                continue
            seen.add(key)
            p = _simulate(checker, st, stmts)
            if p is None:
                continue
            err = abs(p - target) / target
            axis = "depth" if d and not w else "width" if w and not d else "both"
            scored.append((err, axis, p, stmts))
    if not scored:
        return "no exact plan reaches that size for this model"

    def rank(item):
        err, axis, p, stmts = item
        within = err <= TOLERANCE
        preferred = prefer is None or axis == prefer
        return (not within, not preferred, err, len(stmts))

    scored.sort(key=rank)
    best = scored[0]
    if best[0] > TOLERANCE:
        return (
            f"no exact plan lands within {TOLERANCE:.0%} of {int(target):,} parameters; "
            f"closest is {best[2]:,} with `{_fmt(best[3])}`"
        )
    alternatives = [f"{_fmt(s)}  ->  {p:,} params ({axis}, {err:+.1%})" for err, axis, p, s in scored[1:4]]
    chosen = [replace(s, span=span) for s in best[3]]
    return chosen, [f"chosen: {_fmt(best[3])}  ->  {best[2]:,} params ({best[1]}, {best[0]:.1%} from target)"] + alternatives
