"""The recurrent form of Kimi Delta Attention (KDA) and Gated DeltaNet (GDN), and the decode step.

Per value head, with a state ``S in R^{K x V}``, a log-decay ``g_t <= 0`` (``alpha_t = exp(g_t)``),
a write strength ``beta_t`` and the query scaled by ``scale`` (default ``K**-0.5``)::

    S_t = (I - beta_t k_t k_t^T) Diag(alpha_t) S_{t-1} + beta_t k_t v_t^T,    o_t = S_t^T q_t

computed in the equivalent "error-correcting" order ``S' = Diag(alpha_t) S_{t-1}``,
``S_t = S' + beta_t k_t (v_t - S'^T k_t)^T`` (Kimi Linear, arXiv 2510.26692; fla's
``naive_recurrent_kda``). The transition ``(I - beta k k^T) Diag(alpha)`` is diagonal plus rank one:
each token writes a rank-1 correction into a fixed-size state, which is why decoding needs
``O(HV K V)`` memory whatever the context length.

* **KDA**: ``g: [B, T, HV, K]`` (one decay per key dimension, fine-grained forgetting).
* **GDN** (Gated DeltaNet): ``g: [B, T, HV]`` (one decay per head); :func:`recurrent_gdn` and
  :func:`gdn_step` insist on it, :func:`recurrent_kda` accepts either.

Shapes follow fla: ``q, k: [B, T, H, K]``, ``v: [B, T, HV, V]``, ``beta: [B, T, HV]``, states
``[B, HV, K, V]``; ``HV`` must be a multiple of ``H`` (grouped value heads: value head ``j`` reads
query/key head ``j // (HV // H)``).

Precision: everything runs in ``promote_types(inputs, float32)`` (bfloat16 inputs compute and keep
the state in float32); the output has ``v``'s dtype (rounded once), the final state the compute
dtype. ``lengths`` (``[B]`` ints, right padding) makes the steps ``t >= lengths[b]`` exact no-ops:
the final state is the state after the last valid token and those outputs are 0.

q and k are *not* normalized here (the KDA layer L2-normalizes them before the kernel, as fla's
``use_qk_l2norm_in_kernel``); with unnormalized keys and ``beta > 2/|k|^2`` the update is not a
contraction, as in the paper.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from functools import partial

from lrjax.nn.attention._common import cast, prepare

__all__ = ["recurrent_kda", "kda_step", "recurrent_gdn", "gdn_step"]

_HI = lax.Precision.HIGHEST


def _scan(p):
    """Run the jitted core on a checked call; returns (o in v's dtype, final state)."""
    return _scan_core(p.static(), *p.raw)


@partial(jax.jit, static_argnums=0)
def _scan_core(p, q, k, v, g, beta, state, lengths):
    """lax.scan over time; o [B, T, HV, V] rounded once to v's dtype, S in the compute dtype."""
    q, k, v, g, beta, state = cast(p, q, k, v, g, beta, state, lengths)
    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta))

    def body(S, x):
        q, k, v, g, b = x                                  # [B, HV, K] ..., g [B, HV, K or 1]
        S = S * jnp.exp(g)[..., None]
        err = v - jnp.einsum("bhk,bhkv->bhv", k, S, precision=_HI)
        S = S + (b[..., None] * k)[..., None] * err[..., None, :]
        o = jnp.einsum("bhk,bhkv->bhv", q, S, precision=_HI)
        return S, o

    S, o = lax.scan(body, state, xs)
    return jnp.moveaxis(o, 0, 1).astype(p.out_dtype), S


def recurrent_kda(q, k, v, g, beta, *, scale=None, initial_state=None, lengths=None):
    """KDA by a ``lax.scan`` over tokens: returns ``(o [B, T, HV, V], final_state [B, HV, K, V])``.

    Args:
      q, k: ``[B, T, H, K]`` queries and keys.
      v: ``[B, T, HV, V]`` values, ``HV`` a multiple of ``H``.
      g: finite log-decay ``<= 0``, ``[B, T, HV, K]`` (KDA) or ``[B, T, HV]`` (GDN) (a full forget
        ``-inf`` is refused: clip it, e.g. to ``-60``).
      beta: ``[B, T, HV]`` write strengths (``sigmoid`` of a projection in the layer).
      scale: query scale, default ``K ** -0.5``.
      initial_state: ``[B, HV, K, V]`` state before the first token (default zeros).
      lengths: optional ``[B]`` valid lengths (right padding).
    """
    p = prepare(q, k, v, g, beta, scale=scale, initial_state=initial_state, lengths=lengths)
    o, S = _scan(p)
    return o, S


def recurrent_gdn(q, k, v, g, beta, *, scale=None, initial_state=None, lengths=None):
    """Gated DeltaNet: :func:`recurrent_kda` with one log-decay per head, ``g: [B, T, HV]``."""
    p = prepare(q, k, v, g, beta, scale=scale, initial_state=initial_state, lengths=lengths,
                scalar_gate=True)
    o, S = _scan(p)
    return o, S


def kda_step(q, k, v, g, beta, state, *, scale=None):
    """One decode step: ``q, k: [B, H, K]``, ``v: [B, HV, V]``, ``g: [B, HV, K]`` or ``[B, HV]``,
    ``beta: [B, HV]``, ``state: [B, HV, K, V]``; returns ``(o [B, HV, V], new_state)``.

    Equals one token of :func:`recurrent_kda` (it is the same update), so a prefill's final state
    followed by steps reproduces one long pass."""
    p = prepare(q, k, v, g, beta, scale=scale, initial_state=state, step=True)
    o, S = _scan(p)
    return o[:, 0], S


def gdn_step(q, k, v, g, beta, state, *, scale=None):
    """One GDN decode step (:func:`kda_step` with ``g: [B, HV]``)."""
    p = prepare(q, k, v, g, beta, scale=scale, initial_state=state, step=True, scalar_gate=True)
    o, S = _scan(p)
    return o[:, 0], S
