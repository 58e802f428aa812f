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

Precision rule (one rounding)
-----------------------------
Every effective weight -- :meth:`Reparam.materialize`, :meth:`~Reparam.merge`,
:meth:`~Reparam.delta`, :meth:`~Reparam.unmerge`, :func:`lrjax.reparam.multi.combine`, DoRA's
direction and norm, and the materialize fallback of :func:`lrjax.factored` -- is computed in the
*compute dtype* ``lrjax._validation.compute_dtype(w.dtype, factor dtypes)`` =
``promote_types(w, A, B, [m,] float32)`` and cast **once** to the base leaf's dtype ``w.dtype``.
So a float32 base with bfloat16 factors materializes to exactly ``W`` at init (``B = 0``), a
bfloat16 base with bfloat16 factors merges to ``W + s A B`` rounded once to bfloat16 (not twice),
and merged weights keep the base's dtype, so merged inference runs at the base's precision and
speed. Outputs always have the base leaf's dtype; factors keep their own dtype. (Under ``jit``
XLA may fuse the float32 arithmetic differently from eager execution, e.g. into an FMA; both are
one rounding of a float32 computation and can differ by one ulp of a float32 result.)

Degenerate but valid inputs
---------------------------
* DoRA: the direction of an all-zero column of ``W + s A B`` (a pruned output unit) is defined
  as zero, so that column of ``W_eff`` is exactly 0 and its gradients are finite (zero through
  that column); see :mod:`lrjax.reparam.dora`.
* PiSSA on a rank-deficient or all-zero weight: singular values that are 0 give zero factor
  columns; ``init`` stays finite and ``materialize`` returns ``W`` up to the rounding of the
  stored residual (exactly for an all-zero weight); see :mod:`lrjax.reparam.pissa`.
* ``init`` refuses factors or a residual that overflow their dtype (e.g. DoRA's ``m`` in float16
  for a column norm above 65504), naming ``dtype`` and the leaf.

Validation and non-finite values
--------------------------------
Configs validate every field at construction (``rank`` an int ``>= 1``; ``alpha`` a finite
positive real or ``None``; booleans real bools; ``dtype`` a floating dtype or its name;
``targets`` a regex/list of regexes/callable; ``axes`` ``None``/``Axes``/dict/callable). The rank
rule is lrjax's one rule, :func:`lrjax._validation.check_rank`: ``1 <= rank <= min(M, N)`` of
every targeted leaf's matrix view, checked in :meth:`~Reparam.init` naming the leaf. Every
method checks the structure of ``params`` (a pytree of arrays) and ``adapters`` (the dict from
``init``: string paths, each a dict of array factors with exactly this variant's keys -- a DoRA
``m`` handed to LoRA is refused) before anything is traced.

NaN/Inf: ``init`` refuses a targeted base leaf with NaN/Inf (concrete arrays). ``merge``,
``unmerge``, ``delta`` and ``combine`` refuse concrete factors or targeted base leaves with
NaN/Inf (these produce weights that leave the training loop). ``materialize`` and the factored
path do not read values (they run every step, usually under ``jit``): NaN/Inf in their inputs
propagate to the outputs like any ``jax.numpy`` operation.
"""
from __future__ import annotations

import dataclasses
import numbers
import zlib
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lrjax import _validation as V
from lrjax._validation import check_key, check_params
from lrjax import axes as axes_lib
from lrjax import tree as tree_lib

__all__ = ["Reparam", "LowRankForm", "Adapters"]

Adapters = dict  # {path: {"a": ..., "b": ..., optional extras}}

_FACTOR_OWNER = {"m": "lrjax.DoRA (its magnitude vector)"}


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


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, jax.core.Tracer))


def _leaf_kind(x) -> str:
    if isinstance(x, (list, tuple)):
        return f"a {type(x).__name__}"
    return f"a {type(x).__name__} ({V._fmt(x)})"


def check_axes_spec(spec, argname: str = "axes"):
    """``None``, an :class:`~lrjax.axes.Axes`, a mapping ``{regex: Axes}`` or a callable."""
    if spec is None or callable(spec) and not isinstance(spec, tuple):
        return spec
    if isinstance(spec, axes_lib.Axes):
        axes_lib.check_axes_value(spec, argname)
        return spec
    items = None
    if isinstance(spec, Mapping):
        items = list(spec.items())
    elif isinstance(spec, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in spec) and spec:
        items = list(spec)  # the frozen form of a dict
    if items is None:
        raise TypeError(f"{argname} must be None, an lrjax.axes.Axes, a dict {{regex: Axes}} or a "
                        f"callable (path, shape) -> Axes; got {_leaf_kind(spec)}")
    for pat, ax in items:
        axes_lib.check_pattern(pat, argname)
        if not isinstance(ax, axes_lib.Axes):
            raise TypeError(f"{argname}[{pat!r}] must be an lrjax.axes.Axes(batch=..., inp=..., out=...), "
                            f"got {_leaf_kind(ax)}")
        axes_lib.check_axes_value(ax, f"{argname}[{pat!r}]")
    return spec


@dataclasses.dataclass(frozen=True)
class Reparam:
    """Base class: low-rank additive reparameterization of the leaves selected by ``targets``.

    Subclasses override :meth:`init_leaf` and :meth:`factors` (and :meth:`unmerge_leaf` when the
    inverse differs). Config fields are static (hashable), so a ``Reparam`` can be closed over or
    passed as a static argument to ``jax.jit``. All fields are validated at construction.
    Effective weights are computed in ``promote_types(w, factors, float32)`` and rounded once to
    the base leaf's dtype (see the module docstring).
    """

    rank: int = 8
    alpha: float | None = None
    targets: Any = "kernel"
    axes: Any = None
    dtype: Any = None  # factor dtype; None = the base leaf's dtype

    #: factor names this variant reads (anything else in an adapter is refused)
    factor_keys = ("a", "b")

    # ----------------------------------------------------------------- config
    def __post_init__(self):
        V.check_int(self.rank, "rank", low=1)
        V.check_float(self.alpha, "alpha", low=0.0, low_open=True, allow_none=True)
        V.check_dtype(self.dtype, "dtype", allow_none=True)
        if isinstance(self.targets, list):  # keep the dataclass hashable
            object.__setattr__(self, "targets", tuple(self.targets))
        tree_lib._matcher(self.targets)  # TypeError/ValueError naming `targets`
        if isinstance(self.targets, tuple):
            for t in self.targets:
                tree_lib._matcher(t)
        check_axes_spec(self.axes, "axes")
        if isinstance(self.axes, Mapping):
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
        cd = self.compute_dtype(w_merged, f)
        return (w_merged.astype(cd) - _low_rank(form, cd)).astype(w_merged.dtype)

    # ---------------------------------------------------------------- helpers
    def factor_dtype(self, w):
        return jnp.dtype(self.dtype) if self.dtype is not None else w.dtype

    @staticmethod
    def compute_dtype(w, f: dict):
        """``promote_types(w, every factor, float32)``: the dtype effective weights are computed in."""
        return V.compute_dtype(w.dtype, *(x.dtype for x in f.values()))

    def check_leaf_rank(self, path: str, m: int, n: int):
        """Refuse a config rank above ``min(M, N)`` of a targeted leaf (lrjax's one rank rule)."""
        V.check_rank(self.rank, m, n, "rank", where=f"leaf {path!r}")

    def check_factor_rank(self, path: str, r: int, argname: str = "adapters"):
        """Refuse factors whose rank differs from the config's ``rank`` (the scale ``alpha / rank``
        would silently be wrong). Variants whose ranks vary per leaf override this."""
        if r != self.rank:
            raise ValueError(f"{argname}[{path!r}]: factors have rank {r} but this {type(self).__name__} has "
                             f"rank={self.rank} (its scale alpha/rank assumes {self.rank}); use the config the "
                             "adapters were made with")

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
        check_key(key, "key")
        flat = check_params(params, "params")
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
            for nm, x in list(f.items()) + [("base", w_base)]:
                if _is_concrete(x) and not _all_finite(x):
                    raise ValueError(f"dtype: the initial {nm!r} of leaf {path!r} overflows {x.dtype} "
                                     "(values too large for the factor or base dtype); use a wider `dtype`")
            adapters[path] = f
            if w_base is not w:
                new_base[path] = axes_lib.from_matrix(w_base.astype(leaf.dtype), ax, leaf.shape)
        base = tree_lib.replace(params, new_base) if new_base else params
        return base, adapters

    def _suggest(self, key: str) -> str:
        owner = _FACTOR_OWNER.get(key)
        if owner:
            return f"{key!r} belongs to {owner}: load these adapters with that config"
        return (f"{type(self).__name__} reads only {list(self.factor_keys)}; adapters made by another "
                "variant or edited by hand?")

    def _check(self, base, adapters, argname="adapters", basename="params"):
        """Validate ``base`` (a pytree of arrays) and ``adapters`` against this config, eagerly."""
        flat = check_params(base, basename)
        if not isinstance(adapters, Mapping):
            raise TypeError(f"{argname} must be the dict {{leaf path: {{'a': A, 'b': B, ...}}}} returned "
                            f"by init(), got {_leaf_kind(adapters)}")
        if not adapters:
            raise ValueError(f"{argname} is empty; pass the adapters returned by {type(self).__name__}.init()")
        for path, f in adapters.items():
            if not isinstance(path, str):
                raise TypeError(f"{argname}: keys must be leaf path strings such as 'Dense_0/kernel', "
                                f"got {_leaf_kind(path)}")
            if path not in flat:
                raise ValueError(
                    f"{argname}: adapter for {path!r} has no matching leaf in the {basename}; adapters made "
                    f"for another base? Nearest paths: {tree_lib._nearest(path, flat)}")
            if not isinstance(f, Mapping):
                raise TypeError(f"{argname}[{path!r}] must be a dict with 'a' and 'b' factors, got "
                                f"{_leaf_kind(f)}")
            for nm in f:
                if nm not in self.factor_keys:
                    raise ValueError(f"{argname}[{path!r}] has an unknown factor {nm!r}: {self._suggest(nm)}")
            for nm in self.factor_keys:
                if nm not in f:
                    raise ValueError(f"{argname}[{path!r}] has no factor {nm!r}; {type(self).__name__} needs "
                                     f"{list(self.factor_keys)}"
                                     + (": these are not DoRA adapters" if nm == "m" else ""))
            for nm in self.factor_keys:
                x = f[nm]
                if not _is_array(x):
                    raise TypeError(f"{argname}[{path!r}][{nm!r}] must be an array, got {_leaf_kind(x)}; "
                                    "wrap it with jnp.asarray")
                if not jnp.issubdtype(x.dtype, jnp.floating):
                    raise TypeError(f"{argname}[{path!r}][{nm!r}] has dtype {x.dtype}; factors must be floating")
            leaf = flat[path]
            if not jnp.issubdtype(leaf.dtype, jnp.floating):
                raise TypeError(f"{basename} leaf {path!r} has dtype {leaf.dtype}; expected floating")
            try:
                ax = self.leaf_axes(path, leaf.shape)
            except (TypeError, ValueError) as e:
                raise type(e)(f"{argname}[{path!r}]: {e}") from None
            bshape, m, n = axes_lib.matrix_shape(leaf.shape, ax)
            a, b = f["a"], f["b"]
            if a.ndim != len(bshape) + 2 or b.ndim != len(bshape) + 2 or \
                    tuple(a.shape[:-2]) != bshape or tuple(b.shape[:-2]) != bshape or \
                    a.shape[-2] != m or b.shape[-1] != n or a.shape[-1] != b.shape[-2]:
                raise ValueError(
                    f"{argname}[{path!r}]: factors a{tuple(a.shape)} b{tuple(b.shape)} do not fit the "
                    f"base leaf {tuple(leaf.shape)} (matrix view {bshape + (m, n)}); adapters made for "
                    "another base, or a different `axes`/`rank` config")
            self.check_factor_rank(path, a.shape[-1], argname)
            self._check_extra(path, f, argname)
        return flat

    def _check_extra(self, path: str, f: Mapping, argname: str):
        """Variant-specific shape checks of extra factors (DoRA's ``m``)."""

    def _check_finite(self, flat, adapters, argname="adapters", basename="params"):
        for path, f in adapters.items():
            for nm in self.factor_keys:
                x = f[nm]
                if _is_concrete(x) and not _all_finite(x):
                    raise ValueError(f"{argname}[{path!r}][{nm!r}] contains NaN or Inf; refusing to fold "
                                     "non-finite factors into weights (training diverged?)")
            leaf = flat[path]
            if _is_concrete(leaf) and not _all_finite(leaf):
                raise ValueError(f"{basename}: leaf {path!r} contains NaN or Inf")

    def effective(self, w, f: dict):
        """Matrix-view ``(W + s A B) * c`` in the compute dtype (not rounded to ``w.dtype``)."""
        form = self.factors(w, f)
        cd = self.compute_dtype(w, f)
        v = w.astype(cd) + _low_rank(form, cd)
        if form.col_scale is not None:
            v = v * form.col_scale[..., None, :].astype(cd)
        return v

    def apply_leaf(self, w, f: dict):
        """Matrix-view effective weight ``(W + s A B) * c``: computed in the compute dtype,
        rounded once to ``w.dtype``."""
        return self.effective(w, f).astype(w.dtype)

    def _map_leaves(self, params, adapters, fn, argname="adapters", basename="params", finite=False):
        flat = self._check(params, adapters, argname, basename)
        if finite:
            self._check_finite(flat, adapters, argname, basename)
        new = {}
        for path, f in adapters.items():
            leaf = flat[path]
            ax = self.leaf_axes(path, leaf.shape)
            new[path] = axes_lib.from_matrix(fn(axes_lib.to_matrix(leaf, ax), f, path), ax, leaf.shape)
        return tree_lib.replace(params, new)

    def materialize(self, base, adapters):
        """``base`` with every adapted leaf replaced by its effective weight (differentiable)."""
        return self._map_leaves(base, adapters, lambda w, f, p: self.apply_leaf(w, f), basename="base")

    def merge(self, base, adapters):
        """Dense weights for inference (same values as :meth:`materialize`, gradients stopped).

        Refuses concrete NaN/Inf factors or targeted base leaves."""
        return jax.lax.stop_gradient(self._map_leaves(
            base, adapters, lambda w, f, p: self.apply_leaf(w, f), basename="base", finite=True))

    def unmerge(self, merged, adapters):
        """Recover the base from merged weights: ``W = W_merged - s A B`` (one rounding)."""
        return self._map_leaves(merged, adapters, self.unmerge_leaf, basename="merged", finite=True)

    def delta_matrix(self, w, f: dict):
        """Matrix-view ``W_eff - W`` in the compute dtype (unrounded); used by :func:`multi.combine`."""
        return self.effective(w, f) - w.astype(self.compute_dtype(w, f))

    def delta(self, base, adapters) -> dict:
        """``{path: W_eff - W}`` per adapted leaf (leaf layout), computed in the compute dtype and
        rounded once to the leaf's dtype."""
        flat = self._check(base, adapters, basename="base")
        self._check_finite(flat, adapters, basename="base")
        out = {}
        for path, f in adapters.items():
            leaf = flat[path]
            ax = self.leaf_axes(path, leaf.shape)
            w = axes_lib.to_matrix(leaf, ax)
            out[path] = axes_lib.from_matrix(self.delta_matrix(w, f).astype(leaf.dtype), ax, leaf.shape)
        return out

    def num_params(self, adapters) -> int:
        """Number of trainable scalars in ``adapters``."""
        if not isinstance(adapters, Mapping):
            raise TypeError(f"adapters must be the dict returned by init(), got {_leaf_kind(adapters)}")
        leaves = jax.tree_util.tree_leaves(adapters)
        for x in leaves:
            if not _is_array(x):
                raise TypeError(f"adapters must hold arrays, found {_leaf_kind(x)}")
        return int(sum(np.prod(x.shape) for x in leaves))


def _low_rank(form: LowRankForm, cd):
    """``s * (A @ B)`` with both factors in the compute dtype ``cd``."""
    return form.scale * (form.a.astype(cd) @ form.b.astype(cd))
