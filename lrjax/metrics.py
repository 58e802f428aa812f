"""Calibration metrics of a classifier: ECE, classwise ECE, MCE, ACE, thresholded ACE, Brier.

The definitions follow the calibration code of HypeLoRA (Trojan & Gebala, 2026, *HypeLoRA:
Hypernetwork-Generated LoRA Adapters for Calibrated Language Model Fine-Tuning*,
arXiv:2603.19278; official code ``btrojan-official/HypeLoRA calibration_metrics.py`` @aff4460428c2),
re-derived here as jit-able JAX. Each function takes

* ``probs``: ``[n, C]`` predicted class probabilities (rows sum to 1), floating;
* ``labels``: ``[n]`` integer class labels in ``[0, C)``;

and returns a 0-d array in the compute dtype ``promote_types(probs.dtype, float32)`` (float64
inputs are computed in float64 when ``jax_enable_x64`` is on). Let ``conf_i = max_c p_ic``,
``pred_i = argmax_c p_ic`` (first maximum on ties) and ``acc_i = [pred_i == y_i]``.

Equal-width bins (``ece``, ``mce``, ``classwise_ece``): ``B = n_bins`` bins with bounds
``linspace(0, 1, B + 1)``; bin 0 is ``[0, 1/B]`` (closed at 0), bin ``b > 0`` is
``(b/B, (b+1)/B]``. Values outside ``[0, 1]`` fall in no bin (as in the official code). Bin
membership is decided exactly as the official float64 comparison decides it for the given
confidences: for float32 confidences the interior bounds are rounded *down* to float32, since for
a float32 ``c``, ``c > b`` (float64 ``b``) holds iff ``c > round_down_f32(b)``; so a confidence of
``float32(0.1)`` (slightly above 0.1) lands in bin 1 as in NumPy.

* ``ece = sum_b (|B_b| / n) |conf(B_b) - acc(B_b)| = sum_b |sum_{i in B_b} (conf_i - acc_i)| / n``
* ``mce = max_{b: |B_b| > 0} |conf(B_b) - acc(B_b)|`` (0 when no bin is occupied)
* ``classwise_ece = sum_c sum_b |B_cb| / (n C) |mean_{B_cb} p_ic - mean_{B_cb} [y_i = c]|``, bins of
  ``p_ic`` per class ``c`` (the mean over classes of a one-vs-rest ECE).
* ``ace``: the confidences sorted ascending (stable sort: ties keep sample order; the official
  code uses NumPy's unstable default sort, which orders ties arbitrarily) and cut into ``B``
  equal-count bins of ``n // B`` samples, the last bin taking the remainder (when ``n < B`` every
  sample is in the last bin); ``ace = sum_b |sum_{i in B_b} (conf_i - acc_i)| / n``. This is the
  official top-label ACE; Nixon et al. (2019) average equal-count bins over every class instead.
* ``thresholded_ace``: every (sample, class) probability ``p_ic >= threshold`` is a prediction
  with accuracy ``[y_i == c]``; these ``n_f`` predictions are pooled, sorted and cut into
  equal-count bins as ACE does; ``sum_b |sum (p - acc)| / n_f`` (0 when ``n_f = 0``). The
  official code pairs probabilities and labels differently (see ``pairing``).
* ``brier = mean_i sum_c (p_ic - [y_i = c])^2`` in ``[0, 2]`` (the official docstring's
  ``[0, 1]`` holds for binary problems only).

:func:`calibration` returns all of them under the official result names.

Official-code deviation (``thresholded_ace``): the official function flattens ``probs``
row-major (entry ``k = i C + c`` is ``p_ic``) but builds the class of entry ``k`` as ``k // n``
(``np.repeat(arange(C), n)``) and its true label as ``y_{k mod n}`` (``np.tile(labels, C)``),
i.e. the layout of the *transposed* array. For ``C > 1`` a probability is thus compared with the
label of a different sample and class. ``pairing="sample_class"`` (default) is the intended
definition above; ``pairing="official"`` reproduces the official pairing, ``acc_k =
[k // n == y_{k mod n}]`` for ``p_k = probs.reshape(-1)[k]``, to compare with numbers produced
by that code (its ``thresholded_ace_*`` results).

Validation (eager, before tracing; value checks only for concrete arrays, skipped under
``jit``): ``probs`` must be a floating ``[n, C]`` array with ``n >= 1`` and ``C >= 1``, finite,
with entries in ``[0, 1]`` and rows summing to 1 within ``atol`` (default
``max(1e-4, 4 eps(probs.dtype))``, i.e. 1e-4 for float32, 0.031 for bfloat16: pass
softmax outputs, not logits); ``labels`` an integer ``[n]`` array with values in ``[0, C)``;
``n_bins`` a static int ``>= 1``. Errors: ``TypeError`` for a wrong kind, ``ValueError`` for a
wrong value or shape, naming the argument.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lrjax import _validation as V

__all__ = ["ece", "classwise_ece", "mce", "ace", "thresholded_ace", "brier", "calibration",
           "OFFICIAL_THRESHOLDS"]

#: thresholds of the thresholded ACE reported by the official code (run_experiment.py)
OFFICIAL_THRESHOLDS = {"thresholded_ace_01": 0.01, "thresholded_ace_001": 0.001,
                       "thresholded_ace_0001": 0.0001}


# ---------------------------------------------------------------------------- validation
def _check(probs, labels, atol=None, n_bins=None):
    probs = V.check_array(probs, "probs", ndim=2, kind="floating")
    labels = V.check_array(labels, "labels", ndim=1, kind="integer")
    n, c = probs.shape
    if n < 1 or c < 1:
        raise ValueError(f"probs must be [n, C] with n >= 1 samples and C >= 1 classes, got shape "
                         f"{tuple(probs.shape)}")
    if labels.shape[0] != n:
        raise ValueError(f"labels must have one entry per row of probs: labels has shape "
                         f"{tuple(labels.shape)} but probs has {n} rows")
    if n_bins is not None:
        V.check_int(n_bins, "n_bins", low=1)
    eps = float(jnp.finfo(probs.dtype).eps)
    tol = max(1e-4, 4.0 * eps) if atol is None else V.check_float(atol, "atol", low=0.0, low_open=True)
    if V.is_concrete(probs):  # NumPy checks: no device dispatch or compilation per shape
        p = np.asarray(probs).astype(np.float64)
        if not np.all(np.isfinite(p)):
            raise ValueError("probs contains NaN or Inf; pass finite class probabilities "
                             "(e.g. jax.nn.softmax(logits))")
        lo, hi = float(p.min()), float(p.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"probs must lie in [0, 1], got values in [{lo:g}, {hi:g}]; pass "
                             "probabilities (jax.nn.softmax(logits)), not logits")
        dev = np.abs(p.sum(axis=1) - 1.0)
        if float(dev.max()) > tol:
            row = int(dev.argmax())
            raise ValueError(f"probs rows must sum to 1 (within atol={tol:g}); row {row} sums to "
                             f"{float(p[row].sum()):.6g}; normalize them (jax.nn.softmax) or raise `atol`")
    if V.is_concrete(labels):
        y = np.asarray(labels)
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= c:
            raise ValueError(f"labels must be class indices in [0, {c}) for probs with {c} classes, got "
                             f"values in [{lo}, {hi}]")
    return probs, labels


def _cd(probs):
    return V.compute_dtype(probs.dtype)


def _interior_bounds(n_bins: int, cd) -> np.ndarray:
    """``linspace(0, 1, B+1)[1:-1]`` (float64) rounded *down* to ``cd``, so that ``c > bound`` in
    ``cd`` decides exactly what ``c > float64 bound`` decides for values ``c`` of ``cd``."""
    b = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    np_cd = np.dtype(cd)
    bc = b.astype(np_cd)
    over = bc.astype(np.float64) > b
    bc = np.where(over, np.nextafter(bc, np_cd.type(-np.inf)), bc)
    return bc


def _equal_width_sums(conf, target, n_bins: int, cd):
    """Per equal-width bin: ``(sum conf, sum target, count)`` over the last axis of ``conf``."""
    bounds = jnp.asarray(_interior_bounds(n_bins, cd), cd)
    idx = jnp.sum(conf[..., None] > bounds, axis=-1)  # bin b <=> b interior bounds lie below conf
    w = ((conf >= 0) & (conf <= 1)).astype(cd)
    onehot = jax.nn.one_hot(idx, n_bins, dtype=cd) * w[..., None]  # [..., n, B]
    sc = jnp.einsum("...n,...nb->...b", conf, onehot)
    st = jnp.einsum("...n,...nb->...b", target, onehot)
    cnt = jnp.sum(onehot, axis=-2)
    return sc, st, cnt


def _top_label(probs, labels, cd):
    p = probs.astype(cd)
    conf = jnp.max(p, axis=1)
    acc = (jnp.argmax(p, axis=1) == labels).astype(cd)
    return conf, acc


# ------------------------------------------------------------------------------- metrics
# The public functions validate eagerly, then call one jitted kernel (one compilation per shape
# instead of one per primitive when called eagerly; inlined under an outer jit).
_static = functools.partial(jax.jit, static_argnames=("n_bins",))


@_static
def _ece(probs, labels, n_bins):
    cd = _cd(probs)
    conf, acc = _top_label(probs, labels, cd)
    sc, sa, _ = _equal_width_sums(conf, acc, n_bins, cd)
    return jnp.sum(jnp.abs(sc - sa)) / probs.shape[0]


@_static
def _mce(probs, labels, n_bins):
    cd = _cd(probs)
    conf, acc = _top_label(probs, labels, cd)
    sc, sa, cnt = _equal_width_sums(conf, acc, n_bins, cd)
    gap = jnp.where(cnt > 0, jnp.abs(sc - sa) / jnp.maximum(cnt, 1), 0)
    return jnp.max(gap).astype(cd)


@_static
def _classwise_ece(probs, labels, n_bins):
    cd = _cd(probs)
    n, c = probs.shape
    p = probs.astype(cd).T  # [C, n]
    target = (labels[None, :] == jnp.arange(c)[:, None]).astype(cd)
    sc, st, _ = _equal_width_sums(p, target, n_bins, cd)
    return jnp.sum(jnp.abs(sc - st)) / (n * c)


def _equal_count_bins(n: int, n_bins: int) -> np.ndarray:
    """Bin of each sorted position: ``min(j // (n // B), B - 1)``; all in the last bin if ``n < B``."""
    per = n // n_bins
    j = np.arange(n)
    return np.full(n, n_bins - 1) if per == 0 else np.minimum(j // per, n_bins - 1)


@_static
def _ace(probs, labels, n_bins):
    cd = _cd(probs)
    conf, acc = _top_label(probs, labels, cd)
    order = jnp.argsort(conf, stable=True)
    gap = (conf - acc)[order]
    bins = jnp.asarray(_equal_count_bins(probs.shape[0], n_bins))
    per_bin = jax.ops.segment_sum(gap, bins, num_segments=n_bins)
    return jnp.sum(jnp.abs(per_bin)) / probs.shape[0]


@functools.partial(jax.jit, static_argnames=("threshold", "n_bins", "pairing"))
def _thresholded_ace(probs, labels, threshold, n_bins, pairing):
    cd = _cd(probs)
    n, c = probs.shape
    v = probs.astype(cd).reshape(-1)  # k = i * C + c
    k = jnp.arange(n * c)
    if pairing == "sample_class":
        acc = labels[k // c] == k % c
    else:  # the official code's layout (see the module docstring)
        acc = (k // n) == labels[k % n]
    acc = acc.astype(cd)
    keep = v >= threshold
    n_f = jnp.sum(keep)
    order = jnp.argsort(jnp.where(keep, v, -jnp.inf), stable=True)  # dropped entries first
    gap = jnp.where(keep, v - acc, 0)[order]
    rank = k - (n * c - n_f)  # position among the kept entries (< 0 for dropped ones)
    per = n_f // n_bins
    bins = jnp.where(per > 0, jnp.minimum(rank // jnp.maximum(per, 1), n_bins - 1), n_bins - 1)
    bins = jnp.clip(bins, 0, n_bins - 1)  # dropped entries carry gap 0 wherever they land
    per_bin = jax.ops.segment_sum(gap, bins, num_segments=n_bins)
    tot = jnp.sum(jnp.abs(per_bin)) / jnp.maximum(n_f, 1).astype(cd)
    return jnp.where(n_f > 0, tot, 0).astype(cd)


@jax.jit
def _brier(probs, labels):
    cd = _cd(probs)
    onehot = jax.nn.one_hot(labels, probs.shape[1], dtype=cd)
    return jnp.mean(jnp.sum((probs.astype(cd) - onehot) ** 2, axis=1))


def ece(probs, labels, *, n_bins: int = 10, atol: float | None = None):
    """Expected calibration error over ``n_bins`` equal-width bins of the top-label confidence.

    ``sum_b (|B_b|/n) |conf(B_b) - acc(B_b)|``; bin 0 is ``[0, 1/B]``, the others ``(b/B, (b+1)/B]``.
    See the module docstring for shapes, dtypes, validation and the official code followed.
    """
    probs, labels = _check(probs, labels, atol, n_bins)
    return _ece(probs, labels, n_bins=n_bins)


def mce(probs, labels, *, n_bins: int = 10, atol: float | None = None):
    """Maximum calibration error: ``max_b |conf(B_b) - acc(B_b)|`` over occupied equal-width bins
    (the bins of :func:`ece`); 0 if no bin is occupied."""
    probs, labels = _check(probs, labels, atol, n_bins)
    return _mce(probs, labels, n_bins=n_bins)


def classwise_ece(probs, labels, *, n_bins: int = 10, atol: float | None = None):
    """Classwise ECE: ``sum_c sum_b |B_cb|/(n C) |mean p_ic - mean [y_i = c]|`` with equal-width
    bins of each class's probability ``p_ic`` (bins as in :func:`ece`)."""
    probs, labels = _check(probs, labels, atol, n_bins)
    return _classwise_ece(probs, labels, n_bins=n_bins)


def ace(probs, labels, *, n_bins: int = 10, atol: float | None = None):
    """Adaptive calibration error (top label): sort the confidences, cut them into ``n_bins``
    equal-count bins of ``n // n_bins`` (the last takes the remainder), and return
    ``sum_b |sum_{i in B_b} (conf_i - acc_i)| / n``."""
    probs, labels = _check(probs, labels, atol, n_bins)
    return _ace(probs, labels, n_bins=n_bins)


def thresholded_ace(probs, labels, *, threshold: float = 0.001, n_bins: int = 10,
                    pairing: str = "sample_class", atol: float | None = None):
    """Thresholded ACE over every (sample, class) probability ``>= threshold``.

    The ``n_f`` kept probabilities are sorted and cut into ``n_bins`` equal-count bins of
    ``n_f // n_bins`` (the last takes the remainder); returns ``sum_b |sum (p - acc)| / n_f``, or 0
    when nothing passes the threshold. ``threshold``: a real in ``[0, 1]`` (official values 0.01,
    0.001, 0.0001; default 0.001 as in the official signature). ``pairing``: ``"sample_class"``
    (default: ``acc = [y_i == c]`` for ``p_ic``) or ``"official"`` (the official code's pairing,
    ``acc_k = [k // n == y_{k mod n}]`` for ``p_k = probs.reshape(-1)[k]``; see the module
    docstring). ``n_f`` depends on the values, so bins are computed with traced integer arithmetic
    (jit-able; ``threshold``, ``n_bins`` and ``pairing`` are static).
    """
    probs, labels = _check(probs, labels, atol, n_bins)
    threshold = V.check_float(threshold, "threshold", low=0.0, high=1.0)
    V.check_choice(pairing, "pairing", ("sample_class", "official"))
    return _thresholded_ace(probs, labels, threshold=threshold, n_bins=n_bins, pairing=pairing)


def brier(probs, labels, *, atol: float | None = None):
    """Multi-class Brier score ``mean_i sum_c (p_ic - [y_i = c])^2`` (in ``[0, 2]``)."""
    probs, labels = _check(probs, labels, atol)
    return _brier(probs, labels)


def calibration(probs, labels, *, n_bins: int = 10, pairing: str = "sample_class",
                atol: float | None = None) -> dict:
    """Every metric of the official evaluation, under its result names: ``ece``, ``classwise_ece``,
    ``mce``, ``ace``, ``thresholded_ace_01`` / ``_001`` / ``_0001`` (thresholds 0.01, 0.001,
    0.0001) and ``brier_score``; each a 0-d array (see the module docstring)."""
    probs, labels = _check(probs, labels, atol, n_bins)
    V.check_choice(pairing, "pairing", ("sample_class", "official"))
    return _calibration(probs, labels, n_bins=n_bins, pairing=pairing)


@functools.partial(jax.jit, static_argnames=("n_bins", "pairing"))
def _calibration(probs, labels, n_bins, pairing):
    out = {"ece": _ece(probs, labels, n_bins=n_bins),
           "classwise_ece": _classwise_ece(probs, labels, n_bins=n_bins),
           "mce": _mce(probs, labels, n_bins=n_bins), "ace": _ace(probs, labels, n_bins=n_bins)}
    for name, t in OFFICIAL_THRESHOLDS.items():
        out[name] = _thresholded_ace(probs, labels, threshold=t, n_bins=n_bins, pairing=pairing)
    out["brier_score"] = _brier(probs, labels)
    return out
