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
import math
from typing import Any

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
