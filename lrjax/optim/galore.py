r"""GaLore: gradient low-rank projection (Zhao et al. 2024, arXiv:2403.03507), three refreshes.

For a projected matrix leaf with gradient ``G_t: [M, N]`` (left side shown; see
:mod:`lrjax.optim.projection` for sides, axes, stacks and the state):

.. math::

    P_t = \\begin{cases} U[:, :r] \\text{ of } G_t & t \\bmod T = 0 \\\\ P_{t-1} & \\text{otherwise}
          \\end{cases},\\qquad R_t = P_t^\\top G_t,\\qquad
    \\Delta W_t = \\alpha\\, P_t\\, \\rho_t(R_t)

``rho`` is the inner transformation (Adam in the paper), ``T`` = ``update_proj_gap`` and
``alpha`` = ``scale``. Paper defaults for LLaMA pretraining: ``r = 128`` (60M) .. 512,
``T = 200``, ``alpha = 0.25`` with learning rate 0.01; this module defaults to ``alpha = 1`` like
galore-torch's ``GaLoreProjector`` and ``optax.contrib.galore``, which makes it a drop-in for the
inner optimizer at the same learning rate.

Refreshes (``refresh=``):

* ``"svd"`` (default): exact truncated SVD, :func:`lrjax.linalg.svd` -- the paper, galore-torch
  and ``optax.contrib.galore``. ``O(M N min(M, N))``: 0.25-0.45 s for one 1024 x 1024 matrix on CPU.
* ``"eigh"``: the same exact top-``r`` singular subspace from the eigendecomposition of the
  ``d x d`` Gram matrix (``G G^T`` on the left, ``G^T G`` on the right; :func:`lrjax.linalg.gram_svd`):
  one matmul plus a symmetric eigensolver, about 2x (square) to 6x (``512 x 1024`` stacks)
  cheaper than the SVD on CPU. Mathematically the same projector; in float32 its error grows
  with ``s_1^2 / (s_r^2 - s_{r+1}^2)`` instead of ``s_1 / (s_r - s_{r+1})``, so on gradients with
  a near-degenerate ``r``-th singular value the two exact refreshes can pick different (equally
  valid) bases.
* ``"randomized"``: :func:`lrjax.linalg.randomized_svd` with ``oversample`` extra columns and
  ``n_iter`` power iterations (Halko et al. 2011), cold-started at every refresh.
* ``"subspace"``: warm-started subspace iteration. The start block is the previous ``P``
  (a Gaussian block at the first refresh) plus ``oversample`` Gaussian columns,
  ``S = [P_{t-1}, \Omega]``; then ``Q = orth(G G^T S)`` (``n_iter`` times, via
  :func:`lrjax.linalg.subspace_iteration`) and a Rayleigh-Ritz step: ``P = Q U_B[:, :r]`` with
  ``U_B`` the left singular vectors of ``B = Q^T G`` (from the small Gram matrix ``B B^T``), so
  ``P``'s columns are ordered and signed like exact singular vectors. About three
  ``M N (r + p)`` matmuls and an ``M (r + p)^2`` QR per refresh: more than 10x cheaper than the
  exact SVD at ``r = M / 8``. Gradient subspaces drift slowly between refreshes, so the warm start
  accumulates power iterations across refreshes.

Signs: every refresh pins the sign ambiguity of the singular vectors
(:mod:`lrjax.linalg`), so runs are reproducible across BLAS libraries. The inner moments are
carried across refreshes, so a peer whose SVD returns other signs follows the same trajectory
only up to the first refresh after ``t = 0`` (the cross-check tests pin the peers' signs too).

Adam's ``eps`` and galore-torch: ``optax.scale_by_adam`` adds ``eps`` to ``sqrt(v_hat)`` (after
bias correction); galore-torch's ``AdamW`` (like ``torch.optim.AdamW``) adds it to ``sqrt(v)``
before the bias correction, which is ``m_hat / (sqrt(v_hat) + eps / sqrt(1 - b2^t))``, a
step-dependent ``eps`` that no setting of ``optax.scale_by_adam(eps=, eps_root=)`` reproduces. With
``optax.scale_by_adam()`` inside, lrjax equals galore-torch only where ``eps`` is negligible next
to ``sqrt(v_hat)``; :func:`scale_by_adam_torch` is the torch placement, with which the two agree
for any ``eps`` (tested with ``eps = 1e-3``).

8-bit GaLore (the paper's "8-bit GaLore"): ``galore(lrjax.optim.scale_by_adam_8bit(), rank)`` keeps
the projected Adam moments in 8-bit block-wise quantized form (:mod:`lrjax.optim.quant`).

Per-layer weight updates (the paper's Sec. 4.2, galore-torch's ``*_per_layer`` optimizers):
:func:`lrjax.optim.layerwise.layerwise_step` runs this transformation on each layer's gradient
inside the backward pass, so the compiled step never holds the whole model's gradient.

Compiled step: with an exact refresh (``"svd"``, ``"eigh"``) each matrix without batch axes is
refreshed in its own ``lax.cond`` (as in ``optax.contrib.galore``), so a layer's projection and
update depend on its own gradient only; one cond over all leaves was a barrier that waited for
every gradient (the step was up to ~10% slower than optax's between refreshes, and held all
gradients at once). Per matrix the SVD is the same LAPACK call on the same numbers, so ``"svd"``
trajectories are bit-identical to the grouped form; ``"eigh"`` forms its Gram matrix with an
unbatched matmul, which can differ from the batched one in the last bit. The random refreshes
keep one cond and one batched draw per shape group (their random streams are unchanged).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lrjax import linalg
from lrjax._validation import check_choice, check_float
from lrjax.optim.projection import Basis, LeafPlan, _check_int, project

__all__ = ["galore", "ExactSVD", "GramEigh", "RandomizedSVD", "SubspaceIteration", "make_basis", "REFRESHES",
           "scale_by_adam_torch", "ScaleByAdamTorchState"]

REFRESHES = ("svd", "eigh", "randomized", "subspace")


def _t(x):
    return jnp.swapaxes(x, -1, -2)


class ExactSVD(Basis):
    """``P`` = top-``r`` left (or right) singular vectors of the gradient, exact SVD."""

    name = "svd"
    deterministic = True

    def refresh(self, key, g, old, lp: LeafPlan):
        if g.ndim > 2 and g.shape[0] > 1 and jax.default_backend() == "cpu" and jax.local_device_count() > 1:
            # jaxlib 0.10.2 on several (forced) host devices: a batched LAPACK SVD deadlocks XLA:CPU's
            # intra-op pool when every device reaches it at once (docs/sharded_training.md); one matrix per
            # LAPACK call gives the same factors
            s = jax.lax.map(lambda m: linalg.svd(m, lp.rank), g)
        else:
            s = linalg.svd(g, lp.rank)
        return s.u if lp.left else _t(s.vt)


class GramEigh(Basis):
    """``P`` = top-``r`` eigenvectors of the ``d x d`` Gram matrix of the gradient (exact, no SVD)."""

    name = "eigh"
    deterministic = True

    def refresh(self, key, g, old, lp: LeafPlan):
        return linalg.gram_svd(g, lp.rank, side="left" if lp.left else "right")[0]


class RandomizedSVD(Basis):
    """``P`` from :func:`lrjax.linalg.randomized_svd` (``oversample``, ``n_iter``), cold start."""

    name = "randomized"

    def __init__(self, oversample: int = 8, n_iter: int = 1):
        self.oversample = _check_int(oversample, "oversample", low=0)
        self.n_iter = _check_int(n_iter, "n_iter", low=0)

    def refresh(self, key, g, old, lp: LeafPlan):
        s = linalg.randomized_svd(key, g, lp.rank, oversample=self.oversample, n_iter=self.n_iter)
        return s.u if lp.left else _t(s.vt)


class SubspaceIteration(RandomizedSVD):
    """Warm-started subspace iteration + Rayleigh-Ritz (module doc)."""

    name = "subspace"

    def refresh(self, key, g, old, lp: LeafPlan):
        x = g if lp.left else _t(g)                     # basis spans the columns of x: [*b, d, k]
        r = lp.rank
        k = min(r + self.oversample, x.shape[-2], x.shape[-1])
        fresh = jnp.all(old == 0, axis=(-2, -1))        # never refreshed (or skipped) matrices
        omega = jax.random.normal(key, x.shape[:-1] + (k,), jnp.float32)
        start = jnp.concatenate([jnp.where(fresh[..., None, None], omega[..., :r], old.astype(jnp.float32)),
                                 omega[..., r:]], axis=-1)
        q = linalg.subspace_iteration(x, start, max(self.n_iter, 1))   # orth(x x^T start)
        b = _t(q) @ x                                    # [*b, k, cols]
        u = linalg.svd(b @ _t(b)).u                      # Ritz vectors of B B^T, descending
        return q @ u[..., :r]


def make_basis(refresh: str = "svd", *, oversample: int = 8, n_iter: int = 1) -> Basis:
    """The :class:`~lrjax.optim.projection.Basis` named by ``refresh``."""
    check_choice(refresh, "refresh", REFRESHES)
    oversample = _check_int(oversample, "oversample", low=0)
    n_iter = _check_int(n_iter, "n_iter", low=0)
    if refresh == "svd":
        return ExactSVD()
    if refresh == "eigh":
        return GramEigh()
    if refresh == "randomized":
        return RandomizedSVD(oversample, n_iter)
    if refresh == "subspace":
        return SubspaceIteration(oversample, n_iter)
    raise ValueError(f"refresh must be one of {REFRESHES}, got {refresh!r}")


def galore(inner, rank: int = 128, *, update_proj_gap: int = 200, scale: float = 1.0,
           refresh: str = "svd", oversample: int = 8, n_iter: int = 1, side: str = "std",
           targets=None, axes=None, seed: int = 0, weight_decay: float = 0.0,
           weight_decay_mask=None):
    """GaLore around an inner optax transformation.

    Use it anywhere in a chain::

        opt = optax.chain(optax.clip_by_global_norm(1.0),
                          lrjax.optim.galore(optax.scale_by_adam(), rank=128, refresh="subspace"),
                          optax.scale_by_learning_rate(1e-2))

    Args:
      inner: params-free optax transformation run on the projected gradients (and at full size
        on the leaves not projected), e.g. ``optax.scale_by_adam()``. ``optax.adamw`` is refused:
        use ``weight_decay=``.
      rank: projection rank ``r`` (default 128, the paper's 60M setting).
      update_proj_gap: ``T``, steps between refreshes (default 200).
      scale: ``alpha > 0`` (default 1.0; the paper uses 0.25 with lr 0.01).
      refresh: ``"svd"`` (exact, default), ``"eigh"`` (exact, from the Gram matrix),
        ``"randomized"`` or ``"subspace"`` (module doc).
      oversample, n_iter: sketch width ``r + oversample`` and power / subspace iterations of the
        randomized refreshes (defaults 8 and 1).
      side: ``"std"`` (default: the smaller dimension; a square matrix goes left, i.e. ``P``
        spans the input rows of a JAX ``[in, out]`` kernel, which is galore-torch's choice only
        because torch stores the same weight transposed, ``[out, in]``), ``"reverse_std"``,
        ``"left"``, ``"right"`` (:mod:`lrjax.optim.projection`).
      targets, axes, seed, weight_decay, weight_decay_mask: see
        :func:`lrjax.optim.projection.project`.

    Every projected leaf is computed in float32 or wider and rounded once to the gradient's
    dtype (:mod:`lrjax.optim.projection`); integer leaves are never projected.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`~lrjax.optim.projection.ProjectionState`.
    """
    basis = make_basis(refresh, oversample=oversample, n_iter=n_iter)
    return project(inner, basis, rank=rank, update_proj_gap=update_proj_gap, scale=scale, side=side,
                   targets=targets, axes=axes, seed=seed, weight_decay=weight_decay,
                   weight_decay_mask=weight_decay_mask)


class ScaleByAdamTorchState(NamedTuple):
    """State of :func:`scale_by_adam_torch` (the same fields as optax's ``ScaleByAdamState``)."""

    count: jax.Array
    mu: Any
    nu: Any


def scale_by_adam_torch(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """Adam with ``eps`` placed as PyTorch and galore-torch place it (params-free inner transformation).

    ``u_t = m_hat_t / (sqrt(v_hat_t) + eps / sqrt(1 - b2^t))``, i.e. torch's
    ``(m_t / (1 - b1^t)) / ((sqrt(v_t) + eps) / sqrt(1 - b2^t))``: ``eps`` is added to ``sqrt(v)``
    *before* bias correction. ``optax.scale_by_adam`` adds it after; the two agree only when ``eps``
    is negligible. Use this as the inner transformation to reproduce galore-torch's ``GaLoreAdamW``
    (or ``torch.optim.AdamW``) for any ``eps``::

        lrjax.optim.galore(lrjax.optim.scale_by_adam_torch(eps=1e-6), rank=128)

    Moments are kept in ``promote_types(dtype, float32)``. ``0 <= b1, b2 < 1``, ``eps > 0``.
    """
    b1 = check_float(b1, "b1", low=0.0, high=1.0, high_open=True)
    b2 = check_float(b2, "b2", low=0.0, high=1.0, high_open=True)
    eps = check_float(eps, "eps", low=0.0, low_open=True)

    def init_fn(params):
        z = lambda x: jnp.zeros(jnp.shape(x), jnp.promote_types(jnp.asarray(x).dtype, jnp.float32))  # noqa: E731
        return ScaleByAdamTorchState(jnp.zeros([], jnp.int32), jax.tree_util.tree_map(z, params),
                                     jax.tree_util.tree_map(z, params))

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_int32_increment(state.count)
        c = count.astype(jnp.float32)
        mu = jax.tree_util.tree_map(lambda g, m: b1 * m + (1 - b1) * g.astype(m.dtype), updates, state.mu)
        nu = jax.tree_util.tree_map(lambda g, v: b2 * v + (1 - b2) * jnp.square(g.astype(v.dtype)), updates, state.nu)
        bc1, sbc2 = 1 - b1 ** c, jnp.sqrt(1 - b2 ** c)
        out = jax.tree_util.tree_map(lambda g, m, v: ((m / bc1) * sbc2 / (jnp.sqrt(v) + eps)).astype(g.dtype),
                                     updates, mu, nu)
        return out, ScaleByAdamTorchState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)
