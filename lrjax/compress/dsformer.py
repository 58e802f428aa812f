"""DSFormer: a dense basis times semi-structured sparse coefficients, trained by the
straight-through factorizer (STF).

Chand, Prabhu & Kumar, 2023, *DSFormer: Effective Compression of Text-Transformers by Dense-Sparse
Weight Factorization* (arXiv:2312.13211; no official code found: the per-row top-s choice below is
our reading [ours]). In lrjax's matrix view (``W: [M, N]``, ``y = x W``; the paper's
``W^T [d_out, d_in] ~ C B``) a leaf is factored as

.. math::  W \\approx D\\,S,\\qquad D: [M, k]\\ \\text{dense basis},\\quad S: [k, N]

with **exactly ``s`` nonzeros in every column of ``S``** (= every row of the paper's ``C``: each
output unit mixes ``s`` of the ``k`` basis vectors). STF keeps ``S`` dense during training; the
forward uses ``S * topk_mask(|S|, s)`` and the backward passes the gradient straight through to
every entry (:func:`ste`), so the support is learned jointly with the task loss.

Storage per matrix: ``k M + s N`` values plus ``s N`` indices of ``ceil(log2 k)`` bits
(:func:`num_bytes`). :func:`init` gives a task-unaware start (alternating least squares: SVD basis,
top-s support, per-column least squares on the support, basis refit); :func:`compress` applies it to
the selected leaves of a params tree and returns a :class:`lrjax.compress.Compressed` whose
``factors[path] = {"a": D, "b": S_masked}`` run through :func:`lrjax.factored`; for training, feed
``ste_factors(factors, s)`` instead of ``factors``.
"""
from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from lrjax import axes as axes_lib
from lrjax import linalg
from lrjax import tree as tree_lib
from lrjax._validation import check_array, check_finite, check_float, check_int, check_rank
from lrjax.compress import core
from lrjax._validation import check_params

__all__ = ["topk_mask", "ste", "ste_factors", "init", "compress", "num_bytes", "svd_rank_at_equal_params"]


def _check_s(s, k, name="s"):
    s = check_int(s, name, low=1)
    if s > k:
        raise ValueError(f"{name}={s} exceeds the basis size k={k}: each column keeps s of the k coefficients; "
                         f"pick s <= k")
    return s


def topk_mask(c, s: int, axis: int = -2):
    """0/1 mask keeping the ``s`` largest ``|c|`` along ``axis`` (default: each column of a
    ``[..., k, N]`` coefficient matrix); exactly ``s`` ones per column (ties by lowest index)."""
    c = check_array(c, "c", min_ndim=2, kind="floating")
    axis = check_int(axis, "axis", low=-c.ndim, high=c.ndim - 1)
    k = c.shape[axis]
    s = _check_s(s, k)
    cm = jnp.moveaxis(jnp.abs(c), axis, -1)
    _, idx = jax.lax.top_k(cm, s)
    mask = jnp.sum(jax.nn.one_hot(idx, k, dtype=c.dtype), axis=-2)
    return jnp.moveaxis(mask, -1, axis)


def ste(c, s: int):
    """Straight-through top-s sparsification: forward ``c * topk_mask(c, s)``, gradient identity."""
    sparse = c * jax.lax.stop_gradient(topk_mask(c, s))
    return c + jax.lax.stop_gradient(sparse - c)


def ste_factors(factors: dict, s: int) -> dict:
    """``factors`` with every ``"b"`` passed through :func:`ste` (use in the training loss)."""
    if not isinstance(factors, dict) or not factors:
        raise TypeError(f"factors must be the non-empty dict of a DSFormer Compressed, got {type(factors).__name__}")
    return {p: {**f, "b": ste(f["b"], s)} for p, f in factors.items()}


def _support_lstsq(w, d, mask, lam):
    """Per column j: least squares of w[:, j] on the columns of d where mask[:, j] = 1."""
    dm = d[..., None, :, :] * jnp.swapaxes(mask, -1, -2)[..., :, None, :]  # [..., N, M, k] masked basis
    g = jnp.swapaxes(dm, -1, -2) @ dm + lam * jnp.eye(d.shape[-1], dtype=d.dtype)
    rhs = jnp.swapaxes(dm, -1, -2) @ jnp.swapaxes(w, -1, -2)[..., :, :, None]
    coef = jnp.linalg.solve(g, rhs)[..., 0]  # [..., N, k]
    return jnp.swapaxes(coef, -1, -2) * mask


def init(w, k: int, s: int, *, iters: int = 100, lam: float = 1e-6):
    """Task-unaware dense-sparse factors ``(D [..., M, k], S [..., k, N])`` of ``w: [..., M, N]`` by
    alternating least squares (``iters`` rounds; ``lam`` a relative ridge; the basis columns are
    rescaled to unit norm after every round, which leaves ``D S``'s fit unchanged and stops the scale
    drift of ALS). ``S`` has exactly ``s`` nonzeros per column. Raises ``ValueError`` if the
    factors are not finite (never returns NaN)."""
    w = check_array(w, "w", min_ndim=2, kind="floating")
    m, n = w.shape[-2:]
    k = check_rank(k, m, n, name="k")
    s = _check_s(s, k)
    iters = check_int(iters, "iters", low=0)
    lam = check_float(lam, "lam", low=0.0)
    check_finite(w, "w")
    d, c = _init(w.astype(jnp.float32), k, s, iters, lam)
    if not (bool(jnp.all(jnp.isfinite(d))) and bool(jnp.all(jnp.isfinite(c)))):
        raise ValueError(f"DSFormer init of w {tuple(w.shape)} with k={k}, s={s} did not stay finite in float32 "
                         f"(ill-conditioned least squares); raise `lam` (now {lam}) or lower `k` or `iters`")
    return d, c


@functools.partial(jax.jit, static_argnames=("k", "s", "iters"))
def _init(w, k, s, iters, lam):
    u, sv, vt = linalg.svd(w, k)
    d = u * jnp.sqrt(sv)[..., None, :]
    eye = jnp.eye(k, dtype=w.dtype)
    tiny = jnp.finfo(w.dtype).tiny

    def rel_ridge(gram):  # lam times the mean diagonal of a Gram matrix: scale-free regularisation
        return (lam * jnp.mean(jnp.diagonal(gram, axis1=-2, axis2=-1), axis=-1) + tiny)[..., None, None]

    def coefs(d):  # (support, ridge) from the dense least-squares coefficients' top-s per column
        dtd = jnp.swapaxes(d, -1, -2) @ d
        ridge = rel_ridge(dtd)
        mask = topk_mask(jnp.linalg.solve(dtd + ridge * eye, jnp.swapaxes(d, -1, -2) @ w), s)
        return _support_lstsq(w, d, mask, ridge[..., None, :, :])

    def body(_, d):
        c = coefs(d)
        cct = c @ jnp.swapaxes(c, -1, -2)
        d = jnp.swapaxes(jnp.linalg.solve(cct + rel_ridge(cct) * eye, c @ jnp.swapaxes(w, -1, -2)), -1, -2)
        # D S is invariant to D's column scales (S rescales inversely), so ALS drifts in scale: an atom
        # used by a few small coefficients grows without bound and overflows (seen on trained attention
        # kernels at k = 64). Unit-norm atoms pin the scale; an unused (zero) atom stays zero.
        nrm = jnp.linalg.norm(d, axis=-2, keepdims=True)
        return d / jnp.where(nrm > 0, nrm, 1.0)

    d = jax.lax.fori_loop(0, iters, body, d)
    return d, coefs(d)


def num_bytes(m: int, n: int, k: int, s: int, itemsize: int = 4) -> int:
    """Stored bytes of one ``[m, n]`` matrix: ``(k m + s n)`` values and ``s n`` indices of
    ``ceil(log2 k)`` bits (at least 1)."""
    m, n = check_int(m, "m", low=1), check_int(n, "n", low=1)
    k = check_int(k, "k", low=1)
    s = _check_s(s, k)
    bits = max(1, math.ceil(math.log2(k)))
    return (k * m + s * n) * itemsize + math.ceil(s * n * bits / 8)


def svd_rank_at_equal_params(m: int, n: int, k: int, s: int) -> int:
    """The truncated-SVD rank with (at most) the same number of stored values: ``floor((k m + s n) / (m + n))``."""
    m, n = check_int(m, "m", low=1), check_int(n, "n", low=1)
    k = check_int(k, "k", low=1)
    s = _check_s(s, k)
    return max(1, (k * m + s * n) // (m + n))


def compress(params, k: int, s: int, targets="kernel", *, iters: int = 100, axes=None) -> core.Compressed:
    """DSFormer factors of every selected leaf (see module docstring); basis size ``k`` and ``s``
    nonzeros per output column, the same for every leaf."""
    check_params(params)
    k = check_int(k, "k", low=1)
    s = _check_s(s, k)
    flat = tree_lib.flatten(params)
    paths = tree_lib.select(params, targets, where=lambda p, l: hasattr(l, "ndim") and hasattr(l, "dtype"))
    factors, new_base, layers = {}, {}, []
    for p in paths:
        leaf = check_array(flat[p], f"params[{p!r}]", min_ndim=2, kind="floating")
        ax = axes_lib.resolve(p, leaf.shape, axes)
        bshape, m, n = axes_lib.matrix_shape(leaf.shape, ax)
        check_rank(k, m, n, name="k", where=f"leaf {p!r}")
        check_finite(leaf, f"params[{p!r}]")
        w = axes_lib.to_matrix(leaf, ax)
        d, c = init(w, k, s, iters=iters)
        err = float(jnp.linalg.norm((w - d @ c).ravel()) / jnp.maximum(jnp.linalg.norm(w.ravel()), 1e-30))
        factors[p] = {"a": d.astype(leaf.dtype), "b": c.astype(leaf.dtype)}
        new_base[p] = jnp.zeros_like(leaf)
        nb = int(np.prod(bshape)) if bshape else 1
        isz = jnp.dtype(leaf.dtype).itemsize
        layers.append(core.LayerReport(p, bshape, m, n, k, min(m, n), leaf.size * isz,
                                       nb * num_bytes(m, n, k, s, isz), err, "dense-sparse"))
    rp = core.LowRankParams(rank=1, targets=tuple(re.escape(p) for p in factors), axes=axes)
    total = core.tree_bytes(params)
    rep = core.Report(layers, rule=f"k={k}, s={s}", method="dsformer", model_bytes_before=total,
                      model_bytes_after=total - sum(l.bytes_before - l.bytes_after for l in layers),
                      extra={"k": k, "s": s})
    return core.Compressed(tree_lib.replace(params, new_base), factors, rp, rep)
