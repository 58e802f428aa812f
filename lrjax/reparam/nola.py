"""NOLA: LoRA factors as linear combinations of seed-regenerated random bases.

Paper: Koohpayegani, Navaneet, Nooralinejad, Kolouri, Pirsiavash, *NOLA: Compressing LoRA using
Linear Combination of Random Basis*, ICLR 2024 (arXiv:2310.02556). Official code
``UCDvision/NOLA`` @03c7027c244b (``gpt/src/model_nola.py::GenerateParams, NOLALinear, LoRA``
for GPT-2/LLaMA; ``vit/NOLA.py::NOLA2`` and ``vit/nola_mlp.py`` for ViT), whose facts are
followed here. Only the coefficients train; the bases are regenerated from a stored seed in every
forward and backward pass and are never stored.

In lrjax's matrix view (``y = x W_eff``, ``A: [M=in, r]``, ``B: [r, N=out]``; the torch code's
``lora_A.weight`` is ``A^T``, ``[r, in]``):

.. math::  W_\\text{eff} = W + s\\,A_\\text{eff} B_\\text{eff},\\qquad
           A_\\text{eff} = A_0 + \\sum_{i=1}^{k_a} \\alpha_i \\bar A_i,\\qquad
           B_\\text{eff} = \\sum_{j=1}^{k_b} \\beta_j \\bar B_j

Two conventions of the official code (``convention=``):

* ``"gpt"`` (GPT-2 / LLaMA code, default): ``A_0`` is a frozen LoRA ``A`` (torch's
  ``kaiming_uniform_(a=sqrt(5))`` on ``lora_A.weight``: ``U(-1/sqrt(M), 1/sqrt(M))``), regenerated
  here from the seed; ``B``'s frozen base is 0. Bases ``\\bar A_i, \\bar B_j`` have entries
  ``U(-1, 1) / sqrt(k)`` (``k = k_a`` resp. ``k_b``). ``alpha = beta = 0`` at init, so the model
  output is unchanged at init. ``s = alpha_cfg / r`` (``alpha=None`` means ``alpha = r``, ``s = 1``;
  the official GPT-2 E2E script uses ``r = 8``, ``alpha = 8``, ``k = 512``). Each leaf has its own
  seed (official: ``torch.randint`` per layer, saved with the adapter).
* ``"vit"`` (``NOLA2``): no ``A_0``; bases are kaiming-uniform(a=sqrt(5)) slices of the 3-D tensors
  ``[k_a, M, r]`` and ``[k_b, r, N]`` (torch's fan-in of such a tensor is ``M r`` resp. ``r N``), so
  entries ``U(-1/sqrt(M r), 1/sqrt(M r))`` resp. ``U(-1/sqrt(r N), 1/sqrt(r N))``.
  ``alpha = 1/k_a``, ``beta = 1/k_b`` at init, so **dW != 0 at init** (the model output changes
  at init, as in the official code). ``s = alpha_cfg / r`` with ``alpha=None`` meaning
  ``alpha = 1`` (official ``scale = 1/rank``). The official code seeds torch with 0 before making
  every layer's bases, so all same-shape layers share their bases; here every leaf stores the *root*
  init key as its seed, so same-shape leaves (and every layer of a stacked leaf) share bases, and
  leaves of another shape get independent bases (the shape is mixed into the stream; the official
  torch stream would share a prefix). The official ``d`` reshaping option is not reproduced
  (``d = 0``, its default, is).

Naming: the adapter factors are ``{"alpha": [*batch, k_a], "beta": [*batch, k_b],
"seed": uint32[*batch, 2]}``; ``alpha`` the *factor* (NOLA's coefficients of A) is unrelated to
``alpha`` the *config field* (LoRA's scale numerator). ``seed`` is frozen
(``frozen_keys = seed_keys = ("seed",)``); use :meth:`~lrjax.reparam.base.Reparam.split` so that
``grad`` and optax see only ``alpha`` and ``beta``. :meth:`num_params` is ``k_a + k_b`` per
matrix.

Example::

    from lrjax.reparam.nola import NOLA
    rp = NOLA(rank=8, num_basis=1024, targets=".*/kernel")     # "gpt" convention, s = 1
    base, ad = rp.init(key, params)                              # base is params
    trainable, frozen = rp.split(ad)                             # {alpha, beta} | {seed}
    loss = lambda t: loss_fn(lrjax.factored(apply_fn, rp)(base, rp.join(t, frozen), x), y)
    grads = jax.grad(loss)(trainable)                            # optax sees alpha, beta only

Generator (a documented deviation from ``jax.random``)
------------------------------------------------------
The bases need ``k_a M r + k_b r N`` random numbers per leaf and pass (67 M per pass for the
whole 4 x 1024 x 1024 bench MLP at ``k = 1024``, ``r = 8``), twice per training step (the
backward pass regenerates them). With threefry (``jax.random.uniform``) that made a NOLA step ~20x a LoRA step on CPU
(``experiments/bench_nola_memory.py --threefry``), so NOLA uses a counter-based hash instead:
with the leaf seed ``(s0, s1)``, a stream id ``t`` (0: ``A_0``, 1: ``\\bar A``, 2: ``\\bar B``),
the basis shape ``(p, q)``, basis index ``i`` and entry index ``e`` (all uint32 arithmetic mod
2^32, ``f`` the murmur3 32-bit finalizer ``fmix32``, ``G = 0x9E3779B9``)::

    h   = f(f(p * G + q) + t * G)
    sa  = f(s0 + h);       sb = f(s1 ^ sa)
    ka  = f(i * G + sa);   kb = f(ka + sb)       # two well-mixed keys per basis
    x   = f((e ^ ka) + kb);    v = x >> 9        # 23 random bits per entry
    u   = (2 v + 1) / 2^23 - 1                   # uniform on 2^23 levels in (-1, 1), exact in float32

basis ``i`` is ``u`` over ``e = 0 .. p q - 1`` reshaped row-major to ``[p, q]`` (``A_0`` is basis
0 of stream 0). It is pure uint32 arithmetic, so the bases are bit-identical across processes,
device counts and backends, and independent of ``chunk_size`` (tests transcribe it in NumPy). It
is a hash, not a cryptographic or statistically certified generator; two keys per basis keep
different bases from being shifted copies of one sequence. On XLA:CPU the generation runs on one
thread (measured: ~9 ms per 1024 x 8 factor per step with ``k = 1024``).

Memory bound: the bases of one leaf are generated ``chunk_size`` at a time inside a ``lax.scan``
whose body is ``jax.checkpoint``-ed, so neither pass holds more than ``chunk_size * max(M r, r N)``
basis entries (float32) per leaf at a time, plus the ``[M, r]`` / ``[r, N]`` results; the backward
pass regenerates each chunk to form ``dL/dalpha_i = <dL/dA_eff, \\bar A_i>_F`` (and likewise
``beta``) instead of storing ``k x M x r`` bases. (Measured with XLA's ``memory_analysis`` on the
bench MLP: the compiled step's temporaries are 22 MiB for ``chunk_size`` 8..32, as LoRA's, and
512 MiB with all 1024 bases in one chunk.)

Precision: coefficients and bases are combined in ``promote_types(w, alpha, beta, float32)``
(bases generated in float32); ``W + s A_eff B_eff`` is rounded once to the base leaf's dtype.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lrjax import _validation as V
from lrjax.reparam.base import LowRankForm, Reparam

__all__ = ["NOLA", "nola_uniform"]

_G = 0x9E3779B9
_M1, _M2 = 0x85EBCA6B, 0xC2B2AE35
_STREAM_A0, _STREAM_A, _STREAM_B = 0, 1, 2


def _u32(x):
    return jnp.uint32(x)


def _fmix32(x):
    """murmur3's 32-bit finalizer (a bijection of uint32 with full avalanche)."""
    x = x ^ (x >> 16)
    x = x * _u32(_M1)
    x = x ^ (x >> 13)
    x = x * _u32(_M2)
    return x ^ (x >> 16)


def nola_uniform(seed, stream: int, shape, index):
    """The NOLA bases ``index`` (uint32 ``[c]``) of stream ``stream`` and basis shape ``(p, q)``,
    regenerated from ``seed`` (uint32 ``[2]``): float32 ``[c, p, q]`` uniform in ``(-1, 1)``.

    The generator is the counter-based hash of the module docstring (pure uint32 arithmetic: the same
    bits on every process, device count and backend). Works under ``jit``/``vmap``. Multiply by the
    convention's scale to get NOLA's bases (``1/sqrt(k)``; ``"vit"``: ``1/sqrt(M r)``, ``1/sqrt(r N)``).

    Raises:
      TypeError/ValueError naming ``seed`` (not uint32 ``[2]``), ``stream`` (not an int ``>= 0``),
      ``shape`` (not two ints ``>= 1`` with ``p q < 2^32``) or ``index`` (not a 1-D integer array).
    """
    V.check_int(stream, "stream", low=0, high=2 ** 32 - 1)
    if not isinstance(shape, (tuple, list)) or len(shape) != 2:
        raise TypeError(f"shape must be a pair (p, q) of ints, got {V._fmt(shape)}")
    p, q = V.check_int(shape[0], "shape[0]", low=1), V.check_int(shape[1], "shape[1]", low=1)
    if p * q >= 2 ** 32:
        raise ValueError(f"shape: a basis of {p} x {q} entries exceeds the generator's 2^32 entry counter")
    seed = V.check_array(seed, "seed", ndim=1, kind="integer", convert=True)
    if seed.shape != (2,) or seed.dtype != jnp.uint32:
        raise TypeError(f"seed must be raw PRNG key data uint32[2] (jax.random.key_data), got "
                        f"{seed.dtype}{tuple(seed.shape)}")
    index = V.check_array(index, "index", ndim=1, kind="integer", convert=True).astype(jnp.uint32)
    h = _fmix32(_fmix32(_u32(p) * _u32(_G) + _u32(q)) + _u32(stream) * _u32(_G))
    sa = _fmix32(seed[0] + h)
    sb = _fmix32(seed[1] ^ sa)
    ka = _fmix32(index * _u32(_G) + sa)
    kb = _fmix32(ka + sb)
    e = jnp.arange(p * q, dtype=jnp.uint32)
    x = _fmix32((e[None, :] ^ ka[:, None]) + kb[:, None])  # [c, p q]
    v = (x >> 9).astype(jnp.float32)  # 23 random bits, exact in float32
    u = (v * 2.0 + (1.0 - 2.0 ** 23)) * (2.0 ** -23)
    return u.reshape(index.shape[0], p, q)


def _combine(seed, stream, coef, shape, chunk):
    """``sum_i coef[i] * U_i`` (``U_i = nola_uniform(seed, stream, shape, [i])[0]``) in ``coef.dtype``,
    ``chunk`` bases at a time in a scan with a rematerialized body (bounded memory in both passes)."""
    k = coef.shape[0]
    dt = coef.dtype
    p, q = shape

    @jax.checkpoint
    def part(start, c):
        u = nola_uniform(seed, stream, shape, start + jnp.arange(c.shape[0], dtype=jnp.uint32))
        return jnp.tensordot(c, u.astype(dt), axes=1)

    cs = min(chunk, k)
    nfull, rem = divmod(k, cs)
    acc = jnp.zeros((p, q), dt)
    if nfull == 1:
        acc = part(jnp.uint32(0), coef[:cs])
    elif nfull > 1:
        def body(a, xs):
            start, c = xs
            return a + part(start, c), None
        starts = jnp.arange(nfull, dtype=jnp.uint32) * jnp.uint32(cs)
        acc, _ = lax.scan(body, acc, (starts, coef[: nfull * cs].reshape(nfull, cs)))
    if rem:
        acc = acc + part(jnp.uint32(nfull * cs), coef[nfull * cs:])
    return acc


def _key_data(key):
    return jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else \
        jnp.asarray(key, jnp.uint32)


@dataclasses.dataclass(frozen=True)
class NOLA(Reparam):
    """NOLA: ``W_eff = W + s (A_0 + sum alpha_i Abar_i)(sum beta_j Bbar_j)`` (module doc).

    Args:
      rank: ``r`` of the generated factors, an int ``>= 1`` and ``<= min(M, N)`` of every targeted
        leaf (checked by ``init``). Official: 8 (GPT-2), 16 (LLaMA-2), 1 (ViT).
      alpha: the scale numerator, ``s = alpha / r``: a finite real ``> 0`` or ``None`` (``"gpt"``:
        ``alpha = r``, ``s = 1``; ``"vit"``: ``alpha = 1``, ``s = 1/r`` as the official ``NOLA2``).
      num_basis: ``k`` (the same for A and B) or a pair ``(k_a, k_b)`` of ints ``>= 1``; default 1024
        (official ViT; GPT-2 uses 512). Trainable scalars per matrix: ``k_a + k_b``.
      convention: ``"gpt"`` (default; output unchanged at init) or ``"vit"`` (the official ViT
        code: coefficients start at ``1/k``, so the weight **changes at init**, and every leaf of
        a shape shares one set of bases; module doc).
      chunk_size: bases generated at a time (an int ``>= 1``, default 32); bounds memory at
        ``chunk_size * max(M r, r N)`` float32 entries per leaf. Results equal for every value
        (up to float32 summation order).
      targets, axes: as for :class:`lrjax.LoRA`.
      dtype: dtype of the coefficients ``alpha``, ``beta`` (default: the base leaf's).

    Raises:
      TypeError/ValueError naming ``num_basis``, ``convention`` or ``chunk_size`` at construction;
      ``ValueError`` naming ``adapters`` for coefficient vectors that do not have ``k_a`` / ``k_b``
      entries or batch shapes that do not fit the leaf, and ``TypeError`` for a seed that is not
      ``uint32[*batch, 2]``.
    """

    num_basis: int | tuple = 1024
    convention: str = "gpt"
    chunk_size: int = 32

    factor_keys = ("alpha", "beta", "seed")
    frozen_keys = ("seed",)
    seed_keys = ("seed",)

    def __post_init__(self):
        super().__post_init__()
        nb = self.num_basis
        if isinstance(nb, list):
            nb = tuple(nb)
        if isinstance(nb, tuple):
            if len(nb) != 2:
                raise ValueError(f"num_basis must be an int k or a pair (k_a, k_b), got a tuple of length {len(nb)}")
            nb = (V.check_int(nb[0], "num_basis[0] (k_a)", low=1), V.check_int(nb[1], "num_basis[1] (k_b)", low=1))
        else:
            nb = V.check_int(nb, "num_basis", low=1)
        object.__setattr__(self, "num_basis", nb)
        V.check_choice(self.convention, "convention", ("gpt", "vit"))
        V.check_int(self.chunk_size, "chunk_size", low=1)

    @property
    def k_a(self) -> int:
        return self.num_basis[0] if isinstance(self.num_basis, tuple) else self.num_basis

    @property
    def k_b(self) -> int:
        return self.num_basis[1] if isinstance(self.num_basis, tuple) else self.num_basis

    @property
    def scale(self) -> float:
        """``s = alpha / r``; ``alpha=None`` means ``r`` (``"gpt"``) or ``1`` (``"vit"``)."""
        alpha = self.alpha if self.alpha is not None else (self.rank if self.convention == "gpt" else 1.0)
        return float(alpha) / float(self.rank)

    def leaf_key(self, key, path):
        # "vit": every leaf keeps the root key (the official code seeds torch with 0 for every layer)
        return key if self.convention == "vit" else super().leaf_key(key, path)

    # ------------------------------------------------------------------ protocol hooks
    def init_leaf(self, key, w, path):
        """Seed = the leaf key's data (one per matrix of a stacked leaf for ``"gpt"``, shared for
        ``"vit"``); ``alpha = beta = 0`` (``"gpt"``) or ``1/k_a``, ``1/k_b`` (``"vit"``)."""
        *bs, m, n = w.shape
        bs = tuple(bs)
        dt = self.factor_dtype(w)
        if not bs:
            seed = _key_data(key)
        elif self.convention == "vit":
            seed = jnp.broadcast_to(_key_data(key), bs + (2,))
        else:
            seed = _key_data(jax.random.split(key, int(np.prod(bs)))).reshape(bs + (2,))
        if self.convention == "gpt":
            a, b = jnp.zeros(bs + (self.k_a,), dt), jnp.zeros(bs + (self.k_b,), dt)
        else:
            a, b = jnp.full(bs + (self.k_a,), 1.0 / self.k_a, dt), jnp.full(bs + (self.k_b,), 1.0 / self.k_b, dt)
        return w, {"alpha": a, "beta": b, "seed": jnp.asarray(seed, jnp.uint32)}

    def effective_factors(self, m: int, n: int, f: Mapping, dtype=jnp.float32):
        """``(A_eff [*batch, M, r], B_eff [*batch, r, N])`` of one leaf's adapter in ``dtype``."""
        alpha, beta, seed = f["alpha"], f["beta"], f["seed"]
        bs = tuple(alpha.shape[:-1])
        r = self.rank
        sa = 1.0 / math.sqrt(self.k_a) if self.convention == "gpt" else 1.0 / math.sqrt(m * r)
        sb = 1.0 / math.sqrt(self.k_b) if self.convention == "gpt" else 1.0 / math.sqrt(r * n)

        def one(sd, al, be):
            a = _combine(sd, _STREAM_A, al.astype(dtype), (m, r), self.chunk_size) * jnp.asarray(sa, dtype)
            if self.convention == "gpt":
                a0 = nola_uniform(sd, _STREAM_A0, (m, r), jnp.zeros((1,), jnp.uint32))[0]
                a = a0.astype(dtype) * jnp.asarray(1.0 / math.sqrt(m), dtype) + a
            b = _combine(sd, _STREAM_B, be.astype(dtype), (r, n), self.chunk_size) * jnp.asarray(sb, dtype)
            return a, b

        if not bs:
            return one(seed, alpha, beta)
        nb = int(np.prod(bs))
        a, b = jax.vmap(one)(seed.reshape(nb, 2), alpha.reshape(nb, -1), beta.reshape(nb, -1))
        return a.reshape(bs + (m, r)), b.reshape(bs + (r, n))

    def factors(self, w, f) -> LowRankForm:
        """``(A_eff, B_eff, s, None)`` with the bases regenerated from ``f["seed"]`` (compute dtype)."""
        a, b = self.effective_factors(w.shape[-2], w.shape[-1], f, self.compute_dtype(w, f))
        return LowRankForm(a, b, self.scale, None)

    def check_factors(self, path, f, bshape, m, n, argname, shape=None):
        """``alpha: [*bshape, k_a]``, ``beta: [*bshape, k_b]``, ``seed: uint32[*bshape, 2]``."""
        want = {"alpha": bshape + (self.k_a,), "beta": bshape + (self.k_b,), "seed": bshape + (2,)}
        for nm, shp in want.items():
            if tuple(f[nm].shape) != shp:
                what = {"alpha": "k_a", "beta": "k_b", "seed": "2 (raw key data)"}[nm]
                exc = TypeError if nm == "seed" and f[nm].shape[-1:] != (2,) else ValueError
                raise exc(f"{argname}[{path!r}][{nm!r}] has shape {tuple(f[nm].shape)}, expected {shp} (batch "
                          f"{bshape} of the base leaf's matrix view, then {what}); adapters made with another "
                          "num_basis or for another base?")
