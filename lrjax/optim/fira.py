"""Fira: full-rank training under the low-rank constraint (Chen et al. 2024, arXiv:2410.01623).

GaLore discards the part of the gradient outside the projection, ``(I - P P^T) G``. Fira adds it
back, rescaled by how much the inner optimizer rescales the projected gradient, so that the
update is full-rank while the optimizer state stays low-rank. Left side shown (right: rows
instead of columns); ``R = P^T G``, ``N = rho(R)`` the inner (Adam) update:

.. math::

    \\phi_j = \\frac{\\lVert N_{:, j}\\rVert}{\\lVert R_{:, j}\\rVert + 10^{-8}},\\qquad
    S_t = (G - P R)\\, \\mathrm{diag}(\\phi)

    \\lambda_t = \\frac{\\max(\\lVert S_t\\rVert / (\\lVert S_{t-1}\\rVert + 10^{-8}),\\ \\gamma)}{\\gamma},
    \\qquad S_t \\leftarrow S_t / \\lambda_t \\quad (t > 0)

    \\Delta W_t = \\alpha\\, P N + S_t

``phi`` is column-wise along the dimension that is *not* projected (the official code's
``norm_dim``), the norm-growth limiter caps ``||S_t|| <= gamma ||S_{t-1}||`` with ``gamma = 1.01``
(paper and code default) and stores the limited norm for the next step; at the first step the
limiter is off. ``alpha`` (``scale``) multiplies the low-rank term only, as in the official code.
One deliberate difference from the official code: it forms the residual as ``G - alpha P R``
(its ``project_back`` includes ``alpha``), which for ``alpha != 1`` leaks ``(1 - alpha) P R`` of the
in-subspace gradient into the residual; here the residual is the true ``(I - P P^T) G`` as in the
paper's equations. For ``alpha = 1`` the two agree.

Cost: no extra ``M N r`` matmul over GaLore. Because ``diag(phi)`` acts on the unprojected side it
commutes with ``P``: ``alpha P N + (G - P R) diag(phi) = P (alpha N - R diag(phi)) + G diag(phi)``;
and since ``P`` is orthonormal, ``||(G - P R)_{:, j}||^2 = ||G_{:, j}||^2 - ||R_{:, j}||^2``.

Degenerate gradients (all computed in float32 or wider, :mod:`lrjax.optim.projection`): a zero
gradient gives ``R = 0``, ``N = 0`` (Adam), ``phi = 0`` and a zero update; a column ``j`` whose
projected gradient vanishes (``R_{:, j} = 0``, e.g. a rank-deficient ``G`` whose column lies outside
``P``) gets ``phi_j = ||N_{:, j}|| / 10^{-8}`` exactly as in the paper and the official code: large but
finite, and bounded from the second step on by the limiter. ``||G_{:, j}||^2 - ||R_{:, j}||^2`` is
clipped at 0 against rounding. After a step whose residual is exactly 0 the limiter lets
``||S||`` grow again from ``gamma * 10^{-8}`` (``||S_{t-1}|| + 10^{-8}`` in the denominator), as in the
official code. Every norm and quotient here is finite for finite gradients.

Defaults from the paper's pretraining scripts: rank 128 (60M) .. 256, ``update_proj_gap = 200``,
``alpha = 0.25``, lr 0.01. ``residual=False`` switches the residual off and gives GaLore exactly.
"""
from __future__ import annotations

import jax.numpy as jnp

from lrjax._validation import check_bool, check_float
from lrjax.optim.galore import make_basis
from lrjax.optim.projection import LeafPlan, Variant, project

__all__ = ["fira", "FiraResidual"]


class FiraResidual(Variant):
    """The Fira delta over GaLore: scaled residual with the norm-growth limiter (module doc)."""

    name = "fira"

    def __init__(self, gamma: float = 1.01, residual: bool = True, eps: float = 1e-8):
        self.gamma = check_float(gamma, "gamma (norm-growth limit)", low=1.0)
        self.residual = check_bool(residual, "residual")
        self.eps = check_float(eps, "eps", low=0.0, low_open=True)

    def init_extra(self, lp: LeafPlan):
        return jnp.zeros(lp.batch, jnp.float32)          # ||S_{t-1}|| per matrix

    def combine(self, g, r, n, extra, count, lp: LeafPlan, scale):
        if not self.residual:
            return scale * n, None, extra
        ax = -2 if lp.left else -1                        # reduce over the projected rank axis
        f32 = lambda x: x.astype(jnp.float32)             # noqa: E731
        r2 = jnp.sum(f32(r) ** 2, axis=ax, keepdims=True)
        phi = jnp.sqrt(jnp.sum(f32(n) ** 2, axis=ax, keepdims=True)) / (jnp.sqrt(r2) + self.eps)
        g2 = jnp.sum(f32(g) ** 2, axis=ax, keepdims=True)  # column norms of G (row norms, right)
        s_norm = jnp.sqrt(jnp.sum(phi ** 2 * jnp.maximum(g2 - r2, 0.0), axis=(-2, -1)))   # [*batch]
        limiter = jnp.maximum(s_norm / (extra + self.eps), self.gamma) / self.gamma
        limiter = jnp.where(count == 0, 1.0, limiter)
        phi = phi / limiter[..., None, None]
        coef = scale * n - (phi * r).astype(n.dtype)
        return coef, phi.astype(g.dtype), s_norm / limiter


def fira(inner, rank: int = 128, *, gamma: float = 1.01, residual: bool = True, refresh: str = "svd",
         oversample: int = 8, n_iter: int = 1, update_proj_gap: int = 200, scale: float = 1.0, eps: float = 1e-8,
         **kwargs):
    """Fira around an inner optax transformation (GaLore projection + scaled residual).

    Args:
      inner: params-free optax transformation (``optax.scale_by_adam()`` in the paper).
      rank, refresh, oversample, n_iter, update_proj_gap, scale: as in :func:`lrjax.optim.galore`.
      gamma: norm-growth limit (default 1.01).
      residual: ``False`` drops the residual term (then this is GaLore).
      eps: the ``10^{-8}`` of the norm ratios (``> 0``).
      **kwargs: ``side``, ``targets``, ``axes``, ``seed``, ``weight_decay``, ``weight_decay_mask``
        (:func:`lrjax.optim.projection.project`).
    """
    return project(inner, make_basis(refresh, oversample=oversample, n_iter=n_iter),
                   FiraResidual(gamma, residual, eps), rank=rank, update_proj_gap=update_proj_gap,
                   scale=scale, **kwargs)
