"""Adam with 8-bit block-wise quantized moments (after Dettmers et al. 2022, "8-bit Optimizers via
Block-wise Quantization", arXiv:2110.02861), as an inner transformation for the GaLore family.

Each moment leaf is cut into blocks of ``block_size`` entries (flattened, zero-padded); a block
stores one float32 scale (its absmax) and one byte per entry: the index of the nearest entry of a
fixed logarithmic codebook for ``|x| / absmax``:

* first moment (signed, int8): ``0`` and ``+-10^(-D (1 - k / 126))``, ``k = 0..126``, ``D = 7``;
* second moment (unsigned, uint8): ``0`` and ``10^(-D (1 - k / 254))``, ``k = 0..254``, ``D = 14``.

Consecutive levels differ by a factor ``10^(7/126) ~ 1.14`` (``10^(14/254)`` for ``v``), so
every stored value within the codebook's range has a relative error below ~7% (half a level in
log space) -- the property of the paper's *dynamic* quantization that matters for Adam (a
relative, not absolute, error on small moments); the exact code maps differ from
bitsandbytes'. Values below the smallest level relative to their block's absmax round to 0.

The update is Adam's on the dequantized moments; the new moments are quantized again for the
state. Leaves with fewer than ``min_size`` entries (biases, norms) keep float32 moments, as in
bitsandbytes. Memory per quantized entry: ``2 * (1 + 4 / block_size)`` bytes instead of 8.
Defaults: ``b1 = 0.9, b2 = 0.999, eps = 1e-8, block_size = 256, min_size = 4096``.

    opt = lrjax.optim.galore(lrjax.optim.quant.scale_by_adam_8bit(), rank=128)   # 8-bit GaLore
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lrjax._validation import check_array, check_bool, check_float, check_int
from lrjax.optim.projection import _check_int

__all__ = ["scale_by_adam_8bit", "ScaleByAdam8bitState", "Quantized", "quantize", "dequantize"]

_D_SIGNED, _D_UNSIGNED = 7.0, 14.0


class Quantized(NamedTuple):
    """A block-quantized array: ``codes: [n_blocks, block_size]`` (int8/uint8), ``scale: [n_blocks]``."""

    codes: jax.Array
    scale: jax.Array


class ScaleByAdam8bitState(NamedTuple):
    count: jax.Array
    mu: Any
    nu: Any


def quantize(x, *, signed: bool, block_size: int = 256) -> Quantized:
    """Block-wise logarithmic 8-bit quantization of ``x`` (module doc).

    An all-zero block gets scale 0 and codes 0 (it dequantizes to exact zeros; no division by 0).
    """
    x = check_array(x, "x", kind="numeric")
    signed = check_bool(signed, "signed")
    block_size = check_int(block_size, "block_size", low=1)
    flat = x.reshape(-1).astype(jnp.float32)
    pad = (-flat.size) % block_size
    blocks = jnp.pad(flat, (0, pad)).reshape(-1, block_size)
    scale = jnp.max(jnp.abs(blocks), axis=1)
    a = jnp.abs(blocks) / jnp.where(scale > 0, scale, 1.0)[:, None]
    d, top = (_D_SIGNED, 126) if signed else (_D_UNSIGNED, 254)
    k = jnp.round((jnp.log10(jnp.maximum(a, 1e-30)) + d) * top / d)
    zero = k < -0.5                                   # below half a level under the smallest
    code = jnp.where(zero, 0, jnp.clip(k, 0, top) + 1)
    if signed:
        return Quantized((jnp.sign(blocks) * code).astype(jnp.int8), scale)
    return Quantized(code.astype(jnp.uint8), scale)


def dequantize(q: Quantized, shape, *, signed: bool):
    """Inverse of :func:`quantize` (float32, ``shape``)."""
    if not isinstance(q, Quantized):
        raise TypeError(f"q must be a Quantized (from quantize), got {type(q).__name__}")
    signed = check_bool(signed, "signed")
    try:
        shape = tuple(check_int(d, "shape entry", low=0) for d in shape)
    except TypeError:
        raise TypeError(f"shape must be a tuple of ints, got {shape!r}") from None
    if math.prod(shape) > q.codes.size:
        raise ValueError(f"shape {shape} has {math.prod(shape)} entries but q holds only {q.codes.size}")
    d, top = (_D_SIGNED, 126) if signed else (_D_UNSIGNED, 254)
    c = q.codes.astype(jnp.float32)
    mag = jnp.where(c == 0, 0.0, 10.0 ** (-d * (1.0 - (jnp.abs(c) - 1.0) / top)))
    x = (jnp.sign(c) * mag if signed else mag) * q.scale[:, None]
    return x.reshape(-1)[:math.prod(shape)].reshape(shape)


def scale_by_adam_8bit(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *, block_size: int = 256,
                       min_size: int = 4096) -> optax.GradientTransformation:
    """``optax.scale_by_adam`` with 8-bit block-wise quantized moments (module doc)."""
    b1 = check_float(b1, "b1", low=0.0, high=1.0, high_open=True)
    b2 = check_float(b2, "b2", low=0.0, high=1.0, high_open=True)
    # eps = 0 would divide 0 by 0 on a zero gradient (and on moments quantized to 0)
    eps = check_float(eps, "eps", low=0.0, low_open=True)
    block_size = _check_int(block_size, "block_size")
    min_size = _check_int(min_size, "min_size", low=0)

    def small(x):
        return x.size < min_size

    def init_fn(params):
        def one(x, signed):
            z = jnp.zeros(x.shape, jnp.float32)
            return z if small(x) else quantize(z, signed=signed, block_size=block_size)
        return ScaleByAdam8bitState(jnp.zeros([], jnp.int32), jax.tree_util.tree_map(lambda x: one(x, True), params),
                                    jax.tree_util.tree_map(lambda x: one(x, False), params))

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_int32_increment(state.count)
        c = count.astype(jnp.float32)
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        is_q = lambda x: isinstance(x, Quantized)  # noqa: E731
        mus = jax.tree_util.tree_leaves(state.mu, is_leaf=is_q)
        nus = jax.tree_util.tree_leaves(state.nu, is_leaf=is_q)
        out, new_mu, new_nu = [], [], []
        for g, mq, vq in zip(leaves, mus, nus):
            q = not small(g)
            m = dequantize(mq, g.shape, signed=True) if q else mq
            v = dequantize(vq, g.shape, signed=False) if q else vq
            g32 = g.astype(jnp.float32)
            m = b1 * m + (1 - b1) * g32
            v = b2 * v + (1 - b2) * g32 * g32
            u = (m / (1 - b1 ** c)) / (jnp.sqrt(v / (1 - b2 ** c)) + eps)
            out.append(u.astype(g.dtype))
            new_mu.append(quantize(m, signed=True, block_size=block_size) if q else m)
            new_nu.append(quantize(v, signed=False, block_size=block_size) if q else v)
        un = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)  # noqa: E731
        return un(out), ScaleByAdam8bitState(count, un(new_mu), un(new_nu))

    return optax.GradientTransformation(init_fn, update_fn)
