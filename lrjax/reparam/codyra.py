"""CoDyRA: dynamic rank-selective LoRA with per-rank gates, for continual learning.

Paper: Lu et al. 2024, *Adaptive Rank, Reduced Forgetting: Knowledge Retention in Continual
Learning Vision-Language Models with Dynamic Rank-Selective LoRA* (CoDyRA), arXiv:2412.01004.
Official code
``Artificer-AI-Lab/CoDyRA`` @c1691e4c4c8a (``loralib/codyra.py::codyra_Linear``,
``models/codyra.py::train_model, finetune``), whose facts are followed here.

Each adapted weight gets LoRA factors and one trainable gate per rank:

.. math::  W_\\text{eff} = W + s\\,A \\operatorname{diag}(g) B,
           \\qquad A: [M, r],\\ g: [r],\\ B: [r, N]

(lrjax's matrix view, ``y = x W_eff``; the official torch layer computes
``((x A^T) * g) B^T``). Init (official): ``A`` kaiming-uniform as LoRA's
(``U(-1/sqrt(M), 1/sqrt(M))``), ``B = 0`` (so the model starts unchanged), ``g ~ N(0, 1)``.
The scale: the official layer has ``lora_scaling = 1`` and no alpha, so the default
``alpha=None`` gives ``s = 1``; an explicit ``alpha`` gives ``s = alpha / rank`` with ``rank``
the config's *initial* rank, which pruning does not change (pruning never rescales the adapter).

The gates are trained with a proximal L1 step after the optimizer
(:func:`lrjax.optim.prox.prox_soft_threshold` on the ``"g"`` leaves, with
:func:`lrjax.optim.prox.codyra_lambda_schedule`), so unneeded ranks get a gate of exactly 0.
At a task switch (official ``increment_task``, :meth:`CoDyRA.next_task`) the adapter
``A diag(g) B`` is merged into the base weight (zero inference overhead) and fresh factors are
initialized for the next task. :meth:`CoDyRA.prune` drops the zero-gate ranks of a trained
adapter (the official code does this before the merge; it does not change ``W_eff``).

Adapters hold ``{"a": [*batch, M, r], "b": [*batch, r, N], "g": [*batch, r]}``. After
:meth:`~CoDyRA.prune` the rank ``r`` varies per leaf (``0 <= r <= rank``); every method accepts
such adapters. ``g`` is drawn from ``fold_in(leaf key, 1)``, so ``A`` equals LoRA's ``A`` for the
same key. Not reproduced: the official layer also keeps the merged factors of past tasks as frozen
bookkeeping (``old_lora_A/B``); they never change the function and are not stored here.

Precision: ``A diag(g)`` and ``W + s A diag(g) B`` are computed in
``promote_types(w, A, B, g, float32)`` and rounded once to the base leaf's dtype.

Example::

    rp = CoDyRA(rank=16, targets=".*/kernel")
    base, ad = rp.init(key, params)
    opt = optax.chain(optax.adamw(5e-4, b1=0.9, b2=0.9999, weight_decay=0.0),
                      prox_soft_threshold(codyra_lambda_schedule(500, 0.005), mask=factor_mask(ad, "g")))
    ...                                          # train ad on task 1
    base, ad = rp.next_task(jax.random.fold_in(key, 1), base, rp.prune(ad))   # task 2 starts
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lrjax._validation import check_key
from lrjax.reparam.base import Adapters, LowRankForm, Reparam, _all_finite, _is_array, _is_concrete, _leaf_kind

__all__ = ["CoDyRA"]


@dataclasses.dataclass(frozen=True)
class CoDyRA(Reparam):
    """CoDyRA: ``W_eff = W + s A diag(g) B`` with a trainable gate per rank (module doc).

    Args:
      rank: the *initial* rank ``r`` of every adapter (official default 16), an int ``>= 1`` and
        ``<= min(M, N)`` of every targeted leaf (checked by ``init``). Pruned adapters have a rank
        ``0 <= r_leaf <= rank`` per leaf.
      alpha: ``None`` (default, the official code: ``s = 1``) or a finite real ``> 0`` for
        ``s = alpha / rank``.
      targets, axes, dtype: as for :class:`lrjax.LoRA` (``dtype`` is the dtype of ``a``, ``b``, ``g``).

    Raises (besides the protocol's checks): ``ValueError`` naming ``adapters`` for a gate whose shape
    is not ``[*batch, r]`` or for factors whose rank exceeds ``rank``.
    """

    factor_keys = ("a", "b", "g")

    def init_leaf(self, key, w, path):
        """LoRA's ``A`` (from ``key``) and ``B = 0``, plus ``g ~ N(0, 1)`` from ``fold_in(key, 1)``."""
        w, f = super().init_leaf(key, w, path)
        a = f["a"]
        g = jax.random.normal(jax.random.fold_in(key, 1), a.shape[:-2] + a.shape[-1:], jnp.float32)
        f["g"] = g.astype(a.dtype)
        return w, f

    def factors(self, w, f) -> LowRankForm:
        """``(A diag(g), B, s, None)``; ``A diag(g)`` in the compute dtype (one rounding later)."""
        cd = self.compute_dtype(w, f)
        return LowRankForm(f["a"].astype(cd) * f["g"].astype(cd)[..., None, :], f["b"], self.scale, None)

    def check_factor_rank(self, path, r, argname="adapters"):
        """Accept any rank ``0 <= r <= rank`` (pruned adapters); refuse a rank above the initial one."""
        if r > self.rank:
            raise ValueError(f"{argname}[{path!r}]: factors have rank {r} but this CoDyRA has initial rank="
                             f"{self.rank} (pruning only lowers ranks); use the config the adapters were made with")

    def _check_extra(self, path, f, argname):
        a, g = f["a"], f["g"]
        want = tuple(a.shape[:-2]) + (a.shape[-1],)
        if tuple(g.shape) != want:
            raise ValueError(f"{argname}[{path!r}]['g'] has shape {tuple(g.shape)}, expected {want} (one gate per "
                             "rank of 'a'); prune a, b and g together with CoDyRA.prune")

    # ------------------------------------------------------------------ rank selection
    def _check_gated(self, adapters, argname="adapters"):
        """Structure checks that need no base: a dict of ``{a, b, g}`` arrays of matching ranks."""
        self._check_adapters_dict(adapters, argname)  # dict of dicts with exactly a, b, g
        if not adapters:
            raise ValueError(f"{argname} is empty; pass the adapters returned by CoDyRA.init()")
        for path, f in adapters.items():
            for nm in self.factor_keys:
                x = f[nm]
                if not _is_array(x):
                    raise TypeError(f"{argname}[{path!r}][{nm!r}] must be an array, got {_leaf_kind(x)}")
                if not jnp.issubdtype(x.dtype, jnp.floating):
                    raise TypeError(f"{argname}[{path!r}][{nm!r}] has dtype {x.dtype}; factors must be floating")
            a, b = f["a"], f["b"]
            if a.ndim < 2 or b.ndim != a.ndim or tuple(a.shape[:-2]) != tuple(b.shape[:-2]) \
                    or a.shape[-1] != b.shape[-2]:
                raise ValueError(f"{argname}[{path!r}]: factors a{tuple(a.shape)} b{tuple(b.shape)} do not pair "
                                 "up (a: [*batch, M, r], b: [*batch, r, N])")
            self.check_factor_rank(path, a.shape[-1], argname)
            self._check_extra(path, f, argname)

    def active_ranks(self, adapters) -> dict:
        """``{path: number of non-zero gates}`` (an int array of the leaf's batch shape, ``[]`` for a
        plain kernel). Works under ``jit``."""
        self._check_gated(adapters)
        return {p: jnp.count_nonzero(f["g"], axis=-1) for p, f in adapters.items()}

    def prune(self, adapters) -> Adapters:
        """Drop the ranks whose gate is exactly 0: ``W_eff`` is unchanged, the rank per leaf shrinks.

        A rank ``j`` of a leaf is kept if ``g[..., j] != 0`` for *any* batch element (an ``nn.scan``
        stack ``[L, ...]`` keeps one rank for all its layers); a leaf whose gates are all 0 keeps an
        empty rank-0 adapter (``a: [*batch, M, 0]``), so the adapters keep the same leaves
        (``materialize``, ``merge``, :func:`lrjax.factored` and :meth:`next_task` accept it; Orbax,
        hence :func:`lrjax.checkpoint.save_adapters`, refuses zero-size arrays: save before pruning
        or after :meth:`next_task`).
        The result has data-dependent shapes: it needs concrete gates and cannot run under
        ``jax.jit`` (call it between training phases, e.g. before :meth:`next_task`). The optimizer
        state of the old shapes does not fit the pruned adapters; re-``init`` the optimizer.

        Raises:
          TypeError: ``adapters`` is not CoDyRA's dict of arrays, or its gates are traced (under jit).
          ValueError: wrong factors/shapes, a rank above ``rank``, or NaN/Inf gates.
        """
        self._check_gated(adapters)
        out = {}
        for path, f in adapters.items():
            g = f["g"]
            if not _is_concrete(g):
                raise TypeError(f"adapters[{path!r}]['g'] is traced: CoDyRA.prune gives data-dependent shapes "
                                "and needs concrete gates; call it outside jax.jit")
            if not _all_finite(g):
                raise ValueError(f"adapters[{path!r}]['g'] contains NaN or Inf; refusing to prune a diverged "
                                 "adapter")
            gn = np.asarray(jax.device_get(g))
            keep = np.flatnonzero(np.any(gn.reshape(-1, gn.shape[-1]) != 0, axis=0)) if gn.size else \
                np.zeros((0,), np.int64)
            out[path] = {"a": jnp.take(f["a"], keep, axis=-1), "b": jnp.take(f["b"], keep, axis=-2),
                         "g": jnp.take(g, keep, axis=-1)}
        return out

    def next_task(self, key, base, adapters):
        """Task switch (official ``increment_task``): merge, then start fresh factors.

        Returns ``(new_base, new_adapters)`` with ``new_base = merge(base, adapters)``
        (``W + s A diag(g) B`` rounded once to the base's dtype, gradients stopped) and
        ``new_adapters`` a fresh :meth:`init` of the same leaves at the initial ``rank`` from ``key``
        (``B = 0``: the model's function is unchanged by the switch). Pass a fresh key per task,
        e.g. ``jax.random.fold_in(key, task)``. Pruning first is optional (zero gates add nothing).

        Raises:
          TypeError / ValueError naming ``key``, ``base`` or ``adapters`` (the protocol's checks, NaN/Inf
          factors refused by ``merge``); ``ValueError`` if ``adapters`` do not cover exactly the
          leaves this config targets in ``base``.
        """
        check_key(key, "key")
        self._check(base, adapters, basename="base")
        targeted = set(self._targets(base))
        if targeted != set(adapters):
            diff = sorted(targeted ^ set(adapters))[:4]
            raise ValueError(f"adapters: the leaves adapted ({len(adapters)}) are not the leaves this CoDyRA "
                             f"targets in base ({len(targeted)}), e.g. {diff}; next_task re-initializes the "
                             "targeted leaves, so pass the adapters of this config's init")
        merged = self.merge(base, adapters)
        _, fresh = self.init(key, merged)
        return merged, fresh
