"""LRAgent: one shared base KV cache plus a low-rank value cache for several LoRA agents.

LRAgent (Jeon et al., "LRAgent: Efficient KV Cache Sharing for Multi-LoRA LLM Agents"; official
code ``hjeon2k/LRAgent`` @e780b9cc813a: ``cache_utils.py::LRCache``,
``models/llama/modeling_llama.py::eager_attention_forward``, ``peft/tuners/lora/layer.py::Linear.forward``
with ``lrcache=True``, ``csrc/flash_lora_attn``) serves several agents that share a pretrained
backbone and differ only by LoRA adapters. In lrjax's matrix view (Dense kernels ``[in, out]``) an
agent's value projection with LoRA ``A_v: [d, r]`` (shared by all agents), ``B_v: [r, d_v]`` (its
own) and ``s = alpha / r`` is

    V_agent = X W_v + s (X A_v) B_v.

Instead of one ``[T, d_v]`` value cache per agent, LRAgent keeps, for the shared context,

* ``K = X W_k`` -- the base key projection (the agents carry no LoRA on ``k``), shared;
* ``V_base = X W_v`` -- the base value projection, shared;
* ``L = X A_v`` -- the low-rank value cache ``[T, r]``, shared because ``A_v`` is shared;

and every agent attends with its own queries ``Q`` and its own ``B_v``:

    P = softmax(Q K^T / sqrt(d_k) + causal mask),
    O = P V_base + s (P L) B_v          (= P (V_base + s L B_v), never forming L B_v: [T, d_v]).

``(P L)`` is ``[T_q, r]``, so the adapter's share of the read costs ``O(T_q T r + T_q r d_v)`` instead
of materializing ``s L B_v`` (``O(T r d_v)``) per agent and step. Memory per layer and token:
``2 d + r`` numbers for all agents together instead of ``2 d`` per agent.

Choices pinned here (from the official code unless said otherwise):

* **The cache stores ``L = X A_v`` unscaled** (``LRCache.update(lora_A(x))``); the agent's ``s`` is
  applied when reading (official: ``update(...) * scaling``), so agents sharing ``A_v`` may differ in
  ``alpha``. With ``L_s = s X A_v`` (the paper's notation) ``O = P V_base + (P L_s) B_v``.
* **Heads**: ``K``/``V_base`` are split into ``num_heads`` (key/value) heads; ``L`` is one ``[T, r]``
  array shared by every head, and ``B_v``'s ``d_v = num_heads * Dv`` output columns are split per head,
  ``B_v -> [r, num_heads, Dv]`` (official: ``lr_B.view(rank, -1, head_dim)``). Grouped queries: ``q``
  may have ``H = G * num_heads`` heads; query head ``h`` reads key/value head ``h // G`` (the
  official ``repeat_kv`` / ``repeat_interleave`` order).
* **Scores** are scaled by ``1 / sqrt(Dk)`` (official ``scaling = head_dim ** -0.5``); no positional
  encoding is applied here (pass rotated ``q``/``k`` inputs yourself if your model uses RoPE).
* **Where the cached hidden states come from** (a choice of the *caller*): the cache is built from
  whatever ``X`` is passed. In the official server every context token is written once, by the agent
  that processed it (the first agent for a shared prompt), and read by all agents. At depth 0 all
  agents see the same ``X`` (the embeddings), so the shared cache is exact there; at depth > 0 the
  first agent's hidden states differ from another agent's -- this is LRAgent's approximation. The
  functions below are exact for the ``X`` they are given; ``experiments/lragent.py`` measures the
  approximation (cache from the first agent's hidden states) against per-agent caches.
* **Preallocated cache** (lrjax's choice, for ``jit``): arrays have a fixed ``capacity`` ``S`` and
  ``pos`` counts the filled positions; a query at absolute position ``p`` attends keys ``j <= p``,
  ``j < pos``. Appending writes at ``pos`` (``lax.dynamic_update_slice``), so one compiled decode
  step serves every position. Overflow is refused eagerly when ``pos`` is concrete; under ``jit``
  size ``capacity`` yourself (XLA would clamp the write).
* **Precision**: everything runs in ``compute_dtype(inputs...)`` (at least float32) and is rounded
  once: caches to their dtype (default ``x``'s dtype: a bfloat16 model keeps a bfloat16 cache),
  attention outputs to ``result_type(q, cache.v)`` (``b_v`` in float32, as the official code keeps
  the LoRA factors, does not widen the output).

Several agents: vmap over the agent axis with the cache shared (``in_axes=None``)::

    cache = lragent_cache(x0, w_k, w_v, a_v, num_heads=H, capacity=S)       # written by agent 0
    out = jax.vmap(lragent_attention, in_axes=(0, None, 0, 0))(q_agents, cache, b_agents, s_agents)

Public functions: :func:`init_lrcache`, :func:`lragent_cache`, :func:`lragent_append`,
:func:`lragent_attention`, :func:`lragent_prefill`, :func:`lragent_decode_step`,
:func:`materialize_values`, :func:`cache_nbytes`; the cache pytree :class:`LRCache`.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lrjax._validation import check_array, check_dtype, check_float, check_int, compute_dtype, is_concrete

__all__ = ["LRCache", "init_lrcache", "lragent_cache", "lragent_append", "lragent_attention",
           "lragent_prefill", "lragent_decode_step", "materialize_values", "cache_nbytes"]


class LRCache(NamedTuple):
    """The shared LRAgent cache of one attention layer (a pytree; capacity ``S`` positions).

    Fields:
      k: ``[B, S, Hkv, Dk]`` keys ``X W_k`` (base projection).
      v: ``[B, S, Hkv, Dv]`` base values ``V_base = X W_v``.
      l: ``[B, S, r]`` low-rank value cache ``L = X A_v`` (unscaled; see the module docstring).
      pos: int32 ``[]``, the number of filled positions (``0 <= pos <= S``).

    ``k``, ``v`` and ``l`` share one floating dtype. Positions ``>= pos`` are never read.
    """
    k: jax.Array
    v: jax.Array
    l: jax.Array
    pos: jax.Array


# ----------------------------------------------------------------------------- checks
def _check_cache(cache, name="cache"):
    if not isinstance(cache, LRCache):
        raise TypeError(f"{name} must be an LRCache (from init_lrcache / lragent_cache / lragent_prefill), "
                        f"got {type(cache).__name__}")
    k = check_array(cache.k, f"{name}.k", ndim=4, kind="floating")
    v = check_array(cache.v, f"{name}.v", ndim=4, kind="floating")
    l = check_array(cache.l, f"{name}.l", ndim=3, kind="floating")
    pos = check_array(cache.pos, f"{name}.pos", ndim=0, kind="integer")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{name}.v must have shape [B, S, Hkv, Dv] with [B, S, Hkv] = {tuple(k.shape[:3])} "
                         f"of {name}.k, got {tuple(v.shape)}")
    if l.shape[:2] != k.shape[:2]:
        raise ValueError(f"{name}.l must have shape [B, S, r] with [B, S] = {tuple(k.shape[:2])} of {name}.k, "
                         f"got {tuple(l.shape)}")
    if not (k.dtype == v.dtype == l.dtype):
        raise TypeError(f"{name}.k, {name}.v and {name}.l must share one dtype, got {k.dtype}, {v.dtype}, "
                        f"{l.dtype}; build the cache with lragent_cache / init_lrcache")
    if is_concrete(pos):
        p = int(np.asarray(pos))
        if not 0 <= p <= k.shape[1]:
            raise ValueError(f"{name}.pos must lie in [0, capacity={k.shape[1]}], got {p}")
    return cache


def _check_proj(x, w_k, w_v, a_v, num_heads):
    x = check_array(x, "x", ndim=3, kind="floating")
    d = x.shape[-1]
    w_k = check_array(w_k, "w_k", ndim=2, kind="floating")
    w_v = check_array(w_v, "w_v", ndim=2, kind="floating")
    a_v = check_array(a_v, "a_v", ndim=2, kind="floating")
    for name, w in (("w_k", w_k), ("w_v", w_v), ("a_v", a_v)):
        if w.shape[0] != d:
            raise ValueError(f"{name} must have shape [d, ...] with d = {d} (x's last axis; lrjax kernels "
                             f"are [in, out]), got {tuple(w.shape)}")
    for name, w in (("w_k", w_k), ("w_v", w_v)):
        if w.shape[1] % num_heads:
            raise ValueError(f"{name} has {w.shape[1]} output columns, not divisible by num_heads={num_heads}")
    if a_v.shape[1] < 1:
        raise ValueError(f"a_v must have rank r >= 1 columns, got shape {tuple(a_v.shape)}")
    return x, w_k, w_v, a_v


def _check_scale(scale):
    if isinstance(scale, jax.core.Tracer) or (isinstance(scale, (jax.Array, np.ndarray)) and not is_concrete(scale)):
        arr = check_array(scale, "scale", ndim=0, kind="numeric")
        return arr
    if isinstance(scale, (jax.Array, np.ndarray)) and np.ndim(scale) != 0:
        raise ValueError(f"scale must be a scalar (s = alpha / r), got shape {tuple(np.shape(scale))}")
    return check_float(scale, "scale")


def _check_b(b_v, cache):
    if b_v is None:
        return None
    b_v = check_array(b_v, "b_v", ndim=2, kind="floating")
    r = cache.l.shape[-1]
    hkv, dv = cache.v.shape[2], cache.v.shape[3]
    if tuple(b_v.shape) != (r, hkv * dv):
        raise ValueError(f"b_v must have shape [r, num_heads * Dv] = {(r, hkv * dv)} (rank of cache.l, value "
                         f"width of cache.v), got {tuple(b_v.shape)}")
    return b_v


# ----------------------------------------------------------------------------- cache
def init_lrcache(batch_size: int, capacity: int, *, num_heads: int, head_dim: int, rank: int,
                 value_dim: int | None = None, dtype=jnp.float32) -> LRCache:
    """An empty :class:`LRCache` (zeros, ``pos = 0``) of ``capacity`` positions.

    Shapes ``k: [batch_size, capacity, num_heads, head_dim]``, ``v: [..., num_heads, value_dim]``
    (``value_dim`` defaults to ``head_dim``), ``l: [batch_size, capacity, rank]``; floating ``dtype``
    (default float32). Raises ``TypeError``/``ValueError`` naming the argument on a bad size or dtype.
    """
    b = check_int(batch_size, "batch_size", low=1)
    s = check_int(capacity, "capacity", low=1)
    h = check_int(num_heads, "num_heads", low=1)
    dk = check_int(head_dim, "head_dim", low=1)
    r = check_int(rank, "rank", low=1)
    dv = check_int(value_dim, "value_dim", low=1, allow_none=True) or dk
    dtype = check_dtype(dtype, "dtype")
    return LRCache(jnp.zeros((b, s, h, dk), dtype), jnp.zeros((b, s, h, dv), dtype),
                   jnp.zeros((b, s, r), dtype), jnp.zeros((), jnp.int32))


def _project(x, w_k, w_v, a_v, num_heads, dtype):
    cd = compute_dtype(x.dtype, w_k.dtype, w_v.dtype, a_v.dtype)
    xf = x.astype(cd)
    b, t, _ = x.shape
    k = (xf @ w_k.astype(cd)).reshape(b, t, num_heads, -1)
    v = (xf @ w_v.astype(cd)).reshape(b, t, num_heads, -1)
    l = xf @ a_v.astype(cd)
    return k.astype(dtype), v.astype(dtype), l.astype(dtype)


def lragent_cache(x, w_k, w_v, a_v, *, num_heads: int, capacity: int | None = None, dtype=None) -> LRCache:
    """Build the shared cache from the attention inputs ``x`` of the context (prefill).

    Args:
      x: ``[B, T, d]`` floating hidden states entering the attention projections (after the
        block's norm) -- in LRAgent, those of the agent that processed the context.
      w_k: ``[d, num_heads * Dk]`` base key kernel. w_v: ``[d, num_heads * Dv]`` base value kernel.
      a_v: ``[d, r]`` the value LoRA's ``A`` shared by the agents.
      num_heads: key/value heads ``Hkv``.
      capacity: positions to allocate, ``>= T`` (default ``T``); room for decode steps.
      dtype: cache dtype (default ``x.dtype``).

    Returns:
      :class:`LRCache` with ``K = x W_k``, ``V_base = x W_v``, ``L = x A_v`` at positions ``0..T-1``
      (computed in ``compute_dtype`` of the inputs, rounded once to ``dtype``) and ``pos = T``.

    Raises ``TypeError``/``ValueError`` (naming the argument) on a wrong kind, rank, width or size.
    """
    num_heads = check_int(num_heads, "num_heads", low=1)
    x, w_k, w_v, a_v = _check_proj(x, w_k, w_v, a_v, num_heads)
    t = x.shape[1]
    if t < 1:
        raise ValueError("x must hold at least one position (T >= 1)")
    capacity = check_int(capacity, "capacity", low=1, allow_none=True) or t
    if capacity < t:
        raise ValueError(f"capacity={capacity} must be >= the {t} positions of x")
    dtype = check_dtype(dtype, "dtype", allow_none=True) or x.dtype
    k, v, l = _project(x, w_k, w_v, a_v, num_heads, dtype)
    pad = capacity - t
    if pad:
        k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
        l = jnp.pad(l, ((0, 0), (0, pad), (0, 0)))
    return LRCache(k, v, l, jnp.asarray(t, jnp.int32))


def lragent_append(cache: LRCache, x, w_k, w_v, a_v) -> LRCache:
    """Write ``t`` new positions (``x: [B, t, d]``) at ``cache.pos`` and advance ``pos`` by ``t``.

    The projections are those of :func:`lragent_cache` (``w_k``, ``w_v``, ``a_v`` as there; the
    head split is read from ``cache.k``), rounded once to the cache dtype. ``jit``-friendly: ``pos``
    may be traced (one compiled step for every position). Raises ``ValueError`` if ``x``'s batch,
    width or the key/value widths do not match the cache, or (``pos`` concrete) if the cache would
    overflow its capacity.
    """
    cache = _check_cache(cache)
    hkv = cache.k.shape[2]
    x, w_k, w_v, a_v = _check_proj(x, w_k, w_v, a_v, hkv)
    b, t, _ = x.shape
    if b != cache.k.shape[0]:
        raise ValueError(f"x has batch {b}, the cache {cache.k.shape[0]}")
    if w_k.shape[1] != hkv * cache.k.shape[3] or w_v.shape[1] != hkv * cache.v.shape[3] \
            or a_v.shape[1] != cache.l.shape[2]:
        raise ValueError(f"w_k/w_v/a_v widths {w_k.shape[1]}/{w_v.shape[1]}/{a_v.shape[1]} must match the cache's "
                         f"{hkv * cache.k.shape[3]}/{hkv * cache.v.shape[3]}/{cache.l.shape[2]} (Hkv*Dk, Hkv*Dv, r)")
    if is_concrete(cache.pos) and int(np.asarray(cache.pos)) + t > cache.k.shape[1]:
        raise ValueError(f"cache holds capacity={cache.k.shape[1]} positions; pos={int(np.asarray(cache.pos))} "
                         f"used + {t} new exceeds it: build it with a larger capacity")
    k, v, l = _project(x, w_k, w_v, a_v, hkv, cache.k.dtype)
    p = cache.pos
    return LRCache(jax.lax.dynamic_update_slice(cache.k, k, (0, p, 0, 0)),
                   jax.lax.dynamic_update_slice(cache.v, v, (0, p, 0, 0)),
                   jax.lax.dynamic_update_slice(cache.l, l, (0, p, 0)),
                   (p + t).astype(jnp.int32))


def materialize_values(cache: LRCache, b_v, scale=1.0):
    """One agent's full value cache ``V_base + s L B_v``: ``[B, S, Hkv, Dv]`` in ``cache.v.dtype``.

    What a per-agent cache would store; LRAgent never forms it (reference and baseline only).
    ``b_v: [r, Hkv * Dv]`` or ``None`` (then ``V_base``); ``scale`` is ``s`` (Python float or 0-d array).
    """
    cache = _check_cache(cache)
    b_v = _check_b(b_v, cache)
    scale = _check_scale(scale)
    if b_v is None:
        return cache.v
    cd = compute_dtype(cache.v.dtype, b_v.dtype)
    b, s, h, dv = cache.v.shape
    lb = jnp.einsum("bsr,rhd->bshd", cache.l.astype(cd), b_v.astype(cd).reshape(-1, h, dv))
    return (cache.v.astype(cd) + jnp.asarray(scale, cd) * lb).astype(cache.v.dtype)


# ------------------------------------------------------------------------- attention
def lragent_attention(q, cache: LRCache, b_v, scale=1.0, *, q_pos=None):
    """One agent's causal attention over the shared cache: ``P V_base + s (P L) B_v``.

    Args:
      q: ``[B, Tq, H, Dk]`` the agent's queries, ``H = G * Hkv`` (query head ``h`` reads key/value
        head ``h // G``).
      cache: :class:`LRCache` (``k: [B, S, Hkv, Dk]``, ``v: [B, S, Hkv, Dv]``, ``l: [B, S, r]``).
      b_v: ``[r, Hkv * Dv]`` the agent's value ``B``; ``None`` reads ``V_base`` only (base-only sharing).
      scale: the agent's LoRA scale ``s = alpha / r`` (Python number or a 0-d array, e.g. one per
        agent under ``vmap``).
      q_pos: absolute position of ``q[:, 0]`` (int or int32 0-d array); default ``cache.pos - Tq``
        (the queries are the last ``Tq`` written positions, as after :func:`lragent_append`).

    Returns:
      ``[B, Tq, H, Dv]`` in ``result_type(q, cache.v)``: query ``i`` (absolute position ``p_i = q_pos + i``)
      attends keys ``j <= p_i`` with ``j < cache.pos``, scores ``q k / sqrt(Dk)``; computed in
      ``compute_dtype`` of the inputs and rounded once. ``(P L)`` (``[B, Tq, H, r]``) is formed,
      ``L B_v`` never is.

    Raises ``TypeError``/``ValueError`` naming the argument on a wrong kind, rank or size, or (concrete
    ``q_pos``/``pos``) queries beyond the filled positions.
    """
    cache = _check_cache(cache)
    q = check_array(q, "q", ndim=4, kind="floating")
    b, tq, h, dk = q.shape
    bc, s, hkv, dkc = cache.k.shape
    if b != bc:
        raise ValueError(f"q has batch {b}, the cache {bc}")
    if dk != dkc:
        raise ValueError(f"q must have head dim Dk = {dkc} (cache.k's last axis), got {tuple(q.shape)}")
    if h % hkv:
        raise ValueError(f"q has {h} heads, not a multiple of the cache's {hkv} key/value heads")
    b_v = _check_b(b_v, cache)
    scale = _check_scale(scale)
    if q_pos is None:
        q_pos = cache.pos - tq
    elif not isinstance(q_pos, (jax.Array, np.ndarray, jax.core.Tracer)):
        q_pos = check_int(q_pos, "q_pos", low=0)
    else:
        q_pos = check_array(q_pos, "q_pos", ndim=0, kind="integer")
    if is_concrete(q_pos) and is_concrete(cache.pos):
        qp, p = int(np.asarray(q_pos)), int(np.asarray(cache.pos))
        if qp < 0 or qp + tq > p:
            raise ValueError(f"q_pos: queries at positions [{qp}, {qp + tq}) must lie in the {p} filled positions "
                             f"of the cache (0 <= q_pos and q_pos + Tq <= cache.pos); append their keys first")
    out_dtype = jnp.result_type(q.dtype, cache.v.dtype)
    cd = compute_dtype(q.dtype, cache.k.dtype, *(() if b_v is None else (b_v.dtype,)))
    g = h // hkv
    dv = cache.v.shape[-1]
    # query heads h = kv * G + j: fold the G query heads of each key/value head into the query axis
    # ([B, Tq * G, Hkv, Dk], query (t, j) at row t * G + j), so every product below is a 4-D einsum
    qf = q.astype(cd).reshape(b, tq, hkv, g, dk).transpose(0, 1, 3, 2, 4).reshape(b, tq * g, hkv, dk)
    scores = jnp.einsum("bqhd,bshd->bhqs", qf, cache.k.astype(cd)) / jnp.sqrt(jnp.asarray(dk, cd))
    qi = jnp.repeat(jnp.asarray(q_pos, jnp.int32) + jnp.arange(tq, dtype=jnp.int32), g)
    kj = jnp.arange(s, dtype=jnp.int32)
    mask = (kj[None, :] <= qi[:, None]) & (kj[None, :] < cache.pos)          # [Tq * G, S]
    scores = jnp.where(mask, scores, jnp.finfo(cd).min)
    p = jax.nn.softmax(scores, axis=-1)                                      # [B, Hkv, Tq * G, S]
    out = jnp.einsum("bhqs,bshd->bqhd", p, cache.v.astype(cd))               # P V_base: [B, Tq * G, Hkv, Dv]
    if b_v is not None:
        pl = jnp.einsum("bhqs,bsr->bqhr", p, cache.l.astype(cd))             # P L: [B, Tq * G, Hkv, r]
        bh = b_v.astype(cd).reshape(-1, hkv, dv)                             # B_v split per head
        out = out + jnp.asarray(scale, cd) * jnp.einsum("bqhr,rhd->bqhd", pl, bh)
    out = out.reshape(b, tq, g, hkv, dv).transpose(0, 1, 3, 2, 4)
    return out.reshape(b, tq, h, dv).astype(out_dtype)


def lragent_prefill(q, x, w_k, w_v, a_v, b_v, scale=1.0, *, num_heads: int, capacity: int | None = None,
                    dtype=None):
    """Prefill: build the cache from ``x: [B, T, d]`` and attend with ``q: [B, T, H, Dk]``.

    Equals ``lragent_attention(q, lragent_cache(x, w_k, w_v, a_v, ...), b_v, scale, q_pos=0)``.
    Returns ``(out [B, T, H, Dv], cache)``; arguments as in those two functions.
    """
    cache = lragent_cache(x, w_k, w_v, a_v, num_heads=num_heads, capacity=capacity, dtype=dtype)
    q = check_array(q, "q", ndim=4, kind="floating")
    if q.shape[1] != x.shape[1]:
        raise ValueError(f"q must have the T = {x.shape[1]} positions of x, got shape {tuple(q.shape)}")
    return lragent_attention(q, cache, b_v, scale, q_pos=0), cache


def lragent_decode_step(q, x, cache: LRCache, w_k, w_v, a_v, b_v, scale=1.0):
    """One decode step: append ``x: [B, 1, d]`` at ``cache.pos``, then attend with ``q: [B, 1, H, Dk]``.

    Returns ``(out [B, 1, H, Dv], new_cache)``. A sequence of steps equals :func:`lragent_prefill` on
    the whole sequence (tested). ``jit``-friendly with a traced ``cache.pos``.
    """
    q = check_array(q, "q", ndim=4, kind="floating")
    x = check_array(x, "x", ndim=3, kind="floating")
    if q.shape[1] != 1 or x.shape[1] != 1:
        raise ValueError(f"q and x must hold one position each (decode step), got q {tuple(q.shape)}, "
                         f"x {tuple(x.shape)}; use lragent_append + lragent_attention for chunks")
    cache = lragent_append(cache, x, w_k, w_v, a_v)
    return lragent_attention(q, cache, b_v, scale), cache


def cache_nbytes(cache) -> int:
    """Bytes held by a cache pytree (an :class:`LRCache`, a dict, or any pytree of arrays)."""
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(cache)))
