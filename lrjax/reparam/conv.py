"""Low-rank adapters for convolution kernels in Flax's HWIO layout: three conventions.

A Flax ``nn.Conv`` kernel is ``K: [kh, kw, C_in, C_out]`` (HWIO); torch's ``Conv2d.weight`` is
``W_t: [C_out, C_in, kh, kw]`` (OIHW) with ``K[h, w, i, o] = W_t[o, i, h, w]``. Three ways to put
a low-rank update on it are in use, and lrjax has all three.

1. PEFT's conv LoRA (and DoRA) = plain :class:`lrjax.LoRA` / :class:`lrjax.RSLoRA` / :class:`lrjax.DoRA`
------------------------------------------------------------------------------------------------
PEFT (``peft/tuners/lora/layer.py::_ConvNd``) adds ``s * B(A(x))`` with ``A`` a ``kh x kw`` conv
``C_in -> r`` (the base's stride and padding) and ``B`` a ``1 x 1`` conv ``r -> C_out``, i.e.

.. math::  \\Delta W_t[o, i, h, w] = s \\sum_j B_t[o, j]\\, A_t[j, i, h, w],
           \\qquad A_t: [r, C_in, kh, kw],\\; B_t: [C_out, r, 1, 1].

lrjax's default matrix view of a 4-D kernel (:mod:`lrjax.axes`) is ``[kh*kw*C_in, C_out]``
(rows ordered ``(h, w, i)``, row-major). In that view the update above is exactly LoRA's
``s A B`` with

.. math::  A[(h, w, i), j] = A_t[j, i, h, w] \\;(A: [kh\\,kw\\,C_{in}, r]),\\qquad
           B[j, o] = B_t[o, j, 0, 0] \\;(B: [r, C_{out}]),

so ``lrjax.LoRA(rank=r)`` on a conv kernel *is* PEFT's conv LoRA (same parameter count
``r (kh kw C_in + C_out)``, same scale ``alpha / r``, same init ``A ~ U(+-1/sqrt(kh kw C_in))``
= torch's ``kaiming_uniform_(a=sqrt(5))`` on ``A_t``, ``B = 0``), and
:func:`lrjax.interop.export_peft` / :func:`~lrjax.interop.import_peft` convert the factors
(``lora_A.weight = A.reshape(kh, kw, C_in, r).transpose(3, 2, 0, 1)``,
``lora_B.weight = B^T[:, :, None, None]``). DoRA's magnitude in PEFT
(``tuners/lora/dora.py::_DoraConvNdLayer.get_weight_norm``) is one value per output channel,
the L2 norm over ``(C_in, kh, kw)``; lrjax.DoRA's column norm over the ``[kh*kw*C_in, C_out]``
view is the same set of entries, so ``lrjax.DoRA`` is PEFT's conv DoRA (PEFT stores the
magnitude as ``[1, C_out, 1, 1]``). Verified against PEFT on torch in
``tests/test_conv_adapters.py``. :func:`lrjax.factored` runs these adapters on a
``conv_general_dilated`` as ``conv(x, K) + s conv_1x1(conv_kxk(x, A), B)`` (times DoRA's
per-channel scale) instead of forming ``K + s A B``.

One difference from PEFT: PEFT builds ``A`` with the base's stride and padding but **not its
dilation**, so for a dilated base conv PEFT's unmerged forward is not ``conv(x, W + dW)``: it
fails on a shape mismatch (PEFT 0.21, ``k > 1``) or, where the sizes happen to agree, differs
from PEFT's own merged model. lrjax always adds the update to the kernel, which is what PEFT's
``merge_and_unload`` model computes (tested).

2. :class:`ConvLoRA`: loralib's convention (microsoft/LoRA ``loralib/layers.py::ConvLoRA``, used by DSCLoRA)
----------------------------------------------------------------------------------------------------------
``A_l: [r k, C_in k]``, ``B_l: [C_out k, r k]`` and
``dW_t = s * reshape(B_l A_l, (C_out, C_in, k, k))`` (row-major), ``s = alpha / r``,
``A_l ~ kaiming_uniform_(a=sqrt(5))`` (``U(+-1/sqrt(C_in k))``), ``B_l = 0``; square kernels
(``kh = kw = k``) only, as in loralib. The matrix ``B_l A_l`` is a rank-``r k`` matrix in a
*different* matricization of the kernel -- ``OIHW`` flattened and cut into ``C_out k`` rows of
``C_in k`` -- so :class:`ConvLoRA` overrides the matrix-view hooks: ``to_view(K) =
reshape(transpose(K, OIHW), (C_out k, C_in k))^T`` (``[C_in k, C_out k]``, lrjax's ``[in, out]``
orientation) and stores ``a = A_l^T: [C_in k, r k]``, ``b = B_l^T: [r k, C_out k]``, a plain
``(a, b)`` pair in that view. Rank rule: ``r k <= min(C_out k, C_in k)``, i.e.
``rank <= min(C_in, C_out)``. Parameters ``r k^2 (C_in + C_out)``. The update is not a pair of
convolutions, so :func:`lrjax.factored` uses the materialized kernel for these leaves.

3. :class:`CPLoRA`: a rank-``R`` CP decomposition of the 4-D update (arXiv:2508.01772)
-----------------------------------------------------------------------------------
.. math::  \\Delta W_t = s \\sum_{q=1}^{R} a_q \\circ b_q \\circ c_q \\circ d_q,\\qquad
           \\Delta K[h, w, i, o] = s \\sum_q H[h, q]\\, Wd[w, q]\\, I[i, q]\\, O[o, q]

with factors ``{"out": O [C_out, R], "inp": I [C_in, R], "h": H [kh, R], "w": Wd [kw, R]}``,
``s = alpha / R``, parameters ``R (C_out + C_in + kh + kw)``. In lrjax's default view this is a
LoRA with ``A = `` the Khatri-Rao product of ``(H, Wd, I)`` in HWIO row order
(``[kh kw C_in, R]``) and ``B = O^T`` (``[R, C_out]``), which :meth:`CPLoRA.factors` returns,
so ``materialize``/``merge``/``delta`` and the two-convolution factored path work unchanged, and
a CP-LoRA is exactly a PEFT conv LoRA of rank ``R`` with that ``A``.

Init (the paper's code is not public and its text is not in the reference set, so this is
lrjax's documented choice, **UNVERIFIED** against the authors): ``O = 0`` -- the output-side
factor, the analogue of LoRA's ``B = 0`` -- so the model is unchanged at init and the first
gradient step moves ``O`` only (``dL/dO`` is non-zero, the other factors' gradients are zero
while ``O = 0``, exactly as for LoRA's ``A``); ``I ~ U(+-1/sqrt(C_in))``,
``H ~ U(+-sqrt(3/kh))``, ``Wd ~ U(+-sqrt(3/kw))``, so every entry of the Khatri-Rao ``A`` has
variance ``1 / (3 kh kw C_in)``, the variance of LoRA's ``A ~ U(+-1/sqrt(kh kw C_in))``
(the update's initial scale matches PEFT's conv LoRA at equal ``alpha / R``). The CP rank is not
bounded by ``min(M, N)`` (higher ranks were better in the paper); lrjax refuses ``R`` above
``C_out C_in kh kw / max(C_out, C_in, kh, kw)``, the generic upper bound on the CP rank of any
tensor of that shape (more components are always redundant).

4. DoRA on each convention (the paper's DoRA-C, convDoRA, CP-DoRA)
------------------------------------------------------------------
``W'_t = m * (W_t + dW_t) / ||W_t + dW_t||`` with one magnitude per output channel, the norm over
``(C_in, kh, kw)`` detached (as :class:`lrjax.DoRA`, PEFT ``_DoraConvNdLayer``), ``m`` initialized
to ``||W_t||`` so the model is unchanged at init, and a zero-norm channel given a zero direction:

* DoRA-C = PEFT's conv DoRA = :class:`lrjax.DoRA` on the conv kernel (the default view's columns
  are the output channels);
* :class:`ConvDoRA`: on :class:`ConvLoRA`'s update. In its ``[C_in k, C_out k]`` view, output channel
  ``o`` owns the ``k`` consecutive columns ``o k .. o k + k - 1`` (rows of the row-major reshape of
  ``[C_out, C_in, k, k]``), so the channel norm pools those columns and the column scale is
  ``c`` repeated ``k`` times;
* :class:`CPDoRA`: on :class:`CPLoRA`'s update, in the default view (exports to PEFT as a conv DoRA).

How the paper's variants parameterize ``m`` is **UNVERIFIED** (its code and methods text were not
available); lrjax follows DoRA/PEFT above.

Bad input
---------
:class:`ConvLoRA`, :class:`CPLoRA` and their DoRA variants adapt 4-D (2-D convolution) kernels only: a Dense
leaf (2-D), a 1-D/3-D conv kernel, a non-square kernel (ConvLoRA), ``axes=`` (their matrix view
is fixed), a rank above the bounds above, and factors of the wrong shape raise ``ValueError``
naming the leaf, the argument and the fix (``lrjax.LoRA`` adapts any kernel in PEFT's
convention). Precision follows lrjax's one-rounding rule (see :mod:`lrjax.reparam.base`).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from lrjax import _validation as V
from lrjax.reparam.base import LowRankForm, Reparam, _all_finite, _is_concrete
from lrjax.reparam.dora import _safe_ratio, column_norm

__all__ = ["ConvLoRA", "CPLoRA", "ConvDoRA", "CPDoRA"]

def _conv4(rp, path: str, shape, *, square: bool) -> tuple[int, int, int, int]:
    """``(kh, kw, C_in, C_out)`` of a 2-D conv kernel leaf; ``ValueError`` naming the leaf otherwise."""
    name = type(rp).__name__
    shape = tuple(int(d) for d in shape)
    if len(shape) == 2:
        raise ValueError(
            f"{name}: leaf {path!r} has shape {shape}, a Dense kernel [in, out]; {name} adapts 2-D convolution "
            "kernels [kh, kw, C_in, C_out] (Flax nn.Conv, HWIO) only. Use lrjax.LoRA for Dense leaves (and for "
            "PEFT's conv LoRA convention), or narrow `targets` to the conv kernels")
    if len(shape) != 4:
        raise ValueError(
            f"{name}: leaf {path!r} has shape {shape}; {name} adapts 4-D kernels [kh, kw, C_in, C_out] of 2-D "
            "convolutions (Flax nn.Conv, HWIO) only. Use lrjax.LoRA (PEFT's conv convention, any kernel rank), or "
            "narrow `targets`")
    kh, kw, ci, co = shape
    if square and kh != kw:
        raise ValueError(
            f"{name}: leaf {path!r} has a non-square {kh}x{kw} window (shape {shape}); loralib's ConvLoRA "
            "reshapes B A into [C_out, C_in, k, k] and needs kh == kw. Use lrjax.CPLoRA or lrjax.LoRA (PEFT's "
            "conv convention) for this leaf, or narrow `targets`")
    return kh, kw, ci, co


@dataclasses.dataclass(frozen=True)
class _ShapeAwareInit(Reparam):
    """Conv kernels: ``init_leaf``/``check_leaf_rank`` read the kernel's own shape (``uses_leaf_shape``);
    the matrix view is fixed, so ``axes`` is refused."""

    uses_leaf_shape = True

    def __post_init__(self):
        super().__post_init__()
        if self.axes is not None:
            raise ValueError(f"axes: {type(self).__name__} has a fixed matrix view of the 4-D HWIO conv kernel "
                             f"and takes no axes override; got axes={self.axes!r:.80}. Drop axes=")


@dataclasses.dataclass(frozen=True)
class ConvLoRA(_ShapeAwareInit):
    """loralib's ConvLoRA on a Flax HWIO kernel ``[k, k, C_in, C_out]``: ``dW_t = s reshape(B_l A_l,
    (C_out, C_in, k, k))`` with ``A_l: [r k, C_in k]``, ``B_l: [C_out k, r k]`` (see the module docstring).

    Adapters hold ``{"a": A_l^T [C_in k, r k], "b": B_l^T [r k, C_out k]}`` in the matrix view
    ``[C_in k, C_out k]`` of :meth:`to_view`. ``W_eff = W + (alpha / r) dW``.

    Args:
      rank: ``r``, an int ``>= 1`` with ``r <= min(C_in, C_out)`` of every targeted kernel (the
        factors' rank is ``r k``).
      alpha: scale numerator (loralib's ``lora_alpha``), finite ``> 0`` or ``None`` (= ``rank``).
      targets: which leaves (4-D conv kernels only; see :mod:`lrjax.tree`).
      axes: must be ``None`` (the view is fixed).
      dtype: factor dtype (default: the kernel's).

    Init: ``A_l ~ U(+-1/sqrt(C_in k))`` (torch's ``kaiming_uniform_(a=sqrt(5))``), ``B_l = 0``.
    """

    def view_shape(self, path, shape):
        kh, _, ci, co = _conv4(self, path, shape, square=True)
        return (), ci * kh, co * kh

    def to_view(self, path, leaf):
        kh, _, ci, co = _conv4(self, path, leaf.shape, square=True)
        return jnp.transpose(leaf, (3, 2, 0, 1)).reshape(co * kh, ci * kh).T

    def from_view(self, path, mat, shape):
        k, _, ci, co = _conv4(self, path, shape, square=True)
        return jnp.transpose(mat.T.reshape(co, ci, k, k), (2, 3, 1, 0))

    def check_leaf_rank(self, path, m, n, *, shape):
        k, _, ci, co = shape
        if self.rank > min(ci, co):
            raise ValueError(
                f"rank={self.rank}: ConvLoRA's factors for leaf {path!r} (k={k}, C_in={ci}, C_out={co}) have rank "
                f"r*k = {self.rank * k}, above min(C_out k, C_in k) = {min(ci, co) * k} of its [C_in k, C_out k] "
                f"matricization; use rank <= min(C_in, C_out) = {min(ci, co)}")

    def init_leaf(self, key, w, path, *, shape):
        k = shape[0]
        m, n = w.shape
        rk = self.rank * k
        dt = self.factor_dtype(w)
        bound = 1.0 / np.sqrt(m)
        a = jax.random.uniform(key, (m, rk), jnp.float32, -bound, bound).astype(dt)
        return w, {"a": a, "b": jnp.zeros((rk, n), dt)}

    def check_factors(self, path, f, bshape, m, n, argname, shape=None):
        k = _conv4(self, path, shape, square=True)[0]
        rk = self.rank * k
        a, b = f["a"], f["b"]
        if tuple(a.shape) != (m, rk) or tuple(b.shape) != (rk, n):
            hint = ""
            if tuple(a.shape) == (rk, m) or tuple(b.shape) == (n, rk):
                hint = " (loralib's own orientation? lrjax stores a = lora_A^T and b = lora_B^T)"
            raise ValueError(
                f"{argname}[{path!r}]: ConvLoRA factors a{tuple(a.shape)} b{tuple(b.shape)} do not fit the kernel "
                f"{tuple(shape)}: expected a [C_in k, r k] = {(m, rk)} and b [r k, C_out k] = {(rk, n)} with "
                f"rank={self.rank}, k={k}{hint}; adapters made for another base or another rank")


def _khatri_rao(h, w, inp, cd):
    """``A[(h, w, i), q] = H[h, q] Wd[w, q] I[i, q]``: ``[kh kw C_in, R]`` in HWIO row order."""
    kh, kw, ci, r = h.shape[0], w.shape[0], inp.shape[0], h.shape[1]
    a = h.astype(cd)[:, None, None, :] * w.astype(cd)[None, :, None, :] * inp.astype(cd)[None, None, :, :]
    return a.reshape(kh * kw * ci, r)


@dataclasses.dataclass(frozen=True)
class CPLoRA(_ShapeAwareInit):
    """CP-LoRA: ``dK[h, w, i, o] = (alpha / R) sum_q H[h,q] Wd[w,q] I[i,q] O[o,q]`` on a Flax HWIO
    kernel ``[kh, kw, C_in, C_out]`` (see the module docstring).

    Adapters hold ``{"out": O [C_out, R], "inp": I [C_in, R], "h": H [kh, R], "w": Wd [kw, R]}``;
    :meth:`factors` returns the equivalent matrix-view LoRA ``A = KhatriRao(H, Wd, I)``
    ``[kh kw C_in, R]``, ``B = O^T`` ``[R, C_out]``.

    Args:
      rank: the CP rank ``R``, an int ``>= 1``, at most ``C_out C_in kh kw / max(C_out, C_in, kh, kw)``.
      alpha: scale numerator, finite ``> 0`` or ``None`` (= ``rank``); ``s = alpha / R``.
      targets: which leaves (4-D conv kernels only).
      axes: must be ``None``.
      dtype: factor dtype (default: the kernel's).

    Init (UNVERIFIED against the paper, see the module docstring): ``O = 0``,
    ``I ~ U(+-1/sqrt(C_in))``, ``H ~ U(+-sqrt(3/kh))``, ``Wd ~ U(+-sqrt(3/kw))``.
    """

    factor_keys = ("out", "inp", "h", "w")

    def view_shape(self, path, shape):
        kh, kw, ci, co = _conv4(self, path, shape, square=False)
        return (), kh * kw * ci, co

    def check_leaf_rank(self, path, m, n, *, shape):
        dims = shape
        bound = math.prod(dims) // max(dims)
        if self.rank > bound:
            raise ValueError(
                f"rank={self.rank}: the CP rank of leaf {path!r} (shape {dims}) is at most "
                f"prod(shape) / max(shape) = {bound}; components beyond that are redundant. Use rank <= {bound}")

    def init_leaf(self, key, w, path, *, shape):
        kh, kw, ci, co = shape
        dt = self.factor_dtype(w)
        r = self.rank
        k_inp, k_h, k_w = jax.random.split(key, 3)

        def u(k, shape, bound):
            return jax.random.uniform(k, shape, jnp.float32, -bound, bound).astype(dt)

        return w, {"out": jnp.zeros((co, r), dt), "inp": u(k_inp, (ci, r), 1.0 / np.sqrt(ci)),
                   "h": u(k_h, (kh, r), np.sqrt(3.0 / kh)), "w": u(k_w, (kw, r), np.sqrt(3.0 / kw))}

    def factors(self, w, f) -> LowRankForm:
        """The matrix-view form of the CP delta (``w``, the ``[kh kw C_in, C_out]`` base view, is not
        read): ``A[(h, w, i), q] = h[h, q] w[w, q] inp[i, q]`` (Khatri-Rao product, ``[kh kw C_in, R]``),
        ``B = out^T`` (``[R, C_out]``), scale ``alpha / R``, no column scale; computed in the
        promoted dtype of the four factors."""
        cd = V.compute_dtype(*(f[k].dtype for k in ("out", "inp", "h", "w")))
        a = _khatri_rao(f["h"], f["w"], f["inp"], cd)
        return LowRankForm(a, jnp.swapaxes(f["out"], 0, 1), self.scale, None)

    def check_factors(self, path, f, bshape, m, n, argname, shape=None):
        kh, kw, ci, co = _conv4(self, path, shape, square=False)
        want = {"out": co, "inp": ci, "h": kh, "w": kw}
        for nm, d in want.items():
            x = f[nm]
            if x.ndim != 2 or x.shape[0] != d:
                raise ValueError(
                    f"{argname}[{path!r}][{nm!r}] has shape {tuple(x.shape)}, expected [{d}, R] for the kernel "
                    f"{tuple(shape)} [kh, kw, C_in, C_out] (CPLoRA factors: out [C_out, R], inp [C_in, R], "
                    "h [kh, R], w [kw, R]); adapters made for another base?")
        ranks = {nm: f[nm].shape[1] for nm in want}
        if len(set(ranks.values())) != 1:
            raise ValueError(f"{argname}[{path!r}]: CPLoRA factors disagree on the CP rank R (second axis): "
                             f"{ranks}; all four must have the same R")
        self.check_factor_rank(path, ranks["out"], argname)


# ------------------------------------------------------------------------------- DoRA variants
def _checked_m(m, path: str):
    """Refuse a magnitude that overflows its dtype (float16 norms above 65504) at init."""
    if _is_concrete(m) and not _all_finite(m):
        raise ValueError(f"dtype: a channel norm of leaf {path!r} overflows {jnp.dtype(m.dtype).name} (the DoRA "
                         "magnitude m); use dtype=jnp.float32 or jnp.bfloat16 for the factors")
    return m


def _check_m(f, co: int, path: str, argname: str):
    if tuple(f["m"].shape) != (co,):
        raise ValueError(f"{argname}[{path!r}]['m'] has shape {tuple(f['m'].shape)}, expected ({co},): one DoRA "
                         "magnitude per output channel")


def _no_unmerge(rp, path):
    raise ValueError(f"{type(rp).__name__}.unmerge: the merge of {path!r} cannot be inverted from merged weights (the "
                     "channel norm ||W + dW|| is lost); keep the base params")


@dataclasses.dataclass(frozen=True)
class CPDoRA(CPLoRA):
    """DoRA over :class:`CPLoRA` (the paper's CP-DoRA): ``K' = m * (K + dK) / ||K + dK||`` per output
    channel (norm over ``(kh, kw, C_in)``, detached), ``m: [C_out]`` initialized to ``||K||``.
    Same arguments as :class:`CPLoRA`; adapters add ``"m"``. In the default view this is
    :class:`lrjax.DoRA` with ``A`` the Khatri-Rao product, so it exports to PEFT's conv DoRA."""

    factor_keys = ("out", "inp", "h", "w", "m")

    def _direction(self, w, f):
        form = CPLoRA.factors(self, w, f)
        cd = self.compute_dtype(w, f)
        return w.astype(cd) + form.scale * (form.a.astype(cd) @ form.b.astype(cd))

    def init_leaf(self, key, w, path, *, shape):
        w, f = super().init_leaf(key, w, path, shape=shape)
        f["m"] = _checked_m(column_norm(self._direction(w, f), dtype=f["out"].dtype), path)
        return w, f

    def factors(self, w, f) -> LowRankForm:
        form = CPLoRA.factors(self, w, f)
        m = f["m"]
        norm = jax.lax.stop_gradient(column_norm(self._direction(w, f), dtype=m.dtype))
        cd = self.compute_dtype(w, f)
        return LowRankForm(form.a, form.b, form.scale, _safe_ratio(m.astype(cd), norm.astype(cd)))

    def check_factors(self, path, f, bshape, m, n, argname, shape=None):
        super().check_factors(path, f, bshape, m, n, argname, shape)
        _check_m(f, n, path, argname)

    def unmerge_leaf(self, w_merged, f, path):
        _no_unmerge(self, path)


@dataclasses.dataclass(frozen=True)
class ConvDoRA(ConvLoRA):
    """DoRA over :class:`ConvLoRA` (the paper's convDoRA): ``W'_t = m * (W_t + dW_t) / ||W_t + dW_t||``
    per output channel (norm over ``(C_in, k, k)``, detached), ``m: [C_out]`` initialized to
    ``||W_t||``. In ConvLoRA's ``[C_in k, C_out k]`` view channel ``o`` is the ``k`` columns
    ``o k .. o k + k - 1``, so the channel norm pools those columns and the column scale is
    ``m / norm`` repeated ``k`` times. Same arguments as :class:`ConvLoRA`; adapters add ``"m"``."""

    factor_keys = ("a", "b", "m")

    def _direction(self, w, f):
        cd = self.compute_dtype(w, f)
        return w.astype(cd) + self.scale * (f["a"].astype(cd) @ f["b"].astype(cd))

    @staticmethod
    def _channel_norm(v, co: int, dtype):
        """``[C_in k, C_out k]`` view -> ``[C_out]``: the L2 norm of each channel's ``k`` columns
        (0 with a zero gradient for an all-zero channel)."""
        cd = V.compute_dtype(v.dtype)
        sq = jnp.sum(jnp.square(v.astype(cd)), axis=-2)
        sq = sq.reshape(co, sq.shape[-1] // co).sum(-1)
        pos = sq > 0
        return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1)), 0).astype(dtype)

    def init_leaf(self, key, w, path, *, shape):
        w, f = super().init_leaf(key, w, path, shape=shape)
        co = shape[3]
        f["m"] = _checked_m(self._channel_norm(self._direction(w, f), co, f["a"].dtype), path)
        return w, f

    def factors(self, w, f) -> LowRankForm:
        m = f["m"]
        co = m.shape[-1]
        norm = jax.lax.stop_gradient(self._channel_norm(self._direction(w, f), co, m.dtype))
        cd = self.compute_dtype(w, f)
        c = _safe_ratio(m.astype(cd), norm.astype(cd))
        return LowRankForm(f["a"], f["b"], self.scale, jnp.repeat(c, w.shape[-1] // co))

    def check_factors(self, path, f, bshape, m, n, argname, shape=None):
        super().check_factors(path, f, bshape, m, n, argname, shape)
        _check_m(f, n // shape[0], path, argname)

    def unmerge_leaf(self, w_merged, f, path):
        _no_unmerge(self, path)
