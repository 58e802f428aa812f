"""Fitness shaping and the rule for non-finite fitness values.

Every function maps a raw fitness vector ``f [N]`` (in global member order) to weights ``w [N]``
that are *increasing* in the loss being minimized, so that ``g = 1/(N sigma) sum_i w_i E_i`` is the
gradient estimate of the smoothed loss, ready for an optax optimizer (evosax's convention).

* ``'centered_rank'``: ``w_i = rank(l_i) / (N - 1) - 1/2`` in ``[-1/2, 1/2]`` (Salimans et al. 2017;
  the shaping used by the EGGROLL paper's RL experiments and evosax's Open_ES default). Ties are
  broken by member id, so the weights are deterministic.
* ``'z_score'``: ``w_i = (l_i - mean(l)) / sqrt(var(l) + 1e-5)``, the default of the official
  EGGROLL code (HyperscaleES ``convert_fitnesses`` with ``group_size=0``).
* ``'none'``: ``w_i = l_i`` (the raw Monte-Carlo estimator; unbiased for the Gaussian-smoothed
  gradient, highest variance).

Non-finite rule: a ``NaN`` or ``+-inf`` fitness counts as the *worst* finite fitness of the
generation (the lowest when maximizing, the highest when minimizing) before shaping, so a member
that diverges pushes the update away from its perturbation as the worst member would, and never
turns the update into NaN. If no fitness of the generation is finite, every weight is 0 and the
update is exactly zero.
"""
from __future__ import annotations

import jax.numpy as jnp

__all__ = ["SHAPINGS", "centered_rank", "z_score", "identity", "shape_fitness", "sanitize"]

Z_SCORE_EPS = 1e-5


def centered_rank(l):
    n = l.shape[0]
    ranks = jnp.argsort(jnp.argsort(l, stable=True), stable=True).astype(jnp.float32)
    return ranks / max(n - 1, 1) - 0.5


def z_score(l):
    return (l - jnp.mean(l)) / jnp.sqrt(jnp.var(l) + Z_SCORE_EPS)


def identity(l):
    return l


SHAPINGS = {"centered_rank": centered_rank, "z_score": z_score, "none": identity}


def sanitize(fitness, maximize: bool):
    """``(loss, any_finite)``: the loss ``-f`` (maximize) or ``f``, with non-finite entries set to
    the worst finite loss (see the module docstring)."""
    f = jnp.asarray(fitness, jnp.promote_types(fitness.dtype, jnp.float32))
    loss = -f if maximize else f
    finite = jnp.isfinite(loss)
    any_finite = jnp.any(finite)
    worst = jnp.max(jnp.where(finite, loss, -jnp.inf))
    loss = jnp.where(finite, loss, jnp.where(any_finite, worst, 0.0))
    return loss, any_finite


def shape_fitness(fitness, method: str = "z_score", maximize: bool = True):
    """Weights ``w [N]`` increasing in the loss, per ``method``; all zero if nothing is finite."""
    loss, any_finite = sanitize(fitness, maximize)
    w = SHAPINGS[method](loss)
    return jnp.where(any_finite, w, jnp.zeros_like(w))
