"""PELA: low-rank initialization by SVD, then feature distillation to the frozen original.

Guo et al., 2023, *PELA: Learning Parameter-Efficient Models with Low-Rank Approximation*
(arXiv:2310.10700; official code guoyang9/PELA, Apache-2.0). Facts used here:

* Rank per ``[M, N]`` matrix at compression ratio ``c``: ``r = floor(M N / (c (M + N)))``
  (:func:`lrjax.compress.pela_rank`), so the factored parameter count ``r (M + N)`` is about
  ``M N / c``. Layers whose path contains ``norm``, ``head``, ``patch_embed`` or ``downsample``
  and layers with fewer than 10 outputs are skipped (kept dense), as in the code's
  ``name_omit`` / ``out_features < 10``; biases are kept.
* Init ``W ~ (U_r sqrt(S_r)) (sqrt(S_r) V_r^T)`` (truncated SVD).
* Training (teacher frozen, student = low-rank copy)::

      L = CE + kd_alpha * mean_l MSE(feat_s^l, feat_t^l) + kd_beta * MSE(logits_s, logits_t)
             + inf_norm_weight * mean_layers (max |A B - W_t| - inf_norm_eps)^2

  (the last term is the "weight perturbation regularization": the max-abs entry of each
  reconstructed matrix's error, squared distance to ``inf_norm_eps``, as the code's
  ``mse_loss(norm(rebuild - W_t, inf), eps)``). Defaults: :data:`DEFAULTS` (DeiT scripts:
  ``c = 2``, ``kd_alpha = 1``, ``kd_beta = 0``, ``inf_norm_weight = 0``, ``eps = 1e-3``; the Swin
  scripts use ``c = 1.5`` and ``inf_norm_weight = 1``).
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from lrjax import axes as axes_lib
from lrjax import tree as tree_lib
from lrjax._validation import check_array, check_float, check_int
from lrjax.compress import core
from lrjax._validation import check_params

__all__ = ["DEFAULTS", "SKIP", "compress", "feature_loss", "logit_loss", "weight_perturbation", "distill_loss"]

#: defaults of the official DeiT scripts
DEFAULTS = {"ratio": 2.0, "kd_alpha": 1.0, "kd_beta": 0.0, "inf_norm_weight": 0.0, "inf_norm_eps": 1e-3}
#: path substrings PELA never factorizes
SKIP = ("norm", "head", "patch_embed", "downsample")


def compress(params, ratio: float = DEFAULTS["ratio"], targets="kernel", *, skip=SKIP, min_out: int = 10,
             method: str = "svd", calib: dict | None = None, axes=None) -> core.Compressed:
    """SVD-initialized low-rank copy of ``params`` at compression ratio ``ratio`` (> 1)."""
    check_params(params)
    ratio = check_float(ratio, "ratio", low=1.0, low_open=True)
    min_out = check_int(min_out, "min_out", low=1)
    if isinstance(skip, str) or not isinstance(skip, (list, tuple)) or not all(isinstance(s, str) for s in skip):
        raise TypeError(f"skip must be a list/tuple of path substrings, got {skip!r}")
    flat = tree_lib.flatten(params)
    cand = tree_lib.select(params, targets, where=lambda p, l: hasattr(l, "ndim") and hasattr(l, "dtype"))
    chosen = []
    for p in cand:
        if any(s in p for s in skip):
            continue
        leaf = flat[p]
        check_array(leaf, f"params[{p!r}]", min_ndim=2, kind="floating")
        _, _, n = axes_lib.matrix_shape(leaf.shape, axes_lib.resolve(p, leaf.shape, axes))
        if n >= min_out:
            chosen.append(p)
    if not chosen:
        raise ValueError(f"targets: every selected leaf is skipped (skip={skip}, min_out={min_out}); "
                         f"selected were {cand}")
    return core.compress(params, tuple(re.escape(p) for p in chosen), ratio=ratio, method=method, calib=calib,
                         axes=axes)


def _mse(a, b):
    return jnp.mean((a.astype(jnp.float32) - b.astype(jnp.float32)) ** 2)


def feature_loss(feats_s, feats_t):
    """``mean_l MSE(feat_s^l, stop_gradient(feat_t^l))`` over lists of per-layer features."""
    if not isinstance(feats_s, (list, tuple)) or not isinstance(feats_t, (list, tuple)):
        raise TypeError("feats_s and feats_t must be lists of per-layer feature arrays")
    if not feats_s or len(feats_s) != len(feats_t):
        raise ValueError(f"feats_s and feats_t must be non-empty and of equal length, got {len(feats_s)} and "
                         f"{len(feats_t)}")
    tot = 0.0
    for i, (a, b) in enumerate(zip(feats_s, feats_t)):
        a = check_array(a, f"feats_s[{i}]", kind="floating")
        b = check_array(b, f"feats_t[{i}]", kind="floating")
        if a.shape != b.shape:
            raise ValueError(f"feats_s[{i}] and feats_t[{i}] must have the same shape, got {a.shape} and {b.shape}")
        tot = tot + _mse(a, jax.lax.stop_gradient(b))
    return tot / len(feats_s)


def logit_loss(logits_s, logits_t):
    """``MSE(logits_s, stop_gradient(logits_t))`` (PELA's ``L_sr``)."""
    a = check_array(logits_s, "logits_s", kind="floating")
    b = check_array(logits_t, "logits_t", kind="floating")
    if a.shape != b.shape:
        raise ValueError(f"logits_s and logits_t must have the same shape, got {a.shape} and {b.shape}")
    return _mse(a, jax.lax.stop_gradient(b))


def weight_perturbation(compressed, factors, teacher, *, eps: float = DEFAULTS["inf_norm_eps"]):
    """``mean over factored leaves of (max |A B - W_t| - eps)^2`` (differentiable in ``factors``).
    ``compressed`` gives the leaf paths and axes; ``teacher`` is the original params tree."""
    if not isinstance(compressed, core.Compressed):
        raise TypeError(f"compressed must be an lrjax.compress.Compressed, got {type(compressed).__name__}")
    eps = check_float(eps, "eps", low=0.0)
    flat = tree_lib.flatten(teacher)
    if not isinstance(factors, dict) or set(factors) != set(compressed.factors):
        raise ValueError(f"factors must have the paths {sorted(compressed.factors)}")
    tot = 0.0
    for p, f in factors.items():
        if p not in flat:
            raise ValueError(f"teacher: no leaf {p!r}; pass the original (uncompressed) params")
        w = flat[p]
        wm = axes_lib.to_matrix(w, compressed.rp.leaf_axes(p, w.shape)).astype(jnp.float32)
        err = f["a"].astype(jnp.float32) @ f["b"].astype(jnp.float32) - jax.lax.stop_gradient(wm)
        tot = tot + (jnp.max(jnp.abs(err)) - eps) ** 2
    return tot / len(factors)


def distill_loss(ce, feats_s=None, feats_t=None, logits_s=None, logits_t=None, *, compressed=None, factors=None,
                 teacher=None, kd_alpha: float = DEFAULTS["kd_alpha"], kd_beta: float = DEFAULTS["kd_beta"],
                 inf_norm_weight: float = DEFAULTS["inf_norm_weight"],
                 inf_norm_eps: float = DEFAULTS["inf_norm_eps"]):
    """PELA's training loss ``CE + kd_alpha L_fm + kd_beta L_sr + inf_norm_weight L_inf``.

    ``ce``: the task loss (a scalar). A term with weight 0 is skipped (its inputs may be ``None``);
    a term with a positive weight needs its inputs (``feats_*``; ``logits_*``;
    ``compressed``/``factors``/``teacher``). Returns ``(loss, parts)`` with the unweighted parts.
    """
    kd_alpha = check_float(kd_alpha, "kd_alpha", low=0.0)
    kd_beta = check_float(kd_beta, "kd_beta", low=0.0)
    inf_norm_weight = check_float(inf_norm_weight, "inf_norm_weight", low=0.0)
    ce = check_array(ce, "ce", kind="floating", convert=True)
    parts = {"ce": ce}
    loss = ce
    if kd_alpha > 0:
        if feats_s is None or feats_t is None:
            raise ValueError("feats_s and feats_t are required when kd_alpha > 0 (set kd_alpha=0.0 to skip)")
        parts["feature"] = feature_loss(feats_s, feats_t)
        loss = loss + kd_alpha * parts["feature"]
    if kd_beta > 0:
        if logits_s is None or logits_t is None:
            raise ValueError("logits_s and logits_t are required when kd_beta > 0")
        parts["logit"] = logit_loss(logits_s, logits_t)
        loss = loss + kd_beta * parts["logit"]
    if inf_norm_weight > 0:
        if compressed is None or factors is None or teacher is None:
            raise ValueError("compressed, factors and teacher are required when inf_norm_weight > 0")
        parts["weight"] = weight_perturbation(compressed, factors, teacher, eps=inf_norm_eps)
        loss = loss + inf_norm_weight * parts["weight"]
    return loss, parts
