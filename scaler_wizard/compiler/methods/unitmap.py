"""Unit maps: how the units of one dimension group are laid out after growth (no torch import).

A :class:`UnitMap` from ``d`` old units to ``d'`` new units says, for every new unit ``j``:

* ``src[j]``: the old unit it copies (``-1`` for a brand-new unit: residue / zero-init);
* ``split[j]``: the share of the original that the copy's *fan-out* (readers' columns) carries; the
  shares of all copies of one old unit sum to 1, so the readers' sum is unchanged.

Everything here is plain Python with a deterministic RNG (``random.Random`` seeded from the plan
seed and a key), so lowering is reproducible and does not depend on execution order.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass


def rng_for(seed: int, key: str) -> random.Random:
    h = hashlib.sha256(f"{int(seed)}:{key}".encode()).digest()
    return random.Random(int.from_bytes(h[:8], "little"))


@dataclass(frozen=True)
class UnitMap:
    old: int
    src: tuple[int, ...]  # new unit -> old unit, or -1 for a new unit
    split: tuple[float, ...]  # fan-out share of each copy (1.0 for single copies, 0.0 for new units)

    @property
    def new(self) -> int:
        return len(self.src)

    @property
    def fresh(self) -> tuple[int, ...]:
        return tuple(j for j, s in enumerate(self.src) if s < 0)

    def copy_groups(self) -> tuple[tuple[int, ...], ...]:
        """Index sets of the new units that copy the same old unit (singletons included)."""
        by: dict[int, list[int]] = {}
        for j, s in enumerate(self.src):
            if s >= 0:
                by.setdefault(s, []).append(j)
        return tuple(tuple(v) for _, v in sorted(by.items()))

    def is_identity_prefix(self) -> bool:
        """New units 0..d-1 are the old units in order (values kept where the fan-out is unscaled)."""
        return self.src[: self.old] == tuple(range(self.old))

    def tile_reps(self) -> int | None:
        """k when src is [0..d-1] * k followed only by new units."""
        d = self.old
        n_copies = sum(1 for s in self.src if s >= 0)
        if n_copies % d:
            return None
        k = n_copies // d
        if self.src[: k * d] != tuple(j % d for j in range(k * d)) or any(s >= 0 for s in self.src[k * d:]):
            return None
        return k

    def check(self) -> None:
        if any(not -1 <= s < self.old for s in self.src):
            raise ValueError(f"unit map: source index out of range 0..{self.old - 1}")
        for g in self.copy_groups():
            tot = sum(self.split[j] for j in g)
            if abs(tot - 1.0) > 1e-9:
                raise ValueError(f"unit map: fan-out shares of copies {g} sum to {tot}, not 1")
        missing = set(range(self.old)) - {s for s in self.src if s >= 0}
        if missing:
            raise ValueError(f"unit map: old units {sorted(missing)[:5]} have no copy")


def shares(n: int, equal: bool, rng: random.Random) -> list[float]:
    """n positive shares summing to 1: equal, or unequal (uniform in [0.5, 1.5], normalised)."""
    if n == 1:
        return [1.0]
    if equal:
        return [1.0 / n] * n
    w = [rng.uniform(0.5, 1.5) for _ in range(n)]
    s = sum(w)
    out = [x / s for x in w]
    out[-1] = 1.0 - sum(out[:-1])
    return out


def _with_splits(old: int, src: list[int], equal: bool, rng: random.Random) -> UnitMap:
    split = [0.0] * len(src)
    by: dict[int, list[int]] = {}
    for j, s in enumerate(src):
        if s >= 0:
            by.setdefault(s, []).append(j)
    for s in sorted(by):
        js = by[s]
        for j, a in zip(js, shares(len(js), equal, rng)):
            split[j] = a
    m = UnitMap(old, tuple(src), tuple(split))
    m.check()
    return m


def tile_map(old: int, new: int, *, equal: bool, rng: random.Random) -> UnitMap:
    """[tile_k(units); r new units]: new unit j < k*d copies j mod d (HyperCloning / LEMON)."""
    k = new // old
    src = [j % old for j in range(k * old)] + [-1] * (new - k * old)
    return _with_splits(old, src, equal, rng)


def net2net_map(old: int, new: int, *, equal: bool, rng: random.Random) -> UnitMap:
    """Old units in place, each new unit copies a random old unit (Net2Net), as evenly as possible."""
    extra = new - old
    pool: list[int] = []
    while len(pool) < extra:
        batch = list(range(old))
        rng.shuffle(batch)
        pool.extend(batch)
    src = list(range(old)) + pool[:extra]
    return _with_splits(old, src, equal, rng)


def zero_map(old: int, new: int) -> UnitMap:
    """Old units in place, new units fresh (random fan-in, zero fan-out)."""
    return UnitMap(old, tuple(range(old)) + (-1,) * (new - old), (1.0,) * old + (0.0,) * (new - old))


def gqa_heads_map(heads: int, new_heads: int, kv_heads: int, *, method: str, equal: bool,
                  rng: random.Random) -> UnitMap:
    """Query heads grouped by KV head (HF order: group-major). Each group of n = heads/kv old heads
    becomes n' = new_heads/kv heads: the old ones first, then copies (dup/tile) or fresh heads (zero)."""
    n, n2 = heads // kv_heads, new_heads // kv_heads
    src: list[int] = []
    for g in range(kv_heads):
        for i in range(n2):
            if i < n:
                src.append(g * n + i)
            elif method == "zero":
                src.append(-1)
            else:
                src.append(g * n + (i % n))
    if method == "zero":
        split = [1.0 if s >= 0 else 0.0 for s in src]
        m = UnitMap(heads, tuple(src), tuple(split))
        m.check()
        return m
    return _with_splits(heads, src, equal, rng)


def kv_interleave_map(kv: int, new_kv: int) -> UnitMap:
    """KV head j' copies old KV head j' // n (so query head h still reads a copy of its old KV head)."""
    n = new_kv // kv
    src = [j // n for j in range(new_kv)]
    # KV heads have no fan-out weights of their own (attention reads them), so no split applies.
    return UnitMap(kv, tuple(src), tuple(1.0 for _ in src))


def rope_head_dim_map(hd: int, new_hd: int, *, style: str, rotary_dim: int) -> UnitMap:
    """head_dim x k keeping every rotary frequency: old pair i -> new pair k*i."""
    k = new_hd // hd
    if new_hd % hd or rotary_dim != hd:
        raise ValueError("head_dim growth keeps RoPE exact only for an integer factor with full rotary")
    src = [-1] * new_hd
    if style == "interleaved":
        for i in range(hd // 2):
            src[2 * k * i] = 2 * i
            src[2 * k * i + 1] = 2 * i + 1
    else:  # rotate_half: dim i pairs with i + hd/2
        half, new_half = hd // 2, new_hd // 2
        for i in range(half):
            src[k * i] = i
            src[new_half + k * i] = half + i
    split = [1.0 if s >= 0 else 0.0 for s in src]
    m = UnitMap(hd, tuple(src), tuple(split))
    m.check()
    return m


def head_dim_copy_map(m: UnitMap, *, style: str | None) -> UnitMap:
    """``m`` (a head_dim map for an integer factor k: old units placed, new ones fresh) with every new
    unit a copy, each old unit copied k times in all; with RoPE a new pair copies a whole old pair
    (new pair k*i + r <- old pair i), so a norm taken before or after the rotation sees the same
    mean-square. For q/k rows ahead of q/k norms (see ``passes/widen_head_dim.py``)."""
    d, d2 = m.old, m.new
    k = d2 // d
    src = list(m.src)
    if style == "interleaved":
        for j in m.fresh:
            p = j // 2
            src[j] = 2 * (p // k) + j % 2
    elif style is not None:  # rotate_half: pairs (i, i + d/2)
        half, new_half = d // 2, d2 // 2
        for j in m.fresh:
            hi, p = divmod(j, new_half)
            src[j] = hi * half + p // k
    else:
        for t, j in enumerate(m.fresh):
            src[j] = t % d
    counts = [0] * d
    for s_ in src:
        counts[s_] += 1
    split = tuple(1.0 / counts[s_] for s_ in src)
    out = UnitMap(d, tuple(src), split)
    out.check()
    if any(c != k for c in counts):
        raise ValueError("head_dim copy map: old units are not copied evenly")
    return out


def plain_head_dim_map(hd: int, new_hd: int) -> UnitMap:
    return zero_map(hd, new_hd)


def eta(old: int, new: int) -> float:
    """LEMON's norm rescale: sqrt(k*d/d')."""
    return math.sqrt((new // old) * old / new)
