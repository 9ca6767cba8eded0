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

from scaler_wizard.diagnostics import DiagnosticBag
from scaler_wizard.compiler.predict import costs, predict_shapes
from scaler_wizard.grammar import ast as A
from scaler_wizard.grammar.printer import statement_text

TOLERANCE = 0.05  # a candidate within 5% of the target counts as reaching it
MAX_CANDIDATES = 16  # per axis, so the search stays well under a second on 405B-sized configs


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
    return "; ".join(statement_text(s) for s in stmts) or "(nothing)"


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
    from scaler_wizard.compiler.predict import MAX_GROWTH

    if target > base * MAX_GROWTH:
        return f"{int(target):,} parameters is more than {MAX_GROWTH}x the model's {base:,}; grow in stages"

    depth_opts: list[list] = [[]]
    L = st.depth
    ks = sorted({max(1, round(L / n)) for n in range(1, L + 1)}, reverse=True)
    if len(ks) > MAX_CANDIDATES:
        ks = [ks[round(i * (len(ks) - 1) / (MAX_CANDIDATES - 1))] for i in range(MAX_CANDIDATES)]
    for k in ks:
        depth_opts.append([A.InsertEveryStmt(A.Int(k, span), A.Ident("identity", span), span=span)])
    for n in (2, 3, 4):  # deeper than 2x: stack of identity insertions every layer, then again
        depth_opts.append([A.InsertEveryStmt(A.Int(1, span), A.Ident("identity", span), span=span)] * (n - 1))

    # Width candidates: hidden sizes on the quantum grid; for each, the FFN size is solved for
    # (parameters are affine in the FFN width) so width plans can land close to the target.
    hidden_opts: list[list] = [[]]
    ffn = st.sizes.get("ffn") if "ffn" in checker.ir.groups and checker.ir.groups["ffn"].config_key else None
    qf = max(8, 2 ** max(0, int(math.log2(ffn)) - 5)) if ffn else 0
    if "hidden" in checker.ir.groups:
        h = st.sizes["hidden"]
        q = _quantum(checker, st)
        sizes = list(range((h // q + 1) * q, 4 * h + 1, q))
        if len(sizes) > MAX_CANDIDATES:
            sizes = [sizes[round(i * (len(sizes) - 1) / (MAX_CANDIDATES - 1))] for i in range(MAX_CANDIDATES)]
        for new_h in sizes:
            method = "tile" if new_h % h == 0 else "lemon"
            hidden_opts.append([A.WidenStmt(A.Ident("hidden", span), A.ToSize(new_h, span), A.Ident(method, span), span=span)])

    def widen_ffn(size):
        return A.WidenStmt(A.Ident("ffn", span), A.ToSize(size, span), A.Ident("net2net", span), span=span)

    scored = []
    seen: set[str] = set()

    def consider(stmts, has_width, has_depth):
        key = _fmt(stmts)
        if key in seen or not stmts:
            return
        seen.add(key)
        p = _simulate(checker, st, stmts)
        if p is None:
            return
        err = abs(p - target) / target
        axis = "both" if has_width and has_depth else "width" if has_width else "depth"
        scored.append((err, axis, p, stmts))

    for d in depth_opts:
        for w in hidden_opts:
            consider(w + d, bool(w), bool(d))
            if not ffn:
                continue
            # FFN sized to hit the target with this hidden size and depth.
            p0 = _simulate(checker, st, w + [widen_ffn(ffn + qf)] + d)
            p1 = _simulate(checker, st, w + [widen_ffn(ffn + 2 * qf)] + d)
            if p0 is None or p1 is None or p1 <= p0:
                continue
            best_f = ffn + qf + (target - p0) / ((p1 - p0) / qf)
            best_f = int(round(best_f / qf)) * qf
            if ffn < best_f <= 8 * ffn:
                consider(w + [widen_ffn(best_f)] + d, True, bool(d))

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
