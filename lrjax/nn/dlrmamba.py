"""DLRMamba: a low-rank 2-D selective scan (Low-Rank SS2D) and structure-aware distillation of the
latent SSM states from a full-rank teacher (*DLRMamba: Distilling Low-Rank Mamba for Edge
Multispectral Fusion Object Detection*, arXiv 2603.06920).

Sources. The DLRMamba paper gives, in its abstract, only the two ideas: the SS2D state transitions
and projections are "reformulated via matrix factorization", and a "Structure-Aware Distillation"
aligns the student's internal latent state dynamics with a full-rank teacher. No official code was
found. Everything below that the abstract does not state is marked **[ours]**; the selective scan is
Mamba's (Gu & Dao, arXiv 2312.00752; ``selective_scan_ref`` in state-spaces/mamba) and the 2-D
cross scan is VMamba's SS2D (Liu et al., arXiv 2401.10166; ``CrossScan``/``CrossMerge`` in
MzeroMiko/VMamba), both re-derived here from the papers' equations.

**Selective scan** (:func:`selective_scan`). Per channel ``d`` and state ``n``, with input-dependent
step ``Delta_t`` (``[d]``), input matrix ``B_t`` and output matrix ``C_t`` (``[N]``) and a diagonal
state matrix ``A = -exp(A_log)`` (``[d, N]``, real, negative)::

    h_t = exp(Delta_t A) * h_{t-1} + (Delta_t x_t) B_t        (h_t: [d, N]; ZOH for A, Euler for B, as Mamba)
    y_t = C_t . h_t + D * x_t                                  (y_t: [d])

run with ``lax.scan`` (``method='scan'``) or as the first-order linear recurrence
``(a, b) o (a', b') = (a a', a' b + b')`` with ``lax.associative_scan`` (``method='associative'``);
the two agree to float rounding (tested).

**SS2D** (:func:`cross_scan`, :func:`cross_merge`, :func:`ss2d`). The ``H x W`` grid (tokens in
row-major order) is read in ``K = 4`` orders, as VMamba's ``CrossScan``: row-major, column-major,
reversed row-major, reversed column-major (:func:`scan_orders`). Each order gets its own ``x_proj``,
``dt_proj``, ``dt_bias``, ``A_log`` and ``D`` (as VMamba's ``K``-stacked parameters); the four outputs
are mapped back to row-major positions and summed (``CrossMerge``). The block is VMamba's v0 SS2D::

    [x, z] = in_proj(u)                         u: [..., L=H*W, d_model] -> 2 x [..., L, d_inner]
    x      = SiLU(depthwise_conv3x3(x on the H x W grid) + b)
    xs     = cross_scan(x)                      [..., 4, L, d_inner]
    [dt, B, C] = xs x_proj[k]                   [..., 4, L, R + 2N]
    Delta  = softplus(dt dt_proj[k] + dt_bias[k])
    y      = cross_merge(selective_scan(xs, Delta, -exp(A_log[k]), B, C, D[k]))
    out    = out_proj(LayerNorm(y) * SiLU(z))

**Low rank** [ours: which matrices]. With ``rank=r`` the matrices named in ``factorize`` (default
:data:`FACTORIZE` = ``in_proj`` ``[d_model, 2 d_inner]``, ``x_proj`` ``[4, d_inner, R + 2N]``,
``out_proj`` ``[d_inner, d_model]`` and the state-transition matrix ``A_log`` ``[4, d_inner, N]``) are
stored as ``W = U V`` with ``U [.., m, r]`` and ``V [.., r, n]``; a weight is a dense array or a
dict ``{"u": U, "v": V}``, and the projections apply ``(x U) V`` (never forming ``W``); ``A_log`` is
formed (it is small) and ``A = -exp(U V)``, so ``A`` stays negative for every ``U, V``. ``dt_proj``
``[R, d_inner]`` is *not* re-factorized: Mamba's ``Delta`` path ``x -> x_proj[:R] -> dt_proj`` is
already a rank-``R`` factorization (``R = dt_rank = ceil(d_model / 16)``), kept equal in teacher and
student. ``rank=None`` is the dense, full-rank teacher. At ``r = min(m, n)`` the factorization of
a dense model's weights (:func:`factorize_weight`, a balanced SVD split) gives the dense model's
outputs (tested). Rank rule: ``1 <= rank <= min(m, n)`` of every factorized matrix, else ValueError.

Initialization [Mamba / VMamba]: ``A_log = log(1..N)`` for every channel and direction (S4D-real),
``D = 1``, ``dt_proj ~ U(-R^-1/2, R^-1/2)``, ``dt_bias = softplus^-1(dt)`` with
``dt ~ logU(1e-3, 1e-1)`` clamped at ``1e-4``; ``in_proj``/``x_proj``/``out_proj`` ``~ N(0, 1/m)``.
Factored [ours]: ``U ~ N(0, 1/m)``, ``V ~ N(0, 1/r)`` (the product has the dense init's variance);
for ``A_log``: ``U[:, 0] = 1``, ``V[0] = log(1..N)`` and the other components ``U ~ N(0, 0.1^2)``,
``V = 0``, so the student starts at exactly the dense ``A``.

**Structure-aware distillation** (:func:`state_distill_loss`, :func:`distill_loss`) [ours, from
the abstract]: the latent states ``h`` of every SS2D layer (``return_states=True``: ``[..., 4, L,
d_inner, N]``, float32, in each direction's scan order) are aligned with the teacher's::

    L = L_task + lambda * sum_layers mean((h_s - h_t P)^2)      (h_t behind stop_gradient)

with ``P [N_t, N_s]`` a learned projection of the state axis when the state sizes differ (identity
when they are equal and ``proj`` is None); ``mean`` over batch, directions, tokens, channels and
states [ours: a mean, not a sum, so ``lambda`` does not scale with the model]; ``normalize=True``
divides each layer's term by ``mean((h_t P)^2)`` (stop-gradient) [ours]. A learned ``P`` on the
teacher side admits the collapse ``P -> 0, h_s -> 0``; use ``normalize=True`` with a learned ``P``
(the denominator then keeps the relative error, and ``P = 0`` costs 1 per layer), or keep the
student's state size equal to the teacher's (what the low-rank student does: ``r`` changes the
matrices, not the state). :func:`logit_kd_loss` is the usual logit distillation (Hinton et al.) the
experiment compares against.

Layers: :class:`LowRankSS2D` (one block, NNX) and :class:`DLRMambaClassifier` (pixels as ``H W``
tokens: a linear token embedding plus a learned position embedding, ``n_layers`` pre-norm residual
SS2D blocks, mean pooling, LayerNorm, linear head) [ours: the classifier]. Study:
``experiments/dlrmamba_digits.py`` (``docs/dlrmamba_digits.md``): on 8x8 digits (2 seeds, rank-2
students, 59% of the teacher's parameters) the dense teacher reaches 0.958, the task-only student
0.834, logit KD 0.857 and state distillation 0.841: state distillation aligns the states (relative
error 0.63 vs 75) but closes less of the gap than logit KD there, so the paper's direction did not
reproduce at this scale.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrjax._validation import (check_array, check_bool, check_choice, check_finite, check_float, check_int,
                               check_rank, compute_dtype)

__all__ = ["selective_scan", "scan_orders", "cross_scan", "cross_merge", "ss2d", "factorize_weight",
           "dense_weight", "state_distill_loss", "logit_kd_loss", "distill_loss", "LowRankSS2D",
           "DLRMambaClassifier", "FACTORIZE", "FACTORIZABLE", "SCAN_METHODS", "SS2D_KEYS"]

#: the matrices a low-rank SS2D factorizes by default [ours]
FACTORIZE = ("in_proj", "x_proj", "out_proj", "A_log")
#: the matrices that may be named in ``factorize``
FACTORIZABLE = ("in_proj", "x_proj", "out_proj", "A_log")
#: the :func:`selective_scan` methods: ``lax.scan`` or ``lax.associative_scan``
SCAN_METHODS = ("scan", "associative")
#: the number of SS2D scan directions (VMamba's ``K``)
K_DIRECTIONS = 4


# ----------------------------------------------------------------------------------------------
# selective scan
# ----------------------------------------------------------------------------------------------

def _float_array(x, name, **kw):
    return check_array(x, name, kind="floating", **kw)


def selective_scan(x, delta, A, B, C, D=None, *, h0=None, return_states: bool = False, method: str = "scan"):
    """Mamba's selective scan ``h_t = exp(Delta_t A) h_{t-1} + Delta_t x_t B_t``, ``y_t = C_t h_t + D x_t``.

    Args:
      x: ``[..., L, d]`` input sequence (floating).
      delta: ``[..., L, d]`` step sizes ``Delta`` (positive in Mamba: ``softplus`` of a projection;
        not checked, any real value runs).
      A: ``[..., d, N]`` diagonal state matrix (each ``(d, n)`` entry is one decay; Mamba's
        ``-exp(A_log)``); its leading axes broadcast against ``x.shape[:-2]``.
      B, C: ``[..., L, N]`` input and output matrices, leading axes equal to ``x``'s.
      D: ``[..., d]`` skip weights (broadcast like ``A``) or None (no skip).
      h0: ``[..., d, N]`` initial state (broadcast like ``A``) or None (zeros).
      return_states: also return the states ``h`` ``[..., L, d, N]``.
      method: ``'scan'`` (``lax.scan`` over ``L``) or ``'associative'`` (``lax.associative_scan``,
        ``O(log L)`` depth, more memory).

    Returns:
      ``y`` ``[..., L, d]`` in ``x.dtype``; with ``return_states``, ``(y, h)`` where ``h`` is in the
      compute dtype ``promote_types(inputs, float32)`` (float32 states for bfloat16 inputs).

    Raises:
      TypeError: a non-array or non-floating argument, ``return_states`` not a bool, ``method`` not a str.
      ValueError: shapes that do not match as above, or an unknown ``method``.
    """
    x = _float_array(x, "x", min_ndim=2)
    delta = _float_array(delta, "delta", min_ndim=2)
    A = _float_array(A, "A", min_ndim=2)
    B = _float_array(B, "B", min_ndim=2)
    C = _float_array(C, "C", min_ndim=2)
    return_states = check_bool(return_states, "return_states")
    method = check_choice(method, "method", SCAN_METHODS)
    L, d = x.shape[-2:]
    if delta.shape != x.shape:
        raise ValueError(f"delta must have the shape of x {tuple(x.shape)} ([..., L, d]), got {tuple(delta.shape)}")
    if A.shape[-2] != d:
        raise ValueError(f"A must be [..., d={d}, N] (d = x.shape[-1]), got shape {tuple(A.shape)}")
    n = A.shape[-1]
    want = tuple(x.shape[:-1]) + (n,)
    for name, m in (("B", B), ("C", C)):
        if tuple(m.shape) != want:
            raise ValueError(f"{name} must have shape x.shape[:-1] + (N,) = {want} ([..., L, N] with N = "
                             f"A.shape[-1]), got {tuple(m.shape)}")
    batch = tuple(x.shape[:-2])
    _check_broadcast(A.shape[:-2], batch, "A", "[..., d, N]")
    dts = [x.dtype, delta.dtype, A.dtype, B.dtype, C.dtype]
    if D is not None:
        D = _float_array(D, "D", min_ndim=1)
        if D.shape[-1] != d:
            raise ValueError(f"D must be [..., d={d}], got shape {tuple(D.shape)}")
        _check_broadcast(D.shape[:-1], batch, "D", "[..., d]")
        dts.append(D.dtype)
    if h0 is not None:
        h0 = _float_array(h0, "h0", min_ndim=2)
        if tuple(h0.shape[-2:]) != (d, n):
            raise ValueError(f"h0 must be [..., d={d}, N={n}], got shape {tuple(h0.shape)}")
        _check_broadcast(h0.shape[:-2], batch, "h0", "[..., d, N]")
        dts.append(h0.dtype)
    cd = compute_dtype(*dts)
    y, h = _selective_scan(x.astype(cd), delta.astype(cd), A.astype(cd), B.astype(cd), C.astype(cd),
                           None if D is None else D.astype(cd), None if h0 is None else h0.astype(cd), method)
    y = y.astype(x.dtype)
    return (y, h) if return_states else y


def _check_broadcast(lead, batch, name, form):
    try:
        out = np.broadcast_shapes(tuple(lead), batch)
    except ValueError:
        out = None
    if out != batch:
        raise ValueError(f"{name}'s leading axes {tuple(lead)} must broadcast to x's batch axes {batch} "
                         f"({name} is {form})")


def _selective_scan(x, delta, A, B, C, D, h0, method):
    """Unchecked core; every input already in the compute dtype."""
    a = jnp.exp(delta[..., None] * A[..., None, :, :])                  # [..., L, d, N]
    b = (delta * x)[..., None] * B[..., None, :]                          # [..., L, d, N]
    batch = x.shape[:-2]
    d, n = A.shape[-2:]
    if method == "scan":
        a_t, b_t = jnp.moveaxis(a, -3, 0), jnp.moveaxis(b, -3, 0)
        init = jnp.zeros(batch + (d, n), x.dtype) if h0 is None else jnp.broadcast_to(h0, batch + (d, n))

        def step(h, ab):
            h = ab[0] * h + ab[1]
            return h, h

        _, hs = jax.lax.scan(step, init, (a_t, b_t))
        h = jnp.moveaxis(hs, 0, -3)
    else:
        def combine(e1, e2):
            return e1[0] * e2[0], e2[0] * e1[1] + e2[1]

        acum, h = jax.lax.associative_scan(combine, (a, b), axis=a.ndim - 3)
        if h0 is not None:
            h = h + acum * h0[..., None, :, :]
    y = jnp.einsum("...ldn,...ln->...ld", h, C)
    if D is not None:
        y = y + D[..., None, :] * x
    return y, h


# ----------------------------------------------------------------------------------------------
# SS2D cross scan / merge
# ----------------------------------------------------------------------------------------------

def _grid(height, width):
    return check_int(height, "height", low=1), check_int(width, "width", low=1)


def scan_orders(height: int, width: int) -> np.ndarray:
    """The four SS2D scan orders over an ``height x width`` grid of row-major tokens: ``[4, H W]``
    int32, row ``k`` lists the token index read at each scan position: 0 row-major (identity),
    1 column-major, 2 reversed row-major, 3 reversed column-major (VMamba's ``CrossScan`` order).
    Raises TypeError/ValueError for a non-int or non-positive ``height``/``width``."""
    h, w = _grid(height, width)
    row = np.arange(h * w, dtype=np.int32)
    col = row.reshape(h, w).T.reshape(-1)
    return np.stack([row, col, row[::-1], col[::-1]])


def _check_tokens(x, name, height, width, axis=-2):
    L = height * width
    if x.shape[axis] != L:
        raise ValueError(f"{name} must have H*W = {height}*{width} = {L} tokens on axis {axis} (row-major "
                         f"grid), got shape {tuple(x.shape)}; pass the grid's height/width or reshape the input")


def cross_scan(x, height: int, width: int):
    """``x [..., L = H W, d]`` (row-major grid) -> ``[..., 4, L, d]``, the tokens in the four
    :func:`scan_orders`. Raises ValueError when ``L != height * width``."""
    x = check_array(x, "x", min_ndim=2)
    h, w = _grid(height, width)
    _check_tokens(x, "x", h, w)
    return jnp.take(x, jnp.asarray(scan_orders(h, w)), axis=x.ndim - 2)


def cross_merge(y, height: int, width: int):
    """Inverse of :func:`cross_scan` summed over directions: ``y [..., 4, L, d]`` (each direction in
    its scan order) -> ``[..., L, d]`` with ``out[p] = sum_k y[k, pos_k(p)]`` (VMamba's ``CrossMerge``).
    Raises ValueError for a direction axis other than 4 or ``L != height * width``."""
    y = check_array(y, "y", min_ndim=3)
    h, w = _grid(height, width)
    if y.shape[-3] != K_DIRECTIONS:
        raise ValueError(f"y must be [..., 4, L, d] (four scan directions on axis -3), got shape {tuple(y.shape)}")
    _check_tokens(y, "y", h, w)
    inv = np.argsort(scan_orders(h, w), axis=1)                           # position of token p in order k
    parts = [jnp.take(y[..., k, :, :], jnp.asarray(inv[k]), axis=y.ndim - 3) for k in range(K_DIRECTIONS)]
    return parts[0] + parts[1] + parts[2] + parts[3]


# ----------------------------------------------------------------------------------------------
# low-rank weights
# ----------------------------------------------------------------------------------------------

def factorize_weight(w, rank: int) -> dict:
    """Balanced truncated SVD of ``w [..., m, n]``: ``{"u": U sqrt(S) [..., m, r], "v": sqrt(S) V^T
    [..., r, n]}`` (the best rank-``r`` approximation; exact at ``r = min(m, n)``). float32 math
    (float64 for float64 input). Raises ValueError unless ``1 <= rank <= min(m, n)``, and for a
    concrete ``w`` holding NaN/Inf (the SVD would return NaN factors)."""
    w = _float_array(w, "w", min_ndim=2)
    check_finite(w, "w")
    m, n = w.shape[-2:]
    rank = check_rank(rank, m, n, "rank", where="w")
    cd = compute_dtype(w.dtype)
    u, s, vt = jnp.linalg.svd(w.astype(cd), full_matrices=False)
    r = jnp.sqrt(s[..., :rank])
    return {"u": (u[..., :, :rank] * r[..., None, :]).astype(w.dtype),
            "v": (r[..., :, None] * vt[..., :rank, :]).astype(w.dtype)}


def dense_weight(w):
    """A weight as a dense array: ``w`` itself (a floating array), or ``U V`` for a factored
    ``{"u": [..., m, r], "v": [..., r, n]}`` dict (``[..., m, n]``, computed in float32 or wider and
    rounded to ``result_type(u, v)``). Raises TypeError for anything else (a list, an integer
    array) and ValueError naming ``w['u']``/``w['v']`` for factors that do not chain."""
    if isinstance(w, dict):
        if set(w) != {"u", "v"}:
            raise ValueError(f"w: a factored weight is a dict with keys {{'u', 'v'}}, got keys {sorted(w)}")
        u = _float_array(w["u"], "w['u']", min_ndim=2)
        v = _float_array(w["v"], "w['v']", min_ndim=2)
        if u.shape[:-2] != v.shape[:-2] or u.shape[-1] != v.shape[-2]:
            raise ValueError(f"w['u'] {tuple(u.shape)} and w['v'] {tuple(v.shape)} must be [..., m, r] and "
                             "[..., r, n] (same leading axes, u's last axis = v's second-to-last)")
        cd = compute_dtype(u.dtype, v.dtype)
        return jnp.matmul(u.astype(cd), v.astype(cd)).astype(jnp.result_type(u.dtype, v.dtype))
    if isinstance(w, (list, tuple)):
        raise TypeError(f"w must be an array or a {{'u', 'v'}} dict, got a {type(w).__name__}; wrap it with "
                        "jnp.asarray")
    return _float_array(w, "w")


def _apply(x, w, eq):
    """``x`` times a dense or factored weight; ``eq`` is the dense einsum 'in,wt->out' with the
    contracted letter 'i' and the output letter 'o' (the factored path contracts through 'r')."""
    if isinstance(w, dict):
        ins, out = eq.split("->")
        xs, ws = ins.split(",")
        t = jnp.einsum(f"{xs},{ws.replace('o', 'r')}->{out.replace('o', 'r')}", x, w["u"])
        return jnp.einsum(f"{out.replace('o', 'r')},{ws.replace('i', 'r')}->{out}", t, w["v"])
    return jnp.einsum(eq, x, w)


# ----------------------------------------------------------------------------------------------
# the SS2D block, pure
# ----------------------------------------------------------------------------------------------

#: the keys of an SS2D params dict (:func:`ss2d`, :meth:`LowRankSS2D.weights`)
SS2D_KEYS = ("in_proj", "conv_w", "conv_b", "x_proj", "dt_proj", "dt_bias", "A_log", "D", "norm_scale",
             "norm_bias", "out_proj")


def _layer_norm(x, scale, bias, eps=1e-5):
    mu = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), -1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * scale + bias


def _depthwise_conv(x, w, b, height, width):
    """``x [..., L, c]`` on the row-major grid, ``w [k, k, c]``, 'SAME' padding, plus ``b [c]``."""
    lead = x.shape[:-2]
    c = x.shape[-1]
    img = x.reshape((-1, height, width, c))
    out = jax.lax.conv_general_dilated(img, w[:, :, None, :], (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)
    return (out + b).reshape(lead + (height * width, c))


def _ss2d_shapes(params):
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict with keys {list(SS2D_KEYS)}, got {type(params).__name__}")
    missing = [k for k in SS2D_KEYS if k not in params]
    if missing:
        raise ValueError(f"params is missing {missing}; an SS2D block needs {list(SS2D_KEYS)}")
    shapes = {}
    for k in SS2D_KEYS:
        w = params[k]
        if isinstance(w, dict):
            if k not in FACTORIZABLE or set(w) != {"u", "v"}:
                raise ValueError(f"params[{k!r}] must be an array" + (" or a {'u', 'v'} dict"
                                 if k in FACTORIZABLE else "") + f", got a dict with keys {sorted(w)}")
            u = _float_array(w["u"], f"params[{k!r}]['u']", min_ndim=2)
            v = _float_array(w["v"], f"params[{k!r}]['v']", min_ndim=2)
            if u.shape[:-2] != v.shape[:-2] or u.shape[-1] != v.shape[-2]:
                raise ValueError(f"params[{k!r}]: u {tuple(u.shape)} and v {tuple(v.shape)} must be "
                                 "[..., m, r] and [..., r, n]")
            shapes[k] = tuple(u.shape[:-1]) + (v.shape[-1],)
        else:
            shapes[k] = tuple(_float_array(w, f"params[{k!r}]").shape)
    return shapes


def ss2d(params: dict, x, *, height: int, width: int, return_states: bool = False, method: str = "scan"):
    """The (low-rank) SS2D block of the module docstring as a pure function.

    From a module: ``ss2d(block.weights(), x, height=block.height, width=block.width)`` equals
    ``block(x)`` for a :class:`LowRankSS2D` ``block`` (:meth:`LowRankSS2D.weights` turns its
    ``<name>_u``/``<name>_v`` params into the ``{"u", "v"}`` dicts this function takes; the module's
    ``nnx.state(...).to_pure_dict()`` keeps the ``_u``/``_v`` names and is NOT an ``ss2d`` params dict).

    Args:
      params: dict with keys :data:`SS2D_KEYS`: ``in_proj [d_model, 2 d_inner]``, ``conv_w [k, k,
        d_inner]``, ``conv_b [d_inner]``, ``x_proj [4, d_inner, R + 2N]``, ``dt_proj [4, R,
        d_inner]``, ``dt_bias [4, d_inner]``, ``A_log [4, d_inner, N]``, ``D [4, d_inner]``,
        ``norm_scale``/``norm_bias [d_inner]``, ``out_proj [d_inner, d_model]``; ``in_proj``,
        ``x_proj``, ``out_proj`` and ``A_log`` may each be factored ``{"u": [.., m, r], "v": [.., r, n]}``.
      x: ``[..., L = height * width, d_model]`` tokens of a row-major grid (any float dtype).
      height, width: the grid.
      return_states: also return the SSM states ``[..., 4, L, d_inner, N]`` (compute dtype,
        float32 for bfloat16 input; direction ``k`` in its own scan order).
      method: the :func:`selective_scan` method.

    Returns ``[..., L, d_model]`` in ``x.dtype`` (and the states). Raises TypeError/ValueError for
    missing or mis-shaped params, a token count other than ``height * width``, or a wrong ``d_model``.
    """
    shapes = _ss2d_shapes(params)
    x = _float_array(x, "x", min_ndim=2)
    h, w = _grid(height, width)
    _check_tokens(x, "x", h, w)
    return_states = check_bool(return_states, "return_states")
    method = check_choice(method, "method", SCAN_METHODS)
    d_model, two_di = shapes["in_proj"]
    di = two_di // 2
    if x.shape[-1] != d_model:
        raise ValueError(f"x must have d_model = {d_model} features (in_proj is {shapes['in_proj']}), got "
                         f"shape {tuple(x.shape)}")
    n = shapes["A_log"][-1]
    R = shapes["dt_proj"][1]
    want = {"conv_b": (di,), "x_proj": (4, di, R + 2 * n), "dt_proj": (4, R, di), "dt_bias": (4, di),
            "A_log": (4, di, n), "D": (4, di), "norm_scale": (di,), "norm_bias": (di,), "out_proj": (di, d_model)}
    for k, s in want.items():
        if shapes[k] != s:
            raise ValueError(f"params[{k!r}] must have shape {s} (d_model={d_model}, d_inner={di}, N={n}, "
                             f"dt_rank={R}), got {shapes[k]}")
    cs = shapes["conv_w"]
    if len(cs) != 3 or cs[0] != cs[1] or cs[2] != di:
        raise ValueError(f"params['conv_w'] must be [k, k, d_inner={di}], got {cs}")
    leaves = jax.tree_util.tree_leaves(params)
    cd = compute_dtype(x.dtype, *[l.dtype for l in leaves])
    p = jax.tree_util.tree_map(lambda a: a.astype(cd), params)
    out, states = _ss2d(p, x.astype(cd), h, w, R, n, method)
    out = out.astype(x.dtype)
    return (out, states) if return_states else out


def _ss2d(p, x, height, width, R, n, method):
    xz = _apply(x, p["in_proj"], "...li,io->...lo")
    xi, z = jnp.split(xz, 2, axis=-1)
    xi = jax.nn.silu(_depthwise_conv(xi, p["conv_w"], p["conv_b"], height, width))
    xs = jnp.take(xi, jnp.asarray(scan_orders(height, width)), axis=xi.ndim - 2)       # [..., 4, L, di]
    proj = _apply(xs, p["x_proj"], "...kli,kio->...klo")
    dt, Bm, Cm = proj[..., :R], proj[..., R:R + n], proj[..., R + n:]
    delta = jax.nn.softplus(jnp.einsum("...klr,krd->...kld", dt, p["dt_proj"]) + p["dt_bias"][:, None, :])
    A = -jnp.exp(dense_weight(p["A_log"]))                                              # [4, di, N]
    y, states = _selective_scan(xs, delta, A, Bm, Cm, p["D"], None, method)
    inv = np.argsort(scan_orders(height, width), axis=1)
    y = sum(jnp.take(y[..., k, :, :], jnp.asarray(inv[k]), axis=y.ndim - 3) for k in range(K_DIRECTIONS))
    y = _layer_norm(y, p["norm_scale"], p["norm_bias"]) * jax.nn.silu(z)
    return _apply(y, p["out_proj"], "...li,io->...lo"), states


# ----------------------------------------------------------------------------------------------
# distillation losses
# ----------------------------------------------------------------------------------------------

def _as_list(v, name):
    if isinstance(v, (jax.Array, np.ndarray)):
        return [v]
    if not isinstance(v, (list, tuple)) or not v:
        raise TypeError(f"{name} must be a non-empty list of per-layer state arrays, got {type(v).__name__}")
    return list(v)


def state_distill_loss(student_states, teacher_states, proj=None, *, normalize: bool = False):
    """Structure-aware state distillation ``sum_l mean((h_s^l - h_t^l P_l)^2)`` [ours, see module doc].

    Args:
      student_states, teacher_states: per-layer lists (or one array) of states ``[..., d, N_s]`` and
        ``[..., d, N_t]`` with equal leading axes (the ``return_states`` output of :func:`ss2d` /
        :class:`DLRMambaClassifier`); the teacher's are behind ``stop_gradient``.
      proj: None (identity; needs ``N_s == N_t``) or a per-layer list of ``P_l [N_t, N_s]`` (an entry
        may be None for identity); gradients reach ``P``.
      normalize: divide layer ``l``'s term by ``mean((h_t P)^2)`` (stop-gradient). A layer whose
        target ``h_t P`` is all zero (nothing to be relative to) keeps its plain
        ``mean((h_s - h_t P)^2)`` (no division, no epsilon blow-up).

    Returns a float32 (compute dtype) scalar. The loss depends only on the states, so parameters
    that act after the scan (``out_proj``, the LayerNorm after the merge, the ``z`` gate's half of
    ``in_proj``, and in :class:`DLRMambaClassifier` the head and final norm) get no gradient from
    it: train them with the task loss (:func:`distill_loss`). Raises TypeError for non-lists /
    non-arrays and ValueError for a layer-count or shape mismatch or an empty state array (a mean
    over no elements, named ``student_states[l]``).
    """
    hs = _as_list(student_states, "student_states")
    ht = _as_list(teacher_states, "teacher_states")
    normalize = check_bool(normalize, "normalize")
    if len(hs) != len(ht):
        raise ValueError(f"student_states has {len(hs)} layers and teacher_states {len(ht)}; pass one state "
                         "array per distilled layer to each (same layers)")
    if proj is None:
        proj = [None] * len(hs)
    elif not isinstance(proj, (list, tuple)) or len(proj) != len(hs):
        raise ValueError(f"proj must be None or a list of {len(hs)} per-layer [N_t, N_s] matrices (or None "
                         f"entries), got {type(proj).__name__}" + (f" of length {len(proj)}"
                                                                   if isinstance(proj, (list, tuple)) else ""))
    total = 0.0
    for l, (s, t, P) in enumerate(zip(hs, ht, proj)):
        s = _float_array(s, f"student_states[{l}]", min_ndim=2)
        t = _float_array(t, f"teacher_states[{l}]", min_ndim=2)
        if s.shape[:-1] != t.shape[:-1]:
            raise ValueError(f"student_states[{l}] {tuple(s.shape)} and teacher_states[{l}] {tuple(t.shape)} "
                             "must agree on every axis but the last (state size N)")
        if s.size == 0 or t.size == 0:
            raise ValueError(f"student_states[{l}] {tuple(s.shape)} / teacher_states[{l}] {tuple(t.shape)} "
                             "are empty (e.g. a batch of 0); the loss is a mean, pass at least one example")
        if P is None:
            if s.shape[-1] != t.shape[-1]:
                raise ValueError(f"proj[{l}] is None but the state sizes differ (student N_s={s.shape[-1]}, "
                                 f"teacher N_t={t.shape[-1]}); pass proj[{l}] of shape [N_t, N_s]")
            dts = (s.dtype, t.dtype)
        else:
            P = _float_array(P, f"proj[{l}]", ndim=2)
            if P.shape != (t.shape[-1], s.shape[-1]):
                raise ValueError(f"proj[{l}] must be [N_t={t.shape[-1]}, N_s={s.shape[-1]}], got {tuple(P.shape)}")
            dts = (s.dtype, t.dtype, P.dtype)
        cd = compute_dtype(*dts)
        target = jax.lax.stop_gradient(t.astype(cd))
        if P is not None:
            target = target @ P.astype(cd)
        term = jnp.mean(jnp.square(s.astype(cd) - target))
        if normalize:
            den = jax.lax.stop_gradient(jnp.mean(jnp.square(target)))
            term = jnp.where(den > 0, term / jnp.where(den > 0, den, 1.0), term)
        total = total + term
    return total


def logit_kd_loss(student_logits, teacher_logits, *, temperature: float = 2.0):
    """Logit distillation ``T^2 KL(softmax(z_t / T) || softmax(z_s / T))``, mean over the batch
    (Hinton et al. 2015); teacher behind ``stop_gradient``. ``[..., classes]`` logits of equal shape
    with at least one row (an empty batch raises ValueError naming ``student_logits``);
    ``temperature > 0``. Teacher classes masked with ``-inf`` (``p_t = 0``) contribute 0
    (``0 log 0 = 0``): the value and the student's gradient stay finite. Returns a compute-dtype scalar."""
    s = _float_array(student_logits, "student_logits", min_ndim=1)
    t = _float_array(teacher_logits, "teacher_logits", min_ndim=1)
    if s.shape != t.shape:
        raise ValueError(f"student_logits {tuple(s.shape)} and teacher_logits {tuple(t.shape)} must have the same shape")
    if s.size == 0:
        raise ValueError(f"student_logits has no elements (shape {tuple(s.shape)}, e.g. a batch of 0); the "
                         "loss is a mean over the batch, pass at least one example")
    T = check_float(temperature, "temperature", low=0.0, low_open=True)
    cd = compute_dtype(s.dtype, t.dtype)
    lt = jax.nn.log_softmax(jax.lax.stop_gradient(t.astype(cd)) / T)
    ls = jax.nn.log_softmax(s.astype(cd) / T)
    pt = jnp.exp(lt)
    live = pt > 0                                           # 0 log 0 = 0 for masked teacher classes
    kl = jnp.where(live, pt * (jnp.where(live, lt, 0.0) - ls), 0.0)
    return (T * T) * jnp.mean(jnp.sum(kl, -1))


def distill_loss(task_loss, student_states, teacher_states, *, lam: float, proj=None, normalize: bool = False):
    """``L = L_task + lam * state_distill_loss(student_states, teacher_states, proj, normalize=...)``;
    ``lam >= 0`` (a Python number). Raises as :func:`state_distill_loss`, and ValueError for ``lam < 0``."""
    lam = check_float(lam, "lam", low=0.0)
    task_loss = _float_array(task_loss, "task_loss", ndim=0)
    return task_loss + lam * state_distill_loss(student_states, teacher_states, proj, normalize=normalize)


# ----------------------------------------------------------------------------------------------
# NNX layers
# ----------------------------------------------------------------------------------------------

def _check_factorize(factorize):
    if isinstance(factorize, str) or not isinstance(factorize, (tuple, list)):
        raise TypeError(f"factorize must be a tuple of names from {list(FACTORIZABLE)}, got {factorize!r}")
    for f in factorize:
        check_choice(f, "factorize", FACTORIZABLE)
    if len(set(factorize)) != len(factorize):
        raise ValueError(f"factorize names a matrix twice: {tuple(factorize)}")
    return tuple(factorize)


class LowRankSS2D(nnx.Module):
    """One (low-rank) SS2D block as an NNX module; the math is :func:`ss2d` (see the module doc).

    Args:
      d_model: token width. d_state: ``N`` (default 8). expand: ``d_inner = expand * d_model`` (2).
      dt_rank: ``R`` (default ``ceil(d_model / 16)``, Mamba's ``"auto"``). d_conv: depthwise
      kernel size (3, odd). height, width: the token grid (8 x 8). rank: None (dense teacher) or the
      rank ``r`` of every matrix in ``factorize`` (``1 <= r <= min(m, n)`` of each, else ValueError
      naming the matrix). factorize: names from :data:`FACTORIZABLE` (default :data:`FACTORIZE`);
      an empty ``factorize`` with a ``rank`` is refused (ValueError: nothing would be low-rank).
      param_dtype: parameter dtype (float32). rngs: ``nnx.Rngs``.

    ``__call__(x, *, return_states=False)``: ``x [..., H W, d_model]`` -> ``[..., H W, d_model]``
    (and the states ``[..., 4, H W, d_inner, N]``). Parameters: ``in_proj``, ``x_proj``,
    ``out_proj``, ``A_log`` (or ``<name>_u``/``<name>_v`` when factored), ``conv_w``, ``conv_b``,
    ``dt_proj``, ``dt_bias``, ``D``, ``norm_scale``, ``norm_bias``. :meth:`weights` returns them as
    the params dict of the pure :func:`ss2d` (the route from the module to the pure function).
    """

    def __init__(self, d_model: int, *, d_state: int = 8, expand: int = 2, dt_rank: int | None = None,
                 d_conv: int = 3, height: int = 8, width: int = 8, rank: int | None = None,
                 factorize: Sequence[str] = FACTORIZE, param_dtype=jnp.float32, rngs: nnx.Rngs):
        d_model = check_int(d_model, "d_model", low=1)
        d_state = check_int(d_state, "d_state", low=1)
        expand = check_int(expand, "expand", low=1)
        dt_rank = check_int(dt_rank, "dt_rank", low=1, allow_none=True) or math.ceil(d_model / 16)
        d_conv = check_int(d_conv, "d_conv", low=1)
        if d_conv % 2 == 0:
            raise ValueError(f"d_conv must be odd (a centred 'SAME' kernel), got {d_conv}")
        self.height, self.width = _grid(height, width)
        factorize = _check_factorize(factorize)
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"rngs must be an nnx.Rngs (e.g. nnx.Rngs(0)), got {type(rngs).__name__}")
        di, n, R = expand * d_model, d_state, dt_rank
        mats = {"in_proj": (d_model, 2 * di), "x_proj": (di, R + 2 * n), "out_proj": (di, d_model),
                "A_log": (di, n)}
        if rank is not None:
            check_int(rank, "rank", low=1)
            if not factorize:
                raise ValueError(f"rank={rank} with factorize=() factorizes nothing (the block would be dense "
                                 "and ignore rank); pass rank=None for the dense block or name matrices in "
                                 f"factorize (from {list(FACTORIZABLE)})")
            for f in factorize:
                check_rank(rank, *mats[f], name="rank", where=f)
        self.d_model, self.d_inner, self.d_state, self.dt_rank, self.rank = d_model, di, n, R, rank
        self.factorize = factorize if rank is not None else ()
        dt = jnp.dtype(param_dtype)

        def normal(shape, std):
            return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dt)

        lead = {"in_proj": (), "x_proj": (4,), "out_proj": (), "A_log": (4,)}
        a_log = jnp.broadcast_to(jnp.log(jnp.arange(1, n + 1, dtype=jnp.float32)), (4, di, n))
        for name, (m, k) in mats.items():
            shp = lead[name] + (m, k)
            if name in self.factorize:
                if name == "A_log":
                    u = normal(lead[name] + (m, rank), 0.1).at[..., 0].set(1.0)
                    v = jnp.zeros(lead[name] + (rank, k), dt).at[:, 0, :].set(a_log[:, 0, :].astype(dt))
                else:
                    u, v = normal(lead[name] + (m, rank), 1 / math.sqrt(m)), normal(lead[name] + (rank, k), 1 / math.sqrt(rank))
                setattr(self, name + "_u", nnx.Param(u))
                setattr(self, name + "_v", nnx.Param(v))
            else:
                w = a_log.astype(dt) if name == "A_log" else normal(shp, 1 / math.sqrt(m))
                setattr(self, name, nnx.Param(w))
        self.conv_w = nnx.Param(normal((d_conv, d_conv, di), 1 / d_conv))
        self.conv_b = nnx.Param(jnp.zeros((di,), dt))
        self.dt_proj = nnx.Param((jax.random.uniform(rngs.params(), (4, R, di), jnp.float32, -1, 1)
                                  * R ** -0.5).astype(dt))
        t = jnp.exp(jax.random.uniform(rngs.params(), (4, di), jnp.float32, math.log(1e-3), math.log(1e-1)))
        t = jnp.maximum(t, 1e-4)
        self.dt_bias = nnx.Param((t + jnp.log(-jnp.expm1(-t))).astype(dt))       # softplus^-1(t)
        self.D = nnx.Param(jnp.ones((4, di), dt))
        self.norm_scale = nnx.Param(jnp.ones((di,), dt))
        self.norm_bias = nnx.Param(jnp.zeros((di,), dt))

    def weights(self) -> dict:
        """The params dict :func:`ss2d` takes (keys :data:`SS2D_KEYS`; factored matrices as ``{"u", "v"}``
        dicts): ``ss2d(self.weights(), x, height=self.height, width=self.width) == self(x)``. Use this,
        not ``nnx.state(self).to_pure_dict()``, whose factored entries are named ``<name>_u``/``_v``."""
        out = {}
        for k in SS2D_KEYS:
            if k in self.factorize:
                out[k] = {"u": getattr(self, k + "_u")[...], "v": getattr(self, k + "_v")[...]}
            else:
                out[k] = getattr(self, k)[...]
        return out

    def __call__(self, x, *, return_states: bool = False, method: str = "scan"):
        return ss2d(self.weights(), x, height=self.height, width=self.width, return_states=return_states,
                    method=method)


class DLRMambaClassifier(nnx.Module):
    """A small (low-rank) SS2D classifier of ``H x W`` single-channel images as ``H W`` tokens [ours].

    ``tokens = x[..., None] W_embed + b + pos``; ``n_layers`` times ``tokens += LowRankSS2D(LayerNorm(tokens))``;
    ``logits = Linear(LayerNorm(mean_L tokens))``. The embedding, position table, norms and head
    are dense in teacher and student; ``rank``/``factorize``/``d_state``/``expand``/``dt_rank`` go
    to every block (see :class:`LowRankSS2D`).

    ``__call__(x, *, return_states=False)``: ``x [..., H W]`` pixels or ``[..., H W, in_features]``
    (float) -> logits ``[..., num_classes]`` in ``x.dtype`` (compute in float32), and with
    ``return_states`` the per-layer state list (each ``[..., 4, H W, d_inner, N]``). Raises
    ValueError for a token count other than ``H W``.
    """

    def __init__(self, num_classes: int = 10, *, d_model: int = 32, n_layers: int = 2, d_state: int = 8,
                 expand: int = 2, dt_rank: int | None = None, d_conv: int = 3, height: int = 8, width: int = 8,
                 in_features: int = 1, rank: int | None = None, factorize: Sequence[str] = FACTORIZE,
                 rngs: nnx.Rngs):
        num_classes = check_int(num_classes, "num_classes", low=1)
        d_model = check_int(d_model, "d_model", low=1)
        n_layers = check_int(n_layers, "n_layers", low=1)
        self.in_features = check_int(in_features, "in_features", low=1)
        self.height, self.width = _grid(height, width)
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"rngs must be an nnx.Rngs (e.g. nnx.Rngs(0)), got {type(rngs).__name__}")
        L = self.height * self.width
        self.embed = nnx.Linear(self.in_features, d_model, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (L, d_model), jnp.float32))
        self.norms = nnx.List([nnx.LayerNorm(d_model, rngs=rngs) for _ in range(n_layers)])
        self.blocks = nnx.List([LowRankSS2D(d_model, d_state=d_state, expand=expand, dt_rank=dt_rank,
                                            d_conv=d_conv, height=height, width=width, rank=rank,
                                            factorize=factorize, rngs=rngs) for _ in range(n_layers)])
        self.norm_f = nnx.LayerNorm(d_model, rngs=rngs)
        self.head = nnx.Linear(d_model, num_classes, rngs=rngs)

    def __call__(self, x, *, return_states: bool = False, method: str = "scan"):
        x = _float_array(x, "x", min_ndim=1)
        return_states = check_bool(return_states, "return_states")
        L = self.height * self.width
        if self.in_features == 1 and x.shape[-1] == L:
            x = x[..., None]
        if x.ndim < 2 or x.shape[-2] != L or x.shape[-1] != self.in_features:
            raise ValueError(f"x must be [..., H*W = {self.height}*{self.width} = {L}] pixels or [..., {L}, "
                             f"in_features={self.in_features}], got shape {tuple(x.shape)}; flatten each "
                             "image row-major to H*W tokens")
        dtype = x.dtype
        h = self.embed(x.astype(compute_dtype(dtype))) + self.pos[...]
        states = []
        for norm, block in zip(self.norms, self.blocks):
            y, s = block(norm(h), return_states=True, method=method)
            h = h + y
            states.append(s)
        logits = self.head(self.norm_f(jnp.mean(h, axis=-2))).astype(dtype)
        return (logits, states) if return_states else logits
