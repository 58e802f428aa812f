"""Counter-based perturbations: every member's noise is a pure function of
``(seed, generation, noise index)`` (one flat draw cut into the leaves' blocks), so it is drawn
wherever it is needed and never has to be stored (``Eggroll(store_noise=True)`` opts in to keeping one generation's flat draws for its
update, where that is cheaper than drawing them again).

Layout of one generation (population ``N``, ``antithetic=True``):

* member ``i`` uses noise index ``j = i // 2`` and sign ``s_i = +1`` for even ``i``, ``-1`` for odd
  ``i`` (so members ``2j`` and ``2j+1`` are the mirrored pair ``theta +- sigma eps_j``); with
  ``antithetic=False``, ``j = i`` and ``s_i = +1``;
* noise index ``j`` of a generation has the key ``fold_in(fold_in(seed, generation // noise_reuse), j)``
  and draws ONE flat standard-normal vector covering every perturbed leaf, cut in flatten order
  (one generator call per member instead of one per leaf: XLA compiles each call site
  separately, so this keeps compile time flat in the number of leaves);
* a *low-rank* leaf, viewed as ``[*batch, M, N]`` by :mod:`lrjax.axes`, takes a
  ``[*batch, M + N, r]`` block and splits it into ``A [*batch, M, r]`` and ``B [*batch, N, r]``;
  its perturbation direction is ``E = s A B^T / sqrt(r)``, whose entries have mean 0 and variance 1
  like a Gaussian's (EGGROLL, Sarkar et al. 2025);
* a *full* leaf (biases, scales, vectors; or any leaf with ``rank=None``) takes a block of its own
  shape, ``E = s eps``.

The flat vector of a noise index is threefry-2x32 of its key on the counters ``0 .. size-1``
(two 32-bit words per block, ``jax.extend.random.threefry_2x32``) turned into normals by the
float32 transform of ``jax.random.normal`` -- exactly ``jax.random.normal(key, (size,))`` as
computed under ``jax.threefry_partitionable(False)``, rather than ``jax.random.normal`` in its
default partitionable mode (which spends a whole block per word): same distribution, half the
generator work, a different stream from lrjax versions before this choice. Integer-only hashing of
``(key, counter)`` is the same whatever the sharding or vmap batch, which is what makes the
update bit-identical for any device count. ``'rademacher'`` noise uses the same words, 32 signs
per word.

``'table'`` noise (the scheme of EGGROLL's single-file int8 code, nano-egg, in floating point) reads
each noise index's flat vector as one contiguous window of a pre-drawn table ``T`` of
``table_size`` standard normals: ``z_j = T[o_j : o_j + size]`` with the offset
``o_j = w_j mod (table_size - size + 1)``, ``w_j`` the first threefry word of the index's key (the key
above). The table itself is fixed (``jax.random.normal`` of ``jax.random.key(TABLE_SEED)``, the
same for every seed: the seed picks the windows), built once per process by :func:`make_table`.
A generation then costs one generator word per index instead of one per entry -- the
"pre-drawn factors" of the paper's throughput measurement, drawn on the fly. Every entry is an exact
N(0, 1) draw and each window's entries are independent, but windows of different indices may overlap
(each pair with probability about ``2 size / table_size``), so members are not exactly independent
of each other as with ``'normal'``; keep ``table_size`` well above ``size`` (the default, ``2^22``
entries = 16 MiB in float32, is ~600 windows of a 3-layer 256-wide MLP at rank 4). Windows are
integer offsets into a replicated array, so the noise is the same on any device or process count.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lrjax import _validation as V
from lrjax import axes as axes_lib

__all__ = ["LeafPlan", "LowRankNoise", "noise_key", "sign_and_index", "draw", "draw_flat", "split", "noise_size",
           "make_table", "DEFAULT_TABLE_SIZE"]

LOWRANK, FULL, FROZEN = "lowrank", "full", "frozen"


class LeafPlan(NamedTuple):
    """How one leaf is perturbed: ``kind`` is ``'lowrank'``, ``'full'`` or ``'frozen'``."""

    path: str
    kind: str
    shape: tuple
    dtype: object
    ax: axes_lib.Axes | None  # matrix view for low-rank leaves


class LowRankNoise(NamedTuple):
    """One member's perturbation of one matrix leaf: ``delta = scale * a @ b^T`` in the matrix view.

    ``a``: ``[*batch, M, r]`` (input side), ``b``: ``[*batch, N, r]`` (output side),
    ``scale = sigma * sign / sqrt(r)``. ``x @ (W + delta) = x @ W + scale * (x @ a) @ b^T``.
    """

    a: jax.Array
    b: jax.Array
    scale: jax.Array

    def dense(self):
        """The materialized ``[*batch, M, N]`` perturbation (for checks; O(MN))."""
        return self.scale * (self.a @ jnp.swapaxes(self.b, -1, -2))


def _check_counter(value, name):
    """A generation or noise index: a Python/NumPy int in ``[0, 2^32)`` or an integer scalar array
    (traced ones too; concrete ones are range-checked)."""
    if isinstance(value, (jax.Array, np.ndarray, jax.core.Tracer)) and not isinstance(value, np.generic):
        if value.ndim != 0 or not jnp.issubdtype(value.dtype, jnp.integer):
            raise TypeError(f"{name} must be an integer scalar (an int or a 0-d integer array), got "
                            f"{value.dtype}{tuple(value.shape)}")
        if V.is_concrete(value) and not 0 <= int(value) < 2 ** 32:
            raise ValueError(f"{name} must be in [0, 2^32), got {int(value)}")
        return value
    return V.check_int(value, name, low=0, high=2 ** 32 - 1)


def noise_key(key, generation, index, noise_reuse: int = 1):
    """Key of noise index ``index`` in ``generation`` (both ints in ``[0, 2^32)`` or integer scalar
    arrays: ``TypeError`` / ``ValueError`` otherwise)."""
    noise_reuse = V.check_int(noise_reuse, "noise_reuse", low=1)
    generation = _check_counter(generation, "generation")
    index = _check_counter(index, "index")
    epoch = jnp.asarray(generation, jnp.uint32) // jnp.uint32(noise_reuse)
    return jax.random.fold_in(jax.random.fold_in(key, epoch), jnp.asarray(index, jnp.uint32))


def sign_and_index(member, antithetic: bool):
    """``(sign, noise_index)`` of a member id (see the module docstring)."""
    antithetic = V.check_bool(antithetic, "antithetic")
    member = jnp.asarray(member, jnp.int32)
    if antithetic:
        return 1.0 - 2.0 * (member % 2).astype(jnp.float32), member // 2
    return jnp.ones((), jnp.float32), member


def noise_dtype(dtype):
    """Noise is drawn in float32 (float64 for float64 leaves) and cast where it is used."""
    return jnp.promote_types(dtype, jnp.float32)


def _block_shape(plan: LeafPlan, rank):
    if plan.kind == LOWRANK:
        bshape, m, n = axes_lib.matrix_shape(plan.shape, plan.ax)
        return (*bshape, m + n, rank)
    return plan.shape


def noise_size(plans, rank) -> int:
    """Length of the flat normal vector one noise index draws."""
    return sum(math.prod(_block_shape(p, rank)) for p in plans if p.kind != FROZEN)


DISTRIBUTIONS = ("normal", "rademacher", "table")
DEFAULT_TABLE_SIZE = 2 ** 22
MAX_TABLE_SIZE = 2 ** 30
TABLE_SEED = 0x7AB1E  # the fixed key of the 'table' noise's table (make_table)


def make_table(table_size: int = DEFAULT_TABLE_SIZE):
    """The float32 table of ``'table'`` noise: ``table_size`` standard normals, the first
    ``table_size`` of :func:`_normal` under the fixed key ``jax.random.key(TABLE_SEED)`` (equal to
    ``jax.random.normal(key, (table_size,))`` under ``jax.threefry_partitionable(False)``). The same
    table for every seed (the seed picks the windows), every process and device; built once per
    process and size (the last 4 sizes are cached), so it never enters an ``EggrollState`` or a
    checkpoint. Memory: the table's ``4 table_size`` bytes, plus about 5x that while it is drawn.

    Errors: ``TypeError`` for a non-integer ``table_size``; ``ValueError`` for ``table_size < 1`` or
    above ``MAX_TABLE_SIZE`` (``2^30``, 4 GiB)."""
    table_size = V.check_int(table_size, "table_size", low=1, high=MAX_TABLE_SIZE)
    return _make_table(table_size)


@functools.lru_cache(maxsize=4)
def _make_table(table_size: int):
    with jax.ensure_compile_time_eval():
        return _normal(jax.random.key(TABLE_SEED), table_size, jnp.float32)


def check_table(table, size: int, name: str = "table"):
    """``table`` must be a 1-D float32/float64 array of at least ``size`` entries (one window), with
    no NaN/Inf where it is concrete."""
    if not isinstance(table, (jax.Array, np.ndarray, jax.core.Tracer)) or table.ndim != 1 \
            or table.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must be the 1-D float noise table of distribution='table' (make_table(size), "
                        f"Eggroll.table), got {getattr(table, 'dtype', type(table).__name__)}"
                        f"{tuple(getattr(table, 'shape', ()))}")
    if table.shape[0] < size:
        raise ValueError(f"{name} has {table.shape[0]} entries but one noise index needs a window of {size} "
                         f"(noise_size): raise table_size to well above {size} (windows of different "
                         "members overlap with probability about 2 x size / table_size)")
    if V.is_concrete(table) and not bool(jnp.all(jnp.isfinite(table))):
        raise ValueError(f"{name} contains NaN or Inf: use make_table(size)")
    return table


def _table_window(key, table, size, dtype):
    """``table[o : o + size]`` with ``o`` the first threefry word of ``key`` mod ``(len - size + 1)``."""
    span = table.shape[0] - size + 1
    off = _bits(key, 1)[0] % jnp.uint32(span)
    return lax.dynamic_slice(table, (off.astype(jnp.int32),), (size,)).astype(dtype)


def _rademacher(key, size, dtype):
    """``size`` independent +-1 values from ``ceil(size / 32)`` generator words (32 per word)."""
    words = _bits(key, -(-size // 32))
    bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & jnp.uint32(1)
    return (2 * bits.reshape(-1)[:size].astype(dtype) - 1)


def _bits(key, size):
    """``size`` uint32 words of threefry-2x32 on the counters ``0 .. size-1`` (two words per block,
    ``jax.extend.random.threefry_2x32``): half the blocks of ``jax.random.bits``, whose
    partitionable mode spends a whole block per 32-bit word. A pure function of ``(key, size)``;
    vmap or sharding over keys cannot change it (integer arithmetic only)."""
    kd = jax.random.key_data(key)
    return _threefry_2x32_iota(kd[0], kd[1], size)


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry_2x32_iota(k0, k1, size: int):
    """``threefry_2x32((k0, k1), arange(size))`` (same words, bit for bit) written as straight-line
    uint32 arithmetic: the 20 Threefry-2x32 rounds unrolled (Salmon et al. 2011; the round and
    key-schedule constants of ``jax._src.random.threefry2x32``). JAX lowers its primitive on CPU
    as a rolled 5-step ``fori_loop``, which XLA cannot fuse with the consumer; unrolled, the
    counters (an iota), the hash and the float transform of :func:`_normal` compile into one
    elementwise loop (about 2x faster on XLA:CPU). The counters are split as JAX splits them: the
    first ``ceil(size / 2)`` counters are the blocks' first words, the rest (padded with one 0 when
    ``size`` is odd) their second words."""
    half = -(-size // 2)
    x0 = jnp.arange(half, dtype=jnp.uint32)
    x1 = x0 + jnp.uint32(half)
    if size % 2:
        x1 = jnp.where(x0 == jnp.uint32(half - 1), jnp.uint32(0), x1)
    k0, k1 = jnp.asarray(k0, jnp.uint32), jnp.asarray(k1, jnp.uint32)
    ks = (k0, k1, k0 ^ k1 ^ jnp.uint32(0x1BD11BDA))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = (x1 << jnp.uint32(r)) | (x1 >> jnp.uint32(32 - r))
            x1 = x0 ^ x1
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
    return jnp.concatenate([x0, x1])[:size]


def _normal(key, size, dtype):
    """``size`` standard normals: the float32 transform of ``jax.random.normal`` (23 random
    mantissa bits -> uniform on ``(-1, 1)`` -> ``sqrt(2) erf_inv``) applied to :func:`_bits`, so
    the same distribution from half the generator work: it equals ``jax.random.normal(key,
    (size,))`` computed under ``jax.threefry_partitionable(False)``. Other float widths (and
    non-threefry keys) use ``jax.random.normal`` itself."""
    if jnp.dtype(dtype) != jnp.float32 or str(jax.random.key_impl(key)) != "threefry2x32":
        return jax.random.normal(key, (size,), dtype)
    f = lax.bitcast_convert_type((_bits(key, size) >> jnp.uint32(9)) | jnp.uint32(0x3F800000), jnp.float32) - 1.0
    lo = np.nextafter(np.float32(-1.0), np.float32(0.0))
    u = lax.max(lo, f * (np.float32(1.0) - lo) + lo)  # as jax.random.uniform(minval=lo, maxval=1)
    return np.float32(np.sqrt(2.0)) * lax.erf_inv(u)


def draw_flat(plans, key, generation, index, rank: int | None, noise_reuse: int = 1,
              distribution: str = "normal", table=None):
    """The flat unit-scale vector of noise index ``index`` (length :func:`noise_size`, float32 or
    wider), or ``None`` when every leaf is frozen. :func:`split` cuts it into the leaves' blocks;
    keeping it lets one draw serve both the member forwards and the update. ``table``: the
    :func:`make_table` array, needed by (only) ``distribution='table'``.

    Errors: ``TypeError`` for ``plans`` that are not a list of :class:`LeafPlan` (``Eggroll.plan``),
    a non-integer ``rank``, ``generation`` or ``index``, a ``table`` that is not a 1-D float32/float64
    array; ``ValueError`` for ``rank=None`` with a low-rank leaf, negative counters, an unknown
    ``distribution``, ``distribution='table'`` without a table (or a ``table`` with another
    distribution), a table shorter than one window or with NaN/Inf."""
    V.check_choice(distribution, "distribution", DISTRIBUTIONS)
    rank = V.check_int(rank, "rank", low=1, allow_none=True)
    if isinstance(plans, (str, bytes)) or not isinstance(plans, (list, tuple)) \
            or not all(isinstance(p, LeafPlan) for p in plans):
        raise TypeError(f"plans must be the list of LeafPlan from Eggroll.plan(params), got {type(plans).__name__}")
    if rank is None and any(p.kind == LOWRANK for p in plans):
        raise ValueError("rank=None but the plans have low-rank leaves: pass the rank they were planned with")
    if table is not None and distribution != "table":
        raise ValueError(f"table is only used by distribution='table', got distribution={distribution!r}")
    active = [p for p in plans if p.kind != FROZEN]
    if not active:
        return None
    dt = functools.reduce(jnp.promote_types, [noise_dtype(p.dtype) for p in active])
    k = noise_key(key, generation, index, noise_reuse)
    if distribution == "table":
        if table is None:
            raise ValueError("distribution='table' needs the noise table: pass table=make_table(size) "
                             "(Eggroll.table)")
        size = noise_size(plans, rank)
        return _table_window(k, check_table(table, size), size, dt)
    if distribution == "rademacher":
        return _rademacher(k, noise_size(plans, rank), dt)
    return _normal(k, noise_size(plans, rank), dt)


def split(plans, z, rank: int | None):
    """Cut flat noise ``z`` (``[*lead, noise_size]``, from :func:`draw_flat`, any leading batch
    axes) into the leaves' blocks, aligned with ``plans`` (see :func:`draw`)."""
    if z is None:
        return [None] * len(plans)
    lead = z.shape[:-1]
    out, off = [], 0
    for p in plans:
        if p.kind == FROZEN:
            out.append(None)
            continue
        shp = _block_shape(p, rank)
        blk = z[..., off:off + math.prod(shp)].reshape(lead + tuple(shp))
        blk = blk.astype(noise_dtype(p.dtype))  # a no-op unless leaves mix float widths
        off += math.prod(shp)
        if p.kind == LOWRANK:
            m = axes_lib.matrix_shape(p.shape, p.ax)[1]
            out.append((blk[..., :m, :], blk[..., m:, :]))
        else:
            out.append(blk)
    return out


def draw(plans, key, generation, index, rank: int | None, noise_reuse: int = 1,
         distribution: str = "normal", table=None):
    """Unit-scale noise of every leaf for one noise index, aligned with ``plans``: ``(A, B)`` for a
    low-rank leaf (``A: [*batch, M, r]``, ``B: [*batch, N, r]``), an array of the leaf's shape for
    a full leaf, ``None`` for a frozen one.

    ``distribution='normal'`` (the paper's) draws standard normals; ``'rademacher'`` draws +-1
    entries (mean 0, variance 1, so ``A B^T / sqrt(r)`` still has unit-variance entries) from packed
    random bits -- 32 entries per threefry word instead of one, the cheap choice where the
    generator, not the matmuls, dominates (CPUs); ``'table'`` reads a window of ``table`` (the
    module docstring)."""
    return split(plans, draw_flat(plans, key, generation, index, rank, noise_reuse, distribution, table), rank)
