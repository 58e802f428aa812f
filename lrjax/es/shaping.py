"""Fitness shaping and the rule for non-finite fitness values.

Every function maps a raw fitness vector ``f [N]`` (in global member order) to weights ``w [N]``
that are *increasing* in the loss being minimized (the loss is ``-f`` with ``maximize=True``, ``f``
with ``maximize=False``), so that ``g = 1/(N sigma) sum_i w_i E_i`` is the gradient estimate of the
smoothed *loss*, ready for an optax optimizer (``params - lr * g`` improves the fitness; evosax's
convention).

* ``'centered_rank'``: ``w_i = rank(l_i) / (N - 1) - 1/2`` in ``[-1/2, 1/2]`` (Salimans et al. 2017;
  the shaping used by the EGGROLL paper's RL experiments and evosax's Open_ES default). Tied
  losses get the mean of their ranks (so equal fitness gets equal weight, and a generation whose
  fitness is all equal gets weights all 0).
* ``'z_score'``: ``w_i = (l_i - mean(l)) / sqrt(var(l) + 1e-5)``, the default of the official
  EGGROLL code (HyperscaleES ``convert_fitnesses`` with ``group_size=0``). If every loss is equal
  (zero spread) every weight is exactly 0, never NaN.
* ``'none'``: ``w_i = l_i`` (the raw Monte-Carlo estimator; unbiased for the Gaussian-smoothed
  gradient, highest variance). With ``maximize=False`` the update is exactly the paper's
  ``1/(N sigma) sum_i f_i E_i``; with ``maximize=True`` it is its negative.

Zero-spread rule: when all (finite) losses of a generation are equal, ``'centered_rank'`` and
``'z_score'`` give all-zero weights, so the update is exactly zero (the fitness carries no
information about a direction). A population of one member has no spread: ``Eggroll`` refuses
``population_size=1`` with these two shapings.

Non-finite rule: a ``NaN`` or ``+-inf`` fitness counts as the *worst* finite fitness of the
generation (the lowest when maximizing, the highest when minimizing) before shaping, so a member
that diverges pushes the update away from its perturbation as the worst member would, and never
turns the update into NaN (``EstimateInfo.num_nonfinite`` counts such members). If no fitness of
the generation is finite, every weight is 0 and the update is exactly zero.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lrjax import _validation as V

__all__ = ["SHAPINGS", "centered_rank", "z_score", "identity", "shape_fitness", "sanitize"]

Z_SCORE_EPS = 1e-5


def _check_loss(loss):
    loss = V.check_array(loss, "loss", ndim=1, kind="floating")
    if loss.shape[0] == 0:
        raise ValueError("loss is empty: give one value per member")
    return loss


def centered_rank(loss):
    """Centered ranks in ``[-1/2, 1/2]`` of a finite 1-D ``loss``; ties share the mean of their ranks."""
    l = _check_loss(loss)  # noqa: E741
    n = l.shape[0]
    s = jnp.sort(l)
    lo = jnp.searchsorted(s, l, side="left")
    hi = jnp.searchsorted(s, l, side="right") - 1
    # rank - (n - 1) / 2 with rank = (lo + hi) / 2, from an exact integer numerator: a tie shared
    # by the whole generation is exactly 0 (however XLA rewrites the division)
    return (lo + hi - (n - 1)).astype(jnp.float32) * np.float32(0.5 / max(n - 1, 1))


def z_score(loss):
    """``(l - mean) / sqrt(var + 1e-5)`` of a finite 1-D ``loss``; exactly 0 everywhere when every
    entry is equal."""
    l = _check_loss(loss)  # noqa: E741
    z = (l - jnp.mean(l)) / jnp.sqrt(jnp.var(l) + Z_SCORE_EPS)
    return jnp.where(jnp.max(l) == jnp.min(l), jnp.zeros_like(z), z)


def identity(loss):
    """``loss`` itself (the raw estimator's weights)."""
    return _check_loss(loss)


SHAPINGS = {"centered_rank": centered_rank, "z_score": z_score, "none": identity}


def sanitize(fitness, maximize: bool):
    """``(loss, any_finite)``: the loss ``-f`` (maximize) or ``f``, with non-finite entries set to
    the worst finite loss (see the module docstring)."""
    maximize = V.check_bool(maximize, "maximize")
    fitness = jnp.asarray(check_fitness(fitness, "fitness"))
    f = jnp.asarray(fitness, jnp.promote_types(fitness.dtype, jnp.float32))
    loss = -f if maximize else f
    finite = jnp.isfinite(loss)
    any_finite = jnp.any(finite)
    worst = jnp.max(jnp.where(finite, loss, -jnp.inf))
    loss = jnp.where(finite, loss, jnp.where(any_finite, worst, 0.0))
    return loss, any_finite


def check_fitness(fitness, name: str = "fitness", size: int | None = None):
    """A real 1-D fitness vector (NumPy, JAX or a list of numbers), non-empty, of length ``size``
    if given; returned as an array (float32, or float64 where x64 is enabled). Concrete values
    that are finite in their own dtype but overflow float32 are refused (they would silently
    become ``inf`` and count as the worst member)."""
    if isinstance(fitness, (str, bytes)) or fitness is None or isinstance(fitness, bool):
        raise TypeError(f"{name} must be a 1-D array of real numbers (one per member), got "
                        f"{type(fitness).__name__}")
    if isinstance(fitness, (list, tuple)):
        try:
            fitness = np.asarray(fitness)
        except Exception:  # noqa: BLE001 - ragged lists
            raise TypeError(f"{name} must be a 1-D array of real numbers, got a ragged "
                            f"{type(fitness).__name__}") from None
    f = V.check_array(fitness, name, kind="numeric")
    if f.ndim != 1:
        raise ValueError(f"{name} must be a 1-D vector with one value per member, got shape "
                         f"{tuple(f.shape)}; flatten it with .reshape(-1) if it holds one value per member")
    if f.shape[0] == 0:
        raise ValueError(f"{name} is empty: give one fitness value per member")
    if size is not None and f.shape[0] != size:
        raise ValueError(f"{name} must have shape ({size},) (one value per member, population_size="
                         f"{size}), got shape {tuple(f.shape)}")
    if isinstance(f, np.ndarray) and np.issubdtype(f.dtype, np.floating):
        wide = jnp.promote_types(jnp.float32, jax.dtypes.canonicalize_dtype(f.dtype))
        if np.finfo(f.dtype).max > np.finfo(wide).max:
            fin = np.isfinite(f)
            if np.any(np.abs(f[fin]) > np.finfo(wide).max):
                raise ValueError(f"{name} has finite values beyond the {wide} range "
                                 f"(max |f| = {np.max(np.abs(f[fin])):.3g}); rescale the fitness")
    return f


def shape_fitness(fitness, method: str = "z_score", maximize: bool = True):
    """Weights ``w [N]`` increasing in the loss, per ``method``; all zero if nothing is finite.

    ``fitness``: a 1-D real vector (any length >= 1); ``method``: ``'z_score'``,
    ``'centered_rank'`` or ``'none'``; ``maximize``: ``True`` if larger fitness is better (the
    loss is then ``-fitness``). See the module docstring for the zero-spread and non-finite rules.
    """
    V.check_choice(method, "method", SHAPINGS)
    maximize = V.check_bool(maximize, "maximize")
    fitness = check_fitness(fitness, "fitness")
    fitness = jnp.asarray(fitness)
    loss, any_finite = sanitize(fitness, maximize)
    w = SHAPINGS[method](loss)
    return jnp.where(any_finite, w, jnp.zeros_like(w))
