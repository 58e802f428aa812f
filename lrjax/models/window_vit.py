"""A tiny local-window attention ViT for hyperspectral pixel patches (Flax NNX), and the gated
"enhanced LoRA" linear layer of LoLA-SpecViT as an option.

Used by ``experiments/lola_specvit.py``. Like :mod:`lrjax.models.char_transformer` it is
deliberately plain: every weight matrix is an ``nnx.Linear`` kernel ``[in, out]`` named
``kernel`` and used once in an ``x @ W`` ``dot_general``, so :class:`lrjax.LoRA` targets it with
:data:`ADAPTER_TARGETS` and :func:`lrjax.factored` computes ``x W + s (x A) B``.

Architecture (pre-LayerNorm, GCViT-like alternation of local and global windows)::

    x: [B, P, P, bands]  (a P x P pixel patch of a hyperspectral cube, one token per pixel)
    h = embed(x) + pos_embed                     # nnx.Linear(bands -> d_model), pos [P, P, d]
    for block i (window w_i):  h = h + attn_i(ln1(h));  h = h + mlp_i(ln2(h))
    z = ln_f(h)[:, P // 2, P // 2]               # the centre pixel's token (pool="center") or the mean
    logits = head(z)                             # only when n_classes is given

* ``attn``: multi-head self-attention restricted to non-overlapping ``w x w`` windows of the
  ``P x P`` token grid (:func:`window_attention`; a window equal to the grid is global
  attention). ``q, k, v, o`` are bias-free ``nnx.Linear`` layers (or :class:`EnhancedLoRALinear`).
* ``mlp``: ``fc2(gelu(fc1(x)))`` with biases.

Leaf paths of ``nnx.state(model)``::

    embed/{kernel,bias}, pos_embed, blocks/{i}/ln1/{scale,bias}, blocks/{i}/attn/{q,k,v,o}/kernel,
    blocks/{i}/ln2/{scale,bias}, blocks/{i}/mlp/fc{1,2}/{kernel,bias}, ln_f/{scale,bias}, head/{kernel,bias}

With ``enhanced_rank=r`` the six projections are :class:`EnhancedLoRALinear` layers, which add
``lora_a``, ``lora_b``, ``gate`` and ``residual`` leaves beside the same ``kernel`` (and ``bias``),
so a plain model's state loads into an enhanced one leaf by leaf.

LoLA-SpecViT's "enhanced LoRA" (FadiZidiDz/LoLA-SpecViT-Model ``improved_GCPE.py::EnhancedLoRALinear``)
-----------------------------------------------------------------------------------------------------
In lrjax's ``[in, out]`` orientation (torch's ``y = W x`` is ``y = x W^T``):

.. math::  y = x W + b + \\sigma(x G) \\odot (s\\,(x A) B) + x R,\\qquad s = \\alpha / r,

with ``W [in, out]`` (and ``b``) the frozen base, ``A [in, r]``, ``B [r, out]`` the LoRA pair, and
``G, R [in, out]`` **full-rank trainable** matrices (bias-free). The official init is
``A, G, R ~ U(+-1/sqrt(in))`` (torch's ``kaiming_uniform_(a=sqrt(5))``), ``B = 0``, ``alpha = 2 r``
(32/16). So the layer is *not* parameter-efficient -- ``G`` and ``R`` have ``2 in out`` trainable
entries, twice the base kernel -- and, since ``R != 0`` at init, it does not start at the
pretrained function (``residual_init="zeros"`` is offered to start there). It is input-dependent
(the gate), so it cannot be merged into one kernel (only ``R`` can be folded into ``W``). lrjax's
LoLA-SpecViT method is plain :class:`lrjax.LoRA` on :data:`ADAPTER_TARGETS`; this layer is the
paper's option, with its parameter count stated wherever it is used.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrjax import _validation as V

__all__ = ["WindowViT", "WindowAttention", "WindowBlock", "EnhancedLoRALinear", "window_attention",
           "enhanced_lora_linear", "ADAPTER_TARGETS", "ENHANCED_TRAINABLE"]

#: lrjax ``targets`` selecting every attention projection and MLP kernel (not the embedding, the
#: LayerNorms, the biases or the head).
ADAPTER_TARGETS = (r"blocks/\d+/attn/(q|k|v|o)/kernel", r"blocks/\d+/mlp/(fc1|fc2)/kernel")

#: Leaf-path regex of the trainable parts of :class:`EnhancedLoRALinear` layers.
ENHANCED_TRAINABLE = r"blocks/\d+/(attn/(q|k|v|o)|mlp/(fc1|fc2))/(lora_a|lora_b|gate|residual)"


def _check_rngs(rngs):
    if not isinstance(rngs, nnx.Rngs):
        raise TypeError(f"rngs must be an nnx.Rngs (e.g. nnx.Rngs(0)), got {type(rngs).__name__}")


def _window_hw(window, name="window") -> tuple[int, int]:
    if isinstance(window, (tuple, list)):
        if len(window) != 2:
            raise ValueError(f"{name} must be an int or a pair (wh, ww), got {window!r}")
        return V.check_int(window[0], f"{name}[0]", low=1), V.check_int(window[1], f"{name}[1]", low=1)
    w = V.check_int(window, name, low=1)
    return w, w


# ----------------------------------------------------------------------------- pure functions
def window_attention(q, k, v, window):
    """Multi-head softmax attention inside non-overlapping windows of a 2-D token grid.

    For tokens on an ``H x W`` grid, token ``(i, j)`` attends to the tokens ``(i', j')`` of its own
    window (``i // wh == i' // wh`` and ``j // ww == j' // ww``):

    .. math::  o_{p} = \\sum_{p' \\in \\text{win}(p)} \\operatorname{softmax}_{p'}
               \\big(q_p \\cdot k_{p'} / \\sqrt{d_h}\\big)\\, v_{p'},

    i.e. dense attention over all ``H W`` tokens with a block mask (tested).

    Args:
      q, k, v: ``[B, H, W, heads, d_h]`` floating arrays of one shape.
      window: ``wh`` (square) or ``(wh, ww)``, ints ``>= 1`` dividing ``H`` and ``W``
        (``(H, W)`` = global attention).

    Returns:
      ``[B, H, W, heads, d_h]`` in ``q.dtype``; computed in ``promote_types(q, k, v, float32)`` and
      rounded once.

    Raises:
      TypeError: non-array or non-floating ``q``/``k``/``v``; a non-int window.
      ValueError: not 5-D, shapes that differ (naming ``k``/``v``), a window that does not divide the
        grid (naming ``window``).
    """
    q = V.check_array(q, "q", ndim=5, kind="floating")
    k = V.check_array(k, "k", ndim=5, kind="floating")
    v = V.check_array(v, "v", ndim=5, kind="floating")
    for name, x in (("k", k), ("v", v)):
        if tuple(x.shape) != tuple(q.shape):
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)} ([B, H, W, heads, d_h]), "
                             f"got {tuple(x.shape)}")
    wh, ww = _window_hw(window)
    b, h, w, nh, dh = q.shape
    if h % wh or w % ww:
        raise ValueError(f"window=({wh}, {ww}) must divide the token grid (H, W) = ({h}, {w}); "
                         "pick a window size that divides the patch size")
    cd = V.compute_dtype(q.dtype, k.dtype, v.dtype)

    def part(x):  # [B, H, W, nh, dh] -> [B, nWh, nWw, wh*ww, nh, dh]
        x = x.astype(cd).reshape(b, h // wh, wh, w // ww, ww, nh, dh)
        return x.transpose(0, 1, 3, 2, 4, 5, 6).reshape(b, h // wh, w // ww, wh * ww, nh, dh)

    qw, kw, vw = part(q), part(k), part(v)
    scores = jnp.einsum("bxyphd,bxyqhd->bxyhpq", qw, kw) / math.sqrt(dh)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bxyhpq,bxyqhd->bxyphd", probs, vw)
    out = out.reshape(b, h // wh, w // ww, wh, ww, nh, dh).transpose(0, 1, 3, 2, 4, 5, 6)
    return out.reshape(b, h, w, nh, dh).astype(q.dtype)


def enhanced_lora_linear(x, kernel, bias, lora_a, lora_b, gate, residual, scale):
    """LoLA-SpecViT's gated enhanced LoRA: ``y = x W + b + sigmoid(x G) * (s (x A) B) + x R``.

    Args:
      x: ``[..., in]`` floating.
      kernel: ``W [in, out]``; bias: ``b [out]`` or ``None``.
      lora_a: ``A [in, r]``; lora_b: ``B [r, out]``.
      gate: ``G [in, out]`` or ``None`` (no gate: the LoRA term enters ungated);
      residual: ``R [in, out]`` or ``None`` (no residual term).
      scale: ``s`` (``alpha / r``), a real number.

    Returns:
      ``[..., out]`` in ``x.dtype``; computed in ``promote_types(x, W, ..., float32)`` and rounded
      once. ``gate=residual=None`` is plain LoRA ``x (W + s A B) + b``.

    Raises:
      TypeError / ValueError naming the argument for non-arrays or shapes that do not fit ``[in, out]``.
    """
    x = V.check_array(x, "x", min_ndim=1, kind="floating")
    kernel = V.check_array(kernel, "kernel", ndim=2, kind="floating")
    n_in, n_out = kernel.shape
    if x.shape[-1] != n_in:
        raise ValueError(f"x must have a trailing axis of size in = {n_in} (kernel [in, out] = {tuple(kernel.shape)}), "
                         f"got shape {tuple(x.shape)}")
    lora_a = V.check_array(lora_a, "lora_a", ndim=2, kind="floating")
    if lora_a.shape[0] != n_in:
        raise ValueError(f"lora_a must be [in, r] = [{n_in}, r], got {tuple(lora_a.shape)}")
    lora_b = V.check_array(lora_b, "lora_b", ndim=2, kind="floating")
    if tuple(lora_b.shape) != (lora_a.shape[1], n_out):
        raise ValueError(f"lora_b must be [r, out] = {(lora_a.shape[1], n_out)}, got {tuple(lora_b.shape)}")
    extras = []
    if bias is not None:
        bias = V.check_array(bias, "bias", ndim=1, kind="floating")
        if bias.shape[0] != n_out:
            raise ValueError(f"bias must be [out] = [{n_out}], got {tuple(bias.shape)}")
        extras.append(bias)
    for name, m in (("gate", gate), ("residual", residual)):
        if m is not None:
            m = V.check_array(m, name, ndim=2, kind="floating")
            if tuple(m.shape) != (n_in, n_out):
                raise ValueError(f"{name} must be [in, out] = {(n_in, n_out)} (full rank), got {tuple(m.shape)}")
            extras.append(m)
    scale = V.check_float(scale, "scale") if not isinstance(scale, jax.core.Tracer) else scale
    cd = V.compute_dtype(x.dtype, kernel.dtype, lora_a.dtype, lora_b.dtype, *(e.dtype for e in extras))
    xc = x.astype(cd)
    lora = scale * ((xc @ lora_a.astype(cd)) @ lora_b.astype(cd))
    y = xc @ kernel.astype(cd)
    if bias is not None:
        y = y + bias.astype(cd)
    if gate is not None:
        lora = jax.nn.sigmoid(xc @ gate.astype(cd)) * lora
    y = y + lora
    if residual is not None:
        y = y + xc @ residual.astype(cd)
    return y.astype(x.dtype)


# ------------------------------------------------------------------------------------- layers
class EnhancedLoRALinear(nnx.Module):
    """LoLA-SpecViT's gated enhanced LoRA linear layer (see the module docstring and
    :func:`enhanced_lora_linear`).

    Args:
      in_features, out_features: ints ``>= 1``.
      rank: ``r``, an int with ``1 <= r <= min(in, out)``.
      alpha: ``> 0`` finite float or ``None`` (default ``2 r``, the paper's 32/16); ``s = alpha / r``.
      use_bias: whether the base has a bias (default ``False``).
      gated: include ``G`` and ``R`` (default ``True``; ``False`` is plain LoRA).
      residual_init: ``"kaiming"`` (official: ``U(+-1/sqrt(in))``, changes the output at init) or
        ``"zeros"`` (starts at the base function).
      rngs: ``nnx.Rngs``.

    Parameters (``nnx.Param``): ``kernel [in, out]`` (base, normal(0.02) before loading pretrained
    weights), ``bias [out]`` (if ``use_bias``), ``lora_a [in, r]``, ``lora_b [r, out]`` (zeros),
    ``gate [in, out]``, ``residual [in, out]``. Trainable parts: ``r (in + out) + 2 in out``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float | None = None, *,
                 use_bias: bool = False, gated: bool = True, residual_init: str = "kaiming", rngs: nnx.Rngs):
        n_in = V.check_int(in_features, "in_features", low=1)
        n_out = V.check_int(out_features, "out_features", low=1)
        rank = V.check_rank(rank, n_in, n_out, "rank", where="EnhancedLoRALinear")
        alpha = V.check_float(alpha, "alpha", low=0.0, low_open=True, allow_none=True)
        use_bias = V.check_bool(use_bias, "use_bias")
        gated = V.check_bool(gated, "gated")
        residual_init = V.check_choice(residual_init, "residual_init", ("kaiming", "zeros"))
        _check_rngs(rngs)
        self.in_features, self.out_features, self.rank = n_in, n_out, rank
        self.scale = (2.0 * rank if alpha is None else alpha) / rank
        bound = 1.0 / math.sqrt(n_in)
        uni = nnx.initializers.uniform(2 * bound)

        def u(shape):
            return nnx.Param(uni(rngs.params(), shape, jnp.float32) - bound)

        self.kernel = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (n_in, n_out), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((n_out,), jnp.float32)) if use_bias else None
        self.lora_a = u((n_in, rank))
        self.lora_b = nnx.Param(jnp.zeros((rank, n_out), jnp.float32))
        self.gate = u((n_in, n_out)) if gated else None
        if gated:
            self.residual = u((n_in, n_out)) if residual_init == "kaiming" else \
                nnx.Param(jnp.zeros((n_in, n_out), jnp.float32))
        else:
            self.residual = None

    def __call__(self, x):
        get = lambda p: None if p is None else p[...]  # noqa: E731
        return enhanced_lora_linear(x, self.kernel[...], get(self.bias), self.lora_a[...], self.lora_b[...],
                                    get(self.gate), get(self.residual), self.scale)


def _linear(n_in, n_out, *, use_bias, enhanced, rngs):
    if enhanced is None:
        return nnx.Linear(n_in, n_out, use_bias=use_bias, kernel_init=nnx.initializers.normal(0.02), rngs=rngs)
    rank, alpha, residual_init = enhanced
    return EnhancedLoRALinear(n_in, n_out, rank, alpha, use_bias=use_bias, residual_init=residual_init, rngs=rngs)


class WindowAttention(nnx.Module):
    """Multi-head self-attention in ``window x window`` windows of a token grid ``[B, H, W, d]``."""

    def __init__(self, d_model: int, n_heads: int, window, *, enhanced=None, rngs: nnx.Rngs):
        d_model = V.check_int(d_model, "d_model", low=1)
        n_heads = V.check_int(n_heads, "n_heads", low=1)
        self.window = _window_hw(window)
        _check_rngs(rngs)
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        kw = dict(use_bias=False, enhanced=enhanced, rngs=rngs)
        self.q = _linear(d_model, d_model, **kw)
        self.k = _linear(d_model, d_model, **kw)
        self.v = _linear(d_model, d_model, **kw)
        self.o = _linear(d_model, d_model, **kw)

    def __call__(self, x):
        """``x: [B, H, W, d_model]`` -> ``[B, H, W, d_model]``."""
        b, h, w, d = x.shape
        sh = (b, h, w, self.n_heads, self.head_dim)
        out = window_attention(self.q(x).reshape(sh), self.k(x).reshape(sh), self.v(x).reshape(sh), self.window)
        return self.o(out.reshape(b, h, w, d))


class WindowBlock(nnx.Module):
    """Pre-LN block: ``x + attn(ln1(x))`` then ``x + fc2(gelu(fc1(ln2(x))))``."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, window, *, enhanced=None, rngs: nnx.Rngs):
        d_model = V.check_int(d_model, "d_model", low=1)
        d_ff = V.check_int(d_ff, "d_ff", low=1)
        _check_rngs(rngs)
        self.ln1 = nnx.LayerNorm(d_model, rngs=rngs)
        self.attn = WindowAttention(d_model, n_heads, window, enhanced=enhanced, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d_model, rngs=rngs)
        self.mlp = _MLP(d_model, d_ff, enhanced=enhanced, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class _MLP(nnx.Module):
    def __init__(self, d_model, d_ff, *, enhanced, rngs):
        self.fc1 = _linear(d_model, d_ff, use_bias=True, enhanced=enhanced, rngs=rngs)
        self.fc2 = _linear(d_ff, d_model, use_bias=True, enhanced=enhanced, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x)))


class WindowViT(nnx.Module):
    """Tiny local-window ViT over ``P x P`` hyperspectral pixel patches (see the module docstring).

    Args:
      bands: spectral bands per pixel (input channels), int ``>= 1``.
      patch: ``P``, the patch side (tokens per side), int ``>= 1``.
      d_model, n_heads, d_ff: widths (``d_model % n_heads == 0``).
      windows: one window size per block (ints dividing ``P``); ``len(windows)`` is the depth.
        Default ``(3, 9)`` for ``P = 9``: a local 3 x 3 block then a global one.
      n_classes: ``None`` (default; the model returns the pooled ``[B, d_model]`` features) or an
        int ``>= 1`` (adds ``head`` and returns logits).
      pool: ``"center"`` (the centre pixel's token, default) or ``"mean"`` (all tokens).
      enhanced_rank: ``None`` (plain ``nnx.Linear`` projections, default) or the rank ``r`` of
        :class:`EnhancedLoRALinear` projections (the paper's gated option).
      enhanced_alpha: their ``alpha`` (default ``2 r``); enhanced_residual_init: ``"kaiming"`` or ``"zeros"``.
      rngs: ``nnx.Rngs``.

    Call: ``x [B, P, P, bands]`` floating -> ``[B, d_model]`` features or ``[B, n_classes]`` logits.
    """

    def __init__(self, bands: int, patch: int = 9, d_model: int = 32, n_heads: int = 2, d_ff: int = 64,
                 windows=(3, 9), n_classes: int | None = None, pool: str = "center",
                 enhanced_rank: int | None = None, enhanced_alpha: float | None = None,
                 enhanced_residual_init: str = "kaiming", *, rngs: nnx.Rngs):
        self.bands = V.check_int(bands, "bands", low=1)
        self.patch = V.check_int(patch, "patch", low=1)
        d_model = V.check_int(d_model, "d_model", low=1)
        n_heads = V.check_int(n_heads, "n_heads", low=1)
        d_ff = V.check_int(d_ff, "d_ff", low=1)
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        if isinstance(windows, (int, np.integer)) and not isinstance(windows, bool):
            windows = (int(windows),)
        if not isinstance(windows, (tuple, list)) or not windows:
            raise TypeError(f"windows must be a non-empty tuple of window sizes (one per block), got {windows!r}")
        wins = []
        for i, w in enumerate(windows):
            wh, ww = _window_hw(w, f"windows[{i}]")
            if self.patch % wh or self.patch % ww:
                raise ValueError(f"windows[{i}]={w!r} must divide patch={self.patch}")
            wins.append((wh, ww))
        if n_classes is not None:
            n_classes = V.check_int(n_classes, "n_classes", low=1)
        self.pool = V.check_choice(pool, "pool", ("center", "mean"))
        enhanced = None
        if enhanced_rank is not None:
            enhanced_rank = V.check_int(enhanced_rank, "enhanced_rank", low=1)
            V.check_rank(enhanced_rank, d_model, min(d_model, d_ff), "enhanced_rank", where="WindowViT projections")
            enhanced = (enhanced_rank, enhanced_alpha,
                        V.check_choice(enhanced_residual_init, "enhanced_residual_init", ("kaiming", "zeros")))
        _check_rngs(rngs)
        self.d_model, self.n_classes = d_model, n_classes
        self.embed = nnx.Linear(self.bands, d_model, kernel_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.pos_embed = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (self.patch, self.patch, d_model)))
        self.blocks = nnx.List([WindowBlock(d_model, n_heads, d_ff, w, enhanced=enhanced, rngs=rngs) for w in wins])
        self.ln_f = nnx.LayerNorm(d_model, rngs=rngs)
        self.head = (nnx.Linear(d_model, n_classes, kernel_init=nnx.initializers.normal(0.02), rngs=rngs)
                     if n_classes is not None else None)

    def __call__(self, x):
        x = V.check_array(x, "x", ndim=4, kind="floating")
        if tuple(x.shape[1:]) != (self.patch, self.patch, self.bands):
            raise ValueError(f"x must have shape [B, P, P, bands] = [B, {self.patch}, {self.patch}, {self.bands}], "
                             f"got {tuple(x.shape)}")
        h = self.embed(x) + self.pos_embed[...]
        for blk in self.blocks:
            h = blk(h)
        h = self.ln_f(h)
        c = self.patch // 2
        z = h[:, c, c] if self.pool == "center" else jnp.mean(h, axis=(1, 2))
        return z if self.head is None else self.head(z)
