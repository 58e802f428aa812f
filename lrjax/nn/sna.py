"""Separable neural architectures (SNA): additive, quadratic and CP / tensor rank-R maps with a
bounded interaction order (Batley et al., *Separable Neural Architectures*, arXiv 2603.12244; the
exact layer follows the KHRONOS layer of the same authors, arXiv 2505.13315).

Every input coordinate ``x_p`` (``p = 1..d``) is embedded separately by ``R`` univariate "mode"
functions per interaction level, ``phi_{k,p,r}(x_p) = sum_g B_g(x_p) W[k, p, g, r]``, with ``B_g``
either quadratic B-splines on ``G`` uniform nodes of ``[0, 1]`` (continuous inputs; KHRONOS'
basis) or one-hot indicators (categorical inputs: then ``phi`` is an embedding table). Modes are
combined by the elementary symmetric polynomial of order ``k``, which sums the products over all
``k``-subsets of coordinates::

    e_k(a_1, ..., a_d) = sum_{p_1 < ... < p_k} a_{p_1} ... a_{p_k}
    f(x) = b + sum_{k in orders} sum_{r < R} A[k, r] e_k(phi_{k,1,r}(x_1), ..., phi_{k,d,r}(x_d)) / C(d, k)

so ``orders`` bounds the *interaction order* and ``rank`` the *tensor rank* of every order-k
interaction:

* ``kind='additive'`` -- orders ``(1,)``: ``f = sum_p g_p(x_p)`` (a generalised additive model);
* ``kind='quadratic'`` -- orders ``(1, 2)``: additive plus rank-R pairwise interactions;
* ``kind='cp'`` -- orders ``(d,)``: ``f = sum_r A_r prod_p phi_{p,r}(x_p)``, the rank-R CP map of
  KHRONOS / TensoRF-CP;
* ``kind='bounded'`` with ``order=K`` -- orders ``(1, ..., K)``.

``e_k`` for all ``k <= K`` costs ``O(d K R)`` per point (the recursion ``E_k <- E_k + a_p E_{k-1}``).
The division by ``C(d, k)`` (a constant) keeps outputs O(1) at initialisation; mode weights start at
``N(1, 0.1^2)`` as in KHRONOS so that products start near 1. Points are vmapped: the module maps a
single ``x: [d]`` and any leading axes are handled by broadcasting (equivalently ``jax.vmap``).

Quadratic B-splines reproduce polynomials of degree <= 2 on ``[h/2, 1 - h/2]`` (``h = 1/(G-1)``):
``sum_g B_g = 1``, ``sum_g c_g B_g = x``, ``sum_g (c_g^2 - h^2/4) B_g = x^2`` (:func:`spline_coefficients`),
so a target ``sum_r prod_p q_{p,r}(x_p)`` with quadratic ``q`` is represented *exactly* by a rank-R
``'cp'`` SNA (tested).

:class:`SNAField` uses a 3-D SNA as the encoder of a radiance field (a continuous, B-spline CP field).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lrjax._validation import check_bool, check_choice, check_float, check_int
from lrjax.fields.fields import CheckedApply, Field, _array, _is_tracer, _pos_int

__all__ = ["SNA", "SNAField", "bspline_basis", "elementary_symmetric", "spline_coefficients", "KINDS"]

KINDS = ("additive", "quadratic", "cp", "bounded")


def bspline_basis(x, num_basis: int):
    """Quadratic B-splines on ``num_basis`` uniform nodes of ``[0, 1]``: ``[..., num_basis]``.

    ``B_g(x) = B((x - c_g)(G - 1))`` with the cardinal quadratic B-spline ``B(t) = 3/4 - t^2``
    (``|t| < 1/2``), ``(3/2 - |t|)^2 / 2`` (``1/2 <= |t| < 3/2``), else 0 (as in KHRONOS).

    ``x``: floating array (finite when concrete; values outside ``[0, 1]`` fall off the nodes and
    give a partial or zero basis); ``num_basis >= 2``."""
    x = _array(x, "x")
    num_basis = _pos_int(num_basis, "num_basis", 2)
    nodes = jnp.linspace(0.0, 1.0, num_basis)
    t = jnp.abs(x[..., None] - nodes) * (num_basis - 1)
    return jnp.where(t < 0.5, 0.75 - t ** 2, jnp.where(t < 1.5, 0.5 * (1.5 - t) ** 2, 0.0))


def spline_coefficients(poly, num_basis: int):
    """Coefficients ``w[g]`` with ``sum_g w_g B_g(x) = a + b x + c x^2`` on ``[h/2, 1 - h/2]``.

    ``poly = (a, b, c)`` (each possibly an array; the output gains a trailing ``num_basis`` axis)."""
    if isinstance(poly, (str, bytes)) or not isinstance(poly, (tuple, list)) or len(poly) != 3:
        raise TypeError(f"poly must be a triple (a, b, c) of numbers or arrays, got {poly!r}")
    num_basis = _pos_int(num_basis, "num_basis", 2)
    poly = tuple(_array(v, f"poly[{i}]", convert=True, kind="numeric") for i, v in enumerate(poly))
    a, b, c = (jnp.asarray(v, jnp.float32)[..., None] for v in poly)
    nodes = jnp.linspace(0.0, 1.0, num_basis)
    h = 1.0 / (num_basis - 1)
    return a + b * nodes + c * (nodes ** 2 - h ** 2 / 4)


def elementary_symmetric(a, max_order: int):
    """``[e_1, ..., e_K](a)`` over axis -2 of ``a: [..., d, R]`` -> ``[..., K, R]`` (``K >= 1``)."""
    a = _array(a, "a", min_ndim=2, kind="numeric")
    max_order = _pos_int(max_order, "max_order")
    d = a.shape[-2]
    e = [jnp.ones_like(a[..., 0, :])] + [jnp.zeros_like(a[..., 0, :])] * max_order
    for p in range(d):
        ap = a[..., p, :]
        for k in range(min(p + 1, max_order), 0, -1):
            e[k] = e[k] + ap * e[k - 1]
    return jnp.stack(e[1:], axis=-2)


class SNA(CheckedApply, nn.Module):
    """Separable map ``[..., in_dim] -> [..., out_dim]`` (see module docstring).

    in_dim: number of coordinates ``d``; out_dim: outputs; rank: ``R`` modes per order;
    kind: 'additive' | 'quadratic' | 'cp' | 'bounded' (with ``order``);
    basis: 'bspline' (inputs in ``[0, 1]``) or 'categorical' (integer inputs in ``[0, num_basis)``);
    num_basis: spline nodes ``G`` or number of categories; init_scale: std of the mode weights
    around 1 (``mode_mean``); use_bias: learnable output offset.
    """

    in_dim: int
    out_dim: int = 1
    rank: int = 8
    kind: str = "cp"
    order: int | None = None
    basis: str = "bspline"
    num_basis: int = 16
    init_scale: float = 0.1
    mode_mean: float = 1.0
    use_bias: bool = True

    def __post_init__(self):
        _pos_int(self.in_dim, "in_dim")
        _pos_int(self.out_dim, "out_dim")
        _pos_int(self.rank, "rank")
        _pos_int(self.num_basis, "num_basis", 2)
        check_choice(self.kind, "kind", KINDS)
        check_int(self.order, "order", allow_none=True)
        check_float(self.init_scale, "init_scale", low=0.0)
        check_float(self.mode_mean, "mode_mean")
        check_bool(self.use_bias, "use_bias")
        if self.kind == "bounded":
            _pos_int(self.order, "order")
            if self.order > self.in_dim:
                raise ValueError(f"order={self.order} must be <= in_dim={self.in_dim}")
        elif self.order is not None:
            raise ValueError(f"order is only used with kind='bounded' (kind={self.kind!r})")
        if self.kind == "quadratic" and self.in_dim < 2:
            raise ValueError("kind='quadratic' needs in_dim >= 2")
        check_choice(self.basis, "basis", ("bspline", "categorical"))
        super().__post_init__()

    def _example_inputs(self):
        dt = jnp.int32 if self.basis == "categorical" else jnp.float32
        return (jnp.zeros((self.in_dim,), dt),)

    @property
    def orders(self) -> tuple:
        return {"additive": (1,), "quadratic": (1, 2), "cp": (self.in_dim,)}.get(
            self.kind, tuple(range(1, (self.order or 1) + 1)))

    def modes(self, x):
        """``phi[..., k, p, r]`` for every level ``k`` of :attr:`orders`."""
        n_k = len(self.orders)
        w = self.param("modes", lambda key, s: self.mode_mean + self.init_scale * jax.random.normal(key, s),
                       (n_k, self.in_dim, self.num_basis, self.rank))
        if self.basis == "categorical":
            idx = jnp.asarray(x).astype(jnp.int32)                                     # [..., d]
            return jnp.stack([w[k][jnp.arange(self.in_dim), idx] for k in range(n_k)], axis=-3)
        b = bspline_basis(x, self.num_basis)                                          # [..., d, G]
        return jnp.einsum("...pg,kpgr->...kpr", b, w)

    @nn.compact
    def __call__(self, x):
        if not isinstance(x, (jax.Array, np.ndarray, jax.core.Tracer)):
            raise TypeError(f"x must be an array [..., in_dim={self.in_dim}], got {type(x).__name__}; "
                            f"wrap it with jnp.asarray(...)")
        x = jnp.asarray(x)
        if x.ndim < 1 or x.shape[-1] != self.in_dim:
            raise ValueError(f"x must have shape [..., in_dim={self.in_dim}], got {x.shape}")
        if self.basis == "categorical" and not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(f"x must be an integer array of category ids for basis='categorical', got {x.dtype}")
        if self.basis == "bspline" and not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"x must be a floating-point array for basis='bspline', got {x.dtype}")
        if not _is_tracer(x) and x.size:
            xn = np.asarray(x)
            if not np.all(np.isfinite(xn)):
                raise ValueError("x contains NaN or Inf; SNA inputs must be finite")
            lo, hi = float(xn.min()), float(xn.max())
            if self.basis == "bspline" and not (lo >= -1e-6 and hi <= 1 + 1e-6):
                raise ValueError(f"x: bspline inputs must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
            if self.basis == "categorical" and not (lo >= 0 and hi < self.num_basis):
                raise ValueError(f"x: categorical inputs must lie in [0, {self.num_basis}), "
                                 f"got range [{lo:.4g}, {hi:.4g}]")
        if self.basis == "bspline":
            x = jnp.clip(x, 0.0, 1.0)
        phi = self.modes(x)                                                           # [..., K, d, R]
        kmax = max(self.orders)
        terms = []
        for i, k in enumerate(self.orders):
            e = elementary_symmetric(phi[..., i, :, :], kmax)[..., k - 1, :]          # [..., R]
            terms.append(e / math.comb(self.in_dim, k))
        z = jnp.concatenate(terms, axis=-1)                                           # [..., K R]
        return nn.Dense(self.out_dim, use_bias=self.use_bias, name="head")(z)


class SNAField(Field):
    """Radiance field whose encoder is a 3-D SNA (default: bounded order 3 = all interactions, a
    continuous B-spline CP field). ``F(u) = SNA((u + 1) / 2)``."""

    rank: int = 32
    num_basis: int = 32
    kind: str = "bounded"
    order: int | None = 3

    def validate(self):
        _pos_int(self.rank, "rank")
        _pos_int(self.num_basis, "num_basis", 2)
        check_choice(self.kind, "kind", KINDS)
        if self.kind == "bounded":
            check_int(self.order, "order", low=1, high=3)

    def encode(self, u):
        sna = SNA(in_dim=3, out_dim=self.feature_dim, rank=self.rank, kind=self.kind,
                  order=self.order if self.kind == "bounded" else None, num_basis=self.num_basis,
                  name="sna")
        return sna((u + 1.0) * 0.5)

