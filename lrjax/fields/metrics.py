"""Image quality metrics: PSNR and SSIM (Wang et al. 2004, *Image quality assessment: from error
visibility to structural similarity*, IEEE TIP).

``psnr = -10 log10(mean (a - b)^2)`` for images in ``[0, 1]``.
``ssim``: Gaussian window (size 11, sigma 1.5), ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``, ``L = 1``,
valid filtering, per channel, averaged over pixels and channels (the convention of the NeRF /
TensoRF evaluation code)::

    SSIM = (2 mu_a mu_b + C1)(2 s_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2 + C2))
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["mse", "psnr", "ssim"]


def _check(a, b):
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    if a.shape != b.shape:
        raise ValueError(f"images must have the same shape, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("images are empty")
    return a, b


def mse(a, b):
    a, b = _check(a, b)
    return jnp.mean((a - b) ** 2)


def psnr(a, b):
    """Peak signal-to-noise ratio in dB of images in ``[0, 1]`` (any matching shapes)."""
    return -10.0 * jnp.log10(jnp.maximum(mse(a, b), 1e-20))


def _gauss(size, sigma):
    x = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
    g = jnp.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def ssim(a, b, *, window: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03):
    """Mean SSIM of ``[..., H, W, C]`` images in ``[0, 1]`` (leading axes averaged too)."""
    a, b = _check(a, b)
    if a.ndim < 3:
        raise ValueError(f"images must have shape [..., H, W, C], got {a.shape}")
    h, w = a.shape[-3:-1]
    if min(h, w) < window:
        raise ValueError(f"images of {h}x{w} are smaller than the SSIM window {window}")
    g = _gauss(window, sigma)

    def filt(x):                                       # [..., H, W, C] -> valid separable blur
        x = jnp.moveaxis(x, -1, 0)                     # [C, ..., H, W]
        conv_w = jax.vmap(lambda r: jnp.convolve(r, g, mode="valid"))
        x = conv_w(x.reshape(-1, w)).reshape(*x.shape[:-1], w - window + 1)
        x = jnp.swapaxes(x, -1, -2)
        x = conv_w(x.reshape(-1, h)).reshape(*x.shape[:-1], h - window + 1)
        return jnp.swapaxes(x, -1, -2)

    c1, c2 = k1 ** 2, k2 ** 2
    mu_a, mu_b = filt(a), filt(b)
    s_aa = filt(a * a) - mu_a ** 2
    s_bb = filt(b * b) - mu_b ** 2
    s_ab = filt(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * s_ab + c2)
    den = (mu_a ** 2 + mu_b ** 2 + c1) * (s_aa + s_bb + c2)
    return jnp.mean(num / den)
