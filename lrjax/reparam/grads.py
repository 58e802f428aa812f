"""Mean gradients of selected leaves, the data of data-aware adapter inits (LoRA-GA, LoRA-SB).

.. math::  G_\\ell = \\frac{1}{T}\\sum_{t=1}^{T} \\frac{\\partial L(\\theta, \\text{batch}_t)}{\\partial W_\\ell}

for every targeted leaf :math:`W_\\ell` of ``params``. Only the targeted leaves are
differentiated (the rest of ``params`` is a constant of the traced function), so no full-model
gradient is ever held when the targets are a subset; the running sum is kept in
``promote_types(leaf dtype, float32)``. The result is the ``grads=`` argument of
:meth:`lrjax.reparam.Reparam.init` for variants with ``needs_grads = True``.

LoRA-GA's official code averages per-batch gradients in float32 (``estimate_gradient``); LoRA-SB's
sums them and keeps only the sign, which the mean determines as well.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from lrjax import _validation as V
from lrjax import tree as tree_lib

__all__ = ["estimate_grads"]


def _floating(path, leaf) -> bool:
    return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)


def _grad_of_targets(loss_fn, paths, params, batch):
    sub = {p: tree_lib.flatten(params)[p] for p in paths}

    def f(s):
        loss = loss_fn(tree_lib.replace(params, s), batch)
        if not hasattr(loss, "shape") or tuple(loss.shape) != () or not jnp.issubdtype(loss.dtype, jnp.floating):
            raise TypeError(f"loss_fn must return a floating scalar loss, got "
                            f"{getattr(loss, 'dtype', type(loss).__name__)}{tuple(getattr(loss, 'shape', ()))}")
        return loss

    g = jax.grad(f)(sub)
    return {p: g[p].astype(V.compute_dtype(g[p].dtype)) for p in paths}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _step(loss_fn, paths, acc, params, batch):
    g = _grad_of_targets(loss_fn, paths, params, batch)
    return {p: acc[p] + g[p] for p in paths}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _scan_mean(loss_fn, paths, params, batches):
    flat = tree_lib.flatten(params)
    acc0 = {p: jnp.zeros(flat[p].shape, V.compute_dtype(flat[p].dtype)) for p in paths}

    def body(acc, batch):
        g = _grad_of_targets(loss_fn, paths, params, batch)
        return {p: acc[p] + g[p] for p in paths}, None

    acc, _ = jax.lax.scan(body, acc0, batches)
    n = jax.tree_util.tree_leaves(batches)[0].shape[0]
    return {p: acc[p] / n for p in paths}


def estimate_grads(loss_fn: Callable[[Any, Any], jax.Array], params, batches, targets: Any = "kernel", *,
                   stacked: bool = False) -> dict[str, jax.Array]:
    """Mean gradient ``{path: mean_t dL(params, batch_t)/dW}`` of the targeted leaves only.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` (floating, 0-d). Traced once per batch shape.
      params: the model's pytree of arrays (dicts, linen params, ``nnx.State``).
      batches: the batches to average over. A ``list`` (or any non-tuple iterable) of batches,
        each passed to ``loss_fn`` as is, run through one compiled step each; or, with
        ``stacked=True``, one pytree of arrays whose leaves share a leading axis ``T`` (batch
        ``t`` is ``tree_map(lambda x: x[t], batches)``), averaged in a single ``lax.scan`` -- that
        form also runs inside an outer ``jax.jit`` (e.g. together with a data-aware ``init``).
      targets: which leaves (a regex, list of regexes or ``(path, leaf) -> bool``, as in
        :class:`lrjax.reparam.Reparam`; pass ``rp.targets``). Only floating leaves are selected.
      stacked: see ``batches``.

    Returns:
      ``{path: G}`` in each leaf's layout and shape, dtype ``promote_types(leaf, float32)``; the
      ``grads=`` of a data-aware :meth:`~lrjax.reparam.Reparam.init`.

    Raises:
      TypeError: ``loss_fn`` not callable or not returning a floating scalar; ``batches`` a
        tuple with ``stacked=False`` (ambiguous: one ``(x, y)`` batch or two batches? pass a list,
        or ``stacked=True``); ``stacked`` not a bool.
      ValueError: no batches; stacked leaves without a common leading axis; ``targets`` matching
        no floating leaf; concrete gradients with NaN/Inf (named by leaf).
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable loss_fn(params, batch) -> scalar, got {type(loss_fn).__name__}")
    V.check_bool(stacked, "stacked")
    V.check_params(params, "params")
    from lrjax.reparam.base import Reparam
    if isinstance(targets, Reparam):
        targets = targets.targets
    paths = tuple(tree_lib.select(params, targets, where=_floating))
    if stacked:
        leaves = jax.tree_util.tree_leaves(batches)
        if not leaves:
            raise ValueError("batches: stacked=True needs a pytree of arrays with a leading axis T >= 1; got no leaves")
        sizes = {int(np.shape(x)[0]) if np.ndim(x) >= 1 else None for x in leaves}
        if None in sizes or len(sizes) != 1:
            raise ValueError(f"batches: with stacked=True every leaf needs the same leading axis T (batch index); "
                             f"got leading sizes {sorted(s for s in sizes if s is not None)}"
                             + (" and 0-d leaves" if None in sizes else ""))
        if sizes == {0}:
            raise ValueError("batches: stacked=True with T = 0 batches; pass at least one batch")
        out = _scan_mean(loss_fn, paths, params, batches)
    else:
        if isinstance(batches, tuple):
            raise TypeError("batches is a tuple: pass a list of batches ([(x1, y1), (x2, y2), ...]), or one "
                            "pytree of arrays with a leading batch-index axis and stacked=True")
        if isinstance(batches, (jax.Array, np.ndarray)) or not isinstance(batches, Iterable):
            raise TypeError(f"batches must be a list (or iterable) of batches, or stacked=True for arrays with a "
                            f"leading batch-index axis; got {type(batches).__name__}")
        flat = tree_lib.flatten(params)
        acc = {p: jnp.zeros(flat[p].shape, V.compute_dtype(flat[p].dtype)) for p in paths}
        n = 0
        for batch in batches:
            acc = _step(loss_fn, paths, acc, params, batch)
            n += 1
        if n == 0:
            raise ValueError("batches is empty; pass at least one batch")
        out = {p: acc[p] / n for p in paths}
    for p, g in out.items():
        if V.is_concrete(g) and not bool(jnp.all(jnp.isfinite(g))):
            raise ValueError(f"loss_fn gave NaN/Inf gradients for leaf {p!r}; check the loss and the batches")
    return out
