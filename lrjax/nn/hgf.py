"""HGF: a BitNet b1.58 ternary backbone with a gated low-rank float correction.

Hybrid Gated Flow (Trejo Pizzo, 2026, *Hybrid Gated Flow (HGF): Stabilizing 1.58-bit LLMs via
Selective Low-Rank Correction*, arXiv:2602.05269; paper only, no official code). Per projection,
for ``x: [..., M]``, a latent float weight ``W: [M, N]`` (lrjax's ``[in, out]`` matrix view) and
low-rank factors ``A: [M, r]``, ``B: [r, N]``::

    y = BitLinear(x; W) + g * (x A) B
    BitLinear(x; W) = Q_a(x) Q_w(W)                       (BitNet b1.58)

The correction path runs on the *unquantized* ``x`` in float (the paper's "FP16 correction
path"); ``g`` is one learned scalar per projection.

Quantizers (BitNet b1.58, Ma et al. 2024, arXiv:2402.17764, and its training-tips code)
----------------------------------------------------------------------------------------
* weights, absmean ternary (:func:`ternary_quantize`, :func:`ternary_codes`)::

      gamma = mean |W|            (over the whole [M, N] matrix; per matrix of a [*batch, M, N] stack)
      C     = clip(round(W / (gamma + eps)), -1, 1)      in {-1, 0, 1}   (int8 codes)
      Q_w(W) = C * gamma

  ``eps = 1e-5``. An all-zero ``W`` has ``gamma = 0``, ``C = 0`` and ``Q_w(W) = 0`` (no NaN); an
  empty ``[0, N]`` / ``[M, 0]`` matrix has ``gamma = 0``.
  ``round`` is round-half-to-even (``jnp.round``; torch's ``round`` is the same). The division by
  ``gamma + eps`` is the b1.58 paper's equation; the training-tips code divides by
  ``max(gamma, eps)`` and dequantizes by the same clamped value -- the two differ only for
  ``gamma`` of order ``eps``.
* activations, per-token absmax int8 (:func:`activation_quantize`, :func:`activation_codes`)::

      s    = 127 / max(max_k |x_k|, eps)                 (per token: over the last axis)
      c    = clip(round(x s), -128, 127)                 (int8 codes)
      Q_a(x) = c / s

  An all-zero token row gives ``c = 0`` and ``Q_a(x) = 0`` (no NaN); a zero-size feature axis
  (``M = 0``) gives the empty result (``s = 127 / eps``).
* straight-through estimator (:func:`ste`): the forward value is ``q(w)``, the gradient is the
  identity, ``d ste(w) / dw = I``. Written ``q(w) + (w - stop_gradient(w))`` rather than the
  literal ``w + stop_gradient(q(w) - w)``: the same gradient, but the forward value is ``q(w)``
  bit for bit (the literal form can be one ulp off, which would break the exact gate-0 identity).

The gate and its warmup ([ours] where the paper is silent)
----------------------------------------------------------
The paper describes gate dynamics (warmup, regularization, freeze) and reports a typical
equilibrium ``g ~ 0.1``; the equations for them were not available to us (only the abstract is in
the seed, and the note records the rest as "paper describes"). Our choices, marked [ours]:

* ``g`` is a raw learned scalar (no sigmoid), initialized at ``gate_init = 0.1`` (the reported
  equilibrium);
* warmup multiplies it by a schedule value ``w(t)``: the forward uses ``g_eff = w(t) g`` with
  ``w = gate_warmup(warmup_steps)(step)``, an optax schedule (``optax.linear_schedule`` from 0 to
  1 over ``warmup_steps``; ``optax.constant_schedule(1.0)`` when ``warmup_steps = 0``). ``w(t)`` is
  not trained (a frozen factor / a non-``Param`` variable);
* regularization and freezing are left to the optimizer (e.g. weight decay on ``g``, or
  ``optax.set_to_zero`` for ``g`` after a step) -- not built in.
* ``A ~ U(-1/sqrt(M), 1/sqrt(M))``, ``B = 0`` (LoRA's init), so at init HGF equals BitLinear for
  any ``g``; no RMSNorm inside the layer (BitNet's SubLN): put ``nnx.RMSNorm`` before the layer
  where the model does not already normalize its input.

With ``g_eff = 0`` the HGF forward equals the pure ternary layer exactly (both are computed in
``promote_types(x, W, float32)`` and rounded once; ``y + 0 * z == y``).

Inference form (packed)
-----------------------
:func:`pack_hgf` stores ``C`` 2 bits per weight, 4 per ``uint8`` (:func:`pack_ternary`, code
``C + 1`` in bits ``2i .. 2i+1`` of byte ``i // 4`` along the output axis), ``gamma`` (float32), the
low-rank factors in their own dtype and ``g_eff`` (float32). :func:`packed_forward` computes
``(c_x C)`` with int8 operands and **int32 accumulation** (exact for ``M <= 2^31 / 127``), then
``y = acc * gamma / s + g_eff (x A) B`` in float32 -- equal to the training forward to float
rounding. :func:`weight_bytes` counts the stored bytes; against ``4 M N`` bytes of a float32 weight
the ratio is ``(ceil(N/4) M + 4 + r (M + N) bytes(A) + 4) / (4 M N)``, at most 1/4 when
``r <= 0.1875 M N / (M + N)`` with float32 factors (``r <= 12`` for a 128 x 128 projection; the char
transformer's 128 x 128 projections at rank 8: 0.188, its 128 x 512 MLP at rank 8: 0.117).

Everything here is a pure function of arrays (jit / grad / vmap); :class:`BitLinear` and
:class:`HGFLinear` are Flax NNX layers on top. :class:`lrjax.reparam.hgf.HGF` applies the same math
to every targeted kernel of an existing params pytree.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax

from lrjax import _validation as V

__all__ = ["EPS", "ternary_codes", "ternary_quantize", "activation_codes", "activation_quantize", "ste",
           "bitlinear", "hgf_forward", "gate_warmup", "pack_ternary", "unpack_ternary", "PackedHGF", "pack_hgf",
           "packed_forward", "weight_bytes", "float32_weight_bytes", "GateScale", "BitLinear", "HGFLinear",
           "set_gate_scale", "check_step"]

#: BitNet's epsilon (weights: ``gamma + eps``; activations: ``max(|x|, eps)``)
EPS = 1e-5


# --------------------------------------------------------------------------------- validation
def _float_array(x, name):
    x = V.check_array(x, name)
    if x.dtype == jnp.bool_ or not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}; cast with .astype(jnp.float32)")
    return x


def _eps(eps):
    return V.check_float(eps, "eps", low=0.0, low_open=True)


def _matrix(w, name="w"):
    w = _float_array(w, name)
    if w.ndim < 2:
        raise ValueError(f"{name} must be a matrix [M, N] (or a stack [*batch, M, N]), got shape {tuple(w.shape)}")
    return w


def _check_gate(g, name="g"):
    """A Python number or a float array (scalar or per-matrix); refuses bool and concrete NaN/Inf."""
    if isinstance(g, (bool, np.bool_)):
        raise TypeError(f"{name} must be a real number or a float array, got {g!r} (bool)")
    if isinstance(g, (int, float, np.integer, np.floating)):
        V.check_float(g, name)
        return g
    g = _float_array(g, name)
    V.check_finite(g, name)
    return g


# --------------------------------------------------------------------------------- quantizers
def ternary_codes(w, *, eps: float = EPS):
    """Absmean ternary codes of ``w: [*batch, M, N]``: ``(C int8 [*batch, M, N], gamma float32 [*batch])``
    with ``gamma = mean |W|`` per matrix and ``C = clip(round(W / (gamma + eps)), -1, 1)``.

    Computed in ``promote_types(w, float32)``. Raises TypeError for a non-floating ``w`` (bool,
    int), ValueError for ``ndim < 2`` or ``eps <= 0``."""
    w = _matrix(w)
    eps = _eps(eps)
    return _ternary_codes(w, eps)


@functools.partial(jax.jit, static_argnums=1)
def _ternary_codes(w, eps):
    cd = V.compute_dtype(w.dtype)
    wc = w.astype(cd)
    gamma = _absmean(wc, keepdims=False)
    c = jnp.clip(jnp.round(wc / (gamma[..., None, None] + eps)), -1, 1)
    return c.astype(jnp.int8), gamma.astype(jnp.float32)


def _absmean(wc, keepdims):
    """``gamma = mean |W|`` per matrix; 0 (not NaN) for an empty ``[0, N]`` / ``[M, 0]`` matrix."""
    if wc.shape[-2] * wc.shape[-1] == 0:
        return jnp.zeros(wc.shape[:-2] + ((1, 1) if keepdims else ()), wc.dtype)
    return jnp.mean(jnp.abs(wc), axis=(-2, -1), keepdims=keepdims)


def _ternary_value(w, eps):
    """``C * gamma`` in the compute dtype (unrounded)."""
    cd = V.compute_dtype(w.dtype)
    wc = w.astype(cd)
    gamma = _absmean(wc, keepdims=True)
    return jnp.clip(jnp.round(wc / (gamma + eps)), -1, 1) * gamma


def ternary_quantize(w, *, eps: float = EPS):
    """``Q_w(W) = C * gamma`` (the dequantized ternary weight; values in ``{-1, 0, 1} * gamma``) with
    the dtype of ``w``; no gradient (see :func:`ste`). ``w: [*batch, M, N]`` floating."""
    w = _matrix(w)
    return _ternary_value(w, _eps(eps)).astype(w.dtype)


def activation_codes(x, *, eps: float = EPS):
    """Per-token absmax int8 codes of ``x: [..., M]``: ``(c int8 [..., M], s float32 [..., 1])`` with
    ``s = 127 / max(max|x|, eps)`` over the last axis and ``c = clip(round(x s), -128, 127)``, so
    ``Q_a(x) = c / s``. Raises TypeError for a non-floating ``x``, ValueError for a 0-d ``x``."""
    x = _float_array(x, "x")
    if x.ndim < 1:
        raise ValueError("x must have a feature axis [..., M], got a scalar")
    return _activation_codes(x, _eps(eps))


@functools.partial(jax.jit, static_argnums=1)
def _activation_codes(x, eps):
    xc = x.astype(V.compute_dtype(x.dtype))
    s = 127.0 / jnp.maximum(jnp.max(jnp.abs(xc), axis=-1, keepdims=True, initial=0.0), eps)
    c = jnp.clip(jnp.round(xc * s), -128, 127)
    return c.astype(jnp.int8), s.astype(jnp.float32)


def _activation_value(x, eps):
    xc = x.astype(V.compute_dtype(x.dtype))
    s = 127.0 / jnp.maximum(jnp.max(jnp.abs(xc), axis=-1, keepdims=True, initial=0.0), eps)
    return jnp.clip(jnp.round(xc * s), -128, 127) / s


def activation_quantize(x, *, eps: float = EPS):
    """``Q_a(x) = c / s`` (per-token absmax int8, dequantized) with the dtype of ``x``; no gradient."""
    x = _float_array(x, "x")
    if x.ndim < 1:
        raise ValueError("x must have a feature axis [..., M], got a scalar")
    return _activation_value(x, _eps(eps)).astype(x.dtype)


def ste(x, quantize):
    """Straight-through estimator: forward ``quantize(x)`` (bit for bit), gradient the identity.

    ``quantize`` is a callable (e.g. :func:`ternary_quantize`, :func:`activation_quantize` or a
    ``functools.partial`` of them); computed as ``q + (x - stop_gradient(x))`` with ``q =
    stop_gradient(quantize(x))``, in ``x``'s dtype."""
    if not callable(quantize):
        raise TypeError(f"quantize must be a callable such as lrjax.nn.hgf.ternary_quantize, got "
                        f"{type(quantize).__name__}")
    x = _float_array(x, "x")
    q = lax.stop_gradient(quantize(x)).astype(x.dtype)
    return q + (x - lax.stop_gradient(x))


def _ste_value(x, q):
    """STE in the compute dtype: value ``q`` exactly, gradient identity into ``x``."""
    return lax.stop_gradient(q) + (x - lax.stop_gradient(x))


# --------------------------------------------------------------------------------- forwards
def _out_dtype(*arrs):
    return jnp.result_type(*(a.dtype for a in arrs))


def _bitlinear_cd(x, w, eps, quantize_activations):
    """BitLinear ``Q_a(x) Q_w(W)`` with STE on both, in the compute dtype (unrounded)."""
    cd = V.compute_dtype(x.dtype, w.dtype)
    wc, xc = w.astype(cd), x.astype(cd)
    wq = _ste_value(wc, _ternary_value(wc, eps))
    xq = _ste_value(xc, _activation_value(xc, eps)) if quantize_activations else xc
    return jnp.matmul(xq, wq, precision=lax.Precision.HIGHEST)


def _lowrank_cd(x, a, b, cd):
    return jnp.matmul(jnp.matmul(x.astype(cd), a.astype(cd), precision=lax.Precision.HIGHEST), b.astype(cd),
                      precision=lax.Precision.HIGHEST)


def _check_x_w(x, w):
    x = _float_array(x, "x")
    w = _float_array(w, "w")
    if w.ndim != 2:
        raise ValueError(f"w must be a matrix [M, N], got shape {tuple(w.shape)}")
    if x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"x must have shape [..., {w.shape[0]}] (w's input size M), got {tuple(x.shape)}")
    return x, w


def bitlinear(x, w, *, eps: float = EPS, quantize_activations: bool = True):
    """BitNet b1.58 linear: ``y = Q_a(x) Q_w(W)`` with the STE on both quantizers (gradients reach
    ``x`` and the latent float ``W`` as if unquantized).

    ``x: [..., M]``, ``w: [M, N]`` floating; returns ``[..., N]`` in ``result_type(x, w)``, computed in
    ``promote_types(x, w, float32)`` and rounded once. ``quantize_activations=False`` keeps ``x``
    in float (a weight-only ternary layer). Raises TypeError (non-floating ``x``/``w``, non-bool
    flag) / ValueError (shapes, ``eps <= 0``)."""
    x, w = _check_x_w(x, w)
    V.check_bool(quantize_activations, "quantize_activations")
    return _bitlinear_cd(x, w, _eps(eps), quantize_activations).astype(_out_dtype(x, w))


def _check_ab(a, b, m, n):
    a = _float_array(a, "a")
    b = _float_array(b, "b")
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != m or b.shape[1] != n or a.shape[1] != b.shape[0]:
        raise ValueError(f"a and b must be [M={m}, r] and [r, N={n}], got a{tuple(a.shape)} b{tuple(b.shape)}")
    V.check_rank(a.shape[1], m, n, "rank", where="a, b")
    return a, b


def hgf_forward(x, w, a, b, g, *, eps: float = EPS, quantize_activations: bool = True):
    """HGF: ``y = Q_a(x) Q_w(W) + g (x A) B`` (STE on the quantizers; the correction on float ``x``).

    ``x: [..., M]``, ``w: [M, N]``, ``a: [M, r]``, ``b: [r, N]`` floating (``1 <= r <= min(M, N)``),
    ``g`` the effective gate (a number or a float scalar array; pass ``warmup * g`` during gate
    warmup). Returns ``[..., N]`` in ``result_type(x, w)``, computed in ``promote_types(x, w, a, b,
    float32)`` and rounded once; with ``g = 0`` it equals :func:`bitlinear` exactly. Raises
    TypeError (non-floating arrays, a bool gate) / ValueError (shapes, rank > min(M, N), a
    non-finite gate)."""
    x, w = _check_x_w(x, w)
    a, b = _check_ab(a, b, w.shape[0], w.shape[1])
    g = _check_gate(g)
    if jnp.ndim(g):
        raise ValueError(f"g must be a scalar gate (one per projection; pass warmup * g), got shape "
                         f"{tuple(jnp.shape(g))}")
    V.check_bool(quantize_activations, "quantize_activations")
    return _hgf_cd(x, w, a, b, g, _eps(eps), quantize_activations).astype(_out_dtype(x, w))


def _hgf_cd(x, w, a, b, g, eps, quantize_activations):
    y = _bitlinear_cd(x, w, eps, quantize_activations)
    cd = V.compute_dtype(y.dtype, a.dtype, b.dtype)
    return y.astype(cd) + jnp.asarray(g, cd) * _lowrank_cd(x, a, b, cd)


def gate_warmup(warmup_steps: int) -> optax.Schedule:
    """The gate warmup multiplier ``w(step)`` [ours]: ``optax.linear_schedule(0.0, 1.0, warmup_steps)``
    (0 at step 0, 1 from ``warmup_steps`` on), or ``optax.constant_schedule(1.0)`` for
    ``warmup_steps = 0``. Multiply the learned gate by it: ``g_eff = w(step) * g``."""
    warmup_steps = V.check_int(warmup_steps, "warmup_steps", low=0)
    if warmup_steps == 0:
        return optax.constant_schedule(1.0)
    return optax.linear_schedule(0.0, 1.0, warmup_steps)


# --------------------------------------------------------------------------------- packing
def pack_ternary(codes):
    """Pack ternary codes ``[..., N]`` (integer dtype, values in ``{-1, 0, 1}``) 4 per byte along the
    last axis: ``uint8 [..., ceil(N / 4)]``, code ``c + 1`` of element ``j`` in bits ``2 (j % 4)`` and
    ``2 (j % 4) + 1`` of byte ``j // 4`` (the padding of the last byte is code 0 -> value 0 is never
    read back). Inverse: :func:`unpack_ternary` (exact). Raises TypeError for a non-integer or bool
    ``codes``, ValueError for a 0-d array or (concrete) values outside ``{-1, 0, 1}``."""
    codes = V.check_array(codes, "codes")
    if codes.dtype == jnp.bool_ or not jnp.issubdtype(codes.dtype, jnp.integer):
        raise TypeError(f"codes must be an integer array (int8 ternary codes from ternary_codes), got dtype "
                        f"{codes.dtype}")
    if codes.ndim < 1:
        raise ValueError("codes must have at least one axis, got a scalar")
    if V.is_concrete(codes) and codes.size:
        with jax.ensure_compile_time_eval():
            lo, hi = int(jnp.min(codes)), int(jnp.max(codes))
        if lo < -1 or hi > 1:
            raise ValueError(f"codes must lie in {{-1, 0, 1}}, got range [{lo}, {hi}]")
    return _pack(codes)


@jax.jit
def _pack(codes):
    n = codes.shape[-1]
    nb = -(-n // 4)
    u = (codes.astype(jnp.int32) + 1).astype(jnp.uint8)
    u = jnp.pad(u, [(0, 0)] * (codes.ndim - 1) + [(0, 4 * nb - n)])
    u = u.reshape(codes.shape[:-1] + (nb, 4))
    shifts = jnp.arange(4, dtype=jnp.uint8) * 2
    return _or4(u << shifts)


def _or4(v):
    return v[..., 0] | v[..., 1] | v[..., 2] | v[..., 3]


def unpack_ternary(packed, n: int):
    """Inverse of :func:`pack_ternary`: ``uint8 [..., ceil(n / 4)]`` -> ``int8 [..., n]`` in ``{-1, 0, 1}``.
    Raises TypeError (non-``uint8`` ``packed``; ``n`` not an int), ValueError (``n`` does not fit
    the packed length)."""
    packed = V.check_array(packed, "packed")
    if packed.dtype != jnp.uint8:
        raise TypeError(f"packed must be a uint8 array from pack_ternary, got dtype {packed.dtype}")
    n = V.check_int(n, "n", low=1)
    if packed.ndim < 1 or packed.shape[-1] != -(-n // 4):
        raise ValueError(f"n={n} needs {-(-n // 4)} bytes per row, but packed has shape {tuple(packed.shape)}; pass "
                         "the N the codes had")
    return _unpack(packed, n)


@functools.partial(jax.jit, static_argnums=1)
def _unpack(packed, n):
    shifts = jnp.arange(4, dtype=jnp.uint8) * 2
    u = (packed[..., None] >> shifts) & jnp.uint8(3)
    u = u.reshape(packed.shape[:-1] + (4 * packed.shape[-1],))[..., :n]
    return (u.astype(jnp.int8) - jnp.int8(1)).astype(jnp.int8)


class PackedHGF(NamedTuple):
    """The inference form of one HGF (or pure ternary) projection ``[M, N]``: ``packed uint8 [M,
    ceil(N/4)]`` (:func:`pack_ternary` of ``C``), ``gamma float32 []``, ``a [M, r]``, ``b [r, N]`` and
    ``g float32 []`` (the effective gate ``w(t) g``) or ``None`` for pure ternary, ``n`` the output
    size, ``eps`` and ``quantize_activations`` as in training."""

    packed: jax.Array
    gamma: jax.Array
    a: jax.Array | None
    b: jax.Array | None
    g: jax.Array | None
    n: int
    eps: float = EPS
    quantize_activations: bool = True


def pack_hgf(w, a=None, b=None, g=None, *, eps: float = EPS, quantize_activations: bool = True) -> PackedHGF:
    """Quantize and pack a trained latent weight ``w: [M, N]`` (and, for HGF, its ``a``, ``b`` and
    effective gate ``g``; all three or none). Gradients are stopped (an inference artifact).

    Raises TypeError (non-floating arrays, a bool gate, non-bool ``quantize_activations``) /
    ValueError (a stacked ``w``, shapes, rank > min(M, N), a non-scalar ``g``, and -- for concrete
    arrays -- NaN/Inf in ``w``, ``a``, ``b`` or ``g``: packing is the export step)."""
    w = _matrix(w)
    if w.ndim != 2:
        raise ValueError(f"w must be a matrix [M, N], got shape {tuple(w.shape)}; pack each matrix of a stack")
    eps = _eps(eps)
    V.check_bool(quantize_activations, "quantize_activations")
    have = [v is not None for v in (a, b, g)]
    if any(have) and not all(have):
        raise ValueError("a, b and g come together: pass all three (HGF) or none (pure ternary)")
    V.check_finite(w, "w")
    if all(have):
        a, b = _check_ab(a, b, *w.shape)
        V.check_finite(a, "a")
        V.check_finite(b, "b")
        g = jnp.asarray(_check_gate(g), jnp.float32)
        if g.ndim:
            raise ValueError(f"g must be a scalar gate, got shape {tuple(g.shape)}")
        a, b, g = (lax.stop_gradient(v) for v in (a, b, g))
    c, gamma = _ternary_codes(lax.stop_gradient(w), eps)
    return PackedHGF(pack_ternary(c), gamma, a, b, g, int(w.shape[1]), eps, quantize_activations)


def packed_forward(p: PackedHGF, x):
    """The inference forward of :func:`pack_hgf`'s output: ``x: [..., M]`` floating -> ``[..., N]`` float32.

    ``acc = c_x C`` with int8 operands and int32 accumulation, ``y = acc * gamma / s`` (or, with
    ``quantize_activations=False``, ``x C gamma`` in float32), plus ``g (x A) B`` in float32. Equals
    :func:`hgf_forward` / :func:`bitlinear` on the same weights to float32 rounding."""
    if not isinstance(p, PackedHGF):
        raise TypeError(f"p must be a PackedHGF from pack_hgf, got {type(p).__name__}")
    x = _float_array(x, "x")
    m = p.packed.shape[-2]
    if x.ndim < 1 or x.shape[-1] != m:
        raise ValueError(f"x must have shape [..., {m}] (the packed weight's input size), got {tuple(x.shape)}")
    c = unpack_ternary(p.packed, p.n)
    if p.quantize_activations:
        cx, s = _activation_codes(x, p.eps)
        acc = lax.dot_general(cx, c, (((cx.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
        y = acc.astype(jnp.float32) * p.gamma / s
    else:
        y = jnp.matmul(x.astype(jnp.float32), c.astype(jnp.float32), precision=lax.Precision.HIGHEST) * p.gamma
    if p.a is not None:
        y = y + p.g * _lowrank_cd(x, p.a, p.b, jnp.float32)
    return y


def weight_bytes(p: PackedHGF) -> int:
    """Bytes stored by a packed projection: the packed codes, ``gamma``, and (HGF) ``a``, ``b``, ``g``."""
    if not isinstance(p, PackedHGF):
        raise TypeError(f"p must be a PackedHGF from pack_hgf, got {type(p).__name__}")
    arrs = [p.packed, p.gamma] + ([p.a, p.b, p.g] if p.a is not None else [])
    return int(sum(np.asarray(v).nbytes for v in arrs))


def float32_weight_bytes(m: int, n: int) -> int:
    """``4 M N``: the bytes of the same projection stored as a float32 ``[M, N]`` weight."""
    return 4 * V.check_int(m, "m", low=1) * V.check_int(n, "n", low=1)


# --------------------------------------------------------------------------------- NNX layers
class GateScale(nnx.Variable):
    """The gate warmup multiplier ``w(t)`` of an :class:`HGFLinear` (not an ``nnx.Param``: optimizers
    built with ``wrt=nnx.Param`` leave it alone; set it with :func:`set_gate_scale`)."""


def _check_rngs(rngs):
    if not isinstance(rngs, nnx.Rngs):
        raise TypeError(f"rngs must be an nnx.Rngs, got {type(rngs).__name__}; pass rngs=nnx.Rngs(0)")


class BitLinear(nnx.Module):
    """BitNet b1.58 linear layer (:func:`bitlinear`): a latent float ``kernel [in, out]`` trained through
    the STE, ternary in the forward; optional float ``bias [out]`` added after the product.

    Args: ``in_features``, ``out_features`` (ints >= 1); ``use_bias`` (default False);
    ``kernel_init`` (default ``nnx.initializers.lecun_normal()``); ``eps`` (1e-5);
    ``quantize_activations`` (True); ``param_dtype`` (float32); ``rngs``."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = False, kernel_init=None,
                 eps: float = EPS, quantize_activations: bool = True, param_dtype=jnp.float32, rngs: nnx.Rngs):
        in_features = V.check_int(in_features, "in_features", low=1)
        out_features = V.check_int(out_features, "out_features", low=1)
        V.check_bool(use_bias, "use_bias")
        self.eps = _eps(eps)
        self.quantize_activations = V.check_bool(quantize_activations, "quantize_activations")
        param_dtype = V.check_dtype(param_dtype, "param_dtype")
        _check_rngs(rngs)
        init = kernel_init if kernel_init is not None else nnx.initializers.lecun_normal()
        self.in_features, self.out_features = in_features, out_features
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

    def _base(self, x):
        x = _float_array(x, "x")
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape [..., {self.in_features}], got {tuple(x.shape)}")
        return x, _bitlinear_cd(x, self.kernel[...], self.eps, self.quantize_activations)

    def _finish(self, x, y):
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y.astype(_out_dtype(x, self.kernel[...]))

    def __call__(self, x):
        x, y = self._base(x)
        return self._finish(x, y)


class HGFLinear(BitLinear):
    """HGF linear layer (:func:`hgf_forward`): ``y = Q_a(x) Q_w(W) + (w(t) g) (x A) B [+ bias]``.

    Parameters (``nnx.Param``): ``kernel [in, out]`` (latent float, STE), ``lora_a [in, rank]``
    (``U(-1/sqrt(in), 1/sqrt(in))``), ``lora_b [rank, out]`` (zeros), ``gate []`` (``gate_init``,
    default 0.1 [ours: the paper's reported equilibrium]); ``gate_scale`` (a :class:`GateScale`, not
    trained; ``gate_warmup(warmup_steps)(0)``, i.e. 0 with a warmup and 1 without) is the warmup
    multiplier -- update it each step with :func:`set_gate_scale`.

    Raises TypeError/ValueError (naming the argument) for ``rank`` outside ``[1, min(in, out)]``,
    a bool/non-int ``rank``, a non-finite ``gate_init`` and bad ``rngs``."""

    def __init__(self, in_features: int, out_features: int, *, rank: int, gate_init: float = 0.1,
                 warmup_steps: int = 0, use_bias: bool = False, kernel_init=None, eps: float = EPS,
                 quantize_activations: bool = True, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(in_features, out_features, use_bias=use_bias, kernel_init=kernel_init, eps=eps,
                         quantize_activations=quantize_activations, param_dtype=param_dtype, rngs=rngs)
        rank = V.check_rank(rank, self.in_features, self.out_features, "rank")
        gate_init = V.check_float(gate_init, "gate_init")
        self.schedule = gate_warmup(warmup_steps)
        bound = 1.0 / math.sqrt(in_features)
        self.lora_a = nnx.Param(jax.random.uniform(rngs.params(), (in_features, rank), jnp.float32, -bound,
                                                   bound).astype(param_dtype))
        self.lora_b = nnx.Param(jnp.zeros((rank, out_features), param_dtype))
        self.gate = nnx.Param(jnp.asarray(gate_init, jnp.float32))
        self.gate_scale = GateScale(jnp.asarray(self.schedule(0), jnp.float32))

    def __call__(self, x):
        x, y = self._base(x)
        cd = V.compute_dtype(y.dtype, self.lora_a[...].dtype)
        g = (self.gate_scale[...] * self.gate[...]).astype(cd)
        y = y.astype(cd) + g * _lowrank_cd(x, self.lora_a[...], self.lora_b[...], cd)
        return self._finish(x, y)


def check_step(step, name: str = "step"):
    """A training step for the gate warmup: an int >= 0 or an integer scalar array (a tracer under jit).
    TypeError for a bool, a float or a non-integer array; ValueError for a non-scalar array or a
    (concrete) negative value. Returns ``step``."""
    if isinstance(step, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int >= 0 or an integer scalar array, got a bool ({step!r})")
    if isinstance(step, (int, np.integer)):
        return V.check_int(step, name, low=0)
    if not isinstance(step, (jax.Array, np.ndarray, jax.core.Tracer)):
        raise TypeError(f"{name} must be an int >= 0 or an integer scalar array (e.g. the optimizer's step count), "
                        f"got {step!r} ({type(step).__name__}); pass int(step)")
    if step.dtype == jnp.bool_ or not jnp.issubdtype(step.dtype, jnp.integer):
        raise TypeError(f"{name} must be an int >= 0 or an integer scalar array, got an array of dtype {step.dtype}; "
                        "cast with .astype(jnp.int32)")
    if step.ndim:
        raise ValueError(f"{name} must be a scalar (one step count for every layer), got shape {tuple(step.shape)}")
    if V.is_concrete(step):
        with jax.ensure_compile_time_eval():
            v = int(step)
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    return step


def set_gate_scale(module: nnx.Module, step) -> None:
    """Set every :class:`HGFLinear` in ``module`` to its warmup multiplier at ``step``
    (``layer.gate_scale = layer.schedule(step)``; ``step`` an int >= 0 or an integer array)."""
    if not isinstance(module, nnx.Module):
        raise TypeError(f"module must be an nnx.Module, got {type(module).__name__}")
    step = check_step(step)
    for _, m in nnx.iter_graph(module):
        if isinstance(m, HGFLinear):
            m.gate_scale[...] = jnp.asarray(m.schedule(step), jnp.float32)
