"""FlyLoRA: a frozen sparse random projection as an implicit router over rank-1 experts.

Zou et al., "FlyLoRA: Boosting Task Decoupling and Parameter Efficiency via Implicit Rank-Wise
Mixture-of-Experts" (NeurIPS 2025); official code ``gfyddha/FlyLoRA`` @91d9e3672d3d: the minimal
layer ``flylora.py::FlyLoRALinear`` and the PEFT fork used for the paper's numbers
(``peft/src/peft/tuners/lora/layer.py``: ``reset_lora_parameters(..., "sparse")`` and
``Linear.forward``, lines marked ``# modified``; ``merge_lora_adapters.py``).

Math (torch orientation ``y = W x``; lrjax stores the matrix view ``a = A^T: [M, r]``,
``b = B^T: [r, N]`` with ``M`` inputs and ``N`` outputs, so ``z = x a``)::

    z   = A x                          # [r], A frozen, sparse
    idx = top_k(z + d)                 # k of the r ranks per token (select="signed", the fork)
        | top_k(|z + d|)               #                              (select="abs", flylora.py)
    m_i = 1[i in idx]
    y   = W x + s B (z * m),   s = alpha / r

The router bias ``d`` changes *which* ranks are selected only; the selected values are the
unbiased ``z`` (both official files multiply ``A x``, not ``A x + d``, by the mask).

* **A** (``"a"``, frozen): each of the ``r`` rank rows has exactly ``p = M // (r // k)`` nonzeros
  at distinct random input positions, values ``N(0, (1/r)^2)`` (the fork: ``normal_(std=1/r)``
  times a mask of ``p = in_features // (r // top_k)`` random columns per row). Stored as a dense
  frozen array, not regenerated from a seed (``seed_keys``): regenerating a sparse pattern needs a
  per-row permutation (a sort of ``r x M`` keys) in every forward, and averaging adapters across
  tasks compares ``A`` directly; the cost is ``M r`` frozen floats per leaf, the size of LoRA's A.
* **B** (``"b"``, trainable): zeros, so the adapted model starts at the base model.
* **d** (``"d"``, frozen *state*, float32 whatever ``dtype`` is, so ``u``-sized steps are not
  rounded away): zeros; after each forward ``d <- d + u sign(mean(c) - c)`` with ``c_i`` the
  number of tokens that selected rank ``i`` in the batch (the fork updates on every forward,
  also in eval; ``flylora.py`` only in training). :func:`lrjax.factored` returns the new ``d`` as
  ``state``; put it in with ``rp.with_state(adapters, state)`` (or do not, to freeze it). When the
  model uses one kernel several times in a forward, ``c`` is the sum over the uses and ``d``
  moves once; an ``nn.scan`` stack has one ``d`` and one ``c`` per layer.

Defaults follow the fork's MMLU run (``scripts/run_mmlu.sh``): ``rank=32``, ``alpha=64`` (``s =
2``), ``top_k=8``, ``u=1e-3`` (``finetune.py``'s default is ``1e-2``), ``select="signed"``.
Gradient: the fork computes ``A x`` under ``torch.no_grad()``, so no gradient flows from the
adapter branch back into ``x`` (only through ``W x``); ``flylora.py`` lets it flow. Default
``detach_input=False`` (the math: ``dL/dx`` includes ``A^T (m * B^T s dL/dy)``); set it ``True``
for the fork's gradient.

FlyLoRA is activation-space (``activation_space = True``): the mask depends on ``x``, so there is
no effective weight (``W + s B A`` is *not* the routed model); ``merge``/``materialize``/``delta``
raise :class:`lrjax.interpreter.NotMergeable`. Run the model with
``lrjax.factored(fn, rp)(base, adapters, x) -> (y, state)``.

Multi-task merging (:func:`average_adapters`) is the fork's ``merge_lora_adapters.py``: the
elementwise mean of every adapter tensor over tasks (``A`` is identical when every task was
initialized from the same key, so it is the mean of ``B`` and ``d``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lrjax import _validation as V
from lrjax.interpreter import WithAux
from lrjax.reparam.base import Reparam

__all__ = ["FlyLoRA", "average_adapters", "sparse_projection"]


def sparse_projection(key, m: int, r: int, p: int, *, batch=(), dtype=jnp.float32):
    """FlyLoRA's frozen ``A`` in the matrix view: ``[*batch, m, r]``; every column (one rank row of
    the paper's ``A: [r, m]``) has exactly ``p`` nonzeros at distinct random rows, values
    ``N(0, (1/r)^2)``. ``p`` must satisfy ``1 <= p <= m``."""
    V.check_key(key, "key")
    m = V.check_int(m, "m", low=1)
    r = V.check_int(r, "r", low=1)
    p = V.check_int(p, "p", low=1, high=m)
    batch = tuple(int(b) for b in batch)
    kp, kv = jax.random.split(key)
    # a uniformly random p-subset of the m rows per rank: the p smallest of m iid uniforms
    u = jax.random.uniform(kp, (*batch, r, m))
    order = jnp.argsort(jnp.argsort(u, axis=-1), axis=-1)
    mask = jnp.swapaxes(order < p, -1, -2)  # [*batch, m, r]
    vals = jax.random.normal(kv, (*batch, m, r), jnp.float32) / r
    return jnp.where(mask, vals, 0.0).astype(dtype)


@dataclasses.dataclass(frozen=True)
class FlyLoRA(Reparam):
    """FlyLoRA (see the module docstring for the math, the defaults and the official code).

    Fields (besides :class:`~lrjax.reparam.Reparam`'s ``rank``, ``alpha``, ``targets``, ``axes``,
    ``dtype``): ``top_k`` (``k``: ranks active per token, ``1 <= k <= rank``), ``u`` (the bias
    rule's step, finite ``>= 0``; ``0`` freezes ``d``), ``select`` (``"signed"``: the ``k``
    largest ``z + d``, the fork and the paper's numbers; ``"abs"``: the ``k`` largest ``|z + d|``,
    ``flylora.py``), ``detach_input`` (``True``: no gradient from the branch into ``x``, the fork).

    Factors per leaf (matrix view ``[*batch, M, N]``): ``a [*batch, M, r]`` frozen sparse,
    ``b [*batch, r, N]`` trainable (zeros), ``d [*batch, r]`` frozen state (float32 zeros).
    Each leaf follows lrjax's rank rule ``rank <= min(M, N)``, which also gives ``p = M // (rank //
    top_k) >= M // rank >= 1``.

    Raises: ``TypeError``/``ValueError`` naming ``top_k`` (not an int, ``<= 0`` or ``> rank``),
    ``u`` (negative, NaN/Inf, not a number), ``select`` (not ``"signed"``/``"abs"``),
    ``detach_input`` (not a bool), and the base fields.
    """

    rank: int = 32
    alpha: float | None = 64.0
    targets: Any = "kernel"
    axes: Any = None
    dtype: Any = None
    top_k: int = 8
    u: float = 1e-3
    select: str = "signed"
    detach_input: bool = False

    activation_space = True
    factor_keys = ("a", "b", "d")
    frozen_keys = ("a", "d")
    state_keys = ("d",)

    def __post_init__(self):
        super().__post_init__()
        V.check_int(self.top_k, "top_k", low=1, high=self.rank)
        V.check_float(self.u, "u", low=0.0)
        V.check_choice(self.select, "select", ("signed", "abs"))
        V.check_bool(self.detach_input, "detach_input")

    def nonzeros(self, m: int) -> int:
        """``p = M // (rank // top_k)``: the nonzeros per rank row of ``A`` for ``M`` inputs."""
        return m // (self.rank // self.top_k)

    def init_leaf(self, key, w, path):
        *bs, m, n = w.shape
        dt = self.factor_dtype(w)
        a = sparse_projection(key, m, self.rank, self.nonzeros(m), batch=tuple(bs), dtype=dt)
        return w, {"a": a, "b": jnp.zeros((*bs, self.rank, n), dt), "d": jnp.zeros((*bs, self.rank), jnp.float32)}

    def _check_extra(self, path, f, argname):
        want = tuple(f["a"].shape[:-2]) + (f["a"].shape[-1],)
        if tuple(f["d"].shape) != want:
            raise ValueError(f"{argname}[{path!r}]['d'] has shape {tuple(f['d'].shape)}; the router bias must "
                             f"have shape {want} (the batch axes and the rank)")

    def route(self, x, f):
        """``(z, mask)`` of one leaf: ``z = x a [..., r]`` (compute dtype), ``mask [..., r]`` (0/1,
        compute dtype) marking the ``top_k`` ranks selected per token."""
        a = f["a"]
        cd = V.compute_dtype(x.dtype, a.dtype)
        if self.detach_input:
            x = jax.lax.stop_gradient(x)
        z = x.astype(cd) @ a.astype(cd)
        score = jax.lax.stop_gradient(z) + f["d"].astype(cd)
        if self.select == "abs":
            score = jnp.abs(score)
        _, idx = jax.lax.top_k(score, self.top_k)
        mask = jax.nn.one_hot(idx, self.rank, dtype=cd).sum(-2)
        return z, mask

    def branch(self, x, y, f, path):
        """``s B (z * mask)`` with the per-rank counts ``c`` of this use as aux."""
        z, mask = self.route(x, f)
        b = f["b"]
        cd = V.compute_dtype(z.dtype, b.dtype)
        delta = self.scale * ((z * mask).astype(cd) @ b.astype(cd))
        counts = mask.reshape(-1, self.rank).sum(0).astype(jnp.float32)
        return WithAux(delta, counts)

    def update_state(self, f, aux, path):
        """``d <- d + u sign(mean(c) - c)`` (per layer for a stacked ``[L, r]`` ``c``)."""
        d = f["d"]
        c = jnp.asarray(aux, jnp.float32)
        step = self.u * jnp.sign(c.mean(-1, keepdims=True) - c)
        return {"d": (d.astype(jnp.float32) + step).astype(d.dtype)}


def average_adapters(adapters_list: Sequence[Mapping]) -> dict:
    """Multi-task merge by averaging (FlyLoRA's ``merge_lora_adapters.py``): the elementwise mean of
    every factor over the adapters in ``adapters_list`` (computed in ``promote_types(factor,
    float32)``, rounded once to the factor's dtype; a factor identical in every dict, such as
    FlyLoRA's shared ``A``, is returned unchanged). Works for any variant's adapters dict (LoRA's
    ``a`` and ``b`` are averaged separately, as the official script does for its LoRA baseline).

    Every adapters dict must have the same paths, factor names, shapes and dtypes. Factors named
    ``"a"`` whose concrete values differ across the list are refused when every dict in the list
    has a ``"d"`` factor (FlyLoRA: the frozen ``A`` must be shared, i.e. every task initialized
    from the same key; averaging different sparse projections would route with a matrix no task
    was trained with). Returns a new dict.

    Raises: ``TypeError`` (not a non-empty list/tuple of adapters dicts, non-array factors),
    ``ValueError`` naming ``adapters_list`` (mismatched paths, factors, shapes, dtypes or ``A``).
    """
    if not isinstance(adapters_list, (list, tuple)):
        raise TypeError(f"adapters_list must be a list of adapters dicts (one per task), got "
                        f"{type(adapters_list).__name__}")
    if not adapters_list:
        raise ValueError("adapters_list is empty; pass at least one adapters dict")
    for i, ad in enumerate(adapters_list):
        if not isinstance(ad, Mapping) or not ad:
            raise TypeError(f"adapters_list[{i}] must be a non-empty adapters dict {{path: {{factor: array}}}}, "
                            f"got {type(ad).__name__}")
        for p, f in ad.items():
            if not isinstance(f, Mapping):
                raise TypeError(f"adapters_list[{i}][{p!r}] must be a dict of factors, got {type(f).__name__}")
            for k, x in f.items():
                if not isinstance(x, (jax.Array, np.ndarray, jax.core.Tracer)):
                    raise TypeError(f"adapters_list[{i}][{p!r}][{k!r}] must be an array, got {type(x).__name__}")
                if not jnp.issubdtype(x.dtype, jnp.floating):
                    raise TypeError(f"adapters_list[{i}][{p!r}][{k!r}] has dtype {x.dtype}; only floating factors "
                                    "can be averaged")
    ref = adapters_list[0]
    flylora = all("d" in f for ad in adapters_list for f in ad.values())
    for i, ad in enumerate(adapters_list[1:], 1):
        if set(ad) != set(ref):
            diff = sorted(set(ad) ^ set(ref))[:4]
            raise ValueError(f"adapters_list[{i}] adapts other leaves than adapters_list[0] ({diff}); merge adapters "
                             "of one config on one base")
        for p, f in ad.items():
            if set(f) != set(ref[p]):
                raise ValueError(f"adapters_list[{i}][{p!r}] has factors {sorted(f)} but adapters_list[0] has "
                                 f"{sorted(ref[p])}; adapters of different variants?")
            for k, x in f.items():
                r0 = ref[p][k]
                if tuple(x.shape) != tuple(r0.shape) or x.dtype != r0.dtype:
                    raise ValueError(f"adapters_list[{i}][{p!r}][{k!r}] is {x.dtype}{tuple(x.shape)} but "
                                     f"adapters_list[0] has {r0.dtype}{tuple(r0.shape)}; adapters of different "
                                     "ranks or dtypes cannot be averaged")
            if flylora and "a" in f and V.is_concrete(f["a"]) and V.is_concrete(ref[p]["a"]):
                with jax.ensure_compile_time_eval():
                    same = bool(jnp.array_equal(f["a"], ref[p]["a"]))
                if not same:
                    raise ValueError(f"adapters_list[{i}][{p!r}]['a'] differs from adapters_list[0]'s: FlyLoRA's "
                                     "frozen sparse A must be shared by the tasks being merged; initialize every "
                                     "task's adapters with the same key (rp.init(same_key, params))")
    out = {}
    for p, f in ref.items():
        new = {}
        for k, x in f.items():
            xs = [ad[p][k] for ad in adapters_list]
            if all(V.is_concrete(v) for v in xs):
                with jax.ensure_compile_time_eval():
                    if all(bool(jnp.array_equal(v, x)) for v in xs[1:]):
                        new[k] = x  # shared factors (FlyLoRA's A) stay bit-identical
                        continue
            cd = V.compute_dtype(x.dtype)
            s = sum(ad[p][k].astype(cd) for ad in adapters_list)
            new[k] = (s / len(adapters_list)).astype(x.dtype)
        out[p] = new
    return out
