"""LoRA and rsLoRA.

LoRA (Hu et al., 2021, *LoRA: Low-Rank Adaptation of Large Language Models*, arXiv:2106.09685):
a frozen weight ``W`` is adapted as ``W + s A B`` with ``A: [M, r]``, ``B: [r, N]``,
``s = alpha / r``; ``B = 0`` at init so the model starts unchanged.

rsLoRA (Kalajdzievski, 2023, *A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA*,
arXiv:2312.03732): ``s = alpha / sqrt(r)``, which keeps the update's scale rank-independent.

Orientation against PEFT: PEFT's ``lora_A.weight`` is ``A^T`` (``[r, in]``) and
``lora_B.weight`` is ``B^T`` (``[out, r]``) for a Dense kernel ``[in, out]``.

Precision: ``W + s A B`` is computed in ``promote_types(w, A, B, float32)`` and rounded once to
``w.dtype`` (so a float32 base with bfloat16 factors materializes to exactly ``W`` at init).
"""
from __future__ import annotations

import dataclasses
import math

from lrjax.reparam.base import Reparam

__all__ = ["LoRA", "RSLoRA"]


@dataclasses.dataclass(frozen=True)
class LoRA(Reparam):
    """LoRA: ``W_eff = W + (alpha / r) A B``; ``alpha=None`` means ``alpha = r`` (scale 1).

    Args:
      rank: ``r``, an int ``>= 1``. Must be ``<= min(M, N)`` of every targeted leaf's matrix view
        (checked by ``init``, naming the leaf).
      alpha: scaling numerator (PEFT's ``lora_alpha``): a finite real ``> 0`` or ``None``.
      targets: which leaves (see :mod:`lrjax.tree`); default every ``kernel``.
      axes: per-leaf matrix-view override (see :mod:`lrjax.axes`).
      dtype: factor dtype (default: the base leaf's), e.g. ``jnp.bfloat16`` or ``"bfloat16"``.
    """


@dataclasses.dataclass(frozen=True)
class RSLoRA(LoRA):
    """rsLoRA: LoRA with ``s = alpha / sqrt(r)`` (PEFT's ``use_rslora=True``)."""

    @property
    def scale(self) -> float:
        """``s = alpha / sqrt(r)`` (rsLoRA, Kalajdzievski 2023)."""
        alpha = self.rank if self.alpha is None else self.alpha
        return float(alpha) / math.sqrt(self.rank)
