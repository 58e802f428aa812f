"""DoRA: weight-decomposed low-rank adaptation.

Liu et al., 2024, *DoRA: Weight-Decomposed Low-Rank Adaptation*, arXiv:2402.09353.
The adapted weight is a learned magnitude times a unit-norm direction:

.. math::  W_\\text{eff} = m \\odot \\frac{W + s A B}{\\lVert W + s A B \\rVert_c}

with one magnitude per *output* (the norm ``||.||_c`` is taken over the input axis, i.e. per
column of the ``[M, N]`` view = per row of PEFT's ``[out, in]`` weight) and ``m`` initialized
to ``||W||_c``, so the model starts unchanged. As in PEFT (``tuners/lora/dora.py``) and the
paper's Sec. 4.3, the norm is **detached**: it is treated as a constant in the backward pass
(``jax.lax.stop_gradient``), gradients flow through the direction and ``m`` only.

Precision: the direction ``W + sAB`` and its norm are computed in the compute dtype
``promote_types(w, A, B, m, float32)``; the detached norm is then rounded to ``m``'s dtype
before the division (``c = m / round_m(||W + sAB||_c)``). At init ``m`` *is* that rounded norm,
so ``c = 1`` exactly and the initial model equals the base bit for bit (float32 base with
bfloat16 factors included). One caveat: under ``jit`` XLA may order the float32 sum of squares
differently from the eager ``init``; a bfloat16/float16 ``m`` absorbs that, a float32 ``m`` can
then give ``c = 1 +- 1 ulp``. ``W_eff = (W + sAB) * c`` is rounded once to the base's dtype.
A column norm that overflows ``m``'s dtype (float16 above 65504) is refused at ``init``.

Zero columns (a pruned output unit): PEFT divides ``m / ||W + sAB||_c`` with no epsilon, which
gives NaN (``0/0``) in that output and in its gradients. lrjax defines the direction of a zero
column as **zero**: ``c = 0`` wherever the column norm is 0, so that column of ``W_eff`` is
exactly 0 (whatever ``m``), the forward pass and the gradients with respect to the base, ``A``,
``B`` and ``m`` are finite, and a unit pruned at init (``m = ||W||_c = 0``) stays pruned (its
``B`` column and ``m`` get zero gradient while the column is zero). No epsilon is added
anywhere else, so non-degenerate columns match PEFT to rounding. :func:`column_norm` has a
zero (sub)gradient at a zero column instead of ``sqrt``'s infinite one.

Adapters hold ``{"a", "b", "m"}``; PEFT saves ``m`` as ``lora_magnitude_vector``.

``unmerge`` is impossible from merged weights alone: the merged column norm equals ``m``
whatever ``||W + sAB||`` was, so that scale is lost. Keep the base (merge is pure) or use
:meth:`DoRA.unmerge_with_norms` with the norms from :meth:`DoRA.column_norms`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax
import jax.numpy as jnp

from lrjax import _validation as V
from lrjax.reparam.base import LowRankForm, _all_finite, _is_array, _is_concrete, _leaf_kind, _low_rank
from lrjax.reparam.lora import LoRA

__all__ = ["DoRA", "column_norm"]


def column_norm(v, dtype=None):
    """L2 norm over the input axis of a ``[*batch, M, N]`` view -> ``[*batch, N]``.

    Computed in ``promote_types(v, float32)`` and returned in ``dtype`` (default ``v.dtype``).
    At an all-zero column the value is 0 and the gradient is 0 (not ``sqrt``'s inf)."""
    v = V.check_array(v, "v", min_ndim=2, kind="floating")
    cd = V.compute_dtype(v.dtype)
    vc = v.astype(cd)
    sq = jnp.sum(vc * vc, axis=-2)
    pos = sq > 0
    nrm = jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1)), 0)
    return nrm.astype(v.dtype if dtype is None else dtype)


def _safe_ratio(num, den):
    """``num / den`` where ``den != 0``, else 0 -- with finite gradients on both branches."""
    nz = den != 0
    return jnp.where(nz, num / jnp.where(nz, den, 1), 0)


@dataclasses.dataclass(frozen=True)
class DoRA(LoRA):
    """DoRA over LoRA (or rsLoRA with ``rslora=True``). Same arguments as :class:`LoRA`, plus

    Args:
      rslora: ``True`` for ``s = alpha / sqrt(r)`` (PEFT's ``use_rslora``); must be a bool.

    Zero columns of ``W + sAB`` get a zero direction (``c = 0``, finite gradients) instead of
    PEFT's NaN; the norm is rounded to ``m``'s dtype before the division so that init is exact.
    See the module docstring.
    """

    rslora: bool = False

    factor_keys = ("a", "b", "m")

    def __post_init__(self):
        super().__post_init__()
        V.check_bool(self.rslora, "rslora")

    @property
    def scale(self) -> float:
        """``s = alpha / r``, or ``alpha / sqrt(r)`` with ``rslora=True``."""
        alpha = self.rank if self.alpha is None else self.alpha
        return float(alpha) / (math.sqrt(self.rank) if self.rslora else float(self.rank))

    def init_leaf(self, key, w, path):
        w, f = super().init_leaf(key, w, path)
        dt = f["a"].dtype
        f["m"] = column_norm(self._direction(w, f), dtype=dt)
        if _is_concrete(f["m"]) and not _all_finite(f["m"]):
            raise ValueError(f"dtype: a column norm of leaf {path!r} overflows {jnp.dtype(dt).name} (DoRA's "
                             "magnitude m); use dtype=jnp.float32 or jnp.bfloat16 for the factors")
        return w, f

    def _direction(self, w, f):
        """``W + sAB`` in the compute dtype (unrounded)."""
        form = LowRankForm(f["a"], f["b"], self.scale, None)
        cd = self.compute_dtype(w, f)
        return w.astype(cd) + _low_rank(form, cd)

    def factors(self, w, f) -> LowRankForm:
        m = f["m"]
        norm = jax.lax.stop_gradient(column_norm(self._direction(w, f), dtype=m.dtype))
        cd = self.compute_dtype(w, f)
        return LowRankForm(f["a"], f["b"], self.scale, _safe_ratio(m.astype(cd), norm.astype(cd)))

    def _check_extra(self, path, f, argname):
        n = f["b"].shape[-1]
        m = f["m"]
        if tuple(m.shape) != tuple(f["b"].shape[:-2]) + (n,):
            raise ValueError(f"{argname}[{path!r}]['m'] has shape {tuple(m.shape)}, expected "
                             f"{tuple(f['b'].shape[:-2]) + (n,)}")

    def column_norms(self, base, adapters) -> dict:
        """``{path: ||W + sAB||_c}`` -- keep these to undo a merge later (in ``m``'s dtype)."""
        flat = self._check(base, adapters, basename="base")
        out = {}
        for p, f in adapters.items():
            out[p] = column_norm(self._direction(self.to_view(p, flat[p]), f), dtype=f["m"].dtype)
        return out

    def unmerge_leaf(self, w_merged, f, path):
        raise ValueError(
            f"DoRA.unmerge: the merge of {path!r} cannot be inverted from merged weights (the column "
            "norm ||W + sAB|| is lost). Keep the base params, or call "
            "DoRA.unmerge_with_norms(merged, adapters, DoRA.column_norms(base, adapters))")

    def unmerge_with_norms(self, merged, adapters, norms: dict):
        """``W = W_merged * ||W + sAB||_c / m - s A B`` with the norms saved before merging.

        Columns with ``m = 0`` and norm 0 (a zero direction) are recovered exactly; a column with
        ``m = 0`` but a non-zero norm was erased by the merge and is refused (concrete values)."""
        flat = self._check(merged, adapters, basename="merged")
        self._check_finite(flat, adapters, basename="merged")
        if not isinstance(norms, Mapping):
            raise TypeError(f"norms must be the dict returned by DoRA.column_norms(base, adapters), got "
                            f"{_leaf_kind(norms)}")
        missing = set(adapters) - set(norms)
        if missing:
            raise ValueError(f"norms: missing entries for {sorted(missing)}; pass DoRA.column_norms(base, adapters)")
        for path, f in adapters.items():
            nv = norms[path]
            if not _is_array(nv):
                raise TypeError(f"norms[{path!r}] must be an array, got {_leaf_kind(nv)}")
            if tuple(nv.shape) != tuple(f["m"].shape):
                raise ValueError(f"norms[{path!r}] has shape {tuple(nv.shape)}, expected {tuple(f['m'].shape)}")
            if _is_concrete(nv) and not _all_finite(nv):
                raise ValueError(f"norms[{path!r}] contains NaN or Inf")
            if _is_concrete(nv) and _is_concrete(f["m"]):
                with jax.ensure_compile_time_eval():
                    lost = bool(jnp.any((f["m"] == 0) & (nv != 0)))
                if lost:
                    raise ValueError(f"adapters[{path!r}]['m'] is 0 where norms[{path!r}] is not: the merge "
                                     "erased those columns and they cannot be recovered; keep the base params")

        def undo(wm, f, path):
            cd = self.compute_dtype(wm, f)
            ratio = _safe_ratio(norms[path].astype(cd), f["m"].astype(cd))
            v = wm.astype(cd) * ratio[..., None, :]
            form = LowRankForm(f["a"], f["b"], self.scale, None)
            return (v - _low_rank(form, cd)).astype(wm.dtype)

        return self._map_leaves(merged, adapters, undo, basename="merged")
