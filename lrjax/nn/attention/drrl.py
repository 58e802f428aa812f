"""DR-RL: a per-segment attention rank chosen by a policy trained with REINFORCE (Erden et al.).

Paper: "Dynamic Rank Reinforcement Learning for Adaptive Low-Rank Multi-Head Self Attention in Large
Language Models"; official code canererden/DR_RL_Project (read to confirm facts: ``src/models/
attention.py``, ``src/rl/reward.py``, ``src/utils/perturbation.py``). IMPORTANT: the released training
loop (``scripts/train.py``) does not compute the reward it describes -- it scores random dummy
tensors with a constant perturbation norm and an all-True safety mask. This module implements the
reward from the paper's equations instead.

Low-rank path (as in the official attention module). Per head and per segment, ``Q``, ``K``
``[S, d_h]`` are replaced by their rank-``r`` truncated SVDs ``Q_r = U_r Sigma_r V_r^T``, ``K_r``,
and ordinary softmax attention runs on them: ``O_r = softmax(Q_r K_r^T / sqrt(d_h) + mask) V``.
``r`` may be a traced integer (the truncation masks the singular values, so one compiled program
serves every action).

Perturbation identity (Eq. 8): for one matrix ``A`` with singular values ``sigma_1 >= ...``,
``||A_r - A_r'||_F = sqrt(sum_{r' < i <= r} sigma_i^2)`` (:func:`rank_change_norm`; tested exactly
in float64). Output bound (Eq. 9): for ``O = A V`` and ``O' = A' V``,
``||O' - O||_F <= ||A' - A||_2 ||V||_F`` (:func:`output_bound`).

[ours] How the two meet in the low-rank path, where the rank acts on ``Q`` and ``K`` rather than on
one matrix ``A``: the score change obeys
``||Q K^T - Q_r K_r^T||_F <= tail_r(Q) sigma_1(K) + sigma_1(Q) tail_r(K)`` with ``tail_r`` = Eq. 8 from
``r`` to full rank; row-wise softmax is 1/2-Lipschitz in the 2-norm (its Jacobian ``diag(p) - p p^T``
has eigenvalues in [0, 1/2]), so with ``P`` the attention probabilities
``||P' - P||_2 <= ||P' - P||_F <= (scale / 2) ||dS||_F`` and by Eq. 9
``||O_r - O||_F <= (scale / 2) (tail_r(Q) sigma_1(K) + sigma_1(Q) tail_r(K)) ||V||_F``
(:func:`perturbation_bound`, :func:`output_bound_from_spectra`; tested on random inputs). This
``perturbation_bound`` is the ``||dA||_F`` of the reward: it needs only the spectra, not the full
attention, which is the point of the paper's online bound.

Reward (Eq. 12): ``R = alpha cos(vec O_full, vec O_r) - beta FLOPs(r) / flops_scale - gamma ||dA||_F``
with the paper's defaults ``alpha = 1``, ``beta = 0.05``, ``gamma = 0.1``, ``flops_scale = 1e9`` and
the official code's FLOPs proxy ``FLOPs(r) = 2 S r d_h`` per head-segment (nominal: the scores are still
``S x S``). At toy sizes ``FLOPs / 1e9`` is ~0; pass ``flops_scale = flops(r_max)`` for a relative cost.

Actions: ranks ``{r_min, r_min + step, ..., r_max}`` (paper config 16..64 step 8). Policy [ours, a
simplification of the paper's Conv1d + weight-statistics + previous-action Transformer]: a 2-layer
tanh MLP over per-segment features (:func:`segment_features`: the segment input's singular values
normalized by its Frobenius norm, and the one-hot previous action), softmax over actions, sampled
on-policy (the paper's epsilon-greedy exploration and safety mask are not used: REINFORCE then stays
an unbiased on-policy estimator). REINFORCE (Williams 1992): ``L = -mean((R - b) log pi(a | s))``
with a baseline ``b`` (the mean reward of the batch by default); ``grad L`` is an unbiased estimate of
``-grad E_pi[R]`` (tested against the exact gradient by enumerating the actions). Optional [ours]:
per-batch advantage normalization and an entropy bonus (:func:`reinforce_loss`), log-spectrum
features (:func:`segment_features` ``log=True``). Why they matter: with the batch-mean baseline the
advantage is dominated by how easy the *segment* is (reward spread across segments ~0.1) rather
than by the *action* (spread across actions of one segment ~0.01-0.05), and the linear-scale features
hide the spectrum's tail; plain REINFORCE then collapses to one safe rank (experiments/drrl_rank.py
measures both spreads; docs/drrl_rank.md).

All functions are pure (jit/grad/vmap); float32/bfloat16/float64 inputs compute in
``promote_types(dtype, float32)``; bad input raises eagerly, naming the argument.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lrjax._validation import check_array, check_bool, check_float, check_int, compute_dtype, is_concrete
from lrjax.nn.attention.kvcache import _masked_softmax

__all__ = ["rank_actions", "truncate", "rank_change_norm", "attention", "lowrank_attention", "perturbation_bound",
           "output_bound", "output_bound_from_spectra", "attention_flops", "drrl_reward", "segment_features",
           "policy_init", "policy_logits", "reinforce_loss"]


def rank_actions(r_min: int, r_max: int, step: int = 8) -> tuple:
    """The action set ``(r_min, r_min + step, ..., <= r_max)`` (paper: 16..64 step 8)."""
    r_min = check_int(r_min, "r_min", low=1)
    r_max = check_int(r_max, "r_max", low=r_min)
    step = check_int(step, "step", low=1)
    return tuple(range(r_min, r_max + 1, step))


def _check_rank_arg(rank, full, name="rank"):
    if isinstance(rank, (int,)) and not isinstance(rank, bool):
        return check_int(rank, name, low=0, high=full)
    rank = check_array(rank, name, kind="integer")
    if is_concrete(rank) and rank.size and (int(jnp.min(rank)) < 0 or int(jnp.max(rank)) > full):
        raise ValueError(f"{name} must lie in [0, {full}] (min(S, d_h)), got values in "
                         f"[{int(jnp.min(rank))}, {int(jnp.max(rank))}]")
    return rank


def _svd(x):
    return jnp.linalg.svd(x, full_matrices=False)


def _trunc(x, rank):
    u, s, vt = _svd(x)
    keep = jnp.arange(s.shape[-1]) < jnp.asarray(rank)[..., None]
    return (u * jnp.where(keep, s, 0.0)[..., None, :]) @ vt, s


def truncate(x, rank):
    """Rank-``r`` truncated SVD of ``x`` ``[..., S, d]``: returns ``(x_r, sigma)``, ``sigma`` ``[..., min(S, d)]``
    descending. ``rank``: a Python int in ``[0, min(S, d)]`` or an integer array broadcasting against
    ``x``'s batch axes (traceable). Output dtype = ``x``'s."""
    x = check_array(x, "x", min_ndim=2, kind="floating")
    rank = _check_rank_arg(rank, min(x.shape[-2:]))
    dt = compute_dtype(x.dtype)
    xr, s = _trunc(x.astype(dt), rank)
    return xr.astype(x.dtype), s.astype(x.dtype)


def _tail(s, r_to, r_from=None):
    i = jnp.arange(1, s.shape[-1] + 1)
    lo = jnp.asarray(r_to)[..., None]
    hi = s.shape[-1] if r_from is None else jnp.asarray(r_from)[..., None]
    a, b = jnp.minimum(lo, hi), jnp.maximum(lo, hi)
    sel = (i > a) & (i <= b)
    return jnp.sqrt(jnp.sum(jnp.where(sel, s * s, 0.0), axis=-1))


def rank_change_norm(sigma, r_to, r_from=None):
    """Eq. 8: ``||A_{r_from} - A_{r_to}||_F = sqrt(sum_{min < i <= max} sigma_i^2)`` from ``A``'s singular
    values ``sigma`` ``[..., n]`` (descending). ``r_from=None`` = full rank (the truncation error)."""
    sigma = check_array(sigma, "sigma", min_ndim=1, kind="floating")
    n = sigma.shape[-1]
    r_to = _check_rank_arg(r_to, n, "r_to")
    if r_from is not None:
        r_from = _check_rank_arg(r_from, n, "r_from")
    dt = compute_dtype(sigma.dtype)
    return _tail(sigma.astype(dt), r_to, r_from).astype(sigma.dtype)


def _check_nonneg_values(x, name, *, integer=False):
    """Concrete ``x`` (array or number): a number array (integers when ``integer``) with no negative or
    non-finite entry; traced values pass unchecked."""
    if isinstance(x, (str, bytes)) or (not isinstance(x, (int, float, np.ndarray, np.generic, jax.Array)) or isinstance(x, (bool, np.bool_))):
        raise TypeError(f"{name} must be {'an integer' if integer else 'a number'} or an array of them, "
                        f"got {type(x).__name__}")
    a = jnp.asarray(x)
    if integer and not jnp.issubdtype(a.dtype, jnp.integer):
        raise TypeError(f"{name} must be integer-valued (ranks), got dtype {a.dtype}; pass ints")
    if is_concrete(a) and a.size:
        if not bool(jnp.all(jnp.isfinite(a))) or float(jnp.min(a)) < 0:
            raise ValueError(f"{name} must be finite and >= 0, got values in [{float(jnp.min(a))}, {float(jnp.max(a))}]")
    return a


def _check_qkv(q, k, v):
    q = check_array(q, "q", min_ndim=2, kind="floating")
    k = check_array(k, "k", min_ndim=2, kind="floating")
    v = check_array(v, "v", min_ndim=2, kind="floating")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape [..., S, d_h], got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"v must have shape [..., S, d_v] with [..., S] = {tuple(q.shape[:-1])} (q's), "
                         f"got {tuple(v.shape)}")
    return q, k, v


def _probs(q, k, causal):
    """Attention weights; the causal mask (key ``j`` visible to query ``i`` iff ``j <= i``) is applied by
    the masked softmax of :func:`lrjax.nn.attention.kvcache.causal_attention` (every row
    sees its diagonal key, so it equals a plain softmax over the visible keys)."""
    s = (q @ jnp.swapaxes(k, -1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        S = q.shape[-2]
        return _masked_softmax(s, jnp.tril(jnp.ones((S, S), bool)))
    return jax.nn.softmax(s, axis=-1)


def attention(q, k, v, *, causal: bool = False):
    """Full softmax attention ``softmax(Q K^T / sqrt(d_h) [+ causal mask]) V``; ``[..., S, d_h]`` each."""
    q, k, v = _check_qkv(q, k, v)
    causal = check_bool(causal, "causal")
    dt = compute_dtype(q.dtype, k.dtype, v.dtype)
    return (_probs(q.astype(dt), k.astype(dt), causal) @ v.astype(dt)).astype(v.dtype)


def _lowrank(q, k, v, rank, causal):
    qr, sq = _trunc(q, rank)
    kr, sk = _trunc(k, rank)
    return _probs(qr, kr, causal) @ v, sq, sk


def lowrank_attention(q, k, v, rank, *, causal: bool = False):
    """DR-RL's low-rank path: attention on the rank-``r`` truncated SVDs of ``q`` and ``k``.

    Args: ``q``, ``k`` ``[..., S, d_h]``; ``v`` ``[..., S, d_v]``; ``rank`` an int in ``[0, min(S, d_h)]`` or
    an integer array over the batch axes (traceable). Returns ``(O_r, sigma_q, sigma_k)``: the output in
    ``v``'s dtype and the singular values (for :func:`perturbation_bound`)."""
    q, k, v = _check_qkv(q, k, v)
    rank = _check_rank_arg(rank, min(q.shape[-2:]))
    causal = check_bool(causal, "causal")
    dt = compute_dtype(q.dtype, k.dtype, v.dtype)
    o, sq, sk = _lowrank(q.astype(dt), k.astype(dt), v.astype(dt), rank, causal)
    return o.astype(v.dtype), sq.astype(v.dtype), sk.astype(v.dtype)


def _pert(sq, sk, rank, scale):
    return scale * (_tail(sq, rank) * sk[..., 0] + sq[..., 0] * _tail(sk, rank))


def perturbation_bound(sigma_q, sigma_k, rank, d_h: int):
    """[ours, from Eq. 8] ``||dS||_F`` bound of the scaled scores:
    ``(tail_r(Q) sigma_1(K) + sigma_1(Q) tail_r(K)) / sqrt(d_h)``; the reward's ``||dA||_F``."""
    sigma_q = check_array(sigma_q, "sigma_q", min_ndim=1, kind="floating")
    sigma_k = check_array(sigma_k, "sigma_k", min_ndim=1, kind="floating")
    if sigma_q.shape != sigma_k.shape:
        raise ValueError(f"sigma_q and sigma_k must have the same shape, got {tuple(sigma_q.shape)} and "
                         f"{tuple(sigma_k.shape)}")
    d_h = check_int(d_h, "d_h", low=1)
    rank = _check_rank_arg(rank, sigma_q.shape[-1])
    dt = compute_dtype(sigma_q.dtype, sigma_k.dtype)
    return _pert(sigma_q.astype(dt), sigma_k.astype(dt), rank, 1.0 / math.sqrt(d_h)).astype(sigma_q.dtype)


def output_bound(delta_a_2norm, v):
    """Eq. 9: ``||O' - O||_F <= ||A' - A||_2 ||V||_F``; ``v`` ``[..., S, d_v]`` -> bound ``[...]``."""
    v = check_array(v, "v", min_ndim=2, kind="floating")
    _check_nonneg_values(delta_a_2norm, "delta_a_2norm")
    dt = compute_dtype(v.dtype)
    return (jnp.asarray(delta_a_2norm, dt) * jnp.linalg.norm(v.astype(dt), axis=(-2, -1))).astype(v.dtype)


def output_bound_from_spectra(sigma_q, sigma_k, rank, v, *, d_h: int):
    """``||O_r - O||_F <= (1/2) perturbation_bound(sigma_q, sigma_k, rank, d_h) ||V||_F`` (row softmax is
    1/2-Lipschitz, then Eq. 9); ``v`` ``[..., S, d_v]`` -> ``[...]``."""
    v = check_array(v, "v", min_ndim=2, kind="floating")
    return output_bound(0.5 * perturbation_bound(sigma_q, sigma_k, rank, d_h), v)


def attention_flops(rank, seq_len: int, d_h: int):
    """The official code's FLOPs proxy ``2 S r d_h`` per head-segment (nominal)."""
    seq_len = check_int(seq_len, "seq_len", low=1)
    d_h = check_int(d_h, "d_h", low=1)
    rank = _check_nonneg_values(rank, "rank", integer=True)
    return 2.0 * seq_len * jnp.asarray(rank, jnp.float32) * d_h


def _cos(a, b):
    a = a.reshape(a.shape[:-2] + (-1,))
    b = b.reshape(b.shape[:-2] + (-1,))
    num = jnp.sum(a * b, -1)
    den = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.where(jnp.sum(a * a, -1) + jnp.sum(b * b, -1) == 0, 1.0, 0.0))


def drrl_reward(o_full, o_low, rank, pert, *, d_h: int, alpha: float = 1.0, beta: float = 0.05,
                gamma: float = 0.1, flops_scale: float = 1e9):
    """Eq. 12: ``R = alpha cos(O_full, O_low) - beta FLOPs(r) / flops_scale - gamma ||dA||_F``.

    ``o_full``, ``o_low`` ``[..., S, d_v]`` (cosine over the flattened ``[S, d_v]``; two zero outputs
    count as cos 1, one zero output as 0); ``rank`` ``[...]``; ``pert`` ``[...]`` (e.g.
    :func:`perturbation_bound`); ``FLOPs(r) = 2 S r d_h``. Returns float32 (or float64) ``[...]``."""
    o_full = check_array(o_full, "o_full", min_ndim=2, kind="floating")
    o_low = check_array(o_low, "o_low", min_ndim=2, kind="floating")
    if o_full.shape != o_low.shape:
        raise ValueError(f"o_low must have o_full's shape {tuple(o_full.shape)}, got {tuple(o_low.shape)}")
    d_h = check_int(d_h, "d_h", low=1)
    alpha = check_float(alpha, "alpha", low=0)
    beta = check_float(beta, "beta", low=0)
    gamma = check_float(gamma, "gamma", low=0)
    flops_scale = check_float(flops_scale, "flops_scale", low=0, low_open=True)
    _check_nonneg_values(rank, "rank", integer=True)
    dt = compute_dtype(o_full.dtype, o_low.dtype)
    flops = 2.0 * o_full.shape[-2] * jnp.asarray(rank, dt) * d_h
    return (alpha * _cos(o_full.astype(dt), o_low.astype(dt)) - beta * flops / flops_scale
            - gamma * jnp.asarray(pert, dt))


def segment_features(x, prev_action, n_actions: int, *, log: bool = False, floor: float = 1e-6):
    """Policy input per segment: ``sigma(X) / ||X||_F`` (``[..., min(T, d)]``) concatenated with the one-hot
    previous action (``[..., n_actions]``); ``x`` ``[..., T, d]``, ``prev_action`` integer ``[...]``.

    ``log=True`` [ours]: the normalized singular values enter as ``log(max(sigma / ||X||_F, floor)) /
    log(1 / floor)`` (in ``[-1, 0]``), which spreads the tail of the spectrum (the part that decides the
    rank: ``1e-3`` and ``1e-5`` differ by 0.33 instead of by ~1e-3). Default ``False`` (the original)."""
    x = check_array(x, "x", min_ndim=2, kind="floating")
    n_actions = check_int(n_actions, "n_actions", low=1)
    log = check_bool(log, "log")
    floor = check_float(floor, "floor", low=0, low_open=True)
    if floor >= 1:
        raise ValueError(f"floor must lie in (0, 1), got {floor}")
    dt = compute_dtype(x.dtype)
    s = jnp.linalg.svd(x.astype(dt), compute_uv=False)
    s = s / jnp.maximum(jnp.linalg.norm(s, axis=-1, keepdims=True), 1e-12)
    if log:
        s = jnp.log(jnp.maximum(s, floor)) / math.log(1.0 / floor)
    pa = jnp.asarray(prev_action)
    if not jnp.issubdtype(pa.dtype, jnp.integer):
        raise TypeError(f"prev_action must be an integer array of action ids, got dtype {pa.dtype}")
    if is_concrete(pa) and pa.size and (int(jnp.min(pa)) < 0 or int(jnp.max(pa)) >= n_actions):
        raise ValueError(f"prev_action must lie in [0, {n_actions}) (n_actions), got values in "
                         f"[{int(jnp.min(pa))}, {int(jnp.max(pa))}]; one_hot would give an all-zero row")
    return jnp.concatenate([s, jax.nn.one_hot(pa, n_actions, dtype=dt)], axis=-1)


def policy_init(key, n_features: int, n_actions: int, hidden: int = 32, dtype=jnp.float32) -> dict:
    """Parameters of the 2-layer tanh MLP policy ``{"w1" [F, H], "b1" [H], "w2" [H, A], "b2" [A]}``
    (``w2 = 0``: uniform initial policy)."""
    n_features = check_int(n_features, "n_features", low=1)
    n_actions = check_int(n_actions, "n_actions", low=1)
    hidden = check_int(hidden, "hidden", low=1)
    w1 = jax.random.normal(key, (n_features, hidden), dtype) / math.sqrt(n_features)
    return {"w1": w1, "b1": jnp.zeros((hidden,), dtype), "w2": jnp.zeros((hidden, n_actions), dtype),
            "b2": jnp.zeros((n_actions,), dtype)}


def policy_logits(params, feats):
    """Action logits ``tanh(f W1 + b1) W2 + b2``: ``feats`` ``[..., F]`` -> ``[..., A]``."""
    return jnp.tanh(feats @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def reinforce_loss(params, feats, actions, rewards, baseline=None, *, normalize: bool = False,
                   entropy: float = 0.0):
    """REINFORCE surrogate ``-mean(Adv log pi(a | s)) - entropy * mean(H(pi(. | s)))`` with
    ``Adv = R - b`` (gradient of the first term = unbiased estimate of ``-grad E_pi[R]`` for any ``b``
    that does not depend on the action). ``feats`` ``[N, F]``, ``actions`` int ``[N]``, ``rewards`` ``[N]``
    (treated as constants), ``baseline`` scalar/``[N]`` (e.g. a learned state value ``V(s)``) or None
    (= the batch mean reward).

    ``normalize=True`` [ours, standard practice]: ``Adv`` is divided by its batch standard deviation
    (``+ 1e-8``), which makes the step size independent of the reward's scale (the reward differences
    between ranks are ~1e-2). ``entropy`` >= 0: coefficient of the entropy bonus (anneal it to 0 to keep
    the final objective the paper's). Defaults reproduce plain REINFORCE."""
    feats = check_array(feats, "feats", min_ndim=1, kind="floating")
    actions = check_array(actions, "actions", kind="integer")
    normalize = check_bool(normalize, "normalize")
    if not isinstance(entropy, jax.Array):
        entropy = check_float(entropy, "entropy", low=0)
    rewards = jax.lax.stop_gradient(jnp.asarray(rewards))
    b = jnp.mean(rewards) if baseline is None else jax.lax.stop_gradient(jnp.asarray(baseline))
    adv = rewards - b
    if normalize:
        adv = adv / (jnp.std(adv) + 1e-8)
    logp = jax.nn.log_softmax(policy_logits(params, feats), axis=-1)
    if is_concrete(actions) and actions.size and (int(jnp.min(actions)) < 0 or int(jnp.max(actions)) >= logp.shape[-1]):
        raise ValueError(f"actions must lie in [0, {logp.shape[-1]}) (the policy's actions), got values in "
                         f"[{int(jnp.min(actions))}, {int(jnp.max(actions))}]")
    if actions.shape != logp.shape[:-1]:
        raise ValueError(f"actions must have shape {tuple(logp.shape[:-1])} (one per row of feats), got {tuple(actions.shape)}")
    lp = jnp.take_along_axis(logp, actions[..., None], axis=-1)[..., 0]
    ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return -jnp.mean(adv * lp) - entropy * jnp.mean(ent)
