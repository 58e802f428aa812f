"""SLTrain: sparse plus low-rank weights trained from scratch (Han et al., *SLTrain: a sparse plus
low-rank approach for parameter and memory efficient pretraining*, NeurIPS 2024, arXiv 2406.02214;
official code andyjm3/SLTrain @2335d62c, ``splora/splora_linear.py``).

Every replaced linear map has the weight

.. math::  W = s\\,B A + S,\\qquad s = \\alpha / r

with low-rank factors ``A`` (rank ``r``) and a sparse ``S`` whose *support* (which entries may be
nonzero) is drawn at random once and then fixed: ``nnz = floor(delta * d_in * d_out)`` positions,
sorted, never trained. Only the factors and the ``nnz`` values of ``S`` are parameters, so a
``d_in x d_out`` layer has ``r (d_in + d_out) + floor(delta d_in d_out)`` (+ bias) parameters
(:func:`sltrain_num_params`).

Orientation (lrjax kernels are ``[in, out]``, ``y = x W``)
---------------------------------------------------------
The official code stores ``A: [r, d_in]``, ``B: [d_out, r]`` and ``S`` over the row-major
``[d_out, d_in]`` matrix (``y = x W_torch^T``). Here every matrix is in lrjax's ``[in, out]``
view: ``a = A^T: [d_in, r]``, ``b = B^T: [r, d_out]`` and

.. math::  W = s\\,a\\,b + S \\in \\mathbb{R}^{d_{in} \\times d_{out}},\\qquad y = x W + \\text{bias}

The support indices are int32 positions in the **row-major flattened ``[d_in, d_out]``** matrix
(``k = i * d_out + j`` for input ``i``, output ``j``). A torch index ``k_t = j * d_in + i`` is the
same entry; the draw is a uniform random subset either way (same distribution, another set).

Support draw [ours, documented]: ``numpy.random.default_rng(SeedSequence(seed)).choice(d_in d_out,
nnz, replace=False)``, sorted -- a uniform subset without replacement like the official
``torch.randperm(d_out * d_in)[:nnz]`` (:func:`sparse_support`). It is regenerated from the seed
(host side, at trace time), so it is a compile-time constant of the step, never a parameter, never
in the optimizer and (for :class:`lrjax.reparam.sltrain.SLTrain`) never in a checkpoint. The layer
:class:`SLTrainLinear` keeps it in a non-trainable :class:`SparseSupport` variable.

Init [code]: ``A`` kaiming-uniform with ``a = sqrt(5)`` = ``U(+-1/sqrt(d_in))``; ``B = 0`` (so
``W = S`` at init); ``S`` values ``U(+-1/sqrt(d_in))``; bias ``U(+-1/sqrt(d_in))`` (torch's
``nn.Linear`` bias bound is ``1/sqrt(fan_in)``) [ours: the official layer keeps the dense
``nn.Linear`` bias init].

Memory [code]: ``W`` is rebuilt from ``(a, b, values)`` inside :func:`jax.checkpoint` in the forward
*and again in the backward*, so no dense ``[d_in, d_out]`` weight is stored between them (the
residuals are ``x`` and the factors; see :func:`sltrain_matmul`). The backward is what autodiff
gives: ``G_W = x^T dy``, ``da = s G_W b^T``, ``db = s a^T G_W``, ``d values = G_W.flat[idx]``.

Speed: ``S`` is built by one scatter-add of the values into the low-rank product ``s a b`` (no
separate zero matrix) and the layer runs **one** dense matmul ``x W``. That is cheaper on CPU than
``s (x a) b + x S`` (two skinny matmuls plus a sparse product, for which XLA:CPU has no fast kernel):
forming ``W`` costs ``O(d_in d_out r)``, small next to ``O(tokens d_in d_out)`` once
``tokens >~ r``. Measured (2 shared CPU cores, heavily loaded, so +-20% noise): the jitted Adam
step of the char transformer (d=128, 2 layers, d_ff=512, batch 16 x 64 tokens) with SLTrain on
q/k/v/o/fc1/fc2 (r=32, delta=0.03, :func:`lrjax.factored`) took 1.04x (min) / 0.9-1.1x (median) of
the dense step; building ``S`` in a zero matrix and adding ``s a b`` measured the same within the
noise, and the scatter-add into ``s a b`` is kept because it needs no second ``[d_in, d_out]``
temporary.

Pure low-rank baseline (the paper's "low-rank" column): ``W = s a b`` with no sparse part,
:class:`LowRankLinear` / :func:`lowrank_init`. Both factors must start nonzero (with ``b = 0`` the
gradient of ``a`` is ``s G_W b^T = 0`` and of ``b`` is ``s a^T G_W``: it trains, but starts as a
zero map). Choice [ours]: ``a ~ U(+-1/sqrt(d_in))`` (kaiming-uniform, as SLTrain's ``A``),
``b ~ U(+-sqrt(3 / r) / s)``, which gives the entries of ``s a b`` the variance ``1 / (3 d_in)`` of a
dense kaiming-uniform ``U(+-1/sqrt(d_in))`` weight.

LLaMA parameter counts [verified]: :func:`llama_param_counts` with the paper's four configs
(:data:`SLTRAIN_LLAMA_CONFIGS`) gives full 58/134/368/1339M, low-rank 43/94/185/609M, SLTrain
44/97/194/646M (Table 2 of the paper), counting the RMSNorm weights and rounding half up.
"""
from __future__ import annotations

import functools
import math
import numbers
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrjax import _validation as V
from lrjax._validation import check_bool, check_dtype, check_float, check_int, check_key, check_rank, compute_dtype

__all__ = ["SLTrainLinear", "LowRankLinear", "SparseSupport", "nnz_count", "sparse_support", "sltrain_init",
           "lowrank_init", "sltrain_weight", "sltrain_matmul", "sltrain_num_params", "lowrank_num_params",
           "dense_num_params", "llama_param_counts", "SLTRAIN_LLAMA_CONFIGS", "DEFAULT_ALPHA", "DEFAULT_DELTA"]

#: the official scripts' ``sparsity`` (delta) for every model size
DEFAULT_DELTA = 0.03
#: the 60M script's ``lora_alpha`` (130M/350M use 16, 1B uses 8)
DEFAULT_ALPHA = 32.0

#: The paper's LLaMA configs (scripts ``sltrain{60m,130m,350m,1b}.sh``): hidden size, FFN size,
#: layers, SLTrain rank and alpha; vocab 32000, untied embeddings, no biases, delta 0.03.
SLTRAIN_LLAMA_CONFIGS = {
    "60M": dict(hidden=512, ffn=1376, layers=8, rank=128, alpha=32.0),
    "130M": dict(hidden=768, ffn=2048, layers=12, rank=256, alpha=16.0),
    "350M": dict(hidden=1024, ffn=2736, layers=24, rank=256, alpha=16.0),
    "1B": dict(hidden=2048, ffn=5461, layers=24, rank=512, alpha=8.0),
}


def _check_delta(delta, name="delta"):
    return check_float(delta, name, low=0.0, high=1.0, low_open=True, high_open=True)


def nnz_count(d_in: int, d_out: int, delta: float = DEFAULT_DELTA, *, name: str = "delta") -> int:
    """``nnz = floor(delta * d_in * d_out)`` (the official ``int(sparsity * in * out)``).

    Raises ValueError naming ``delta`` when ``delta`` is outside ``(0, 1)`` or gives no entry at
    all for this ``[d_in, d_out]`` matrix."""
    d_in = check_int(d_in, "d_in", low=1)
    d_out = check_int(d_out, "d_out", low=1)
    delta = _check_delta(delta, name)
    nnz = int(delta * d_in * d_out)
    if nnz < 1:
        raise ValueError(f"{name}={delta} gives floor({name} * {d_in} * {d_out}) = 0 sparse entries for a "
                         f"[{d_in}, {d_out}] matrix; raise `{name}` to at least {1.0 / (d_in * d_out):.3g} or use "
                         "the pure low-rank variant")
    return nnz


def _seed_entropy(seed, name="seed"):
    if isinstance(seed, (numbers.Integral, np.integer)) and not isinstance(seed, (bool, np.bool_)):
        return (check_int(seed, name, low=0),)
    if isinstance(seed, (tuple, list)) and seed and all(
            isinstance(s, (numbers.Integral, np.integer)) and not isinstance(s, (bool, np.bool_)) for s in seed):
        return tuple(check_int(s, name, low=0) for s in seed)
    raise TypeError(f"{name} must be an int >= 0 or a non-empty tuple of ints >= 0, got {seed!r:.60} "
                    f"({type(seed).__name__})")


@functools.lru_cache(maxsize=256)
def _support(entropy: tuple, d_in: int, d_out: int, nnz: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence(list(entropy)))
    idx = np.sort(rng.choice(d_in * d_out, size=nnz, replace=False)).astype(np.int32)
    idx.flags.writeable = False
    return idx


def sparse_support(d_in: int, d_out: int, delta: float = DEFAULT_DELTA, seed=0) -> np.ndarray:
    """The fixed random support: ``int32[nnz]`` sorted, distinct positions in the row-major
    flattened ``[d_in, d_out]`` matrix (``k = i * d_out + j``), ``nnz = floor(delta d_in d_out)``.

    ``seed``: an int ``>= 0`` or a tuple of ints (e.g. ``(seed, crc32(path), layer)``); the same
    seed always gives the same support (numpy ``SeedSequence`` + ``Generator.choice`` without
    replacement; a host-side NumPy array, cached). Needs ``d_in * d_out < 2**31``."""
    nnz = nnz_count(d_in, d_out, delta)
    if d_in * d_out >= 2 ** 31:
        raise ValueError(f"d_in * d_out = {d_in * d_out} does not fit int32 indices; split the layer")
    return _support(_seed_entropy(seed), int(d_in), int(d_out), nnz)


def path_seed(seed: int, path: str) -> tuple:
    """The support seed of a leaf ``path``: ``(seed, crc32(path))`` (stable across processes).
    TypeError naming ``seed`` / ``path`` for a non-int seed or a non-str path."""
    seed = check_int(seed, "seed", low=0)
    if not isinstance(path, str):
        raise TypeError(f"path must be a str (a leaf path such as 'Dense_0/kernel'), got {path!r:.60} "
                        f"({type(path).__name__})")
    return (seed, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def sltrain_init(key, d_in: int, d_out: int, rank: int, delta: float = DEFAULT_DELTA, *, dtype=jnp.float32):
    """``{"a": [d_in, r] ~ U(+-1/sqrt(d_in)), "b": zeros [r, d_out], "values": [nnz] ~ U(+-1/sqrt(d_in))}``
    (the official init; ``W = S`` at init). ``rank`` must satisfy ``1 <= rank <= min(d_in, d_out)``.
    ``key``: one JAX PRNG key (TypeError naming ``key`` otherwise)."""
    check_key(key, "key")
    d_in = check_int(d_in, "d_in", low=1)
    d_out = check_int(d_out, "d_out", low=1)
    check_rank(rank, d_in, d_out, "rank")
    nnz = nnz_count(d_in, d_out, delta)
    dtype = check_dtype(dtype, "dtype")
    ka, kv = jax.random.split(key)
    bound = 1.0 / math.sqrt(d_in)
    a = jax.random.uniform(ka, (d_in, rank), jnp.float32, -bound, bound).astype(dtype)
    v = jax.random.uniform(kv, (nnz,), jnp.float32, -bound, bound).astype(dtype)
    return {"a": a, "b": jnp.zeros((rank, d_out), dtype), "values": v}


def lowrank_init(key, d_in: int, d_out: int, rank: int, scale: float, *, dtype=jnp.float32):
    """Pure low-rank factors trained from scratch: ``a ~ U(+-1/sqrt(d_in))``, ``b ~ U(+-sqrt(3/r)/s)``
    so that ``s a b`` has the entry variance ``1/(3 d_in)`` of a kaiming-uniform dense weight
    [ours]. Both nonzero (a zero factor would start the layer as the zero map). ``key``: one JAX
    PRNG key (TypeError naming ``key`` otherwise)."""
    check_key(key, "key")
    d_in = check_int(d_in, "d_in", low=1)
    d_out = check_int(d_out, "d_out", low=1)
    check_rank(rank, d_in, d_out, "rank")
    scale = check_float(scale, "scale", low=0.0, low_open=True)
    dtype = check_dtype(dtype, "dtype")
    ka, kb = jax.random.split(key)
    ba = 1.0 / math.sqrt(d_in)
    bb = math.sqrt(3.0 / rank) / scale
    a = jax.random.uniform(ka, (d_in, rank), jnp.float32, -ba, ba).astype(dtype)
    b = jax.random.uniform(kb, (rank, d_out), jnp.float32, -bb, bb).astype(dtype)
    return {"a": a, "b": b}


def _weight(a, b, values, idx, scale, dtype):
    """``s a b + scatter(values at idx)`` in ``promote(a, b, values, float32)``, rounded once to
    ``dtype``; batched over leading axes of ``a``/``b``/``values``/``idx``."""
    cd = compute_dtype(a.dtype, b.dtype, *(() if values is None else (values.dtype,)))
    w = scale * jnp.matmul(a.astype(cd), b.astype(cd))
    if values is not None:
        m, n = w.shape[-2:]

        def add(wm, v, i):
            return wm.reshape(-1).at[i].add(v.astype(cd), indices_are_sorted=True,
                                            unique_indices=True).reshape(m, n)

        f = add
        for _ in range(w.ndim - 2):
            f = jax.vmap(f)
        w = f(w, values, jnp.asarray(idx))
    return w.astype(dtype)


def _check_scale(scale):
    if isinstance(scale, jax.core.Tracer) and scale.ndim == 0 and jnp.issubdtype(scale.dtype, jnp.floating):
        return scale
    return check_float(scale, "scale")


def _check_weight_args(a, b, values, idx, scale, *, sparse=True):
    """Eager checks of ``(a, b, values, idx, scale)``; returns ``(a, b, values, idx, scale, m, n)``.

    ``idx`` (when ``values`` is given): an integer array of ``values``' shape; when its contents
    are known (NumPy / a concrete jax array, not a tracer) every row must be strictly increasing
    (sorted, no duplicates) positions in ``[0, M N)`` -- the scatter assumes it and would otherwise
    drop, wrap or sum entries silently."""
    a = V.check_array(a, "a", min_ndim=2, kind="floating")
    b = V.check_array(b, "b", min_ndim=2, kind="floating")
    *bs, m, r = a.shape
    if b.ndim != a.ndim or tuple(b.shape[:-2]) != tuple(bs) or b.shape[-2] != r:
        raise ValueError(f"b must have shape [*batch, r, N] = [{', '.join(map(str, (*bs, r)))}, N] to match "
                         f"a {tuple(a.shape)} ([*batch, M, r]), got {tuple(b.shape)}")
    n = b.shape[-1]
    scale = _check_scale(scale)
    if values is None:  # pure low-rank: idx is not used
        return a, b, None, None, scale, m, n
    values = V.check_array(values, "values", min_ndim=1, kind="floating")
    if tuple(values.shape[:-1]) != tuple(bs):
        raise ValueError(f"values must have shape [*batch, nnz] with batch {tuple(bs)} (as a), got "
                         f"{tuple(values.shape)}")
    if idx is None:
        raise ValueError("idx is None but values is given; pass the support positions "
                         "(sparse_support(d_in, d_out, delta, seed)) or values=None for pure low-rank")
    idx = V.check_array(idx, "idx", kind="integer", convert=True)
    if tuple(idx.shape) != tuple(values.shape):
        raise ValueError(f"idx must have the shape of values {tuple(values.shape)} ([*batch, nnz], one position "
                         f"per value), got {tuple(idx.shape)}")
    if V.is_concrete(idx) and idx.size:
        iv = np.asarray(idx).astype(np.int64)
        lo, hi = int(iv.min()), int(iv.max())
        if lo < 0 or hi >= m * n:
            raise ValueError(f"idx holds positions in [{lo}, {hi}] but a [{m}, {n}] matrix has row-major "
                             f"positions 0 <= idx < {m * n}; build idx with sparse_support({m}, {n}, delta, seed)")
        if iv.shape[-1] > 1 and not np.all(np.diff(iv, axis=-1) > 0):
            raise ValueError("idx must be strictly increasing along its last axis (sorted, no duplicate "
                             "positions); sort it together with values (order = np.argsort(idx); "
                             "idx, values = idx[order], values[order]) and merge duplicates")
    return a, b, values, idx, scale, m, n


def _check_x(x, m):
    x = V.check_array(x, "x", min_ndim=1, kind="floating")
    if x.shape[-1] != m:
        raise ValueError(f"x must be an array [..., {m}] (its last axis is d_in), got shape {tuple(x.shape)}")
    return x


def sltrain_weight(a, b, values, idx, scale: float, dtype=None):
    """Dense ``W = s a b + S`` ``[*batch, d_in, d_out]`` (``S`` holds ``values`` at the flat row-major
    positions ``idx``; ``values=None`` gives the pure low-rank ``s a b`` and ``idx`` is not used).

    ``a: [*batch, d_in, r]``, ``b: [*batch, r, d_out]``, ``values``/``idx: [*batch, nnz]``. Computed in
    ``promote_types(a, b, values, float32)`` and rounded once to ``dtype`` (default: that compute
    dtype). Differentiable in ``a``, ``b``, ``values``; not checkpointed (see :func:`sltrain_matmul`).

    Raises (eagerly, naming the argument): TypeError for non-array / non-floating ``a``, ``b``,
    ``values``, a non-integer ``idx`` or a non-number ``scale``; ValueError for shapes that do not
    agree, and -- when ``idx`` is concrete -- positions outside ``[0, d_in d_out)`` or not strictly
    increasing (the scatter would drop, wrap or sum them silently)."""
    a, b, values, idx, scale, _, _ = _check_weight_args(a, b, values, idx, scale)
    dtype = check_dtype(dtype, "dtype", allow_none=True)
    cd = compute_dtype(a.dtype, b.dtype, *(() if values is None else (values.dtype,)))
    return _weight(a, b, values, idx, scale, cd if dtype is None else jnp.dtype(dtype))


def sltrain_matmul(x, a, b, values, idx, scale: float, bias=None, *, dtype=None):
    """``y = x (s a b + S) + bias`` with ``W`` rebuilt inside :func:`jax.checkpoint`: the forward saves
    only ``x`` and the factors, and the backward rebuilds ``W`` for ``dx = dy W^T`` (so no dense
    weight lives between forward and backward). ``x: [..., d_in]``; ``values=None`` gives the pure
    low-rank ``x (s a b)``. ``W`` is formed in float32 (or wider) and rounded once to ``dtype``
    (default ``x.dtype``), the dtype the product runs in; the result has that dtype.

    ``x`` must be a floating array (an integer ``x`` would round ``W`` to integers: TypeError,
    cast with ``x.astype(jnp.float32)``); ``bias``: ``[..., d_out]`` floating. Other checks as
    :func:`sltrain_weight` (TypeError/ValueError naming the argument, before tracing)."""
    a, b, values, idx, scale, m, n = _check_weight_args(a, b, values, idx, scale)
    x = _check_x(x, m)
    if bias is not None:
        bias = V.check_array(bias, "bias", min_ndim=1, last=n, kind="floating")
    dtype = check_dtype(dtype, "dtype", allow_none=True)
    return _matmul(x, a, b, values, idx, scale, bias, dtype)


def _matmul(x, a, b, values, idx, scale, bias, dtype):
    dt = jnp.dtype(x.dtype if dtype is None else dtype)
    idx = None if values is None else jnp.asarray(idx)

    @jax.checkpoint
    def f(x, a, b, values, idx):
        w = _weight(a, b, values, idx, scale, dt)
        return jnp.matmul(x.astype(dt), w)

    y = f(x, a, b, values, idx)
    if bias is not None:
        y = (y.astype(compute_dtype(dt, bias.dtype)) + bias).astype(dt)
    return y


# ------------------------------------------------------------------ parameter counts
def sltrain_num_params(d_in: int, d_out: int, rank: int, delta: float = DEFAULT_DELTA, *, bias: bool = False) -> int:
    """``r (d_in + d_out) + floor(delta d_in d_out)`` (+ ``d_out`` with a bias)."""
    check_bool(bias, "bias")
    nnz = nnz_count(d_in, d_out, delta)
    check_rank(rank, d_in, d_out, "rank")
    return rank * (d_in + d_out) + nnz + (d_out if bias else 0)


def lowrank_num_params(d_in: int, d_out: int, rank: int, *, bias: bool = False) -> int:
    """``r (d_in + d_out)`` (+ ``d_out`` with a bias)."""
    check_bool(bias, "bias")
    d_in = check_int(d_in, "d_in", low=1)
    d_out = check_int(d_out, "d_out", low=1)
    check_rank(rank, d_in, d_out, "rank")
    return rank * (d_in + d_out) + (d_out if bias else 0)


def dense_num_params(d_in: int, d_out: int, *, bias: bool = False) -> int:
    """``d_in d_out`` (+ ``d_out`` with a bias)."""
    check_bool(bias, "bias")
    return check_int(d_in, "d_in", low=1) * check_int(d_out, "d_out", low=1) + (d_out if bias else 0)


def llama_param_counts(hidden: int, ffn: int, layers: int, rank: int, delta: float = DEFAULT_DELTA, *,
                       vocab: int = 32000) -> dict:
    """Parameter counts of a LLaMA model (untied embeddings, no biases) whose attention
    (q, k, v, o: ``h x h``) and MLP (gate, up: ``h x ffn``; down: ``ffn x h``) linears are dense,
    pure low-rank (rank ``r``) or SLTrain (rank ``r``, ``delta``), as in the paper's Table 2.

    Counted: token embedding ``V h``, LM head ``h V``, two RMSNorm weights per layer and the final
    RMSNorm (``h`` each), the 7 linears per layer. Returns ``{"full": int, "lowrank": int,
    "sltrain": int}``; round to millions half up (``math.floor(n / 1e6 + 0.5)``) for the table."""
    h = check_int(hidden, "hidden", low=1)
    f = check_int(ffn, "ffn", low=1)
    L = check_int(layers, "layers", low=1)
    V = check_int(vocab, "vocab", low=1)
    shapes = [(h, h)] * 4 + [(h, f), (h, f), (f, h)]
    fixed = 2 * V * h + L * 2 * h + h
    return {
        "full": fixed + L * sum(dense_num_params(i, o) for i, o in shapes),
        "lowrank": fixed + L * sum(lowrank_num_params(i, o, rank) for i, o in shapes),
        "sltrain": fixed + L * sum(sltrain_num_params(i, o, rank, delta) for i, o in shapes),
    }


# ------------------------------------------------------------------ NNX layers
class SparseSupport(nnx.Variable):
    """The fixed support indices of :class:`SLTrainLinear` (int32, never trained: not an
    ``nnx.Param``, so ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and ``nnx.state(model,
    nnx.Param)`` leave it out)."""


def _check_rngs(rngs):
    if not isinstance(rngs, nnx.Rngs):
        raise TypeError(f"rngs must be an nnx.Rngs, got {type(rngs).__name__}")


class SLTrainLinear(nnx.Module):
    """``y = x (s a b + S) + bias``, the SLTrain linear layer (see the module docstring).

    Args:
      in_features, out_features: ``d_in``, ``d_out`` (ints ``>= 1``).
      rank: ``r``, an int with ``1 <= r <= min(d_in, d_out)``.
      delta: the support density, a float in ``(0, 1)``; ``nnz = floor(delta d_in d_out) >= 1``.
      alpha: ``s = alpha / r`` (positive float; default 32, the 60M script).
      use_bias: add a bias (``U(+-1/sqrt(d_in))`` init).
      seed: the support seed (int ``>= 0`` or tuple of ints); ``None`` draws one from
        ``rngs.params()`` (host-side, at construction).
      param_dtype: dtype of the parameters (default float32).
      dtype: the dtype the weight is rounded to and the matmul runs in (default: the input's).
      rngs: ``nnx.Rngs`` for the init.

    Parameters (``nnx.Param``): ``a [d_in, r]``, ``b [r, d_out]`` (zeros), ``values [nnz]``,
    ``bias [d_out]``; ``support`` is a :class:`SparseSupport` (int32 ``[nnz]``, not trained).
    Raises TypeError/ValueError naming the argument for bad input (delta outside ``(0, 1)``,
    rank above ``min(d_in, d_out)``, a non-int or bool rank, ...); calling it with a non-floating
    ``x`` (an integer ``x`` would round ``W`` to integers) or a non-array ``x`` is a TypeError.

    Stacks: the support is fixed by ``seed`` alone. A stack built with ``nnx.vmap`` over the
    constructor (``nnx.vmap(lambda r: SLTrainLinear(..., seed=7, rngs=r))(nnx.Rngs(...))``) with one
    ``seed`` therefore gives **every layer the same support** (only ``a``/``b``/``values`` differ).
    For a support per layer, build the layers with a seed each, e.g. ``[SLTrainLinear(...,
    seed=(7, l), rngs=rngs) for l in range(L)]``, or stack the supports yourself
    (``jnp.stack([sparse_support(m, n, delta, (7, l)) for l in range(L)])`` into the vmapped
    module's ``support``). :class:`lrjax.reparam.sltrain.SLTrain` does this per leaf and per layer
    of an ``[L, M, N]`` stack (``seed=(seed, crc32(path), l)``).
    """

    def __init__(self, in_features: int, out_features: int, *, rank: int, delta: float = DEFAULT_DELTA,
                 alpha: float = DEFAULT_ALPHA, use_bias: bool = True, seed=None, param_dtype=jnp.float32,
                 dtype=None, rngs: nnx.Rngs):
        self.in_features = m = check_int(in_features, "in_features", low=1)
        self.out_features = n = check_int(out_features, "out_features", low=1)
        self.rank = check_rank(rank, m, n, "rank")
        self.delta = _check_delta(delta)
        self.alpha = check_float(alpha, "alpha", low=0.0, low_open=True)
        self.use_bias = check_bool(use_bias, "use_bias")
        param_dtype = check_dtype(param_dtype, "param_dtype")
        self.dtype = check_dtype(dtype, "dtype", allow_none=True)
        _check_rngs(rngs)
        nnz_count(m, n, self.delta)
        if seed is None:
            draw = jax.random.randint(rngs.params(), (), 0, 2 ** 31 - 1)
            if isinstance(draw, jax.core.Tracer):
                raise TypeError("seed=None draws the support seed from rngs, which are traced here (nnx.eval_shape "
                                "/ jit); pass seed=<int> so the support can be built on the host")
            seed = int(draw)
        self.seed = _seed_entropy(seed, "seed")
        f = sltrain_init(rngs.params(), m, n, self.rank, self.delta, dtype=param_dtype)
        self.a, self.b, self.values = nnx.Param(f["a"]), nnx.Param(f["b"]), nnx.Param(f["values"])
        self.support = SparseSupport(jnp.asarray(sparse_support(m, n, self.delta, self.seed)))
        self.bias = nnx.Param(jax.random.uniform(rngs.params(), (n,), jnp.float32, -1 / math.sqrt(m),
                                                 1 / math.sqrt(m)).astype(param_dtype)) if self.use_bias else None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def weight(self):
        """The dense ``W = s a b + S`` ``[d_in, d_out]`` (for inspection/export; the forward never stores it)."""
        return sltrain_weight(self.a[...], self.b[...], self.values[...], self.support[...], self.scale,
                              self.a[...].dtype)

    def __call__(self, x):
        x = _check_x(x, self.in_features)
        return _matmul(x, self.a[...], self.b[...], self.values[...], self.support[...], self.scale,
                       None if self.bias is None else self.bias[...], self.dtype)


class LowRankLinear(nnx.Module):
    """The pure low-rank baseline ``y = x (s a b) + bias`` trained from scratch (no sparse part);
    the paper's "low-rank" arm at the same ``r``. Init: :func:`lowrank_init` (both factors nonzero,
    ``s a b`` with the entry variance of a kaiming-uniform dense weight) [ours]. ``W`` is formed
    inside :func:`jax.checkpoint` like :class:`SLTrainLinear` (one matmul ``x W``).

    Args as :class:`SLTrainLinear` without ``delta``/``seed``. Parameters: ``a [d_in, r]``,
    ``b [r, d_out]``, ``bias [d_out]`` (``r (d_in + d_out) (+ d_out)``)."""

    def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float = DEFAULT_ALPHA,
                 use_bias: bool = True, param_dtype=jnp.float32, dtype=None, rngs: nnx.Rngs):
        self.in_features = m = check_int(in_features, "in_features", low=1)
        self.out_features = n = check_int(out_features, "out_features", low=1)
        self.rank = check_rank(rank, m, n, "rank")
        self.alpha = check_float(alpha, "alpha", low=0.0, low_open=True)
        self.use_bias = check_bool(use_bias, "use_bias")
        param_dtype = check_dtype(param_dtype, "param_dtype")
        self.dtype = check_dtype(dtype, "dtype", allow_none=True)
        _check_rngs(rngs)
        f = lowrank_init(rngs.params(), m, n, self.rank, self.scale, dtype=param_dtype)
        self.a, self.b = nnx.Param(f["a"]), nnx.Param(f["b"])
        self.bias = nnx.Param(jax.random.uniform(rngs.params(), (n,), jnp.float32, -1 / math.sqrt(m),
                                                 1 / math.sqrt(m)).astype(param_dtype)) if self.use_bias else None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def weight(self):
        return sltrain_weight(self.a[...], self.b[...], None, None, self.scale, self.a[...].dtype)

    def __call__(self, x):
        x = _check_x(x, self.in_features)
        return _matmul(x, self.a[...], self.b[...], None, None, self.scale,
                       None if self.bias is None else self.bias[...], self.dtype)
