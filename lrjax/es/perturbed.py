"""Perturbed forward passes: ``x (W + sigma A B^T / sqrt(r))`` computed as
``x W + (sigma / sqrt(r)) (x A) B^T``, never forming the perturbed matrix.

Two ways to use it.

1. **Unmodified models** -- :func:`perturbed_call` evaluates any ``fn(params, *args)`` (a linen
   ``model.apply``, an NNX ``merge``-and-call, plain JAX) with some leaves perturbed by
   :class:`~lrjax.es.noise.LowRankNoise` and others by a dense additive array. It reuses the jaxpr
   interpreter idea of :mod:`lrjax.reparam.factored`: ``fn`` is traced once, each low-rank leaf is
   bound to a symbolic ``(W, A, B, scale)`` value, and every ``dot_general`` that contracts the
   leaf's input axes becomes ``x W + scale (x A) B^T``. In addition to what ``factored`` handles,
   this interpreter follows stacked ``[L, m, n]`` leaves into ``lax.scan`` bodies (``nn.scan`` /
   ``nnx.scan`` layer stacks) and transposed 2-D kernels (``x @ W.T``). Any other use of a
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

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore
from flax import nnx

from lrjax import axes as axes_lib
from lrjax import tree as tree_lib
from lrjax.es.noise import LowRankNoise
from lrjax.reparam.factored import FactoredStats, _dot_factored, _LowRank

__all__ = ["perturbed_call", "lowrank_dense", "lowrank_einsum", "PerturbedLinear", "FactoredStats"]

_INLINE = {"pjit", "jit", "closed_call", "core_call"}


def _shift(ax: axes_lib.Axes) -> axes_lib.Axes:
    """Axes of a leaf after its leading (scanned) axis is sliced off."""
    dec = lambda t: tuple(i - 1 for i in t)  # noqa: E731
    return axes_lib.Axes(dec(ax.batch[1:]), dec(ax.inp), dec(ax.out))


def _scan(eqn, invals, stats):
    """``lax.scan`` with low-rank leaves among its inputs: closed-over ones (a recurrent cell's
    weights) enter the body unchanged; scanned stacked ones are scanned as ``(W, A, B)`` slices and
    rebuilt in the body. ``None`` (fallback) when a low-rank value is in the carry."""
    p = eqn.params
    nc, nk = p["num_consts"], p["num_carry"]
    consts, init, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]
    if any(isinstance(v, _LowRank) for v in init):
        return None  # a perturbed leaf in the carry changes every step: materialize
    for v in xs:
        if isinstance(v, _LowRank) and (v.ax.batch[:1] != (0,) or v.c is not None):
            return None
    body = p["jaxpr"]
    flat = [(v.w, v.a, v.b) if isinstance(v, _LowRank) else v for v in xs]

    def step(carry, xslice):
        rebuilt = [_LowRank(s[0], s[1], s[2], v.scale, None, _shift(v.ax)) if isinstance(v, _LowRank) else s
                   for v, s in zip(xs, xslice)]
        outs = _eval(body.jaxpr, body.consts, list(consts) + list(carry) + rebuilt, stats)
        return outs[:nk], outs[nk:]

    carry, ys = lax.scan(step, list(init), flat, length=p["length"], reverse=p["reverse"],
                         unroll=p["unroll"])
    return list(carry) + list(ys)


def _transpose(lr: _LowRank, perm):
    if lr.ax.batch or lr.w.ndim != 2 or tuple(perm) != (1, 0) or lr.c is not None:
        return None
    return _LowRank(lr.w.T, jnp.swapaxes(lr.b, -1, -2), jnp.swapaxes(lr.a, -1, -2), lr.scale, None,
                    axes_lib.Axes((), (0,), (1,)))


def _eval(jaxpr, consts, args, stats: FactoredStats):
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    def concrete(x, why):
        if isinstance(x, _LowRank):
            stats.fallback.append(why)
            return x.materialize()
        return x

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        out = None
        if any(isinstance(x, _LowRank) for x in invals):
            if name == "dot_general" and isinstance(invals[1], _LowRank) and not isinstance(invals[0], _LowRank):
                out = _dot_factored(invals[0], invals[1], eqn.params, eqn.outvars[0].aval)
                if out is not None:
                    stats.factored += 1
            elif name == "convert_element_type":
                out = invals[0].astype(eqn.params["new_dtype"])
            elif name in ("copy", "copy_p"):
                out = invals[0]
            elif name == "transpose":
                out = _transpose(invals[0], eqn.params["permutation"])
            elif name == "scan":
                out = _scan(eqn, invals, stats)
            elif name in _INLINE and "jaxpr" in eqn.params:
                inner = eqn.params["jaxpr"]
                ij, ic = (inner.jaxpr, inner.consts) if hasattr(inner, "jaxpr") else (inner, ())
                out = _eval(ij, ic, invals, stats)
        if out is None:
            invals = [concrete(x, name) for x in invals]
            with eqn.ctx.manager:
                out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
        if eqn.primitive.multiple_results:
            for v, o in zip(eqn.outvars, out):
                env[v] = o
        else:
            env[eqn.outvars[0]] = out
    return [concrete(read(v), "output") for v in jaxpr.outvars]


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
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = [tree_lib.path_str(p) for p, _ in leaves]
    vals = [v for _, v in leaves]
    unknown = set(noise) - set(keys)
    if unknown:
        raise ValueError(f"noise: no leaf at path {sorted(unknown)[0]!r}; params have {keys[:8]}")
    arg_leaves, arg_tree = jax.tree_util.tree_flatten(args)

    def flat_fn(leaf_vals, arg_vals):
        return fn(jax.tree_util.tree_unflatten(treedef, leaf_vals), *jax.tree_util.tree_unflatten(arg_tree, arg_vals))

    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(vals, arg_leaves)
    inputs = []
    for k, v in zip(keys, vals):
        nz = noise.get(k)
        if isinstance(nz, LowRankNoise):
            ax = axes_lib.resolve(k, v.shape, axes)
            inputs.append(_LowRank(v, nz.a, jnp.swapaxes(nz.b, -1, -2), nz.scale, None, ax))
        elif nz is not None:
            inputs.append((v + nz.astype(v.dtype)).astype(v.dtype))
        else:
            inputs.append(v)
    st = stats if stats is not None else FactoredStats()
    outs = _eval(closed.jaxpr, closed.consts, inputs + list(arg_leaves), st)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)


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
