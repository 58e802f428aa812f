"""Integer EGGROLL: int8 weights, int8 activations with int32 accumulation, integer low-rank
perturbations and an integer (thresholded sign) update -- the int8 pretraining mode of Sarkar et
al. 2025, "Evolution Strategies at the Hyperscale" (its single-file int8 code: ESHyperscale/nano-egg,
``run.py``, class ``QEggRoll``). Nothing in a generation (member forwards, noise, update) uses a
floating-point number except the fitness value your ``fitness_fn`` returns, of which only the sign
of antithetic pair differences is used.

Number format (as nano-egg): an int8 value ``v`` in ``[-127, 127]`` stands for ``v / 2^4`` (4
fractional bits, ``FRAC_BITS``); ``-128`` is never produced, and it is refused wherever the values are
concrete (eager :func:`int_dense` / :func:`int_embed` inputs and every ``IntEggroll`` call; under
``jit``/``vmap`` the values are traced and cannot be checked), so negation and the antithetic sign
never overflow. How the two int8 formats relate: ``FRAC_BITS`` is the fixed-point convention
of the integer network (activations and the noise table read ``v`` as ``v / 16``; :func:`default_out_shift`
divides ``x W`` by ``~16 sqrt(M)`` for weights of about ``16 N(0, 1)``). :func:`quantize` is a per-leaf
*storage* format, ``w ~ q * scale`` with ``scale = max|w| / 127``, used to start from float weights and
to read them back (:func:`dequantize`); the integer network never sees ``scale``, so a quantized leaf
acts as the float weight ``q / 16 = w / (16 scale)``: same signs and relative sizes, but a per-leaf
factor ``1 / (16 scale)`` off the float model (training absorbs it; rescale the float leaf before
quantizing if you need the float network's exact function).

Every right shift rounds half up: ``rshift(v, s) = (v + 2^(s-1)) >> s`` (``s >= 1``; ``>>`` an arithmetic shift, i.e. floor division by ``2^s``), ``rshift(v, 0) = v``; every
int8 result is clipped to ``[-127, 127]``. (nano-egg floors; rounding half up keeps the mirrored
members ``+E`` / ``-E`` within one unit of each other's mirror.)

Noise (counter-based, threefry bits -- not nano-egg's stored ``2^30`` table): one noise *entry* is
``T[u]`` for a random byte ``u``, with the 256-entry int8 table
``T[u] = round(16 Phi^{-1}((u + 1/2) / 256))`` (a discretized ``16 N(0, 1)``: symmetric, so mean
exactly 0; values in ``[-46, 46]``; variance ``v_T = mean(T^2) ~ 250``, :func:`noise_table`). The
bytes come from ``threefry_2x32`` on the counters ``0, 1, ...`` (4 bytes per 32-bit word) under the
key ``fold_in(fold_in(fold_in(seed, crc32(path)), generation // noise_reuse), j)`` (path: the leaf's
:mod:`lrjax.tree` path; ``j``: the noise index). So the noise of a leaf is a pure function of
``(seed, generation, member index, leaf path)`` computed with integer arithmetic only: the same bits
on any device count, process count, ``vmap`` batch or leaf order.

Members (``antithetic`` always): member ``i`` uses noise index ``j = i // 2`` and sign
``s_i = +1`` (even ``i``) / ``-1`` (odd ``i``).

* A *low-rank* leaf (int8, ``ndim >= 2``, matrix view ``[*batch, M, N]`` of :mod:`lrjax.axes`) draws a
  ``[*batch, M + N, r]`` block split into ``A [M, r]`` (input side) and ``B [N, r]`` (output side);
  the member's weight is ``W + s_i A B^T / 2^sigma_shift`` (never formed). :func:`int_dense` computes
  ``y = clip(rshift(x W + rshift(s_i (x A) B^T, sigma_shift), out_shift) + bias)`` with every product
  accumulated in int32.
* A *full* leaf (int8 vectors, biases) draws two entries per element, ``e = e1 e2`` (the entries of
  a rank-1 ``A B^T``, as nano-egg does), and the member sees ``clip(w + rshift(s_i e, sigma_shift))``.

The default ``sigma_shift = 8`` gives perturbation entries of standard deviation
``v_T sqrt(r) / 2^8 ~ sqrt(r)`` int8 units (nano-egg's ``FIXED_POINT + sigma_shift = 4 + 4``).

Update (integer; nano-egg's ``fast_fitness`` update): with ``f`` the member fitness and
``c_j = sign(f_{2j} - f_{2j+1})`` in ``{-1, 0, 1}`` (negated when minimizing; a non-finite fitness
loses its pair), every leaf accumulates in int32

    Z = sum_j c_j A_j B_j^T   (low-rank),      Z = sum_j c_j e_j   (full),

and moves each entry one unit in the direction of ``Z`` where ``Z`` is significant:

    W <- clip(W + sign(Z) [ |Z| >= tau_leaf ], -127, 127),    tau_leaf = ceil(z_{1-alpha/2} v_T sqrt(r_leaf n)),

with ``n = N / 2`` pairs, ``r_leaf = r`` (low-rank) or ``1`` (full) and ``z_q = Phi^{-1}(q)``: under
the null (fitness independent of the noise) ``Z / (v_T sqrt(r_leaf n))`` is approximately standard
normal, so ``alpha`` is the fraction of entries that would move by chance (nano-egg's
``update_threshold``; it anneals ``alpha`` from 1 down, pass ``alpha=`` per call to do that). The
thresholds are integers computed on the host from ``alpha`` (one per leaf kind); the program compares
integers only. Integer sums are exact and associative, so the update is bit-identical for any
chunking, device count and process count.

Sharding: ``mesh=`` splits the population over one mesh axis inside ``jax.shard_map`` with the global
chunk layout of :class:`lrjax.es.Eggroll` (``member_chunk`` consecutive member ids per ``vmap``,
dummy chunks padding the last devices); only the ``N`` fitness scalars are all-gathered and every
device regenerates all noise for the update.

Bounds: ``|x A B^T|`` is at most ``127 * 46 * 46 * M r``, which must stay below ``2^31`` together with
``|x W| <= 127^2 M``: ``M r <= 7000`` roughly (checked per leaf). ``|Z| <= 46^2 r n`` (checked).

Use :func:`quantize` to turn float params into int8 params plus per-leaf scales.
"""
from __future__ import annotations

import functools
import math
import statistics
import zlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.random import threefry_2x32
from jax.sharding import Mesh, PartitionSpec as P

from lrjax import _validation as V
from lrjax import axes as axes_lib
from lrjax import tree as tree_lib
from lrjax.es.eggroll import (Eggroll, EggrollState, _check_key, _check_member, _largest_divisor_at_most,
                              default_member_chunk)
from lrjax.es.noise import FROZEN, FULL, LOWRANK, LeafPlan, noise_key

__all__ = ["IntEggroll", "IntLowRankNoise", "IntStepInfo", "int_dense", "int_embed", "rshift",
           "clip_int8", "quantize", "dequantize", "noise_table", "threshold", "FRAC_BITS", "INT8_MAX"]

FRAC_BITS = 4
INT8_MAX = 127
_INT32_MAX = 2 ** 31 - 1


@functools.lru_cache(maxsize=None)
def _table_np() -> np.ndarray:
    inv = statistics.NormalDist().inv_cdf
    t = np.round([(1 << FRAC_BITS) * inv((u + 0.5) / 256) for u in range(256)]).astype(np.int8)
    assert np.array_equal(t, -t[::-1])  # symmetric: mean exactly 0
    return t


def noise_table() -> np.ndarray:
    """The 256-entry int8 noise table ``T[u] = round(16 Phi^{-1}((u + 1/2) / 256))`` (a copy)."""
    return _table_np().copy()


def _table_var() -> float:
    t = _table_np().astype(np.float64)
    return float(np.mean(t * t))


_TMAX = 46  # max |T[u]|


class IntLowRankNoise(NamedTuple):
    """One member's integer perturbation of one matrix leaf: ``W + a b^T / 2^shift`` in the matrix
    view, with the member's sign already in ``a``.

    ``a``: int8 ``[*batch, M, r]`` (input side), ``b``: int8 ``[*batch, N, r]`` (output side),
    ``shift``: int32 scalar (``sigma_shift``)."""

    a: jax.Array
    b: jax.Array
    shift: jax.Array

    def dense(self):
        """The int32 ``[*batch, M, N]`` perturbation ``rshift(a b^T, shift)`` of the weight (for checks)."""
        ab = jnp.einsum("...mr,...nr->...mn", self.a, self.b, preferred_element_type=jnp.int32)
        return rshift(ab, self.shift)


class IntStepInfo(NamedTuple):
    """Per-generation diagnostics (global member order)."""

    fitness: jax.Array  # raw fitness [N] float32
    pair_signs: jax.Array  # c_j in {-1, 0, 1}, int8 [N/2]
    num_changed: jax.Array  # int32: entries moved by the update (all leaves)
    num_nonfinite: jax.Array  # int32


# ------------------------------------------------------------------ integer primitives
def rshift(v, s):
    """Arithmetic right shift by ``s`` rounding half up: ``(v + 2^(s-1)) >> s`` for ``s >= 1``, ``v``
    for ``s = 0``. ``v`` an int32 array, ``s`` a non-negative int (or int32 scalar array)."""
    s = jnp.asarray(s, jnp.int32)
    half = jnp.where(s > 0, jnp.left_shift(jnp.int32(1), jnp.maximum(s - 1, 0)), 0)
    return jnp.right_shift(v + half, s)


def clip_int8(v):
    """``clip(v, -127, 127)`` as int8."""
    return jnp.clip(v, -INT8_MAX, INT8_MAX).astype(jnp.int8)


def default_out_shift(m: int) -> int:
    """``FRAC_BITS + round(log2(m) / 2)``: dividing ``x W`` by about ``16 sqrt(m)`` keeps an
    activation's scale when the weights are ``~16 N(0, 1)`` (nano-egg divides by ``16 sqrt(m)``).
    ``m``: the input width ``M >= 1`` (ValueError otherwise)."""
    m = V.check_int(m, "m", low=1)
    return FRAC_BITS + int(round(math.log2(m) / 2))


def _check_int8(x, name, min_ndim=0):
    x = V.check_array(x, name, min_ndim=min_ndim, kind="any")
    if x.dtype != jnp.int8:
        raise TypeError(f"{name} must be int8 (integer EGGROLL works on int8 values), got {x.dtype}; "
                        f"turn float values into int8 with lrjax.es.integer.quantize")
    return x


def _check_no_min(x, name):
    """Refuse a concrete int8 array holding -128 (one host sync; skipped for traced values)."""
    if V.is_concrete(x) and x.size and bool(jnp.any(x == -128)):
        raise ValueError(f"{name} holds -128, outside the symmetric int8 range [-127, 127] of the int8 mode; "
                         f"clip it: jnp.clip(v, -127, 127).astype(jnp.int8)")
    return x


def _check_noise(noise, name, m, n):
    if noise is None:
        return None
    if not isinstance(noise, IntLowRankNoise):
        raise TypeError(f"{name} must be an IntLowRankNoise (IntEggroll.member_noise) or None, "
                        f"got {type(noise).__name__}")
    a = _check_int8(noise.a, f"{name}.a", 2)
    b = _check_int8(noise.b, f"{name}.b", 2)
    if a.shape[-2:-1] != (m,) or b.shape[-2:-1] != (n,) or a.shape[-1] != b.shape[-1]:
        raise ValueError(f"{name}: a must be [{m}, r] and b [{n}, r] for a [{m}, {n}] kernel, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    shift = noise.shift
    if isinstance(shift, (bool, np.bool_)) or not (isinstance(shift, (int, np.integer)) or (
            hasattr(shift, "dtype") and jnp.issubdtype(shift.dtype, jnp.integer) and jnp.ndim(shift) == 0)):
        raise TypeError(f"{name}.shift must be an integer scalar (int32, the sigma_shift), got "
                        f"{getattr(shift, 'dtype', type(shift).__name__)} {jnp.shape(shift)}")
    if V.is_concrete(shift) and not 0 <= int(shift) <= 30:
        raise ValueError(f"{name}.shift must be in [0, 30] (the perturbation is a b^T / 2^shift; a negative "
                         f"shift would make it vanish), got {int(shift)}")
    _check_no_min(a, f"{name}.a")
    return noise


def int_dense(x, kernel, noise: IntLowRankNoise | None = None, bias=None, *, out_shift: int | None = None):
    """Integer dense layer: ``clip(rshift(x W + rshift((x a) b^T, shift), out_shift) + bias)``.

    ``x``: int8 ``[..., M]``; ``kernel``: int8 ``[M, N]``; ``noise``: the member's
    :class:`IntLowRankNoise` for this kernel or ``None``; ``bias``: int8 ``[N]`` or ``None`` (added in
    output units). All products accumulate in int32 (``preferred_element_type``); ``rshift`` rounds
    half up; the result is int8 clipped to ``[-127, 127]``. ``out_shift`` defaults to
    :func:`default_out_shift` ``(M)``. Raises TypeError for non-int8 inputs (fix: :func:`quantize`) or a
    non-integer ``noise.shift``, ValueError for mismatched shapes, a ``noise.shift`` outside ``[0, 30]``,
    an ``out_shift`` outside ``[0, 30]``, and -128 in ``x``, ``kernel``, ``bias`` or ``noise.a``. The value
    checks (shift, -128) run only on concrete inputs (eager calls, one host sync each); under
    ``jit``/``vmap`` -- how ``IntEggroll`` calls ``fitness_fn`` -- they cannot run, and a -128 there is
    used as is (``IntEggroll`` checks the params it is given, and every layer output is clipped to
    ``[-127, 127]``)."""
    x = _check_int8(x, "x", 1)
    kernel = _check_int8(kernel, "kernel")
    if kernel.ndim != 2:
        raise ValueError(f"kernel must be a 2-D [M, N] int8 matrix, got shape {tuple(kernel.shape)}")
    m, n = kernel.shape
    if x.shape[-1] != m:
        raise ValueError(f"x must have a trailing axis of size {m} (kernel {tuple(kernel.shape)}), got {tuple(x.shape)}")
    noise = _check_noise(noise, "noise", m, n)
    if bias is not None:
        bias = _check_int8(bias, "bias")
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        _check_no_min(bias, "bias")
    _check_no_min(x, "x")
    _check_no_min(kernel, "kernel")
    out_shift = default_out_shift(m) if out_shift is None else V.check_int(out_shift, "out_shift", low=0, high=30)
    acc = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    if noise is not None:
        xa = lax.dot_general(x, noise.a, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
        pert = lax.dot_general(xa, noise.b.astype(jnp.int32), (((xa.ndim - 1,), (1,)), ((), ())),
                               preferred_element_type=jnp.int32)
        acc = acc + rshift(pert, noise.shift)
    y = rshift(acc, out_shift)
    if bias is not None:
        y = y + bias.astype(jnp.int32)
    return clip_int8(y)


def int_embed(ids, table, noise: IntLowRankNoise | None = None):
    """Integer embedding lookup ``clip(table[ids] + rshift(a[ids] b^T, shift))``: the rows of the
    perturbed table ``W + a b^T / 2^shift`` (``table``: int8 ``[V, d]``, viewed as ``[M=V, N=d]``;
    ``noise``: the member's :class:`IntLowRankNoise` with ``a`` int8 ``[V, r]``, ``b`` int8 ``[d, r]``,
    or ``None``; ``ids``: integer ``[...]``). Returns int8 ``[..., d]`` clipped to ``[-127, 127]``.

    Errors: TypeError for non-integer ``ids``, a non-int8 ``table`` / noise, a non-integer
    ``noise.shift``; ValueError for a ``table`` that is not 2-D, noise shapes other than ``[V, r]`` /
    ``[d, r]``, a ``noise.shift`` outside ``[0, 30]``, and (concrete values only) ids outside
    ``[0, V)`` or -128 in ``table`` / ``noise.a``.

    Under ``jax.jit`` / ``vmap`` the ids are traced and cannot be checked: JAX's gather semantics apply,
    a negative id ``-V <= i < 0`` reads row ``V + i`` and any other out-of-range id is clamped to the
    nearest row (``0`` or ``V - 1``), silently. Check your ids outside the transform if they can be out of
    range."""
    ids = V.check_array(ids, "ids", kind="integer")
    table = _check_int8(table, "table")
    if table.ndim != 2:
        raise ValueError(f"table must be a 2-D [V, d] int8 matrix, got shape {tuple(table.shape)}")
    noise = _check_noise(noise, "noise", *table.shape)
    _check_no_min(table, "table")
    if V.is_concrete(ids) and ids.size and (int(jnp.min(ids)) < 0 or int(jnp.max(ids)) >= table.shape[0]):
        raise ValueError(f"ids must lie in [0, {table.shape[0]}) (the rows of table), got values in "
                         f"[{int(jnp.min(ids))}, {int(jnp.max(ids))}]; JAX would clamp them silently")
    rows = table[ids].astype(jnp.int32)
    if noise is not None:
        pert = lax.dot_general(noise.a[ids], noise.b, (((ids.ndim,), (1,)), ((), ())),
                               preferred_element_type=jnp.int32)
        rows = rows + rshift(pert, noise.shift)
    return clip_int8(rows)


# ------------------------------------------------------------------ quantizer
def quantize(params, *, bits: int = 8):
    """Float params -> ``(int params, scales)``: per leaf, symmetric ``scale = max|w| / 127`` (1 for
    an all-zero leaf) and ``q = clip(round(w / scale), -127, 127)`` as int8, so ``w ~ q * scale``
    (:func:`dequantize`; how this storage format relates to the network's ``v / 2^4`` convention: see
    the module docstring). ``scale`` is computed in ``promote_types(dtype, float32)`` (float64 only with
    ``jax_enable_x64``; float64 NumPy leaves are cast to float32 on the host otherwise).

    Which leaves: every floating leaf of the tree you pass, whatever its collection -- for
    ``nnx.state(model)`` that includes ``BatchStat`` running means/variances and other non-``Param``
    state, which ``IntEggroll`` would then perturb and train. To restrict it, pass only the leaves to
    quantize: ``nnx.state(model, nnx.Param)`` (the weights) or a sub-dict of linen params; train that
    tree, or merge the rest back in unquantized and list it in ``IntEggroll(frozen=...)``. Integer leaves are returned unchanged with
    scale 1, so an int32 leaf stays int32 (usually a counter or index, not a weight): ``IntEggroll``
    refuses it unless it is in ``frozen`` (to train it, cast it yourself:
    ``jnp.clip(v, -127, 127).astype(jnp.int8)``).

    ``bits`` must be 8 (the only mode). Returns two pytrees shaped like ``params`` (scales: float32
    scalars). Errors: TypeError for a non-numeric leaf; ValueError (concrete leaves) for NaN/Inf, and
    for a nonzero leaf with ``max|w| < 127 * 1.18e-38`` (subnormal scale: XLA flushes subnormal floats
    to zero, so it would quantize to all zeros; rescale the leaf or zero it)."""
    V.check_int(bits, "bits", low=8, high=8)
    flat = V.check_params(params, "params")
    tiny = float(np.finfo(np.float32).tiny) * INT8_MAX
    qs, ss = {}, {}
    for p, v in flat.items():
        if jnp.issubdtype(v.dtype, jnp.integer):
            qs[p], ss[p] = v, jnp.ones((), jnp.float32)
            continue
        if not jnp.issubdtype(v.dtype, jnp.floating):
            raise TypeError(f"params: leaf {p!r} has dtype {v.dtype}; quantize takes float or integer leaves")
        dt = jax.dtypes.canonicalize_dtype(jnp.promote_types(v.dtype, jnp.float32))
        w = jnp.asarray(np.asarray(v, dt) if isinstance(v, np.ndarray) else v.astype(dt))
        amax = jnp.max(jnp.abs(w)) if w.size else jnp.zeros((), w.dtype)
        if V.is_concrete(v):  # on the host in float64: XLA's CPU max would flush subnormals to 0
            a = float(np.max(np.abs(np.asarray(v, np.float64)))) if v.size else 0.0
            if not math.isfinite(a):
                raise ValueError(f"params: leaf {p!r} contains NaN or Inf; clean it before quantize")
            if 0 < a < tiny:
                raise ValueError(f"params: leaf {p!r} has max|w| = {a:.3g}, too small for a float32 scale "
                                 f"(max|w| / 127 would be subnormal, which XLA flushes to zero): multiply the "
                                 f"leaf by a power of two before quantize, or zero it")
        scale = jnp.where(amax > 0, amax / INT8_MAX, 1.0).astype(jnp.float32)
        qs[p] = jnp.clip(jnp.round(w / scale.astype(w.dtype)), -INT8_MAX, INT8_MAX).astype(jnp.int8)
        ss[p] = scale
    return tree_lib.replace(params, qs), tree_lib.replace(params, ss)


def dequantize(qparams, scales):
    """``q * scale`` per leaf, float32 (inverse of :func:`quantize` up to rounding). ``qparams`` (integer
    leaves; TypeError otherwise) and ``scales`` (scalar leaves) are the two pytrees :func:`quantize`
    returns (same structure; ValueError otherwise)."""
    qflat = V.check_params(qparams, "qparams")
    sflat = V.check_params(scales, "scales")
    for p, q in qflat.items():
        if not jnp.issubdtype(q.dtype, jnp.integer):
            raise TypeError(f"qparams: leaf {p!r} is {q.dtype}, but dequantize takes the integer params that "
                            f"quantize returns (float params are already dequantized)")
    if set(qflat) != set(sflat):
        raise ValueError(f"scales must have the leaves of qparams (the pair quantize returned); leaves only in "
                         f"qparams: {sorted(set(qflat) - set(sflat))}, only in scales: {sorted(set(sflat) - set(qflat))}")
    for p, sc in sflat.items():
        if sc.ndim:
            raise ValueError(f"scales: leaf {p!r} must be a scalar (one scale per leaf), got shape {tuple(sc.shape)}")
    return jax.tree.map(lambda q, s: q.astype(jnp.float32) * s, qparams, scales)


def threshold(alpha: float, rank: int, num_pairs: int) -> int:
    """The integer update threshold ``ceil(z_{1-alpha/2} v_T sqrt(rank num_pairs))`` (see the module
    docstring); ``alpha`` in ``(0, 1]`` (1 moves every entry with ``Z != 0``)."""
    alpha = V.check_float(alpha, "alpha", low=0.0, high=1.0, low_open=True)
    z = statistics.NormalDist().inv_cdf(1.0 - alpha / 2.0) if alpha < 1.0 else 0.0
    return max(1, int(math.ceil(z * _table_var() * math.sqrt(rank * num_pairs))))


# ------------------------------------------------------------------ noise
def _entries(key, size):
    """``size`` int8 noise entries ``T[u]`` from the bytes of threefry-2x32 on counters ``0..``."""
    kd = jax.random.key_data(key)
    words = threefry_2x32((kd[0], kd[1]), jnp.arange(-(-size // 4), dtype=jnp.uint32))
    u = (words[:, None] >> jnp.array([0, 8, 16, 24], jnp.uint32)) & jnp.uint32(255)
    return jnp.asarray(_table_np())[u.reshape(-1)[:size].astype(jnp.int32)]


def _path_key(key, path: str):
    return jax.random.fold_in(key, jnp.uint32(zlib.crc32(path.encode())))


def _leaf_noise(plan: LeafPlan, key, generation, j, rank, noise_reuse):
    """Unit (unsigned) noise of one leaf: ``(A, B)`` int8 or ``(e1, e2)`` int8 of the leaf's shape."""
    k = noise_key(_path_key(key, plan.path), generation, j, noise_reuse)
    if plan.kind == LOWRANK:
        bshape, m, n = axes_lib.matrix_shape(plan.shape, plan.ax)
        blk = _entries(k, math.prod(bshape) * (m + n) * rank).reshape(*bshape, m + n, rank)
        return blk[..., :m, :], blk[..., m:, :]
    size = math.prod(plan.shape)
    e = _entries(k, 2 * size).reshape(2, *plan.shape)
    return e[0], e[1]


@jax.jit
def _has_min(leaves):
    return jnp.stack([jnp.any(v == -128) for v in leaves])


class IntEggroll:
    """Integer EGGROLL (int8 params, thresholded sign update), see the module docstring for the math.

    Args:
      population_size: members ``N`` (even: antithetic pairs are always used).
      rank: rank ``r`` of each matrix perturbation (default 1, nano-egg's). ``r <= min(M, N)`` per
        matrix leaf and the int32 bounds of the module docstring must hold (ValueError naming the leaf).
      sigma_shift: the perturbation is ``A B^T / 2^sigma_shift`` (default 8: entries of std
        ``~sqrt(r)`` int8 units).
      alpha: default update significance level in ``(0, 1]`` (default 0.1); ``tell``/``step`` take a
        per-call ``alpha`` (anneal it like nano-egg).
      maximize: ``True`` (default) if larger fitness is better.
      targets: int8 leaves that get low-rank noise; default every int8 leaf with ``ndim >= 2``. Other
        int8 leaves get full-rank noise.
      frozen: leaves never perturbed nor updated (may have any dtype). Every other leaf must be int8.

        ``targets`` and ``frozen`` are :mod:`lrjax.tree` patterns on leaf paths (keys joined by ``/``,
        e.g. ``"l1/kernel"``): a regex that must ``re.fullmatch`` the whole path or match it as a
        ``/``-suffix (``"kernel"`` selects ``"l1/kernel"``; ``"l1"`` selects nothing -- write
        ``"l1/.*"`` for everything under ``l1``), a list of such strings, or a callable
        ``(path, leaf) -> bool``. A pattern selecting no leaf raises ValueError naming the argument
        (``targets`` / ``frozen``) and listing the nearest paths.
      axes: matrix-view spec of :mod:`lrjax.axes`.
      noise_reuse: noise changes every ``noise_reuse`` generations (default 1).
      mesh, axis_name, member_chunk, update_chunk: as :class:`lrjax.es.Eggroll` (population split
        over one mesh axis with ``jax.shard_map``; a chunk of ``member_chunk`` consecutive members per
        ``vmap``, default :func:`~lrjax.es.eggroll.default_member_chunk`; ``update_chunk`` noise
        indices summed per step of the update).

    ``fitness_fn(params_i, noise_i, *args) -> scalar`` is called per member with ``params_i`` the
    params whose full (vector) leaves carry the member's perturbation already and ``noise_i`` a tree
    shaped like ``params`` holding an :class:`IntLowRankNoise` at each low-rank leaf (``None``
    elsewhere): feed them to :func:`int_dense` / :func:`int_embed`.

    Errors (eager, before tracing): float (or other non-int8) params outside ``frozen`` raise a
    TypeError naming the leaf and the fix (:func:`quantize`); an int8 leaf holding ``-128`` raises a
    ValueError (the symmetric range is ``[-127, 127]``; clip it) on every call of ``step``, ``tell``,
    ``fitness``, ``member_inputs``, ``member_noise`` and ``plan`` whose params are concrete (one fused
    device reduction and one host sync per call; params traced under an outer ``jit`` are not checked);
    bad numbers as in ``Eggroll``.

    Example::

        qparams, scales = quantize(float_params)
        es = IntEggroll(256, rank=4)
        state = es.init(jax.random.key(0))
        for _ in range(100):
            qparams, state, info = es.step(state, qparams, fitness_fn, batch)
    """

    def __init__(self, population_size: int, *, rank: int = 1, sigma_shift: int = 8, alpha: float = 0.1,
                 maximize: bool = True, targets: tree_lib.Targets | None = None,
                 frozen: tree_lib.Targets | None = None, axes: axes_lib.AxesSpec = None, noise_reuse: int = 1,
                 mesh: Mesh | None = None, axis_name: str | None = None, member_chunk: int | None = None,
                 update_chunk: int = 128):
        population_size = V.check_int(population_size, "population_size", low=2)
        rank = V.check_int(rank, "rank", low=1)
        sigma_shift = V.check_int(sigma_shift, "sigma_shift", low=0, high=30)
        alpha = V.check_float(alpha, "alpha", low=0.0, high=1.0, low_open=True)
        maximize = V.check_bool(maximize, "maximize")
        noise_reuse = V.check_int(noise_reuse, "noise_reuse", low=1)
        update_chunk = V.check_int(update_chunk, "update_chunk", low=1)
        member_chunk = V.check_int(member_chunk, "member_chunk", low=1, allow_none=True)
        if population_size % 2:
            raise ValueError(f"population_size={population_size} must be even (integer EGGROLL always uses "
                             f"antithetic pairs); use {population_size + 1}")
        if _TMAX * _TMAX * rank * (population_size // 2) > _INT32_MAX:
            raise ValueError(f"rank * population_size / 2 = {rank * population_size // 2} is too large for the "
                             f"int32 update sum (|Z| <= 46^2 r N/2 < 2^31): lower rank or population_size")
        n_dev = 1
        if mesh is not None:
            if not isinstance(mesh, Mesh):
                raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
            axis_name = mesh.axis_names[0] if axis_name is None else axis_name
            if not isinstance(axis_name, str) or axis_name not in mesh.axis_names:
                raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh {mesh.axis_names}")
            n_dev = mesh.shape[axis_name]
        elif axis_name is not None:
            raise ValueError("axis_name is given but mesh is None; pass mesh= as well")
        if member_chunk is None:
            member_chunk = default_member_chunk(population_size, True)
        elif population_size % member_chunk or member_chunk % 2:
            raise ValueError(f"member_chunk must be an even positive divisor of population_size "
                             f"({population_size}), got {member_chunk!r}")
        self.population_size, self.rank, self.sigma_shift = population_size, rank, sigma_shift
        self.alpha, self.maximize, self.noise_reuse = alpha, maximize, noise_reuse
        self.targets, self.frozen, self.axes = targets, frozen, axes
        self.mesh, self.axis_name, self.num_devices = mesh, axis_name, n_dev
        self.member_chunk = int(member_chunk)
        self.chunks_per_device = -(-(population_size // self.member_chunk) // n_dev)
        self.num_noise = population_size // 2
        self.update_chunk = _largest_divisor_at_most(self.num_noise, update_chunk)
        self._cache: dict = {}

    # ------------------------------------------------------------------ setup
    def init(self, key) -> EggrollState:
        """State for seed ``key`` (typed or legacy key), generation 0 (the :class:`EggrollState` of Eggroll)."""
        return EggrollState(_check_key(key, "key"), jnp.zeros((), jnp.int32))

    def plan(self, params) -> list[LeafPlan]:
        """How each leaf is perturbed (``'lowrank'``, ``'full'``, ``'frozen'``), in flatten order;
        refuses non-int8 leaves outside ``frozen`` (TypeError) and, when the params are concrete, int8
        values of -128 (ValueError)."""
        plans = self._plan_shapes(params)
        self._check_values(plans, params)
        return plans

    def _plan_shapes(self, params) -> list[LeafPlan]:
        """:meth:`plan` from the leaves' paths, shapes and dtypes only (cached by ``_plans``)."""
        flat = V.check_params(params, "params")
        frozen = set(tree_lib.select(params, self.frozen, argname="frozen")) if self.frozen is not None else set()
        for p, v in flat.items():
            if p in frozen:
                continue
            if not hasattr(v, "dtype") or v.dtype != jnp.int8:
                dt = getattr(v, "dtype", type(v).__name__)
                if hasattr(v, "dtype") and jnp.issubdtype(v.dtype, jnp.floating):
                    raise TypeError(f"params: leaf {p!r} is {dt}, but the int8 mode needs int8 params; "
                                    f"quantize them first: qparams, scales = lrjax.es.integer.quantize(params) "
                                    f"(or list the leaf in `frozen`)")
                raise TypeError(f"params: leaf {p!r} has dtype {dt}, the int8 mode needs int8 leaves in "
                                f"[-127, 127]: clip and cast it (jnp.clip(v, -127, 127).astype(jnp.int8)), use "
                                f"lrjax.es.integer.quantize, or list the leaf in `frozen`")
        low = ({p for p, v in flat.items() if p not in frozen and v.ndim >= 2} if self.targets is None
               else set(tree_lib.select(params, self.targets, argname="targets")) - frozen)
        plans = []
        for p, v in flat.items():
            if p in frozen:
                plans.append(LeafPlan(p, FROZEN, tuple(v.shape), v.dtype, None))
            elif p in low:
                ax = axes_lib.resolve(p, v.shape, self.axes)
                _, m, n = axes_lib.matrix_shape(tuple(v.shape), ax)
                V.check_rank(self.rank, m, n, "rank", where=f"leaf {p!r} (shape {tuple(v.shape)})")
                if INT8_MAX * INT8_MAX * m + INT8_MAX * _TMAX * _TMAX * m * self.rank > _INT32_MAX:
                    raise ValueError(f"rank={self.rank}: leaf {p!r} (matrix view [{m}, {n}]) overflows the int32 "
                                     f"accumulator (127^2 M + 127 * 46^2 M r must be < 2^31): lower rank or "
                                     f"split the input dimension M={m}")
                plans.append(LeafPlan(p, LOWRANK, tuple(v.shape), v.dtype, ax))
            else:
                plans.append(LeafPlan(p, FULL, tuple(v.shape), v.dtype, None))
        return plans

    def _plans(self, params):
        flat = V.check_params(params, "params")
        sig = ("plan", jax.tree_util.tree_structure(params),
               tuple((tuple(np.shape(v)), str(getattr(v, "dtype", type(v)))) for v in flat.values()))
        plans = self._cache.get(sig)
        if plans is None:
            plans = self._cache[sig] = self._plan_shapes(params)
        if all(pl.kind == FROZEN for pl in plans):
            raise ValueError("params: every leaf is frozen, nothing to train; loosen `frozen`")
        self._check_values(plans, params)
        return plans

    @staticmethod
    def _check_values(plans, params):
        """ValueError if a concrete, non-frozen int8 leaf holds -128 (runs on every call)."""
        flat = tree_lib.flatten(params)
        vals = [flat[pl.path] for pl in plans if pl.kind != FROZEN]
        if not vals:
            return
        if all(V.is_concrete(v) for v in vals) and all(
                not isinstance(v, jax.Array) or v.is_fully_addressable for v in vals):
            with jax.ensure_compile_time_eval():
                bad = np.asarray(_has_min(vals))
            if bad.any():
                p = [pl.path for pl in plans if pl.kind != FROZEN][int(np.argmax(bad))]
                raise ValueError(f"params: int8 leaf {p!r} holds -128, outside the symmetric range [-127, 127] of "
                                 f"the int8 mode; clip it: jnp.clip(v, -127, 127).astype(jnp.int8)")

    def _check_state(self, state, name="state"):
        if not isinstance(state, EggrollState):
            raise TypeError(f"{name} must be an EggrollState from IntEggroll.init, got {type(state).__name__}")
        key, gen = state.key, state.generation
        if not isinstance(key, (jax.Array, jax.core.Tracer)) or not jnp.issubdtype(key.dtype, jax.dtypes.prng_key) \
                or key.shape != ():
            raise TypeError(f"{name}.key must be one typed key (jax.random.key); build the state with IntEggroll.init")
        if str(jax.random.key_impl(key)) != "threefry2x32":
            raise TypeError(f"{name}.key must be a threefry key (jax.random.key(seed), the default implementation), "
                            f"got impl={jax.random.key_impl(key)}; build the state with IntEggroll.init")
        if not hasattr(gen, "dtype") or gen.ndim != 0 or not jnp.issubdtype(gen.dtype, jnp.integer):
            raise TypeError(f"{name}.generation must be an integer scalar array")

    # ------------------------------------------------------------------ members
    def _member(self, plans, params, key, generation, member):
        """``(params_i, noise_i)`` flat lists for member id ``member`` (traced)."""
        sign = (1 - 2 * (member % 2)).astype(jnp.int8)
        j = member // 2
        shift = jnp.int32(self.sigma_shift)
        flat = tree_lib.flatten(params)
        ps, nz = [], []
        for pl in plans:
            v = flat[pl.path]
            if pl.kind == FROZEN:
                ps.append(v)
                nz.append(None)
                continue
            u1, u2 = _leaf_noise(pl, key, generation, j, self.rank, self.noise_reuse)
            if pl.kind == LOWRANK:
                ps.append(v)
                nz.append(IntLowRankNoise(u1 * sign, u2, shift))
            else:
                e = u1.astype(jnp.int32) * u2.astype(jnp.int32) * sign.astype(jnp.int32)
                ps.append(clip_int8(v.astype(jnp.int32) + rshift(e, shift)))
                nz.append(None)
        tdef = jax.tree_util.tree_structure(params)
        return jax.tree_util.tree_unflatten(tdef, ps), jax.tree_util.tree_unflatten(tdef, nz)

    def member_inputs(self, state: EggrollState, params, member):
        """``(params_i, noise_i)`` of member ``member`` (global id in ``[0, N)``): what ``fitness_fn``
        receives (full leaves perturbed in ``params_i``, :class:`IntLowRankNoise` in ``noise_i``)."""
        self._check_state(state)
        plans = self._plans(params)
        member = jnp.asarray(_check_member(member, self.population_size), jnp.int32)
        return self._member_fn(plans, params)(params, state.key, state.generation, member)

    def _member_fn(self, plans, params):
        ck = ("member", jax.tree_util.tree_structure(params), tuple((pl.shape, str(pl.dtype)) for pl in plans))
        if ck not in self._cache:
            self._cache[ck] = jax.jit(functools.partial(self._member, plans))
        return self._cache[ck]

    def member_noise(self, state: EggrollState, params, member) -> dict:
        """``{path: IntLowRankNoise | int32 array}`` of member ``member``: the low-rank noise, and for
        full leaves the int32 change of the leaf, ``rshift(s_i e, sigma_shift)`` (after the clip to
        ``[-127, 127]``)."""
        self._check_state(state)
        plans = self._plans(params)
        member = jnp.asarray(_check_member(member, self.population_size), jnp.int32)
        p_i, n_i = self._member_fn(plans, params)(params, state.key, state.generation, member)
        fp, fn = tree_lib.flatten(params), tree_lib.flatten(p_i)
        out = {}
        for pl, nz in zip(plans, jax.tree_util.tree_leaves(n_i, is_leaf=lambda x: x is None or isinstance(x, IntLowRankNoise))):
            if pl.kind == LOWRANK:
                out[pl.path] = nz
            elif pl.kind == FULL:
                out[pl.path] = fn[pl.path].astype(jnp.int32) - fp[pl.path].astype(jnp.int32)
        return out

    # ------------------------------------------------------------------ fitness
    def _local_fitness(self, plans, fitness_fn, params, key, generation, ids, args):
        def member(m):
            p_i, n_i = self._member(plans, params, key, generation, m)
            return jnp.reshape(fitness_fn(p_i, n_i, *args), ()).astype(jnp.float32)

        c = self.member_chunk
        chunk = jax.vmap(member)
        if ids.shape[0] == c:
            return chunk(ids)
        return lax.map(chunk, ids.reshape(-1, c)).reshape(-1)

    def _check_fitness_fn(self, params, fitness_fn, args):
        if not callable(fitness_fn):
            raise TypeError(f"fitness_fn must be callable (fitness_fn(params, noise, *args)), got {type(fitness_fn).__name__}")
        leaves, tdef = jax.tree_util.tree_flatten((params, args))
        sig = ("checked", fitness_fn, tdef, tuple((tuple(getattr(v, "shape", ())), str(getattr(v, "dtype", type(v))))
                                                for v in leaves))
        if sig in self._cache:
            return
        plans = self._plans(params)
        out = jax.eval_shape(lambda p, k, g, a: fitness_fn(*self._member(plans, p, k, g, jnp.int32(0)), *a),
                             params, jax.random.key(0), jnp.zeros((), jnp.int32), args)
        if not hasattr(out, "shape") or out.shape not in ((), (1,)):
            raise ValueError(f"fitness_fn must return one scalar per member (shape () or (1,)), got "
                             f"{getattr(out, 'shape', type(out).__name__)}")
        if not (jnp.issubdtype(out.dtype, jnp.floating) or jnp.issubdtype(out.dtype, jnp.integer)):
            raise TypeError(f"fitness_fn must return a real number, got dtype {out.dtype}")
        self._cache[sig] = True

    # ------------------------------------------------------------------ update
    def _pair_signs(self, fitness):
        worst = -jnp.inf if self.maximize else jnp.inf
        f = jnp.where(jnp.isfinite(fitness), fitness, worst)
        a, b = f[0::2], f[1::2]
        c = (a > b).astype(jnp.int8) - (a < b).astype(jnp.int8)
        return c if self.maximize else -c

    def _update(self, plans, params, key, generation, fitness, thresholds):
        c = self._pair_signs(fitness)
        active = [pl for pl in plans if pl.kind != FROZEN]
        k = self.update_chunk
        js = jnp.arange(self.num_noise, dtype=jnp.int32).reshape(-1, k)
        cs = c.reshape(-1, k)

        def zeros(pl):
            if pl.kind == LOWRANK:
                b, m, n = axes_lib.matrix_shape(pl.shape, pl.ax)
                return jnp.zeros((*b, m, n), jnp.int32)
            return jnp.zeros(pl.shape, jnp.int32)

        def body(acc, xs):
            jj, cc = xs
            new = []
            for pl, z in zip(active, acc):
                u1, u2 = jax.vmap(lambda j: _leaf_noise(pl, key, generation, j, self.rank, self.noise_reuse))(jj)
                cA = u1 * cc.reshape((-1,) + (1,) * (u1.ndim - 1))
                if pl.kind == LOWRANK:
                    new.append(z + jnp.einsum("c...mr,c...nr->...mn", cA, u2, preferred_element_type=jnp.int32))
                else:
                    new.append(z + jnp.sum(cA.astype(jnp.int32) * u2.astype(jnp.int32), axis=0))
            return new, None

        acc, _ = lax.scan(body, [zeros(pl) for pl in active], (js, cs))
        flat = tree_lib.flatten(params)
        out, changed = {}, jnp.zeros((), jnp.int32)
        for pl, z in zip(active, acc):
            tau = thresholds[0] if pl.kind == LOWRANK else thresholds[1]
            step = jnp.where(jnp.abs(z) >= tau, jnp.sign(z), 0)
            if pl.kind == LOWRANK:
                step = axes_lib.from_matrix(step, pl.ax, pl.shape)
            v = flat[pl.path]
            nv = clip_int8(v.astype(jnp.int32) + step)
            changed = changed + jnp.sum(nv != v).astype(jnp.int32)
            out[pl.path] = nv
        new_params = tree_lib.replace(params, out)
        return new_params, IntStepInfo(fitness, c, changed, jnp.sum(~jnp.isfinite(fitness)).astype(jnp.int32))

    def thresholds(self, alpha: float | None = None) -> tuple[int, int]:
        """``(tau_lowrank, tau_full)`` for ``alpha`` (default: the constructor's)."""
        alpha = self.alpha if alpha is None else alpha
        return threshold(alpha, self.rank, self.num_noise), threshold(alpha, 1, self.num_noise)

    # ------------------------------------------------------------------ drivers
    def _compiled(self, kind, fitness_fn, params):
        ck = (kind, fitness_fn, jax.tree_util.tree_structure(params))
        if ck in self._cache:
            return self._cache[ck]
        plans = self._plans(params)
        impl = "threefry2x32"  # _check_key refuses other implementations
        n = self.population_size

        def run(params, kd, generation, thr, args):
            if self.mesh is None:
                key = jax.random.wrap_key_data(kd, impl=impl)
                f = self._local_fitness(plans, fitness_fn, params, key, generation, jnp.arange(n, dtype=jnp.int32), args)
                return f if kind == "fitness" else self._update(plans, params, key, generation, f, thr)

            def body(params, kd, generation, thr, args):
                key = jax.random.wrap_key_data(kd, impl=impl)
                ncd = self.chunks_per_device * self.member_chunk
                ids = lax.axis_index(self.axis_name) * ncd + jnp.arange(ncd, dtype=jnp.int32)
                f = self._local_fitness(plans, fitness_fn, params, key, generation, ids, args)
                f = lax.all_gather(f, self.axis_name, tiled=True)[:n]  # only N scalars cross devices
                return f if kind == "fitness" else self._update(plans, params, key, generation, f, thr)

            out_specs = P() if kind == "fitness" else (P(), P())
            return jax.shard_map(body, mesh=self.mesh, in_specs=(P(),) * 5, out_specs=out_specs,
                                 check_vma=False)(params, kd, generation, thr, args)

        def tell(params, kd, generation, thr, fitness):
            key = jax.random.wrap_key_data(kd, impl=impl)
            return self._update(plans, params, key, generation, fitness, thr)

        fn = jax.jit(tell if kind == "tell" else run)
        self._cache[ck] = fn
        return fn

    # host-local <-> global arrays over the mesh: the same as Eggroll's (they read only self.mesh)
    _to_global = Eggroll._to_global
    _to_local = Eggroll._to_local

    def _inputs(self, state, params, alpha, extra):
        thr = jnp.asarray(self.thresholds(alpha), jnp.int32)
        return self._to_global((params, jax.random.key_data(state.key), jnp.asarray(state.generation, jnp.int32),
                                thr, extra))

    def fitness(self, state: EggrollState, params, fitness_fn: Callable[..., Any], *args):
        """Raw fitness ``[N]`` (float32, global member order) of this generation's members."""
        self._check_state(state)
        self._plans(params)  # -128 check on every call (the fitness_fn check below is cached)
        self._check_fitness_fn(params, fitness_fn, args)
        out = self._compiled("fitness", fitness_fn, params)(*self._inputs(state, params, None, args))
        return self._to_local(out)

    def tell(self, state: EggrollState, params, fitness, *, alpha: float | None = None):
        """``(new_params, next_state, info)`` from raw fitness ``[N]`` (global member order); only the
        signs of the pair differences enter the integer update."""
        self._check_state(state)
        self._plans(params)
        fitness = V.check_array(fitness, "fitness", ndim=1, kind="numeric", convert=True)
        if fitness.shape[0] != self.population_size:
            raise ValueError(f"fitness must have length population_size={self.population_size}, got {fitness.shape[0]}")
        p, kd, gen, thr, f = self._inputs(state, params, alpha, jnp.asarray(fitness, jnp.float32))
        new, info = self._compiled("tell", None, params)(p, kd, gen, thr, f)
        return new, EggrollState(state.key, state.generation + 1), info

    def step(self, state: EggrollState, params, fitness_fn: Callable[..., Any], *args, alpha: float | None = None):
        """One generation: evaluate every member (``fitness_fn(params_i, noise_i, *args)``) and apply
        the integer update. Returns ``(new_params, next_state, info)`` (``new_params`` int8 like ``params``)."""
        self._check_state(state)
        self._plans(params)  # -128 check on every call (the fitness_fn check below is cached)
        self._check_fitness_fn(params, fitness_fn, args)
        new, info = self._compiled("step", fitness_fn, params)(*self._inputs(state, params, alpha, args))
        new, info = self._to_local((new, info))
        return new, EggrollState(state.key, state.generation + 1), info
