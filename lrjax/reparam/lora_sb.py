"""LoRA-SB and LoRA-XS: a trainable ``r x r`` core between two frozen factors.

.. math::  W_\\text{eff} = W + s\\,A R B,\\qquad A: [M, r]\\ \\text{frozen},\\quad
           R: [r, r]\\ \\text{trainable},\\quad B: [r, N]\\ \\text{frozen},\\quad s = \\alpha / r

in lrjax's matrix view (``M`` = in, ``N`` = out, ``y = x W_eff``). The official torch layer
computes ``y = W_t x + s B_t R_t A_t x`` with ``A_t = A^T`` (``lora_A``, ``r x in``),
``B_t = B^T`` (``lora_B``, ``out x r``) and the latent ``R_t = R^T``
(``default_lora_latent_mapping``). Adapters hold ``{"a": [*batch, M, r], "r": [*batch, r, r],
"b": [*batch, r, N]}``; ``frozen_keys = ("a", "b")``, so :meth:`~lrjax.reparam.Reparam.split`
hands only the cores to ``grad``/optax and :meth:`~lrjax.reparam.Reparam.num_params` is
``r^2`` per (unbatched) leaf. ``alpha=None`` means ``alpha = r``, i.e. ``s = 1``: the official
scripts set ``lora_alpha = lora_r``.

One SGD step of size ``eta`` on ``R`` (``dL/dR = s A^T G B^T`` with ``G = dL/dW_eff``) moves the
effective weight by exactly ``-eta s^2 A A^T G B^T B``; with orthonormal ``A`` (``A^T A = I``) and
``B`` (``B B^T = I``, LoRA-SB) that is ``-eta s^2 P_A G P_B``, the gradient projected onto the
frozen subspaces (the map is linear in ``R``, so there is no ``O(eta^2)`` term).

**LoRA-SB** (Ponkshe, Singhal et al., 2024, *Initialization using Update Approximation is a
Silver Bullet for Extreme Efficient Low-Rank Fine-Tuning*, arXiv:2411.19557; official code
``RaghavSinghal10/lora-sb`` @37b33d4c4c57: ``utils/gradient_utils.py::estimate_and_process_grads_torch``,
``utils/initialization_utils.py::find_and_initialize_grad``, ``utils/svd_utils.py::get_svd_grad``,
``utils/latent_utils.py::forward_latent``, ``train_glue.py``). Init from the "update
approximation" of the first optimizer step:

.. math::  \\widetilde{\\Delta W} = -\\eta_1 \\operatorname{sign}(G),\\qquad
           \\widetilde{\\Delta W} \\approx U_r S_r V_r^\\top,\\qquad
           A = U_r,\\ R = S_r / s,\\ B = V_r^\\top

(``G`` the mean gradient of the targeted leaf, :func:`lrjax.reparam.estimate_grads`; the official
code sums per-batch gradients and keeps the sign, which the mean determines). So
``s A R B = trunc_r(dW~)``: **the base is not offset** -- the model at init already contains the
approximate first update (as in the official code), so the output changes at init by
``trunc_r(-eta_1 sign(G))``. The official code takes the SVD of the transposed torch gradient
``dW~_t^T`` (``in x out``), which *is* lrjax's matrix view, so ``A = U_r``, ``B = V_r^T`` here
and ``lora_A = U_r^T``, ``lora_B = V_r`` there. ``eta_1`` (field ``eta1``) is, officially,
``lr / (warmup_ratio * total_steps)``: the learning rate of the first step of the linear warmup
(about the size of a first Adam step, which is ``lr_1 sign(g)``);
:meth:`LoRASB.official_eta1` computes it. The default ``eta1 = 1e-4`` is only a placeholder of
that order; set it from your schedule. The official ``R = diag(S_r)`` is not divided by ``s``:
with its ``alpha = r`` (``s = 1``) the two agree; lrjax divides so ``s A R B = trunc_r(dW~)``
for any ``alpha``.

**LoRA-XS** (Balazy et al., 2024, *LoRA-XS: Low-Rank Adaptation with Extremely Small Number of
Parameters*, arXiv:2405.17604; the same repository's ``find_and_initialize`` /
``get_replacement_module``): from the SVD of the weight's matrix view ``W = U S V^T`` (the
official ``target.weight.T``):

.. math::  A = U_r S_r,\\quad B = V_r^\\top,\\quad R \\sim \\mathcal N(0, \\sigma^2),\\ \\sigma = 10^{-5}

(official ``lora_A = (U_r S_r)^T``, ``lora_B = V_r``); the base is unchanged and the output
changes at init only by ``s A R B`` with ``|R| ~ 1e-5``. ``A`` here has orthogonal, not
orthonormal, columns.

Free choices, pinned: the SVD is exact (:func:`lrjax.linalg.svd`, float32) by default; the
official ``get_svd_grad`` uses ``torch.svd_lowrank(q=r, niter=10)`` (randomized) and rounds
``U, S, V`` to bfloat16 before building the factors. ``n_iter=k`` uses
:func:`lrjax.linalg.randomized_svd` with ``k`` power steps. Singular-vector signs follow
:mod:`lrjax.linalg` (they cancel in ``A R B``). Factors are computed in float32 and cast once to
the factor dtype. ``A R`` (and ``W + s A R B``) are computed in
``promote_types(w, A, R, B, float32)`` and rounded once to the base leaf's dtype. Degenerate
input: a zero gradient (LoRA-SB: ``sign(0) = 0``) or a zero/rank-deficient weight (LoRA-XS)
gives zero singular values and still orthonormal (pinned) vectors, so the factors are finite;
LoRA-SB's core is then 0 (it still trains: ``A`` and ``B`` are frozen, not a saddle).

Example::

    rp = LoRASB(rank=8, eta1=LoRASB.official_eta1(lr=1e-3, warmup_ratio=0.06, total_steps=5000))
    base, ad = rp.init(key, params, grads=estimate_grads(loss_fn, params, batches, rp.targets))
    trainable, frozen = rp.split(ad)            # {path: {"r": core}}, {path: {"a": A, "b": B}}
    loss = lambda t: loss_fn(rp.materialize(base, rp.join(t, frozen)), batch)
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp

from lrjax import _validation as V
from lrjax import linalg
from lrjax.reparam.base import LowRankForm, Reparam

__all__ = ["LoRASB", "LoRAXS"]


@dataclasses.dataclass(frozen=True)
class _CoreReparam(Reparam):
    """Shared structure of LoRA-SB and LoRA-XS: ``W + s A R B`` with ``A``, ``B`` frozen."""

    n_iter: int | None = None

    factor_keys = ("a", "r", "b")
    frozen_keys = ("a", "b")

    def __post_init__(self):
        super().__post_init__()
        V.check_int(self.n_iter, "n_iter", low=0, allow_none=True)

    def _svd(self, key, x):
        if self.n_iter is None:
            return linalg.svd(x, self.rank)
        return linalg.randomized_svd(key, x, self.rank, n_iter=self.n_iter)

    def factors(self, w, f: dict) -> LowRankForm:
        """``(A R, B, s, None)``: ``A R`` in ``promote_types(w, A, R, B, float32)``."""
        cd = self.compute_dtype(w, f) if w is not None else \
            V.compute_dtype(*(f[k].dtype for k in self.factor_keys))  # w=None: exporters read the form only
        return LowRankForm(f["a"].astype(cd) @ f["r"].astype(cd), f["b"], self.scale, None)

    def _check_extra(self, path: str, f: Mapping, argname: str):
        """The core ``r`` must be ``[*batch, rank, rank]`` (batch axes of ``a``)."""
        core, a = f["r"], f["a"]
        want = tuple(a.shape[:-2]) + (self.rank, self.rank)
        if tuple(core.shape) != want:
            raise ValueError(f"{argname}[{path!r}]['r']: the core must have shape {want} ([*batch, rank, rank] "
                             f"with rank={self.rank}), got {tuple(core.shape)}; adapters made for another base or "
                             "rank?")

    @staticmethod
    def _pack(w, dt, a, core, b):
        return w, {"a": a.astype(dt), "r": core.astype(dt), "b": b.astype(dt)}


@dataclasses.dataclass(frozen=True)
class LoRASB(_CoreReparam):
    """LoRA-SB: ``W + s A R B`` initialized from ``trunc_r(-eta1 sign(G))``; only ``R`` trains.

    ``init(key, params, grads=estimate_grads(...))`` returns ``(params, adapters)`` (the base is
    *not* rewritten; the model at init contains the approximate first update). See the module
    docstring for math, orientation and official code.

    Args:
      rank: ``r``, an int ``>= 1``, ``<= min(M, N)`` of every targeted leaf. Trainable
        parameters: ``r^2`` per matrix.
      alpha: ``s = alpha / r``; ``None`` (default) means ``alpha = r`` (``s = 1``, official).
      targets, axes, dtype: as for :class:`~lrjax.LoRA` (``dtype``: factor dtype).
      eta1: ``eta_1 > 0`` of the update approximation (default ``1e-4``, a placeholder; official:
        :meth:`official_eta1`).
      n_iter: ``None`` (default) exact SVD; an int ``>= 0``: randomized SVD with that many power steps
        (official: ``svd_lowrank(q=r, niter=10)``).

    Raises:
      TypeError/ValueError naming the field; ``init`` raises ``ValueError`` naming ``grads``
      without gradients or with gradients of other leaves.
    """

    eta1: float = 1e-4

    needs_grads = True

    def __post_init__(self):
        super().__post_init__()
        V.check_float(self.eta1, "eta1", low=0.0, low_open=True)

    @staticmethod
    def official_eta1(lr: float, warmup_ratio: float, total_steps: int) -> float:
        """``lr / (warmup_ratio * total_steps)``: the official ``eff_lr`` (``train_glue.py``), i.e. the
        learning rate of the first step of a linear warmup over ``warmup_ratio * total_steps`` steps."""
        lr = V.check_float(lr, "lr", low=0.0, low_open=True)
        warmup_ratio = V.check_float(warmup_ratio, "warmup_ratio", low=0.0, high=1.0, low_open=True)
        total_steps = V.check_int(total_steps, "total_steps", low=1)
        return lr / (warmup_ratio * total_steps)

    def init_leaf(self, key, w, path, *, g):
        dw = -self.eta1 * jnp.sign(g.astype(jnp.float32))      # the update approximation, matrix view
        u, sv, vt = self._svd(key, dw)
        core = (sv / self.scale)[..., :, None] * jnp.eye(self.rank, dtype=jnp.float32)
        return self._pack(w, self.factor_dtype(w), u, core, vt)


@dataclasses.dataclass(frozen=True)
class LoRAXS(_CoreReparam):
    """LoRA-XS: ``W + s A R B`` with ``A = U_r S_r``, ``B = V_r^T`` from the SVD of ``W``; only ``R``
    (``~ N(0, core_std^2)``) trains. The base is unchanged. See the module docstring.

    Args:
      rank, alpha, targets, axes, dtype, n_iter: as for :class:`LoRASB`.
      core_std: standard deviation of the initial core (default ``1e-5``, official); ``>= 0``
        (``0`` makes the output exactly unchanged at init).
    """

    core_std: float = 1e-5

    def __post_init__(self):
        super().__post_init__()
        V.check_float(self.core_std, "core_std", low=0.0)

    def init_leaf(self, key, w, path):
        k_svd, k_core = jax.random.split(key)
        u, sv, vt = self._svd(k_svd, w)
        a = u * sv[..., None, :]
        core = self.core_std * jax.random.normal(k_core, (*w.shape[:-2], self.rank, self.rank), jnp.float32)
        return self._pack(w, self.factor_dtype(w), a, core, vt)
