"""Block-LoRA: LoRA whose down-projection is one shared block repeated over the input.

Paper: Zhou, Shen, Yu, Bu, Wang, *One Head Eight Arms: Block Matrix based Low Rank Adaptation
for CLIP-based Few-Shot Learning* (arXiv:2501.16720, 2025). No official code was found (GitHub
code and repository searches), and the paper's method section could not be read here (only its
abstract: "partitions the original low-rank decomposition matrix of LoRA into a series of
sub-matrices while sharing all down-projection sub-matrices ... transforms certain complex matrix
multiplication operations into simpler matrix addition").

**UNVERIFIED reading** (the usual block-matrix convention, as in BoRA, arXiv:2508.06953): split
the input dimension into ``b`` equal blocks, ``x = [x_1, ..., x_b]`` (each ``M/b`` wide), and share
one down-projection block ``A_s: [M/b, r]`` across all of them. In lrjax's matrix view
(``y = x W_eff``; torch's ``lora_A.weight`` is ``A^T``)

.. math::  A = \\begin{bmatrix} A_s \\\\ \\vdots \\\\ A_s \\end{bmatrix} \\in \\mathbb{R}^{M \\times r},
           \\qquad x A = \\Big(\\sum_{j=1}^{b} x_j\\Big) A_s,
           \\qquad W_\\text{eff} = W + s\\,A B

("multiplication becomes addition": the ``b`` input blocks are summed before one small product).
The up-projection ``B: [r, N]`` is not shared (splitting it by output rows changes nothing in
``A B``). Trainable scalars per matrix: ``M r / b + r N`` (LoRA: ``M r + r N``).

Init: ``A_s ~ U(-1/sqrt(M), 1/sqrt(M))`` (LoRA's kaiming-uniform bound of the full ``A``, so the
tiled ``A`` has LoRA's entry distribution), ``B = 0`` (output unchanged at init); ``s = alpha / r``
as LoRA. The adapter stores ``{"a": A_s [*batch, M/b, r], "b": B [*batch, r, N]}``;
:meth:`~BlockLoRA.factors` returns the tiled ``A``, so ``materialize``/``merge``/``unmerge`` and
:func:`lrjax.factored` work unchanged. (The factored path computes ``x A`` as one ``[M, r]``
product, i.e. LoRA's FLOPs; the addition form saves ``(1 - 1/b)`` of that product, which is small
next to ``x W``.)

Precision: as LoRA (``W + s A B`` in ``promote_types(w, A_s, B, float32)``, rounded once).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lrjax import _validation as V
from lrjax.reparam.base import LowRankForm
from lrjax.reparam.lora import LoRA

__all__ = ["BlockLoRA"]


@dataclasses.dataclass(frozen=True)
class BlockLoRA(LoRA):
    """Block-LoRA: ``W_eff = W + s [A_s; ...; A_s] B`` with ``b = blocks`` copies of ``A_s`` (module doc).

    Args:
      rank: ``r``, an int ``>= 1`` and ``<= min(M / blocks, N)`` of every targeted leaf (checked by
        ``init``: ``rank(A B) <= M / blocks``).
      blocks: ``b``, the number of input blocks sharing ``A_s`` (an int ``>= 1``, default 2; ``1`` is
        LoRA). Every targeted leaf's input size ``M`` must be divisible by it.
      alpha, targets, axes, dtype: as for :class:`lrjax.LoRA`.

    Raises:
      TypeError/ValueError naming ``blocks`` at construction, or naming ``blocks`` and the leaf in
      ``init`` when ``M`` is not divisible by ``blocks``; ``ValueError`` naming ``rank`` for
      ``rank > M / blocks``; ``ValueError`` naming ``adapters`` for factors of another shape (e.g. a
      full LoRA ``A: [M, r]``).
    """

    blocks: int = 2

    def __post_init__(self):
        super().__post_init__()
        V.check_int(self.blocks, "blocks", low=1)

    def check_leaf_rank(self, path, m, n):
        """``M % blocks == 0`` and ``1 <= rank <= min(M / blocks, N)``."""
        if m % self.blocks:
            raise ValueError(f"blocks={self.blocks} does not divide the input size M={m} of leaf {path!r} "
                             f"(matrix view [{m}, {n}]); choose blocks among the divisors of {m} or narrow "
                             "the targets")
        V.check_rank(self.rank, m // self.blocks, n, "rank",
                     where=f"leaf {path!r} with blocks={self.blocks} (A_s is [M/blocks, r])")

    def init_leaf(self, key, w, path):
        """``A_s ~ U(-1/sqrt(M), 1/sqrt(M))`` of shape ``[*batch, M/b, r]``, ``B = 0``."""
        *bs, m, n = w.shape
        dt = self.factor_dtype(w)
        bound = 1.0 / np.sqrt(m)
        a = jax.random.uniform(key, (*bs, m // self.blocks, self.rank), jnp.float32, -bound, bound).astype(dt)
        return w, {"a": a, "b": jnp.zeros((*bs, self.rank, n), dt)}

    def factors(self, w, f) -> LowRankForm:
        """``(tile(A_s, b) [*batch, M, r], B, s, None)``."""
        a = f["a"]
        reps = (1,) * (a.ndim - 2) + (self.blocks, 1)
        return LowRankForm(jnp.tile(a, reps), f["b"], self.scale, None)

    def check_factors(self, path, f, bshape, m, n, argname, shape=None):
        """``a: [*bshape, M/blocks, r]``, ``b: [*bshape, r, N]`` with ``r`` the config rank."""
        a, b = f["a"], f["b"]
        if a.ndim != len(bshape) + 2 or b.ndim != len(bshape) + 2 or \
                tuple(a.shape[:-2]) != bshape or tuple(b.shape[:-2]) != bshape or \
                a.shape[-2] * self.blocks != m or b.shape[-1] != n or a.shape[-1] != b.shape[-2]:
            raise ValueError(
                f"{argname}[{path!r}]: factors a{tuple(a.shape)} b{tuple(b.shape)} do not fit the base leaf "
                f"{tuple(shape) if shape is not None else ''} (matrix view {bshape + (m, n)}) with blocks="
                f"{self.blocks}: expected a {bshape + (m // max(self.blocks, 1), self.rank)} (the shared block "
                f"A_s) and b {bshape + (self.rank, n)}; adapters made with another blocks/rank or for another base")
        self.check_factor_rank(path, a.shape[-1], argname)
