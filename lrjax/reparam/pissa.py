"""PiSSA: principal singular values and vectors adaptation.

Meng, Wang & Zhang, 2024, *PiSSA: Principal Singular Values and Singular Vectors Adaptation
of Large Language Models*, arXiv:2404.02948. The adapter is initialized with the top-``r``
singular triplets of ``W`` and the frozen base is the residual:

.. math::  W = U S V^\\top,\\quad A = U_r \\sqrt{S_r / s},\\quad B = \\sqrt{S_r / s} V_r^\\top,
           \\quad W_\\text{res} = W - s A B

(matrix view ``[M, N] = [in, out]``; PEFT's ``lora_A.weight = A^T``, ``lora_B.weight = B^T``,
and its SVD is of ``W^T``, which swaps the roles of ``U`` and ``V``). So ``W_res + s A B``
reconstructs ``W`` and training starts from the original model.

Free choices, pinned: the SVD is exact (``lrjax.linalg.svd``, float32) unless ``n_iter`` is set,
which uses :func:`lrjax.linalg.randomized_svd` with that many power iterations (PEFT's
``pissa_niter_k``); the sqrt(S) split is :func:`lrjax.linalg.sqrt_split` (the code FlexMoRE's
:func:`lrjax.linalg.lowrank_delta` uses); singular-vector signs follow :mod:`lrjax.linalg` (largest-magnitude entry of
each left vector positive). Sign flips of a (u_i, v_i) pair leave ``A B`` and the residual
unchanged, so outputs are comparable with PEFT whatever its SVD backend picks.

Start: the residual is ``W_res = round(W - s A B)`` computed in ``promote_types(w, A, B, float32)``
and rounded once to ``w.dtype``; ``materialize`` then returns ``round(W_res + s A B)``. That is
``W`` up to the rounding of the stored residual: exact wherever ``|s A B|`` does not exceed
``|W|`` by much, and otherwise within one ulp (in ``w.dtype``) of ``max(|W|, |W_res|)``
per entry. The same holds for PEFT, which also stores the residual in the base's dtype.

Degenerate weights: a rank-deficient ``W`` (rank below ``r``) or an all-zero ``W`` is valid.
Singular values that are 0 (or rounding noise, clamped at 0 before the square root) give
zero factor columns ``A[:, i] = 0``, ``B[i] = 0`` (up to the SVD's rounding noise), never NaN;
for an all-zero ``W`` the factors and the residual are exactly 0 and ``materialize`` returns
``W`` exactly. Note that a component with both factors zero is a saddle of gradient descent
(``dA_i = s G B_i^T = 0``, ``dB_i = s A_i^T G = 0``): it stays zero, so only the weight's
non-zero singular directions train. Use a rank ``<= rank(W)``, or LoRA, on such weights.
"""
from __future__ import annotations

import dataclasses

from lrjax import _validation as V
from lrjax import linalg
from lrjax.reparam.lora import LoRA

__all__ = ["PiSSA"]


@dataclasses.dataclass(frozen=True)
class PiSSA(LoRA):
    """PiSSA init over LoRA scaling; ``init`` returns the residual base. Same args as :class:`LoRA`
    plus ``n_iter`` (``None``: exact SVD; an int ``>= 0``: randomized SVD with that many power
    steps). Rank-deficient and all-zero weights are valid (see the module docstring)."""

    n_iter: int | None = None
    rewrites_base = True  # init returns the residual W - s A B

    def __post_init__(self):
        super().__post_init__()
        V.check_int(self.n_iter, "n_iter", low=0, allow_none=True)

    def init_leaf(self, key, w, path):
        if self.n_iter is None:
            u, s, vt = linalg.svd(w, self.rank)
        else:
            u, s, vt = linalg.randomized_svd(key, w, self.rank, n_iter=self.n_iter)
        a, b = linalg.sqrt_split(u, s, vt, self.scale)  # shared with lrjax.linalg.lowrank_delta
        dt = self.factor_dtype(w)
        a, b = a.astype(dt), b.astype(dt)
        f = {"a": a, "b": b}
        cd = self.compute_dtype(w, f)
        w_res = (w.astype(cd) - self.scale * (a.astype(cd) @ b.astype(cd))).astype(w.dtype)
        return w_res, f
