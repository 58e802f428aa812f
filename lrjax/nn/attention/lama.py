"""LAMA: low-rank factorized compact multi-head self-attention (Mehta, Rangwala, Ramakrishnan 2019).

Paper: "Low Rank Factorization for Compact Multi-Head Self-Attention", arXiv 1912.00835. There is
no official code; the unofficial reimplementation JohnGiorgi/compact-multi-head-self-attention-pytorch
(``modules/lama.py``, "Eq. 3.13") was read only to confirm the shapes. Symbols follow the paper:

* ``H = [h_1, ..., h_T]`` ``[T, d]``: the (Bi)GRU states of a sentence;
* ``c`` ``[d]``: the global context vector. ``context="mean"`` (default; the paper's "LAMA+ctx"):
  ``c = mean_t h_t`` over the unpadded steps. ``context="learned"``: a trained vector, as in the
  unofficial reimplementation;
* ``P, Q`` ``[d, m]``, ``m`` = number of heads = the rank of the bilinear form.

Scoring (Eq. 3.13). The bilinear score ``f(h_t, c) = h_t^T W c`` with ``W`` factorized to rank ``m``,
``W = Q P^T``, is ``f = 1^T ((Q^T h_t) * (P^T c))`` (low-rank bilinear pooling). LAMA keeps the ``m``
rank-one terms apart instead of summing them, one per head:

    z_t = (Q^T h_t) * (P^T c)                in R^m,  z_{t,j} = h_t^T (q_j p_j^T) c
    a_t = tanh(z_t),  a_t <- a_t / ||a_t||_2  (L2 over the heads; ``normalize=True``)
    A[j, :] = softmax_t(a_{., j})            [m, T]  (padded steps get weight 0)
    M = A H                                  [m, d]  (the sentence matrix, flattened for a classifier)

so ``sum_j z_{t,j} = h_t^T (Q P^T) c`` is the dense rank-``m`` bilinear form (tested in float64).
Parameters: ``2 d m`` (plus ``d`` for a learned context). [ours] the L2 normalization divides by
``max(||a_t||_2, 1e-12)`` so an all-zero ``a_t`` gives zeros, not NaN; a fully padded sequence gets
all-zero weights.

Baseline, structured self-attention (Lin et al. 2017, "A Structured Self-attentive Sentence
Embedding"): ``A = softmax_t(W_s2 tanh(W_s1 H^T))`` with ``W_s1`` ``[d_a, d]``, ``W_s2`` ``[r, d_a]``;
``M = A H``. Parameters ``d_a (d + r)``.

Dtypes: float32/bfloat16/float64 inputs; the math runs in ``promote_types(dtype, float32)``, outputs
are rounded once to ``h``'s dtype. Everything is pure and works under ``jax.jit``/``grad``/``vmap``;
bad input raises eagerly (TypeError for a wrong kind, ValueError for a wrong value, naming the argument).
Non-finite values: padded steps (``mask`` False) may hold anything, NaN/Inf included -- they are
selected out with ``jnp.where``, never multiplied by 0, so they cannot reach a real output (likewise
``attention_pool`` ignores steps that every head weights 0). A concrete NaN/Inf in a real step raises
ValueError naming ``h`` (under ``jit`` values are unknown and it propagates).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lrjax._validation import (check_array, check_bool, check_choice, check_finite, check_int, compute_dtype,
                               is_concrete)

__all__ = ["lama_bilinear", "lama_attention", "masked_mean", "attention_pool", "structured_self_attention",
           "LAMA", "StructuredSelfAttention"]

_EPS = 1e-12


def _check_h(h, name="h"):
    h = check_array(h, name, min_ndim=2, kind="floating")
    if h.shape[-1] < 1:
        raise ValueError(f"{name} must have a feature width d >= 1 on its last axis, got shape {tuple(h.shape)}")
    return h


def _check_mask(mask, h, name="mask"):
    if mask is None:
        return None
    mask = check_array(mask, name)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"{name} must be a bool array [..., T] (True = real token), got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(h.shape[:-1]):
        raise ValueError(f"{name} must have shape {tuple(h.shape[:-1])} (h's leading axes [..., T]), "
                         f"got {tuple(mask.shape)}")
    return mask


def _check_real_finite(h, mask, name="h"):
    """Refuse concrete NaN/Inf in the real (unpadded) steps of ``h``; padded steps may hold anything."""
    if mask is None:
        return check_finite(h, name)
    if is_concrete(h) and is_concrete(mask):
        with jax.ensure_compile_time_eval():
            ok = bool(jnp.all(jnp.isfinite(h) | ~mask[..., None]))
        if not ok:
            raise ValueError(f"{name} contains NaN or Inf in a real (unpadded) step; lrjax does not propagate "
                             "non-finite inputs silently: clean the input first (padded steps may hold anything)")
    return h


def _check_pq(p, q, d):
    p = check_array(p, "p", ndim=2, kind="floating")
    q = check_array(q, "q", ndim=2, kind="floating")
    for name, w in (("p", p), ("q", q)):
        if w.shape[0] != d:
            raise ValueError(f"{name} must have shape [d, m] with d = {d} (the width of h), got {tuple(w.shape)}; "
                             f"the GRU state width and the factor rows must match")
        if w.shape[1] < 1:
            raise ValueError(f"{name} must have m >= 1 columns (heads = rank of the bilinear form), "
                             f"got shape {tuple(w.shape)}")
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape [d, m], got p {tuple(p.shape)} and q {tuple(q.shape)}")
    return p, q


def lama_bilinear(h, c, p, q):
    """The per-head rank-one bilinear scores ``z[..., t, j] = (h_t^T q_j) (p_j^T c)`` (Eq. 3.13 before tanh).

    Args: ``h`` ``[..., T, d]`` states; ``c`` ``[..., d]`` context; ``p``, ``q`` ``[d, m]``.
    Returns ``[..., T, m]`` in ``h``'s dtype (computed in ``promote_types(., float32)``); summed over
    ``j`` it is the dense form ``h_t^T (Q P^T) c``. Raises ValueError on mismatched widths or m < 1.
    """
    h = _check_h(h)
    c = check_array(c, "c", kind="floating")
    if tuple(c.shape) != tuple(h.shape[:-2]) + (h.shape[-1],):
        raise ValueError(f"c must have shape {tuple(h.shape[:-2]) + (h.shape[-1],)} (h's batch axes and width d), "
                         f"got {tuple(c.shape)}")
    p, q = _check_pq(p, q, h.shape[-1])
    dt = compute_dtype(h.dtype, c.dtype, p.dtype, q.dtype)
    return _bilinear(h.astype(dt), c.astype(dt), p.astype(dt), q.astype(dt)).astype(h.dtype)


def _bilinear(h, c, p, q):
    return (h @ q) * (c @ p)[..., None, :]


def masked_mean(h, mask=None):
    """``c = sum_t m_t h_t / max(sum_t m_t, 1)``: the LAMA+ctx global context. ``h`` ``[..., T, d]``,
    ``mask`` ``[..., T]`` bool or None. Returns ``[..., d]`` (zeros for a fully padded sequence)."""
    h = _check_h(h)
    mask = _check_mask(mask, h)
    _check_real_finite(h, mask)
    dt = compute_dtype(h.dtype)
    return _masked_mean(h.astype(dt), mask).astype(h.dtype)


def _masked_mean(h, mask):
    if mask is None:
        return jnp.mean(h, axis=-2)
    w = mask[..., None]
    n = jnp.sum(mask, axis=-1, keepdims=True).astype(h.dtype)
    return jnp.sum(jnp.where(w, h, jnp.zeros((), h.dtype)), axis=-2) / jnp.maximum(n, 1.0)


def _pool(a, h):
    """``a @ h`` where a step no head attends to (all weights 0, e.g. padded) cannot leak NaN/Inf."""
    dead = jnp.all(a == 0, axis=-2)[..., None]                  # [..., T, 1]
    return a @ jnp.where(dead, jnp.zeros((), h.dtype), h)


def _masked_softmax_t(logits, mask):
    """Softmax over the T axis of ``logits`` ``[..., m, T]``; padded steps get exactly 0."""
    if mask is None:
        return jax.nn.softmax(logits, axis=-1)
    m = mask[..., None, :]
    logits = jnp.where(m, logits, jnp.finfo(logits.dtype).min)
    return jnp.where(m, jax.nn.softmax(logits, axis=-1), 0.0)


def _lama_weights(h, c, p, q, mask, normalize):
    a = jnp.tanh(_bilinear(h, c, p, q))                      # [..., T, m]
    if normalize:
        a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), _EPS)
    return _masked_softmax_t(jnp.swapaxes(a, -1, -2), mask)   # [..., m, T]


def lama_attention(h, p, q, c=None, mask=None, *, normalize: bool = True):
    """LAMA attention weights ``A`` ``[..., m, T]``: softmax over t of ``tanh((Q^T h_t) * (P^T c))``
    (L2-normalized over the ``m`` heads when ``normalize``), padded steps masked to weight 0.

    Args: ``h`` ``[..., T, d]``; ``p``, ``q`` ``[d, m]``; ``c`` ``[..., d]`` or None (= :func:`masked_mean`
    of ``h``); ``mask`` ``[..., T]`` bool (True = real token) or None. Each row of ``A`` sums to 1
    (0 for a fully padded sequence). Output dtype = ``h``'s.
    """
    h = _check_h(h)
    mask = _check_mask(mask, h)
    normalize = check_bool(normalize, "normalize")
    p, q = _check_pq(p, q, h.shape[-1])
    _check_real_finite(h, mask)
    if c is not None:
        c = check_array(c, "c", kind="floating")
        if tuple(c.shape) != tuple(h.shape[:-2]) + (h.shape[-1],):
            raise ValueError(f"c must have shape {tuple(h.shape[:-2]) + (h.shape[-1],)}, got {tuple(c.shape)}")
        check_finite(c, "c")
    dt = compute_dtype(h.dtype, p.dtype, q.dtype, *(() if c is None else (c.dtype,)))
    hc = h.astype(dt)
    cc = _masked_mean(hc, mask) if c is None else c.astype(dt)
    return _lama_weights(hc, cc, p.astype(dt), q.astype(dt), mask, normalize).astype(h.dtype)


def attention_pool(a, h):
    """Sentence matrix ``M = A H``: ``a`` ``[..., m, T]``, ``h`` ``[..., T, d]`` -> ``[..., m, d]``."""
    h = _check_h(h)
    a = check_array(a, "a", min_ndim=2, kind="floating")
    if a.shape[-1] != h.shape[-2] or a.shape[:-2] != h.shape[:-2]:
        raise ValueError(f"a must have shape [..., m, T] = [{', '.join(map(str, h.shape[:-2]))}, m, {h.shape[-2]}] "
                         f"to match h {tuple(h.shape)}, got {tuple(a.shape)}")
    check_finite(a, "a")
    if is_concrete(a) and is_concrete(h):
        with jax.ensure_compile_time_eval():
            ok = bool(jnp.all(jnp.isfinite(h) | jnp.all(a == 0, axis=-2)[..., None]))
        if not ok:
            raise ValueError("h contains NaN or Inf in a step with nonzero weight in a; lrjax does not propagate "
                             "non-finite inputs silently: clean the input first (steps with weight 0 may hold anything)")
    dt = compute_dtype(a.dtype, h.dtype)
    return _pool(a.astype(dt), h.astype(dt)).astype(h.dtype)


def structured_self_attention(h, w1, w2, mask=None):
    """Lin et al. (2017): ``A = softmax_t(W_s2 tanh(W_s1 H^T))`` ``[..., r, T]``.

    Args: ``h`` ``[..., T, d]``; ``w1`` = ``W_s1`` ``[d_a, d]``; ``w2`` = ``W_s2`` ``[r, d_a]``; ``mask``
    ``[..., T]`` bool or None (padded steps get weight 0). Output dtype = ``h``'s.
    """
    h = _check_h(h)
    mask = _check_mask(mask, h)
    w1 = check_array(w1, "w1", ndim=2, kind="floating")
    w2 = check_array(w2, "w2", ndim=2, kind="floating")
    if w1.shape[1] != h.shape[-1]:
        raise ValueError(f"w1 must have shape [d_a, d] with d = {h.shape[-1]} (h's width), got {tuple(w1.shape)}")
    if w2.shape[1] != w1.shape[0]:
        raise ValueError(f"w2 must have shape [r, d_a] with d_a = {w1.shape[0]} (w1's rows), got {tuple(w2.shape)}")
    _check_real_finite(h, mask)
    dt = compute_dtype(h.dtype, w1.dtype, w2.dtype)
    return _ssa(h.astype(dt), w1.astype(dt), w2.astype(dt), mask).astype(h.dtype)


def _ssa(h, w1, w2, mask):
    logits = jnp.swapaxes(jnp.tanh(h @ w1.T) @ w2.T, -1, -2)   # [..., r, T]
    return _masked_softmax_t(logits, mask)


def _check_module_inputs(h, mask, d):
    """The modules' input checks: ``h`` a real array ``[B..., T, d]`` of width ``d``, ``mask`` a bool
    ``[B..., T]`` or None, ``h`` finite where unmasked; returns ``(h, mask)`` as checked/converted."""
    h = _check_h(h)
    if h.shape[-1] != d:
        raise ValueError(f"h must have width d = {d} on its last axis, got shape {tuple(h.shape)}")
    mask = _check_mask(mask, h)
    _check_real_finite(h, mask)
    return h, mask


class LAMA(nnx.Module):
    """LAMA attention pooling over GRU states (Flax NNX).

    ``LAMA(d, heads, *, context="mean", normalize=True, rngs)``: parameters ``p``, ``q`` ``[d, heads]``
    (Xavier-uniform, as in the unofficial reimplementation) and, for ``context="learned"``, ``c`` ``[d]``.
    ``__call__(h [B..., T, d], mask [B..., T] bool | None) -> (M [B..., heads, d], A [B..., heads, T])``.
    Raises ValueError for ``d < 1`` or ``heads < 1`` (``heads`` is the rank m), or a bad ``context``.
    """

    def __init__(self, d: int, heads: int, *, context: str = "mean", normalize: bool = True,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.d = check_int(d, "d", low=1)
        self.heads = check_int(heads, "heads", low=1)
        self.context = check_choice(context, "context", ("mean", "learned"))
        self.normalize = check_bool(normalize, "normalize")
        init = jax.nn.initializers.xavier_uniform()
        self.p = nnx.Param(init(rngs.params(), (self.d, self.heads), param_dtype))
        self.q = nnx.Param(init(rngs.params(), (self.d, self.heads), param_dtype))
        self.c = (nnx.Param(init(rngs.params(), (self.d, 1), param_dtype)[:, 0])
                  if self.context == "learned" else None)

    def __call__(self, h, mask=None):
        h, mask = _check_module_inputs(h, mask, self.d)
        dt = compute_dtype(h.dtype, self.p.value.dtype)
        hc = h.astype(dt)
        c = (_masked_mean(hc, mask) if self.c is None
             else jnp.broadcast_to(self.c.value.astype(dt), h.shape[:-2] + (self.d,)))
        a = _lama_weights(hc, c, self.p.value.astype(dt), self.q.value.astype(dt), mask, self.normalize)
        return _pool(a, hc).astype(h.dtype), a.astype(h.dtype)


class StructuredSelfAttention(nnx.Module):
    """Structured self-attention pooling (Lin et al. 2017), the LAMA paper's baseline (Flax NNX).

    ``StructuredSelfAttention(d, heads, hidden, *, rngs)``: ``w1`` = ``W_s1`` ``[hidden, d]``, ``w2`` =
    ``W_s2`` ``[heads, hidden]`` (no biases, as in the paper); ``hidden * (d + heads)`` parameters.
    ``__call__(h, mask=None) -> (M [B..., heads, d], A [B..., heads, T])``.
    """

    def __init__(self, d: int, heads: int, hidden: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.d = check_int(d, "d", low=1)
        self.heads = check_int(heads, "heads", low=1)
        self.hidden = check_int(hidden, "hidden", low=1)
        init = jax.nn.initializers.xavier_uniform()
        self.w1 = nnx.Param(init(rngs.params(), (self.hidden, self.d), param_dtype))
        self.w2 = nnx.Param(init(rngs.params(), (self.heads, self.hidden), param_dtype))

    def __call__(self, h, mask=None):
        h, mask = _check_module_inputs(h, mask, self.d)
        dt = compute_dtype(h.dtype, self.w1.value.dtype)
        hc = h.astype(dt)
        a = _ssa(hc, self.w1.value.astype(dt), self.w2.value.astype(dt), mask)
        return _pool(a, hc).astype(h.dtype), a.astype(h.dtype)
