"""The jaxpr interpreter behind lrjax's unmaterialized forward passes.

:func:`interpret` traces ``fn(params, *args)`` once to a jaxpr (at trace time, so under ``jit``
it costs nothing per step) and re-evaluates it with some leaves of ``params`` bound to a
*kernel value* (:class:`KernelValue`) instead of an array. Every primitive that touches a kernel
value asks it how to compute itself; the value answers with arrays or declines, and when it
declines the interpreter uses its dense weight (:meth:`KernelValue.materialize`) for that use only.
Two packages stand on it:

* :func:`lrjax.factored` (``lrjax.reparam``): adapters as ``x W + s (x A) B`` (:class:`LowRank`)
  or as an input-dependent branch ``x W + branch(x)`` (:class:`Branch`: routers, top-k masks,
  nonlinear branches, mixtures -- the activation-space adapters that have no weight to merge);
* :func:`lrjax.es.perturbed_call` (``lrjax.es``): EGGROLL's per-member low-rank perturbations.

Extension point
---------------
What a variant hands the interpreter for a kernel is one :class:`KernelValue`. A reparameterization
builds it in :meth:`lrjax.reparam.Reparam.kernel_value` (override that to hand in your own). A
kernel value answers, each returning ``None`` to decline:

* ``dot(x, params, out_aval)`` for ``lax.dot_general(x, kernel, **params)`` with the kernel on
  the right -- the product ``x @ W`` of every Dense/einsum layer;
* ``conv(eqn, x)`` for a ``conv_general_dilated`` with the kernel as its filter;
* ``astype(dtype)``, ``transpose(permutation)`` -- a cast or transpose of the kernel that should
  stay symbolic;
* ``scan_slices()`` -- ``(arrays, rebuild)`` when the kernel is an ``[L, ...]`` stack scanned by
  ``lax.scan`` (``nn.scan``): the interpreter scans ``arrays`` (every array with a leading ``L``
  axis) and calls ``rebuild(slices)`` in the body to get the per-layer value;
* ``materialize(why)`` -- the dense weight, or raise (an activation-space value has none: it
  raises :class:`NotMergeable` naming the primitive it met, never a silently wrong answer).

``dot``/``conv`` may return :class:`WithAux` ``(y, aux)``: ``aux`` (a pytree of arrays, e.g. a
router's per-rank token counts) is collected per kernel path and returned by :func:`interpret`
(``return_aux=True``). Several uses of one kernel add their aux; a kernel scanned as an ``[L, ...]``
stack gets its aux stacked per layer (``[L, ...]``), a kernel closed over by a scan body gets the
sum over the scan's steps.

Primitives followed: ``dot_general``, ``conv_general_dilated``, ``convert_element_type``,
``copy``, ``transpose``, ``scan``, and ``pjit``/``closed_call`` bodies (inlined). Any other
primitive that receives a kernel value gets :meth:`~KernelValue.materialize`.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from lrjax import _validation as V
from lrjax import axes as axes_lib
from lrjax import tree as tree_lib

__all__ = ["interpret", "KernelValue", "LowRank", "Branch", "WithAux", "FactoredStats", "NotMergeable",
           "dot_views", "shift_axes", "bind_like"]


class NotMergeable(TypeError):
    """An activation-space adapter (its output depends on the input ``x``) asked for a dense
    weight: by ``merge``/``materialize``/``delta`` or by a use of its kernel that the interpreter
    cannot follow. A ``TypeError``: the operation does not apply to this kind of adapter."""


class WithAux(NamedTuple):
    """What :meth:`KernelValue.dot` / :meth:`KernelValue.conv` return to report auxiliary
    statistics of a use (``y``: the output; ``aux``: a pytree of arrays)."""

    y: Any
    aux: Any


class FactoredStats:
    """Counts of kernel uses handled symbolically (``factored``) vs by the dense fallback
    (``fallback``: the primitive names), filled at trace time."""

    def __init__(self):
        self.factored = 0
        self.fallback: list[str] = []


class KernelValue:
    """Base class of the symbolic values the interpreter binds to targeted leaves (see the
    module docstring for the protocol). ``w`` is the leaf (its layout), ``ax`` its
    :class:`lrjax.axes.Axes` matrix view, ``path`` its path (for messages and aux)."""

    w: Any
    ax: axes_lib.Axes
    path: str = ""

    def dot(self, x, params: dict, out_aval):  # noqa: D102 -- protocol, see the module docstring
        return None

    def conv(self, eqn, x):  # noqa: D102
        return None

    def astype(self, dtype):  # noqa: D102
        return None

    def transpose(self, permutation):  # noqa: D102
        return None

    def scan_slices(self):  # noqa: D102
        return None

    def materialize(self, why: str = ""):
        """The dense weight with the leaf's shape and dtype (the fallback for a use the value
        declined); a subclass without one raises :class:`NotMergeable`, never a wrong value."""
        raise NotMergeable(f"{type(self).__name__} at {self.path!r} has no dense weight"
                           + (f" for the `{why}` that uses it" if why else "")
                           + "; define materialize() or use the kernel only in products it follows")


def dot_views(x, ax: axes_lib.Axes, wshape, params):
    """For a :class:`KernelValue` subclass's ``dot``: ``(x's contracted axes in the order of the
    view's input axes, input shape, output shape)``
    when ``dot_general(x, W)`` contracts exactly the leaf's input axes (in any order, as
    ``jnp.einsum`` may emit them) and keeps its output axes in order; ``None`` otherwise."""
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    if ax.batch or lb or rb or sorted(rc) != sorted(ax.inp):
        return None
    free = tuple(i for i in range(len(wshape)) if i not in rc)
    if free != tuple(ax.out):
        return None
    in_shape = tuple(wshape[i] for i in ax.inp)
    out_shape = tuple(wshape[i] for i in ax.out)
    pair = dict(zip(rc, lc))  # the input's axis contracted with each kernel axis, in the view's order
    return tuple(pair[i] for i in ax.inp), in_shape, out_shape


def shift_axes(ax: axes_lib.Axes) -> axes_lib.Axes:
    """For a :class:`KernelValue` subclass's ``scan_slices``: the :class:`lrjax.axes.Axes` of a leaf
    after its leading (scanned) axis is sliced off."""
    dec = lambda t: tuple(i - 1 for i in t)  # noqa: E731
    return axes_lib.Axes(dec(ax.batch[1:]), dec(ax.inp), dec(ax.out))


class LowRank(KernelValue):
    """``(W + s A B) * c`` kept symbolic: ``w`` the leaf (leaf layout), ``a: [*batch, M, r]``,
    ``b: [*batch, r, N]`` in the matrix view ``ax``, ``scale`` a float or scalar array, ``c`` an
    optional per-output column factor ``[*batch, N]`` (DoRA). ``mode`` picks how a matched
    product is computed (see :func:`lrjax.factored`)."""

    __slots__ = ("w", "a", "b", "scale", "c", "ax", "path", "mode")

    def __init__(self, w, a, b, scale, c, ax, path: str = "", mode: str = "auto"):
        self.w, self.a, self.b, self.scale, self.c, self.ax = w, a, b, scale, c, ax
        self.path, self.mode = path, mode

    def _like(self, w, a, b, c, ax):
        return LowRank(w, a, b, self.scale, c, ax, self.path, self.mode)

    def materialize(self, why: str = ""):
        """``(W + s A B) * c`` in ``promote_types(w, a, b, c, float32)``, rounded once to ``w.dtype``."""
        wm = axes_lib.to_matrix(self.w, self.ax)
        cd = V.compute_dtype(self.w.dtype, self.a.dtype, self.b.dtype,
                             *(() if self.c is None else (self.c.dtype,)))
        v = wm.astype(cd) + self.scale * (self.a.astype(cd) @ self.b.astype(cd))
        if self.c is not None:
            v = v * self.c[..., None, :].astype(cd)
        return axes_lib.from_matrix(v.astype(self.w.dtype), self.ax, self.w.shape)

    def astype(self, dtype):
        return self._like(self.w.astype(dtype), self.a.astype(dtype), self.b.astype(dtype),
                          None if self.c is None else self.c.astype(dtype), self.ax)

    def transpose(self, permutation):
        """``W^T`` of a plain 2-D kernel stays low-rank: ``(W + sAB)^T = W^T + s B^T A^T``."""
        if self.ax.batch or self.w.ndim != 2 or tuple(permutation) != (1, 0) or self.c is not None:
            return None
        return self._like(self.w.T, jnp.swapaxes(self.b, -1, -2), jnp.swapaxes(self.a, -1, -2), None,
                          axes_lib.Axes((), (0,), (1,)))

    def scan_slices(self):
        if self.ax.batch[:1] != (0,) or self.c is not None:
            return None
        return (self.w, self.a, self.b), lambda sl: self._like(sl[0], sl[1], sl[2], None, shift_axes(self.ax))

    def dot(self, x, params, out_aval):
        views = dot_views(x, self.ax, self.w.shape, params)
        if views is None:
            return None
        lc, in_shape, out_shape = views
        r = self.a.shape[-1]
        dt = self.w.dtype
        dn = params["dimension_numbers"]
        pet = params.get("preferred_element_type")
        s = self.scale

        def lowrank(x, a, b):  # s (x A) B, contracted in factored form
            xa = lax.dot_general(x, a.reshape(in_shape + (r,)), ((lc, tuple(range(len(in_shape)))), ((), ())),
                                 preferred_element_type=pet)
            return s * lax.dot_general(xa.astype(dt), b.reshape((r,) + out_shape), (((xa.ndim - 1,), (0,)), ((), ())),
                                       preferred_element_type=pet)

        def dot(x, w):
            return lax.dot_general(x, w, dn, precision=params.get("precision"), preferred_element_type=pet)

        a, b = self.a.astype(dt), self.b.astype(dt)
        tokens = x.size // max(1, int(np.prod([x.shape[i] for i in lc])))
        m = int(np.prod(in_shape))
        if self.c is None and (self.mode == "fused" or (self.mode == "auto" and tokens >= m)):
            y = _fused(dot, lowrank, self.ax, self.w.shape, s)(x, self.w, a, b)
        else:
            y = dot(x, self.w)
            y = y + lowrank(x, a, b).astype(y.dtype)
        if self.c is not None:
            y = y * self.c.reshape(out_shape).astype(y.dtype)
        return y.astype(out_aval.dtype)

    def conv(self, eqn, x):
        """``conv(x, K) + s conv_1x1(conv_kxk(x, A), B)`` (times ``c`` per output channel) for a conv
        kernel ``K: [*window, C_in, C_out]`` in the default :mod:`lrjax.axes` view (``A: [prod(window)
        C_in, r]`` is a ``[*window, C_in, r]`` kernel run with the base's strides, padding, dilations and
        layout; ``B: [r, C_out]`` is a ``1 x 1`` conv, computed as a contraction over the feature axis).
        Exact because every output position of a convolution is a linear map of the gathered input
        window. Declines grouped convs, stacked or permuted kernel views, and kernel specs other than
        ``[*window, in, out]``."""
        p = eqn.params
        n = self.w.ndim
        if self.ax != axes_lib.Axes((), tuple(range(n - 1)), (n - 1,)) or n < 3:
            return None
        if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
            return None
        dn = p["dimension_numbers"]
        if tuple(dn.rhs_spec) != (n - 1, n - 2) + tuple(range(n - 2)):
            return None
        dt = self.w.dtype
        r = self.a.shape[-1]
        a = self.a.astype(dt).reshape(self.w.shape[:-1] + (r,))
        b = self.b.astype(dt)
        fo = dn.out_spec[1]  # the feature axis of the output
        y = bind_like(eqn, x, self.w)
        xa = bind_like(eqn, x, a).astype(dt)
        low = lax.dot_general(xa, b, (((fo,), (0,)), ((), ())), preferred_element_type=p.get("preferred_element_type"))
        low = jnp.moveaxis(low, -1, fo)
        y = y + (self.scale * low).astype(y.dtype)
        if self.c is not None:
            shape = [1] * y.ndim
            shape[fo] = self.c.shape[-1]
            y = y * self.c.reshape(shape).astype(y.dtype)
        return y.astype(eqn.outvars[0].aval.dtype)


def bind_like(eqn, *args):
    """Re-bind ``eqn``'s primitive with its own parameters to new operands (e.g. the same
    convolution with another filter)."""
    bind = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        return eqn.primitive.bind(*args, **bind)


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
        da, db = jax.vjp(lambda a_, b_: lowrank(x, a_, b_), a, b)[1](dy)
        return dx, dw, da, db

    f.defvjp(f_fwd, f_bwd)
    return f


class Branch(KernelValue):
    """An activation-space adapter at a kernel: ``y = x W + branch(x, x W)``.

    ``fn(x, y, factors)`` gets ``x: [..., M]`` (the input in the kernel's matrix view: its
    contracted axes flattened last, in the input's dtype) and ``y: [..., N]`` (the base product
    ``x W`` in the matrix view, before any bias the model adds after the product) and returns the
    term to add, ``[..., N]``, or :class:`WithAux` ``(delta, aux)``. The sum ``y + delta`` is
    computed in ``promote_types(y, delta, float32)`` and rounded once to the product's dtype.
    ``factors`` is any pytree of arrays (for a scanned ``[L, ...]`` stack, every array has the
    leading ``L`` axis and ``fn`` sees one layer's slice). ``kind`` names the adapter in errors.

    A branch follows ``dot_general`` (contracting exactly the kernel's input axes), casts and
    scans; every other use of its kernel (a transposed tied embedding, a gather, a grouped conv)
    raises :class:`NotMergeable` naming the primitive -- there is no dense weight to fall back on.
    """

    __slots__ = ("w", "ax", "factors", "fn", "path", "kind")

    def __init__(self, w, ax, factors, fn: Callable, path: str = "", kind: str = "activation-space adapter"):
        self.w, self.ax, self.factors, self.fn, self.path, self.kind = w, ax, factors, fn, path, kind

    def materialize(self, why: str = ""):
        raise NotMergeable(
            f"{self.kind} at {self.path!r} depends on the input x, so it has no dense weight"
            + (f"; the model uses its kernel in a `{why}` that lrjax's interpreter cannot follow (it follows "
               "dot_general contracting the kernel's input axes, casts, jit/remat bodies and lax.scan stacks; "
               "not lax.cond, custom_jvp/custom_vjp functions, gathers or transposes of the kernel): use the "
               "kernel as x @ W outside such constructs" if why else
               "; run the model through lrjax.factored(fn, rp) with the kernel used as x @ W"))

    def astype(self, dtype):
        return Branch(self.w.astype(dtype), self.ax, self.factors, self.fn, self.path, self.kind)

    def scan_slices(self):
        leaves = jax.tree_util.tree_leaves(self.factors)
        n = self.w.shape[0] if self.w.ndim else None
        if self.ax.batch[:1] != (0,) or any(getattr(x, "ndim", 0) < 1 or x.shape[0] != n for x in leaves):
            return None
        return (self.w, self.factors), lambda sl: Branch(sl[0], shift_axes(self.ax), sl[1], self.fn, self.path, self.kind)

    def dot(self, x, params, out_aval):
        views = dot_views(x, self.ax, self.w.shape, params)
        if views is None:
            return None
        lc, in_shape, out_shape = views
        y = lax.dot_general(x, self.w, params["dimension_numbers"], precision=params.get("precision"),
                            preferred_element_type=params.get("preferred_element_type"))
        free = tuple(i for i in range(x.ndim) if i not in lc)
        lead = tuple(x.shape[i] for i in free)
        m, n = int(np.prod(in_shape)), int(np.prod(out_shape))
        xm = jnp.transpose(x, free + lc).reshape(lead + (m,))
        ym = y.reshape(lead + (n,))
        res = self.fn(xm, ym, self.factors)
        delta, aux = (res.y, res.aux) if isinstance(res, WithAux) else (res, None)
        if not hasattr(delta, "shape") or not jnp.issubdtype(getattr(delta, "dtype", None), jnp.floating):
            raise TypeError(f"{self.kind} at {self.path!r}: its branch must return a floating array [..., {n}] "
                            f"(or WithAux(array, aux)), got {type(delta).__name__} "
                            f"{getattr(delta, 'dtype', '')}")
        if tuple(delta.shape) != lead + (n,):
            raise ValueError(f"{self.kind} at {self.path!r}: its branch returned shape {tuple(delta.shape)}, "
                             f"expected {lead + (n,)} (the input's leading axes and the kernel's {n} outputs)")
        cd = V.compute_dtype(ym.dtype, delta.dtype)
        out = (ym.astype(cd) + delta.astype(cd)).astype(out_aval.dtype).reshape(lead + out_shape)
        return out if aux is None else WithAux(out, aux)


def _scan(eqn, invals, stats, sink):
    """``lax.scan`` with kernel values among its inputs: closed-over ones (a recurrent cell's
    weights) enter the body unchanged; scanned ``[L, ...]`` stacks are scanned as the arrays of
    :meth:`KernelValue.scan_slices` and rebuilt in the body. ``None`` (fallback) when a kernel
    value is in the carry or a stack cannot be sliced."""
    p = eqn.params
    nc, nk = p["num_consts"], p["num_carry"]
    consts, init, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]
    if any(isinstance(v, KernelValue) for v in init):
        return None
    sliced = []
    for v in xs:
        if isinstance(v, KernelValue):
            s = v.scan_slices()
            if s is None:
                return None
            sliced.append(s)
        else:
            sliced.append((v, None))
    body = p["jaxpr"]
    stacked_paths = {v.path for v in xs if isinstance(v, KernelValue)}
    aux_keys: list = []

    def step(carry, xslice):
        rebuilt = [sl if rb is None else rb(sl) for (_, rb), sl in zip(sliced, xslice)]
        inner: dict = {}
        outs = _eval(body.jaxpr, body.consts, list(consts) + list(carry) + rebuilt, stats, inner)
        aux_keys[:] = list(inner)
        return outs[:nk], (outs[nk:], [inner[k] for k in aux_keys])

    carry, (ys, aux_ys) = lax.scan(step, list(init), [a for a, _ in sliced], length=p["length"],
                                   reverse=p["reverse"], unroll=p["unroll"])
    for k, a in zip(aux_keys, aux_ys):
        _add_aux(sink, k, a if k in stacked_paths else jax.tree_util.tree_map(lambda t: t.sum(0), a))
    return list(carry) + list(ys)


def _add_aux(sink: dict, path: str, aux):
    sink[path] = aux if path not in sink else jax.tree_util.tree_map(jnp.add, sink[path], aux)


# calls whose body is inlined (values unchanged; a remat region loses its rematerialization for the
# kernel's uses, which now run factored)
_PASSTHROUGH_CALLS = {"pjit", "jit", "closed_call", "core_call", "checkpoint", "remat", "remat2"}


def _eval(jaxpr, consts, args, stats: FactoredStats, sink: dict):
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    def concrete(x, why):
        if isinstance(x, KernelValue):
            stats.fallback.append(why)
            return x.materialize(why)
        return x

    def handled(res, path):
        if isinstance(res, WithAux):
            _add_aux(sink, path, res.aux)
            res = res.y
        if res is not None:
            stats.factored += 1
        return res

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        out = None
        if any(isinstance(x, KernelValue) for x in invals):
            k0 = invals[0]
            k1 = invals[1] if len(invals) > 1 else None
            if name == "dot_general" and not isinstance(k0, KernelValue) and isinstance(k1, KernelValue):
                out = handled(k1.dot(k0, eqn.params, eqn.outvars[0].aval), k1.path)
            elif name == "conv_general_dilated" and not isinstance(k0, KernelValue) and isinstance(k1, KernelValue):
                out = handled(k1.conv(eqn, k0), k1.path)
            elif name == "convert_element_type" and isinstance(k0, KernelValue):
                out = k0.astype(eqn.params["new_dtype"])
            elif name in ("copy", "copy_p") and isinstance(k0, KernelValue):
                out = k0
            elif name == "transpose" and isinstance(k0, KernelValue):
                out = k0.transpose(eqn.params["permutation"])
            elif name == "scan":
                out = _scan(eqn, invals, stats, sink)
            elif name in _PASSTHROUGH_CALLS and "jaxpr" in eqn.params:
                inner = eqn.params["jaxpr"]
                ij, ic = (inner.jaxpr, inner.consts) if hasattr(inner, "jaxpr") else (inner, ())
                out = _eval(ij, ic, invals, stats, sink)
        if out is None:
            invals = [concrete(x, name) for x in invals]
            out = bind_like(eqn, *invals)
        if eqn.primitive.multiple_results:
            for v, o in zip(eqn.outvars, out):
                env[v] = o
        else:
            env[eqn.outvars[0]] = out
    return [concrete(read(v), "output") for v in jaxpr.outvars]


def _trace_like(value: KernelValue, leaf):
    """What ``fn`` is traced with at a kernel value's leaf: the leaf itself, or a
    ``jax.ShapeDtypeStruct`` of ``value.w`` when that has another shape or dtype."""
    w = value.w
    if tuple(w.shape) == tuple(leaf.shape) and jnp.dtype(w.dtype) == jnp.dtype(leaf.dtype):
        return leaf
    return jax.ShapeDtypeStruct(tuple(w.shape), w.dtype)


def interpret(fn: Callable[..., Any], params, values: dict, args=(), *, stats: FactoredStats | None = None,
              return_aux: bool = False):
    """Evaluate ``fn(params, *args)`` with the leaves named in ``values`` (``{path: KernelValue or
    array}``, paths as :func:`lrjax.tree.path_str` writes them) substituted.

    ``fn`` is traced once to a jaxpr with the leaves' shapes; the jaxpr is then evaluated with
    each :class:`KernelValue` answering for its own uses (see the module docstring). Works under
    ``jit``, ``grad`` and ``vmap`` (the interpretation happens at trace time). Returns ``fn``'s
    output, or ``(output, aux)`` with ``return_aux=True`` (``aux``: ``{path: pytree}`` of the
    kernels that reported :class:`WithAux`). ``stats`` (a :class:`FactoredStats`) records which
    uses were symbolic and which fell back to the dense weight.

    Placeholder leaves: when a :class:`KernelValue`'s ``w`` (an array or ``jax.ShapeDtypeStruct``)
    has another shape or dtype than the leaf of ``params`` it replaces, ``fn`` is traced with ``w``'s
    shape and dtype. A variant whose weight never reads the base kernel (SLTrain, ``W = s B A + S``
    from scratch: :mod:`lrjax.reparam.sltrain`) keeps a zero-size placeholder in ``params`` and
    hands in a value whose ``w`` is the logical ``jax.ShapeDtypeStruct``.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = [tree_lib.path_str(p) for p, _ in leaves]
    vals = [v for _, v in leaves]
    unknown = [k for k in values if k not in set(keys)]
    if unknown:
        raise ValueError(f"values: no leaf at path {unknown[0]!r} in params; nearest paths: "
                         f"{tree_lib._nearest(unknown[0], dict(zip(keys, vals)))}")
    arg_leaves, arg_tree = jax.tree_util.tree_flatten(tuple(args))

    def flat_fn(leaf_vals, arg_vals):
        return fn(jax.tree_util.tree_unflatten(treedef, leaf_vals), *jax.tree_util.tree_unflatten(arg_tree, arg_vals))

    # A kernel value whose ``w`` differs in shape/dtype from the leaf it replaces (a placeholder leaf
    # of a variant that never reads the base kernel) is traced with ``w``'s shape and dtype.
    trace_vals = [_trace_like(values[k], v) if isinstance(values.get(k), KernelValue) else v
                  for k, v in zip(keys, vals)]
    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(trace_vals, arg_leaves)
    inputs = [values.get(k, v) for k, v in zip(keys, vals)]
    st = stats if stats is not None else FactoredStats()
    sink: dict = {}
    outs = _eval(closed.jaxpr, closed.consts, inputs + list(arg_leaves), st, sink)
    out = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)
    return (out, sink) if return_aux else out
