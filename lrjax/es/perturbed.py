"""Perturbed forward passes: ``x (W + sigma A B^T / sqrt(r))`` computed as
``x W + (sigma / sqrt(r)) (x A) B^T``, never forming the perturbed matrix.

Two ways to use it.

1. **Unmodified models** -- :func:`perturbed_call` evaluates any ``fn(params, *args)`` (a linen
   ``model.apply``, an NNX ``merge``-and-call, plain JAX) with some leaves perturbed by
   :class:`~lrjax.es.noise.LowRankNoise` and others by a dense additive array. It runs on the jaxpr
   interpreter of :mod:`lrjax.interpreter` (``interpret``): ``fn`` is traced once, each
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

from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrjax import _validation as V
from lrjax import axes as axes_lib
from lrjax import tree as tree_lib
from lrjax.es.noise import LowRankNoise
from lrjax.interpreter import FactoredStats, LowRank, interpret

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
    if not callable(fn):
        raise TypeError(f"fn must be callable (fn(params, *args)), got {type(fn).__name__}")
    if stats is not None and not isinstance(stats, FactoredStats):
        raise TypeError(f"stats must be a lrjax.es.FactoredStats or None, got {type(stats).__name__}")
    if not isinstance(noise, Mapping):
        raise TypeError(f"noise must be a dict {{path: LowRankNoise | array}} (Eggroll.member_noise), "
                        f"got {type(noise).__name__}")
    if params is None or isinstance(params, (str, bytes)):
        raise TypeError(f"params must be a pytree of arrays, got {type(params).__name__}")
    flat = tree_lib.flatten(params)
    unknown = set(noise) - set(flat)
    if unknown:
        raise ValueError(f"noise: no leaf at path {sorted(unknown)[0]!r}; params have {list(flat)[:8]}")
    subst = {}
    for k, nz in noise.items():
        v = flat[k]
        if not isinstance(v, _ARRAY):
            raise TypeError(f"params: leaf {k!r} is a {type(v).__name__}, not an array")
        if isinstance(nz, LowRankNoise):
            ax = axes_lib.resolve(k, v.shape, axes)
            _check_lowrank(nz, axes_lib.matrix_shape(tuple(v.shape), ax), f"noise[{k!r}]")
            subst[k] = LowRank(v, nz.a, jnp.swapaxes(nz.b, -1, -2), nz.scale, None, ax, k, "factored")
        elif nz is not None:
            nz = V.check_array(nz, f"noise[{k!r}]", kind="floating")
            if tuple(nz.shape) != tuple(v.shape):
                raise ValueError(f"noise[{k!r}] must have the leaf's shape {tuple(v.shape)}, got {tuple(nz.shape)}")
            subst[k] = (v + nz.astype(v.dtype)).astype(v.dtype)
    # ES never differentiates through the forward: the plain factored products are cheapest.
    return interpret(fn, params, subst, args, stats=stats)


_ARRAY = (jax.Array, np.ndarray, np.generic, jax.core.Tracer)


def _check_lowrank(nz, view, name):
    """``nz`` (a LowRankNoise) must fit the matrix view ``(batch, M, N)``."""
    bshape, m, n = view
    for part, size in (("a", m), ("b", n)):
        arr = V.check_array(getattr(nz, part), f"{name}.{part}", kind="floating")
        if arr.ndim < 2 or tuple(arr.shape[:-1]) != (*bshape, size):
            raise ValueError(f"{name}.{part} must have shape {(*bshape, size, 'r')} for a matrix view "
                             f"{(*bshape, m, n)}, got {tuple(arr.shape)}")
    if nz.a.shape[-1] != nz.b.shape[-1]:
        raise ValueError(f"{name}: a and b must have the same rank (last axis), got {nz.a.shape[-1]} and {nz.b.shape[-1]}")
    if not isinstance(nz.scale, (*_ARRAY, int, float)) or isinstance(nz.scale, bool) or np.ndim(nz.scale) != 0:
        raise TypeError(f"{name}.scale must be a real scalar, got {nz.scale!r}")


def _check_noise_arg(noise, name="noise"):
    if noise is not None and not isinstance(noise, LowRankNoise):
        raise TypeError(f"{name} must be a LowRankNoise (Eggroll.member_noise) or None, got {type(noise).__name__}")


# ------------------------------------------------------------------ explicit layers
def lowrank_dense(x, kernel, noise: LowRankNoise | None = None, bias=None, bias_noise=None):
    """``x @ (kernel + scale a b^T) + (bias + bias_noise)`` for a ``[in, out]`` kernel, as
    ``x @ kernel + scale (x @ a) @ b^T``: cost ``O(b m n)`` shared plus ``O(b r (m + n))``.

    ``x``: ``[..., in]``; ``kernel``: ``[in, out]``; ``noise``: ``LowRankNoise(a [in, r], b [out,
    r], scale)`` or ``None``; ``bias``, ``bias_noise``: ``[out]`` or ``None`` (``bias_noise``
    needs ``bias``)."""
    x = V.check_array(x, "x", min_ndim=1, kind="numeric")
    kernel = V.check_array(kernel, "kernel", ndim=2, kind="floating")
    if x.shape[-1] != kernel.shape[0]:
        raise ValueError(f"x must have a trailing axis of size {kernel.shape[0]} (kernel is "
                         f"{tuple(kernel.shape)}), got shape {tuple(x.shape)}")
    _check_noise_arg(noise)
    if noise is not None:
        _check_lowrank(noise, ((), *kernel.shape), "noise")
    if bias is not None:
        bias = V.check_array(bias, "bias", ndim=1, kind="floating")
        if bias.shape[0] != kernel.shape[1]:
            raise ValueError(f"bias must have shape ({kernel.shape[1]},), got {tuple(bias.shape)}")
    if bias_noise is not None:
        if bias is None:
            raise ValueError("bias_noise is given but bias is None; pass the bias it perturbs")
        bias_noise = V.check_array(bias_noise, "bias_noise", kind="floating")
        if bias_noise.shape != bias.shape:
            raise ValueError(f"bias_noise must have shape {tuple(bias.shape)}, got {tuple(bias_noise.shape)}")
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
    if not isinstance(spec, str):
        raise TypeError(f"spec must be an einsum string such as 'bd,dk->bk', got {type(spec).__name__}")
    if not isinstance(path, str):
        raise TypeError(f"path must be a str (the leaf's path, for its default matrix view), got {type(path).__name__}")
    x = V.check_array(x, "x", kind="numeric")
    kernel = V.check_array(kernel, "kernel", min_ndim=2, kind="floating")
    _check_noise_arg(noise)
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
        in_features = V.check_int(in_features, "in_features", low=1)
        out_features = V.check_int(out_features, "out_features", low=1)
        use_bias = V.check_bool(use_bias, "use_bias")
        dtype = V.check_dtype(dtype, "dtype")
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"rngs must be an nnx.Rngs (e.g. nnx.Rngs(0)), got {type(rngs).__name__}")
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None

    def __call__(self, x, noise: dict | None = None):
        if noise is not None and not isinstance(noise, Mapping):
            raise TypeError(f"noise must be this layer's dict {{'kernel': LowRankNoise, 'bias': array}} "
                            f"or None, got {type(noise).__name__}")
        noise = noise or {}
        bias = None if self.bias is None else self.bias[...]
        return lowrank_dense(x, self.kernel[...], noise.get("kernel"), bias, noise.get("bias"))
