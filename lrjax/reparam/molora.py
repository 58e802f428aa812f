"""MoLoRA: a routed mixture of LoRA experts at every targeted kernel of an unmodified model.

At a targeted kernel ``W: [M, N]`` (the :mod:`lrjax.axes` matrix view) with input ``x: [..., M]``::

    z = x W_r                                   router logits, W_r: [M, E]
    g = topk_gates(z, k)                        softmax top-k, renormalized over the k active experts
    y = x W + s * sum_e g_e(x) (x a_e) b_e      a_e: [M, r], b_e: [r, N], s = alpha / r

the layer of :class:`lrjax.nn.mixture.MixtureLoRA` (same math, same pure functions:
:func:`~lrjax.nn.mixture.router_logits`, :func:`~lrjax.nn.mixture.topk_gates`,
:func:`~lrjax.nn.mixture.mixture_delta`), put on any ``fn(params, x)`` -- a linen ``apply``, an NNX
merge-and-call, a plain function -- through :func:`lrjax.factored`, like every other adapter. With
``k = E`` it is the soft-merged MoLoRA of Zadouri et al. 2023 (*Pushing Mixture of Experts to the
Limit*, arXiv:2309.05444); with ``k < E`` the sparse top-k mixtures (Mixtral convention: the k
largest logits, renormalized softmax over them; ties to the lower expert index).

The output depends on ``x`` through the router, so MoLoRA is an *activation-space* adapter
(``activation_space = True``): ``merge``/``materialize`` raise
:class:`lrjax.interpreter.NotMergeable`. To serve one expert as a plain LoRA, take its factors
``(a[e], b[e])``.

Adapters per leaf (leading expert axis, after any stack axes of the leaf)::

    {"a": [*batch, E, M, r], "b": [*batch, E, r, N], "router": [*batch, M, E]}

Init: ``a_e ~ U(-1/sqrt(M), 1/sqrt(M))`` (LoRA's), ``b_e = 0`` (the model starts unchanged),
``W_r ~ N(0, 1/M)`` (Gaussian, as :class:`~lrjax.nn.mixture.MixtureLoRA`). All three train by
gradient (the router through the gates). The router's distribution per token is available from
:func:`router_probs` for collapse diagnostics (:func:`lrjax.nn.mixture.effective_support`). ReMix's
sampled subsets need a key per step: use the layer :class:`~lrjax.nn.mixture.MixtureLoRA`.
Precision: branch computed in ``promote_types(x, factors, float32)`` and added to ``x W`` once.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lrjax import _validation as V
from lrjax.reparam.base import Reparam


def _mx():
    from lrjax.nn import mixture  # lazily: `import lrjax` does not load the layers package
    return mixture

__all__ = ["MoLoRA", "router_probs"]


@dataclasses.dataclass(frozen=True)
class MoLoRA(Reparam):
    """Mixture of ``num_experts`` LoRA experts of rank ``rank`` with a softmax top-``k`` router
    at every targeted kernel (see the module docstring).

    Fields: ``rank`` (per expert, default 8), ``alpha`` (``s = alpha / rank``; default ``rank``),
    ``num_experts`` E (default 4), ``k`` active experts (default 2, ``1 <= k <= E``),
    ``renormalize`` (default True), ``temperature`` (default 1.0, finite > 0), and the common
    ``targets``/``axes``/``dtype``. Raises ``ValueError``/``TypeError`` naming the field."""

    num_experts: int = 4
    k: int = 2
    renormalize: bool = True
    temperature: float = 1.0

    activation_space = True
    factor_keys = ("a", "b", "router")

    def __post_init__(self):
        super().__post_init__()
        V.check_int(self.num_experts, "num_experts", low=1)
        V.check_int(self.k, "k", low=1)
        if self.k > self.num_experts:
            raise ValueError(f"k must be <= num_experts = {self.num_experts} (top-k over the experts), got k={self.k}")
        V.check_bool(self.renormalize, "renormalize")
        V.check_float(self.temperature, "temperature", low=0.0, low_open=True)

    def init_leaf(self, key, w, path):
        """``(w, {"a": [*b, E, M, r] ~ U(+-1/sqrt(M)), "b": 0, "router": [*b, M, E] ~ N(0, 1/M)})``."""
        *bs, m, n = w.shape
        e, r = self.num_experts, self.rank
        dt = self.factor_dtype(w)
        ka, kr = jax.random.split(key)
        bound = 1.0 / np.sqrt(m)
        a = jax.random.uniform(ka, (*bs, e, m, r), jnp.float32, -bound, bound).astype(dt)
        router = (jax.random.normal(kr, (*bs, m, e), jnp.float32) / np.sqrt(m)).astype(dt)
        return w, {"a": a, "b": jnp.zeros((*bs, e, r, n), dt), "router": router}

    def check_factors(self, path, f, bshape, m, n, argname, shape=None):
        """Refuse factors whose shapes are not ``a [*b, E, M, r]``, ``b [*b, E, r, N]``,
        ``router [*b, M, E]`` (``ValueError`` naming the entry)."""
        e, r = self.num_experts, self.rank
        want = {"a": bshape + (e, m, r), "b": bshape + (e, r, n), "router": bshape + (m, e)}
        for k, s in want.items():
            if tuple(f[k].shape) != s:
                raise ValueError(f"{argname}[{path!r}][{k!r}] has shape {tuple(f[k].shape)}, expected {s} "
                                 f"(num_experts={e}, rank={r}, matrix view {bshape + (m, n)}); adapters made for "
                                 "another base or another num_experts/rank")

    def gates(self, x, f):
        """``(gates [..., E], idx [..., k])`` of ``x: [..., M]`` for one leaf's factors."""
        mx = _mx()
        return mx.topk_gates(mx.router_logits(x, f["router"]), self.k, renormalize=self.renormalize,
                             temperature=self.temperature)

    def branch(self, x, y, f, path):
        """``s sum_e g_e(x) (x a_e) b_e`` with the softmax top-k gates of ``x W_r``: ``[..., N]``."""
        g, _ = self.gates(x, f)
        return _mx().mixture_delta(x, f["a"], f["b"], g, scale=self.scale)


def router_probs(rp: MoLoRA, adapters: dict, path: str, x):
    """The router distribution ``softmax(x W_r / T)``: ``[..., E]`` at the kernel ``path`` for its
    matrix-view input ``x: [..., M]`` (e.g. the features entering that layer), for collapse
    diagnostics with :func:`lrjax.nn.mixture.effective_support`."""
    if not isinstance(rp, MoLoRA):
        raise TypeError(f"rp must be an lrjax.MoLoRA, got {type(rp).__name__}")
    if not isinstance(adapters, dict) or path not in adapters:
        raise ValueError(f"path: no MoLoRA adapter at {path!r}; adapters have {list(adapters)[:6]}")
    mx = _mx()
    return mx.router_probs(mx.router_logits(x, adapters[path]["router"]), temperature=rp.temperature)
