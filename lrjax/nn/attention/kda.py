"""The Kimi Delta Attention (KDA) layer in Flax NNX, a causal softmax attention layer, and the
3:1 KDA:attention hybrid stack of Kimi Linear (arXiv 2510.26692; layout of fla's
``fla/layers/kda.py``).

:class:`KimiDeltaAttention` (per token ``x in R^d``; ``H`` query/key heads of size ``K``, ``HV``
value heads of size ``V = expand_v * K``)::

    q, k, v = SiLU(ShortConv(W_q x)), SiLU(ShortConv(W_k x)), SiLU(ShortConv(W_v x))
    q, k    = q / |q|, k / |k|                  (per head; the kernel then scales q by K**-0.5)
    g       = -exp(A_log) * softplus(W_f2 W_f1 x + dt_bias)       (low-rank forget gate, rank V)
    beta    = sigmoid(W_b x)                                      (x 2 with allow_neg_eigval)
    o, S    = chunk_kda(q, k, v, g, beta, S)                      (lrjax.nn.attention.chunk)
    y       = W_o [RMSNorm(o) * sigmoid(W_g2 W_g1 x + b_g)]      (low-rank output gate, rank V)

``ShortConv`` is a causal depthwise convolution (kernel 4, no bias). Initialization as fla/the
paper: ``A_log = log U(1, 16)`` per value head; ``dt_bias = softplus^{-1}(dt)`` with
``dt ~ logU(1e-3, 1e-1)`` clamped at ``>= 1e-4`` (one per value head and key dimension); linear
kernels and convolutions as torch's default (``U(+-1/sqrt(fan_in))``). ``gate='gdn'`` turns the
layer into Gated DeltaNet: one decay per head from ``W_a x`` (``[d -> HV]``), same ``A_log``/``dt_bias``
recipe per head.

Decoding: ``layer(x, cache)`` takes and returns a cache ``{"conv": (q, k, v) windows of the last
``conv_size - 1`` projected inputs, "state": [B, HV, K, V]}`` whose size does not depend on the
context length; prefill then one-token calls equal one long call (tested). Without a cache the
layer starts from zeros and still returns the cache after the last token.

:class:`SoftmaxAttention` is a causal multi-head attention without positional encoding (Kimi
Linear's attention layers are NoPE MLA; plain MHA here) with a preallocated KV cache.
:class:`HybridStack` is a pre-norm residual stack whose every ``attention_every``-th layer is
softmax attention and the others KDA (default 3:1), each followed by a SwiGLU MLP.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lrjax._validation import check_array, check_bool, check_choice, check_dtype, check_finite, check_float, check_int
from lrjax.nn.attention.chunk import DEFAULT_CHUNK, chunk_kda
from lrjax.nn.attention.naive import recurrent_kda

__all__ = ["ShortConvolution", "KimiDeltaAttention", "SoftmaxAttention", "HybridStack",
           "l2_normalize", "MODES", "GATES"]

MODES = ("chunk", "recurrent")
GATES = ("kda", "gdn")


def _check_rngs(rngs):
    if not isinstance(rngs, nnx.Rngs):
        raise TypeError(f"rngs must be an nnx.Rngs (e.g. nnx.Rngs(0)), got {type(rngs).__name__}")


def _torch_uniform(fan_in):
    """torch's default Linear/Conv init: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _linear(din, dout, rngs, bias=False):
    return nnx.Linear(din, dout, use_bias=bias, kernel_init=_torch_uniform(din),
                      bias_init=_torch_uniform(din), rngs=rngs)


def _check_x(x, d):
    x = check_array(x, "x", kind="floating")
    if x.ndim != 3 or x.shape[-1] != d:
        raise ValueError(f"x must have shape [B, T, {d}] (batch, tokens, hidden_size), got {tuple(x.shape)}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"x must hold at least one sequence of at least one token (B, T >= 1), got shape "
                         f"{tuple(x.shape)}")
    check_finite(x, "x")
    return x


def l2_normalize(x, eps: float = 1e-6):
    """``x / sqrt(sum(x^2) + eps)`` over the last axis (fla's l2norm), in float32 or wider."""
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)


class ShortConvolution(nnx.Module):
    """Causal depthwise 1-D convolution over time with SiLU: ``y_t = SiLU(sum_j w_j * x_{t-w+1+j})``.

    ``__call__(x [B, T, D], cache [B, w-1, D] or None) -> (y, new_cache)``: ``cache`` holds the
    ``w - 1`` inputs before ``x`` (zeros at the start), ``new_cache`` the last ``w - 1`` inputs."""

    def __init__(self, features: int, kernel_size: int = 4, *, rngs: nnx.Rngs):
        self.features = check_int(features, "features", low=1)
        self.kernel_size = check_int(kernel_size, "kernel_size", low=1)
        _check_rngs(rngs)
        self.weight = nnx.Param(_torch_uniform(self.kernel_size)(rngs.params(), (self.kernel_size, self.features)))

    def __call__(self, x, cache=None):
        w = self.kernel_size
        B = x.shape[0]
        if cache is None:
            cache = jnp.zeros((B, w - 1, self.features), x.dtype)
        xx = jnp.concatenate([cache.astype(x.dtype), x], axis=1)        # [B, w-1+T, D]
        T = x.shape[1]
        wt = self.weight[...].astype(x.dtype)
        y = sum(xx[:, j:j + T] * wt[j] for j in range(w))
        return jax.nn.silu(y), xx[:, xx.shape[1] - (w - 1):]


class KimiDeltaAttention(nnx.Module):
    """Kimi Delta Attention layer (see the module docstring).

    Args:
      hidden_size: model width ``d`` (fla default 2048).
      num_heads: query/key heads ``H`` (default 16).
      head_dim: key head size ``K`` (default 128).
      num_v_heads: value heads ``HV`` (default ``H``); a multiple of ``H`` (grouped value heads).
      expand_v: value head size ``V = expand_v * K`` (default 1; must give an integer).
      conv_size: short-convolution kernel (default 4).
      gate: ``'kda'`` (per key dimension, KDA) or ``'gdn'`` (per head, Gated DeltaNet).
      allow_neg_eigval: ``beta = 2 sigmoid(.)`` (default False).
      norm_eps: RMSNorm epsilon of the output norm (default 1e-5, fla's layer).
      mode: ``'chunk'`` (default) or ``'recurrent'`` kernel for multi-token calls; one-token calls
        always use the recurrent step.
      chunk_size: chunk of the chunkwise kernel (default 64).
      rngs: ``nnx.Rngs``.
    """

    def __init__(self, hidden_size: int = 2048, *, num_heads: int = 16, head_dim: int = 128,
                 num_v_heads: int | None = None, expand_v: float = 1.0, conv_size: int = 4,
                 gate: str = "kda", allow_neg_eigval: bool = False, norm_eps: float = 1e-5,
                 mode: str = "chunk", chunk_size: int = DEFAULT_CHUNK, rngs: nnx.Rngs):
        d = self.hidden_size = check_int(hidden_size, "hidden_size", low=1)
        H = self.num_heads = check_int(num_heads, "num_heads", low=1)
        K = self.head_dim = check_int(head_dim, "head_dim", low=1)
        HV = self.num_v_heads = check_int(num_v_heads, "num_v_heads", low=1, allow_none=True) or H
        if HV % H != 0:
            raise ValueError(f"num_v_heads={HV} must be a multiple of num_heads={H} (grouped value heads)")
        expand_v = check_float(expand_v, "expand_v", low=0.0, low_open=True)
        if not math.isclose(K * expand_v, round(K * expand_v), rel_tol=0, abs_tol=1e-6) or round(K * expand_v) < 1:
            raise ValueError(f"expand_v={expand_v} times head_dim={K} must be a positive integer (the value head size)")
        V = self.head_v_dim = int(round(K * expand_v))
        self.conv_size = check_int(conv_size, "conv_size", low=1)
        self.gate = check_choice(gate, "gate", GATES)
        self.allow_neg_eigval = check_bool(allow_neg_eigval, "allow_neg_eigval")
        self.norm_eps = check_float(norm_eps, "norm_eps", low=0.0, low_open=True)
        self.mode = check_choice(mode, "mode", MODES)
        self.chunk_size = check_int(chunk_size, "chunk_size", low=1)
        _check_rngs(rngs)
        self.q_proj = _linear(d, H * K, rngs)
        self.k_proj = _linear(d, H * K, rngs)
        self.v_proj = _linear(d, HV * V, rngs)
        self.q_conv = ShortConvolution(H * K, self.conv_size, rngs=rngs)
        self.k_conv = ShortConvolution(H * K, self.conv_size, rngs=rngs)
        self.v_conv = ShortConvolution(HV * V, self.conv_size, rngs=rngs)
        gdim = HV * K if self.gate == "kda" else HV
        if self.gate == "kda":  # low-rank forget gate d -> V -> HV*K
            self.f_proj1 = _linear(d, V, rngs)
            self.f_proj2 = _linear(V, gdim, rngs)
        else:
            self.a_proj = _linear(d, HV, rngs)
        self.b_proj = _linear(d, HV, rngs)
        self.A_log = nnx.Param(jnp.log(jax.random.uniform(rngs.params(), (HV,), jnp.float32, 1.0, 16.0)))
        u = jax.random.uniform(rngs.params(), (gdim,), jnp.float32)
        dt = jnp.maximum(jnp.exp(u * (math.log(1e-1) - math.log(1e-3)) + math.log(1e-3)), 1e-4)
        self.dt_bias = nnx.Param(dt + jnp.log(-jnp.expm1(-dt)))          # softplus^{-1}(dt)
        self.g_proj1 = _linear(d, V, rngs)                                # low-rank output gate
        self.g_proj2 = _linear(V, HV * V, rngs, bias=True)
        self.o_norm_weight = nnx.Param(jnp.ones((V,), jnp.float32))
        self.o_proj = _linear(HV * V, d, rngs)

    # -------------------------------------------------------------------------------- caches
    def init_cache(self, batch_size: int, dtype=jnp.float32) -> dict:
        """Zero cache for ``batch_size`` sequences: conv windows and the ``[B, HV, K, V]`` state."""
        B = check_int(batch_size, "batch_size", low=1)
        dtype = check_dtype(dtype, "dtype")
        w = self.conv_size - 1
        HK, HVV = self.num_heads * self.head_dim, self.num_v_heads * self.head_v_dim
        return {"conv": (jnp.zeros((B, w, HK), dtype), jnp.zeros((B, w, HK), dtype), jnp.zeros((B, w, HVV), dtype)),
                "state": jnp.zeros((B, self.num_v_heads, self.head_dim, self.head_v_dim), jnp.float32)}

    def cache_bytes(self, batch_size: int = 1) -> int:
        """Bytes of the decode cache (independent of the context length)."""
        c = self.init_cache(batch_size)
        return int(sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(c)))

    def _check_cache(self, cache, B):
        if cache is None:
            return None
        if not isinstance(cache, dict) or set(cache) != {"conv", "state"}:
            raise TypeError("cache must be a dict {'conv': (q, k, v) windows, 'state': array} as returned by "
                            f"init_cache or a previous call, got {type(cache).__name__}")
        want = self.init_cache(B)
        conv = cache["conv"]
        if not isinstance(conv, (tuple, list)) or len(conv) != 3:
            raise TypeError("cache['conv'] must be a tuple of 3 arrays (q, k, v windows)")
        for i, (a, w) in enumerate(zip(conv, want["conv"])):
            check_array(a, f"cache['conv'][{i}]", kind="floating")
            if a.shape != w.shape:
                raise ValueError(f"cache['conv'][{i}] must have shape {w.shape}, got {tuple(a.shape)}")
        s = check_array(cache["state"], "cache['state']", kind="floating")
        if s.shape != want["state"].shape:
            raise ValueError(f"cache['state'] must have shape [B, HV, K, V] = {want['state'].shape}, "
                             f"got {tuple(s.shape)}")
        return cache

    # -------------------------------------------------------------------------------- forward
    def __call__(self, x, cache: dict | None = None, mask=None):
        """``x: [B, T, hidden_size]`` -> ``(y [B, T, hidden_size], cache)``.

        ``mask``: optional ``[B, T]`` bool, True = real token. A padded token neither updates the
        state (its gate ``g`` and ``beta`` are set to 0, an exact no-op of the delta rule) nor feeds
        the short convolutions (the real tokens are convolved as one contiguous stream after the
        cache; the returned conv window is the last ``conv_size - 1`` real inputs), and its output
        row is 0. So any mask -- left or right padding, holes, a masked one-token decode step --
        gives, at the real tokens, the outputs, final state and cache of the sequence with the
        padded tokens removed, and decoding can continue from the returned cache. [ours]

        ``y`` has ``x``'s dtype (compute in float32, rounded once at the end); the cache conv
        windows have ``x``'s dtype and the state is float32."""
        x = _check_x(x, self.hidden_size)
        B, T, _ = x.shape
        cache = self._check_cache(cache, B)
        if mask is not None:
            mask = check_array(mask, "mask")
            if mask.dtype != jnp.bool_:
                raise TypeError(f"mask must be a bool array [B, T] (True = real token), got dtype {mask.dtype}")
            if tuple(mask.shape) != (B, T):
                raise ValueError(f"mask must have shape [B, T] = {(B, T)} (x's leading axes), got {tuple(mask.shape)}")
            x = jnp.where(mask[..., None], x, jnp.zeros((), x.dtype))
        H, K, HV, V = self.num_heads, self.head_dim, self.num_v_heads, self.head_v_dim
        cq, ck, cv = (None, None, None) if cache is None else cache["conv"]
        if mask is None:
            q, cq = self.q_conv(self.q_proj(x), cq)
            k, ck = self.k_conv(self.k_proj(x), ck)
            v, cv = self.v_conv(self.v_proj(x), cv)
        else:
            # [ours] Padded tokens are removed from the convolution stream: the real tokens of each row
            # are compacted to the front (stable order), convolved after the cache, and gathered back;
            # the new conv window is the last conv_size - 1 inputs of cache ++ real tokens. So holes,
            # left/right padding and masked decode steps are all exact (tested).
            n_real = jnp.sum(mask, axis=1)                                          # [B]
            order = jnp.argsort(~mask, axis=1, stable=True)                         # real tokens first
            xc = jnp.take_along_axis(x, order[..., None], axis=1)
            xc = jnp.where((jnp.arange(T)[None, :] < n_real[:, None])[..., None], xc, jnp.zeros((), x.dtype))
            back = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)[..., None]         # [B, T, 1]
            win = n_real[:, None] + jnp.arange(self.conv_size - 1)[None, :]        # [B, w-1]

            def conv(mod, proj, c):
                p = proj(xc)
                yc, _ = mod(p, c)
                c0 = jnp.zeros((B, self.conv_size - 1, p.shape[-1]), p.dtype) if c is None else c.astype(p.dtype)
                xx = jnp.concatenate([c0, p], axis=1)
                return jnp.take_along_axis(yc, back, axis=1), jnp.take_along_axis(xx, win[..., None], axis=1)

            q, cq = conv(self.q_conv, self.q_proj, cq)
            k, ck = conv(self.k_conv, self.k_proj, ck)
            v, cv = conv(self.v_conv, self.v_proj, cv)
        q = l2_normalize(q.reshape(B, T, H, K))
        k = l2_normalize(k.reshape(B, T, H, K))
        v = v.reshape(B, T, HV, V)
        A = jnp.exp(self.A_log[...])
        if self.gate == "kda":
            f = self.f_proj2(self.f_proj1(x)).astype(jnp.float32) + self.dt_bias[...]
            g = -A[:, None] * jax.nn.softplus(f.reshape(B, T, HV, K))
        else:
            f = self.a_proj(x).astype(jnp.float32) + self.dt_bias[...]
            g = -A * jax.nn.softplus(f)
        beta = jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))
        if self.allow_neg_eigval:
            beta = 2.0 * beta
        if mask is not None:
            g = jnp.where(mask.reshape((B, T) + (1,) * (g.ndim - 2)), g, 0.0)
            beta = jnp.where(mask.reshape(B, T, 1), beta, 0.0)
        s0 = None if cache is None else cache["state"]
        if T == 1 or self.mode == "recurrent":
            o, s = recurrent_kda(q, k, v, g, beta, initial_state=s0)
        else:
            o, s = chunk_kda(q, k, v, g, beta, initial_state=s0, chunk_size=self.chunk_size)
        of = o.astype(jnp.float32)
        of = of * jax.lax.rsqrt(jnp.mean(of * of, axis=-1, keepdims=True) + self.norm_eps) * self.o_norm_weight[...]
        gate = jax.nn.sigmoid(self.g_proj2(self.g_proj1(x)).astype(jnp.float32)).reshape(B, T, HV, V)
        y = self.o_proj((of * gate).astype(x.dtype).reshape(B, T, HV * V)).astype(x.dtype)
        if mask is not None:
            y = jnp.where(mask[..., None], y, jnp.zeros((), y.dtype))
        return y, {"conv": (cq, ck, cv), "state": s}


class SoftmaxAttention(nnx.Module):
    """Causal multi-head softmax attention, no positional encoding, optional KV cache.

    ``init_cache(B, max_len)`` preallocates ``k, v: [B, max_len, H, D]`` and a position; a call with a
    cache writes its tokens at the position and attends to everything before (``jax.nn.dot_product_attention``
    with explicit masks)."""

    def __init__(self, hidden_size: int, *, num_heads: int = 4, head_dim: int | None = None, rngs: nnx.Rngs):
        d = self.hidden_size = check_int(hidden_size, "hidden_size", low=1)
        H = self.num_heads = check_int(num_heads, "num_heads", low=1)
        if head_dim is None:
            if d % H:
                raise ValueError(f"hidden_size={d} must be divisible by num_heads={H} when head_dim is None")
            head_dim = d // H
        D = self.head_dim = check_int(head_dim, "head_dim", low=1)
        _check_rngs(rngs)
        self.q_proj = _linear(d, H * D, rngs)
        self.k_proj = _linear(d, H * D, rngs)
        self.v_proj = _linear(d, H * D, rngs)
        self.o_proj = _linear(H * D, d, rngs)

    def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> dict:
        B = check_int(batch_size, "batch_size", low=1)
        L = check_int(max_len, "max_len", low=1)
        dtype = check_dtype(dtype, "dtype")
        z = jnp.zeros((B, L, self.num_heads, self.head_dim), dtype)
        return {"k": z, "v": z, "pos": jnp.zeros((), jnp.int32)}

    def cache_bytes(self, batch_size: int, context: int) -> int:
        """Bytes of the K and V cache for ``context`` tokens (grows linearly)."""
        return int(2 * batch_size * context * self.num_heads * self.head_dim * 4)

    def __call__(self, x, cache: dict | None = None):
        x = _check_x(x, self.hidden_size)
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        q, k, v = (p(x).reshape(B, T, H, D) for p in (self.q_proj, self.k_proj, self.v_proj))
        if cache is None:
            o = jax.nn.dot_product_attention(q, k, v, is_causal=True)
            return self.o_proj(o.reshape(B, T, H * D)), None
        if not isinstance(cache, dict) or set(cache) != {"k", "v", "pos"}:
            raise TypeError("cache must be a dict {'k', 'v', 'pos'} from init_cache or a previous call")
        L = cache["k"].shape[1]
        if isinstance(cache["pos"], jax.Array) and not isinstance(cache["pos"], jax.core.Tracer) \
                and int(cache["pos"]) + T > L:
            raise ValueError(f"cache holds max_len={L} tokens; {int(cache['pos'])} used + {T} new exceeds it: "
                             "allocate a longer cache with init_cache(batch_size, max_len)")
        pos = cache["pos"]
        kc = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, pos, 0, 0))
        vc = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, pos, 0, 0))
        qi = pos + jnp.arange(T)
        mask = jnp.arange(L)[None, :] <= qi[:, None]                       # [T, L]
        o = jax.nn.dot_product_attention(q, kc.astype(q.dtype), vc.astype(q.dtype), mask=mask[None, None])
        return self.o_proj(o.reshape(B, T, H * D)), {"k": kc, "v": vc, "pos": pos + T}


class _RMSNorm(nnx.Module):
    def __init__(self, d, eps=1e-6):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((d,), jnp.float32))

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + self.eps) * self.weight[...]
        return y.astype(x.dtype)


class _SwiGLU(nnx.Module):
    def __init__(self, d, hidden, rngs):
        self.w1 = _linear(d, hidden, rngs)
        self.w3 = _linear(d, hidden, rngs)
        self.w2 = _linear(hidden, d, rngs)

    def __call__(self, x):
        return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))


class HybridStack(nnx.Module):
    """Pre-norm residual stack, KDA:softmax attention = ``attention_every - 1 : 1`` (default 3:1).

    Layer ``i`` (0-based) is softmax attention when ``(i + 1) % attention_every == 0``, else
    :class:`KimiDeltaAttention` (``kda_kwargs`` passed on). Each layer is ``x + mixer(norm(x))``
    then ``x + SwiGLU(norm(x))`` (``mlp_ratio * d`` hidden). ``attention_every=0`` means KDA only.
    ``__call__(x, cache=None) -> (y, caches)``; ``init_cache(B, max_len)`` for decoding (without
    a cache, attention layers return ``None`` and KDA layers their final cache)."""

    def __init__(self, hidden_size: int, num_layers: int = 4, *, attention_every: int = 4,
                 num_heads: int = 4, head_dim: int | None = None, mlp_ratio: int = 4,
                 kda_kwargs: dict | None = None, rngs: nnx.Rngs):
        d = self.hidden_size = check_int(hidden_size, "hidden_size", low=1)
        n = self.num_layers = check_int(num_layers, "num_layers", low=1)
        self.attention_every = check_int(attention_every, "attention_every", low=0)
        H = check_int(num_heads, "num_heads", low=1)
        if head_dim is None:
            if d % H:
                raise ValueError(f"hidden_size={d} must be divisible by num_heads={H} when head_dim is None")
            head_dim = d // H
        head_dim = check_int(head_dim, "head_dim", low=1)
        mlp_ratio = check_int(mlp_ratio, "mlp_ratio", low=1)
        if kda_kwargs is not None and not isinstance(kda_kwargs, dict):
            raise TypeError(f"kda_kwargs must be a dict or None, got {type(kda_kwargs).__name__}")
        _check_rngs(rngs)
        kinds, mixers = [], []
        for i in range(n):
            if self.attention_every and (i + 1) % self.attention_every == 0:
                kinds.append("attention")
                mixers.append(SoftmaxAttention(d, num_heads=H, head_dim=head_dim, rngs=rngs))
            else:
                kinds.append("kda")
                mixers.append(KimiDeltaAttention(d, num_heads=H, head_dim=head_dim, **(kda_kwargs or {}), rngs=rngs))
        self.kinds = tuple(kinds)
        self.mixers = nnx.List(mixers)
        self.norms1 = nnx.List([_RMSNorm(d) for _ in range(n)])
        self.norms2 = nnx.List([_RMSNorm(d) for _ in range(n)])
        self.mlps = nnx.List([_SwiGLU(d, mlp_ratio * d, rngs) for _ in range(n)])

    def init_cache(self, batch_size: int, max_len: int) -> list:
        return [m.init_cache(batch_size, max_len) if kind == "attention" else m.init_cache(batch_size)
                for kind, m in zip(self.kinds, self.mixers)]

    def __call__(self, x, cache: list | None = None):
        x = _check_x(x, self.hidden_size)
        if cache is not None and (not isinstance(cache, (list, tuple)) or len(cache) != self.num_layers):
            raise TypeError(f"cache must be a list of {self.num_layers} layer caches from init_cache, "
                            f"got {type(cache).__name__}")
        new = []
        for i in range(self.num_layers):
            h, c = self.mixers[i](self.norms1[i](x), None if cache is None else cache[i])
            new.append(c)
            x = x + h
            x = x + self.mlps[i](self.norms2[i](x))
        return x, new
