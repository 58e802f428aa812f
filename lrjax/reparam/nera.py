"""NeRA: a KAN-style spline branch ``y = W x + alpha R phi(x)`` (not mergeable).

"NeRA: Nonlinear low-rank Expressive Representation Adapter" (WACV 2026, with the FLORA dataset);
official code ``CandleLabAI/WACV2026-FLORA-Dataset-NeRA-Adapter`` @591b27ed9a3c: ``kan.py``
(``NERAKANFeatureMap``, ``NERAKANAdapter``, ``NERAKANConfig``), ``train_nera_flux.py``,
``training/flux_nera_config.yaml``.

Math, for one token ``x in R^M`` (``M`` inputs, ``N`` outputs, ``K`` knots, ``r`` features)::

    phi(x)_j = sum_{d=1..M} sum_{k=1..K} h(s_d x_d - t_{d,k}) C[d, k, j]      j = 1..r
    h(u)     = max(0, 1 - |u|)                                               (linear hat)
    y        = W x + b + alpha * R phi(x)

Factors per leaf (matrix view ``[*batch, M, N]``; every one trainable -- the official
``enable_training()``, which ``train_nera_flux.py`` calls, unfreezes the knots, scales, ``C``,
the readout ``R`` and ``alpha``):

* ``t [*batch, M, K]``: knots, init ``linspace(-knot_range, knot_range, K)`` per input
  (official ``linspace(-3, 3, num_knots)``);
* ``s [*batch, M]``: input scales, init 1;
* ``C [*batch, M, K, r]``: coefficients, init ``N(0, 1e-3^2)``;
* ``R [*batch, r, N]``: the readout (torch ``nn.Linear(r, N, bias=False)`` default init,
  kaiming-uniform ``U(-1/sqrt(r), 1/sqrt(r))``, **not zero**: the branch starts small because ``C``
  is ``~1e-3`` and ``alpha`` is small, not exactly zero);
* ``alpha [*batch]``: the scalar gain, init ``alpha`` of the config (``None`` -> ``1e-3``, the
  default of ``NERAKANConfig``; the paper's FLUX run sets ``alpha=64`` with ``r=64``).

Defaults: ``rank=16``, ``num_knots=8`` (``NERAKANConfig``), ``knot_range=3``. The branch reads the
layer input ``x`` only (``W x`` and the bias are the model's); it is input-dependent and
nonlinear, so ``merge``/``materialize``/``delta`` raise :class:`lrjax.interpreter.NotMergeable`:
run the model with ``lrjax.factored(fn, rp)(base, adapters, x)``.

Trainable parameters per leaf: ``M K r + M K + M + r N + 1`` (about ``K`` times LoRA's ``A``).

Memory: the basis ``h(s x - t)`` is formed as ``[tokens, M, K]`` (``K`` times the layer input)
and contracted with ``C`` reshaped to ``[M K, r]`` as one matrix product, so the
``[tokens, M, K, r]`` product is never formed (neither in the forward nor in autodiff's
backward, which gets ``dC = basis^T (dphi)`` as the transposed product). No chunking over tokens.
Compute is in ``promote_types(x, factors, float32)``; the interpreter rounds ``W x + branch`` once
to the product's dtype.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lrjax import _validation as V
from lrjax.reparam.base import Reparam

__all__ = ["NeRA", "hat_basis", "nera_features"]

DEFAULT_ALPHA = 1e-3
COEFF_STD = 1e-3


def hat_basis(x, s, t):
    """``h(s_d x_d - t_{d,k}) = max(0, 1 - |s_d x_d - t_{d,k}|)``: ``x [..., M]``, ``s [M]``,
    ``t [M, K]`` -> ``[..., M, K]`` in the dtype of the inputs' promotion."""
    u = (x * s)[..., None] - t
    return jax.nn.relu(1.0 - jnp.abs(u))


def nera_features(x, s, t, c):
    """``phi(x) [..., r]`` from ``x [..., M]``, ``s [M]``, ``t [M, K]``, ``C [M, K, r]``: the basis
    ``[..., M, K]`` flattened to ``[..., M K]`` times ``C`` as ``[M K, r]`` (one matrix product;
    ``[..., M, K, r]`` is never formed). Raises ``TypeError``/``ValueError`` naming ``x``, ``s``, ``t``
    or ``c`` for non-floating arrays or disagreeing shapes."""
    x = V.check_array(x, "x", min_ndim=1, kind="floating")
    c = V.check_array(c, "c", ndim=3, kind="floating")
    m, k, r = c.shape
    s = V.check_array(s, "s", ndim=1, kind="floating")
    t = V.check_array(t, "t", ndim=2, kind="floating")
    if x.shape[-1] != m or s.shape != (m,) or t.shape != (m, k):
        raise ValueError(f"nera_features: x [..., M], s [M], t [M, K] and c [M, K, r] disagree: x{tuple(x.shape)}, "
                         f"s{tuple(s.shape)}, t{tuple(t.shape)}, c{tuple(c.shape)}")
    h = hat_basis(x, s, t)
    return h.reshape(h.shape[:-2] + (m * k,)) @ c.reshape(m * k, r)


@dataclasses.dataclass(frozen=True)
class NeRA(Reparam):
    """NeRA (see the module docstring for the math, the factors, the defaults and the code followed).

    Fields: ``rank`` (``r``, features of ``phi``; lrjax's rule ``1 <= r <= min(M, N)``),
    ``alpha`` (the initial value of the trainable gain ``alpha``; ``None`` -> ``1e-3``; it is not
    divided by ``r``), ``num_knots`` (``K >= 2``), ``knot_range`` (knots start at
    ``linspace(-knot_range, knot_range, K)``, finite ``> 0``), ``targets``, ``axes``, ``dtype``.

    Raises: ``TypeError``/``ValueError`` naming ``num_knots`` or ``knot_range`` (and the base
    fields); ``adapters`` whose factors do not fit (``C``'s rank or knots not the config's).
    """

    rank: int = 16
    alpha: float | None = None
    targets: Any = "kernel"
    axes: Any = None
    dtype: Any = None
    num_knots: int = 8
    knot_range: float = 3.0

    activation_space = True
    factor_keys = ("t", "s", "C", "R", "alpha")

    def __post_init__(self):
        super().__post_init__()
        V.check_int(self.num_knots, "num_knots", low=2)
        V.check_float(self.knot_range, "knot_range", low=0.0, low_open=True)

    @property
    def alpha0(self) -> float:
        """The initial gain ``alpha`` (``1e-3`` when the config's ``alpha`` is ``None``)."""
        return DEFAULT_ALPHA if self.alpha is None else float(self.alpha)

    def init_leaf(self, key, w, path):
        *bs, m, n = w.shape
        bs = tuple(bs)
        dt = self.factor_dtype(w)
        kc, kr = jax.random.split(key)
        knots = jnp.linspace(-self.knot_range, self.knot_range, self.num_knots, dtype=jnp.float32)
        bound = 1.0 / np.sqrt(self.rank)
        return w, {
            "t": jnp.broadcast_to(knots, (*bs, m, self.num_knots)).astype(dt),
            "s": jnp.ones((*bs, m), dt),
            "C": (COEFF_STD * jax.random.normal(kc, (*bs, m, self.num_knots, self.rank), jnp.float32)).astype(dt),
            "R": jax.random.uniform(kr, (*bs, self.rank, n), jnp.float32, -bound, bound).astype(dt),
            "alpha": jnp.full(bs, self.alpha0, dt),
        }

    def check_factors(self, path, f, bshape, m, n, argname, shape=None):
        k, r = self.num_knots, self.rank
        want = {"t": bshape + (m, k), "s": bshape + (m,), "C": bshape + (m, k, r), "R": bshape + (r, n),
                "alpha": bshape}
        for nm, sh in want.items():
            if tuple(f[nm].shape) != sh:
                raise ValueError(
                    f"{argname}[{path!r}][{nm!r}] has shape {tuple(f[nm].shape)}, expected {sh} for the base leaf "
                    f"{tuple(shape) if shape is not None else ''} (matrix view {bshape + (m, n)}) with rank={r}, "
                    f"num_knots={k}; adapters made for another base or config")

    def branch(self, x, y, f, path):
        """``alpha R phi(x)`` in ``promote_types(x, factors, float32)``."""
        cd = V.compute_dtype(x.dtype, *(f[k].dtype for k in self.factor_keys))
        phi = nera_features(x.astype(cd), f["s"].astype(cd), f["t"].astype(cd), f["C"].astype(cd))
        return f["alpha"].astype(cd) * (phi @ f["R"].astype(cd))
