"""DoRA: weight-decomposed low-rank adaptation.

Liu et al., 2024, *DoRA: Weight-Decomposed Low-Rank Adaptation*, arXiv:2402.09353.
The adapted weight is a learned magnitude times a unit-norm direction:

.. math::  W_\\text{eff} = m \\odot \\frac{W + s A B}{\\lVert W + s A B \\rVert_c}

with one magnitude per *output* (the norm ``||.||_c`` is taken over the input axis, i.e. per
column of the ``[M, N]`` view = per row of PEFT's ``[out, in]`` weight) and ``m`` initialized
to ``||W||_c``, so the model starts unchanged. As in PEFT (``tuners/lora/dora.py``) and the
paper's Sec. 4.3, the norm is **detached**: it is treated as a constant in the backward pass
(``jax.lax.stop_gradient``), gradients flow through the direction and ``m`` only. No epsilon
is added to the norm (PEFT adds none); a zero column in ``W + sAB`` gives inf/NaN there.

Adapters hold ``{"a", "b", "m"}``; PEFT saves ``m`` as ``lora_magnitude_vector``.

``unmerge`` is impossible from merged weights alone: the merged column norm equals ``m``
whatever ``||W + sAB||`` was, so that scale is lost. Keep the base (merge is pure) or use
:meth:`DoRA.unmerge_with_norms` with the norms from :meth:`DoRA.column_norms`.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from lrjax import axes as axes_lib
from lrjax.reparam.base import LowRankForm
from lrjax.reparam.lora import LoRA

__all__ = ["DoRA", "column_norm"]


def column_norm(v):
    """L2 norm over the input axis of a ``[*batch, M, N]`` view -> ``[*batch, N]`` (float32 math)."""
    v32 = v.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(v32 * v32, axis=-2)).astype(v.dtype)


@dataclasses.dataclass(frozen=True)
class DoRA(LoRA):
    """DoRA over LoRA (or rsLoRA with ``rslora=True``). Same arguments as :class:`LoRA`."""

    rslora: bool = False

    @property
    def scale(self) -> float:
        alpha = self.rank if self.alpha is None else self.alpha
        return float(alpha) / (math.sqrt(self.rank) if self.rslora else float(self.rank))

    def init_leaf(self, key, w, path):
        w, f = super().init_leaf(key, w, path)
        f["m"] = column_norm(self._direction(w, f))
        return w, f

    def _direction(self, w, f):
        dt = f["a"].dtype
        return w.astype(dt) + self.scale * (f["a"] @ f["b"].astype(dt))

    def factors(self, w, f) -> LowRankForm:
        norm = jax.lax.stop_gradient(column_norm(self._direction(w, f)))
        return LowRankForm(f["a"], f["b"], self.scale, f["m"] / norm)

    def _check(self, base, adapters, argname="adapters"):
        flat = super()._check(base, adapters, argname)
        for path, f in adapters.items():
            if "m" not in f:
                raise ValueError(f"{argname}[{path!r}] has no magnitude 'm': these are not DoRA adapters")
            n = f["b"].shape[-1]
            if tuple(f["m"].shape) != tuple(f["b"].shape[:-2]) + (n,):
                raise ValueError(f"{argname}[{path!r}]['m'] has shape {tuple(f['m'].shape)}, expected "
                                 f"{tuple(f['b'].shape[:-2]) + (n,)}")
        return flat

    def column_norms(self, base, adapters) -> dict:
        """``{path: ||W + sAB||_c}`` -- keep these to undo a merge later."""
        flat = self._check(base, adapters)
        out = {}
        for p, f in adapters.items():
            ax = self.leaf_axes(p, flat[p].shape)
            out[p] = column_norm(self._direction(axes_lib.to_matrix(flat[p], ax), f))
        return out

    def unmerge_leaf(self, w_merged, f, path):
        raise ValueError(
            f"DoRA.unmerge: the merge of {path!r} cannot be inverted from merged weights (the column "
            "norm ||W + sAB|| is lost). Keep the base params, or call "
            "DoRA.unmerge_with_norms(merged, adapters, DoRA.column_norms(base, adapters))")

    def unmerge_with_norms(self, merged, adapters, norms: dict):
        """``W = W_merged * ||W + sAB||_c / m - s A B`` with the norms saved before merging."""
        missing = set(adapters) - set(norms)
        if missing:
            raise ValueError(f"norms: missing entries for {sorted(missing)}")

        def undo(wm, f, path):
            dt = f["a"].dtype
            v = wm.astype(dt) * (norms[path] / f["m"])[..., None, :].astype(dt)
            return (v - self.scale * (f["a"] @ f["b"].astype(dt))).astype(wm.dtype)

        return self._map_leaves(merged, adapters, undo)
