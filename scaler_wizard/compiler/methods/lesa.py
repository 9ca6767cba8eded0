"""LESA: inserted layers predicted from what the existing layers share (layer expansion by SVD-based
association; Yang et al., ACL 2025, "LESA: Learnable LLM Layer Scaling-Up").

For one matrix kind (q, k, v, o, gate, up, down), with L layers of weights ``W_l`` of shape
``[out, in]``:

1. concatenate along the input axis, ``W = [W_0 | ... | W_{L-1}]`` of shape ``[out, L*in]``;
2. take its SVD ``W = U diag(S) V^T`` (rank ``r = min(out, L*in)``, or the ``rank`` option):
   a full ``torch.linalg.svd`` up to :data:`FULL_SVD_LIMIT` elements, ``torch.svd_lowrank`` above;
3. split ``V^T`` into per-layer blocks ``B_l = V^T[:, l*in:(l+1)*in]`` of shape ``[r, in]`` (with the
   full SVD, ``W_l = U diag(S) B_l`` exactly);
4. fit a small MLP ``f`` that predicts ``B_l`` from ``(B_{l-1}, B_{l+1})`` on every interior layer
   ``l = 1..L-2``. Samples are the columns of the blocks (one ``2r -> r`` regression per input feature),
   the MLP is ``Linear(2r, width) -> GELU -> Linear(width, r)`` added to the neighbours' mean (so an
   untrained MLP interpolates), and the loss is MSE plus ``norm_weight`` times the squared difference
   of column norms (the paper's norm-matching term);
5. a layer inserted between layers ``i`` and ``i+1`` gets ``U diag(S) f(B_i, B_{i+1})``.

Vectors of a layer (norm gains, biases) are the mean of the two neighbours (:func:`interpolate`).

Everything is computed in float64 from a seeded generator, so the bytes depend only on the inputs and
the options (same machine and torch build). Memory is bounded by one kind: the L matrices, their SVD
factors and the MLP's training columns (about 3x the kind's matrices in float64). Needs L >= 3 (an
interior layer to learn from): :class:`LesaError` otherwise, and when the layers' shapes differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Elements of the concatenated [out, L*in] matrix up to which a full SVD is taken (float64: 128 MiB).
FULL_SVD_LIMIT = 1 << 24
# Columns per MLP optimisation step.
BATCH = 4096


class LesaError(ValueError):
    """The layers cannot be decomposed (too few, different shapes, non-matrices)."""


@dataclass(frozen=True)
class LesaOptions:
    """Options of the predictor fit (the plan's `k=v` after `lesa`).

    epochs: passes over the training columns (>= 0; 0 keeps the neighbours' mean);
    width: hidden units of the MLP (>= 1); seed: MLP initialisation and batch order;
    rank: singular triplets kept (None: all, i.e. min(out, L*in)); norm_weight: weight of the
    norm-matching term; lr: Adam learning rate."""

    epochs: int = 100
    width: int = 64
    seed: int = 0
    rank: int | None = None
    norm_weight: float = 0.01
    lr: float = 1e-3

    def __post_init__(self):
        for name in ("epochs", "width", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise LesaError(f"lesa option `{name}` must be a non-negative integer, got {v!r}")
        if self.width < 1:
            raise LesaError("lesa option `width` must be at least 1")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise LesaError(f"lesa option `rank` must be a positive integer, got {self.rank!r}")
        if not (isinstance(self.norm_weight, (int, float)) and self.norm_weight >= 0 and math.isfinite(self.norm_weight)):
            raise LesaError(f"lesa option `norm_weight` must be a finite number >= 0, got {self.norm_weight!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise LesaError(f"lesa option `lr` must be a finite number > 0, got {self.lr!r}")


def check_shapes(shapes: list[tuple[int, ...]], kind: str = "matrix") -> tuple[int, int]:
    """(out, in) shared by every layer's matrix of one kind; :class:`LesaError` when they differ,
    are not matrices, or there are fewer than 3 layers."""
    if len(shapes) < 3:
        raise LesaError(f"LESA needs at least 3 layers to learn a predictor from, the model has {len(shapes)}")
    for s in shapes:
        if len(s) != 2:
            raise LesaError(f"{kind}: LESA decomposes matrices, got a tensor of shape {tuple(s)}")
    distinct = sorted(set(tuple(s) for s in shapes))
    if len(distinct) != 1:
        raise LesaError(f"{kind}: layers differ in shape ({', '.join(str(d) for d in distinct)}); LESA needs one "
                        "shape per matrix kind across all layers")
    return distinct[0]  # type: ignore[return-value]


def cost(out: int, inn: int, layers: int, rank: int | None = None, epochs: int = 100, width: int = 64) -> dict:
    """Estimated peak bytes and floating-point operations of one kind's decomposition + fit.

    bytes: the float64 concatenation, U, V^T and the training columns (inputs 2r, targets r), plus the
    predictor MLP (``3 r width + width + r`` parameters, each with its gradient and two Adam moments)
    and its activations over all samples (hidden pre- and post-GELU, ``2 * samples * width``);
    flops: SVD (``4 m n^2`` full, ``~ 4 m n q`` randomized with ``q = rank + 10``), plus the MLP's
    forward+backward (``6 * samples * params`` per epoch)."""
    m, n = out, layers * inn
    full = m * n <= FULL_SVD_LIMIT and rank is None
    r = min(m, n) if rank is None else min(rank, m, n)
    samples = max(layers - 2, 0) * inn
    mlp_params = 3 * r * width + width + r
    b = 8 * (m * n + m * r + r * n + samples * 3 * r + 4 * mlp_params + 2 * samples * width)
    svd = 4 * m * n * min(m, n) if full else 4 * m * n * (r + 10)
    mlp = 6 * samples * (2 * r * width + width * r) * epochs
    return {"bytes": b, "flops": svd + mlp, "full_svd": full, "rank": r}


def decompose(mats, rank: int | None = None, seed: int = 0):
    """U [out, r], S [r], blocks [B_0..B_{L-1}] (each [r, in]) of the input-axis concatenation, float64.

    ``mats``: L tensors of one shape [out, in]. Full SVD up to :data:`FULL_SVD_LIMIT` elements (and no
    ``rank``), else ``torch.svd_lowrank`` (seeded) with ``q = rank`` (default min(out, 256))."""
    import torch

    shapes = [tuple(m.shape) for m in mats]
    out, inn = check_shapes(shapes)
    W = torch.cat([m.detach().to(torch.float64) for m in mats], dim=1)
    if rank is None and W.numel() <= FULL_SVD_LIMIT:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    else:
        q = min(rank or 256, out, W.shape[1])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(W, q=q, niter=4)
        Vh = V.T
    del W
    if rank is not None:
        U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    blocks = [Vh[:, i * inn:(i + 1) * inn].contiguous() for i in range(len(mats))]
    return U.contiguous(), S.contiguous(), blocks


class Predictor:
    """f(B_left, B_right) -> B: mean of the neighbours plus a GELU MLP, applied column-wise."""

    def __init__(self, r: int, width: int, generator):
        import torch

        def init(shape, fan_in):
            return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) / math.sqrt(fan_in)

        self.w1 = init((2 * r, width), 2 * r).requires_grad_()
        self.b1 = torch.zeros(width, dtype=torch.float64, requires_grad=True)
        self.w2 = (init((width, r), width) * 0.1).requires_grad_()
        self.b2 = torch.zeros(r, dtype=torch.float64, requires_grad=True)

    def parameters(self):
        return [self.w1, self.b1, self.w2, self.b2]

    def columns(self, left, right):
        """left, right: [n, r] (columns as rows) -> [n, r]."""
        import torch

        x = torch.cat([left, right], dim=1)
        h = torch.nn.functional.gelu(x @ self.w1 + self.b1)
        return 0.5 * (left + right) + h @ self.w2 + self.b2

    def __call__(self, b_left, b_right):
        """Blocks [r, in] -> predicted block [r, in]."""
        import torch

        with torch.no_grad():
            return self.columns(b_left.T, b_right.T).T.contiguous()


def fit_predictor(blocks, options: LesaOptions = LesaOptions()):
    """(predictor, report) trained on the interior layers' blocks; report has the final MSE and its
    baseline (neighbours' mean), both over all training columns."""
    import torch

    check_shapes([tuple(b.shape) for b in blocks], "V^T block")
    r = blocks[0].shape[0]
    g = torch.Generator().manual_seed(options.seed)
    f = Predictor(r, options.width, g)
    L = torch.cat([blocks[i - 1].T for i in range(1, len(blocks) - 1)])
    R = torch.cat([blocks[i + 1].T for i in range(1, len(blocks) - 1)])
    Y = torch.cat([blocks[i].T for i in range(1, len(blocks) - 1)])
    n = Y.shape[0]

    def loss_of(pred, y):
        mse = ((pred - y) ** 2).sum(1).mean()
        norm = ((pred.norm(dim=1) - y.norm(dim=1)) ** 2).mean()
        return mse + options.norm_weight * norm, mse

    with torch.no_grad():
        _, base = loss_of(0.5 * (L + R), Y)
    opt = torch.optim.Adam(f.parameters(), lr=options.lr)
    for _ in range(options.epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, BATCH):
            idx = perm[s:s + BATCH]
            opt.zero_grad(set_to_none=True)
            loss, _ = loss_of(f.columns(L[idx], R[idx]), Y[idx])
            loss.backward()
            opt.step()
    with torch.no_grad():
        _, mse = loss_of(f.columns(L, R), Y)
    return f, {"mse": float(mse), "baseline_mse": float(base), "samples": n, "rank": r}


class KindFit:
    """Decomposition + fitted predictor of one matrix kind; synthesises inserted layers."""

    def __init__(self, mats, options: LesaOptions = LesaOptions()):
        self.options = options
        self.U, self.S, self.blocks = decompose(mats, options.rank, options.seed)
        self.predictor, self.report = fit_predictor(self.blocks, options)
        self.dtype = mats[0].dtype

    def layer(self, left: int, right: int):
        """The matrix of a layer inserted between existing layers ``left`` and ``right`` ([out, in],
        float32)."""
        import torch

        n = len(self.blocks)
        if not (0 <= left < n and 0 <= right < n):
            raise LesaError(f"neighbours {left}, {right} outside 0..{n - 1}")
        B = self.predictor(self.blocks[left], self.blocks[right])
        return ((self.U * self.S) @ B).to(torch.float32)

    def reconstruct(self, layer: int):
        """U diag(S) B_layer: the existing layer back (exact up to rounding with the full SVD)."""
        import torch

        return ((self.U * self.S) @ self.blocks[layer]).to(torch.float32)


def interpolate(left, right):
    """A vector (norm gain, bias) of an inserted layer: the mean of its neighbours' (float32)."""
    import torch

    return (0.5 * (left.to(torch.float64) + right.to(torch.float64))).to(torch.float32)


# ------------------------------------------------------------------------------ the layer init

from scaler_wizard.compiler.methods.base import option, register  # noqa: E402
from scaler_wizard.compiler.methods.layer import LayerInit  # noqa: E402
from scaler_wizard.compiler.resolved import APPROX  # noqa: E402


@register
@dataclass(frozen=True)
class Lesa(LayerInit):
    """`insert ... lesa [epochs=] [width=] [rank=] [seed=]`: the layer init built from the maths above
    (lowered by the ``depth`` pass into :class:`~scaler_wizard.compiler.program.LesaLayer` nodes).
    The type checker refuses models with fewer than 3 layers or per-layer tensors that differ (SW330),
    bad option values (SW331), and reports the fit's memory and time (SW630)."""

    name = "lesa"
    base = APPROX
    needs_pre_ln = False  # approx anyway: the new block is not meant to be the identity
    summary = ("LESA: each matrix predicted from every layer's matrix of its kind (SVD + MLP on the per-layer "
               "V blocks), norms and biases the neighbours' mean: approx")
    source = "LESA (Yang et al., ACL 2025)"

    epochs: int | None = option("lesa: passes of the predictor fit over the training columns (default 100)")
    width: int | None = option("lesa: hidden units of the predictor MLP (default 64)")
    rank: int | None = option("lesa: singular triplets kept (default all; randomized SVD when set or the matrix is "
                              "large)")
    seed: int | None = option("lesa: seed of the predictor fit (default: the plan seed)")

    def exactness(self, cx):
        return APPROX, ("LESA layers are predicted, not identity maps: the function changes (U S f(V_i, V_i+1), "
                        "norms interpolated)")
