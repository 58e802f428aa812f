"""The chunkwise-parallel form of KDA / GDN (WY representation, UT transform by a triangular solve).

The sequence is cut into chunks of ``C`` tokens. Inside a chunk (positions ``r = 1..C``, cumulative
log-decay ``G_r = g_1 + ... + g_r``, state ``S0`` at the chunk start, ``q`` already scaled)::

    Gam[r, i, :] = exp(G_r - G_i)                         for i <= r  (0 above the diagonal)
    Akk[r, i]    = beta_r sum_d k_r[d] k_i[d] Gam[r, i, d]  for i <  r
    Aqk[r, i]    =        sum_d q_r[d] k_i[d] Gam[r, i, d]  for i <= r
    (I + Akk) [W | U] = Diag(beta) [exp(G) * K | V]         (one unit-lower triangular system)
    Vn  = U - W S0                                          (pseudo-values)
    O   = (exp(G) * Q) S0 + Aqk Vn
    S_C = Diag(exp(G_C)) S0 + (exp(G_C - G) * K)^T Vn

``T = (I + Akk)^{-1} Diag(beta)`` is the "UT transform" of the chunk's product of rank-1 transitions
(WY form). The intra-chunk part is computed for all chunks at once; a ``lax.scan`` carries the state
across chunks, so the sequential depth is ``T / C`` instead of ``T``.

Float32 safety: the paper's kernels factor ``exp(G_r - G_i) = exp(G_r) exp(-G_i)``, and ``exp(-G_i)``
overflows in float32 under strong decay (``g = -5`` per step over 64 tokens is ``exp(320)``). Here
every exponent is ``<= 0``: inside a 16-token sub-chunk the pairwise differences are formed first
and masked, ``exp(where(i <= r, G_r - G_i, -inf))`` (``O(C 16 K)`` per chunk); across sub-chunks
the decay factors through the cumulative decay ``G_p`` just before the query's sub-chunk,
``exp(G_r - G_p) exp(G_p - G_i)`` with ``i <= p < r`` (both ``<= 1``; the products are matmuls).
Any decay and any chunk size stay finite; ``exp(G)`` and ``exp(G_C - G)`` are ``<= 1`` as well.
Two cheaper tiers run first when the decay allows (``lax.cond``, see :func:`_pair_scores`): a
reference at the chunk's middle token (one ``[2C, K] x [K, C]`` matmul per chunk, when each chunk
spans ``<= 60`` of cumulative decay either side of it: every factor fits float32) and references
at the 16-token sub-chunk middles (when each sub-chunk spans ``<= 60``).
The unit-lower solve inverts the 16 x 16 diagonal blocks by forward substitution and finishes by
block substitution (matmuls): XLA's batched ``triangular_solve`` is slow on CPU.

Variable lengths: ``T`` need not be a multiple of ``C`` (the last chunk is padded with
``g = 0, beta = 0, q = k = v = 0``, which is an exact no-op of the recurrence), and ``lengths``
(``[B]``) pads each sequence the same way. Matches :mod:`lrjax.nn.attention.naive` to float64
round-off (tested <= 1e-12) and to <= 1e-5 in float32; differentiable (``jax.grad``).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from lrjax._validation import check_int
from lrjax.nn.attention._common import cast, prepare

__all__ = ["chunk_kda", "chunk_gdn", "DEFAULT_CHUNK"]

DEFAULT_CHUNK = 64
_HI = lax.Precision.HIGHEST


def _chunked(p, C: int):
    """Run the jitted core on a checked call; returns (o in v's dtype, final state)."""
    return _chunk_core(p.static(), C, *p.raw)


@partial(jax.jit, static_argnums=(0, 1))
def _chunk_core(p, C, q, k, v, g, beta, state, lengths):
    B, T, HV, K, V = p.B, p.T, p.HV, p.K, p.V
    q, k, v, g, beta, state = cast(p, q, k, v, g, beta, state, lengths)
    N = -(-T // C)
    pad = N * C - T

    def split(x):  # [B, T, HV, ...] -> [N, B, HV, C, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(B, N, C, *x.shape[2:])
        return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 2, 3)

    q, k, v, g = (split(x) for x in (q, k, v, g))
    beta = split(beta)                                          # [N, B, HV, C]
    # cumulative log-decay inside each chunk as a matmul with the lower-triangular ones matrix
    # (XLA:CPU's cumsum is a reduce_window, ~3x slower here)
    G = jnp.einsum("ri,...ik->...rk", jnp.tril(jnp.ones((C, C), g.dtype)), g, precision=_HI)
    c = _sub_size(C)
    Aqk, Akk = _pair_scores(q, k, G, C, c, p.scalar_gate)
    strict = jnp.arange(C)[:, None] > jnp.arange(C)[None, :]
    Akk = jnp.where(strict, Akk * beta[..., :, None], 0)
    eG = jnp.exp(G)
    rhs = beta[..., None] * jnp.concatenate([eG * k, v], axis=-1)
    WU = _unit_lower_solve(Akk, rhs, c)                          # (I + Akk)^{-1} rhs
    W, U = WU[..., :K], WU[..., K:]
    qg = eG * q
    GC = G[..., -1:, :]                                         # [N, B, HV, 1, K or 1]
    kd = jnp.exp(GC - G) * k
    gC = jnp.exp(GC[..., 0, :])                                 # [N, B, HV, K or 1]

    def body(S, x):  # one chunk: pseudo-values, outputs, next state (small [C, K] x [K, V] matmuls)
        qg, Aqk, W, U, kd, gC = x
        Vn = U - jnp.einsum("bhck,bhkv->bhcv", W, S, precision=_HI)
        o = (jnp.einsum("bhck,bhkv->bhcv", qg, S, precision=_HI)
             + jnp.einsum("bhci,bhiv->bhcv", Aqk, Vn, precision=_HI))
        S = gC[..., None] * S + jnp.einsum("bhck,bhcv->bhkv", kd, Vn, precision=_HI)
        return S, o

    # measured: keeping the output in the scan body beats emitting (S_c, Vn) and one batched
    # [C, K + C] x [K + C, V] matmul after it (the stacked S_c and the concatenations cost more)
    S, o = lax.scan(body, state, (qg, Aqk, W, U, kd, gC))     # o [N, B, HV, C, V]
    o = jnp.moveaxis(o, 3, 2)                                   # [N, B, C, HV, V]
    o = jnp.moveaxis(o, 0, 1).reshape(B, N * C, HV, V)[:, :T]
    return o.astype(p.out_dtype), S


def _sub_size(C: int) -> int:
    """Sub-chunk size: 16 when it divides C (fla's sub-chunking), else the whole chunk."""
    return 16 if C % 16 == 0 and C > 16 else C


_SPAN = 60.0   # largest |G_r - G_ref| the factorized scores accept (exp(60) ~ 1e26 fits float32)


def _pair_scores(q, k, G, C, c, scalar):
    """``Aqk[r, i] = sum_d q_r k_i exp(G_r - G_i)`` and the same for ``k, k`` (``[..., C, C]``; the
    caller masks ``i <= r`` / ``i < r``).

    GDN (scalar decay): ``(Q K^T) * exp(where(i <= r, G_r - G_i, -inf))``, exponents <= 0.
    KDA, three tiers chosen by ``lax.cond`` (only one runs): when every chunk spans at most ``_SPAN``
    of cumulative decay either side of its middle token ``G_m`` (any ``g >= -1.8`` per step at
    ``C = 64``), ``(q_r exp(G_r - G_m)) . (k_i exp(G_m - G_i))``: one ``[2C, K] x [K, C]`` matmul per
    chunk and two exponentials per element, every factor in ``[exp(-_SPAN), exp(_SPAN)]``. Else,
    when every sub-chunk of ``c`` tokens spans at most ``_SPAN`` (any ``g >= -7`` per step), ``exp(G_r - G_i) = exp(G_r - G_m) exp(G_m - G_i)`` with ``G_m`` the middle
    of the query's sub-chunk: one matmul per chunk, every factor <= ``exp(_SPAN)``, and keys past the
    sub-chunk masked to ``-inf`` before the exponential. Otherwise (``lax.cond``) the exact
    masked form of :func:`_pair_scores_masked`, whose exponents are all <= 0."""
    r = jnp.arange(C)
    incl = r[:, None] >= r[None, :]
    if scalar:
        Gs = G[..., 0]
        E = jnp.exp(jnp.where(incl, Gs[..., :, None] - Gs[..., None, :], -jnp.inf))
        qk = jnp.einsum("...rd,...id->...ri", q, k, precision=_HI)
        kk = jnp.einsum("...rd,...id->...ri", k, k, precision=_HI)
        return qk * E, kk * E
    n = C // c
    sh = q.shape[:-2]
    K = G.shape[-1]

    def fast(q, k, G, Gm, rel):
        fq = jnp.exp(rel).reshape(*sh, C, K)
        upto = r[None, :] < ((jnp.arange(n) + 1) * c)[:, None]               # [n, C]: i < end(a)
        kf = jnp.exp(jnp.where(upto[:, :, None], Gm[..., :, None, :] - G[..., None, :, :], -jnp.inf))
        kf = kf * k[..., None, :, :]                                          # [..., n, C, K]
        lhs = jnp.concatenate([q * fq, k * fq], axis=-2)                      # [..., 2C, K]
        M = jnp.einsum("...rd,...aid->...rai", lhs, kf, precision=_HI)        # [..., 2C, n, C]
        own = (jnp.arange(2 * C) % C // c)[:, None] == jnp.arange(n)[None, :]  # [2C, n]
        A = jnp.sum(jnp.where(own[:, :, None], M, 0), axis=-2)               # [..., 2C, C]
        A = jnp.where(incl, A.reshape(*sh, 2, C, C), 0)
        return A[..., 0, :, :], A[..., 1, :, :]

    def safe(q, k, G, Gm, rel):
        return _pair_scores_masked(q, k, G, C, c)

    def sub(q, k, G):
        Gs = G.reshape(*sh, n, c, K)
        Gm = Gs[..., c // 2, :]                                               # [..., n, K]
        rel = Gs - Gm[..., :, None, :]
        return lax.cond(jnp.max(jnp.abs(rel)) <= _SPAN, fast, safe, q, k, G, Gm, rel)

    # whole-chunk reference G_m (the chunk's middle token): one [2C, K] x [K, C] matmul per chunk
    relc = G - G[..., C // 2 : C // 2 + 1, :]
    spanc = jnp.max(jnp.abs(relc))

    def whole(q, k, G):
        f = jnp.exp(relc)                                                     # exp(G_r - G_m)
        kb = k * jnp.exp(-relc)                                               # k_i exp(G_m - G_i)
        lhs = jnp.concatenate([q * f, k * f], axis=-2)                        # [..., 2C, K]
        A = jnp.einsum("...rd,...id->...ri", lhs, kb, precision=_HI).reshape(*sh, 2, C, C)
        A = jnp.where(incl, A, 0)
        return A[..., 0, :, :], A[..., 1, :, :]

    return lax.cond(spanc <= _SPAN, whole, sub, q, k, G)


def _pair_scores_masked(q, k, G, C, c):
    """KDA pair scores with every exponent <= 0 (any decay): inside a sub-chunk of ``c`` tokens the
    masked pairwise exponent (``O(C c K)``), across sub-chunks the factorization through the
    cumulative decay ``G_p`` just before the query's sub-chunk, ``exp(G_r - G_p) exp(G_p - G_i)``
    with ``i <= p < r``."""
    n = C // c
    sh = q.shape[:-2]
    Kg = G.shape[-1]
    Gs = G.reshape(*sh, n, c, Kg)
    qs, ks = q.reshape(*sh, n, c, -1), k.reshape(*sh, n, c, -1)
    ri = jnp.arange(c)
    inc = ri[:, None] >= ri[None, :]
    Ed = jnp.exp(jnp.where(inc[:, :, None], Gs[..., :, None, :] - Gs[..., None, :, :], -jnp.inf))
    dqk = jnp.einsum("...rd,...id,...rid->...ri", qs, ks, Ed, precision=_HI)
    dkk = jnp.einsum("...rd,...id,...rid->...ri", ks, ks, Ed, precision=_HI)
    eye_n = jnp.eye(n, dtype=dqk.dtype)

    def blockdiag(d):  # [..., n, c, c] -> [..., C, C]
        return jnp.einsum("...arj,ab->...arbj", d, eye_n).reshape(*sh, C, C)

    if n == 1:
        return blockdiag(dqk), blockdiag(dkk)
    Gp = jnp.concatenate([jnp.zeros_like(Gs[..., :1, 0, :]), Gs[..., :-1, -1, :]], axis=-2)   # [..., n, Kg]
    fq = jnp.exp(Gs - Gp[..., :, None, :])                                                   # <= 1
    before = jnp.arange(C)[None, :] < (jnp.arange(n) * c)[:, None]                           # [n, C]: i < a c
    Dk = jnp.where(before[:, :, None], Gp[..., :, None, :] - G[..., None, :, :], -jnp.inf)   # [..., n, C, Kg]
    kf = jnp.exp(Dk) * k[..., None, :, :]                                                    # [..., n, C, K]
    oqk = jnp.einsum("...ark,...aik->...ari", qs * fq, kf, precision=_HI).reshape(*sh, C, C)
    okk = jnp.einsum("...ark,...aik->...ari", ks * fq, kf, precision=_HI).reshape(*sh, C, C)
    return oqk + blockdiag(dqk), okk + blockdiag(dkk)


def _unit_lower_solve(A, R, c):
    """``(I + A)^{-1} R`` for strictly lower ``A [..., C, C]``: the diagonal ``c x c`` blocks are
    inverted by forward substitution (``c`` vectorized steps), then block forward substitution
    with matmuls (XLA's batched ``triangular_solve`` is slow on CPU)."""
    C = A.shape[-1]
    n = C // c
    sh = A.shape[:-2]
    Ab = A.reshape(*sh, n, c, n, c)
    Ad = jnp.einsum("...aiaj->...aij", Ab)                                    # [..., n, c, c]
    eye = jnp.eye(c, dtype=A.dtype)

    def row(i, X):  # X = (I + Ad)^{-1}, rows < i final
        return X.at[..., i, :].set(eye[i] - jnp.einsum("...j,...jc->...c", Ad[..., i, :], X, precision=_HI))

    Xd = lax.fori_loop(1, c, row, jnp.broadcast_to(eye, Ad.shape))
    Rb = R.reshape(*sh, n, c, R.shape[-1])
    Y = []
    for a in range(n):
        acc = Rb[..., a, :, :]
        for b in range(a):
            acc = acc - jnp.einsum("...ij,...jf->...if", Ab[..., a, :, b, :], Y[b], precision=_HI)
        Y.append(jnp.einsum("...ij,...jf->...if", Xd[..., a, :, :], acc, precision=_HI))
    return jnp.concatenate(Y, axis=-2)


def chunk_kda(q, k, v, g, beta, *, scale=None, initial_state=None, lengths=None,
              chunk_size: int = DEFAULT_CHUNK):
    """KDA in chunkwise-parallel form: returns ``(o [B, T, HV, V], final_state [B, HV, K, V])``.

    Same arguments and result as :func:`lrjax.nn.attention.naive.recurrent_kda`, plus
    ``chunk_size`` (a positive int; fla uses 64, default 64; 16..64 are the useful sizes: larger
    chunks cost ``O(C^2 K)`` memory per chunk, smaller ones a deeper scan).
    """
    chunk_size = check_int(chunk_size, "chunk_size", low=1)
    p = prepare(q, k, v, g, beta, scale=scale, initial_state=initial_state, lengths=lengths)
    o, S = _chunked(p, chunk_size)
    return o, S


def chunk_gdn(q, k, v, g, beta, *, scale=None, initial_state=None, lengths=None,
              chunk_size: int = DEFAULT_CHUNK):
    """Gated DeltaNet in chunkwise form: :func:`chunk_kda` with ``g: [B, T, HV]`` (per head)."""
    chunk_size = check_int(chunk_size, "chunk_size", low=1)
    p = prepare(q, k, v, g, beta, scale=scale, initial_state=initial_state, lengths=lengths,
                scalar_gate=True)
    return _chunked(p, chunk_size)
