"""Low-rank KV caches (Palu): per head-group whitened SVD of ``W_k``, ``W_v``, a latent cache and
reconstruction at attention time; a plain-SVD baseline with the same API.

Palu (Chang et al. 2024, "Palu: Compressing KV-Cache with Low-Rank Projection"; official code
shadowpa0327/Palu @bb22666e, ``palu/model/modules/svd_linear.py``, ``compress.py``) replaces the key
and value projections of each group of ``group_size`` heads by a rank-``r`` product, caches the
down-projected *latent* ``h = x A`` (``r`` numbers per token instead of ``group_size * head_dim``)
and reconstructs ``K = h B`` when attention needs it.

Orientation (lrjax's, ``y = x W``): a projection is ``W: [d, N]`` with ``N = n_heads * head_dim``
(the ``nnx.Linear`` kernel layout), a head group ``g`` owns the columns ``W_g: [d, G_h]``,
``G_h = group_size * head_dim``, and the calibration activations are ``X: [n, d]`` (the rows the
projection sees: the attention block's input).

* ``method="whitened"`` (Palu, "G-LRD" with whitening): ``X^T X + eps mean(diag X^T X) I = S S^T``
  (Cholesky, ``S`` lower), ``S^T W_g = U diag(s) V^T``, down ``A_g = S^{-T} U_r diag(sqrt(s_r))``
  ``[d, r]``, up ``B_g = diag(sqrt(s_r)) V_r^T`` ``[r, G_h]``. Then
  ``||X W_g - X A_g B_g||_F = sqrt(sum_{i>r} s_i^2)`` (exact for ``eps = 0``; with ``eps > 0`` it
  is the error under the regularized Gram). Palu writes the same for ``W [out, in]`` as the SVD of
  ``W S``; ours is its transpose. The factorization is :func:`lrjax.compress.whitened_svd` (one
  Cholesky per group, batched over groups).
* ``method="svd"`` (the baseline, Palu's ``decompose_method=svd``): ``W_g = U diag(s) V^T``,
  ``A_g = U_r diag(sqrt(s_r))``, ``B_g = diag(sqrt(s_r)) V_r^T``; optimal in ``||W_g - A_g B_g||_F``
  but not in the output error ``||X (W_g - A_g B_g)||_F``, so it loses to the whitened one when the
  inputs are correlated.

Rank allocation to a target cache ratio ``rho`` in ``(0, 1]`` (cache width over the full cache
width ``2 N`` per token and layer):

* ``allocation="uniform"``: every group of every layer keeps ``r = clip(round(rho G_h), 1, min(d, G_h))``
  for keys and for values (Palu's uniform baseline).
* ``allocation="energy"`` [ours]: one global budget ``round(rho * L * 2 N)`` of latent columns over
  all layers, keys/values and groups; each group keeps at least one, the rest go to the largest
  normalized squared singular values ``s_i^2 / sum_groups sum_j s_j^2`` (normalized per layer and
  per K/V so layers of different scale compete fairly). For ``method="whitened"`` this is the greedy
  minimizer of the summed relative output errors. Palu's own search (``fisher_uniform``) weighs
  layers by Fisher information, which needs gradients; it is not implemented here.

Storage of one layer (:class:`LatentKV`): the groups' down-projections side by side,
``down_k: [d, R_k]`` (``R_k = sum_g r_g``), and the up-projection as one block-diagonal matrix
``up_k: [R_k, N]`` (zero off the group blocks), so the cache and the reconstruction are one matmul
each: ``h_k = x down_k`` ``[B, T, R_k]`` is cached and ``K = h_k up_k`` ``[B, T, N]``. The same
for values. The block-diagonal up-projection wastes multiplications by zero (``G`` times the
per-group work) but not cache bytes, which is what this module is about.

Attention at decode time (:func:`latent_prefill`, :func:`latent_decode_step`): the cache
(:class:`LatentCache`) holds ``h_k [B, capacity, R_k]``, ``h_v [B, capacity, R_v]`` and the number
of valid positions; each step appends the new token's latents and attends causally over the
reconstructed keys/values. Prefill then decode equals one full causal pass
(:func:`latent_self_attention`).

Dtypes: factors are computed in float32 and returned in the projection's dtype; attention runs in
``promote_types(inputs, float32)`` and rounds once to the input dtype (float32 and bfloat16 inputs).

Errors: ``ratio`` outside ``(0, 1]``, ``n_heads`` not dividing ``N``, ``group_size`` not dividing
``n_heads``, calibration activations whose last axis is not ``d`` (``x``) or that are all zero,
``w_k``/``w_v`` of different shapes, an input ``x`` with no token (``T = 0`` or ``B = 0``) or with
NaN/Inf, a cache of the wrong shape or already full (``cache``), and out-of-range ``q_start`` /
``length`` of :func:`causal_attention` raise ``ValueError``; wrong kinds (a non-array, an integer
array, a non-string method, traced arrays given to the host-only :func:`compress_kv`) raise
``TypeError``; each names the argument.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lrjax import linalg
from lrjax._validation import (check_array, check_choice, check_dtype, check_finite, check_float, check_int,
                               compute_dtype, is_concrete)
from lrjax.compress.core import whitened_svd

__all__ = ["LatentKV", "KVPlan", "LatentCache", "METHODS", "ALLOCATIONS", "compress_kv", "latent_kv",
           "latent_self_attention", "dense_self_attention", "init_latent_cache", "latent_prefill",
           "latent_decode_step", "causal_attention"]

METHODS = ("whitened", "svd")
ALLOCATIONS = ("uniform", "energy")


class LatentKV(NamedTuple):
    """One layer's low-rank K/V projections: ``W_k ~= down_k up_k``, ``W_v ~= down_v up_v``.

    ``down_k: [d, R_k]``, ``up_k: [R_k, N]`` (block-diagonal over head groups), ``down_v: [d, R_v]``,
    ``up_v: [R_v, N]``; ``R_k + R_v`` is the cache width per token of this layer.
    """

    down_k: jax.Array
    up_k: jax.Array
    down_v: jax.Array
    up_v: jax.Array


@dataclasses.dataclass(frozen=True)
class KVPlan:
    """What :func:`compress_kv` chose: per layer the per-group ranks of keys and values, the predicted
    truncation errors and the cache widths.

    ``ranks_k[l][g]``, ``ranks_v[l][g]``: kept ranks; ``full_width = 2 N`` (a plain K/V cache's numbers
    per token and layer); ``err_k[l]``, ``err_v[l]``: ``sqrt(sum over groups of the dropped s_i^2)``
    (the output error ``||X W - X A B||_F`` for ``whitened``, the weight error for ``svd``);
    ``rel_err_*``: the same over ``sqrt(sum s_i^2)``.
    """

    method: str
    allocation: str
    target_ratio: float
    n_heads: int
    group_size: int
    ranks_k: tuple
    ranks_v: tuple
    full_width: int
    err_k: tuple
    err_v: tuple
    rel_err_k: tuple
    rel_err_v: tuple

    @property
    def widths(self) -> tuple:
        """Cache numbers per token of each layer: ``R_k + R_v``."""
        return tuple(int(sum(a) + sum(b)) for a, b in zip(self.ranks_k, self.ranks_v))

    @property
    def ratio(self) -> float:
        """Achieved cache ratio ``sum_l (R_k + R_v) / (L * 2 N)``."""
        return sum(self.widths) / (len(self.widths) * self.full_width)

    def cache_bytes(self, seq_len: int, batch: int = 1, dtype=jnp.bfloat16) -> int:
        """Bytes of the latent cache of ``batch`` sequences of ``seq_len`` tokens in ``dtype``."""
        seq_len = check_int(seq_len, "seq_len", low=0)
        batch = check_int(batch, "batch", low=1)
        isz = check_dtype(dtype, "dtype").itemsize
        return int(batch * seq_len * sum(self.widths) * isz)

    def full_cache_bytes(self, seq_len: int, batch: int = 1, dtype=jnp.bfloat16) -> int:
        """Bytes of the plain K/V cache (``2 N`` numbers per token and layer) for comparison."""
        seq_len = check_int(seq_len, "seq_len", low=0)
        batch = check_int(batch, "batch", low=1)
        isz = check_dtype(dtype, "dtype").itemsize
        return int(batch * seq_len * len(self.widths) * self.full_width * isz)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(widths=self.widths, ratio=self.ratio)
        return d


# ------------------------------------------------------------------------------------ checks
def _check_weights(w_k, w_v):
    w_k = check_array(w_k, "w_k", kind="floating")
    w_v = check_array(w_v, "w_v", kind="floating")
    if w_k.ndim not in (2, 3):
        raise ValueError(f"w_k must be one projection kernel [d, N] or a stack [L, d, N], got shape {tuple(w_k.shape)}")
    if w_v.shape != w_k.shape:
        raise ValueError(f"w_v must have the shape of w_k {tuple(w_k.shape)}, got {tuple(w_v.shape)}")
    check_finite(w_k, "w_k")
    check_finite(w_v, "w_v")
    return w_k, w_v


def _check_heads(n, n_heads, group_size=None):
    n_heads = check_int(n_heads, "n_heads", low=1)
    if n % n_heads:
        raise ValueError(f"n_heads={n_heads} must divide the projection width N={n} (N = n_heads * head_dim)")
    if group_size is not None:
        group_size = check_int(group_size, "group_size", low=1)
        if n_heads % group_size:
            raise ValueError(f"group_size={group_size} must divide n_heads={n_heads} (heads per group)")
    return n_heads, group_size


# ------------------------------------------------------------------------------- factorization
def _group_factors(w, x, n_groups, method, eps):
    """Full-rank per-group factors of ``w [d, N]``: ``a [G, d, f]``, ``b [G, f, G_h]``, ``s [G, f]``,
    ``f = min(d, G_h)``; truncating to the first ``r`` columns/rows gives the rank-``r`` factors."""
    if method == "whitened":
        wg, xb = _groups(w, x, n_groups)
        a, b, s = whitened_svd(wg, xb, None, eps=eps)
    else:
        a, b, s = _svd_factors(w, n_groups)
    return np.asarray(a), np.asarray(b), np.asarray(s, np.float64)


@functools.partial(jax.jit, static_argnums=(2,))
def _groups(w, x, n_groups):
    d, n = w.shape
    wg = jnp.transpose(w.astype(jnp.float32).reshape(d, n_groups, n // n_groups), (1, 0, 2))  # [G, d, G_h]
    return wg, jnp.broadcast_to(x.astype(jnp.float32), (n_groups,) + tuple(x.shape))


@functools.partial(jax.jit, static_argnums=(1,))
def _svd_factors(w, n_groups):
    wg, _ = _groups(w, w[:1], n_groups)
    u, s, vt = linalg.svd(wg)
    a, b = linalg.sqrt_split(u, s, vt)
    return a, b, s


def _allocate(spectra, full, cap, ratio, allocation):
    """Ranks per (layer, kind, group) from the spectra ``spectra[l][kind] [G, f]``."""
    if allocation == "uniform":
        r = int(min(cap, max(1, round(ratio * full))))
        return [[[r] * s.shape[0] for s in layer] for layer in spectra]
    cells, vals = [], []
    for li, layer in enumerate(spectra):
        for ki, s in enumerate(layer):
            e = s ** 2
            tot = float(e.sum())
            for g in range(s.shape[0]):
                cells.append((li, ki, g))
                vals.append(e[g] / tot if tot > 0 else np.zeros_like(e[g]))
    n_total = len(spectra) * 2 * spectra[0][0].shape[0] * full
    budget = max(len(cells), int(round(ratio * n_total)))
    ranks = np.ones(len(cells), int)
    cand = [(-float(v[i]), c, i) for c, v in enumerate(vals) for i in range(1, min(cap, len(v)))]
    cand.sort()
    for _, c, _ in cand[:max(0, budget - len(cells))]:
        ranks[c] += 1
    out = [[[0] * s.shape[0] for s in layer] for layer in spectra]
    for (li, ki, g), r in zip(cells, ranks):
        out[li][ki][g] = int(r)
    return out


def _block_diag_up(b, ranks, n_groups, gh):
    rows = []
    for g, r in enumerate(ranks):
        blk = np.zeros((r, n_groups * gh), b.dtype)
        blk[:, g * gh:(g + 1) * gh] = b[g, :r]
        rows.append(blk)
    return np.concatenate(rows, 0)


def compress_kv(w_k, w_v, x=None, *, n_heads: int, ratio: float = 1.0, group_size: int | None = None,
                method: str = "whitened", allocation: str = "uniform", eps: float = 1e-4):
    """Palu-style low-rank K/V projections of one layer or a stack of layers.

    Host-only: the rank allocation depends on the singular values (data-dependent integer ranks,
    hence data-dependent shapes), so this runs eagerly on concrete arrays and cannot be called
    inside ``jax.jit`` / ``grad`` / ``vmap`` (traced arrays raise ``TypeError``). Call it once,
    outside the transform, and use the returned factors inside jitted code.

    Args:
      w_k, w_v: key/value kernels ``[d, N]`` or stacks ``[L, d, N]`` (``N = n_heads * head_dim``,
        ``y = x W``), floating; the same shape.
      x: calibration activations of the projections' input, ``[n, d]`` or ``[L, n, d]`` (required for
        ``method="whitened"``, ignored by ``"svd"``).
      n_heads: attention heads (must divide ``N``).
      ratio: target cache ratio in ``(0, 1]`` (latent numbers per token over ``2 N``), stored as
        ``plan.target_ratio``; the achieved ratio is the property ``plan.ratio`` (ranks are integers,
        at least 1 and at most ``min(d, G_h)``, so it can differ from the target).
      group_size: heads per group (must divide ``n_heads``; 1 = per head, ``n_heads`` = one joint
        factorization). Default ``None``: the largest divisor of ``n_heads`` that is ``<= 4``
        (Palu's default group of 4 heads when 4 divides ``n_heads``).
      method: ``"whitened"`` (Palu) or ``"svd"`` (plain SVD baseline).
      allocation: ``"uniform"`` or ``"energy"`` (see the module docstring).
      eps: whitening regularization, relative to ``mean(diag X^T X)`` (default ``1e-4``, ``>= 0``).

    Returns:
      ``(layers, plan)``: a list of :class:`LatentKV` (one per layer, factors in ``w_k``'s dtype) and
      the :class:`KVPlan`.
    """
    for name, a in (("w_k", w_k), ("w_v", w_v), ("x", x)):
        if isinstance(a, jax.core.Tracer):
            raise TypeError(f"{name} is a traced array (compress_kv was called inside jax.jit / grad / vmap), but "
                            "compress_kv is host-only: its rank allocation is data dependent. Call it on concrete "
                            "arrays outside the transform and pass the returned factors into the jitted code")
    w_k, w_v = _check_weights(w_k, w_v)
    stacked = w_k.ndim == 3
    d, n = w_k.shape[-2:]
    if group_size is None:
        n_heads = _check_heads(n, n_heads)[0]
        group_size = max(g for g in range(1, 5) if n_heads % g == 0)
    n_heads, group_size = _check_heads(n, n_heads, group_size)
    ratio = check_float(ratio, "ratio", low=0.0, high=1.0, low_open=True)
    method = check_choice(method, "method", METHODS)
    allocation = check_choice(allocation, "allocation", ALLOCATIONS)
    eps = check_float(eps, "eps", low=0.0)
    L = w_k.shape[0] if stacked else 1
    if method == "whitened":
        if x is None:
            raise ValueError("x (calibration activations [n, d] of the K/V projections' input) is required for "
                             "method='whitened'; pass them or use method='svd'")
        x = check_array(x, "x", kind="floating")
        want = 3 if stacked else 2
        if x.ndim != want or x.shape[-1] != d or (stacked and x.shape[0] != L):
            lay = f"[L={L}, n, d={d}]" if stacked else f"[n, d={d}]"
            raise ValueError(f"x must be calibration activations {lay} (the projections' input width d={d}), "
                             f"got shape {tuple(x.shape)}")
        if x.shape[-2] < 1:
            raise ValueError("x must hold at least one calibration row")
        check_finite(x, "x")
        with jax.ensure_compile_time_eval():
            zero = [int(i) for i in np.nonzero(~np.any(np.asarray(x if stacked else x[None]) != 0,
                                                       axis=(1, 2)))[0]]
        if zero:
            where = f" (layers {zero})" if stacked else ""
            raise ValueError(f"x (calibration activations) is all zero{where}: the whitening Gram X^T X is zero and "
                             "raising eps cannot help (eps is relative to mean(diag X^T X) = 0); pass real "
                             "activations of the K/V projections' input, or use method='svd'")
    wk = w_k if stacked else w_k[None]
    wv = w_v if stacked else w_v[None]
    xs = (x if stacked else x[None]) if method == "whitened" else [None] * L
    n_groups = n_heads // group_size
    gh = n // n_groups
    cap = min(d, gh)
    facs, spectra = [], []
    for li in range(L):
        fk = _group_factors(wk[li], xs[li], n_groups, method, eps)
        fv = _group_factors(wv[li], xs[li], n_groups, method, eps)
        facs.append((fk, fv))
        spectra.append((fk[2], fv[2]))
    ranks = _allocate(spectra, gh, cap, ratio, allocation)
    layers, errs, rels = [], ([], []), ([], [])
    for li in range(L):
        mats = []
        for ki, (a, b, s) in enumerate(facs[li]):
            rk = ranks[li][ki]
            down = np.concatenate([a[g, :, :r] for g, r in enumerate(rk)], 1)
            up = _block_diag_up(b, rk, n_groups, gh)
            mats += [jnp.asarray(down, w_k.dtype), jnp.asarray(up, w_k.dtype)]
            tail = sum(float((s[g, r:] ** 2).sum()) for g, r in enumerate(rk))
            tot = float((s ** 2).sum())
            errs[ki].append(math.sqrt(tail))
            rels[ki].append(math.sqrt(tail / tot) if tot > 0 else 0.0)
        layers.append(LatentKV(*mats))
    plan = KVPlan(method, allocation, ratio, n_heads, group_size,
                  tuple(tuple(r[0]) for r in ranks), tuple(tuple(r[1]) for r in ranks), 2 * n,
                  tuple(errs[0]), tuple(errs[1]), tuple(rels[0]), tuple(rels[1]))
    return layers, plan


# ------------------------------------------------------------------------------------ attention
def _check_kv(kv, d=None, n=None):
    if not isinstance(kv, LatentKV):
        raise TypeError(f"kv must be a LatentKV (from compress_kv), got {type(kv).__name__}")
    for name, m in zip(LatentKV._fields, kv):
        check_array(m, f"kv.{name}", ndim=2, kind="floating")
    dk, rk = kv.down_k.shape
    dv, rv = kv.down_v.shape
    if kv.up_k.shape[0] != rk or kv.up_v.shape[0] != rv or dk != dv or kv.up_k.shape[1] != kv.up_v.shape[1]:
        raise ValueError("kv: down_k [d, R_k], up_k [R_k, N], down_v [d, R_v], up_v [R_v, N] must agree, got "
                         f"{[tuple(m.shape) for m in kv]}")
    if d is not None and dk != d:
        raise ValueError(f"kv.down_k must have d={d} rows (the input width), got {dk}")
    if n is not None and kv.up_k.shape[1] != n:
        raise ValueError(f"kv.up_k must have N={n} columns (n_heads * head_dim of w_q), got {kv.up_k.shape[1]}")
    return kv


def _check_position(value, name, low, high=None):
    """``q_start`` / ``length``: an int (or integer scalar array) in ``[low, high]`` when concrete;
    traced values are not checked (see the callers' docstrings for what they then do)."""
    if value is None or isinstance(value, jax.core.Tracer):
        return value
    if isinstance(value, (jax.Array, np.ndarray)):
        check_array(value, name, ndim=0, kind="integer")
        with jax.ensure_compile_time_eval():
            value = int(value)
    return check_int(value, name, low=low, high=high)


def _check_qkv(q, k, v):
    q = check_array(q, "q", ndim=4, kind="floating")
    k = check_array(k, "k", ndim=4, kind="floating")
    v = check_array(v, "v", ndim=4, kind="floating")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"q [B, Tq, H, hd], k and v [B, Tk, H, hd] must agree, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    return q, k, v


def _masked_softmax(scores, mask):
    """Softmax over the visible keys; a row with no visible key gives all-zero weights (so its
    attention output is exactly 0, not the mean of ``V``)."""
    p = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(scores.dtype).min), axis=-1)
    return jnp.where(jnp.any(mask, axis=-1, keepdims=True), p, 0.0)


def causal_attention(q, k, v, *, q_start=0, length=None):
    """Softmax attention with a causal mask: ``q: [B, Tq, H, hd]`` at positions ``q_start + i``,
    ``k, v: [B, Tk, H, hd]`` at positions ``j``; key ``j`` is visible to query ``i`` iff
    ``j <= q_start + i`` and ``j < length`` (``length`` defaults to ``Tk``). Scores scaled by
    ``1/sqrt(hd)``; computed in ``promote_types(q, k, v, float32)``, returned in that dtype.

    Valid values: ``q_start >= 0`` and ``1 <= length <= Tk`` (ints or integer scalar arrays); out of
    range concrete values raise ``ValueError`` naming the argument. With these every query sees at
    least key 0. Traced values are not checked; a query row that then has no visible key (e.g. a
    traced ``length = 0``) returns exactly 0 (not the mean of ``V``)."""
    q, k, v = _check_qkv(q, k, v)
    q_start = _check_position(q_start, "q_start", 0)
    length = _check_position(length, "length", 1, k.shape[1])
    cd = compute_dtype(q.dtype, k.dtype, v.dtype)
    q, k, v = q.astype(cd), k.astype(cd), v.astype(cd)
    tq, tk = q.shape[1], k.shape[1]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.asarray(q.shape[-1], cd))
    qpos = q_start + jnp.arange(tq)[:, None]
    kpos = jnp.arange(tk)[None, :]
    mask = kpos <= qpos
    if length is not None:
        mask = mask & (kpos < length)
    return jnp.einsum("bhqk,bkhd->bqhd", _masked_softmax(scores, mask), v)


def _check_x(x, name, d=None, ndim=3):
    lay = "[B, T, d]" if ndim == 3 else "[B, d]"
    x = check_array(x, name, kind="floating")
    if x.ndim != ndim or (d is not None and x.shape[-1] != d):
        raise ValueError(f"{name} must have shape {lay}" + (f" with d={d}" if d is not None else "")
                         + f", got {tuple(x.shape)}")
    if 0 in x.shape[:-1]:
        raise ValueError(f"{name} must have at least one sequence and one token ({lay} with B, T >= 1), "
                         f"got shape {tuple(x.shape)}")
    return check_finite(x, name)


def _check_qo(w_q, w_o, n_heads):
    """``w_q: [d, N]``, ``w_o: [N, d]``; ``d`` is read from ``w_q`` and ``x`` is checked against it."""
    w_q = check_array(w_q, "w_q", ndim=2, kind="floating")
    w_o = check_array(w_o, "w_o", ndim=2, kind="floating")
    d, n = w_q.shape
    n_heads, _ = _check_heads(n, n_heads)
    if w_o.shape != (n, d):
        raise ValueError(f"w_o must be [N={n}, d={d}], got {tuple(w_o.shape)}")
    return w_q, w_o, n_heads


def latent_kv(x, kv: LatentKV):
    """The cache entries of ``x: [B, T, d]``: ``(h_k = x down_k [B, T, R_k], h_v = x down_v [B, T, R_v])``
    in ``promote_types(x, kv, float32)``."""
    x = _check_x(x, "x")
    _check_kv(kv, d=x.shape[-1])
    return _latents(x, kv)


def _reconstruct(h, up, n_heads, cd):
    b, t, _ = h.shape
    return (h.astype(cd) @ up.astype(cd)).reshape(b, t, n_heads, up.shape[1] // n_heads)


def latent_self_attention(x, w_q, w_o, kv: LatentKV, *, n_heads: int):
    """Full causal self-attention with low-rank K/V: ``Q = x W_q``, ``K = (x down_k) up_k``,
    ``V = (x down_v) up_v``, ``y = softmax(Q K^T / sqrt(hd) + causal) V W_o``.

    ``x: [B, T, d]``, ``w_q: [d, N]``, ``w_o: [N, d]`` -> ``[B, T, d]`` in ``x``'s dtype (computed in
    ``promote_types(..., float32)``). With ``kv`` at full rank this is the dense attention of
    :func:`dense_self_attention` (the char transformer's ``CausalSelfAttention``) up to rounding.
    """
    w_q, w_o, n_heads = _check_qo(w_q, w_o, n_heads)
    x = _check_x(x, "x", w_q.shape[0])
    _check_kv(kv, d=x.shape[-1], n=w_q.shape[1])
    return _latent_full(x, w_q, w_o, kv, n_heads)


@functools.partial(jax.jit, static_argnums=(4,))
def _latent_full(x, w_q, w_o, kv, n_heads):
    cd = compute_dtype(x.dtype, w_q.dtype, kv.down_k.dtype)
    b, t, _ = x.shape
    xc = x.astype(cd)
    q = (xc @ w_q.astype(cd)).reshape(b, t, n_heads, -1)
    k = _reconstruct(xc @ kv.down_k.astype(cd), kv.up_k, n_heads, cd)
    v = _reconstruct(xc @ kv.down_v.astype(cd), kv.up_v, n_heads, cd)
    o = causal_attention(q, k, v).reshape(b, t, -1)
    return (o @ w_o.astype(cd)).astype(x.dtype)


def dense_self_attention(x, w_q, w_k, w_v, w_o, *, n_heads: int):
    """The exact reference: causal multi-head attention with dense ``W_k, W_v: [d, N]`` (the char
    transformer's ``CausalSelfAttention`` math), ``x: [B, T, d]`` -> ``[B, T, d]`` in ``x``'s dtype."""
    w_q, w_o, n_heads = _check_qo(w_q, w_o, n_heads)
    x = _check_x(x, "x", w_q.shape[0])
    w_k, w_v = _check_weights(w_k, w_v)
    if w_k.shape != w_q.shape:
        raise ValueError(f"w_k must have the shape of w_q {tuple(w_q.shape)}, got {tuple(w_k.shape)}")
    cd = compute_dtype(x.dtype, w_q.dtype, w_k.dtype)
    b, t, _ = x.shape
    xc = x.astype(cd)
    q, k, v = ((xc @ w.astype(cd)).reshape(b, t, n_heads, -1) for w in (w_q, w_k, w_v))
    o = causal_attention(q, k, v).reshape(b, t, -1)
    return (o @ w_o.astype(cd)).astype(x.dtype)


# ---------------------------------------------------------------------------------- decode cache
class LatentCache(NamedTuple):
    """Decode cache of one layer: ``h_k [B, capacity, R_k]``, ``h_v [B, capacity, R_v]`` and the
    number of filled positions ``length`` (int32 scalar)."""

    h_k: jax.Array
    h_v: jax.Array
    length: jax.Array


def init_latent_cache(kv: LatentKV, batch: int, capacity: int, dtype=jnp.float32) -> LatentCache:
    """An empty :class:`LatentCache` for ``batch`` sequences of up to ``capacity`` tokens."""
    _check_kv(kv)
    batch = check_int(batch, "batch", low=1)
    capacity = check_int(capacity, "capacity", low=1)
    dtype = check_dtype(dtype, "dtype")
    return LatentCache(jnp.zeros((batch, capacity, kv.down_k.shape[1]), dtype),
                       jnp.zeros((batch, capacity, kv.down_v.shape[1]), dtype), jnp.zeros((), jnp.int32))


def _check_cache(cache, kv, batch):
    if not isinstance(cache, LatentCache):
        raise TypeError(f"cache must be a LatentCache (from init_latent_cache / latent_prefill), "
                        f"got {type(cache).__name__}")
    hk = check_array(cache.h_k, "cache.h_k", kind="floating")
    hv = check_array(cache.h_v, "cache.h_v", kind="floating")
    rk, rv = kv.down_k.shape[1], kv.down_v.shape[1]
    if hk.ndim != 3 or hk.shape[0] != batch or hk.shape[2] != rk:
        raise ValueError(f"cache.h_k must have shape [B={batch}, capacity, R_k={rk}], got {tuple(hk.shape)}")
    if hv.shape != (hk.shape[0], hk.shape[1], rv):
        raise ValueError(f"cache.h_v must have shape [B={batch}, capacity={hk.shape[1]}, R_v={rv}], "
                         f"got {tuple(hv.shape)}")
    ln = check_array(cache.length, "cache.length", ndim=0, kind="integer")
    return cache._replace(length=ln.astype(jnp.int32))


def latent_prefill(x, w_q, w_o, kv: LatentKV, *, n_heads: int, capacity: int, cache_dtype=jnp.float32):
    """Causal attention over a prompt ``x: [B, T, d]`` that also fills a :class:`LatentCache` of
    ``capacity >= T`` positions (latents stored in ``cache_dtype``). Returns ``(y [B, T, d], cache)``."""
    w_q, w_o, n_heads = _check_qo(w_q, w_o, n_heads)
    x = _check_x(x, "x", w_q.shape[0])
    _check_kv(kv, d=x.shape[-1], n=w_q.shape[1])
    capacity = check_int(capacity, "capacity", low=x.shape[1])
    cache = init_latent_cache(kv, x.shape[0], capacity, cache_dtype)
    return _prefill(x, w_q, w_o, kv, cache, n_heads)


@functools.partial(jax.jit, static_argnums=(5,))
def _prefill(x, w_q, w_o, kv, cache, n_heads):
    hk, hv = _latents(x, kv)
    t = x.shape[1]
    cache = LatentCache(jax.lax.dynamic_update_slice(cache.h_k, hk.astype(cache.h_k.dtype), (0, 0, 0)),
                        jax.lax.dynamic_update_slice(cache.h_v, hv.astype(cache.h_v.dtype), (0, 0, 0)),
                        jnp.asarray(t, jnp.int32))
    return _attend_cache(x, w_q, w_o, kv, cache, n_heads, 0), cache


def _latents(x, kv):
    cd = compute_dtype(x.dtype, kv.down_k.dtype)
    xc = x.astype(cd)
    return xc @ kv.down_k.astype(cd), xc @ kv.down_v.astype(cd)


def _attend_cache(x, w_q, w_o, kv, cache, n_heads, q_start):
    cd = compute_dtype(x.dtype, w_q.dtype, kv.down_k.dtype)
    b, t, _ = x.shape
    q = (x.astype(cd) @ w_q.astype(cd)).reshape(b, t, n_heads, -1)
    k = _reconstruct(cache.h_k, kv.up_k, n_heads, cd)
    v = _reconstruct(cache.h_v, kv.up_v, n_heads, cd)
    o = causal_attention(q, k, v, q_start=q_start, length=cache.length).reshape(b, t, -1)
    return (o @ w_o.astype(cd)).astype(x.dtype)


def _check_room(length, capacity):
    if is_concrete(length):
        with jax.ensure_compile_time_eval():
            n = int(length)
        if not 0 <= n < capacity:
            raise ValueError(f"cache is full (cache.length={n}, capacity={capacity}): a decode step needs "
                             "cache.length < capacity; prefill with a larger capacity" if n >= 0 else
                             f"cache.length must be >= 0, got {n}")


def latent_decode_step(x, w_q, w_o, kv: LatentKV, cache: LatentCache, *, n_heads: int):
    """One decode step: ``x: [B, d]`` (the token at position ``cache.length``) -> ``(y [B, d], cache)``
    with the token's latents appended.

    The cache must have room: ``cache.length < capacity``. A concrete full cache raises
    ``ValueError`` (naming ``cache``; allocate a larger ``capacity`` in :func:`latent_prefill` /
    :func:`init_latent_cache`). Under ``jax.jit`` with a traced ``cache.length`` this cannot be
    checked: a step on a full cache then writes the new latents into the LAST slot
    (``dynamic_update_slice`` clamps the index), overwriting position ``capacity - 1``, and returns
    a wrong output with ``length = capacity + 1``; keep ``cache.length < capacity`` yourself there."""
    w_q, w_o, n_heads = _check_qo(w_q, w_o, n_heads)
    x = _check_x(x, "x", w_q.shape[0], ndim=2)
    _check_kv(kv, d=x.shape[-1], n=w_q.shape[1])
    cache = _check_cache(cache, kv, x.shape[0])
    _check_room(cache.length, cache.h_k.shape[1])
    return _decode(x, w_q, w_o, kv, cache, n_heads)


@functools.partial(jax.jit, static_argnums=(5,))
def _decode(x, w_q, w_o, kv, cache, n_heads):
    hk, hv = _latents(x[:, None], kv)
    pos = cache.length
    cache = LatentCache(jax.lax.dynamic_update_slice(cache.h_k, hk.astype(cache.h_k.dtype), (0, pos, 0)),
                        jax.lax.dynamic_update_slice(cache.h_v, hv.astype(cache.h_v.dtype), (0, pos, 0)),
                        pos + 1)
    return _attend_cache(x[:, None], w_q, w_o, kv, cache, n_heads, pos)[:, 0], cache
