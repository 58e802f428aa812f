"""Multi-head latent attention (MLA, DeepSeek-V2) trained from scratch: a KV cache of constant width
``d_c`` per token.

DeepSeek-V2 (DeepSeek-AI 2024, arXiv 2405.04434, section 2.1; JAX reference
AI-Hypercomputer/maxtext ``src/MaxText/layers/attention_mla.py``) replaces the per-head keys and
values by one shared latent per token:

    c_kv = RMSNorm(x W_dkv)                       [B, T, d_c]    (the only thing cached)
    k_h  = c_kv W_uk,h,   v_h = c_kv W_uv,h        [B, T, d_h]    (up-projections, per head)
    q_h  = x W_q,h                                [B, T, d_h]
    o_h  = softmax(q_h k_h^T / sqrt(d_h) + causal) v_h,   y = concat_h(o_h) W_o

Shapes (lrjax's ``y = x W``): ``w_q: [d, H d_h]``, ``w_dkv: [d, d_c]``, ``kv_norm: [d_c]`` (the
RMSNorm scale), ``w_uk, w_uv: [d_c, H d_h]``, ``w_o: [H d_h, d]``.

Computation, two exact forms of the same function:

* direct (``absorb=False``, the default of the full pass and of prefill, i.e. training): ``K = c_kv W_uk``,
  ``V = c_kv W_uv`` are formed, then plain causal attention; its score cost is ``T^2 H d_h``.
* absorbed (the paper's inference trick; :func:`mla_attend`, used by every decode step): scores are
  ``(q_h W_uk,h^T) c_kv^T`` and outputs ``(P c_kv) W_uv,h``, so neither ``K`` nor ``V`` is formed and a
  step reads only the ``[T, d_c]`` cache (``O(T H d_c)`` per token instead of ``O(T d_c H d_h)`` to
  re-expand the cache). Over a whole sequence its score cost is ``T^2 H d_c``, more than the direct
  form's when ``d_c > d_h``, hence the split.

Choices [ours]: no query compression (DeepSeek-V2's ``W_dq``/``W_uq``, which saves activations in
training, not cache) and **no decoupled RoPE**: the char transformer this is used with has learned
absolute position embeddings added to the input, so the scores need no rotary key part. (RoPE on
``k_h`` would not commute with the absorption of ``W_uk``; that is why DeepSeek adds a separate
shared rotary key ``k^R`` of width ``d_h^R`` to the cache.) ``kv_norm`` follows DeepSeek-V2's
``kv_a_layernorm`` (RMSNorm, eps ``1e-6``) on the cached latent.

Decode: :class:`MLACache` holds ``c [B, capacity, d_c]`` and the filled ``length``;
:func:`mla_prefill` then :func:`mla_decode_step` equals one :func:`mla_forward` pass.

Dtypes: computed in ``promote_types(x, params, float32)``, rounded once to ``x``'s dtype (float32
and bfloat16 inputs). Errors: a ``params`` dict with missing keys or mismatched shapes, ``n_heads``
not dividing ``H d_h``, ``x`` of the wrong width, with no token (``B = 0`` or ``T = 0``) or with NaN/Inf,
a cache of the wrong shape or already full, and out-of-range ``q_start`` / ``length`` of
:func:`mla_attend` raise ``ValueError``; wrong kinds raise ``TypeError``; each names the argument.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lrjax._validation import (check_array, check_bool, check_dtype, check_finite, check_float, check_int,
                               compute_dtype)
from lrjax.nn.attention.kvcache import _check_position, _check_room, _masked_softmax, causal_attention

__all__ = ["MLACache", "MultiHeadLatentAttention", "PARAM_KEYS", "init_mla_params", "mla_latent", "mla_attend",
           "mla_forward", "init_mla_cache", "mla_prefill", "mla_decode_step"]

PARAM_KEYS = ("w_q", "w_dkv", "kv_norm", "w_uk", "w_uv", "w_o")
RMS_EPS = 1e-6


def _check_params(params, n_heads):
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict with keys {list(PARAM_KEYS)}, got {type(params).__name__}")
    missing = [k for k in PARAM_KEYS if k not in params]
    if missing:
        raise ValueError(f"params is missing {missing} (needs {list(PARAM_KEYS)})")
    p = {k: check_array(params[k], f"params[{k!r}]", ndim=1 if k == "kv_norm" else 2, kind="floating")
         for k in PARAM_KEYS}
    d, n = p["w_q"].shape
    dc = p["w_dkv"].shape[1]
    want = {"w_dkv": (d, dc), "kv_norm": (dc,), "w_uk": (dc, n), "w_uv": (dc, n), "w_o": (n, d)}
    for k, s in want.items():
        if tuple(p[k].shape) != s:
            raise ValueError(f"params[{k!r}] must have shape {s} (d={d}, d_c={dc}, H*d_h={n}), got {tuple(p[k].shape)}")
    n_heads = check_int(n_heads, "n_heads", low=1)
    if n % n_heads:
        raise ValueError(f"n_heads={n_heads} must divide H*d_h={n} (params['w_q'] columns)")
    return p, n_heads


def _check_x(x, d, ndim=3):
    lay = "[B, T, d]" if ndim == 3 else "[B, d]"
    x = check_array(x, "x", kind="floating")
    if x.ndim != ndim or x.shape[-1] != d:
        raise ValueError(f"x must have shape {lay} with d={d}, got {tuple(x.shape)}")
    if 0 in x.shape[:-1]:
        raise ValueError(f"x must have at least one sequence and one token ({lay} with B, T >= 1), "
                         f"got shape {tuple(x.shape)}")
    return check_finite(x, "x")


def init_mla_params(key, d_model: int, n_heads: int, d_latent: int, head_dim: int | None = None,
                    *, std: float = 0.02, dtype=jnp.float32) -> dict:
    """Random MLA parameters (normal(``std``) matrices, ``kv_norm = 1``); ``head_dim`` defaults to
    ``d_model // n_heads``."""
    d_model = check_int(d_model, "d_model", low=1)
    n_heads = check_int(n_heads, "n_heads", low=1)
    d_latent = check_int(d_latent, "d_latent", low=1)
    if head_dim is None:
        if d_model % n_heads:
            raise ValueError(f"n_heads={n_heads} must divide d_model={d_model} (or pass head_dim)")
        head_dim = d_model // n_heads
    head_dim = check_int(head_dim, "head_dim", low=1)
    std = check_float(std, "std", low=0.0)
    dtype = check_dtype(dtype, "dtype")
    n = n_heads * head_dim
    ks = jax.random.split(key, 5)
    shapes = {"w_q": (d_model, n), "w_dkv": (d_model, d_latent), "w_uk": (d_latent, n), "w_uv": (d_latent, n),
              "w_o": (n, d_model)}
    p = {k: (std * jax.random.normal(kk, s)).astype(dtype) for kk, (k, s) in zip(ks, shapes.items())}
    p["kv_norm"] = jnp.ones((d_latent,), dtype)
    return p


def mla_latent(x, w_dkv, kv_norm):
    """The cached latent ``c_kv = RMSNorm(x W_dkv) * kv_norm``: ``[..., d]`` -> ``[..., d_c]`` in
    ``promote_types(x, w_dkv, float32)``."""
    cd = compute_dtype(x.dtype, w_dkv.dtype)
    c = x.astype(cd) @ w_dkv.astype(cd)
    c = c * jax.lax.rsqrt(jnp.mean(c * c, axis=-1, keepdims=True) + RMS_EPS)
    return c * kv_norm.astype(cd)


def mla_attend(q, c, w_uk, w_uv, *, q_start=0, length=None):
    """Absorbed latent attention: ``q: [B, Tq, H, d_h]`` at positions ``q_start + i``, latents
    ``c: [B, Tk, d_c]`` at positions ``j`` (visible iff ``j <= q_start + i`` and ``j < length``),
    ``w_uk, w_uv: [d_c, H d_h]`` -> ``[B, Tq, H, d_h]`` in the compute dtype.

    ``scores_h = (q_h W_uk,h^T) c^T / sqrt(d_h)``, ``o_h = (softmax(scores_h) c) W_uv,h``.

    Valid values: ``q_start >= 0`` and ``1 <= length <= Tk`` (ints or integer scalar arrays); out of
    range concrete values raise ``ValueError`` naming the argument, so every query sees at least
    key 0. Traced values are not checked; a query row that then has no visible key returns exactly 0
    (not the mean of the values)."""
    q = check_array(q, "q", ndim=4, kind="floating")
    c = check_array(c, "c", ndim=3, kind="floating")
    w_uk = check_array(w_uk, "w_uk", ndim=2, kind="floating")
    w_uv = check_array(w_uv, "w_uv", ndim=2, kind="floating")
    if (c.shape[0] != q.shape[0] or w_uk.shape != w_uv.shape or w_uk.shape[0] != c.shape[-1]
            or w_uk.shape[1] != q.shape[2] * q.shape[3]):
        raise ValueError(f"q [B, Tq, H, d_h], c [B, Tk, d_c], w_uk and w_uv [d_c, H d_h] must agree, got "
                         f"{tuple(q.shape)}, {tuple(c.shape)}, {tuple(w_uk.shape)}, {tuple(w_uv.shape)}")
    q_start = _check_position(q_start, "q_start", 0)
    length = _check_position(length, "length", 1, c.shape[1])
    cd = compute_dtype(q.dtype, c.dtype, w_uk.dtype)
    b, tq, h, dh = q.shape
    dc = c.shape[-1]
    uk = w_uk.astype(cd).reshape(dc, h, dh)
    uv = w_uv.astype(cd).reshape(dc, h, dh)
    c = c.astype(cd)
    q_lat = jnp.einsum("bqhd,chd->bqhc", q.astype(cd), uk)
    scores = jnp.einsum("bqhc,bkc->bhqk", q_lat, c) / jnp.sqrt(jnp.asarray(dh, cd))
    qpos = q_start + jnp.arange(tq)[:, None]
    kpos = jnp.arange(c.shape[1])[None, :]
    mask = kpos <= qpos
    if length is not None:
        mask = mask & (kpos < length)
    p = _masked_softmax(scores, mask)
    o_lat = jnp.einsum("bhqk,bkc->bqhc", p, c)
    return jnp.einsum("bqhc,chd->bqhd", o_lat, uv)


def mla_forward(params: dict, x, *, n_heads: int, absorb: bool = False):
    """Full causal MLA self-attention: ``x: [B, T, d]`` -> ``[B, T, d]`` in ``x``'s dtype.

    ``absorb=False`` (default): the direct form (``K``, ``V`` formed); ``True``: the absorbed form of
    :func:`mla_attend`. Both compute the same function (equal up to rounding)."""
    p, n_heads = _check_params(params, n_heads)
    x = _check_x(x, p["w_q"].shape[0])
    return _forward(p, x, n_heads, check_bool(absorb, "absorb"))


def _direct(p, x, c, n_heads, cd):
    b, t, _ = x.shape
    q = (x.astype(cd) @ p["w_q"].astype(cd)).reshape(b, t, n_heads, -1)
    tk = c.shape[1]
    k = (c.astype(cd) @ p["w_uk"].astype(cd)).reshape(b, tk, n_heads, -1)
    v = (c.astype(cd) @ p["w_uv"].astype(cd)).reshape(b, tk, n_heads, -1)
    return q, k, v


@functools.partial(jax.jit, static_argnums=(2, 3))
def _forward(p, x, n_heads, absorb):
    cd = compute_dtype(x.dtype, p["w_q"].dtype)
    b, t, _ = x.shape
    c = mla_latent(x, p["w_dkv"], p["kv_norm"])
    if absorb:
        q = (x.astype(cd) @ p["w_q"].astype(cd)).reshape(b, t, n_heads, -1)
        o = mla_attend(q, c, p["w_uk"], p["w_uv"])
    else:
        o = causal_attention(*_direct(p, x, c, n_heads, cd))
    return (o.reshape(b, t, -1) @ p["w_o"].astype(cd)).astype(x.dtype)


class MLACache(NamedTuple):
    """MLA decode cache of one layer: ``c [B, capacity, d_c]`` and the filled ``length`` (int32)."""

    c: jax.Array
    length: jax.Array


def init_mla_cache(batch: int, capacity: int, d_latent: int, dtype=jnp.float32) -> MLACache:
    """An empty :class:`MLACache`: ``d_latent`` numbers per token, whatever the number of heads."""
    batch = check_int(batch, "batch", low=1)
    capacity = check_int(capacity, "capacity", low=1)
    d_latent = check_int(d_latent, "d_latent", low=1)
    dtype = check_dtype(dtype, "dtype")
    return MLACache(jnp.zeros((batch, capacity, d_latent), dtype), jnp.zeros((), jnp.int32))


def _check_cache(cache, batch, dc):
    if not isinstance(cache, MLACache):
        raise TypeError(f"cache must be an MLACache (from init_mla_cache / mla_prefill), got {type(cache).__name__}")
    c = check_array(cache.c, "cache.c", kind="floating")
    if c.ndim != 3 or c.shape[0] != batch or c.shape[2] != dc:
        raise ValueError(f"cache.c must have shape [B={batch}, capacity, d_c={dc}], got {tuple(c.shape)}")
    ln = check_array(cache.length, "cache.length", ndim=0, kind="integer")
    return cache._replace(length=ln.astype(jnp.int32))


def mla_prefill(params: dict, x, *, n_heads: int, capacity: int, cache_dtype=jnp.float32):
    """Causal MLA over a prompt ``x: [B, T, d]`` (direct form) that fills an :class:`MLACache` of
    ``capacity >= T`` positions. Returns ``(y [B, T, d], cache)``."""
    p, n_heads = _check_params(params, n_heads)
    x = _check_x(x, p["w_q"].shape[0])
    capacity = check_int(capacity, "capacity", low=x.shape[1])
    cache = init_mla_cache(x.shape[0], capacity, p["w_dkv"].shape[1], cache_dtype)
    return _prefill(p, x, cache, n_heads)


@functools.partial(jax.jit, static_argnums=(3,))
def _prefill(p, x, cache, n_heads):
    cd = compute_dtype(x.dtype, p["w_q"].dtype)
    c = mla_latent(x, p["w_dkv"], p["kv_norm"])
    cache = MLACache(jax.lax.dynamic_update_slice(cache.c, c.astype(cache.c.dtype), (0, 0, 0)),
                     jnp.asarray(x.shape[1], jnp.int32))
    o = causal_attention(*_direct(p, x, c, n_heads, cd)).reshape(x.shape[0], x.shape[1], -1)
    return (o @ p["w_o"].astype(cd)).astype(x.dtype), cache


def _attend_cache(p, x, cache, n_heads, q_start):
    cd = compute_dtype(x.dtype, p["w_q"].dtype)
    b, t, _ = x.shape
    q = (x.astype(cd) @ p["w_q"].astype(cd)).reshape(b, t, n_heads, -1)
    o = mla_attend(q, cache.c, p["w_uk"], p["w_uv"], q_start=q_start, length=cache.length).reshape(b, t, -1)
    return (o @ p["w_o"].astype(cd)).astype(x.dtype)


def mla_decode_step(params: dict, x, cache: MLACache, *, n_heads: int):
    """One decode step (absorbed form, reads only the latent cache): ``x: [B, d]`` at position
    ``cache.length`` -> ``(y [B, d], cache)`` with its latent appended.

    The cache must have room: ``cache.length < capacity``; a concrete full cache raises
    ``ValueError`` naming ``cache`` (prefill with a larger ``capacity``). Under ``jax.jit`` with a
    traced ``cache.length`` this cannot be checked: a step on a full cache then writes into the LAST
    slot (``dynamic_update_slice`` clamps the index), overwriting position ``capacity - 1``, and
    returns a wrong output; keep ``cache.length < capacity`` yourself there."""
    p, n_heads = _check_params(params, n_heads)
    x = _check_x(x, p["w_q"].shape[0], ndim=2)
    cache = _check_cache(cache, x.shape[0], p["w_dkv"].shape[1])
    _check_room(cache.length, cache.c.shape[1])
    return _decode(p, x, cache, n_heads)


@functools.partial(jax.jit, static_argnums=(3,))
def _decode(p, x, cache, n_heads):
    c = mla_latent(x[:, None], p["w_dkv"], p["kv_norm"])
    pos = cache.length
    cache = MLACache(jax.lax.dynamic_update_slice(cache.c, c.astype(cache.c.dtype), (0, pos, 0)), pos + 1)
    return _attend_cache(p, x[:, None], cache, n_heads, pos)[:, 0], cache


class MultiHeadLatentAttention(nnx.Module):
    """MLA layer (Flax NNX): ``q, kv_down, k_up, v_up, o`` bias-free ``nnx.Linear`` and an RMSNorm scale
    ``kv_norm`` on the latent; the math is :func:`mla_forward`.

    Args:
      d_model: input/output width ``d``.
      n_heads: heads ``H``.
      d_latent: cached latent width ``d_c`` (cache numbers per token; a plain K/V cache has ``2 H d_h``).
      head_dim: ``d_h`` (default ``d_model // n_heads``).
      rngs: ``nnx.Rngs``; kernels are normal(0.02) like the char transformer's.
    """

    def __init__(self, d_model: int, n_heads: int, d_latent: int, head_dim: int | None = None, *,
                 rngs: nnx.Rngs):
        d_model = check_int(d_model, "d_model", low=1)
        n_heads = check_int(n_heads, "n_heads", low=1)
        d_latent = check_int(d_latent, "d_latent", low=1)
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"rngs must be an nnx.Rngs (e.g. nnx.Rngs(0)), got {type(rngs).__name__}")
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"n_heads={n_heads} must divide d_model={d_model} (or pass head_dim)")
            head_dim = d_model // n_heads
        head_dim = check_int(head_dim, "head_dim", low=1)
        self.n_heads, self.head_dim, self.d_latent = n_heads, head_dim, d_latent
        n = n_heads * head_dim
        init = nnx.initializers.normal(0.02)
        lin = lambda i, o: nnx.Linear(i, o, use_bias=False, kernel_init=init, rngs=rngs)  # noqa: E731
        self.q, self.kv_down, self.k_up, self.v_up, self.o = (lin(d_model, n), lin(d_model, d_latent),
                                                              lin(d_latent, n), lin(d_latent, n), lin(n, d_model))
        self.kv_norm = nnx.Param(jnp.ones((d_latent,), jnp.float32))

    def params(self) -> dict:
        """The pure-function parameters ``{w_q, w_dkv, kv_norm, w_uk, w_uv, w_o}``."""
        return {"w_q": self.q.kernel[...], "w_dkv": self.kv_down.kernel[...], "kv_norm": self.kv_norm[...],
                "w_uk": self.k_up.kernel[...], "w_uv": self.v_up.kernel[...], "w_o": self.o.kernel[...]}

    def __call__(self, x):
        """``x: [B, T, d]`` -> ``[B, T, d]`` (causal)."""
        return mla_forward(self.params(), x, n_heads=self.n_heads)

    def prefill(self, x, capacity: int, cache_dtype=jnp.float32):
        """``(y, MLACache)`` for a prompt; see :func:`mla_prefill`."""
        return mla_prefill(self.params(), x, n_heads=self.n_heads, capacity=capacity, cache_dtype=cache_dtype)

    def decode(self, x, cache: MLACache):
        """``(y [B, d], cache)`` for one token; see :func:`mla_decode_step`."""
        return mla_decode_step(self.params(), x, cache, n_heads=self.n_heads)
