"""PiSSA: principal singular values and vectors adaptation.

Meng, Wang & Zhang, 2024, *PiSSA: Principal Singular Values and Singular Vectors Adaptation
of Large Language Models*, arXiv:2404.02948. The adapter is initialized with the top-``r``
singular triplets of ``W`` and the frozen base is the residual:

.. math::  W = U S V^\\top,\\quad A = U_r \\sqrt{S_r / s},\\quad B = \\sqrt{S_r / s} V_r^\\top,
           \\quad W_\\text{res} = W - s A B

(matrix view ``[M, N] = [in, out]``; PEFT's ``lora_A.weight = A^T``, ``lora_B.weight = B^T``,
and its SVD is of ``W^T``, which swaps the roles of ``U`` and ``V``). So ``W_res + s A B``
reconstructs ``W`` up to rounding and training starts from the original model.

Free choices, pinned: the SVD is exact (``lrjax.linalg.svd``, float32) unless ``n_iter`` is set,
which uses :func:`lrjax.linalg.randomized_svd` with that many power iterations (PEFT's
``pissa_niter_k``); singular-vector signs follow :mod:`lrjax.linalg` (largest-magnitude entry of
each left vector positive). Sign flips of a (u_i, v_i) pair leave ``A B`` and the residual
unchanged, so outputs are comparable with PEFT whatever its SVD backend picks.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lrjax import linalg
from lrjax.reparam.lora import LoRA

__all__ = ["PiSSA"]


@dataclasses.dataclass(frozen=True)
class PiSSA(LoRA):
    """PiSSA init over LoRA scaling; ``init`` returns the residual base. Same args as :class:`LoRA`
    plus ``n_iter`` (``None``: exact SVD; an int: randomized SVD with that many power steps)."""

    n_iter: int | None = None

    def init_leaf(self, key, w, path):
        if self.n_iter is None:
            u, s, vt = linalg.svd(w, self.rank)
        else:
            u, s, vt = linalg.randomized_svd(key, w, self.rank, n_iter=self.n_iter)
        root = jnp.sqrt(s / self.scale)
        dt = self.factor_dtype(w)
        a = (u * root[..., None, :]).astype(dt)
        b = (root[..., :, None] * vt).astype(dt)
        w_res = w.astype(jnp.float32) - self.scale * (a.astype(jnp.float32) @ b.astype(jnp.float32))
        return w_res.astype(w.dtype), {"a": a, "b": b}
