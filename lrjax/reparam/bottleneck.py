"""Bottleneck adapters: the sequential (Pfeiffer) adapter as an activation-space branch, and the
invertible NICE coupling on embeddings.

Sources: Pfeiffer et al., "MAD-X" (EMNLP 2020) and "AdapterFusion" (EACL 2021); the seed's study of
small multilingual LM adapters (``d-gurgurov/Knowledge-Driven-Adaptation-LLMs``, ``--adapter_config
seq_bn | seq_bn_inv``); the facts below are read from the ``adapters`` library (``adapter-hub/adapters``
``src/adapters/methods/modeling.py``: ``Adapter``, ``init_bert_weights``, ``get_subnet_constructor``,
``NICECouplingBlock``; ``methods/bottleneck.py``; ``configuration/adapter_config.py``: ``SeqBnConfig``).

Sequential bottleneck (:class:`SeqBottleneck`, ``seq_bn``)
----------------------------------------------------------
After a layer's FFN output projection ``h = x W + b`` (``W: [M, N]``, ``N`` = the model width)::

    h <- h + scaling * (W_up ReLU(W_down h + b_down) + b_up)

with ``W_down: [N, N // reduction_factor]`` (at least 1, as the library), ``W_up: [N //
reduction_factor, N]``, ``reduction_factor=16``, ``scaling=1.0``, ReLU, and the library's ``"bert"``
init (``SeqBnConfig.init_weights``): both weights ``N(0, 0.02^2)``, both biases 0 (so the adapter is
*not* the identity at init, as in the library). What this branch does not model: the library's
``original_ln_before/after`` and ``residual_before_ln`` place the adapter between the FFN output and
the model's own residual + LayerNorm; here the adapter sits on the kernel's product, i.e. it adapts
``h`` exactly as written above, and the model's code around it (residual, LayerNorm) is unchanged.

The bias trick: the interpreter hands the branch ``y = x W`` *before* the model adds its bias
``b``. :meth:`SeqBottleneck.init` stores a frozen copy of ``b`` (the sibling leaf ``<prefix>/bias``
of the targeted ``<prefix>/kernel``; ``bias_name`` picks another name) in the adapter as ``"bias"``,
and the branch computes ``adapter(y + b)``; the model then adds ``b``, so the layer returns
``y + b + adapter(y + b) = h + adapter(h)`` exactly. When the base has no such sibling (a Dense
without bias, ``bias_name=None``) the stored bias is zero and the branch adapts ``h = x W``, which is
again exactly the layer's output. The copy is frozen: if you also train the base bias, refresh it
with :meth:`SeqBottleneck.sync_bias` (otherwise the branch sees the stale bias).

Invertible adapter (NICE coupling, ``seq_bn_inv``)
--------------------------------------------------
Pure functions :func:`nice_init`, :func:`nice_forward`, :func:`nice_inverse` on ``e [..., d]``:
``d1 = d // 2``, ``d2 = d - d1``, ``e = [e1 (d1), e2 (d2)]``::

    y1 = e1 + F(e2),   y2 = e2 + G(y1)                     (forward)
    e2 = y2 - G(y1),   e1 = y1 - F(e2)                      (inverse, exact)
    F = Linear(d2 -> d2 // rf) - ReLU - Linear(-> d1),   G = Linear(d1 -> d1 // rf) - ReLU - Linear(-> d2)

``rf = reduction_factor = 2`` (``inv_adapter_reduction_factor``), ``"bert"`` init. The Jacobian is
block triangular with identity diagonal blocks, so ``det = 1`` (the library's ``jacobian`` returns 0 =
log det). A model applies it after the embedding lookup and its inverse before a tied output head::

    e = emb[ids]                        # [B, T, d]   (emb: [vocab, d], tied)
    h = nice_forward(inv, e)            # adapted embeddings into the transformer
    h = transformer(h)                  # (with SeqBottleneck branches via lrjax.factored)
    logits = nice_inverse(inv, h) @ emb.T

so the output head sees hidden states mapped back to the original embedding space, where the tied
``emb`` lives. ``inv`` is an ordinary trainable pytree (train it next to the adapters).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lrjax import _validation as V
from lrjax import tree as tree_lib
from lrjax.reparam.base import Reparam

__all__ = ["SeqBottleneck", "bottleneck_size", "nice_init", "nice_forward", "nice_inverse"]

BERT_STD = 0.02


def bottleneck_size(n: int, reduction_factor) -> int:
    """``max(1, int(n // reduction_factor))`` (the ``adapters`` library's ``down_sample``). Raises
    ``TypeError``/``ValueError`` naming ``n`` (an int ``>= 1``) or ``reduction_factor`` (finite ``> 0``)."""
    n = V.check_int(n, "n", low=1)
    reduction_factor = V.check_float(reduction_factor, "reduction_factor", low=0.0, low_open=True)
    return max(1, int(n // reduction_factor))


@dataclasses.dataclass(frozen=True)
class SeqBottleneck(Reparam):
    """Sequential (Pfeiffer) bottleneck adapter on the output of the targeted kernels (see the
    module docstring). Target the FFN output projections, e.g. ``targets=r"fc2/kernel"``.

    Fields: ``reduction_factor`` (finite ``> 0``; bottleneck ``max(1, N // reduction_factor)``,
    default 16), ``scaling`` (finite, default 1.0), ``init_std`` (the ``"bert"`` init's ``0.02``;
    finite ``>= 0``), ``bias_name`` (the sibling leaf holding the base bias, default ``"bias"``;
    ``None``: adapt ``x W``), ``targets``, ``axes``, ``dtype``. ``rank``/``alpha`` are unused.

    Factors per leaf (matrix view ``[*batch, M, N]``, ``h = N // reduction_factor``):
    ``down [*batch, N, h]``, ``down_bias [*batch, h]``, ``up [*batch, h, N]``, ``up_bias [*batch, N]``
    (trainable) and ``bias [*batch, N]`` (frozen copy of the base bias, in the bias leaf's dtype).
    Trainable parameters per leaf: ``2 N h + h + N``.

    Raises: ``TypeError``/``ValueError`` naming ``reduction_factor``, ``scaling``, ``init_std``,
    ``bias_name``; at ``init``, ``params`` when the sibling bias has another size than ``N``.
    """

    targets: Any = "kernel"
    reduction_factor: float = 16
    scaling: float = 1.0
    init_std: float = BERT_STD
    bias_name: str | None = "bias"

    activation_space = True
    factor_keys = ("down", "down_bias", "up", "up_bias", "bias")
    frozen_keys = ("bias",)

    def __post_init__(self):
        super().__post_init__()
        V.check_float(self.reduction_factor, "reduction_factor", low=0.0, low_open=True)
        V.check_float(self.scaling, "scaling")
        V.check_float(self.init_std, "init_std", low=0.0)
        if self.bias_name is not None and (not isinstance(self.bias_name, str) or not self.bias_name):
            raise TypeError(f"bias_name must be None or the name of the bias leaf next to each kernel (e.g. "
                            f"'bias'), got {self.bias_name!r}")

    def check_leaf_rank(self, path, m, n):
        """No rank rule: the bottleneck is ``max(1, N // reduction_factor)``."""

    def init_leaf(self, key, w, path):
        *bs, m, n = w.shape
        bs = tuple(bs)
        dt = self.factor_dtype(w)
        h = bottleneck_size(n, self.reduction_factor)
        kd, ku = jax.random.split(key)
        return w, {
            "down": (self.init_std * jax.random.normal(kd, (*bs, n, h), jnp.float32)).astype(dt),
            "down_bias": jnp.zeros((*bs, h), dt),
            "up": (self.init_std * jax.random.normal(ku, (*bs, h, n), jnp.float32)).astype(dt),
            "up_bias": jnp.zeros((*bs, n), dt),
            "bias": jnp.zeros((*bs, n), w.dtype),
        }

    def _bias_path(self, path: str) -> str | None:
        if self.bias_name is None:
            return None
        head, _, _ = path.rpartition("/")
        return f"{head}/{self.bias_name}" if head else self.bias_name

    def _bias_for(self, flat, path, bshape, n, argname="params"):
        bp = self._bias_path(path)
        if bp is None or bp == path:
            return None
        if bp not in flat:
            if self.bias_name != "bias":  # an explicit name that matches nothing is a typo, not "no bias"
                raise ValueError(f"bias_name={self.bias_name!r}: no leaf {bp!r} next to the kernel {path!r}; "
                                 "pass the name of the bias leaf, or bias_name=None to adapt x W")
            return None
        b = flat[bp]
        if not jnp.issubdtype(b.dtype, jnp.floating):
            raise TypeError(f"{argname}: the bias leaf {bp!r} next to {path!r} has dtype {b.dtype}; expected floating")
        if int(np.prod(b.shape)) != int(np.prod(bshape)) * n:
            raise ValueError(f"{argname}: the bias leaf {bp!r} next to {path!r} has shape {tuple(b.shape)}, which is not "
                             f"the kernel's {bshape + (n,)} outputs; pass bias_name=None (adapt x W) or the right name")
        return b.reshape(bshape + (n,))

    def init(self, key, params, *, grads=None):
        """:meth:`Reparam.init`, then each adapter's frozen ``"bias"`` = a copy of the base bias next
        to its kernel (zeros when there is none)."""
        base, adapters = super().init(key, params, grads=grads)
        flat = tree_lib.flatten(base)
        for path, f in adapters.items():
            bshape, _, n = self.view_shape(path, flat[path].shape)
            b = self._bias_for(flat, path, bshape, n)
            if b is not None:
                adapters[path] = {**f, "bias": jnp.asarray(b)}
        return base, adapters

    def sync_bias(self, base, adapters):
        """``adapters`` with every frozen ``"bias"`` copy refreshed from ``base`` (after the base bias
        was trained or replaced)."""
        flat = self._check(base, adapters, basename="base")
        out = dict(adapters)
        for path, f in adapters.items():
            bshape, _, n = self.view_shape(path, flat[path].shape)
            b = self._bias_for(flat, path, bshape, n, "base")
            out[path] = {**f, "bias": jnp.zeros_like(f["bias"]) if b is None else b.astype(f["bias"].dtype)}
        return out

    def check_factors(self, path, f, bshape, m, n, argname, shape=None):
        h = f["down"].shape[-1] if f["down"].ndim else -1
        want_h = bottleneck_size(n, self.reduction_factor)
        want = {"down": bshape + (n, want_h), "down_bias": bshape + (want_h,), "up": bshape + (want_h, n),
                "up_bias": bshape + (n,), "bias": bshape + (n,)}
        for nm, sh in want.items():
            if tuple(f[nm].shape) != sh:
                raise ValueError(
                    f"{argname}[{path!r}][{nm!r}] has shape {tuple(f[nm].shape)}, expected {sh} for the base leaf "
                    f"{tuple(shape) if shape is not None else ''} (matrix view {bshape + (m, n)}, bottleneck "
                    f"{want_h} = max(1, {n} // reduction_factor={self.reduction_factor}); got bottleneck {h}); "
                    "adapters made for another base or config")

    def branch(self, x, y, f, path):
        """``scaling * (up(relu(down(y + b) + b_down)) + b_up)`` on the base product ``y = x W``."""
        cd = V.compute_dtype(y.dtype, *(f[k].dtype for k in self.factor_keys))
        hh = y.astype(cd) + f["bias"].astype(cd)
        a = jax.nn.relu(hh @ f["down"].astype(cd) + f["down_bias"].astype(cd))
        return self.scaling * (a @ f["up"].astype(cd) + f["up_bias"].astype(cd))


# ------------------------------------------------------------------------------ NICE coupling
def _mlp_init(key, din, dh, dout, std, dtype):
    k1, k2 = jax.random.split(key)
    return {"w1": (std * jax.random.normal(k1, (din, dh), jnp.float32)).astype(dtype), "b1": jnp.zeros((dh,), dtype),
            "w2": (std * jax.random.normal(k2, (dh, dout), jnp.float32)).astype(dtype), "b2": jnp.zeros((dout,), dtype)}


def nice_init(key, d: int, *, reduction_factor=2, init_std: float = BERT_STD, dtype=jnp.float32) -> dict:
    """Parameters of a NICE coupling on width ``d``: ``{"F": mlp, "G": mlp}``, each mlp
    ``{"w1" [din, din // rf], "b1", "w2" [din // rf, dout], "b2"}`` (F: ``d2 -> d1``, G: ``d1 -> d2``,
    ``d1 = d // 2``, ``d2 = d - d1``), weights ``N(0, init_std^2)``, biases 0 (the ``"bert"`` init).

    Raises: ``TypeError``/``ValueError`` naming ``key``, ``d`` (``>= 2``), ``reduction_factor``
    (finite ``> 0`` with ``d // 2 // reduction_factor >= 1``), ``init_std``, ``dtype``."""
    V.check_key(key, "key")
    d = V.check_int(d, "d", low=2)
    rf = V.check_float(reduction_factor, "reduction_factor", low=0.0, low_open=True)
    V.check_float(init_std, "init_std", low=0.0)
    dtype = V.check_dtype(dtype, "dtype")
    d1, d2 = d // 2, d - d // 2
    hf, hg = int(d2 // rf), int(d1 // rf)
    if min(hf, hg) < 1:
        raise ValueError(f"reduction_factor={reduction_factor} leaves no hidden units for d={d} (d // 2 // "
                         f"reduction_factor = {min(hf, hg)}); use a smaller reduction_factor")
    kf, kg = jax.random.split(key)
    return {"F": _mlp_init(kf, d2, hf, d1, init_std, dtype), "G": _mlp_init(kg, d1, hg, d2, init_std, dtype)}


def _check_nice(params, e, argname):
    if not isinstance(params, Mapping) or set(params) != {"F", "G"}:
        raise TypeError(f"params must be the dict {{'F': ..., 'G': ...}} returned by nice_init, got "
                        f"{type(params).__name__}" + (f" with keys {sorted(params)}" if isinstance(params, Mapping) else ""))
    for nm in ("F", "G"):
        sub = params[nm]
        if not isinstance(sub, Mapping) or set(sub) != {"w1", "b1", "w2", "b2"}:
            raise TypeError(f"params[{nm!r}] must be a dict with 'w1', 'b1', 'w2', 'b2' (from nice_init)")
        for k, v in sub.items():
            V.check_array(v, f"params[{nm!r}][{k!r}]", kind="floating")
    e = V.check_array(e, argname, min_ndim=1, kind="floating")
    d1, d2 = params["G"]["w1"].shape[0], params["F"]["w1"].shape[0]
    if e.shape[-1] != d1 + d2 or params["F"]["w2"].shape[-1] != d1 or params["G"]["w2"].shape[-1] != d2:
        raise ValueError(f"{argname} has width {e.shape[-1]} but params were made by nice_init for d={d1 + d2}")
    return e, d1


def _mlp(p, x, cd):
    h = jax.nn.relu(x @ p["w1"].astype(cd) + p["b1"].astype(cd))
    return h @ p["w2"].astype(cd) + p["b2"].astype(cd)


def _cd(params, e):
    return V.compute_dtype(e.dtype, *(x.dtype for x in jax.tree_util.tree_leaves(params)))


def nice_forward(params, e):
    """NICE coupling ``[e1, e2] -> [e1 + F(e2), e2 + G(y1)]`` on ``e [..., d]`` (float32 compute,
    output in ``e.dtype``). Raises ``TypeError``/``ValueError`` naming ``params`` or ``e``."""
    e, d1 = _check_nice(params, e, "e")
    cd = _cd(params, e)
    x = e.astype(cd)
    e1, e2 = x[..., :d1], x[..., d1:]
    y1 = e1 + _mlp(params["F"], e2, cd)
    y2 = e2 + _mlp(params["G"], y1, cd)
    return jnp.concatenate([y1, y2], -1).astype(e.dtype)


def nice_inverse(params, y):
    """Exact inverse of :func:`nice_forward`: ``e2 = y2 - G(y1)``, ``e1 = y1 - F(e2)`` on ``y [..., d]``
    (``nice_inverse(p, nice_forward(p, e)) == e`` to the compute dtype's rounding)."""
    y, d1 = _check_nice(params, y, "y")
    cd = _cd(params, y)
    x = y.astype(cd)
    y1, y2 = x[..., :d1], x[..., d1:]
    e2 = y2 - _mlp(params["G"], y1, cd)
    e1 = y1 - _mlp(params["F"], e2, cd)
    return jnp.concatenate([e1, e2], -1).astype(y.dtype)
