"""Unmaterialized low-rank forward: ``x W + s (x A) B`` without forming ``W + s A B``.

``factored(fn, rp)`` turns any function ``fn(params, *args)`` -- a linen ``model.apply``, an
NNX ``lambda state, x: nnx.merge(graphdef, state)(x)``, a plain function -- into
``g(base, adapters, *args)`` that equals ``fn(rp.materialize(base, adapters), *args)`` but
computes every matrix product with a targeted kernel in factored form.

Mechanism (a jaxpr transform): ``fn`` is traced once to a jaxpr (at trace time, so under
``jit`` it costs nothing per step); an interpreter then re-evaluates it with each targeted
leaf bound to a symbolic low-rank value ``(W, A, B, s, c)``. A ``dot_general`` that contracts
exactly the leaf's input axes (see :mod:`lrjax.axes`) with the kernel on the right becomes
``(dot(x, W) + s dot(dot(x, A), B)) * c``; dtype casts of the kernel are applied to the factors;
``pjit``/``closed_call`` bodies are inlined so the value is followed through nested calls;
stacked ``[L, in, out]`` kernels are followed into ``lax.scan`` bodies (``nn.scan`` stacks) and a
transposed 2-D kernel stays low-rank. A ``conv_general_dilated`` with a conv kernel
``[*window, C_in, C_out]`` in the default view (Flax ``nn.Conv``, 1-D/2-D/3-D, any strides, padding
and dilations, ``feature_group_count == batch_group_count == 1``) becomes
``(conv(x, K) + s conv_1x1(conv_kxk(x, A), B)) * c`` (PEFT's conv LoRA form, see
:mod:`lrjax.reparam.conv`). Any other use of the kernel (a grouped conv, a kernel on the left of
an einsum, a DoRA stack inside a scan, a variant with its own matrix view such as ConvLoRA)
falls back to the materialized weight for that use only -- always correct, never silently wrong.

Precision: the fallback's materialized weight follows lrjax's one-rounding rule (computed in
``promote_types(w, factors, float32)``, rounded once to the kernel's dtype), so it equals
:meth:`Reparam.materialize` bit for bit. The factored product itself runs in the kernel's dtype
(factors cast to it), as the dense product it replaces would; its values equal the materialized
path's to the output dtype's rounding.

Why this instead of module surgery or method interception: it needs no knowledge of the model
code or the Flax API generation (linen, NNX and plain JAX all lower to ``dot_general``), and the
adapters stay the same flat pytree the rest of lrjax uses. The payoff is in the backward pass:
the frozen ``W`` gets no gradient, so XLA never forms the ``[M, N]`` ``x^T dy`` product that the
materialized path needs to push a gradient into ``A`` and ``B``; peak memory holds no per-layer
``W + sAB`` copy. DoRA still forms ``W + sAB`` once per step to take its (detached) column norm,
exactly as PEFT does; the product itself stays factored.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from lrjax import _validation as V
from lrjax import axes as axes_lib
from lrjax import tree as tree_lib

__all__ = ["factored", "FactoredStats"]


class _LowRank:
    """A targeted kernel in symbolic form: leaf value ``w`` (leaf layout) plus its factors."""

    __slots__ = ("w", "a", "b", "scale", "c", "ax")

    def __init__(self, w, a, b, scale, c, ax):
        self.w, self.a, self.b, self.scale, self.c, self.ax = w, a, b, scale, c, ax

    def materialize(self):
        """``(W + s A B) * c`` in ``promote_types(w, a, b, c, float32)``, rounded once to ``w.dtype``."""
        wm = axes_lib.to_matrix(self.w, self.ax)
        cd = V.compute_dtype(self.w.dtype, self.a.dtype, self.b.dtype,
                             *(() if self.c is None else (self.c.dtype,)))
        v = wm.astype(cd) + self.scale * (self.a.astype(cd) @ self.b.astype(cd))
        if self.c is not None:
            v = v * self.c[..., None, :].astype(cd)
        return axes_lib.from_matrix(v.astype(self.w.dtype), self.ax, self.w.shape)

    def astype(self, dtype):
        return _LowRank(self.w.astype(dtype), self.a.astype(dtype), self.b.astype(dtype), self.scale,
                        None if self.c is None else self.c.astype(dtype), self.ax)


class FactoredStats:
    """Counts of kernel uses handled factored vs by fallback (filled at trace time)."""

    def __init__(self):
        self.factored = 0
        self.fallback: list[str] = []


_PASSTHROUGH_CALLS = {"pjit", "jit", "closed_call", "core_call"}


def _dot_factored(x, lr: _LowRank, params, out_aval, mode: str):
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    ax = lr.ax
    if ax.batch or lb or rb or tuple(rc) != tuple(ax.inp):
        return None
    free = tuple(i for i in range(lr.w.ndim) if i not in rc)
    if free != tuple(ax.out):
        return None
    in_shape = tuple(lr.w.shape[i] for i in ax.inp)
    out_shape = tuple(lr.w.shape[i] for i in ax.out)
    r = lr.a.shape[-1]
    dt = lr.w.dtype
    dn = params["dimension_numbers"]
    pet = params.get("preferred_element_type")
    s = lr.scale

    def lowrank(x, a, b):  # s (x A) B, contracted in factored form
        xa = lax.dot_general(x, a.reshape(in_shape + (r,)), ((tuple(lc), tuple(range(len(in_shape)))), ((), ())),
                             preferred_element_type=pet)
        return s * lax.dot_general(xa.astype(dt), b.reshape((r,) + out_shape), (((xa.ndim - 1,), (0,)), ((), ())),
                                   preferred_element_type=pet)

    def dot(x, w):
        return lax.dot_general(x, w, dn, precision=params.get("precision"), preferred_element_type=pet)

    a, b = lr.a.astype(dt), lr.b.astype(dt)
    tokens = x.size // max(1, int(np.prod([x.shape[i] for i in lc])))
    m = int(np.prod(in_shape))
    if lr.c is None and (mode == "fused" or (mode == "auto" and tokens >= m)):
        y = _fused(dot, lowrank, ax, lr.w.shape, s)(x, lr.w, a, b)
    else:
        y = dot(x, lr.w)
        y = y + lowrank(x, a, b).astype(y.dtype)
    if lr.c is not None:
        y = y * lr.c.reshape(out_shape).astype(y.dtype)
    return y.astype(out_aval.dtype)


def _fused(dot, lowrank, ax, shape, s):
    """``x (W + sAB)`` with ``W + sAB`` formed transiently in the forward *and* recomputed in the
    backward (never held across the step), and the adapter cotangents taken in factored form:
    ``dA = s x^T (dy B^T)``, ``dB = s (xA)^T dy``. The cotangent of ``W`` (``x^T dy``) is returned
    for correctness and removed by XLA's dead-code elimination when ``W`` is frozen."""

    def weff(w, a, b):
        return w + (s * axes_lib.from_matrix(a @ b, ax, shape)).astype(w.dtype)

    @jax.custom_vjp
    def f(x, w, a, b):
        return dot(x, weff(w, a, b))

    def f_fwd(x, w, a, b):
        return f(x, w, a, b), (x, w, a, b)

    def f_bwd(res, dy):
        x, w, a, b = res
        we = weff(w, a, b)
        dx, = jax.vjp(lambda x_: dot(x_, we), x)[1](dy)
        dw, = jax.vjp(lambda w_: dot(x, w_), w)[1](dy)
        da, db = jax.vjp(lambda a_, b_: lowrank(x, a_, b_), a, b)[1](dy.astype(dy.dtype))
        return dx, dw, da, db

    f.defvjp(f_fwd, f_bwd)
    return f


def _conv_factored(eqn, x, lr: _LowRank):
    """``conv(x, K) + s conv_1x1(conv_kxk(x, A), B)`` (times ``c`` per output channel) for a conv
    kernel ``K: [*window, C_in, C_out]`` in the default :mod:`lrjax.axes` view (``A: [prod(window)
    C_in, r]`` is a ``[*window, C_in, r]`` kernel run with the base's strides, padding, dilations
    and layout; ``B: [r, C_out]`` is a ``1 x 1`` conv, computed as a contraction over the feature
    axis). Exact because every output position of a convolution is a linear map of the gathered
    input window. ``None`` (materialized fallback) for grouped convs (``feature_group_count`` or
    ``batch_group_count`` != 1), a stacked or permuted kernel view, or a ``dimension_numbers``
    kernel spec other than ``[*window, in, out]``."""
    p = eqn.params
    n = lr.w.ndim
    if lr.ax != axes_lib.Axes((), tuple(range(n - 1)), (n - 1,)) or n < 3:
        return None
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        return None
    dn = p["dimension_numbers"]
    if tuple(dn.rhs_spec) != (n - 1, n - 2) + tuple(range(n - 2)):
        return None
    bind = eqn.primitive.get_bind_params(p)

    def conv(lhs, kernel):
        with eqn.ctx.manager:
            return eqn.primitive.bind(lhs, kernel, **bind)

    dt = lr.w.dtype
    r = lr.a.shape[-1]
    a = lr.a.astype(dt).reshape(lr.w.shape[:-1] + (r,))
    b = lr.b.astype(dt)
    fo = dn.out_spec[1]  # the feature axis of the output
    y = conv(x, lr.w)
    xa = conv(x, a).astype(dt)
    low = lax.dot_general(xa, b, (((fo,), (0,)), ((), ())), preferred_element_type=p.get("preferred_element_type"))
    low = jnp.moveaxis(low, -1, fo)
    y = y + (lr.scale * low).astype(y.dtype)
    if lr.c is not None:
        shape = [1] * y.ndim
        shape[fo] = lr.c.shape[-1]
        y = y * lr.c.reshape(shape).astype(y.dtype)
    return y.astype(eqn.outvars[0].aval.dtype)


def _shift(ax: axes_lib.Axes) -> axes_lib.Axes:
    """Axes of a leaf after its leading (scanned) axis is sliced off."""
    dec = lambda t: tuple(i - 1 for i in t)  # noqa: E731
    return axes_lib.Axes(dec(ax.batch[1:]), dec(ax.inp), dec(ax.out))


def _scan(eqn, invals, stats, mode):
    """``lax.scan`` with low-rank leaves among its inputs: closed-over ones (a recurrent cell's
    weights) enter the body unchanged; scanned ``[L, in, out]`` stacks are scanned as ``(W, A, B)``
    slices and rebuilt in the body. ``None`` (fallback) when a low-rank value is in the carry or a
    stack carries a column scale (DoRA)."""
    p = eqn.params
    nc, nk = p["num_consts"], p["num_carry"]
    consts, init, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]
    if any(isinstance(v, _LowRank) for v in init):
        return None
    for v in xs:
        if isinstance(v, _LowRank) and (v.ax.batch[:1] != (0,) or v.c is not None):
            return None
    body = p["jaxpr"]
    flat = [(v.w, v.a, v.b) if isinstance(v, _LowRank) else v for v in xs]

    def step(carry, xslice):
        rebuilt = [_LowRank(sl[0], sl[1], sl[2], v.scale, None, _shift(v.ax)) if isinstance(v, _LowRank) else sl
                   for v, sl in zip(xs, xslice)]
        outs = _eval(body.jaxpr, body.consts, list(consts) + list(carry) + rebuilt, stats, mode)
        return outs[:nk], outs[nk:]

    carry, ys = lax.scan(step, list(init), flat, length=p["length"], reverse=p["reverse"], unroll=p["unroll"])
    return list(carry) + list(ys)


def _transpose(lr: _LowRank, perm):
    """``W^T`` of a plain 2-D kernel stays low-rank: ``(W + sAB)^T = W^T + s B^T A^T``."""
    if lr.ax.batch or lr.w.ndim != 2 or tuple(perm) != (1, 0) or lr.c is not None:
        return None
    return _LowRank(lr.w.T, jnp.swapaxes(lr.b, -1, -2), jnp.swapaxes(lr.a, -1, -2), lr.scale, None,
                    axes_lib.Axes((), (0,), (1,)))


def _eval(jaxpr, consts, args, stats: FactoredStats, mode: str):
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
        has_lr = any(isinstance(x, _LowRank) for x in invals)
        out = None
        if has_lr:
            if name == "dot_general" and not isinstance(invals[0], _LowRank) and isinstance(invals[1], _LowRank):
                out = _dot_factored(invals[0], invals[1], eqn.params, eqn.outvars[0].aval, mode)
                if out is not None:
                    stats.factored += 1
            elif name == "conv_general_dilated" and not isinstance(invals[0], _LowRank) \
                    and isinstance(invals[1], _LowRank):
                out = _conv_factored(eqn, invals[0], invals[1])
                if out is not None:
                    stats.factored += 1
            elif name == "convert_element_type" and isinstance(invals[0], _LowRank):
                out = invals[0].astype(eqn.params["new_dtype"])
            elif name in ("copy", "copy_p") and isinstance(invals[0], _LowRank):
                out = invals[0]
            elif name == "transpose" and isinstance(invals[0], _LowRank):
                out = _transpose(invals[0], eqn.params["permutation"])
            elif name == "scan":
                out = _scan(eqn, invals, stats, mode)
            elif name in _PASSTHROUGH_CALLS and "jaxpr" in eqn.params:
                inner = eqn.params["jaxpr"]
                ij, ic = (inner.jaxpr, inner.consts) if hasattr(inner, "jaxpr") else (inner, ())
                out = _eval(ij, ic, invals, stats, mode)
        if out is None:
            invals = [concrete(x, name) for x in invals]
            bind_params = eqn.primitive.get_bind_params(eqn.params)
            with eqn.ctx.manager:
                out = eqn.primitive.bind(*invals, **bind_params)
        if eqn.primitive.multiple_results:
            for v, o in zip(eqn.outvars, out):
                env[v] = o
        else:
            env[eqn.outvars[0]] = out
    return [concrete(read(v), "output") for v in jaxpr.outvars]


def factored(fn: Callable[..., Any], rp, *, mode: str = "auto", stats: FactoredStats | None = None):
    """Wrap ``fn(params, *args)`` into ``g(base, adapters, *args)`` computing low-rank products
    factored. ``args`` must be pytrees of arrays (close over static options). Values equal
    ``fn(rp.materialize(base, adapters), *args)`` up to floating-point reassociation.

    ``mode`` picks how a matched product is computed (values are the same):

    * ``"factored"``: ``x W + s (x A) B`` forward; the backward is what autodiff gives
      (``dx = dy W^T + s (dy B^T) A^T``, ``dA``/``dB`` from the small products). Cheapest when
      the step has fewer tokens than the kernel has inputs (``tokens < M``).
    * ``"fused"``: a ``custom_vjp`` that forms ``W + sAB`` transiently in the forward and again in
      the backward (``O(MNr)``, cheap next to ``O(tokens M N)`` when ``tokens >= M``), runs one
      dense product each way, and takes ``dA = s x^T (dy B^T)``, ``dB = s (xA)^T dy`` in factored
      form. It saves the two token-sized low-rank products and adds per layer. No ``W + sAB`` is
      held across the step. Not forward-mode differentiable (``jax.jvp``); DoRA always uses
      ``"factored"``.
    * ``"auto"`` (default): ``"fused"`` where ``tokens >= M``, else ``"factored"``.

    A convolution with an adapted kernel is always computed as ``conv(x, K) + s conv_1x1(conv_kxk(x,
    A), B)`` (see the module docstring); ``mode`` applies to ``dot_general`` uses. Each factored
    convolution counts in ``stats.factored`` like a factored product.

    Pass a :class:`FactoredStats` to see how many kernel uses were factored vs fell back; it
    accumulates over every trace of ``g`` (one jitted train step and one eval step count twice).
    """
    from lrjax.reparam.base import Reparam

    if not callable(fn):
        raise TypeError(f"fn must be a callable fn(params, *args) such as a linen model.apply, got "
                        f"{type(fn).__name__} {fn!r:.60}")
    if not isinstance(rp, Reparam):
        raise TypeError(f"rp must be a reparameterization config such as lrjax.LoRA(rank=8), got "
                        f"{type(rp).__name__} {rp!r:.60}" + ("; build it with lrjax.LoRA(...) rather than "
                                                              "naming it" if isinstance(rp, str) else ""))
    V.check_choice(mode, "mode", ("auto", "factored", "fused"))
    if stats is not None and not isinstance(stats, FactoredStats):
        raise TypeError(f"stats must be None or an lrjax.reparam.FactoredStats(), got {type(stats).__name__}")

    @functools.wraps(fn)
    def g(base, adapters, *args):
        flat = rp._check(base, adapters, basename="base")
        _check_args(args)
        lowrank = {}
        for k, f in adapters.items():
            v = flat[k]
            if not rp.axes_view:  # factors in another matricization (ConvLoRA): use the dense weight
                lowrank[k] = rp.from_view(k, rp.apply_leaf(rp.to_view(k, v), f), v.shape)
                if stats is not None:
                    stats.fallback.append(f"view:{k}")
                continue
            ax = rp.leaf_axes(k, v.shape)
            form = rp.factors(axes_lib.to_matrix(v, ax), rp.frozen_view(f))
            lowrank[k] = _LowRank(v, form.a, form.b.astype(form.a.dtype), form.scale, form.col_scale, ax)
        return interpret(fn, base, lowrank, args, stats=stats, mode=mode)

    return g


def _check_args(args):
    """``args`` of a factored function: pytrees of arrays or numbers (no strings/objects)."""
    for i, a in enumerate(args):
        if isinstance(a, (list, tuple)) and a and all(
                isinstance(x, (bool, int, float, complex)) for x in jax.tree_util.tree_leaves(a)):
            raise TypeError(f"args[{i}] is a {type(a).__name__} of Python numbers, which fn would receive as "
                            "a list, not an array; wrap it with jnp.asarray(...)")
        for p, leaf in jax.tree_util.tree_flatten_with_path(a)[0]:
            if isinstance(leaf, (jax.Array, np.ndarray, jax.core.Tracer, bool, int, float, complex, np.generic)):
                continue
            where = f"args[{i}]" + (f" at {tree_lib.path_str(p)!r}" if p else "")
            raise TypeError(f"{where} must be a pytree of arrays (close over static options instead of "
                            f"passing them), got {type(leaf).__name__} {leaf!r:.40}")


def interpret(fn, params, lowrank: dict, args, *, stats: FactoredStats | None = None, mode: str = "auto"):
    """Trace ``fn(params, *args)`` once and evaluate it with the leaves named in ``lowrank``
    (``{path: _LowRank or array}``) substituted: the shared engine of :func:`factored` and of
    ``lrjax.es`` (per-member low-rank perturbations)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = [tree_lib.path_str(p) for p, _ in leaves]
    vals = [v for _, v in leaves]
    arg_leaves, arg_tree = jax.tree_util.tree_flatten(args)

    def flat_fn(leaf_vals, arg_vals):
        return fn(jax.tree_util.tree_unflatten(treedef, leaf_vals), *jax.tree_util.tree_unflatten(arg_tree, arg_vals))

    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(vals, arg_leaves)
    inputs = [lowrank.get(k, v) for k, v in zip(keys, vals)]
    st = stats if stats is not None else FactoredStats()
    outs = _eval(closed.jaxpr, closed.consts, inputs + list(arg_leaves), st, mode)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)
