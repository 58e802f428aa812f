"""SLTrain as a reparameterization of an existing params pytree: every targeted kernel becomes
``W = s a b + S`` (Han et al., NeurIPS 2024, arXiv 2406.02214; official code andyjm3/SLTrain
@2335d62c; the math, orientation, init and support draw are in :mod:`lrjax.nn.sltrain`).

Usage (pretraining: the base -- embeddings, norms, untargeted leaves -- AND the adapters train)::

    rp = SLTrain(rank=32, delta=0.03, targets=ADAPTER_TARGETS)
    base, adapters = rp.init(jax.random.key(0), params)
    loss = lambda base, adapters, x: lrjax.factored(apply, rp)(base, adapters, x)
    dense = rp.merge(base, adapters)          # plain params for inference / export

Unlike LoRA, SLTrain *replaces* the kernel: ``W_eff = s a b + S`` never reads the base weight.
So :meth:`SLTrain.init` returns the base with every targeted leaf replaced by a zero-size
*placeholder* ``zeros((0, *shape), dtype)`` (no bytes, but it records the kernel's shape and
dtype): the dense ``W`` is not held, not trained and not checkpointed. A base that still holds the
full-size leaf is accepted too (its values are ignored). Because the placeholder has another
shape, call the model through :func:`lrjax.factored` (or :meth:`SLTrain.materialize` first);
``fn(base, x)`` alone does not compute the model: Flax layers refuse the placeholder
(``ScopeParamShapeError`` / a ``dot_general`` shape error), and a broadcasting ``x @ W`` returns
an empty array.

Adapters, per targeted leaf (matrix view ``[*batch, M=in, N=out]`` of :mod:`lrjax.axes`):
``{"a": [*batch, M, r], "b": [*batch, r, N], "values": [*batch, nnz]}``, all trainable
(``num_params`` = ``r (M + N) + nnz`` per matrix, the paper's count). The support (int32
``[*batch, nnz]``, sorted row-major positions in ``[M, N]``) is **not** in the adapters: it is
regenerated from the config's ``seed`` and the leaf's path (:meth:`SLTrain.support`, host side at
trace time, a constant of the compiled step), so it is never trained, never in the optimizer and
never in a checkpoint. Each layer of an ``[L, M, N]`` ``nn.scan`` stack gets its own support.

Forward (:func:`lrjax.factored`): at every ``dot_general``/``conv`` use of a targeted kernel the
interpreter runs :class:`SLTrainKernel`: ``W = s a b + S`` is built by one scatter-add into
``s a b`` inside :func:`jax.checkpoint` and used in the model's own product (one matmul ``x W``),
so ``W`` is rebuilt in the backward instead of being stored between forward and backward.
``materialize``/``merge`` give the dense ``W`` (a weight-space method); ``unmerge`` returns the
placeholder base. The paper's support density ``delta`` is given as ``SLTrain(delta=0.03)`` and
stored as the field ``density`` (the name ``delta`` is :meth:`Reparam.delta`'s). :meth:`SLTrain.delta`
refuses: SLTrain's weight *replaces* the kernel, so there is no delta on a base weight
(``rp.merge(base, adapters)`` is the weight).

:class:`PureLowRank` is the paper's "low-rank" arm at the same ``r``: ``W = s a b`` from scratch,
both factors nonzero at init (:func:`lrjax.nn.sltrain.lowrank_init`).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lrjax import _validation as V
from lrjax import axes as axes_lib
from lrjax import tree as tree_lib
from lrjax._validation import check_key, check_params
from lrjax.interpreter import KernelValue, bind_like
from lrjax.nn.sltrain import (DEFAULT_ALPHA, DEFAULT_DELTA, _support, _weight, nnz_count, path_seed)
from lrjax.reparam.base import Reparam, _all_finite, _is_array, _is_concrete

__all__ = ["SLTrain", "PureLowRank", "SLTrainKernel", "is_placeholder", "placeholder"]


def placeholder(leaf):
    """The zero-size stand-in ``zeros((0, *shape), dtype)`` of a replaced kernel (no data)."""
    return jnp.zeros((0,) + tuple(leaf.shape), leaf.dtype)


def is_placeholder(leaf) -> bool:
    """``True`` for a leaf made by :func:`placeholder` (leading axis 0, at least 2 more axes)."""
    return _is_array(leaf) and leaf.ndim >= 3 and leaf.shape[0] == 0


def _logical(leaf):
    """``(shape, dtype)`` of the kernel a leaf stands for (a placeholder or the full leaf)."""
    return (tuple(leaf.shape[1:]) if is_placeholder(leaf) else tuple(leaf.shape)), jnp.dtype(leaf.dtype)


class SLTrainKernel(KernelValue):
    """The SLTrain kernel ``W = s a b + S`` for :mod:`lrjax.interpreter`: ``w`` a
    ``jax.ShapeDtypeStruct`` of the logical kernel (leaf layout), ``ax`` its matrix view, ``a [*b, M,
    r]``, ``b [*b, r, N]``, ``values``/``idx [*b, nnz]`` (``values=None``: pure low-rank).

    ``dot``/``conv`` rebuild ``W`` inside :func:`jax.checkpoint` and run the model's own primitive
    with it (any dimension numbers), so the dense ``W`` is recomputed in the backward instead of
    stored. Other uses get :meth:`materialize` (the dense weight, not checkpointed)."""

    __slots__ = ("w", "ax", "a", "b", "values", "idx", "scale", "path")

    def __init__(self, w, ax, a, b, values, idx, scale, path: str = ""):
        self.w, self.ax, self.a, self.b, self.values, self.idx = w, ax, a, b, values, idx
        self.scale, self.path = scale, path

    def _build(self, a, b, values, idx):
        wm = _weight(a, b, values, idx, self.scale, self.w.dtype)
        return axes_lib.from_matrix(wm, self.ax, self.w.shape)

    def materialize(self, why: str = ""):
        return self._build(self.a, self.b, self.values, self.idx)

    def astype(self, dtype):
        return SLTrainKernel(jax.ShapeDtypeStruct(self.w.shape, dtype), self.ax, self.a, self.b, self.values,
                             self.idx, self.scale, self.path)

    def scan_slices(self):
        if self.ax.batch[:1] != (0,):
            return None
        dec = lambda t: tuple(i - 1 for i in t)  # noqa: E731
        ax = axes_lib.Axes(dec(self.ax.batch[1:]), dec(self.ax.inp), dec(self.ax.out))
        w = jax.ShapeDtypeStruct(self.w.shape[1:], self.w.dtype)
        arrays = (self.a, self.b) + (() if self.values is None else (self.values, jnp.asarray(self.idx)))

        def rebuild(sl):
            v, i = (sl[2], sl[3]) if self.values is not None else (None, None)
            return SLTrainKernel(w, ax, sl[0], sl[1], v, i, self.scale, self.path)

        return arrays, rebuild

    def _apply(self, prim, x):
        """``prim(x, W)`` with ``W`` built inside :func:`jax.checkpoint` (rebuilt in the backward)."""
        idx = None if self.values is None else jnp.asarray(self.idx)

        @jax.checkpoint
        def f(x, a, b, values, idx):
            return prim(x, self._build(a, b, values, idx))

        return f(x, self.a, self.b, self.values, idx)

    def dot(self, x, params, out_aval):
        def prim(x, w):
            return jax.lax.dot_general(x, w, params["dimension_numbers"], precision=params.get("precision"),
                                       preferred_element_type=params.get("preferred_element_type"))
        return self._apply(prim, x).astype(out_aval.dtype)

    def conv(self, eqn, x):
        return self._apply(lambda x, w: bind_like(eqn, x, w), x)


@dataclasses.dataclass(frozen=True, init=False)
class SLTrain(Reparam):
    """Sparse plus low-rank reparameterization ``W = (alpha / r) a b + S`` of every targeted kernel
    (see the module docstring; math in :mod:`lrjax.nn.sltrain`).

    Args:
      rank: ``r``, an int with ``1 <= r <= min(M, N)`` of every targeted leaf (checked in ``init``).
      alpha: ``s = alpha / r`` (default 32, the official 60M script; 130M/350M use 16, 1B 8).
      targets: path pattern(s) of the kernels to replace (e.g.
        :data:`lrjax.models.char_transformer.ADAPTER_TARGETS`; the paper replaces every attention and
        MLP linear and keeps embeddings and the LM head dense).
      axes: matrix-view override (:mod:`lrjax.axes`); default ``[in, out]`` kernels and ``[L, in, out]``
        stacks.
      dtype: factor dtype (default: the leaf's).
      delta: support density in ``(0, 1)`` (default 0.03); ``nnz = floor(delta M N) >= 1`` per matrix.
        Stored as the field ``density`` (``density=`` is accepted too, e.g. by
        :func:`dataclasses.replace`).
      seed: support seed, an int ``>= 0`` (default 0): leaf ``path`` (layer ``l`` of a stack) gets
        ``sparse_support(M, N, delta, (seed, crc32(path)[, l]))``. Independent of ``init``'s key, so
        the support is regenerated from the config alone.

    The base returned by :meth:`init` holds zero-size placeholders for the targeted kernels: call
    the model through :func:`lrjax.factored` (``x @ kernel`` on a placeholder silently gives an
    empty array; see :meth:`init`).

    Checkpoints: the support is not saved with the adapters, so **keep this config with them** --
    ``lrjax.checkpoint.save_adapters(dir, adapters, rp=rp)`` -- and reload with the same ``seed``,
    ``delta`` and ``targets``. An ``SLTrain`` with another ``seed`` accepts the same adapters (same
    shapes) but puts ``values`` on another support: a different model, silently.

    Init [code]: ``a ~ U(+-1/sqrt(M))``, ``b = 0`` (``W = S`` at init), ``values ~ U(+-1/sqrt(M))``,
    per-leaf key ``fold_in(key, crc32(path))``. Raises TypeError/ValueError naming the argument:
    ``delta`` outside ``(0, 1)`` or too small for a leaf, ``rank`` above ``min(M, N)``, a non-int or
    bool ``rank``/``seed``, ``grads=`` (data-free init), adapters of another shape.
    """

    alpha: float | None = DEFAULT_ALPHA
    density: float = DEFAULT_DELTA
    seed: int = 0

    factor_keys = ("a", "b", "values")

    def __init__(self, rank: int = 8, alpha: float | None = DEFAULT_ALPHA, targets="kernel", axes=None, dtype=None,
                 *, delta: float | None = None, density: float | None = None, seed: int = 0):
        if delta is not None and density is not None and delta != density:
            raise ValueError(f"delta={delta!r} and density={density!r} disagree; pass delta= only")
        d = delta if delta is not None else (density if density is not None else DEFAULT_DELTA)
        for nm, v in (("rank", rank), ("alpha", alpha), ("targets", targets), ("axes", axes), ("dtype", dtype),
                      ("density", d), ("seed", seed)):
            object.__setattr__(self, nm, v)
        self.__post_init__()

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "density", V.check_float(self.density, "delta", low=0.0, high=1.0, low_open=True,
                                                          high_open=True))
        V.check_int(self.seed, "seed", low=0)

    @property
    def sparse(self) -> bool:
        return "values" in self.factor_keys

    # ------------------------------------------------------------ support
    def nnz(self, path: str, m: int, n: int) -> int:
        """``floor(delta M N)``; ValueError naming ``delta`` and the leaf when it is 0."""
        try:
            return nnz_count(m, n, self.density)
        except ValueError as e:
            raise ValueError(f"{e} (leaf {path!r})") from None

    def support(self, path: str, bshape: tuple, m: int, n: int) -> np.ndarray:
        """The fixed support of leaf ``path``: int32 ``[*bshape, nnz]`` (sorted row-major positions in
        each ``[M, N]`` matrix), regenerated from ``(seed, crc32(path)[, layer])`` (host side, cached)."""
        nnz = self.nnz(path, m, n)
        ent = path_seed(self.seed, path)
        if not bshape:
            return _support(ent, m, n, nnz)
        cnt = int(np.prod(bshape))
        return np.stack([_support(ent + (i,), m, n, nnz) for i in range(cnt)]).reshape(tuple(bshape) + (nnz,))

    # ------------------------------------------------------------ init
    def init_leaf(self, key, w, path: str, **kw):  # noqa: D102 -- used by init below
        *bs, m, n = w.shape
        dt = self.factor_dtype(w)
        bound = 1.0 / np.sqrt(m)
        ka, kb, kv = jax.random.split(key, 3)
        a = jax.random.uniform(ka, (*bs, m, self.rank), jnp.float32, -bound, bound).astype(dt)
        if not self.sparse:
            bb = np.sqrt(3.0 / self.rank) / self.scale
            b = jax.random.uniform(kb, (*bs, self.rank, n), jnp.float32, -bb, bb).astype(dt)
            return {"a": a, "b": b}
        b = jnp.zeros((*bs, self.rank, n), dt)
        v = jax.random.uniform(kv, (*bs, self.nnz(path, m, n)), jnp.float32, -bound, bound).astype(dt)
        return {"a": a, "b": b, "values": v}

    def init(self, key, params, *, grads=None):
        """``(base, adapters)``: ``base`` is ``params`` with each targeted leaf replaced by its
        zero-size :func:`placeholder`; ``adapters[path]`` the factors (see the class docstring).

        Warning: the returned ``base`` is not a model by itself. Run it only through
        ``lrjax.factored(fn, rp)(base, adapters, x)`` or ``fn(rp.materialize(base, adapters), x)``;
        ``fn(base, x)`` fails in Flax layers, but a hand-written ``x @ base[...]["kernel"]``
        broadcasts against the ``[0, M, N]`` placeholder and returns an **empty array** without
        an error."""
        check_key(key, "key")
        flat = check_params(params, "params")
        if grads is not None:
            raise ValueError(f"grads: {type(self).__name__} does not use gradients (its init is data-free); drop grads=")
        paths = self._targets(params)
        adapters, new_base = {}, {}
        for path in paths:
            leaf = flat[path]
            shape, dt = _logical(leaf)
            if not jnp.issubdtype(dt, jnp.floating):
                raise TypeError(f"targets: leaf {path!r} has dtype {dt}; only floating leaves can be "
                                "reparameterized")
            if not is_placeholder(leaf) and _is_concrete(leaf) and not _all_finite(leaf):
                raise ValueError(f"params: leaf {path!r} contains NaN or Inf; {type(self).__name__} replaces the "
                                 "kernel, but a non-finite base says the weights are broken: fix them before init")
            bshape, m, n = self.view_shape(path, shape)
            self.check_leaf_rank(path, m, n)
            if self.sparse:
                self.nnz(path, m, n)
            f = self.init_leaf(self.leaf_key(key, path), jax.ShapeDtypeStruct(bshape + (m, n), dt), path)
            adapters[path] = f
            new_base[path] = leaf if is_placeholder(leaf) else placeholder(leaf)
        return tree_lib.replace(params, new_base), adapters

    # ------------------------------------------------------------ checks
    def _check(self, base, adapters, argname="adapters", basename="params"):
        flat = check_params(base, basename)
        stand = {}
        if isinstance(adapters, Mapping):
            for p in adapters:
                if isinstance(p, str) and p in flat and is_placeholder(flat[p]):
                    shape, dt = _logical(flat[p])
                    stand[p] = np.broadcast_to(np.zeros((), dt), shape)  # zero-stride: no memory
        return super()._check(tree_lib.replace(base, stand) if stand else base, adapters, argname, basename)

    def check_factors(self, path, f, bshape, m, n, argname, shape=None):
        super().check_factors(path, f, bshape, m, n, argname, shape)
        if self.sparse:
            v = f["values"]
            want = tuple(bshape) + (self.nnz(path, m, n),)
            if tuple(v.shape) != want:
                raise ValueError(f"{argname}[{path!r}]['values'] has shape {tuple(v.shape)} but the leaf (matrix "
                                 f"view {tuple(bshape) + (m, n)}, delta={self.density}) needs {want}; adapters made "
                                 "with another `delta` or for another base?")

    # ------------------------------------------------------------ weights
    def _leaf(self, path, stand, f):
        """Dense ``W = s a b + S`` of one leaf in its own layout and dtype."""
        bshape, m, n = self.view_shape(path, stand.shape)
        idx = self.support(path, bshape, m, n) if self.sparse else None
        wm = _weight(f["a"], f["b"], f.get("values"), idx, self.scale, stand.dtype)
        return self.from_view(path, wm, stand.shape)

    def kernel_value(self, path, leaf, f, *, mode="auto"):
        shape, dt = tuple(leaf.shape), jnp.dtype(leaf.dtype)
        ax = self.leaf_axes(path, shape)
        bshape, m, n = self.view_shape(path, shape)
        idx = self.support(path, bshape, m, n) if self.sparse else None
        return SLTrainKernel(jax.ShapeDtypeStruct(shape, dt), ax, f["a"], f["b"], f.get("values"), idx,
                             self.scale, path)

    def _dense(self, base, adapters, basename="base", finite=False):
        flat = self._check(base, adapters, basename=basename)
        if finite:
            for path, f in adapters.items():
                for nm, x in f.items():
                    if _is_concrete(x) and not _all_finite(x):
                        raise ValueError(f"adapters[{path!r}][{nm!r}] contains NaN or Inf; refusing to fold "
                                         "non-finite factors into weights (training diverged?)")
        return {p: self._leaf(p, flat[p], f) for p, f in adapters.items()}

    def materialize(self, base, adapters):
        """``base`` with every targeted leaf (placeholder or not) replaced by the dense ``s a b + S``
        in the logical leaf's dtype (differentiable; computed in float32 or wider, rounded once)."""
        return tree_lib.replace(base, self._dense(base, adapters))

    def merge(self, base, adapters):
        """Dense params for inference (``materialize`` with gradients stopped; refuses NaN/Inf factors)."""
        return jax.lax.stop_gradient(tree_lib.replace(base, self._dense(base, adapters, finite=True)))

    def unmerge(self, merged, adapters):
        """The placeholder base of ``merged`` (SLTrain's base holds no kernel to recover)."""
        flat = self._check(merged, adapters, basename="merged")
        return tree_lib.replace(merged, {p: flat[p] if is_placeholder(flat[p]) else placeholder(flat[p])
                                         for p in adapters})

    def delta(self, base, adapters):
        """Refused (TypeError): SLTrain's ``W = s a b + S`` replaces the kernel, so there is no delta on a
        base weight; ``rp.merge(base, adapters)`` gives the weight itself."""
        raise TypeError(f"{type(self).__name__}.delta: {type(self).__name__} replaces the kernel (W = s a b + S), "
                        "so there is no delta on a base weight; use rp.merge(base, adapters) for the dense weight")

    def factors(self, w, f):
        raise TypeError(f"{type(self).__name__} replaces the kernel (W = s a b + S); it is not a low-rank delta "
                        "on W, so it has no (A, B, s, c) form: use materialize/merge or lrjax.factored")

    def effective(self, w, f):
        raise TypeError(f"{type(self).__name__}'s weight depends on the leaf path (its support); use "
                        "rp.materialize(base, adapters) or rp.merge(base, adapters)")


@dataclasses.dataclass(frozen=True, init=False)
class PureLowRank(SLTrain):
    """The pure low-rank arm: ``W = (alpha / r) a b`` trained from scratch, no sparse part (the
    paper's "low-rank" column at the same ``r``). Adapters ``{"a", "b"}``. Init [ours]:
    ``a ~ U(+-1/sqrt(M))``, ``b ~ U(+-sqrt(3/r)/s)`` (both nonzero; ``s a b`` has the entry variance
    ``1/(3M)`` of a kaiming-uniform dense kernel).

    Args: ``rank``, ``alpha``, ``targets``, ``axes``, ``dtype`` as :class:`SLTrain`. It has no sparse
    part, so it takes **no** ``delta`` and no ``seed``: ``PureLowRank(delta=...)`` and a ``seed``
    other than 0 (or a ``density`` other than the default) raise TypeError naming the argument. (The
    inherited fields ``density``/``seed`` keep their defaults so that :func:`dataclasses.replace` and
    checkpoint reloads, which pass every field, work.)"""

    factor_keys = ("a", "b")

    def __init__(self, rank: int = 8, alpha: float | None = DEFAULT_ALPHA, targets="kernel", axes=None, dtype=None,
                 *, delta: float | None = None, density: float | None = None, seed: int = 0):
        name = type(self).__name__
        if delta is not None:
            raise TypeError(f"delta: {name} has no sparse part, so it takes no delta; drop delta= (use SLTrain "
                            "for sparse + low-rank)")
        if density is not None and not (isinstance(density, (int, float)) and density == DEFAULT_DELTA):
            raise TypeError(f"density: {name} has no sparse part, so it takes no density/delta; drop density=")
        if isinstance(seed, bool) or not (isinstance(seed, int) and seed == 0):
            raise TypeError(f"seed: {name} has no sparse support, so it takes no seed; drop seed=")
        super().__init__(rank, alpha, targets, axes, dtype)
