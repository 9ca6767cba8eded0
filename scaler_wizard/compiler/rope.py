"""RoPE scaling variants under growth: which ops keep every rotary frequency, and the config patch
that grows per-frequency parameter lists with the rotary dimensions.

transformers (5.x) stores the rotary parameters in ``config.rope_parameters`` (older files:
``rope_scaling``), flat or nested by layer type, with a ``rope_type`` and type-specific keys.
inv_freq has one entry per rotary pair, ``dim = int(head_dim * partial_rotary_factor)``:

========  ==============================================  =========================================
type      inv_freq[i] (pair i of dim/2)                   what growth does to it
========  ==============================================  =========================================
default   base^(-2i/dim)                                  hidden, heads: unchanged; head_dim x k with
                                                          old pair i -> new pair k*i: same values
linear    base^(-2i/dim) / factor                         as default
dynamic   base'^(-2i/dim), base' = base * (f*L/mpe -       hidden, heads: unchanged; head_dim x k:
          (f-1))^(dim/(dim-2)) once L > mpe               refused (the exponent dim/(dim-2) moves
                                                          every frequency past max_position_embeddings)
yarn      ramp between base^(-2i/dim) and that / factor   hidden, heads: unchanged; head_dim x k: exact
          over pairs [low, high] (correction range,       when the correction range scales with dim
          floor/ceil'd unless truncate=false);            (truncate=false), else refused: the type
          cos/sin x attention_factor                      checker evaluates transformers' own function
longrope  1 / (ext[i] * base^(2i/dim)), ext = short or    hidden, heads: unchanged; head_dim x k:
          long factor list (long once L > original        factor lists grown to dim'/2 entries (old
          max position); cos/sin x attention_factor       factor i at k*i); exact in both regimes
llama3    base^(-2i/dim) scaled per pair by its own       hidden, heads: unchanged; head_dim x k: exact
          wavelength                                      (a function of each pair's frequency only)
========  ==============================================  =========================================

Rather than trusting this table, :func:`frequencies_kept` evaluates transformers' rope function on the
old and the grown config (every regime: short, past the original length, past max_position_embeddings)
and compares old pair i with new pair k*i; any type it cannot evaluate is refused.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
import math
from typing import Any

from scaler_wizard.compiler.resolved import APPROX
from scaler_wizard.ir.config import ROPE_DICT_KEYS, rope_dicts, rope_type_of

# Types whose inv_freq is base^(-2i/dim) up to a constant: head_dim x k keeps pair i at k*i by algebra.
PROVEN_TYPES = ("default", "linear")


def _grown_list(v: list, k: int) -> list:
    """Old entry i at k*i; the k-1 inserted pairs between old pairs i and i+1 interpolate linearly
    (their frequencies only matter to new dimensions, which start at zero)."""
    out = []
    for i, x in enumerate(v):
        nxt = v[i + 1] if i + 1 < len(v) else x
        out.append(x)
        for j in range(1, k):
            out.append(x + (nxt - x) * j / k)
    return out


def grow_per_frequency(config: dict, keys: tuple[str, ...], pairs: int, k: int) -> dict[str, Any]:
    """Config patch growing every per-frequency list (``keys``, ``pairs`` entries) k-fold, under
    every rope dict key the config has. Empty when there is nothing to grow."""
    patch: dict[str, Any] = {}
    if not keys or k == 1:
        return patch
    for key in ROPE_DICT_KEYS:
        d = config.get(key)
        if not isinstance(d, dict):
            continue
        d2 = copy.deepcopy(d)
        subs = [d2] + [v for v in d2.values() if isinstance(v, dict)]
        changed = False
        for sub in subs:
            for name in keys:
                v = sub.get(name)
                if isinstance(v, list) and len(v) == pairs:
                    sub[name] = _grown_list(v, k)
                    changed = True
        if changed:
            patch[key] = d2
    return patch


def list_length_problems(config: dict, keys: tuple[str, ...], pairs: int) -> list[str]:
    """Per-frequency lists of ``config`` whose length is not ``pairs``."""
    bad = []
    for d in rope_dicts(config):
        for name in keys:
            v = d.get(name)
            if isinstance(v, list) and len(v) != pairs:
                bad.append(f"{name} has {len(v)} entries for {pairs} rotary pairs")
    return bad


def _regimes(config: dict) -> list[tuple[str, int | None]]:
    mpe = config.get("max_position_embeddings")
    ompe = next((d.get("original_max_position_embeddings") for d in rope_dicts(config)
                 if isinstance(d.get("original_max_position_embeddings"), int)), None)
    ompe = ompe or config.get("original_max_position_embeddings")
    out: list[tuple[str, int | None]] = [("at load", None)]
    if isinstance(ompe, int):
        out.append((f"past original_max_position_embeddings ({ompe + 1} tokens)", ompe + 1))
    if isinstance(mpe, int):
        out.append((f"past max_position_embeddings ({2 * mpe} tokens)", 2 * mpe))
        out.append((f"far past max_position_embeddings ({8 * mpe} tokens)", 8 * mpe))
    return out


def _config_object(config: dict):
    from transformers import AutoConfig

    d = {k: v for k, v in config.items() if k not in ("transformers_version",)}
    mt = d.pop("model_type")
    return AutoConfig.for_model(mt, **copy.deepcopy(d))


def frequencies_kept(before: dict, after: dict, k: int, pairs: int, *, rtol: float = 1e-6) -> str | None:
    """None when transformers' rope function gives new pair k*i the frequency old pair i had (and the
    same attention factor) in every regime; else the reason, naming the first pair that moved.

    ``before`` / ``after``: config dicts (after: head_dim grown k-fold, lists grown); ``pairs``: old
    rotary pairs. Imports torch and transformers (only plans growing head_dim under a scaled RoPE)."""
    rtype = rope_type_of(before)
    if rtype in PROVEN_TYPES:
        return None
    try:
        import torch  # noqa: F401
        from transformers import logging as hf_logging
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        return f"cannot evaluate rope type `{rtype}` ({e})"
    fn = ROPE_INIT_FUNCTIONS.get(rtype)
    if fn is None:
        return f"rope type `{rtype}` is unknown to the installed transformers"
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        c0, c1 = _config_object(before), _config_object(after)
        for label, seq in _regimes(before):
            inv0, af0 = fn(copy.deepcopy(c0), "cpu", seq_len=seq)
            inv1, af1 = fn(copy.deepcopy(c1), "cpu", seq_len=seq)
            inv0, inv1 = inv0.double().flatten().tolist(), inv1.double().flatten().tolist()
            if len(inv0) != pairs or len(inv1) != pairs * k:
                return (f"{rtype}: transformers gives {len(inv0)} -> {len(inv1)} frequencies, "
                        f"expected {pairs} -> {pairs * k}")
            for i in range(pairs):
                a, b = inv0[i], inv1[k * i]
                if not math.isclose(a, b, rel_tol=rtol, abs_tol=1e-30):
                    return (f"{rtype} moves old frequencies {label}: pair {i} {a:.6g} -> {b:.6g} at new pair {k * i}"
                            + _why(rtype))
            if not math.isclose(float(af0), float(af1), rel_tol=rtol):
                return f"{rtype} changes the attention factor on cos/sin {label}: {float(af0):.6g} -> {float(af1):.6g}"
    except Exception as e:  # noqa: BLE001 - transformers rejects the grown config: not exact
        return f"transformers cannot compute `{rtype}` frequencies for the grown config: {type(e).__name__}: {e}"
    finally:
        hf_logging.set_verbosity(verbosity)
    return None


def _why(rtype: str) -> str:
    return {
        "dynamic": " (dynamic NTK recomputes the base with exponent dim/(dim-2) past max_position_embeddings)",
        "yarn": " (yarn's correction range is floor/ceil'd in units of pairs; `truncate: false` makes it scale with dim)",
    }.get(rtype, "")


# ------------------------------------------------------------------------------ context extension
#
# `extend context to <n> [method] [k=v ...]`: the config patch that makes transformers read a longer
# context, and the exactness the mathematics gives it (L0 = the original length, f = n / L0):
#
# ==========  ======================================================  ==========================================
# method      what transformers then computes                          exactness
# ==========  ======================================================  ==========================================
# linear      every inv_freq / f (position interpolation, Chen 2023)  approx: every position moves
# dynamic     base' = base (f L/L0 - (f-1))^(d/(d-2)) once L > L0;   exact below L0 (inv_freq recomputed only
#             max_position_embeddings stays L0 (it is the           past it; measured bit-identical); approx
#             threshold transformers reads)                          past L0 (that is the point)
# yarn        NTK-by-parts ramp + attention factor 0.1 ln f + 1       approx: cos/sin scaled at every position
#             (Peng et al. 2023)
# llama3      low frequencies / f, high kept, smooth between          approx: the low frequencies move
#             (low_freq_factor 1, high_freq_factor 4 by default)
# longrope    short factors 1 below L0, long factors (default f)      approx: the attention factor
#             past it (Ding et al. 2024)                               sqrt(1 + ln f / ln L0) scales cos/sin
#                                                                      everywhere (exact below L0 with
#                                                                      attention_factor=1)
# copy        learned tables (GPT-2, OPT, BERT): rows >= L0 repeat    exact below L0 (old rows untouched)
#             rows 0..L0-1
# interpolate learned tables: row p = linear interpolation of the     approx: every row moves
#             old table at p (L0-1)/(n-1)
# ==========  ======================================================  ==========================================

ROPE_EXTEND_METHODS = ("linear", "dynamic", "yarn", "llama3", "longrope")
TABLE_EXTEND_METHODS = ("copy", "interpolate")
# options each method accepts (value checks in :func:`extend_rope`)
EXTEND_OPTIONS: dict[str, tuple[str, ...]] = {
    "linear": (),
    "dynamic": (),
    "yarn": ("beta_fast", "beta_slow", "attention_factor", "truncate"),
    "llama3": ("low_freq_factor", "high_freq_factor"),
    "longrope": ("attention_factor",),
    "copy": (),
    "interpolate": (),
}
# config keys holding the context length, in the order transformers' families use them
LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


class ExtendError(ValueError):
    """The extension cannot be expressed for this config (message says why)."""


@dataclass(frozen=True)
class Extension:
    """What `extend context` does to a config: ``patch`` (top-level keys to set), ``exactness``
    (exact / exact-eps / approx over the whole new range), ``exact_below`` (positions [0, L) whose
    outputs are unchanged, 0 when none), ``old_length`` / ``new_length`` and ``reason`` (one line)."""

    method: str
    patch: dict
    exactness: str
    exact_below: int
    old_length: int
    new_length: int
    reason: str


def context_length(config: dict) -> tuple[str, int]:
    """(key, value) of the config's context length; :class:`ExtendError` when it has none."""
    for key in LENGTH_KEYS:
        v = config.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return key, v
    raise ExtendError("the config names no context length (" + ", ".join(LENGTH_KEYS) + ")")


def _num(options: dict, key: str, default, lo: float | None = None, *, strict: bool = False):
    """``options[key]`` (or ``default``) as a finite number ``>= lo`` (``> lo`` when ``strict``).
    Raises :class:`ExtendError` naming the option otherwise."""
    v = options.get(key, default)
    low = lo is not None and (v <= lo if strict else v < lo) if isinstance(v, (int, float)) else False
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or low:
        bound = f" {'>' if strict else '>='} {lo:g}" if lo is not None else ""
        raise ExtendError(f"option `{key}` must be a number{bound}, got {v!r}")
    return v


def extend_rope(config: dict, new_length: int, method: str = "yarn", options: dict | None = None,
                rotary_pairs: int | None = None) -> Extension:
    """Config patch extending a RoPE model's context to ``new_length`` tokens with ``method``.

    Rewrites every rope dict (flat or per layer type, under the key the config uses) and the length
    key. Raises :class:`ExtendError` when the model already uses a scaled RoPE, when ``new_length`` is
    not longer, for an unknown method or option, or when longrope needs ``rotary_pairs`` and has none.
    Sources: transformers' ``modeling_rope_utils`` (the formulas it evaluates)."""

    options = dict(options or {})
    if method not in ROPE_EXTEND_METHODS:
        raise ExtendError(f"unknown extension method `{method}` for a RoPE model; use one of "
                          + ", ".join(ROPE_EXTEND_METHODS))
    unknown = sorted(set(options) - set(EXTEND_OPTIONS[method]))
    if unknown:
        allowed = ", ".join(EXTEND_OPTIONS[method]) or "none"
        raise ExtendError(f"`{method}` takes no option `{unknown[0]}` (options: {allowed})")
    key, L0 = context_length(config)
    if not isinstance(new_length, int) or new_length <= L0:
        raise ExtendError(f"the context is already {L0} tokens; `extend context to {new_length}` does not extend it")
    current = rope_type_of(config)
    if current not in ("default",):
        raise ExtendError(f"the model's RoPE is already scaled (`{current}`); extending a scaled RoPE again is not "
                          "supported")
    f = new_length / L0
    params: dict[str, Any] = {"rope_type": method, "factor": float(f)}
    length_patch = {key: new_length}
    exactness, below = APPROX, 0
    if method == "linear":
        reason = f"linear interpolation: every frequency / {f:g}, every position moves"
    elif method == "dynamic":
        length_patch = {}  # transformers scales past max_position_embeddings: it must stay L0
        exactness, below = APPROX, L0
        reason = (f"dynamic NTK: frequencies unchanged up to {L0} tokens (max_position_embeddings stays {L0}, the "
                  "threshold transformers reads), base rescaled per sequence length past it")
    elif method == "yarn":
        params["original_max_position_embeddings"] = L0
        for k, lo in (("beta_fast", 0.0), ("beta_slow", 0.0), ("attention_factor", 0.0)):
            if k in options:  # a zero attention_factor multiplies cos/sin by 0: q and k vanish
                params[k] = float(_num(options, k, None, lo, strict=k == "attention_factor"))
        if "truncate" in options:
            if not isinstance(options["truncate"], bool):
                raise ExtendError(f"option `truncate` must be true or false, got {options['truncate']!r}")
            params["truncate"] = options["truncate"]
        reason = "yarn: frequencies ramped between interpolation and extrapolation, cos/sin scaled: every position moves"
    elif method == "llama3":
        params["original_max_position_embeddings"] = L0
        params["low_freq_factor"] = float(_num(options, "low_freq_factor", 1.0, 0.0))
        params["high_freq_factor"] = float(_num(options, "high_freq_factor", 4.0, 0.0))
        if params["high_freq_factor"] <= params["low_freq_factor"]:
            raise ExtendError("`high_freq_factor` must be greater than `low_freq_factor`")
        reason = "llama3: low frequencies divided by the factor at every position"
    else:  # longrope
        if rotary_pairs is None:
            raise ExtendError("longrope needs the number of rotary pairs (the IR's rotary_dim / 2)")
        del params["factor"]
        params["original_max_position_embeddings"] = L0
        params["short_factor"] = [1.0] * rotary_pairs
        params["long_factor"] = [float(f)] * rotary_pairs
        if "attention_factor" in options:
            params["attention_factor"] = float(_num(options, "attention_factor", None, 0.0, strict=True))
        if params.get("attention_factor") == 1.0:
            below = L0
            reason = f"longrope: short factors 1 and attention_factor 1: unchanged below {L0} tokens"
        else:
            reason = "longrope: cos/sin scaled by sqrt(1 + ln f / ln L0) at every position"
    patch: dict[str, Any] = dict(length_patch)
    found = False
    for dkey in ROPE_DICT_KEYS:
        d = config.get(dkey)
        if not isinstance(d, dict):
            continue
        found = True
        d2 = copy.deepcopy(d)
        for sub in rope_dicts({dkey: d2}):
            theta = sub.get("rope_theta")
            for k in ("type", "factor"):
                sub.pop(k, None)
            sub.update(copy.deepcopy(params))
            if theta is not None:
                sub["rope_theta"] = theta
        patch[dkey] = d2
    if not found:
        theta = config.get("rope_theta")
        patch["rope_parameters"] = {**params, **({"rope_theta": theta} if theta is not None else {})}
    return Extension(method, patch, exactness, below, L0, new_length, reason)


def extend_table(config: dict, new_length: int, method: str = "copy", options: dict | None = None) -> Extension:
    """Config patch for a learned absolute position table (GPT-2's wpe, OPT's, BERT's) grown to
    ``new_length`` rows by ``method`` (copy / interpolate); the rows themselves: :func:`grow_table_rows`."""

    if method not in TABLE_EXTEND_METHODS:
        raise ExtendError(f"unknown extension method `{method}` for a learned position table; use one of "
                          + ", ".join(TABLE_EXTEND_METHODS))
    if options:
        raise ExtendError(f"`{method}` takes no option `{sorted(options)[0]}`")
    key, L0 = context_length(config)
    if not isinstance(new_length, int) or new_length <= L0:
        raise ExtendError(f"the context is already {L0} tokens; `extend context to {new_length}` does not extend it")
    if method == "copy":
        return Extension(method, {key: new_length}, APPROX, L0, L0, new_length,
                         f"rows {L0}..{new_length - 1} repeat rows 0..{L0 - 1}: unchanged below {L0} tokens")
    return Extension(method, {key: new_length}, APPROX, 0, L0, new_length,
                     "rows interpolated over the longer range: every position moves")


def table_row_map(old_rows: int, new_rows: int, method: str, offset: int = 0) -> list[tuple[int, int, float]]:
    """For each new row: (a, b, t) meaning ``(1 - t) * old[a] + t * old[b]``.

    ``offset``: leading rows that are not positions (OPT keeps 2) and stay where they are. copy: row p
    takes row ``offset + (p - offset) mod (old_rows - offset)``; interpolate: position p of the new
    range maps to ``p * (L0 - 1) / (n - 1)`` of the old one."""
    L0, n = old_rows - offset, new_rows - offset
    out = [(i, i, 0.0) for i in range(offset)]
    for p in range(n):
        if method == "copy":
            s = offset + p % L0
            out.append((s, s, 0.0))
        else:
            x = p * (L0 - 1) / (n - 1) if n > 1 else 0.0
            a = min(int(math.floor(x)), L0 - 1)
            b = min(a + 1, L0 - 1)
            out.append((offset + a, offset + b, x - a))
    return out


def grow_table_rows(table, new_rows: int, method: str, offset: int = 0):
    """The grown position table (torch, float32): rows per :func:`table_row_map`."""
    import torch

    t = table.to(torch.float32)
    rows = table_row_map(t.shape[0], new_rows, method, offset)
    a = torch.tensor([r[0] for r in rows])
    b = torch.tensor([r[1] for r in rows])
    w = torch.tensor([r[2] for r in rows], dtype=torch.float32).unsqueeze(1)
    return (1 - w) * t[a] + w * t[b]
