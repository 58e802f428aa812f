"""SVD-free projection onto DCT columns (Modoranu et al. 2025, "FFT-based Dynamic Subspace
Selection for Low-Rank Adaptive Optimization of Large Language Models", arXiv:2505.17967).

Instead of the singular vectors of ``G``, ``P`` is a set of ``r`` columns of a *fixed* orthonormal
basis ``Q: [d, d]``, the DCT-III matrix (the transpose of the orthonormal DCT-II),

.. math::

    Q_{ik} = \\sqrt{2/d}\\; c_k \\cos\\!\\Big(\\frac{\\pi (2i + 1) k}{2d}\\Big),\\qquad
    c_0 = 1/\\sqrt{2},\\; c_{k>0} = 1 .

At a refresh the columns best aligned with the gradient are kept (left side shown): the scores
are the ``ell``-norms of the rows of ``Q^T G`` -- one ``d x d x N`` matmul -- and ``P = Q[:, S]`` with
``S`` the top-``r`` scores (descending). ``ell = 1`` is the official code's default
(``ell_norm=1``), ``ell = 2`` picks the ``r`` columns that capture the most Frobenius energy
``||P^T G||_F^2``. Refresh cost: one matmul and a top-k, no SVD. The state stores only the int32
indices ``S: [*batch, r]``; ``Q`` is built once per dimension (NumPy, float64, cached) and is a
constant of the compiled step, never saved.

A zero gradient scores every column 0; ``top_k`` then keeps the lowest indices (ties go to the
lower index), so the basis is the ``r`` lowest frequencies, orthonormal as always.

Like GaLore the inner moments are carried across refreshes unchanged (the official code's
optional state rotation between old and new indices is not done).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from lrjax._validation import check_dtype, check_int
from lrjax.optim.projection import Basis, LeafPlan, project

__all__ = ["dct", "DCTBasis", "dct_matrix"]


@functools.lru_cache(maxsize=32)
def _dct_np(d: int) -> np.ndarray:
    i = np.arange(d)[:, None]
    k = np.arange(d)[None, :]
    q = np.sqrt(2.0 / d) * np.cos(np.pi * ((2 * i + 1) * k % (4 * d)) / (2 * d))
    q[:, 0] *= 1.0 / np.sqrt(2.0)
    q.setflags(write=False)
    return q


def dct_matrix(d: int, dtype=jnp.float32):
    """The orthonormal DCT-III matrix ``Q: [d, d]`` (columns are the DCT basis vectors), ``d >= 1``."""
    d = check_int(d, "d (the matrix size)", low=1)
    return jnp.asarray(_dct_np(d), check_dtype(dtype, "dtype"))


class DCTBasis(Basis):
    """``P = Q[:, S]``, ``S`` the top-``r`` DCT columns by ``ell``-norm score (module doc)."""

    name = "dct"

    def __init__(self, ell: int = 1):
        self.ell = check_int(ell, "ell (score norm)", low=1, high=2)

    def init(self, lp: LeafPlan, dtype):
        # the r lowest frequencies: orthonormal even before the first refresh
        return jnp.broadcast_to(jnp.arange(lp.rank, dtype=jnp.int32), lp.batch + (lp.rank,))

    def scores(self, g, lp: LeafPlan):
        """``[*batch, d]`` alignment of every DCT column with ``g: [*batch, M, N]``."""
        q = dct_matrix(lp.d, jnp.float32)
        c = jnp.einsum("dk,...dn->...kn", q, g) if lp.left else jnp.einsum("...md,dk->...km", g, q)
        return jnp.sum(jnp.abs(c), -1) if self.ell == 1 else jnp.sum(c * c, -1)

    def refresh(self, key, g, old, lp: LeafPlan):
        _, idx = jax.lax.top_k(self.scores(g, lp), lp.rank)
        return idx.astype(jnp.int32)

    def matrix(self, state, lp: LeafPlan, dtype):
        p = jnp.take(dct_matrix(lp.d, dtype), state, axis=1)      # [d, *batch, r]
        return jnp.moveaxis(p, 0, -2)

    def state_bytes(self, lp: LeafPlan, itemsize: int) -> int:
        return math.prod(lp.batch) * lp.rank * 4


def dct(inner, rank: int = 128, *, ell: int = 1, update_proj_gap: int = 200, scale: float = 1.0,
        **kwargs):
    """GaLore-style projection onto the best-aligned DCT columns (no SVD).

    Args:
      inner: params-free optax transformation (e.g. ``optax.scale_by_adam()``).
      rank, update_proj_gap, scale: as in :func:`lrjax.optim.galore`.
      ell: 1 (default, official code) or 2: the norm of the column scores.
      **kwargs: ``side``, ``targets``, ``axes``, ``seed``, ``weight_decay``, ``weight_decay_mask``
        (:func:`lrjax.optim.projection.project`).
    """
    return project(inner, DCTBasis(ell), rank=rank, update_proj_gap=update_proj_gap, scale=scale,
                   **kwargs)
