"""Perturbed forward passes: ``x (W + sigma A B^T / sqrt(r))`` computed as
``x W + (sigma / sqrt(r)) (x A) B^T``, never forming the perturbed matrix.

Two ways to use it.

1. **Unmodified models** -- :func:`perturbed_call` evaluates any ``fn(params, *args)`` (a linen
   ``model.apply``, an NNX ``merge``-and-call, plain JAX) with some leaves perturbed by
   :class:`~lrjax.es.noise.LowRankNoise` and others by a dense additive array. It runs on the jaxpr
   interpreter of :mod:`lrjax.reparam.factored` (``interpret``): ``fn`` is traced once, each
   low-rank leaf is bound to a symbolic ``(W, A, B, scale)`` value, and every ``dot_general`` that
   contracts the leaf's input axes becomes ``x W + scale (x A) B^T``; stacked ``[L, m, n]`` leaves
   are followed into ``lax.scan`` bodies and transposed 2-D kernels (``x @ W.T``) stay low-rank. Any other use of a
   perturbed leaf falls back to materializing ``W + delta`` for that use only (always correct;
   :class:`~lrjax.reparam.FactoredStats` records it).

   Vmapped over members with ``params`` shared (``in_axes=None``) and the noise batched, JAX's
   batching rules turn ``x W`` into one matmul over all members' rows -- exactly batched
   inference -- while the correction costs ``O(b r (m + n))`` per member and layer.

2. **Your own Flax modules** -- :func:`lowrank_dense`, :func:`lowrank_einsum` and the NNX layer
   :class:`PerturbedLinear` take a member's noise explicitly (the official EGGROLL code threads
   noise this way); ``Eggroll.estimate(..., pass_noise=True)`` calls
   ``fitness_fn(params, noise, *args)`` with ``noise`` shaped like ``params``.
"""
from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
from flax import nnx

from lrjax import axes as axes_lib
from lrjax import tree as tree_lib
from lrjax.es.noise import LowRankNoise
from lrjax.reparam.factored import FactoredStats, _LowRank, interpret

__all__ = ["perturbed_call", "lowrank_dense", "lowrank_einsum", "PerturbedLinear", "FactoredStats"]

def perturbed_call(fn: Callable[..., Any], params, noise: dict, *args, axes: axes_lib.AxesSpec = None,
                   stats: FactoredStats | None = None):
    """``fn(params + delta, *args)`` with low-rank leaves never materialized.

    Args:
      fn: ``fn(params, *args)``; ``args`` are pytrees of arrays (close over static options).
      params: the unperturbed pytree.
      noise: ``{path: LowRankNoise}`` for low-rank leaves (``delta = scale a b^T`` in the leaf's
        matrix view under ``axes``) and ``{path: array}`` for dense additive perturbations; paths
        not listed are unperturbed. ``Eggroll.member_noise`` builds it for one member.
      axes: the matrix-view spec of :mod:`lrjax.axes` (must match the one the noise was drawn for).
      stats: optional :class:`FactoredStats` counting factored vs fallback kernel uses.

    Equals ``fn(materialized params, *args)`` up to floating-point reassociation.
    """
    flat = tree_lib.flatten(params)
    unknown = set(noise) - set(flat)
    if unknown:
        raise ValueError(f"noise: no leaf at path {sorted(unknown)[0]!r}; params have {list(flat)[:8]}")
    subst = {}
    for k, nz in noise.items():
        v = flat[k]
        if isinstance(nz, LowRankNoise):
            ax = axes_lib.resolve(k, v.shape, axes)
            subst[k] = _LowRank(v, nz.a, jnp.swapaxes(nz.b, -1, -2), nz.scale, None, ax)
        elif nz is not None:
            subst[k] = (v + nz.astype(v.dtype)).astype(v.dtype)
    # ES never differentiates through the forward: the plain factored products are cheapest.
    return interpret(fn, params, subst, args, stats=stats, mode="factored")


# ------------------------------------------------------------------ explicit layers
def lowrank_dense(x, kernel, noise: LowRankNoise | None = None, bias=None, bias_noise=None):
    """``x @ (kernel + scale a b^T) + (bias + bias_noise)`` for a ``[in, out]`` kernel, as
    ``x @ kernel + scale (x @ a) @ b^T``: cost ``O(b m n)`` shared plus ``O(b r (m + n))``."""
    y = x @ kernel
    if noise is not None:
        dt = y.dtype
        y = y + (noise.scale * ((x @ noise.a.astype(dt)) @ noise.b.astype(dt).T)).astype(dt)
    if bias is not None:
        y = y + (bias if bias_noise is None else bias + bias_noise.astype(bias.dtype))
    return y


def lowrank_einsum(spec: str, x, kernel, noise: LowRankNoise | None = None, *,
                   axes: axes_lib.Axes | None = None, path: str = "kernel"):
    """``jnp.einsum(spec, x, kernel + delta)`` with ``delta`` low-rank in the kernel's matrix view
    (``axes`` or the default view of a leaf at ``path``), computed factored when the einsum
    contracts exactly the view's input axes, else materialized."""
    if noise is None:
        return jnp.einsum(spec, x, kernel)
    return perturbed_call(lambda k, xx: jnp.einsum(spec, xx, k), kernel, {"": noise}, x,
                          axes=(axes if axes is not None else (lambda p, s: axes_lib.resolve(path, s))))


class PerturbedLinear(nnx.Module):
    """A Dense layer (``nnx.Linear`` parameter names and init) that takes an optional member noise.

    ``layer(x)`` is the plain layer; ``layer(x, noise)`` with ``noise`` this layer's slice of a
    member's noise tree (``{'kernel': LowRankNoise, 'bias': array}``, from
    ``Eggroll.member_noise``) computes ``x (W + delta_W) + b + delta_b`` in factored form.
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None

    def __call__(self, x, noise: dict | None = None):
        noise = noise or {}
        bias = None if self.bias is None else self.bias[...]
        return lowrank_dense(x, self.kernel[...], noise.get("kernel"), bias, noise.get("bias"))
