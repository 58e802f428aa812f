"""LoRA-GA: low-rank adaptation initialized from the gradient, with the base rewritten.

Paper: Wang, Yu & Li, 2024, *LoRA-GA: Low-Rank Adaptation with Gradient Approximation*,
arXiv:2407.05000. Official code ``Outsider565/LoRA-GA`` @abfa0c2a4671
(``peft/src/peft/tuners/lora/layer.py::LoraLayer.lora_ga_init``,
``peft/src/peft/utils/lora_ga_utils/lora_ga_utils.py::estimate_gradient``,
``peft/src/peft/tuners/lora/config.py::LoraGAConfig``). PEFT's re-implementation
(``init_lora_weights="lora_ga"``, ``LoraGAConfig``, ``preprocess_loraga``;
``peft/tuners/lora/layer.py::LoraLayer.lora_ga_init`` in PEFT 0.21.2) differs in the math and is
offered as ``semantics="peft"``.

Math (torch orientation, as in the paper and both codes): ``W in R^{m x n}`` (``m = d_out``,
``n = d_in``), ``G = mean dL/dW`` over a few batches (:func:`lrjax.reparam.estimate_grads`),
``G = U S V^T`` its SVD, ``s = alpha / r``. With index sets ``I_A, I_B`` of size ``r`` from
``{1..2r}`` (the ``direction``):

.. math::  A_0 = c_A\\,V_{I_A}^\\top\\ (r \\times n),\\qquad B_0 = c_B\\,U_{I_B}\\ (m \\times r),
           \\qquad W_\\text{res} = W - s\\,B_0 A_0

so ``W_res + s B_0 A_0 = W``: the model is unchanged at init. For ``direction="ArB2r"``
(``I_A = 1..r``, ``I_B = r+1..2r``) and ``c_A = c_B = c``, one SGD step of size ``eta`` on the
factors changes the effective weight by ``-eta s^2 (B_0 B_0^T G + G A_0^T A_0) + O(eta^2) =
-eta s^2 c^2 trunc_2r(G) + O(eta^2)``: the best rank-``2r`` approximation of the full
fine-tuning step (the paper's "gradient approximation").

Orientation in lrjax: the matrix view of a Dense kernel is ``W_view = W^T: [M = n (in), N = m
(out)]``, the gradient view is ``G^T``, and ``a = A_0^T: [M, r]``, ``b = B_0^T: [r, N]``, so
``W_view + s a b`` is ``(W + s B_0 A_0)^T``. With ``G^T = u diag(sv) vt`` (:func:`lrjax.linalg.svd`
of the gradient view; ``u = V``, ``vt = U^T``): ``a = c_A u[:, I_A]``, ``b = c_B vt[I_B, :]``. The
"stable" scale uses ``d_out = N``.

``direction`` (both codes): ``"ArB2r"`` (default) ``I_A = 1..r``, ``I_B = r+1..2r``;
``"ArBr"``: ``I_A = 2, 4, .., 2r``, ``I_B = 1, 3, .., 2r - 1`` (official ``V[1:2r:2]``,
``U[:, 0:2r:2]``); ``"A2rBr"``: ``I_A = r+1..2r``, ``I_B = 1..r``; ``"random"``: a random
permutation ``p`` of ``1..2r`` per matrix (from the leaf key), official ``I_A = p[:r]``,
``I_B = p[r:]`` (disjoint; the official code uses Python's ``random.sample``), PEFT
``I_A = I_B = p[:r]`` (``torch.randperm``).

``init_scale`` (PEFT calls this field ``scale``; here ``scale`` is the LoRA scale ``s``), with
``official:`` the rule on the unit singular vectors and ``peft:`` PEFT's rule, whose
``B_0 = U_{I_B} diag(S_{I_B})`` carries the singular values:

* ``"stable"`` (default): official ``c_A = c_B = m^{1/4} / sqrt(gamma)``; peft: ``c_B`` only.
* ``"gd"`` (PEFT's name ``"gd_scale"``): both factors divided by ``s`` in both semantics.
* ``"unit"``: no scaling.
* ``"weightS"`` (PEFT's name ``"weight_svd"``): official ``c_A = c_B = mean_{i<=r} sqrt(S_W,i / s)``;
  peft: ``B_0 *= S_W,1 / S_{I_B,1}`` when ``S_{I_B,1} > 0``.

(``gamma = stable_gamma``, default 16; ``S_W`` the singular values of ``W``; aliases map to the
same choice: ``"gd_scale"`` is PEFT's name for ``"gd"``, ``"weight_svd"`` PEFT's for the official
``"weightS"``, and each semantics applies its own rule to it.) ``norm_clip=True`` (official only):
if ``max|s B_0 A_0| > max|W|``, both factors are multiplied by ``sqrt(max|W| / max|s B_0 A_0|)``.

Every difference of PEFT's ``lora_ga_init`` (0.21.2) from the official code, all reproduced by
``semantics="peft"``: ``B_0 = U_{I_B} diag(S_{I_B})`` (singular values on ``B``, not unit vectors);
the stable factor on ``B_0`` only; ``"weight_svd"`` rescales ``B_0`` by ``S_W,1 / S_{I_B,1}``
(``S_W,1`` from ``svd_lowrank(W, q=r, niter=4)``) instead of the official mean-root rule;
``"random"`` uses the same indices for ``A`` and ``B``; the factors are cast to the base dtype
before the residual is computed; no ``norm_clip``. Not reproduced: without a gradient PEFT falls
back to LoRA's default init (for loading saved adapters); lrjax refuses ``init`` without
``grads``.

Free choices, pinned:

* The SVDs are exact (:func:`lrjax.linalg.svd`, float32) by default; both codes use
  ``torch.svd_lowrank(G, q=min(4r, m, n), niter=4)`` (and ``q = 4r`` resp. ``q = r`` for ``W``'s
  values), which is randomized. ``n_iter=k`` uses :func:`lrjax.linalg.randomized_svd` with ``k``
  power steps and the same sketch width ``min(4r, M, N)``. When ``min(m, n) <= 4r`` the torch
  sketch spans the whole range and its result is exact up to rounding.
* Singular-vector signs follow :mod:`lrjax.linalg` (largest-magnitude entry of each column of
  ``u``, i.e. of ``V``'s columns, positive). Note that for ``ArB2r`` ``B_0 A_0`` *does* depend on
  these signs (``A`` and ``B`` take different singular pairs), while ``W_res + s B_0 A_0``, the
  projectors ``B_0 B_0^T`` and ``A_0^T A_0``, and therefore the training dynamics up to the sign
  of each factor column, do not.
* The residual ``W_res = W - s a b`` is computed from the factors *as stored* (in
  ``promote_types(w, a, b, float32)``) and rounded once to ``w.dtype``, as PEFT and
  :class:`~lrjax.PiSSA` do; the official code subtracts the unrounded float32 product (the two
  agree when the factor dtype is float32). ``materialize`` at init therefore returns ``W`` up to the
  rounding of the stored residual.
* Rank rule: ``2 * rank <= min(M, N)`` for every targeted leaf (``2r`` singular vectors are
  needed by every ``direction``); a larger rank is refused naming ``rank`` and the leaf.

Degenerate gradients: a zero or rank-deficient ``G`` is valid. Singular vectors of zero singular
values are still orthonormal (LAPACK's completion, signs pinned), so the factors are finite, the
residual makes the output unchanged, and PEFT's ``B_0`` has zero columns there; the
``"weight_svd"`` ratio is skipped (PEFT's ``if S_B[0] > 0``) when ``S_{I_B,1} = 0``.

Training afterwards is plain LoRA on ``(W_res, a, b)``. Export to PEFT: the base is rewritten
(``rewrites_base = True``), so a PEFT file for the *original* model needs the rank-``2r``
conversion ``W_res + s a b = W + s [a | a_0] [b ; -b_0]`` (as for PiSSA).

Example::

    rp = LoRAGA(rank=8, alpha=16, targets=".*/kernel")
    grads = estimate_grads(loss_fn, params, batches, rp.targets)
    base, adapters = rp.init(key, params, grads=grads)     # train adapters on `base`
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lrjax import _validation as V
from lrjax import linalg
from lrjax.reparam.lora import LoRA

__all__ = ["LoRAGA"]

_SEMANTICS = ("official", "peft")
_DIRECTIONS = ("ArB2r", "ArBr", "A2rBr", "random")
_SCALES = ("stable", "gd", "gd_scale", "unit", "weightS", "weight_svd")
_CANON = {"gd_scale": "gd", "weight_svd": "weightS"}


def _index_sets(direction: str, r: int):
    """``(I_A, I_B)`` (0-based numpy arrays) for the deterministic directions."""
    ar = np.arange(r)
    if direction == "ArB2r":
        return ar, ar + r
    if direction == "ArBr":
        return 2 * ar + 1, 2 * ar
    return ar + r, ar  # A2rBr


def _take_cols(x, idx):
    """``x[..., :, idx]`` with ``idx: [*batch, r]`` (per batch element)."""
    return jnp.take_along_axis(x, idx[..., None, :], axis=-1)


def _take_rows(x, idx):
    return jnp.take_along_axis(x, idx[..., :, None], axis=-2)


@dataclasses.dataclass(frozen=True)
class LoRAGA(LoRA):
    """LoRA-GA: LoRA whose factors come from the SVD of the mean gradient; ``init`` rewrites the base.

    ``init(key, params, grads=estimate_grads(...))`` returns ``(W_res, adapters)`` with
    ``W_res + s a b = W`` (see the module docstring for the math and orientation).

    Args:
      rank: ``r``, an int ``>= 1`` with ``2 r <= min(M, N)`` of every targeted leaf.
      alpha: ``s = alpha / r``; ``None`` means ``alpha = r``. (Official examples: ``r = 32``,
        ``alpha = 8`` for Llama-2-7B; ``alpha = 16`` for T5-base.)
      targets, axes, dtype: as for :class:`~lrjax.LoRA` (``dtype``: factor dtype).
      semantics: ``"official"`` (default; unit singular vectors, both factors scaled) or ``"peft"``
        (PEFT's ``lora_ga_init``: ``B_0`` carries the singular values, the stable factor on ``B_0``
        only).
      direction: ``"ArB2r"`` (default), ``"ArBr"``, ``"A2rBr"`` or ``"random"``.
      init_scale: ``"stable"`` (default), ``"gd"`` (alias ``"gd_scale"``), ``"unit"``, ``"weightS"``
        (alias ``"weight_svd"``); PEFT's ``LoraGAConfig.scale``. Stored in canonical form.
      stable_gamma: ``gamma > 0`` of the stable scale (default 16, both codes).
      n_iter: ``None`` (default): exact SVDs; an int ``>= 0``: randomized SVDs with that many power
        steps (the codes use ``torch.svd_lowrank(niter=4)``).
      norm_clip: official option, ``False`` by default (refused with ``semantics="peft"``).

    Raises:
      TypeError/ValueError naming the field for a wrong config value; ``init`` raises a
      ``ValueError`` naming ``grads`` without gradients or with gradients of other leaves, and
      naming ``rank`` and the leaf when ``2 r > min(M, N)``.
    """

    semantics: str = "official"
    direction: str = "ArB2r"
    init_scale: str = "stable"
    stable_gamma: float = 16.0
    n_iter: int | None = None
    norm_clip: bool = False

    needs_grads = True
    rewrites_base = True

    def __post_init__(self):
        super().__post_init__()
        V.check_choice(self.semantics, "semantics", _SEMANTICS)
        V.check_choice(self.direction, "direction", _DIRECTIONS)
        V.check_choice(self.init_scale, "init_scale", _SCALES)
        object.__setattr__(self, "init_scale", _CANON.get(self.init_scale, self.init_scale))
        V.check_float(self.stable_gamma, "stable_gamma", low=0.0, low_open=True)
        V.check_int(self.n_iter, "n_iter", low=0, allow_none=True)
        V.check_bool(self.norm_clip, "norm_clip")
        if self.norm_clip and self.semantics == "peft":
            raise ValueError("norm_clip is an option of the official LoRA-GA code only; PEFT's lora_ga_init has "
                             "no norm clip: use semantics='official' or norm_clip=False")

    def check_leaf_rank(self, path: str, m: int, n: int):
        """``1 <= rank`` and ``2 * rank <= min(M, N)``: every direction reads ``2r`` singular vectors."""
        super().check_leaf_rank(path, m, n)
        if 2 * self.rank > min(m, n):
            raise ValueError(f"rank={self.rank}: LoRA-GA needs 2*rank = {2 * self.rank} singular vectors of the "
                             f"gradient, but leaf {path!r} has matrix view [{m}, {n}] (min(M, N) = {min(m, n)}); "
                             f"use rank <= {min(m, n) // 2} or narrow the targets")

    def _svd(self, key, x, k):
        if self.n_iter is None:
            return linalg.svd(x, k)
        m, n = x.shape[-2:]
        q = min(4 * self.rank, m, n)
        return linalg.randomized_svd(key, x, k, oversample=q - k, n_iter=self.n_iter)

    def _weight_values(self, key, w):
        """Top-``r`` singular values of the weight (both codes use ``svd_lowrank`` on ``W``)."""
        return self._svd(key, w, self.rank).s   # bfloat16/float16 weights are factorized in float32

    def init_leaf(self, key, w, path, *, g):
        r = self.rank
        *bs, m, n = w.shape
        k_svd, k_perm, k_w = jax.random.split(key, 3)
        u, sv, vt = self._svd(k_svd, g, 2 * r)          # g: [*bs, M, N] = G^T; u = V, vt = U^T
        if self.direction == "random":
            nb = int(np.prod(bs)) if bs else 1
            perm = jax.vmap(lambda k: jax.random.permutation(k, 2 * r))(jax.random.split(k_perm, nb))
            perm = perm.reshape(*bs, 2 * r)
            ia = perm[..., :r]
            ib = perm[..., :r] if self.semantics == "peft" else perm[..., r:]
        else:
            ia_np, ib_np = _index_sets(self.direction, r)
            ia = jnp.broadcast_to(jnp.asarray(ia_np), (*bs, r))
            ib = jnp.broadcast_to(jnp.asarray(ib_np), (*bs, r))
        a = _take_cols(u, ia)                            # [*bs, M, r] = A_0^T (unit columns)
        b = _take_rows(vt, ib)                           # [*bs, r, N] = B_0^T (unit rows)
        s = self.scale
        one = jnp.ones((*bs, 1, 1), jnp.float32)
        ca, cb = one, one
        if self.semantics == "peft":
            s_b = jnp.take_along_axis(sv, ib, axis=-1)   # [*bs, r]
            b = b * s_b[..., :, None]
            if self.init_scale == "stable":
                cb = one * (n ** 0.25 / np.sqrt(self.stable_gamma))
            elif self.init_scale == "gd":
                ca, cb = one / s, one / s
            elif self.init_scale == "weightS":
                sw1 = self._weight_values(k_w, w)[..., 0]
                sb1 = s_b[..., 0]
                ratio = jnp.where(sb1 > 0, sw1 / jnp.where(sb1 > 0, sb1, 1.0), 1.0)
                cb = ratio[..., None, None]
        else:
            if self.init_scale == "stable":
                c = n ** 0.25 / np.sqrt(self.stable_gamma)
                ca, cb = one * c, one * c
            elif self.init_scale == "gd":
                ca, cb = one / s, one / s
            elif self.init_scale == "weightS":
                sw = self._weight_values(k_w, w)
                avg = jnp.mean(jnp.sqrt(jnp.maximum(sw, 0.0) / s), axis=-1)[..., None, None]
                ca, cb = avg, avg
        a = a * ca
        b = b * cb
        if self.norm_clip:
            off = jnp.max(jnp.abs(s * (a @ b)), axis=(-2, -1), keepdims=True)
            wmax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=(-2, -1), keepdims=True)
            ratio = jnp.where(off > wmax, wmax / jnp.where(off > 0, off, 1.0), 1.0)
            a = a * jnp.sqrt(ratio)
            b = b * jnp.sqrt(ratio)
        dt = self.factor_dtype(w)
        f = {"a": a.astype(dt), "b": b.astype(dt)}
        cd = self.compute_dtype(w, f)
        w_res = (w.astype(cd) - s * (f["a"].astype(cd) @ f["b"].astype(cd))).astype(w.dtype)
        return w_res, f
