"""Training losses used by lrjax's distillation experiments, as pure functions.

Spatial affinity distillation (DSCLoRA's ``L_AD``)
-------------------------------------------------
DSCLoRA (Chai et al. 2025, arXiv:2504.11271, "Distillation-Supervised Convolutional Low-Rank
Adaptation for Efficient Image Super-Resolution") trains its ConvLoRA student with

.. math::  L = \\lambda_1 L_1(SR, HR) + \\lambda_2 L_1(SR_S, SR_T) + \\lambda_3 L_{AD},

where ``L_AD`` is the spatial feature-affinity distillation loss the paper takes from FAKD
(He et al. 2020, ICIP, "FAKD: Feature-Affinity Based Knowledge Distillation for Efficient Image
Super-Resolution"; both papers describe it as transferring "second-order statistical
information"). DSCLoRA's training code is not released (``Yaozzz666/DSCF-SR`` ships inference
only) and the reference set holds only its abstract, so the normalization is taken from FAKD's
official code (``Vincent-Hoo/Knowledge-Distillation-for-Super-resolution``
``code/feature_transformation.py::spatial_similarity`` and its L1 criterion), which is the
documented choice here (**UNVERIFIED** against DSCLoRA's own unreleased training code):

for a feature map ``F`` of ``C`` channels at ``H x W`` positions (lrjax/Flax layout
``[..., H, W, C]``), every position's channel vector is divided by its L2 norm,

.. math::  \\hat F_{:, p} = F_{:, p} / (\\lVert F_{:, p} \\rVert_2 + \\varepsilon),
           \\qquad A = \\hat F^{\\top} \\hat F \\in \\mathbb{R}^{HW \\times HW},

so ``A[p, q]`` is the cosine similarity of positions ``p`` and ``q`` (``eps = 1e-7`` as in FAKD),
and the loss is the mean absolute difference of the student's and the teacher's affinity
matrices over the batch and all ``(HW)^2`` entries (``distance="l1"``, FAKD's ``nn.L1Loss``), or
the mean squared difference (``distance="l2"``). Because each position is normalized over
channels, ``A`` does not depend on the channel count (student and teacher may differ in ``C``),
is invariant to a positive per-position rescaling of the features (up to ``eps``), and to any
orthogonal mixing of the channels.

Degenerate input: an all-zero channel vector (a dead position) has a zero normalized vector (its
row and column of ``A`` are 0) and a finite gradient (the norm's square root is taken only where
it is positive), never NaN.
"""
from __future__ import annotations

import jax.numpy as jnp

from lrjax import _validation as V

__all__ = ["spatial_affinity", "spatial_affinity_loss"]


def _check_features(x, name: str):
    x = V.check_array(x, name, min_ndim=3, kind="floating")
    if x.shape[-3] == 0 or x.shape[-2] == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have non-empty H, W and C axes ([..., H, W, C]), got shape {tuple(x.shape)}")
    V.check_finite(x, name)
    return x


def _affinity(f, eps, cd):
    f = f.astype(cd)
    *batch, h, w, c = f.shape
    f = f.reshape(*batch, h * w, c)
    sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
    pos = sq > 0
    norm = jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1)), 0)  # safe sqrt: finite gradient at 0
    fh = f / (norm + eps)
    return jnp.einsum("...pc,...qc->...pq", fh, fh)


def spatial_affinity(features, *, eps: float = 1e-7):
    """FAKD / DSCLoRA spatial affinity ``A = F_hat^T F_hat`` of a feature map.

    Args:
      features: ``[*batch, H, W, C]`` floating array (Flax NHWC layout), finite.
      eps: ``> 0`` finite float added to each position's channel norm (default ``1e-7``, FAKD's).

    Returns:
      ``[*batch, H*W, H*W]``: ``A[..., p, q] = <F_p, F_q> / ((|F_p| + eps)(|F_q| + eps))`` with positions
      flattened row-major (``p = h * W + w``); computed in ``promote_types(features.dtype, float32)``
      and rounded once to ``features.dtype``.

    Raises:
      TypeError: ``features`` not a floating array; ``eps`` not a real number.
      ValueError: ``features`` with fewer than 3 axes, an empty H/W/C axis, or NaN/Inf (concrete);
        ``eps`` not finite and positive.
    """
    features = _check_features(features, "features")
    eps = V.check_float(eps, "eps", low=0.0, low_open=True)
    cd = V.compute_dtype(features.dtype)
    return _affinity(features, eps, cd).astype(features.dtype)


def spatial_affinity_loss(student, teacher, *, distance: str = "l1", eps: float = 1e-7):
    """DSCLoRA's ``L_AD``: distance between the spatial affinity matrices of two feature maps.

    .. math::  L_{AD} = \\operatorname{mean}_{b,p,q} \\lvert A^S_{b,p,q} - A^T_{b,p,q} \\rvert
               \\quad(\\text{or the mean of the squares for } \\texttt{distance="l2"}),

    with ``A`` from :func:`spatial_affinity` (see the module docstring for the normalization and
    where it comes from).

    Args:
      student: ``[*batch, H, W, C_s]`` floating array (the student's feature map).
      teacher: ``[*batch, H, W, C_t]`` floating array with the student's ``*batch, H, W`` (the
        channel counts may differ). Not detached here: wrap it in ``jax.lax.stop_gradient`` when the
        teacher is not trained (in a typical distillation step the teacher's features are constants).
      distance: ``"l1"`` (default, FAKD's L1) or ``"l2"`` (mean squared difference).
      eps: ``> 0``, added to each channel norm (default ``1e-7``).

    Returns:
      A scalar in ``promote_types(student, teacher, float32)`` (at least float32; bfloat16 inputs
      are computed and reduced in float32). ``0`` for identical inputs; at most ``2`` (``l1``) or
      ``4`` (``l2``).

    Raises:
      TypeError: a non-array or non-floating ``student``/``teacher``; ``distance`` not a str; ``eps``
        not a real number.
      ValueError: fewer than 3 axes, empty axes, NaN/Inf (concrete), ``teacher.shape[:-1] !=
        student.shape[:-1]`` (naming ``teacher``), an unknown ``distance``, ``eps`` not finite and
        positive.
    """
    student = _check_features(student, "student")
    teacher = _check_features(teacher, "teacher")
    if tuple(student.shape[:-1]) != tuple(teacher.shape[:-1]):
        raise ValueError(
            f"teacher must have the student's batch and spatial shape [*batch, H, W] = {tuple(student.shape[:-1])} "
            f"(channels may differ), got teacher shape {tuple(teacher.shape)}; resize the teacher's features to "
            "the student's H x W first")
    distance = V.check_choice(distance, "distance", ("l1", "l2"))
    eps = V.check_float(eps, "eps", low=0.0, low_open=True)
    cd = V.compute_dtype(student.dtype, teacher.dtype)
    diff = _affinity(student, eps, cd) - _affinity(teacher, eps, cd)
    if distance == "l1":
        return jnp.mean(jnp.abs(diff))
    return jnp.mean(jnp.square(diff))
