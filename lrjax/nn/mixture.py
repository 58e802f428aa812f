"""Mixtures of low-rank experts (a mixture of LoRAs): one layer, two routers, FlexMoRE experts.

The layer, in lrjax's matrix view ``[M, N] = [in, out]`` (a Dense kernel), for ``x: [..., M]``::

    y = x W_0 + bias + s * sum_e g_e(x) (x a_e) b_e          a_e: [M, r_e], b_e: [r_e, N]

with ``E`` experts of ranks ``r_e``, a scale ``s``, and gates ``g(x): [..., E]`` that are zero
outside the ``k`` active experts. The math lives in pure functions so that the low-rank term can be
used on its own as an activation-space branch at a targeted kernel of an unmodified model
(``y = x W + branch(x)``):

* :func:`mixture_delta` -- the mixture term ``s sum_e g_e (x a_e) b_e`` only, ``[..., N]``, given
  gates; :func:`mixture_branch` -- router + gates + mixture term in one call (the branch);
* routers: :func:`router_logits` (``z = x W_r [+ b_r]``), :func:`router_probs` (``softmax(z / T)``),
  :func:`topk_gates` (softmax top-k), :func:`sample_subset` / :func:`subset_log_prob` /
  :func:`subset_gates` / :func:`remix_gates` (ReMix), :func:`rloo_advantages` /
  :func:`rloo_surrogate` (the RLOO router gradient), :func:`effective_support` (router collapse);
* experts: :func:`pack_experts` / :func:`unpack_experts` (heterogeneous ranks), and FlexMoRE's
  :func:`experts_from_finetuned` (truncated SVD of fine-tuned-minus-base deltas, via
  :func:`lrjax.linalg.lowrank_delta`);
* :class:`MixtureLoRA` -- a Flax NNX layer composing a frozen base Dense, a router and the experts.

Expert storage: a leading expert axis, no padding
--------------------------------------------------
Equal ranks: ``a: [E, M, r]``, ``b: [E, r, N]`` (``ranks=None``). Heterogeneous ranks: one
**packed** rank axis ``a: [M, R]``, ``b: [R, N]``, ``R = sum_e r_e``, with the static tuple
``ranks = (r_1, ..., r_E)`` (expert ``e`` owns the columns ``sum_{j<e} r_j ... + r_e`` of ``a``
and the same rows of ``b``). The stacked form is the packed one with ``R = E r`` (``a`` transposed
to ``[M, E r]``, ``b`` reshaped to ``[E r, N]``). Both are computed the same way, with no Python
loop over experts::

    h = x a            [..., R]      one matmul over all experts' columns
    h = h * g[..., id] [..., R]      id[c] = the expert of column c (static), so the gate multiplies
                                     each expert's r_e columns
    y = s h b          [..., N]      one matmul

Exact (no padding, no approximation), and the cost is ``O(M R + R N)`` per row: proportional to
the *sum* of the ranks. Inactive experts are computed and multiplied by a zero gate: for a mixture
of low-rank experts the whole expert bank is a rank-``R`` matmul, far cheaper than the base
``x W_0`` (``R << min(M, N)``), and dense matmuls beat computing only the ``k`` active experts on
XLA:CPU. Measured (``experiments/bench_mixtures.py``: training step of a 4 x Dense(1024) MLP,
batch 512, 8 experts of rank 8, top-2, 2 shared CPU cores; step time / a dense LoRA of the active
rank 16): packed 1.14x; stacked ``einsum`` over ``[E, M, r]`` 1.28x; Python loop over experts
2.9x; per-row gather of the top-k experts' factors (``[B, k, M, r]``) 5.1x; tokens sorted by expert
with ``jax.lax.ragged_dot`` 6.4x (``docs/bench_mixtures.md``). So :func:`mixture_delta` converts
stacked factors to the packed layout (a transpose of ``a``, a free reshape of ``b``) and runs the
packed form. (On accelerators with a grouped-matmul kernel and many experts, a sorted
``ragged_dot`` dispatch that computes only the active experts would win; not implemented.)

Routers (pinned choices)
------------------------
* **Softmax top-k** (:func:`topk_gates`): ``p = softmax(z / T)``; the ``k`` largest logits are
  active (ties: the lower expert index first, ``jax.lax.top_k``); by default the gates are
  **renormalized** over the active experts, ``g_e = p_e / sum_{j in top-k} p_j`` (= a softmax over
  the ``k`` selected logits, Mixtral's convention); ``renormalize=False`` keeps ``g_e = p_e``.
  The router is trained by ordinary backpropagation through ``g``.
* **ReMix** (Qiu et al., 2026, *ReMix: Reinforcement Routing for Mixtures of LoRAs in LLM
  Finetuning*, arXiv:2603.10160; no official code): during training a ``k``-subset ``S`` is
  *sampled* from ``pi = softmax(z / T)`` without replacement and every active expert gets the same
  constant, non-learnable weight ``omega`` (:func:`remix_gates`); the router gets no gradient
  through the output and is trained by the RLOO estimator (:func:`rloo_surrogate`) over ``M``
  subsets per input; at inference the ``k`` most probable experts are active, again with weight
  ``omega``. UNVERIFIED details (the paper's text was not available to us, only its abstract and
  third-party summaries; no code exists): ``omega`` defaults to ``1 / k`` here (the active gates
  then sum to 1, like a renormalized softmax top-k), configurable; sampling without replacement
  is the sequential (Plackett-Luce) draw, implemented as Gumbel-top-k; ``log pi(S)`` defaults to
  the log-probability of the *unordered* set (see :func:`subset_log_prob`).

Effective support size
----------------------
:func:`effective_support` measures how many experts a routing distribution ``p`` really uses:
``exp(H(p))`` (``kind="entropy"``, default), ``1 / sum p^2`` (``"simpson"``), or the number of
experts with ``p_e > threshold`` (``"threshold"``). The first two are Hill's diversity numbers of
order 1 and 2 (M. O. Hill, 1973, *Diversity and evenness: a unifying notation and its
consequences*, Ecology 54(2)); both equal ``n`` for a uniform distribution on ``n`` experts and
1 for a one-hot one. ReMix reports an "effective support size" of the routing weights to show
softmax-router collapse (its exact formula is UNVERIFIED; these are the standard definitions).
Apply it to the router distribution ``pi`` (all ``E`` experts) and to the active gates.
"""
from __future__ import annotations

import itertools
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrjax import linalg
from lrjax._validation import (check_array, check_bool, check_choice, check_finite, check_float, check_int,
                               check_key, check_rank, is_concrete)

__all__ = ["router_logits", "router_probs", "topk_gates", "sample_subset", "subset_log_prob", "subset_gates",
           "remix_gates", "rloo_advantages", "rloo_surrogate", "effective_support", "mixture_delta", "mixture_branch",
           "pack_experts", "unpack_experts", "expert_ids", "experts_from_finetuned", "Routing", "MixtureLoRA", "Frozen",
           "MAX_UNORDERED_K"]

#: the largest ``k`` for which :func:`subset_log_prob` sums over the ``k!`` orders of a set
MAX_UNORDERED_K = 6


# ----------------------------------------------------------------------------------- helpers
def _cd(*dtypes):
    dt = jnp.dtype(jnp.float32)
    for d in dtypes:
        dt = jnp.promote_types(dt, jnp.dtype(d))
    return dt


def _floating(x, name, *, min_ndim=1):
    x = check_array(x, name, kind="floating", min_ndim=min_ndim)
    check_finite(x, name)
    return x


def _temperature(temperature):
    return check_float(temperature, "temperature", low=0.0, low_open=True)


def _k(k, num_experts, name="k"):
    k = check_int(k, name, low=1)
    if k > num_experts:
        raise ValueError(f"{name}={k} exceeds the number of experts E = {num_experts}; choose 1 <= {name} <= "
                         f"{num_experts}")
    return k


def _logits(logits, name="logits"):
    z = _floating(logits, name)
    if z.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one expert on its last axis, got shape {tuple(z.shape)}")
    return z


def _check_ranks(ranks, name="ranks"):
    if isinstance(ranks, (str, bytes)) or not isinstance(ranks, (tuple, list)):
        raise TypeError(f"{name} must be a tuple of positive ints (one rank per expert), got {type(ranks).__name__}")
    if len(ranks) == 0:
        raise ValueError(f"{name} must name at least one expert's rank, got an empty tuple")
    return tuple(check_int(r, f"{name}[{i}]", low=1) for i, r in enumerate(ranks))


def expert_ids(ranks) -> np.ndarray:
    """The expert of each column of the packed rank axis: ``int32[sum(ranks)]`` (static NumPy),
    e.g. ``ranks=(2, 1, 3)`` -> ``[0, 0, 1, 2, 2, 2]``."""
    ranks = _check_ranks(ranks)
    return np.repeat(np.arange(len(ranks), dtype=np.int32), ranks)


# ----------------------------------------------------------------------------------- routers
def router_logits(x, w_router, bias=None):
    """Router logits ``z = x W_r + b_r``: ``x: [..., M]``, ``w_router: [M, E]``, ``bias: [E]`` or None.

    Computed and returned in ``promote_types(x, w_router, float32)`` (logits stay float32 for
    bfloat16 inputs: the softmax and top-k run on them). Raises ``TypeError`` for non-floating
    arrays and ``ValueError`` for shape mismatches or NaN/Inf (concrete arrays)."""
    x = _floating(x, "x")
    w = _floating(w_router, "w_router", min_ndim=2)
    if w.ndim != 2 or w.shape[0] != x.shape[-1]:
        raise ValueError(f"w_router must have shape [M, E] with M = x.shape[-1] = {x.shape[-1]}, got "
                         f"{tuple(w.shape)}")
    cd = _cd(x.dtype, w.dtype)
    z = x.astype(cd) @ w.astype(cd)
    if bias is not None:
        bias = _floating(bias, "bias")
        if bias.shape != (w.shape[1],):
            raise ValueError(f"bias must have shape [E] = ({w.shape[1]},), got {tuple(bias.shape)}")
        z = z + bias.astype(cd)
    return z


def router_probs(logits, *, temperature: float = 1.0):
    """Router distribution ``pi = softmax(z / T)`` over the last axis (``[..., E]``, float32 or wider).

    ``temperature > 0`` and finite (``ValueError`` otherwise)."""
    z = _logits(logits)
    t = _temperature(temperature)
    return jax.nn.softmax(z.astype(_cd(z.dtype)) / t, axis=-1)


def topk_gates(logits, k: int, *, renormalize: bool = True, temperature: float = 1.0):
    """Softmax top-k gates: ``(gates [..., E], idx int32[..., k])``.

    ``idx`` are the ``k`` largest logits (descending; ties: lower index first). With
    ``renormalize=True`` (default, pinned): ``g_e = pi_e / sum_{j in idx} pi_j`` on the active
    experts (a softmax over the selected logits ``z_idx / T``), 0 elsewhere, so the gates sum to 1;
    with ``False``: ``g_e = pi_e`` on the active experts (sum ``<= 1``). Differentiable in the
    logits through the selected values (the standard straight top-k router). ``1 <= k <= E``."""
    z = _logits(logits)
    e = z.shape[-1]
    k = _k(k, e)
    renormalize = check_bool(renormalize, "renormalize")
    t = _temperature(temperature)
    z = z.astype(_cd(z.dtype)) / t
    vals, idx = jax.lax.top_k(z, k)
    if renormalize:
        w = jax.nn.softmax(vals, axis=-1)
    else:
        w = jnp.exp(vals - jax.nn.logsumexp(z, axis=-1, keepdims=True))
    gates = jnp.sum(jax.nn.one_hot(idx, e, dtype=w.dtype) * w[..., None], axis=-2)
    return gates, idx.astype(jnp.int32)


def sample_subset(key, logits, k: int, *, temperature: float = 1.0):
    """Sample ``k`` distinct experts per row from ``pi = softmax(z / T)`` without replacement.

    Returns ``idx: int32[..., k]`` in the order drawn. The draw is the sequential (Plackett-Luce)
    one -- expert ``i_1 ~ pi``, then ``i_2 ~ pi`` restricted to the rest, ... -- implemented as
    Gumbel-top-k: the ``k`` largest of ``z / T + G``, ``G`` i.i.d. standard Gumbel, which has exactly
    that distribution (Kool, van Hoof & Welling, 2019, *Stochastic Beams and Where to Find Them*,
    arXiv:1903.06059). One key for the whole ``[..., E]`` batch; no gradient flows through
    ``idx``. ``1 <= k <= E``, ``key`` a single PRNG key."""
    key = check_key(key)
    z = _logits(logits)
    k = _k(k, z.shape[-1])
    t = _temperature(temperature)
    z = jax.lax.stop_gradient(z.astype(_cd(z.dtype)) / t)
    g = jax.random.gumbel(key, z.shape, z.dtype)
    return jax.lax.top_k(z + g, k)[1].astype(jnp.int32)


def _check_idx(idx, e, k=None, name="idx"):
    idx = check_array(idx, name, kind="integer", min_ndim=1)
    if k is not None and idx.shape[-1] != k:
        raise ValueError(f"{name} must have k = {k} experts on its last axis, got shape {tuple(idx.shape)}")
    if is_concrete(idx):
        with jax.ensure_compile_time_eval():
            a = np.asarray(idx)
        if a.size and (a.min() < 0 or a.max() >= e):
            raise ValueError(f"{name} holds expert indices outside [0, {e}) (min {a.min()}, max {a.max()}); "
                             f"indices must address the E = {e} experts of the logits")
        if a.size and a.shape[-1] > 1:
            s = np.sort(a, axis=-1)
            if np.any(s[..., 1:] == s[..., :-1]):
                raise ValueError(f"{name} repeats an expert within a row; a subset drawn without replacement "
                                 "has k distinct experts")
    return idx


def _ordered_log_prob(z, idx):
    """log PL(idx | z): sum_j [z_{i_j} - logsumexp(z over experts not yet drawn)]; z [..., E], idx [..., k]."""
    e = z.shape[-1]
    taken = jnp.zeros(z.shape, bool)
    lp = jnp.zeros(z.shape[:-1], z.dtype)
    for j in range(idx.shape[-1]):
        lse = jax.nn.logsumexp(jnp.where(taken, -jnp.inf, z), axis=-1)
        lp = lp + jnp.take_along_axis(z, idx[..., j:j + 1], axis=-1)[..., 0] - lse
        taken = taken | jax.nn.one_hot(idx[..., j], e, dtype=bool)
    return lp


def subset_log_prob(logits, idx, *, ordered: bool = False, temperature: float = 1.0):
    """Log-probability of the ``k`` experts ``idx: int[..., k]`` drawn without replacement from
    ``pi = softmax(z / T)`` (the sequential / Plackett-Luce draw of :func:`sample_subset`).

    ``ordered=True``: the probability of drawing them *in that order*,
    ``log P(i_1, ..., i_k) = sum_j [z_{i_j} / T - log sum_{e not in {i_1..i_{j-1}}} exp(z_e / T)]``;
    over all ``E! / (E - k)!`` ordered tuples these sum to 1.
    ``ordered=False`` (default): the probability of the *set* ``S = {i_1, ..., i_k}`` whatever the
    order, ``log sum_{sigma in perms(S)} P(sigma)`` (a log-sum-exp over the ``k!`` orders,
    ``k <= MAX_UNORDERED_K = 6``); over all ``C(E, k)`` subsets these sum to 1 (tested for small E).

    Both give an unbiased score-function (REINFORCE / RLOO) estimator when the reward depends on
    the set only; the set form has lower variance (it is the ordered one averaged over orders), and
    it is the one ReMix's ``log pi(S)`` denotes, so it is the default. Computed in float32 (or
    wider), with a masked log-sum-exp (no ``log(1 - sum p)`` cancellation). Indices must be in
    ``[0, E)`` and distinct per row (checked on concrete arrays)."""
    z = _logits(logits)
    e = z.shape[-1]
    idx = _check_idx(idx, e)
    k = idx.shape[-1]
    _k(k, e, "idx.shape[-1] (k)")
    ordered = check_bool(ordered, "ordered")
    t = _temperature(temperature)
    if idx.shape[:-1] != z.shape[:-1]:
        raise ValueError(f"idx must have shape [..., k] with the batch shape of logits {tuple(z.shape[:-1])}, "
                         f"got {tuple(idx.shape)}")
    z = z.astype(_cd(z.dtype)) / t
    if ordered:
        return _ordered_log_prob(z, idx)
    if k > MAX_UNORDERED_K:
        raise ValueError(f"ordered=False sums over k! orders; k={k} exceeds MAX_UNORDERED_K = {MAX_UNORDERED_K}. "
                         "Pass ordered=True (also unbiased for RLOO) for larger k")
    perms = np.array(list(itertools.permutations(range(k))), np.int32)          # [k!, k]
    idx_p = idx[..., perms]                                                     # [..., k!, k]
    lp = _ordered_log_prob(z[..., None, :], idx_p)                              # [..., k!]
    return jax.nn.logsumexp(lp, axis=-1)


def _omega(omega, k):
    if omega is None:
        return 1.0 / k
    return check_float(omega, "omega", low=0.0, low_open=True)


def subset_gates(idx, num_experts: int, omega: float):
    """Constant gates of ReMix: ``g_e = omega`` for ``e in idx``, 0 elsewhere (``float32[..., E]``).

    Non-learnable (no gradient); ``omega > 0`` finite; ``idx`` distinct indices in ``[0, E)``."""
    num_experts = check_int(num_experts, "num_experts", low=1)
    idx = _check_idx(idx, num_experts)
    _k(idx.shape[-1], num_experts, "idx.shape[-1] (k)")
    omega = check_float(omega, "omega", low=0.0, low_open=True)
    return omega * jnp.sum(jax.nn.one_hot(idx, num_experts, dtype=jnp.float32), axis=-2)


class Routing(NamedTuple):
    """What a router decided for ``x: [..., M]``: ``gates [..., E]`` (fed to :func:`mixture_delta`),
    ``idx int32[..., k]`` (the active experts), ``log_prob [...]`` (``log pi(S)`` of a sampled subset;
    zeros when deterministic), ``probs [..., E]`` (``pi``, for :func:`effective_support`)."""

    gates: jax.Array
    idx: jax.Array
    log_prob: jax.Array
    probs: jax.Array


def remix_gates(key, logits, k: int, *, omega: float | None = None, temperature: float = 1.0,
                ordered: bool = False) -> Routing:
    """ReMix routing of every row of ``logits [..., E]``.

    ``key`` a PRNG key: training -- ``S ~ pi`` (:func:`sample_subset`), ``gates = omega 1_S``
    (:func:`subset_gates`), ``log_prob = log pi(S)`` (:func:`subset_log_prob`, differentiable in
    the logits: feed it to :func:`rloo_surrogate`). ``key=None``: inference -- the ``k`` most
    probable experts (deterministic top-k), ``gates = omega`` on them, ``log_prob = 0``.
    ``omega`` defaults to ``1 / k`` (UNVERIFIED choice, see the module docstring)."""
    z = _logits(logits)
    e = z.shape[-1]
    k = _k(k, e)
    omega = _omega(omega, k)
    t = _temperature(temperature)
    ordered = check_bool(ordered, "ordered")
    probs = router_probs(z, temperature=t)
    if key is None:
        idx = jax.lax.top_k(jax.lax.stop_gradient(z), k)[1].astype(jnp.int32)
        lp = jnp.zeros(z.shape[:-1], probs.dtype)
    else:
        idx = sample_subset(key, z, k, temperature=t)
        lp = subset_log_prob(z, idx, ordered=ordered, temperature=t)
    return Routing(omega * jnp.sum(jax.nn.one_hot(idx, e, dtype=jnp.float32), axis=-2), idx, lp, probs)


# ---------------------------------------------------------------------------------------- RLOO
def _samples(x, name):
    x = _floating(x, name)
    if x.shape[0] < 2:
        raise ValueError(f"{name} must have S >= 2 samples on axis 0 (leave-one-out needs another sample), got "
                         f"shape {tuple(x.shape)}")
    return x


def rloo_advantages(losses):
    """Leave-one-out advantages ``adv_m = L_m - mean_{j != m} L_j`` over axis 0 (``S >= 2`` samples).

    ``losses: [S, ...]`` (e.g. ``[S, B]``: the loss of every input under each of its ``S`` sampled
    subsets). With reward ``R = -L`` this is ``-(R_m - mean_{j != m} R_j)``, the RLOO baseline of
    Kool, van Hoof & Welling (2019, *Buy 4 REINFORCE Samples, Get a Baseline for Free!*)."""
    losses = _samples(losses, "losses")
    s = losses.shape[0]
    return losses - (jnp.sum(losses, axis=0, keepdims=True) - losses) / (s - 1)


def rloo_surrogate(losses, log_probs):
    """Surrogate loss whose gradient is the RLOO router gradient plus the experts' ordinary gradient.

    ``losses, log_probs: [S, ...]``: ``S >= 2`` sampled subsets per input; ``log_probs`` is
    ``log pi(S_m)`` of each input's sample (summed over the tokens and layers that input routed,
    if several: the policy's log-probability of its whole routing). Returns the scalar

    .. math::  \\mathcal{L} = \\operatorname{mean}_{m, b}\\, L_{m,b}
               + \\operatorname{mean}_{m, b}\\, \\operatorname{sg}(\\mathrm{adv}_{m,b})
                 \\,(\\log\\pi(S_{m,b}) - \\operatorname{sg}(\\log\\pi(S_{m,b})))

    (``sg`` = stop_gradient, ``adv`` = :func:`rloo_advantages`). Its *value* is the mean loss (the
    second term is 0); its gradient w.r.t. the router parameters is
    ``mean_b (1/S) sum_m adv_{m,b} grad log pi(S_{m,b})``, the unbiased RLOO estimator of
    ``grad E_S[L]`` (the losses do not depend on the router through ReMix's constant gates),
    and w.r.t. the experts the mean of the ``S`` losses' gradients. Minimize it with any optax
    optimizer. Tested unbiased against the exact gradient of a small subset-routing problem."""
    losses = _samples(losses, "losses")
    log_probs = _samples(log_probs, "log_probs")
    if losses.shape != log_probs.shape:
        raise ValueError(f"losses and log_probs must have the same shape [S, ...], got {tuple(losses.shape)} and "
                         f"{tuple(log_probs.shape)}")
    adv = jax.lax.stop_gradient(rloo_advantages(losses))
    lp = log_probs.astype(_cd(log_probs.dtype))
    return jnp.mean(losses) + jnp.mean(adv * (lp - jax.lax.stop_gradient(lp)))


# --------------------------------------------------------------------------- effective support
def effective_support(probs, *, kind: str = "entropy", threshold: float = 0.05):
    """Effective number of experts a routing distribution uses, per row: ``[...]`` float32.

    ``probs: [..., E]`` non-negative weights (the router distribution ``pi`` or the active gates);
    they are normalized to sum 1 first, so un-renormalized top-k gates are fine; an all-zero row
    gives 0. ``kind``: ``"entropy"`` -- ``exp(-sum p log p)`` (``0 log 0 = 0``; Hill number of order
    1, the perplexity); ``"simpson"`` -- ``1 / sum p^2`` (Hill number of order 2, inverse Simpson);
    ``"threshold"`` -- ``#{e : p_e > threshold}`` (``0 <= threshold < 1``; it is 0 when no
    expert exceeds the threshold, e.g. a uniform distribution over more than ``1 / threshold``
    experts). ``"entropy"`` and ``"simpson"`` are in ``[1, E]``
    for a non-zero row, ``n`` for a uniform distribution on ``n`` experts, 1 for a one-hot one, and
    ``exp(H) >= 1/sum p^2`` always. See the module docstring for the source (Hill 1973) and ReMix."""
    p = check_array(probs, "probs", kind="floating", min_ndim=1)
    check_finite(p, "probs")
    kind = check_choice(kind, "kind", ("entropy", "simpson", "threshold"))
    threshold = check_float(threshold, "threshold", low=0.0, high=1.0, high_open=True)
    if p.shape[-1] == 0:
        raise ValueError(f"probs must have at least one expert on its last axis, got shape {tuple(p.shape)}")
    if is_concrete(p):
        with jax.ensure_compile_time_eval():
            neg = bool(jnp.any(p < 0))
        if neg:
            raise ValueError("probs has negative entries; pass probabilities or gates (>= 0)")
    p = p.astype(_cd(p.dtype))
    tot = jnp.sum(p, axis=-1, keepdims=True)
    nz = tot[..., 0] > 0
    p = p / jnp.where(tot > 0, tot, 1.0)
    if kind == "entropy":
        h = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
        out = jnp.exp(h)
    elif kind == "simpson":
        out = 1.0 / jnp.where(nz, jnp.sum(p * p, axis=-1), 1.0)
    else:
        out = jnp.sum(p > threshold, axis=-1).astype(p.dtype)
    return jnp.where(nz, out, 0.0)


# ------------------------------------------------------------------------------------- experts
def pack_experts(a, b):
    """Pack per-expert factors into the packed rank axis: ``(a [M, R], b [R, N], ranks)``.

    ``a``, ``b``: either stacked arrays ``a: [E, M, r]``, ``b: [E, r, N]`` (equal ranks) or
    sequences of ``E`` arrays ``a_e: [M, r_e]``, ``b_e: [r_e, N]`` (heterogeneous ranks). No padding:
    ``R = sum_e r_e``. ``unpack_experts(*pack_experts(a, b))`` returns the per-expert factors."""
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        if not isinstance(a, (list, tuple)) or not isinstance(b, (list, tuple)):
            raise TypeError("a and b must both be sequences of per-expert factors or both be stacked arrays; got "
                            f"{type(a).__name__} and {type(b).__name__}")
        if len(a) != len(b) or not a:
            raise ValueError(f"a and b must list the same number E >= 1 of experts; got {len(a)} and {len(b)}")
        a = [check_array(x, f"a[{i}]", kind="floating", ndim=2) for i, x in enumerate(a)]
        b = [check_array(x, f"b[{i}]", kind="floating", ndim=2) for i, x in enumerate(b)]
        m, n = a[0].shape[0], b[0].shape[1]
        for i, (ai, bi) in enumerate(zip(a, b)):
            if ai.shape[0] != m or bi.shape[1] != n or ai.shape[1] != bi.shape[0]:
                raise ValueError(f"expert {i}: a[{i}] must be [M={m}, r] and b[{i}] [r, N={n}] with the same r; got "
                                 f"{tuple(ai.shape)} and {tuple(bi.shape)} (ranks mismatch)")
        ranks = tuple(int(ai.shape[1]) for ai in a)
        dt = jnp.result_type(*a, *b)
        return (jnp.concatenate([x.astype(dt) for x in a], axis=1), jnp.concatenate([x.astype(dt) for x in b], 0),
                ranks)
    a, b = _stacked(a, b)
    e, m, r = a.shape
    return jnp.swapaxes(a, 0, 1).reshape(m, e * r), b.reshape(e * r, b.shape[-1]), (r,) * e


def unpack_experts(a, b, ranks):
    """Inverse of :func:`pack_experts`: a list of ``E`` pairs ``(a_e [M, r_e], b_e [r_e, N])``."""
    a, b, ranks = _packed(a, b, ranks)
    cuts = np.cumsum((0,) + ranks)
    return [(a[:, cuts[i]:cuts[i + 1]], b[cuts[i]:cuts[i + 1]]) for i in range(len(ranks))]


def _stacked(a, b):
    a = check_array(a, "a", kind="floating")
    b = check_array(b, "b", kind="floating")
    if a.ndim != 3 or b.ndim != 3:
        raise ValueError(f"stacked experts need a: [E, M, r] and b: [E, r, N] (or pass ranks= for the packed "
                         f"layout a: [M, R], b: [R, N]); got a {tuple(a.shape)} and b {tuple(b.shape)}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"expert axis mismatch: a has E = {a.shape[0]} experts (axis 0) but b has {b.shape[0]}")
    if a.shape[2] != b.shape[1]:
        raise ValueError(f"ranks mismatch: a: [E, M, r] has r = {a.shape[2]} but b: [E, r, N] has r = {b.shape[1]}")
    if a.shape[0] == 0 or a.shape[2] == 0:
        raise ValueError(f"a needs E >= 1 experts of rank r >= 1, got shape {tuple(a.shape)}")
    return a, b


def _packed(a, b, ranks):
    ranks = _check_ranks(ranks)
    a = check_array(a, "a", kind="floating")
    b = check_array(b, "b", kind="floating")
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"packed experts (ranks= given) need a: [M, R] and b: [R, N]; got a {tuple(a.shape)} "
                         f"and b {tuple(b.shape)} (stacked [E, M, r] factors: pass ranks=None)")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"ranks mismatch: a: [M, R] has R = {a.shape[1]} columns but b: [R, N] has {b.shape[0]} rows")
    if sum(ranks) != a.shape[1]:
        raise ValueError(f"ranks={ranks} sum to {sum(ranks)} but a: [M, R] has R = {a.shape[1]}; ranks must list "
                         "every expert's rank in packing order")
    return a, b, ranks


def mixture_delta(x, a, b, gates, *, ranks=None, scale: float = 1.0):
    """The mixture-of-low-rank-experts term ``s * sum_e g_e (x a_e) b_e``: ``[..., N]``.

    ``x: [..., M]``; ``gates: [..., E]`` (same batch shape as ``x``; e.g. from :func:`topk_gates`
    or :func:`remix_gates`); experts either stacked (``ranks=None``: ``a: [E, M, r]``,
    ``b: [E, r, N]``) or packed (``ranks=(r_1, ..., r_E)``: ``a: [M, sum r]``, ``b: [sum r, N]``);
    ``scale`` a finite real (LoRA's ``alpha / r``; default 1). Computed in
    ``promote_types(x, a, b, gates, float32)`` as ``((x a) * g[..., id]) b`` (the packed form, see
    the module docstring; cost proportional to the sum of the ranks, exact) and rounded once to
    ``result_type(x, a, b)``. Add ``x W_0 + bias`` for the full layer.

    Raises ``TypeError`` for non-floating arrays or ``ranks`` that is not a sequence of ints; ``ValueError`` for an
    expert-axis mismatch between ``a``, ``b`` and ``gates``, ranks that do not match the factors,
    ``M`` or batch mismatches with ``x``, and NaN/Inf in concrete inputs."""
    x = _floating(x, "x")
    scale = check_float(scale, "scale")
    if ranks is None:
        a, b = _stacked(a, b)
        e, m, r = a.shape
        a2, b2, ranks = jnp.swapaxes(a, 0, 1).reshape(m, e * r), b.reshape(e * r, b.shape[-1]), (r,) * e
    else:
        a2, b2, ranks = _packed(a, b, ranks)
        m = a2.shape[0]
    check_finite(a, "a")
    check_finite(b, "b")
    e = len(ranks)
    if x.shape[-1] != m:
        raise ValueError(f"x: [..., M] has M = {x.shape[-1]} but the experts' a has M = {m}")
    g = check_array(gates, "gates", kind="floating", min_ndim=1)
    check_finite(g, "gates")
    if g.shape[-1] != e:
        raise ValueError(f"gates must have E = {e} experts on the last axis (expert axis of a/b), got shape "
                         f"{tuple(g.shape)}")
    if g.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"gates must have shape [..., E] with x's batch shape {tuple(x.shape[:-1])}, got "
                         f"{tuple(g.shape)}")
    out = jnp.result_type(x.dtype, a2.dtype, b2.dtype)
    cd = _cd(x.dtype, a2.dtype, b2.dtype, g.dtype)
    h = x.astype(cd) @ a2.astype(cd)
    if all(r == ranks[0] for r in ranks):
        gc = jnp.broadcast_to(g.astype(cd)[..., :, None], g.shape + (ranks[0],)).reshape(g.shape[:-1] + (-1,))
    else:
        gc = jnp.take(g.astype(cd), jnp.asarray(expert_ids(ranks)), axis=-1)
    y = (h * gc) @ b2.astype(cd)
    return (scale * y).astype(out)


def mixture_branch(x, w_router, a, b, *, k: int, router: str = "topk", key=None, ranks=None, scale: float = 1.0,
                   omega: float | None = None, renormalize: bool = True, temperature: float = 1.0):
    """Route and mix in one call: ``(delta [..., N], Routing)`` -- the activation-space branch
    ``branch(x) = s sum_e g_e(x) (x a_e) b_e`` with ``z = x W_r`` (:func:`router_logits`) and
    ``g = topk_gates(z, k)`` (``router="topk"``) or ``remix_gates(key, z, k)`` (``router="remix"``;
    ``key=None`` = inference). Add it to ``x W_0 (+ bias)`` of an unmodified Dense:
    :class:`MixtureLoRA` is exactly that. Factors as in :func:`mixture_delta`; the router's
    ``log_prob`` (ReMix) is in the returned :class:`Routing` for :func:`rloo_surrogate`."""
    router = check_choice(router, "router", ("topk", "remix"))
    z = router_logits(x, w_router)
    if router == "remix":
        rt = remix_gates(key, z, k, omega=omega, temperature=temperature)
    else:
        gates, idx = topk_gates(z, k, renormalize=renormalize, temperature=temperature)
        probs = router_probs(z, temperature=temperature)
        rt = Routing(gates, idx, jnp.zeros(z.shape[:-1], probs.dtype), probs)
    return mixture_delta(x, a, b, rt.gates, ranks=ranks, scale=scale), rt


def experts_from_finetuned(w_base, w_experts, ranks):
    """FlexMoRE: low-rank experts from fully fine-tuned expert weights, packed for :func:`mixture_delta`.

    For every expert ``e``: ``a_e, b_e = lowrank_delta(W_e, W_0, r_e)`` (the truncated SVD of
    ``W_e - W_0`` with the sqrt(S) split, :func:`lrjax.linalg.lowrank_delta`), so that with a
    one-hot gate on ``e`` and ``scale=1``, ``x W_0 + mixture_delta(...) = x (W_0 + trunc_{r_e}(W_e - W_0))``
    (``= x W_e`` at full rank). Follows FlexMoRE (Schneider-Kamp et al., *FlexMoRE: A Flexible
    Mixture of Rank-heterogeneous Experts*; ``schneiderkamplab/FlexMoRE
    src/scripts/flexmore/low_rank_expert_flexmore.py``), whose router is FlexOlmo's (a linear
    router; here :func:`router_logits` + :func:`topk_gates`, trained separately).

    ``w_base: [M, N]``; ``w_experts``: a sequence of ``E`` arrays ``[M, N]`` or one ``[E, M, N]``
    array; ``ranks``: one int for all experts or a sequence of ``E`` ints (heterogeneous, FlexMoRE's
    point), each ``1 <= r_e <= min(M, N)``. Returns ``(a [M, R], b [R, N], ranks)`` (float32 or
    wider). Errors name the argument (shape/rank/count mismatches: ``ValueError``)."""
    wb = _floating(w_base, "w_base", min_ndim=2)
    if wb.ndim != 2:
        raise ValueError(f"w_base must be one matrix [M, N], got shape {tuple(wb.shape)}")
    if isinstance(w_experts, (list, tuple)):
        if not w_experts:
            raise ValueError("w_experts must hold at least one expert weight [M, N]")
        ws = [check_array(w, f"w_experts[{i}]", kind="floating") for i, w in enumerate(w_experts)]
    else:
        we = check_array(w_experts, "w_experts", kind="floating")
        if we.ndim != 3 or we.shape[0] == 0:
            raise ValueError(f"w_experts must be a sequence of [M, N] arrays or one [E, M, N] array with E >= 1, "
                             f"got shape {tuple(we.shape)}")
        ws = list(we)
    for i, w in enumerate(ws):
        if w.shape != wb.shape:
            raise ValueError(f"w_experts[{i}] has shape {tuple(w.shape)} but w_base is {tuple(wb.shape)}; every "
                             "expert must be a fine-tuned copy of the base matrix")
    e = len(ws)
    if isinstance(ranks, (numbers.Integral, np.integer)) and not isinstance(ranks, (bool, np.bool_)):
        ranks = (int(ranks),) * e
    ranks = _check_ranks(ranks)
    if len(ranks) != e:
        raise ValueError(f"ranks lists {len(ranks)} ranks but there are E = {e} experts in w_experts")
    m, n = wb.shape
    for i, r in enumerate(ranks):
        check_rank(r, m, n, f"ranks[{i}]", where=f"expert {i}")
    pairs = [linalg.lowrank_delta(w, wb, r) for w, r in zip(ws, ranks)]
    return pack_experts([p[0] for p in pairs], [p[1] for p in pairs])


# ------------------------------------------------------------------------------- the NNX layer
class Frozen(nnx.Variable):
    """A frozen weight of :class:`MixtureLoRA` (the base kernel and bias): not an ``nnx.Param``, so
    ``nnx.grad`` / ``nnx.Optimizer(..., wrt=nnx.Param)`` leave it alone."""


class MixtureLoRA(nnx.Module):
    """A frozen Dense plus a routed mixture of ``E`` low-rank experts (Flax NNX)::

        y = x W_0 + bias + scale * sum_e g_e(x) (x a_e) b_e,   z = x W_r,   g = router(z)

    Args: ``in_features`` M, ``out_features`` N; ``num_experts`` E (default 8); ``rank``: an int
    (all experts) or a tuple of ``E`` ints (heterogeneous, packed without padding); ``k`` active
    experts (default 2, ``1 <= k <= E``); ``router``: ``"topk"`` (softmax top-k,
    :func:`topk_gates`, ``renormalize`` default True) or ``"remix"`` (:func:`remix_gates`,
    ``omega`` default ``1/k``); ``scale`` (default 1.0); ``temperature`` (default 1.0);
    ``use_bias``; ``base_kernel [M, N]`` / ``base_bias [N]``: the pretrained Dense to adapt (default:
    ``N(0, 1/M)`` kernel, zero bias; stored as :class:`Frozen`); ``rngs``.

    Parameters (``nnx.Param``): ``router [M, E]`` ~ ``N(0, 1/M)`` (Gaussian, as ReMix's analysis of
    router init), ``a [M, R]`` ~ ``N(0, 1/M)``, ``b [R, N] = 0`` (LoRA's init: the layer starts as
    the base), packed with ``self.ranks`` (see :func:`pack_experts`; ``unpack_experts`` gives the
    ``[E, M, r]`` view). ``param_dtype`` (default float32) for all weights.

    ``__call__(x, *, key=None, return_aux=False)``: ``x: [..., M]``. For ``router="remix"`` a
    ``key`` samples the training subsets (pass a different key per call; ``return_aux=True`` returns
    ``(y, Routing)`` whose ``log_prob`` goes to :func:`rloo_surrogate`); ``key=None`` is inference
    (deterministic top-k). ``"topk"`` ignores ``key``."""

    def __init__(self, in_features: int, out_features: int, *, num_experts: int = 8, rank=2, k: int = 2,
                 router: str = "topk", omega: float | None = None, renormalize: bool = True, scale: float = 1.0,
                 temperature: float = 1.0, use_bias: bool = True, base_kernel=None, base_bias=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.in_features = m = check_int(in_features, "in_features", low=1)
        self.out_features = n = check_int(out_features, "out_features", low=1)
        self.num_experts = e = check_int(num_experts, "num_experts", low=1)
        if isinstance(rank, (numbers.Integral, np.integer)) and not isinstance(rank, (bool, np.bool_)):
            ranks = (int(rank),) * e
        else:
            ranks = _check_ranks(rank, "rank")
        if len(ranks) != e:
            raise ValueError(f"rank lists {len(ranks)} ranks but num_experts = {e}")
        for i, r in enumerate(ranks):
            check_rank(r, m, n, "rank" if len(set(ranks)) == 1 else f"rank[{i}]")
        self.ranks = ranks
        self.k = _k(k, e)
        self.router_kind = check_choice(router, "router", ("topk", "remix"))
        self.omega = _omega(omega, self.k)
        self.renormalize = check_bool(renormalize, "renormalize")
        self.scale = check_float(scale, "scale")
        self.temperature = _temperature(temperature)
        self.use_bias = check_bool(use_bias, "use_bias")
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"rngs must be an nnx.Rngs, got {type(rngs).__name__}")
        k1, k2, k3 = jax.random.split(rngs.params(), 3)
        if base_kernel is None:
            w0 = jax.random.normal(k1, (m, n), param_dtype) / math.sqrt(m)
        else:
            w0 = _floating(base_kernel, "base_kernel", min_ndim=2)
            if w0.shape != (m, n):
                raise ValueError(f"base_kernel must have shape [in_features, out_features] = ({m}, {n}), got "
                                 f"{tuple(w0.shape)}")
        self.kernel = Frozen(jnp.asarray(w0))
        if self.use_bias:
            if base_bias is None:
                b0 = jnp.zeros((n,), param_dtype)
            else:
                b0 = _floating(base_bias, "base_bias")
                if b0.shape != (n,):
                    raise ValueError(f"base_bias must have shape [out_features] = ({n},), got {tuple(b0.shape)}")
            self.bias = Frozen(jnp.asarray(b0))
        elif base_bias is not None:
            raise ValueError("base_bias was given but use_bias=False; drop one of them")
        else:
            self.bias = None
        self.router = nnx.Param(jax.random.normal(k2, (m, e), param_dtype) / math.sqrt(m))
        self.a = nnx.Param(jax.random.normal(k3, (m, sum(ranks)), param_dtype) / math.sqrt(m))
        self.b = nnx.Param(jnp.zeros((sum(ranks), n), param_dtype))

    def __call__(self, x, *, key=None, return_aux: bool = False):
        x = _floating(x, "x")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: [..., M] must have M = in_features = {self.in_features}, got shape {tuple(x.shape)}")
        return_aux = check_bool(return_aux, "return_aux")
        if key is not None:
            key = check_key(key)
        delta, rt = mixture_branch(x, self.router[...], self.a[...], self.b[...], k=self.k, router=self.router_kind,
                                   key=key, ranks=self.ranks, scale=self.scale, omega=self.omega,
                                   renormalize=self.renormalize, temperature=self.temperature)
        w0 = self.kernel[...]
        cd = _cd(x.dtype, w0.dtype)
        y = x.astype(cd) @ w0.astype(cd)
        if self.bias is not None:
            y = y + self.bias[...].astype(cd)
        y = y + delta.astype(cd)
        y = y.astype(jnp.result_type(x.dtype, w0.dtype))
        return (y, rt) if return_aux else y
