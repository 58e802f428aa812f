"""A small character-level decoder-only transformer in Flax NNX.

Used by ``experiments/quickstart.py`` and ``experiments/bench_lora.py`` as the toy language model
that lrjax's adapters are demonstrated on. It is deliberately plain so that every weight matrix
is a Flax ``nnx.Linear`` kernel of layout ``[in, out]`` -- the layout :mod:`lrjax.axes` assumes --
and every use of such a kernel is a single ``x @ W`` ``dot_general``, which
:func:`lrjax.factored` computes as ``x W + s (x A) B``.

Architecture (GPT-2 style, pre-LayerNorm)::

    h = tok_embed(ids) + pos_embed[:T]
    for each block:  h = h + attn(ln1(h));  h = h + mlp(ln2(h))
    logits = head(ln_f(h))

* ``attn``: causal multi-head self-attention with separate ``q``, ``k``, ``v`` and ``o``
  projections (``nnx.Linear``, no bias), scaled dot-product scores, a lower-triangular mask;
* ``mlp``: ``fc2(gelu(fc1(x)))`` with ``fc1: d_model -> d_ff``, ``fc2: d_ff -> d_model``;
* untied output ``head: d_model -> vocab_size`` (an ``nnx.Linear``; *not* among the
  :data:`ADAPTER_TARGETS`, like the embeddings and the LayerNorm scales).

Leaf paths of ``nnx.state(model)`` (as :mod:`lrjax.tree` prints them)::

    tok_embed/embedding, pos_embed, blocks/{i}/ln1/{scale,bias}, blocks/{i}/attn/{q,k,v,o}/kernel,
    blocks/{i}/ln2/{scale,bias}, blocks/{i}/mlp/fc1/{kernel,bias}, blocks/{i}/mlp/fc2/{kernel,bias},
    ln_f/{scale,bias}, head/{kernel,bias}

The model holds only ``nnx.Param`` state (no dropout, no RNG streams), so the usual pure-function
view works::

    graphdef, state = nnx.split(model)
    apply = lambda state, ids: nnx.merge(graphdef, state)(ids)    # logits [B, T, vocab]
    g = lrjax.factored(apply, lrjax.LoRA(rank=8, targets=ADAPTER_TARGETS))
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lrjax._validation import check_array, check_finite, check_int, is_concrete

__all__ = ["CharTransformer", "CausalSelfAttention", "MLP", "Block", "ADAPTER_TARGETS",
           "loss_fn", "apply_fn", "split"]

def _check_rngs(rngs):
    if not isinstance(rngs, nnx.Rngs):
        raise TypeError(f"rngs must be an nnx.Rngs (e.g. nnx.Rngs(0)), got {type(rngs).__name__}")


def _check_x(x, d_model):
    x = check_array(x, "x", ndim=3, last=d_model, kind="floating")
    check_finite(x, "x")
    return x


#: lrjax ``targets`` selecting every attention projection and MLP kernel (not embeddings,
#: LayerNorms, biases or the output head).
ADAPTER_TARGETS = (r"blocks/\d+/attn/(q|k|v|o)/kernel", r"blocks/\d+/mlp/(fc1|fc2)/kernel")


class CausalSelfAttention(nnx.Module):
    """Multi-head causal self-attention; ``q, k, v, o`` are bias-free ``nnx.Linear`` layers."""

    def __init__(self, d_model: int, n_heads: int, *, rngs: nnx.Rngs):
        d_model = check_int(d_model, "d_model", low=1)
        n_heads = check_int(n_heads, "n_heads", low=1)
        _check_rngs(rngs)
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        init = nnx.initializers.normal(0.02)
        self.q = nnx.Linear(d_model, d_model, use_bias=False, kernel_init=init, rngs=rngs)
        self.k = nnx.Linear(d_model, d_model, use_bias=False, kernel_init=init, rngs=rngs)
        self.v = nnx.Linear(d_model, d_model, use_bias=False, kernel_init=init, rngs=rngs)
        self.o = nnx.Linear(d_model, d_model, use_bias=False, kernel_init=init, rngs=rngs)

    def __call__(self, x):
        """``x: [B, T, d_model]`` floating -> ``[B, T, d_model]``."""
        x = _check_x(x, self.n_heads * self.head_dim)
        b, t, d = x.shape
        h, hd = self.n_heads, self.head_dim
        q = self.q(x).reshape(b, t, h, hd)
        k = self.k(x).reshape(b, t, h, hd)
        v = self.v(x).reshape(b, t, h, hd)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.asarray(hd, x.dtype))
        mask = jnp.tril(jnp.ones((t, t), dtype=bool))
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
        return self.o(out)


class MLP(nnx.Module):
    """``fc2(gelu(fc1(x)))``."""

    def __init__(self, d_model: int, d_ff: int, *, rngs: nnx.Rngs):
        d_model = check_int(d_model, "d_model", low=1)
        d_ff = check_int(d_ff, "d_ff", low=1)
        _check_rngs(rngs)
        init = nnx.initializers.normal(0.02)
        self.fc1 = nnx.Linear(d_model, d_ff, kernel_init=init, rngs=rngs)
        self.fc2 = nnx.Linear(d_ff, d_model, kernel_init=init, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x)))


class Block(nnx.Module):
    """Pre-LN transformer block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, *, rngs: nnx.Rngs):
        d_model = check_int(d_model, "d_model", low=1)
        check_int(n_heads, "n_heads", low=1)
        check_int(d_ff, "d_ff", low=1)
        _check_rngs(rngs)
        self.ln1 = nnx.LayerNorm(d_model, rngs=rngs)
        self.attn = CausalSelfAttention(d_model, n_heads, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d_model, rngs=rngs)
        self.mlp = MLP(d_model, d_ff, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nnx.Module):
    """Decoder-only character transformer (pre-LN, learned positions, untied head).

    Args:
      vocab_size: number of token ids (e.g. ``lrjax.data``'s 96 characters).
      d_model: residual width.
      n_layers: number of transformer blocks.
      n_heads: attention heads (``d_model`` must be divisible by it).
      d_ff: MLP hidden width.
      max_len: longest sequence the learned position table covers.
      rngs: ``nnx.Rngs`` for parameter initialization.

    Calling the model on int ids ``[B, T]`` (``T <= max_len``) returns float32 logits
    ``[B, T, vocab_size]``; position ``t`` depends on ids ``0..t`` only.
    """

    def __init__(self, vocab_size: int, d_model: int = 128, n_layers: int = 2, n_heads: int = 4,
                 d_ff: int = 512, max_len: int = 128, *, rngs: nnx.Rngs):
        vocab_size = check_int(vocab_size, "vocab_size", low=1)
        d_model = check_int(d_model, "d_model", low=1)
        n_layers = check_int(n_layers, "n_layers", low=1)
        n_heads = check_int(n_heads, "n_heads", low=1)
        d_ff = check_int(d_ff, "d_ff", low=1)
        max_len = check_int(max_len, "max_len", low=1)
        _check_rngs(rngs)
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.vocab_size, self.max_len = vocab_size, max_len
        self.tok_embed = nnx.Embed(vocab_size, d_model, embedding_init=nnx.initializers.normal(0.02),
                                   rngs=rngs)
        self.pos_embed = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (max_len, d_model)))
        self.blocks = nnx.List([Block(d_model, n_heads, d_ff, rngs=rngs) for _ in range(n_layers)])
        self.ln_f = nnx.LayerNorm(d_model, rngs=rngs)
        self.head = nnx.Linear(d_model, vocab_size, kernel_init=nnx.initializers.normal(0.02), rngs=rngs)

    def __call__(self, ids):
        """``ids``: integer array ``[B, T]`` with ``1 <= T <= max_len`` and (checked on concrete
        input) every id in ``[0, vocab_size)``; returns logits ``[B, T, vocab_size]``."""
        ids = _check_ids(ids, "ids", self.vocab_size)
        if ids.ndim != 2:
            raise ValueError(f"ids must have shape [B, T], got {tuple(ids.shape)}; add a batch axis with ids[None]")
        t = ids.shape[-1]
        if t == 0:
            raise ValueError("ids: empty sequence (T = 0); pass at least one token")
        if t > self.max_len:
            raise ValueError(f"ids: sequence length {t} exceeds max_len={self.max_len}")
        h = self.tok_embed(ids) + self.pos_embed[...][:t]
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln_f(h))


def _check_ids(ids, name, vocab_size=None, min_ndim=1):
    ids = check_array(ids, name, min_ndim=min_ndim, kind="integer")
    if vocab_size is not None and is_concrete(ids) and ids.size:
        lo, hi = int(np.min(np.asarray(ids))), int(np.max(np.asarray(ids)))
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{name} must lie in [0, vocab_size={vocab_size}), got range [{lo}, {hi}]")
    return ids


def split(model: CharTransformer):
    """``(graphdef, state, apply)`` with ``apply(state, ids) -> logits`` a pure function."""
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be an nnx.Module such as CharTransformer, got {type(model).__name__}")
    graphdef, state = nnx.split(model)

    def apply(state, ids):
        return nnx.merge(graphdef, state)(ids)

    return graphdef, state, apply


def apply_fn(graphdef):
    """The pure forward ``(state, ids) -> logits`` for a split model's ``graphdef``."""
    if not isinstance(graphdef, nnx.GraphDef):
        raise TypeError(f"graphdef must be the nnx.GraphDef from nnx.split(model) / split(model), "
                        f"got {type(graphdef).__name__}")
    return lambda state, ids: nnx.merge(graphdef, state)(ids)


def loss_fn(logits, targets, mask=None):
    """Mean next-token cross-entropy (nats) of ``logits [..., V]`` against int ``targets [...]``.

    ``mask`` (same shape as ``targets``, optional) weights positions; the mean is over the
    weighted positions (an all-zero mask gives 0, not NaN). Targets must lie in ``[0, V)``
    (checked on concrete input).
    """
    logits = check_array(logits, "logits", min_ndim=1, kind="floating")
    check_finite(logits, "logits")
    targets = _check_ids(targets, "targets", logits.shape[-1], min_ndim=0)
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    if mask is not None:
        mask = check_array(mask, "mask", kind="any")
        if tuple(mask.shape) != tuple(targets.shape):
            raise ValueError(f"mask must have the shape of targets {tuple(targets.shape)}, got {tuple(mask.shape)}")
        if is_concrete(mask) and mask.size and bool(jnp.any(jnp.asarray(mask, jnp.float32) < 0)):
            raise ValueError("mask must be >= 0 (a weight per position)")
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    if mask is None:
        return jnp.mean(ce)
    mask = mask.astype(jnp.float32)
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)
