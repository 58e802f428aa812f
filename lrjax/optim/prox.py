"""Proximal soft-threshold (L1) step as an optax transformation, for CoDyRA's rank gates.

CoDyRA (Lu et al. 2024, *Adaptive Rank, Reduced Forgetting: Knowledge Retention in Continual
Learning Vision-Language Models with Dynamic Rank-Selective LoRA*, arXiv:2412.01004; official code
``Artificer-AI-Lab/CoDyRA``, ``models/codyra.py::train_model``) trains its per-rank gates ``g``
(:class:`lrjax.reparam.codyra.CoDyRA`) with a proximal-gradient method on ``L(g) + lambda ||g||_1``:
after every optimizer step it applies the proximal map of the L1 norm, the soft threshold

.. math::  \\operatorname{prox}_\\lambda(x) = \\operatorname{sign}(x)\\,\\max(|x| - \\lambda, 0),

so gates with ``|g| <= lambda`` become exactly 0 (the rank is switched off) and the others shrink
by ``lambda``. In optax this is a transformation chained *after* the base optimizer::

    opt = optax.chain(optax.adamw(5e-4, b1=0.9, b2=0.9999, weight_decay=0.0),
                      prox_soft_threshold(codyra_lambda_schedule(500, 0.005),
                                          mask=factor_mask(adapters, "g")))

It reads ``params`` to form the candidate ``x = p + u`` (``u`` the incoming update) and returns
the update ``prox_lambda(x) - p``, so that ``optax.apply_updates`` lands on ``prox_lambda(x)``:
``-p`` where ``|x| <= lambda`` (the entry lands on exactly ``+0.0``) and ``u - lambda sign(x)``
elsewhere (exactly ``u`` when ``lambda = 0``). ``lambda`` is the threshold itself (as in the
official code, where it is not multiplied by the learning rate); for the proximal-gradient step
of ``lr * lambda ||g||_1`` pass ``lam = lr * lambda``.

Official-code quirk (not reproduced): the official code thresholds in place with three masked
writes in sequence -- first it shrinks the entries above ``lambda`` by ``lambda``, then it raises
the entries below ``-lambda`` by ``lambda``, then it zeroes the entries with ``|p| < lambda``. An
entry in ``(lambda, 2 lambda)`` is shrunk into ``(0, lambda)`` by the first write and zeroed by the
third, and ``|p| = lambda`` exactly is left as is, so its effective rule is ``p -> 0`` for
``|p| < 2 lambda`` (except ``|p| = lambda``) and ``p -> p - lambda sign(p)`` for ``|p| >= 2 lambda``:
the zero set of a ``2 lambda`` threshold with the shrinkage of a ``lambda`` one. lrjax pins the
standard proximal map above (threshold and shrinkage ``lambda``).

Precision: ``x = p + u`` and the threshold are computed in ``promote_types(p, u, float32)``; the
returned update is rounded once to ``u``'s dtype.
"""
from __future__ import annotations

import math
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lrjax import _validation as V

__all__ = ["prox_soft_threshold", "SoftThresholdState", "soft_threshold", "factor_mask",
           "codyra_lambda_schedule"]


class SoftThresholdState(NamedTuple):
    """State of :func:`prox_soft_threshold`: the number of updates done (``int32`` scalar), which
    is the step passed to a ``lam`` schedule."""

    count: jax.Array


def soft_threshold(x, lam):
    """``sign(x) * max(|x| - lam, 0)`` elementwise (the proximal map of ``lam * ||x||_1``).

    Computed in ``promote_types(x, float32)`` and returned in ``x``'s dtype; ``lam >= 0``."""
    x = V.check_array(x, "x", kind="floating")
    if not isinstance(lam, (jax.Array, np.ndarray, jax.core.Tracer)):
        lam = V.check_float(lam, "lam", low=0.0)
    cd = V.compute_dtype(x.dtype)
    return _soft(x.astype(cd), jnp.asarray(lam, cd)).astype(x.dtype)


def _soft(x, lam):
    return jnp.sign(x) * jnp.maximum(jnp.abs(x) - lam, 0)


def factor_mask(adapters, keys="g") -> dict:
    """``{path: {factor: bool}}``, ``True`` for the factors named in ``keys`` (default CoDyRA's gate
    ``"g"``): the ``mask`` of :func:`prox_soft_threshold` (or of ``optax.masked``) for an adapters
    dict ``{leaf path: {factor name: array}}`` as returned by a reparameterization's ``init``.

    Raises:
      TypeError: ``adapters`` is not such a dict, or ``keys`` is not a string / tuple of strings.
      ValueError: no factor of ``adapters`` is named in ``keys`` (the mask would select nothing).
    """
    if isinstance(keys, str):
        keys = (keys,)
    if not isinstance(keys, (tuple, list)) or not keys or not all(isinstance(k, str) for k in keys):
        raise TypeError(f"keys must be a factor name such as 'g' or a tuple of names, got {V._fmt(keys)}")
    if not isinstance(adapters, Mapping):
        raise TypeError(f"adapters must be the dict {{leaf path: {{factor: array}}}} returned by init(), got "
                        f"{type(adapters).__name__}")
    out = {}
    for p, f in adapters.items():
        if not isinstance(f, Mapping):
            raise TypeError(f"adapters[{p!r}] must be a dict of factors, got {type(f).__name__}")
        out[p] = {k: k in keys for k in f}
    if not any(v for f in out.values() for v in f.values()):
        raise ValueError(f"keys: no factor named {list(keys)} in adapters (factors: "
                         f"{sorted({k for f in out.values() for k in f})}); a mask selecting nothing is a no-op")
    return out


def _check_lam(lam):
    if callable(lam):
        return lam
    return V.check_float(lam, "lam", low=0.0)


def _check_lam_value(v, count):
    if V.is_concrete(v):
        arr = np.asarray(v)
        if arr.ndim != 0:
            raise ValueError(f"lam: the schedule returned shape {arr.shape} at step {int(count)}; it must return "
                             "a scalar")
        val = float(arr)
        if not math.isfinite(val) or val < 0:
            raise ValueError(f"lam: the schedule returned {val} at step {int(count)}; a threshold must be a "
                             "finite number >= 0")


def _resolve_mask(mask, params, updates):
    """The boolean mask tree for ``updates`` (``None`` = every leaf), with its structure checked."""
    tdef = jax.tree_util.tree_structure(updates)
    if mask is None:
        return jax.tree_util.tree_unflatten(tdef, [True] * tdef.num_leaves)
    m = mask(params) if callable(mask) else mask
    mdef = jax.tree_util.tree_structure(m)
    if mdef != tdef:
        raise ValueError(f"mask: its tree structure does not match the params/updates ({mdef} vs {tdef}); "
                         "build it from the same pytree, e.g. factor_mask(adapters, 'g')")
    for leaf in jax.tree_util.tree_leaves(m):
        if not isinstance(leaf, (bool, np.bool_)):
            raise TypeError(f"mask leaves must be Python bools (True = apply the threshold), got "
                            f"{type(leaf).__name__} ({V._fmt(leaf)})")
    return m


def prox_soft_threshold(lam, *, mask=None) -> optax.GradientTransformation:
    """Proximal soft-threshold step (module doc): ``p + u -> sign(p + u) max(|p + u| - lam_t, 0)``.

    Chain it after the base optimizer (``optax.chain(adamw, prox_soft_threshold(...))``); it needs
    ``params`` in ``update``.

    Args:
      lam: the threshold ``lambda >= 0`` (a finite real), or an optax schedule ``step -> lambda``
        evaluated at this transformation's update count (0 for the first update), e.g.
        :func:`codyra_lambda_schedule`. ``lam = 0`` is the identity.
      mask: which leaves are thresholded: ``None`` (every leaf), a pytree of Python bools with the
        structure of the params (:func:`factor_mask` builds CoDyRA's gate mask), or a callable
        ``params -> that pytree``. Unmasked leaves pass their update through unchanged.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`SoftThresholdState`; works under
      ``jax.jit``.

    Raises:
      TypeError: ``lam`` not a real number or callable; mask leaves not bools; ``params`` missing.
      ValueError: ``lam`` negative, NaN or Inf (a schedule's concrete values are checked eagerly;
        under ``jit`` a negative or NaN scheduled value turns the thresholded leaves to NaN instead
        of silently growing them); ``mask`` or ``params`` of another tree structure than the updates.
    """
    lam = _check_lam(lam)
    if mask is not None and not callable(mask):
        leaves = jax.tree_util.tree_leaves(mask)
        for leaf in leaves:
            if not isinstance(leaf, (bool, np.bool_)):
                raise TypeError(f"mask must be None, a pytree of Python bools or a callable params -> mask; "
                                f"found a leaf {type(leaf).__name__} ({V._fmt(leaf)})")

    def lam_at(count):
        if callable(lam):
            v = lam(count)
            _check_lam_value(v, count)
            return v
        return lam

    def init_fn(params):
        _resolve_mask(mask, params, params)
        count = jnp.zeros([], jnp.int32)
        lam_at(count)
        return SoftThresholdState(count=count)

    def update_fn(updates, state, params=None):
        if params is None:
            raise TypeError("params: prox_soft_threshold needs the current params to threshold p + u; call "
                            "opt.update(grads, state, params)")
        pdef, udef = jax.tree_util.tree_structure(params), jax.tree_util.tree_structure(updates)
        if pdef != udef:
            raise ValueError(f"params: tree structure {pdef} does not match the updates {udef}")
        m = _resolve_mask(mask, params, updates)
        lv = lam_at(state.count)

        def one(u, p, on):
            if not on:
                return u
            cd = V.compute_dtype(p.dtype, u.dtype)
            lt = jnp.asarray(lv, cd)
            lt = jnp.where(lt >= 0, lt, jnp.nan)  # a traced negative/NaN schedule value poisons, never grows
            pc, uc = p.astype(cd), u.astype(cd)
            x = pc + uc
            # prox(x) - p, written so that a zeroed entry gets exactly -p (lands on +0.0) and a kept
            # one gets u - lam sign(x) (exactly u when lam = 0)
            return jnp.where(jnp.abs(x) <= lt, -pc, uc - lt * jnp.sign(x)).astype(u.dtype)

        new = jax.tree_util.tree_map(one, updates, params, m)
        return new, SoftThresholdState(count=optax.safe_int32_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def codyra_lambda_schedule(total_steps: int, kappa_max: float, dense_fraction: float = 0.5,
                           n_levels: int = 50) -> optax.Schedule:
    """CoDyRA's threshold schedule (official ``models/codyra.py::train_model``), as an optax schedule.

    With ``T = total_steps``, ``d = dense_fraction * T``, ``k = floor((T - d) / n_levels)`` and the
    levels ``lambda_j = linspace(0, kappa_max, n_levels)[j]``, the value at step ``t`` (0-based, the
    update count of :func:`prox_soft_threshold`) is

    * ``0`` for ``t <= d`` (the dense phase: the official code thresholds only for ``t > d``);
    * ``lambda_j`` with ``j = min(n_levels - 1, #{multiples of k in [d, t]})`` for ``t > d``: the
      level index starts at 0 and moves up by one at every multiple of ``k`` from ``d`` on.

    E.g. the official runner (``T = 500``, ``kappa_max = 0.005``): 0 up to step 250, ``0.005/49`` at
    steps 251-254, ``2 * 0.005/49`` at 255-259, ..., ``0.005`` from step 490 on. Built from
    ``optax.join_schedules`` (constant 0, then the staircase); jit-compatible.

    Args:
      total_steps: ``T``, an int ``>= 1``; ``T - d >= n_levels`` is required (``k >= 1``; the official
        code silently never thresholds otherwise).
      kappa_max: the last level, a finite real ``>= 0`` (official defaults: runner 0.005, ``main.py``
        7e-4).
      dense_fraction: ``d / T`` in ``[0, 1)`` (official ``dense_iters``, default 0.5).
      n_levels: number of levels including the initial 0, an int ``>= 2`` (official ``lambda_num``, 50).

    Raises:
      TypeError / ValueError naming the argument.
    """
    total_steps = V.check_int(total_steps, "total_steps", low=1)
    kappa_max = V.check_float(kappa_max, "kappa_max", low=0.0)
    dense_fraction = V.check_float(dense_fraction, "dense_fraction", low=0.0, high=1.0, high_open=True)
    n_levels = V.check_int(n_levels, "n_levels", low=2)
    d = dense_fraction * total_steps
    k = int((total_steps - d) // n_levels)
    if k < 1:
        raise ValueError(f"total_steps: {total_steps} steps leave {total_steps - d:g} sparse steps after the dense "
                         f"phase, fewer than n_levels={n_levels}; the threshold would never rise. Use more steps, "
                         "fewer levels or a smaller dense_fraction")
    levels = np.linspace(0.0, kappa_max, n_levels)
    first = int(math.ceil(d / k)) * k       # first multiple of k at or after d: the first level increment
    boundary = int(math.floor(d)) + 1       # first step t > d

    def staircase(s):
        t = jnp.asarray(s) + boundary       # join_schedules passes the step relative to the boundary
        j = jnp.where(t >= first, 1 + (t - first) // k, 0)
        return jnp.asarray(levels, jnp.float32)[jnp.clip(j, 0, n_levels - 1)]

    return optax.join_schedules([optax.constant_schedule(0.0), staircase], [boundary])
