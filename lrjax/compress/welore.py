"""WeLore: heavy-tail-aware rank allocation and low-rank-component (LRC) fine-tuning.

Jaiswal et al., 2024, *From GaLore to WeLore: How Low-Rank Weights Non-uniformly Emerge from
Low-Rank Gradients* (arXiv:2407.11239; official code VITA-Group/WeLore). Facts used here:

* Per matrix, singular values ``s`` (float32 SVD), normalized ``s_hat = (s - min s)/(max s - min s)``;
  ``pruned = #{s_hat < tau}``, kept ``k = rank - pruned``; *one* global ``tau`` for the whole model,
  chosen to hit a target total reduction (:func:`lrjax.compress.welore_tau`, an exact search over
  the breakpoints of the count; ``by="params"`` (default here: stored parameters) or ``by="rank"``
  (sum of ranks, the measure of WeLore's tables)). Heavy-tailed spectra (fast-decaying ``s``) lose
  many ranks, flat ones few: the allocation is non-uniform by construction.
* A matrix whose pruned fraction ``pruned / rank`` exceeds ``min_ratio`` (default 0.0) is a
  *low-rank component* (LRC): replaced by ``A = U_k sqrt(S_k)``, ``B = sqrt(S_k) V_k^T``, both
  trainable. The rest (N-LRC) stays dense and frozen, as do all untargeted leaves.
* Fine-tuning trains the LRC factors only (:func:`partition`, :func:`trainable_mask`).

Differences, pinned: factors are kept in the leaf's dtype (WeLore stores bf16 factors); the SVD
is :func:`lrjax.linalg.svd` (float32, signs pinned). A stacked ``[L, M, N]`` leaf keeps the
largest ``k`` of its slices (one static shape).
"""
from __future__ import annotations

import jax
import numpy as np
import optax

from lrjax import axes as axes_lib
from lrjax import tree as tree_lib
from lrjax._validation import check_array, check_choice, check_float
from lrjax.compress import core
from lrjax._validation import check_params

__all__ = ["compress", "uniform", "partition", "trainable_mask", "trainable", "labels", "optimizer", "combine"]


def compress(params, reduction: float, targets="kernel", *, by: str = "params", min_ratio: float = 0.0,
             method: str = "svd", calib: dict | None = None, axes=None) -> core.Compressed:
    """WeLore compression of ``params`` to a total ``reduction`` in ``(0, 1)`` (see module docstring).

    ``report.extra`` holds ``tau`` and the per-matrix kept ranks; leaves with ``kind == "dense"``
    in the report are the N-LRC (left in ``base``, frozen).
    """
    return core.compress(params, targets, reduction=reduction, by=by, min_ratio=min_ratio, method=method,
                         calib=calib, axes=axes)


def uniform(params, reduction: float, targets="kernel", *, by: str = "params", method: str = "svd",
            calib: dict | None = None, axes=None) -> core.Compressed:
    """The baseline WeLore is compared with: every selected matrix keeps the same fraction ``q`` of
    its rank (``k = max(1, round(q min(M, N)))``), ``q`` the largest on a 1/1024 grid whose total
    reduction (``by``, as in :func:`compress`) reaches ``reduction``."""
    check_params(params)
    reduction = check_float(reduction, "reduction", low=0.0, high=1.0, low_open=True, high_open=True)
    by = check_choice(by, "by", ("rank", "params"))
    flat = tree_lib.flatten(params)
    paths = tree_lib.select(params, targets, where=lambda p, l: hasattr(l, "ndim") and hasattr(l, "dtype"))
    shapes = {}
    for p in paths:
        leaf = check_array(flat[p], f"params[{p!r}]", min_ndim=2, kind="floating")
        b, m, n = axes_lib.matrix_shape(leaf.shape, axes_lib.resolve(p, leaf.shape, axes))
        shapes[p] = (int(np.prod(b)) if b else 1, m, n)
    before = sum(nb * (m * n if by == "params" else min(m, n)) for nb, m, n in shapes.values())
    for q in np.linspace(1.0, 0.0, 1025)[1:]:
        ranks = {p: max(1, int(round(q * min(m, n)))) for p, (nb, m, n) in shapes.items()}
        after = sum(nb * (ranks[p] * (m + n) if by == "params" else ranks[p]) for p, (nb, m, n) in shapes.items())
        if 1.0 - after / before >= reduction:
            return core.compress(params, targets, rank=ranks, method=method, calib=calib, axes=axes)
    raise ValueError(f"reduction={reduction} cannot be reached with a uniform rank cut (rank 1 everywhere is "
                     "not enough); lower `reduction`")


def _check_compressed(c):
    if not isinstance(c, core.Compressed):
        raise TypeError(f"compressed must be the lrjax.compress.Compressed returned by compress(), "
                        f"got {type(c).__name__}")
    return c


def partition(compressed) -> tuple[dict, object]:
    """``(trainable, frozen)`` = ``(LRC factors, base)``: differentiate a loss in the first only."""
    c = _check_compressed(compressed)
    return c.factors, c.base


def trainable(compressed) -> dict:
    """``{"factors": ..., "base": ...}``: the pytree :func:`trainable_mask` describes."""
    c = _check_compressed(compressed)
    return {"factors": c.factors, "base": c.base}


def trainable_mask(compressed) -> dict:
    """A bool pytree over :func:`trainable` (``True`` = train): LRC factors ``True``, everything in
    ``base`` (N-LRC dense matrices, biases, norms, embeddings) ``False``. Note that
    ``optax.masked(opt, mask)`` alone passes the masked-out gradients through *unchanged*; freeze
    them with :func:`optimizer` (``optax.multi_transform`` with ``set_to_zero``) or chain
    ``optax.masked(optax.set_to_zero(), inverted mask)``."""
    c = _check_compressed(compressed)
    return {"factors": jax.tree_util.tree_map(lambda _: True, c.factors),
            "base": jax.tree_util.tree_map(lambda _: False, c.base)}


def labels(compressed) -> dict:
    """``"lrc"`` / ``"frozen"`` labels over :func:`trainable` for ``optax.multi_transform``."""
    m = trainable_mask(compressed)
    return jax.tree_util.tree_map(lambda t: "lrc" if t else "frozen", m)


def optimizer(compressed, opt):
    """``opt`` on the LRC factors, zero updates for everything else (over :func:`trainable`)."""
    if not all(hasattr(opt, k) for k in ("init", "update")):
        raise TypeError(f"opt must be an optax.GradientTransformation, got {type(opt).__name__}")
    return optax.multi_transform({"lrc": opt, "frozen": optax.set_to_zero()}, labels(compressed))


def combine(compressed, factors) -> core.Compressed:
    """``compressed`` with fine-tuned ``factors`` (same paths and shapes) swapped in."""
    c = _check_compressed(compressed)
    if not isinstance(factors, dict) or set(factors) != set(c.factors):
        raise ValueError(f"factors must have the paths {sorted(c.factors)} of the compressed model, "
                         f"got {sorted(factors) if isinstance(factors, dict) else type(factors).__name__}")
    c.rp._check(c.base, factors, "factors")
    return c._replace(factors=factors)
