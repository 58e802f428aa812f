"""The reparameterization protocol shared by every low-rank adapter in lrjax.

A reparameterization is a small frozen dataclass (the *config*: rank, alpha, targets, axes)
with four pure functions over parameter pytrees::

    base, adapters = rp.init(key, params)        # factors at the targeted leaves (+ a new base
                                                 # for methods that move weight into the adapter)
    params_eff     = rp.materialize(base, adapters)   # jit / grad / vmap friendly
    merged         = rp.merge(base, adapters)          # dense weights for inference
    base           = rp.unmerge(merged, adapters)      # exact inverse of merge where one exists

``adapters`` is a flat dict ``{leaf path: {"a": A, "b": B, ...}}`` with the matrix-view
orientation of :mod:`lrjax.axes` (``A: [*batch, M, r]``, ``B: [*batch, r, N]``), so a user can
see which factor belongs to which base leaf, pass it to optax, and checkpoint it.

``init`` always returns ``(base, adapters)``: for LoRA/DoRA ``base is params``; for PiSSA it is
the residual ``W - s A B``. Returning both removes the silent failure of training a PiSSA adapter
on top of the unmodified weight.

Every variant in lrjax has the same per-leaf form

.. math::  W_{\\text{eff}} = (W + s\\,A B)\\,\\operatorname{diag}(c)

with a scale ``s`` and an optional per-output column factor ``c`` (DoRA's magnitude over the
detached column norm). A variant only says how to initialize its factors (:meth:`init_leaf`)
and how to compute ``(A, B, s, c)`` from them (:meth:`factors`); the tree plumbing, validation,
merging and the unmaterialized ``x W + s (x A) B`` path (:mod:`lrjax.reparam.factored`) are shared.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lrjax import axes as axes_lib
from lrjax import tree as tree_lib

__all__ = ["Reparam", "LowRankForm", "Adapters"]

Adapters = dict  # {path: {"a": ..., "b": ..., optional extras}}


class LowRankForm(NamedTuple):
    """``W_eff = (W + s * a @ b) * c[..., None, :]`` in the matrix view (``c`` may be ``None``)."""

    a: jax.Array
    b: jax.Array
    scale: float | jax.Array
    col_scale: jax.Array | None


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _all_finite(x) -> bool:
    with jax.ensure_compile_time_eval():  # also when init runs inside eval_shape / jit on captured params
        return bool(jnp.all(jnp.isfinite(x)))


@dataclasses.dataclass(frozen=True)
class Reparam:
    """Base class: low-rank additive reparameterization of the leaves selected by ``targets``.

    Subclasses override :meth:`init_leaf` and :meth:`factors` (and :meth:`unmerge_leaf` when the
    inverse differs). Config fields are static (hashable), so a ``Reparam`` can be closed over or
    passed as a static argument to ``jax.jit``.
    """

    rank: int = 8
    alpha: float | None = None
    targets: Any = "kernel"
    axes: Any = None
    dtype: Any = None  # factor dtype; None = the base leaf's dtype

    # ----------------------------------------------------------------- config
    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)):
            raise TypeError(f"rank must be a positive int, got {self.rank!r}")
        if self.rank <= 0:
            raise ValueError(f"rank must be >= 1, got {self.rank}; pick e.g. rank=8")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ValueError(f"alpha must be a positive number or None (= rank), got {self.alpha!r}")
        if self.dtype is not None and not jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating):
            raise TypeError(f"dtype must be a floating dtype (e.g. jnp.float32), got {self.dtype!r}")
        if isinstance(self.targets, list):  # keep the dataclass hashable
            object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.axes, dict):
            object.__setattr__(self, "axes", tuple(self.axes.items()))

    @property
    def scale(self) -> float:
        """``s = alpha / r`` (LoRA, Hu et al. 2021)."""
        alpha = self.rank if self.alpha is None else self.alpha
        return float(alpha) / float(self.rank)

    def _axes_spec(self):
        if isinstance(self.axes, tuple) and not isinstance(self.axes, axes_lib.Axes) and self.axes:
            return dict(self.axes)  # a dict frozen into (pattern, Axes) pairs by __post_init__
        return self.axes

    def leaf_axes(self, path: str, shape) -> axes_lib.Axes:
        return axes_lib.resolve(path, shape, self._axes_spec())

    # ----------------------------------------------------------- per-leaf hooks
    def init_leaf(self, key, w, path: str) -> tuple[jax.Array, dict]:
        """Return ``(w_base, factors)`` for one matrix-view leaf ``w: [*batch, M, N]``.

        Default (LoRA, PEFT's ``init_lora_weights=True``): ``A ~ U(-1/sqrt(M), 1/sqrt(M))``
        (torch's ``kaiming_uniform_(a=sqrt(5))`` on ``lora_A``), ``B = 0``, base unchanged.
        """
        *bs, m, n = w.shape
        dt = self.factor_dtype(w)
        bound = 1.0 / np.sqrt(m)
        a = jax.random.uniform(key, (*bs, m, self.rank), jnp.float32, -bound, bound).astype(dt)
        b = jnp.zeros((*bs, self.rank, n), dt)
        return w, {"a": a, "b": b}

    def factors(self, w, f: dict) -> LowRankForm:
        """The ``(A, B, s, c)`` form of one leaf's adapter (``w`` is the matrix-view base)."""
        return LowRankForm(f["a"], f["b"], self.scale, None)

    def unmerge_leaf(self, w_merged, f: dict, path: str):
        form = self.factors(w_merged, f)
        if form.col_scale is not None:  # pragma: no cover - overridden by DoRA
            raise ValueError(f"{type(self).__name__}: merge is not invertible for {path!r}")
        return w_merged - (form.scale * (form.a @ form.b)).astype(w_merged.dtype)

    # ---------------------------------------------------------------- helpers
    def factor_dtype(self, w):
        return jnp.dtype(self.dtype) if self.dtype is not None else w.dtype

    def check_leaf_rank(self, path: str, m: int, n: int):
        if self.rank > min(m, n):
            raise ValueError(
                f"rank={self.rank} exceeds min(M, N) = {min(m, n)} for leaf {path!r} "
                f"(matrix view [{m}, {n}]); lower `rank` or narrow `targets`")

    def _targets(self, params) -> list[str]:
        def targetable(path, leaf):
            return hasattr(leaf, "ndim") and hasattr(leaf, "dtype")
        return tree_lib.select(params, self.targets, where=targetable)

    def _leaf_key(self, key, path):
        return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)

    # ------------------------------------------------------------- protocol
    def init(self, key, params) -> tuple[Any, Adapters]:
        """Create adapters for every targeted leaf; returns ``(base, adapters)``.

        The per-leaf random key is ``fold_in(key, crc32(path))``, so a leaf's factors do not
        depend on which other leaves are targeted.
        """
        flat = tree_lib.flatten(params)
        adapters: Adapters = {}
        new_base = {}
        for path in self._targets(params):
            leaf = flat[path]
            if not jnp.issubdtype(leaf.dtype, jnp.floating):
                raise TypeError(f"targets: leaf {path!r} has dtype {leaf.dtype}; only floating "
                                "leaves can be reparameterized")
            ax = self.leaf_axes(path, leaf.shape)
            _, m, n = axes_lib.matrix_shape(leaf.shape, ax)
            self.check_leaf_rank(path, m, n)
            if _is_concrete(leaf) and not _all_finite(leaf):
                raise ValueError(f"params: leaf {path!r} contains NaN or Inf; fix the base weights "
                                 "before attaching an adapter")
            w = axes_lib.to_matrix(leaf, ax)
            w_base, f = self.init_leaf(self._leaf_key(key, path), w, path)
            adapters[path] = f
            if w_base is not w:
                new_base[path] = axes_lib.from_matrix(w_base.astype(leaf.dtype), ax, leaf.shape)
        base = tree_lib.replace(params, new_base) if new_base else params
        return base, adapters

    def _check(self, base, adapters, argname="adapters"):
        if not isinstance(adapters, dict) or not adapters:
            raise TypeError(f"{argname} must be the non-empty dict returned by init(), got {type(adapters).__name__}")
        flat = tree_lib.flatten(base)
        for path, f in adapters.items():
            if path not in flat:
                raise ValueError(
                    f"{argname}: adapter for {path!r} has no matching leaf in the params; adapters made "
                    f"for another base? Nearest paths: {tree_lib._nearest(path, flat)}")
            if not isinstance(f, dict) or "a" not in f or "b" not in f:
                raise TypeError(f"{argname}[{path!r}] must be a dict with 'a' and 'b' factors, got {f!r:.80}")
            leaf = flat[path]
            ax = self.leaf_axes(path, leaf.shape)
            bshape, m, n = axes_lib.matrix_shape(leaf.shape, ax)
            a, b = f["a"], f["b"]
            if a.ndim != len(bshape) + 2 or b.ndim != len(bshape) + 2 or \
                    tuple(a.shape[:-2]) != bshape or tuple(b.shape[:-2]) != bshape or \
                    a.shape[-2] != m or b.shape[-1] != n or a.shape[-1] != b.shape[-2]:
                raise ValueError(
                    f"{argname}[{path!r}]: factors a{tuple(a.shape)} b{tuple(b.shape)} do not fit the "
                    f"base leaf {tuple(leaf.shape)} (matrix view {bshape + (m, n)}); adapters made for "
                    "another base, or a different `axes`/`rank` config")
            for nm, x in f.items():
                if not jnp.issubdtype(x.dtype, jnp.floating):
                    raise TypeError(f"{argname}[{path!r}][{nm!r}] has dtype {x.dtype}; factors must be floating")
            if not jnp.issubdtype(leaf.dtype, jnp.floating):
                raise TypeError(f"params leaf {path!r} has dtype {leaf.dtype}; expected floating")
        return flat

    def apply_leaf(self, w, f: dict):
        """Matrix-view effective weight ``(W + s A B) * c`` in ``w.dtype``."""
        form = self.factors(w, f)
        dt = form.a.dtype
        v = w.astype(dt) + form.scale * (form.a @ form.b.astype(dt))
        if form.col_scale is not None:
            v = v * form.col_scale[..., None, :].astype(dt)
        return v.astype(w.dtype)

    def _map_leaves(self, params, adapters, fn, argname="adapters"):
        flat = self._check(params, adapters, argname)
        new = {}
        for path, f in adapters.items():
            leaf = flat[path]
            ax = self.leaf_axes(path, leaf.shape)
            new[path] = axes_lib.from_matrix(fn(axes_lib.to_matrix(leaf, ax), f, path), ax, leaf.shape)
        return tree_lib.replace(params, new)

    def materialize(self, base, adapters):
        """``base`` with every adapted leaf replaced by its effective weight (differentiable)."""
        return self._map_leaves(base, adapters, lambda w, f, p: self.apply_leaf(w, f))

    def merge(self, base, adapters):
        """Dense weights for inference (same values as :meth:`materialize`, gradients stopped)."""
        return jax.lax.stop_gradient(self.materialize(base, adapters))

    def unmerge(self, merged, adapters):
        """Recover the base from merged weights: ``W = W_merged - s A B``."""
        return self._map_leaves(merged, adapters, self.unmerge_leaf)

    def delta(self, base, adapters) -> dict:
        """``{path: W_eff - W}`` per adapted leaf (leaf layout)."""
        flat = self._check(base, adapters)
        out = {}
        for path, f in adapters.items():
            leaf = flat[path]
            ax = self.leaf_axes(path, leaf.shape)
            w = axes_lib.to_matrix(leaf, ax)
            out[path] = axes_lib.from_matrix(self.apply_leaf(w, f) - w, ax, leaf.shape)
        return out

    def num_params(self, adapters) -> int:
        """Number of trainable scalars in ``adapters``."""
        return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(adapters)))
