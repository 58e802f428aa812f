"""Image quality metrics: PSNR and SSIM (Wang et al. 2004, *Image quality assessment: from error
visibility to structural similarity*, IEEE TIP).

``psnr = -10 log10(mean (a - b)^2)`` for images in ``[0, 1]``; identical images give ``+inf``
(the correct limit; no clamping), with a zero (not NaN) gradient.
``ssim``: Gaussian window (size 11, sigma 1.5), ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``, ``L = 1``,
valid filtering, per channel, averaged over pixels and channels (the convention of the NeRF /
TensoRF evaluation code)::

    SSIM = (2 mu_a mu_b + C1)(2 s_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2 + C2))

The local variances ``s_a^2, s_b^2`` are clamped at 0 (float cancellation of ``E[a^2] - mu^2`` can
make them slightly negative), so with ``k1, k2 > 0`` the denominator is ``>= C1 C2 > 0`` and SSIM
never is NaN (identical images give exactly 1). Inputs must be real arrays (not lists) of the same
shape; NaN/Inf in concrete images raise ``ValueError``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lrjax._validation import check_array, check_finite, check_float, check_int, is_concrete

_RANGE_TOL = 1e-5  # rounding of alpha compositing may overshoot 1 by a few ulps

__all__ = ["mse", "psnr", "ssim"]


def _check(a, b, images: bool = False):
    kind = "floating" if images else "numeric"
    check_array(a, "a", kind=kind)
    check_array(b, "b", kind=kind)
    check_finite(a, "a")
    check_finite(b, "b")
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError(f"images a and b are empty (shape {a.shape})")
    if images:  # the peak value is 1: images outside [0, 1] give a meaningless score
        for name, x in (("a", a), ("b", b)):
            if is_concrete(x):
                with jax.ensure_compile_time_eval():
                    lo, hi = float(jnp.min(x)), float(jnp.max(x))
                if lo < -_RANGE_TOL or hi > 1.0 + _RANGE_TOL:
                    raise ValueError(f"{name} must be an image with values in [0, 1] (peak 1), got values in "
                                     f"[{lo:.4g}, {hi:.4g}]; for 8-bit images divide by 255")
    return a, b


def mse(a, b):
    """Mean squared difference of two same-shaped arrays."""
    a, b = _check(a, b)
    return jnp.mean((a - b) ** 2)


def psnr(a, b):
    """Peak signal-to-noise ratio in dB of images in ``[0, 1]`` (any matching shapes).

    Identical images give ``+inf`` (``mse = 0``; documented, not clamped) with a zero gradient.
    Integer images (``uint8``) raise ``TypeError`` and concrete images with values outside ``[0, 1]``
    raise ``ValueError``: divide 8-bit images by 255 first."""
    a, b = _check(a, b, images=True)
    m = jnp.mean((a - b) ** 2)
    pos = m > 0
    return jnp.where(pos, -10.0 * jnp.log10(jnp.where(pos, m, 1.0)), jnp.inf)


def _gauss(size, sigma):
    x = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
    g = jnp.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def ssim(a, b, *, window: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03):
    """Mean SSIM of ``[..., H, W, C]`` float images in ``[0, 1]`` (leading axes averaged too; other
    ranges and integer images are refused as in :func:`psnr`).

    ``window``: odd-or-even int >= 1 (Gaussian window size); ``sigma``, ``k1``, ``k2``: finite > 0."""
    window = check_int(window, "window", low=1)
    sigma = check_float(sigma, "sigma", low=0.0, low_open=True)
    k1 = check_float(k1, "k1", low=0.0, low_open=True)
    k2 = check_float(k2, "k2", low=0.0, low_open=True)
    a, b = _check(a, b, images=True)
    if a.ndim < 3:
        raise ValueError(f"a and b must be images of shape [..., H, W, C], got {a.shape}")
    h, w = a.shape[-3:-1]
    if min(h, w) < window:
        raise ValueError(f"window={window}: images of {h}x{w} are smaller than the SSIM window {window}")
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
    s_aa = jnp.maximum(filt(a * a) - mu_a ** 2, 0.0)
    s_bb = jnp.maximum(filt(b * b) - mu_b ** 2, 0.0)
    s_ab = filt(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * s_ab + c2)
    den = (mu_a ** 2 + mu_b ** 2 + c1) * (s_aa + s_bb + c2)
    return jnp.mean(num / den)
