"""LR^2VQ: vector quantization of low-rank representations of weight subvectors.

Zhu, Zhou & Zhong, 2022, *Learning Low-Rank Representations for Model Compression*
(arXiv:2211.11397; no official code found). In lrjax's matrix view ``W: [M, N]`` each output
column is cut into ``M / m`` subvectors of size ``m`` (``m`` must divide ``M``):
``n_sub = (M / m) N`` subvectors ``w_i``. Each is represented as

.. math::  w_i = P z_i,\\qquad P: [m, \\tilde d]\\ \\text{shared per layer},\\quad z_i \\in R^{\\tilde d}

Stages (the paper's pipeline):

1. **low-rank stage** -- :func:`lowrank_init` (PCA of the subvectors: ``P`` the top ``d~`` right
   singular vectors, ``z_i = P^T w_i``), then ``P`` and ``Z`` are trained end to end with the task
   loss through :func:`decode` (they are plain arrays);
2. **clustering** -- ``k`` centroids of the codes: :func:`kmeans` (Lloyd) to start, then the
   differentiable k-means of DKM (:func:`dkm`: soft assignments ``softmax(-||z - c||^2 / t)``,
   centroid refits, differentiable in ``Z``, ``P`` and the centroids) during fine-tuning;
3. **decoding** -- ``w_i = P c_{a(i)}`` with the hard assignment (:func:`reconstruct`).

With ``d~ = m`` and ``P = I`` it is exactly product quantization of the subvectors (:func:`pq`);
this is tested. Compression ratio (float32 weights, ``log2 k``-bit indices, float32 codebook and
``P``): :func:`compression_ratio` ``= 32 n_sub m / (n_sub log2 k + 32 (k d~ + m d~))``.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from lrjax import linalg
from lrjax._validation import check_key
from lrjax._validation import check_array, check_finite, check_float, check_int

__all__ = ["to_subvectors", "from_subvectors", "lowrank_init", "decode", "kmeans", "dkm", "assign", "quantize",
           "reconstruct", "pq", "compression_ratio"]


def _check_w(w, m):
    w = check_array(w, "w", ndim=2, kind="floating")
    m = check_int(m, "m", low=1)
    if w.shape[0] % m:
        raise ValueError(f"m={m} must divide the input size M={w.shape[0]} of w {tuple(w.shape)} "
                         "(subvectors of size m along the input axis)")
    check_finite(w, "w")
    return w, m


def to_subvectors(w, m: int):
    """``[M, N] -> [(M/m) N, m]``: the size-``m`` pieces of every column, column-major by block."""
    w, m = _check_w(w, m)
    big_m, n = w.shape
    return jnp.transpose(w.reshape(big_m // m, m, n), (0, 2, 1)).reshape(-1, m)


def from_subvectors(v, shape):
    """Inverse of :func:`to_subvectors` for a matrix of ``shape = (M, N)``."""
    v = check_array(v, "v", ndim=2, kind="floating")
    big_m, n = shape
    m = v.shape[1]
    if big_m % m or v.shape[0] != (big_m // m) * n:
        raise ValueError(f"v {tuple(v.shape)} does not hold the subvectors of a {tuple(shape)} matrix")
    return jnp.transpose(v.reshape(big_m // m, n, m), (0, 2, 1)).reshape(big_m, n)


def lowrank_init(w, m: int, d: int):
    """PCA start of the low-rank stage: ``(P [m, d], Z [n_sub, d])`` with ``Z P^T`` the best rank-``d``
    fit of the subvector matrix."""
    v = to_subvectors(w, m)
    d = check_int(d, "d", low=1, high=m)
    _, _, vt = linalg.svd(v, d)
    p = jnp.swapaxes(vt, 0, 1)
    return p, v @ p


def decode(p, z):
    """Subvectors ``Z P^T`` (``[n_sub, m]``)."""
    p = check_array(p, "p", ndim=2, kind="floating")
    z = check_array(z, "z", ndim=2, kind="floating")
    if z.shape[1] != p.shape[1]:
        raise ValueError(f"z must have d={p.shape[1]} columns (P is {tuple(p.shape)}), got {tuple(z.shape)}")
    return z @ p.T


def assign(z, codebook):
    """Index of the nearest centroid of every row of ``z``."""
    d2 = jnp.sum(z ** 2, 1, keepdims=True) - 2 * z @ codebook.T + jnp.sum(codebook ** 2, 1)[None]
    return jnp.argmin(d2, axis=1)


def kmeans(z, k: int, *, key, iters: int = 25):
    """Lloyd's k-means of the rows of ``z: [n, d]``: ``(codebook [k, d], assignment [n])``; start at
    ``k`` distinct random rows; an empty cluster keeps its centroid."""
    z = check_array(z, "z", ndim=2, kind="floating")
    k = check_int(k, "k", low=1, high=z.shape[0])
    iters = check_int(iters, "iters", low=0)
    check_finite(z, "z")
    check_key(key)
    c = z[jax.random.choice(key, z.shape[0], (k,), replace=False)]
    c = _lloyd(z, c, iters)
    return c, assign(z, c)


@functools.partial(jax.jit, static_argnames=("iters",))
def _lloyd(z, c, iters):
    k = c.shape[0]

    def body(_, c):
        oh = jax.nn.one_hot(assign(z, c), k, dtype=z.dtype)
        cnt = oh.sum(0)
        return jnp.where(cnt[:, None] > 0, (oh.T @ z) / jnp.maximum(cnt, 1)[:, None], c)

    return jax.lax.fori_loop(0, iters, body, c)


def dkm(z, codebook, *, temperature: float = 1e-2, iters: int = 5):
    """DKM's differentiable k-means: ``iters`` rounds of ``A = softmax(-||z - c||^2 / t)`` and
    ``c = A^T z / sum A``; returns ``(codebook, soft reconstruction A c)``, differentiable."""
    z = check_array(z, "z", ndim=2, kind="floating")
    codebook = check_array(codebook, "codebook", ndim=2, kind="floating")
    if codebook.shape[1] != z.shape[1]:
        raise ValueError(f"codebook must have {z.shape[1]} columns like z, got {tuple(codebook.shape)}")
    temperature = check_float(temperature, "temperature", low=0.0, low_open=True)
    iters = check_int(iters, "iters", low=1)
    c = codebook
    for _ in range(iters):
        d2 = jnp.sum(z ** 2, 1, keepdims=True) - 2 * z @ c.T + jnp.sum(c ** 2, 1)[None]
        a = jax.nn.softmax(-d2 / temperature, axis=1)
        c = (a.T @ z) / jnp.maximum(a.sum(0), 1e-12)[:, None]
    return c, a @ c


def quantize(w, m: int, d: int, k: int, *, key, iters: int = 25, p=None):
    """Stages 1 (PCA only, no training) and 2 (k-means) on a fixed matrix: ``{"p", "codebook",
    "assign", "shape"}``. Pass ``p`` (``[m, d]``, e.g. a trained ``P`` or ``jnp.eye(m)``) to skip PCA."""
    v = to_subvectors(w, m)
    d = check_int(d, "d", low=1, high=m)
    if p is None:
        p, z = lowrank_init(w, m, d)
    else:
        p = check_array(p, "p", ndim=2, kind="floating")
        if p.shape != (m, d):
            raise ValueError(f"p must have shape ({m}, {d}), got {tuple(p.shape)}")
        z = v @ p
    cb, a = kmeans(z, k, key=key, iters=iters)
    return {"p": p, "codebook": cb, "assign": a, "shape": tuple(w.shape)}


def reconstruct(q: dict):
    """The decoded matrix ``w_i = P c_{a(i)}`` of a :func:`quantize` result."""
    if not isinstance(q, dict) or not {"p", "codebook", "assign", "shape"} <= set(q):
        raise TypeError("q must be the dict returned by quantize() (keys p, codebook, assign, shape)")
    return from_subvectors(decode(q["p"], q["codebook"][q["assign"]]), q["shape"])


def pq(w, m: int, k: int, *, key, iters: int = 25):
    """Plain product quantization: k-means of the size-``m`` subvectors themselves;
    ``(codebook [k, m], assignment)``."""
    return kmeans(to_subvectors(w, m), k, key=key, iters=iters)


def compression_ratio(n_sub: int, m: int, k: int, d: int) -> float:
    """``32 n_sub m / (n_sub log2 k + 32 (k d + m d))`` (float32 weights before; indices, codebook and P after)."""
    n_sub, m, k = check_int(n_sub, "n_sub", low=1), check_int(m, "m", low=1), check_int(k, "k", low=2)
    d = check_int(d, "d", low=1, high=m)
    return 32 * n_sub * m / (n_sub * math.log2(k) + 32 * (k * d + m * d))
