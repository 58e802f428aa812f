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

Activation-space adapters (``activation_space = True``: FlyLoRA's top-k routed ranks, NeRA's spline
branch, mixtures of low-rank experts) have no such form: the adapted layer computes
``x W + branch(x, x W, factors)`` (:meth:`Reparam.branch`), which depends on the input. They run only
through :func:`lrjax.factored` (the interpreter of :mod:`lrjax.interpreter` calls the branch at each
use of the kernel); ``materialize``/``merge``/``unmerge``/``delta`` raise
:class:`lrjax.interpreter.NotMergeable`. Frozen factors that a rule updates after each forward
(``state_keys``, e.g. FlyLoRA's router bias) come back from the factored forward as ``state``
(:meth:`Reparam.update_state`, :meth:`Reparam.with_state`).

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
import zlib
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lrjax import _validation as V
from lrjax._validation import check_key, check_params
from lrjax import axes as axes_lib
from lrjax import tree as tree_lib
from lrjax.interpreter import Branch, LowRank, NotMergeable

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


def _all_zero(x) -> bool:
    with jax.ensure_compile_time_eval():
        return not bool(jnp.any(x != 0))


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
    #: factors that ``grad``/optax must not see (see :meth:`split`); always a subset of ``factor_keys``
    frozen_keys = ()
    #: frozen factors that are raw PRNG key data (``uint32[2]``, ``jax.random.key_data``) from which
    #: the variant regenerates random bases inside :meth:`factors`; the bases are never stored
    seed_keys = ()
    #: ``True`` for data-aware inits: :meth:`init` then requires ``grads=`` (see :func:`estimate_grads`)
    needs_grads = False
    #: ``True`` when :meth:`init` returns a rewritten base (PiSSA, LoRA-GA): the adapter alone is not a
    #: delta on the original weights (PEFT export needs the rank-2r conversion)
    rewrites_base = False
    #: ``True`` when :meth:`init_leaf` and :meth:`check_leaf_rank` need the leaf's own shape (conv
    #: kernels: the matrix view alone does not say ``k`` or ``C_in``); :meth:`init` then passes
    #: ``shape=leaf.shape`` to both
    uses_leaf_shape = False
    #: ``True`` for activation-space adapters (FlyLoRA, NeRA, mixtures): the adapted layer computes
    #: ``x W + branch(x)`` (:meth:`branch`), which depends on the input ``x``, so there is no
    #: effective weight -- ``materialize``/``merge``/``unmerge``/``delta`` raise
    #: :class:`lrjax.interpreter.NotMergeable`; run the model through :func:`lrjax.factored`
    activation_space = False
    #: frozen factors updated by a rule each forward instead of by gradient (FlyLoRA's router bias
    #: ``d``): :func:`lrjax.factored` then returns ``(output, state)`` (see :meth:`update_state`);
    #: always a subset of ``frozen_keys``
    state_keys = ()
    #: groups of factor names that are present together or not at all at a leaf (MTLoRA's task pair
    #: ``("ta", "tb")`` exists only at its task-specific leaves); every other factor is required
    optional_groups = ()

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if not set(cls.state_keys) <= set(cls.frozen_keys):
            raise TypeError(f"{cls.__name__}.state_keys {cls.state_keys} must be a subset of frozen_keys "
                            f"{cls.frozen_keys}: rule-updated state must get no gradient")
        if not {k for g in cls.optional_groups for k in g} <= set(cls.factor_keys):
            raise TypeError(f"{cls.__name__}.optional_groups {cls.optional_groups} must name factor_keys")
        if cls.activation_space and cls.branch is Reparam.branch and cls.kernel_value is Reparam.kernel_value:
            raise TypeError(f"{cls.__name__} sets activation_space = True but defines neither branch(x, y, f, path) "
                            "nor kernel_value(): the interpreter would have nothing to compute")

    def _present_keys(self, f: Mapping, argname: str, path: str) -> list:
        """The factor names a leaf's adapter must hold: every required key plus each optional group
        it holds any of (a group held in part is refused)."""
        opt = {k for g in self.optional_groups for k in g}
        keys = [k for k in self.factor_keys if k not in opt]
        for g in self.optional_groups:
            have = [k for k in g if k in f]
            if have and len(have) != len(g):
                miss = [k for k in g if k not in f]
                raise ValueError(f"{argname}[{path!r}] has {have[0]!r} but no {miss[0]!r}; the factors {list(g)} "
                                 "come together")
            if have:
                keys.extend(g)
        return [k for k in self.factor_keys if k in keys]

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

    # The matrix view of a leaf. Default: the permutation + grouping of :mod:`lrjax.axes`. A variant
    # whose factors live in another matricization (loralib's ConvLoRA) overrides the three together;
    # :func:`lrjax.factored` then materializes that leaf instead of following it symbolically.
    def view_shape(self, path: str, shape) -> tuple[tuple[int, ...], int, int]:
        """``(batch shape, M, N)`` of the matrix view of a leaf of this ``shape``."""
        return axes_lib.matrix_shape(shape, self.leaf_axes(path, shape))

    def to_view(self, path: str, leaf):
        """Leaf layout -> matrix view ``[*batch, M, N]``."""
        return axes_lib.to_matrix(leaf, self.leaf_axes(path, leaf.shape))

    def from_view(self, path: str, mat, shape):
        """Matrix view -> leaf layout of ``shape`` (inverse of :meth:`to_view`)."""
        return axes_lib.from_matrix(mat, self.leaf_axes(path, shape), shape)

    @property
    def axes_view(self) -> bool:
        """``True`` when the matrix view is the :mod:`lrjax.axes` one (the factored path follows it)."""
        t = type(self)
        return t.to_view is Reparam.to_view and t.from_view is Reparam.from_view

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

    # ------------------------------------------------- activation-space hooks
    def branch(self, x, y, f: dict, path: str):
        """The input-dependent term of an activation-space adapter (``activation_space = True``):
        the adapted product is ``x W + branch(x, x W, f)``.

        A complete activation-space variant (see ``GatedLoRA`` in ``tests/test_interpreter.py``)
        sets ``activation_space = True`` and ``factor_keys`` (the names of its factors), returns
        ``(w_base, {name: array})`` from :meth:`init_leaf`, overrides :meth:`check_factors` (or
        ``_check_extra`` when its factors include an ``(a [M, r], b [r, N])`` pair) to check their
        shapes, and defines this method; rule-updated factors go in ``state_keys``, which must be a
        subset of ``frozen_keys`` (checked when the class is created).

        ``x: [..., M]`` is the layer input in the kernel's matrix view (its contracted axes
        flattened last; the input's dtype), ``y: [..., N]`` the base product ``x W`` (before any
        bias), ``f`` the leaf's factors (frozen ones behind ``stop_gradient``; for an ``[L, ...]``
        stack scanned by the model, one layer's slice). Returns the term to add, ``[..., N]``, or
        :class:`lrjax.interpreter.WithAux` ``(term, aux)`` where ``aux`` (a pytree of arrays) feeds
        :meth:`update_state`. Compute in ``promote_types(x, factors, float32)``; the interpreter adds
        the term to ``y`` in float32 and rounds once to the product's dtype."""
        raise TypeError(f"{type(self).__name__}.branch is only defined for activation-space variants "
                        "(activation_space = True), which override it")

    def update_state(self, f: dict, aux, path: str) -> dict:
        """The rule that updates the ``state_keys`` of one leaf after a forward: ``f`` the leaf's
        current factors, ``aux`` the sum over the forward's uses of the kernel of what
        :meth:`branch` reported (stacked ``[L, ...]`` for a scanned stack). Returns ``{state key:
        new value}``. Default: no state."""
        return {}

    def next_state(self, adapters: Adapters, aux: dict) -> dict:
        """``{path: update_state(adapters[path], aux[path], path)}`` for the leaves whose kernels
        reported aux in a forward (what :func:`lrjax.factored` returns as ``state``)."""
        return {k: {sk: jax.lax.stop_gradient(v) for sk, v in self.update_state(adapters[k], a, k).items()}
                for k, a in aux.items() if k in adapters}

    def with_state(self, adapters: Adapters, state: dict) -> Adapters:
        """``adapters`` with the rule-updated factors of ``state`` (``{path: {state key: value}}``,
        from :func:`lrjax.factored`) put in; shapes and dtypes must match the old values."""
        if not isinstance(adapters, Mapping):
            raise TypeError(f"adapters must be the dict returned by init(), got {_leaf_kind(adapters)}")
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be the {{path: {{key: array}}}} dict returned by lrjax.factored, "
                            f"got {_leaf_kind(state)}")
        out = dict(adapters)
        for path, upd in state.items():
            if path not in adapters:
                raise ValueError(f"state: no adapter at path {path!r}; adapters have {list(adapters)[:6]}")
            if not isinstance(upd, Mapping):
                raise TypeError(f"state[{path!r}] must be a dict {{key: array}}, got {_leaf_kind(upd)}")
            bad = set(upd) - set(self.state_keys)
            if bad:
                raise ValueError(f"state[{path!r}]: {sorted(bad)} are not state keys of {type(self).__name__} "
                                 f"(state_keys={self.state_keys})")
            new = dict(adapters[path])
            for k, v in upd.items():
                old = new[k]
                if not _is_array(v) or tuple(v.shape) != tuple(old.shape) or v.dtype != old.dtype:
                    got = f"{v.dtype}{tuple(v.shape)}" if _is_array(v) else type(v).__name__
                    raise ValueError(f"state[{path!r}][{k!r}] must be an array of shape {tuple(old.shape)} and "
                                     f"dtype {old.dtype} (like the adapter's), got {got}")
                if _is_concrete(v) and not _all_finite(v):
                    raise ValueError(f"state[{path!r}][{k!r}] contains NaN or Inf; refusing non-finite state")
                new[k] = v
            out[path] = new
        return out

    def kernel_value(self, path: str, leaf, f: dict, *, mode: str = "auto"):
        """What this variant hands :mod:`lrjax.interpreter` for one adapted kernel (the extension
        point of :func:`lrjax.factored`): a :class:`~lrjax.interpreter.LowRank` ``(W, A, B, s, c)``
        in the leaf's :mod:`lrjax.axes` view (weight-space variants), a
        :class:`~lrjax.interpreter.Branch` calling :meth:`branch` (activation-space variants), or
        the dense effective weight (a variant with its own matrix view, e.g. ConvLoRA). Override it
        to hand in another :class:`~lrjax.interpreter.KernelValue`."""
        fz = self.frozen_view(f)
        if self.activation_space:
            if not self.axes_view:
                raise TypeError(f"{type(self).__name__}: an activation-space variant must use the lrjax.axes "
                                "matrix view (do not override to_view/from_view)")
            return Branch(leaf, self.leaf_axes(path, leaf.shape), fz,
                          lambda x, y, fs: self.branch(x, y, fs, path), path, type(self).__name__)
        if not self.axes_view:
            return self.from_view(path, self.apply_leaf(self.to_view(path, leaf), f), leaf.shape)
        ax = self.leaf_axes(path, leaf.shape)
        form = self.factors(axes_lib.to_matrix(leaf, ax), fz)
        return LowRank(leaf, form.a, form.b.astype(form.a.dtype), form.scale, form.col_scale, ax, path, mode)

    def _refuse_weight(self, op: str):
        if self.activation_space:
            raise NotMergeable(f"{type(self).__name__}.{op}: {type(self).__name__} is an activation-space adapter "
                               "(its output depends on the input x), so it has no effective weight to "
                               f"{op}; run the model with lrjax.factored(fn, rp)(base, adapters, x)")

    # ---------------------------------------------------------------- helpers
    def factor_dtype(self, w):
        return jnp.dtype(self.dtype) if self.dtype is not None else w.dtype

    @staticmethod
    def compute_dtype(w, f: dict):
        """``promote_types(w, every factor, float32)``: the dtype effective weights are computed in."""
        return V.compute_dtype(w.dtype, *(x.dtype for x in f.values() if jnp.issubdtype(x.dtype, jnp.floating)))

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

    def leaf_key(self, key, path: str):
        """The per-leaf PRNG key ``fold_in(key, crc32(path) & 0x7FFFFFFF)`` that :meth:`init` hands to
        :meth:`init_leaf`: it depends only on ``key`` and the leaf's path (not on the other targets,
        the process or the device count), so seed-regenerated factors (NOLA) and generated ones
        (HypeLoRA) are reproducible. A variant may override it (NOLA's ViT convention shares one key)."""
        return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)

    # ------------------------------------------------------------- protocol
    def init(self, key, params, *, grads=None) -> tuple[Any, Adapters]:
        """Create adapters for every targeted leaf; returns ``(base, adapters)``.

        The per-leaf random key is ``fold_in(key, crc32(path))``: a leaf's factors do not depend
        on which other leaves are targeted, on the process or on the device count.

        Args:
          key: a JAX PRNG key (``jax.random.key`` or a raw ``uint32[2]`` key).
          params: the pytree of arrays to adapt.
          grads: data for data-aware inits (variants with ``needs_grads = True``: LoRA-GA, LoRA-SB):
            ``{path: G}`` with ``G = mean dL/dW`` of exactly the targeted leaves (leaf layout, floating,
            finite), as returned by :func:`lrjax.reparam.estimate_grads`. Refused for variants
            that do not read it, and required by those that do.

        Raises:
          TypeError/ValueError naming ``key``, ``params``, ``grads``, ``rank`` or ``targets``: a
          leaf with NaN/Inf, a rank above ``min(M, N)``, a data-aware init without ``grads``, grads
          for leaves this config does not target (or missing, or of another shape).
        """
        check_key(key, "key")
        flat = check_params(params, "params")
        paths = self._targets(params)
        gflat = self._check_grads(grads, paths, flat)
        adapters: Adapters = {}
        new_base = {}
        for path in paths:
            leaf = flat[path]
            if not jnp.issubdtype(leaf.dtype, jnp.floating):
                raise TypeError(f"targets: leaf {path!r} has dtype {leaf.dtype}; only floating "
                                "leaves can be reparameterized")
            _, m, n = self.view_shape(path, leaf.shape)
            kw = {"shape": tuple(leaf.shape)} if self.uses_leaf_shape else {}
            self.check_leaf_rank(path, m, n, **kw)
            if _is_concrete(leaf) and not _all_finite(leaf):
                raise ValueError(f"params: leaf {path!r} contains NaN or Inf; fix the base weights "
                                 "before attaching an adapter")
            w = self.to_view(path, leaf)
            if self.needs_grads:
                g = self.to_view(path, gflat[path]).astype(V.compute_dtype(gflat[path].dtype))
                w_base, f = self.init_leaf(self.leaf_key(key, path), w, path, g=g, **kw)
            else:
                w_base, f = self.init_leaf(self.leaf_key(key, path), w, path, **kw)
            for nm, x in list(f.items()) + [("base", w_base)]:
                if nm in self.seed_keys:
                    continue
                if _is_concrete(x) and not _all_finite(x):
                    raise ValueError(f"dtype: the initial {nm!r} of leaf {path!r} overflows {x.dtype} "
                                     "(values too large for the factor or base dtype); use a wider `dtype`")
            adapters[path] = f
            if w_base is not w:
                new_base[path] = self.from_view(path, w_base.astype(leaf.dtype), leaf.shape)
        base = tree_lib.replace(params, new_base) if new_base else params
        return base, adapters

    def _check_grads(self, grads, paths, flat):
        """Validate ``init``'s ``grads`` against the targeted ``paths``; returns it (or ``None``)."""
        name = type(self).__name__
        if grads is None:
            if self.needs_grads:
                raise ValueError(
                    f"grads: {name} is a data-aware init and needs grads={{path: mean dL/dW}} for its targeted "
                    "leaves; estimate them with lrjax.reparam.estimate_grads(loss_fn, params, batches, "
                    "targets=rp.targets)")
            return None
        if not self.needs_grads:
            raise ValueError(f"grads: {name} does not use gradients (its init is data-free); drop grads=, or use "
                             "a data-aware variant such as lrjax.LoRAGA")
        if not isinstance(grads, Mapping):
            raise TypeError(f"grads must be the dict {{leaf path: G}} of the targeted leaves (as returned by "
                            f"lrjax.reparam.estimate_grads), got {_leaf_kind(grads)}")
        if any(isinstance(v, Mapping) for v in grads.values()):
            raise TypeError("grads must be the flat dict {leaf path: G} of the targeted leaves, got a nested pytree "
                            "(a jax.grad output?); use lrjax.reparam.estimate_grads(loss_fn, params, batches, "
                            "targets=rp.targets), or {p: g for p, g in lrjax.tree.flatten(grad_tree).items() if p in "
                            "targeted paths}")
        for p in grads:
            if not isinstance(p, str):
                raise TypeError(f"grads: keys must be leaf path strings such as 'Dense_0/kernel', got "
                                f"{_leaf_kind(p)}")
            if p not in paths:
                where = "is not a leaf of params" if p not in flat else "is not targeted by this config"
                raise ValueError(f"grads: {p!r} {where} (targeted: {paths[:6]}); pass the gradients of exactly "
                                 f"the targeted leaves (estimate_grads(..., targets=rp.targets))")
        for p in paths:
            if p not in grads:
                raise ValueError(f"grads has no entry for the targeted leaf {p!r}; estimate it with "
                                 "lrjax.reparam.estimate_grads(loss_fn, params, batches, targets=rp.targets)")
            g = grads[p]
            if not _is_array(g):
                raise TypeError(f"grads[{p!r}] must be an array, got {_leaf_kind(g)}")
            if not jnp.issubdtype(g.dtype, jnp.floating):
                raise TypeError(f"grads[{p!r}] has dtype {g.dtype}; gradients must be floating")
            if tuple(g.shape) != tuple(flat[p].shape):
                raise ValueError(f"grads[{p!r}] has shape {tuple(g.shape)} but the leaf has shape "
                                 f"{tuple(flat[p].shape)}; pass dL/dW in the leaf's own layout")
            if _is_concrete(g) and not _all_finite(g):
                raise ValueError(f"grads[{p!r}] contains NaN or Inf; fix the loss or the batches before a "
                                 "data-aware init")
            if _is_concrete(g) and _all_zero(g):
                raise ValueError(f"grads[{p!r}] is all zeros: the leaf does not affect the loss on these batches "
                                 "(not on the loss path, or a saturated/dead layer), so there is no direction to "
                                 "initialize from; drop it from `targets` or check the loss_fn")
        return grads

    # ------------------------------------------------------- trainable vs frozen
    def _check_adapters_dict(self, adapters, argname, complete=True):
        if not isinstance(adapters, Mapping):
            raise TypeError(f"{argname} must be the dict {{leaf path: {{factor: array}}}} returned by "
                            f"{type(self).__name__}.init(), got {_leaf_kind(adapters)}")
        for path, f in adapters.items():
            if not isinstance(path, str):
                raise TypeError(f"{argname}: keys must be leaf path strings, got {_leaf_kind(path)}")
            if not isinstance(f, Mapping):
                raise TypeError(f"{argname}[{path!r}] must be a dict of factors, got {_leaf_kind(f)}")
            for nm in f:
                if nm not in self.factor_keys:
                    raise ValueError(f"{argname}[{path!r}] has an unknown factor {nm!r}: {self._suggest(nm)}")
            if complete:
                for nm in self._present_keys(f, argname, path):
                    if nm not in f:
                        raise ValueError(f"{argname}[{path!r}] has no factor {nm!r}; {type(self).__name__} needs "
                                         f"{list(self.factor_keys)}: adapters made by another variant?")

    @property
    def trainable_keys(self) -> tuple:
        """The factor names that train (``factor_keys`` minus ``frozen_keys``)."""
        return tuple(k for k in self.factor_keys if k not in self.frozen_keys)

    def split(self, adapters) -> tuple[Adapters, Adapters]:
        """``(trainable, frozen)``: the same paths, the factors split by ``frozen_keys``.

        Pass ``trainable`` to ``jax.grad`` and optax, and rebuild the adapters inside the loss with
        :meth:`join` (in the spirit of ``equinox.partition``/``combine``)::

            trainable, frozen = rp.split(adapters)
            loss = lambda t: loss_fn(rp.materialize(base, rp.join(t, frozen)), batch)
            grads = jax.grad(loss)(trainable)

        For LoRA/DoRA/PiSSA ``frozen`` holds empty dicts. See also :meth:`trainable_mask` for
        ``optax.masked``/``optax.multi_transform`` on the whole adapters dict.
        """
        self._check_adapters_dict(adapters, "adapters")
        tr = {p: {k: v for k, v in f.items() if k not in self.frozen_keys} for p, f in adapters.items()}
        fr = {p: {k: v for k, v in f.items() if k in self.frozen_keys} for p, f in adapters.items()}
        return tr, fr

    def join(self, trainable, frozen) -> Adapters:
        """Inverse of :meth:`split` (works on traced values). Refuses paths or factors that do not
        pair up, naming ``trainable``/``frozen``."""
        self._check_adapters_dict(trainable, "trainable", complete=False)
        self._check_adapters_dict(frozen, "frozen", complete=False)
        if set(trainable) != set(frozen):
            miss = sorted(set(trainable) ^ set(frozen))[:4]
            raise ValueError(f"trainable and frozen name different leaves ({miss}); pass both halves of one "
                             "rp.split(adapters)")
        out = {}
        for p, t in trainable.items():
            for k in t:
                if k in self.frozen_keys:
                    raise ValueError(f"trainable[{p!r}] holds the frozen factor {k!r}; pass rp.split(adapters)[0]")
            for k in frozen[p]:
                if k not in self.frozen_keys:
                    raise ValueError(f"frozen[{p!r}] holds the trainable factor {k!r}; pass rp.split(adapters)[1]")
            out[p] = {**t, **frozen[p]}
        self._check_adapters_dict(out, "trainable and frozen")
        return out

    def trainable_mask(self, adapters) -> dict:
        """``{path: {factor: bool}}``, ``True`` for trainable factors.

        For an optimizer over the whole adapters dict, turn it into ``optax.multi_transform``
        labels so frozen factors get a zero update::

            labels = jax.tree.map(lambda t: "train" if t else "freeze", rp.trainable_mask(adapters))
            opt = optax.multi_transform({"train": optax.adam(1e-3), "freeze": optax.set_to_zero()}, labels)

        (``optax.masked`` passes the *incoming* updates of masked-out leaves through unchanged, so
        it freezes them only if their gradients are zero.) Simplest is :meth:`split`: ``grad`` and
        the optimizer then never see the frozen part."""
        self._check_adapters_dict(adapters, "adapters")
        return {p: {k: k not in self.frozen_keys for k in f} for p, f in adapters.items()}

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
            present = self._present_keys(f, argname, path)
            for nm in present:
                if nm not in f:
                    raise ValueError(f"{argname}[{path!r}] has no factor {nm!r}; {type(self).__name__} needs "
                                     f"{list(self.factor_keys)}"
                                     + (": these are not DoRA adapters" if nm == "m" else ""))
            for nm in present:
                x = f[nm]
                if not _is_array(x):
                    raise TypeError(f"{argname}[{path!r}][{nm!r}] must be an array, got {_leaf_kind(x)}; "
                                    "wrap it with jnp.asarray")
                if nm in self.seed_keys:
                    if x.dtype != jnp.uint32 or x.ndim < 1 or x.shape[-1] != 2:
                        raise TypeError(f"{argname}[{path!r}][{nm!r}] must be raw PRNG key data uint32[..., 2] "
                                        f"(jax.random.key_data), got {x.dtype}{tuple(x.shape)}")
                elif not jnp.issubdtype(x.dtype, jnp.floating):
                    raise TypeError(f"{argname}[{path!r}][{nm!r}] has dtype {x.dtype}; factors must be floating")
            leaf = flat[path]
            if not jnp.issubdtype(leaf.dtype, jnp.floating):
                raise TypeError(f"{basename} leaf {path!r} has dtype {leaf.dtype}; expected floating")
            try:
                bshape, m, n = self.view_shape(path, leaf.shape)
            except (TypeError, ValueError) as e:
                raise type(e)(f"{argname}[{path!r}]: {e}") from None
            self.check_factors(path, f, bshape, m, n, argname, leaf.shape)
        return flat

    def check_factors(self, path: str, f: Mapping, bshape: tuple, m: int, n: int, argname: str, shape=None):
        """Shape checks of one leaf's factors against its matrix view ``bshape + (M, N)``.

        Default: ``a: [*bshape, M, r]``, ``b: [*bshape, r, N]`` with ``r`` the config rank
        (:meth:`check_factor_rank`), then :meth:`_check_extra`. Variants whose factors are not an
        ``(a, b)`` pair (NOLA's coefficients, CP-LoRA's vectors) override this."""
        a, b = f["a"], f["b"]
        if a.ndim != len(bshape) + 2 or b.ndim != len(bshape) + 2 or \
                tuple(a.shape[:-2]) != bshape or tuple(b.shape[:-2]) != bshape or \
                a.shape[-2] != m or b.shape[-1] != n or a.shape[-1] != b.shape[-2]:
            raise ValueError(
                f"{argname}[{path!r}]: factors a{tuple(a.shape)} b{tuple(b.shape)} do not fit the "
                f"base leaf {tuple(shape) if shape is not None else ''} (matrix view {bshape + (m, n)}); "
                "adapters made for another base, or a different `axes`/`rank` config")
        self.check_factor_rank(path, a.shape[-1], argname)
        self._check_extra(path, f, argname)

    def _check_extra(self, path: str, f: Mapping, argname: str):
        """Variant-specific shape checks of extra factors (DoRA's ``m``)."""

    def _check_finite(self, flat, adapters, argname="adapters", basename="params"):
        for path, f in adapters.items():
            for nm in self.factor_keys:
                if nm not in f:  # an absent optional group
                    continue
                x = f[nm]
                if nm in self.seed_keys:
                    continue
                if _is_concrete(x) and not _all_finite(x):
                    raise ValueError(f"{argname}[{path!r}][{nm!r}] contains NaN or Inf; refusing to fold "
                                     "non-finite factors into weights (training diverged?)")
            leaf = flat[path]
            if _is_concrete(leaf) and not _all_finite(leaf):
                raise ValueError(f"{basename}: leaf {path!r} contains NaN or Inf")

    def frozen_view(self, f: dict) -> dict:
        """``f`` with ``stop_gradient`` on the floating factors in ``frozen_keys``: frozen factors get
        no gradient even when a user differentiates the whole adapters dict without :meth:`split`
        (every path that computes an effective weight goes through this)."""
        if not self.frozen_keys:
            return f
        return {k: (jax.lax.stop_gradient(v) if k in self.frozen_keys and k not in self.seed_keys else v)
                for k, v in f.items()}

    def effective(self, w, f: dict):
        """Matrix-view ``(W + s A B) * c`` in the compute dtype (not rounded to ``w.dtype``)."""
        f = self.frozen_view(f)
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
            new[path] = self.from_view(path, fn(self.to_view(path, leaf), f, path), leaf.shape)
        return tree_lib.replace(params, new)

    def materialize(self, base, adapters):
        """``base`` with every adapted leaf replaced by its effective weight (differentiable).
        Activation-space variants raise :class:`~lrjax.interpreter.NotMergeable`."""
        self._refuse_weight("materialize")
        return self._map_leaves(base, adapters, lambda w, f, p: self.apply_leaf(w, f), basename="base")

    def merge(self, base, adapters):
        """Dense weights for inference (same values as :meth:`materialize`, gradients stopped).

        Refuses concrete NaN/Inf factors or targeted base leaves, and activation-space variants
        (:class:`~lrjax.interpreter.NotMergeable`)."""
        self._refuse_weight("merge")
        return jax.lax.stop_gradient(self._map_leaves(
            base, adapters, lambda w, f, p: self.apply_leaf(w, f), basename="base", finite=True))

    def unmerge(self, merged, adapters):
        """Recover the base from merged weights: ``W = W_merged - s A B`` (one rounding)."""
        self._refuse_weight("unmerge")
        return self._map_leaves(merged, adapters, self.unmerge_leaf, basename="merged", finite=True)

    def delta_matrix(self, w, f: dict):
        """Matrix-view ``W_eff - W`` in the compute dtype (unrounded); used by :func:`multi.combine`."""
        return self.effective(w, f) - w.astype(self.compute_dtype(w, f))

    def delta(self, base, adapters) -> dict:
        """``{path: W_eff - W}`` per adapted leaf (leaf layout), computed in the compute dtype and
        rounded once to the leaf's dtype."""
        self._refuse_weight("delta")
        flat = self._check(base, adapters, basename="base")
        self._check_finite(flat, adapters, basename="base")
        out = {}
        for path, f in adapters.items():
            leaf = flat[path]
            w = self.to_view(path, leaf)
            out[path] = self.from_view(path, self.delta_matrix(w, f).astype(leaf.dtype), leaf.shape)
        return out

    def num_params(self, adapters) -> int:
        """Number of trainable scalars in ``adapters`` (factors in ``frozen_keys`` -- frozen bases,
        seeds -- are not counted; for LoRA/DoRA/PiSSA that is every factor)."""
        if not isinstance(adapters, Mapping):
            raise TypeError(f"adapters must be the dict returned by init(), got {_leaf_kind(adapters)}")
        self._check_adapters_dict(adapters, "adapters")
        leaves = jax.tree_util.tree_leaves(adapters)
        for x in leaves:
            if not _is_array(x):
                raise TypeError(f"adapters must hold arrays, found {_leaf_kind(x)}")
        return int(sum(np.prod(x.shape) for f in adapters.values() if isinstance(f, Mapping)
                       for k, x in f.items() if k not in self.frozen_keys))


def _low_rank(form: LowRankForm, cd):
    """``s * (A @ B)`` with both factors in the compute dtype ``cd``."""
    return form.scale * (form.a.astype(cd) @ form.b.astype(cd))
