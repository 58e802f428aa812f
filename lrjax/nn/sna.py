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

**Fitting** (:func:`fit_als`, :func:`fit_adam`, :func:`fit_rank_schedule`, :func:`grow_rank`): pure
functions ``(model, params, xs, ys) -> (params, history)`` that minimise the mean squared error
``mean_{n,o} (f_o(x_n) - y_{n,o})^2``, jit-compiled (one ``lax.scan``) and usable inside an outer
``jax.jit`` (the model and counts are static). ALS (alternating least squares, the training of the
SNA world-model paper arXiv 2606.14934 per its abstract; the update below is ours) uses that
``e_k`` is affine in each coordinate's modes, ``e_k(a) = a_p e_{k-1}(a_{-p}) + e_k(a_{-p})``, so with
every other coordinate and the head fixed ``f`` is linear in ``W[:, p]`` (all levels at once)::

    f_o(x) = b_o + sum_{k,r} H[k,r,o]/C(d,k) (e_{k-1}(phi_{k,-p,r}) sum_g B_g(x_p) W[k,p,g,r] + e_k(phi_{k,-p,r}))

One sweep solves the head ``(H, b)`` (linear in ``z = [e_k(phi_k)/C(d,k)]``) and then each
``W[:, p]``, ``p = 1..d``, by least squares (``jnp.linalg.lstsq``: the minimum-norm solution, so
unobserved spline nodes and the scale gauge of CP stay finite, never NaN; ``ridge >= 0`` adds
``ridge ||W||^2``). Each step cannot increase the loss (exactly, for ``ridge = 0``), for every
``kind`` and both bases. :func:`fit_adam` is plain gradient training with optax (KHRONOS trains
with Adam). :func:`fit_rank_schedule` grows the rank stage by stage (``ranks=(1, 2, 4, ...)``):
:func:`grow_rank` appends components whose head weights are zero (the function is unchanged) and
each stage refits all components.

:class:`SNAField` uses a 3-D SNA as the encoder of a radiance field (a continuous, B-spline CP field).
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lrjax._validation import check_bool, check_choice, check_float, check_int, check_key, is_concrete
from lrjax.fields.fields import CheckedApply, Field, _array, _check_variables, _is_tracer, _pos_int

__all__ = ["SNA", "SNAField", "bspline_basis", "elementary_symmetric", "spline_coefficients", "KINDS",
           "fit_als", "fit_adam", "fit_rank_schedule", "grow_rank"]

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



# --------------------------------------------------------------------------- fitting
def _check_model(model, params, name="model"):
    if not isinstance(model, SNA):
        raise TypeError(f"{name} must be an SNA module (e.g. SNA(in_dim=3, rank=4)), got {type(model).__name__}")
    _check_variables(model, params, "params")
    return params


def _check_data(model, xs, ys):
    """``xs: [N, in_dim]`` (float in [0, 1] / int categories), ``ys: [N] (out_dim 1) or [N, out_dim]``."""
    if model.basis == "categorical":
        xs = _array(xs, "xs", ndim=2, kind="integer", finite=False)
    else:
        xs = _array(xs, "xs", ndim=2)
    if xs.shape[-1] != model.in_dim or xs.shape[0] == 0:
        raise ValueError(f"xs must have shape [N >= 1, in_dim={model.in_dim}], got {tuple(xs.shape)}")
    if is_concrete(xs):
        xn = np.asarray(xs)
        lo, hi = float(xn.min()), float(xn.max())
        if model.basis == "bspline" and not (lo >= -1e-6 and hi <= 1 + 1e-6):
            raise ValueError(f"xs: bspline inputs must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
        if model.basis == "categorical" and not (lo >= 0 and hi < model.num_basis):
            raise ValueError(f"xs: categorical inputs must lie in [0, {model.num_basis}), got range [{lo:.4g}, {hi:.4g}]")
    ys = _array(ys, "ys", min_ndim=1)
    if ys.ndim == 1 and model.out_dim == 1:
        ys = ys[:, None]
    if ys.shape != (xs.shape[0], model.out_dim):
        raise ValueError(f"ys must have shape [N={xs.shape[0]}, out_dim={model.out_dim}] (or [N] when "
                         f"out_dim=1), got {tuple(ys.shape)}")
    return xs, ys


def _basis(model, xs, dtype):
    if model.basis == "categorical":
        return jax.nn.one_hot(xs, model.num_basis, dtype=dtype)                     # [N, d, G]
    return bspline_basis(jnp.clip(xs.astype(dtype), 0.0, 1.0), model.num_basis)


def _esym0(a, kmax):
    """``[e_0, ..., e_kmax]`` over axis -2 of ``a: [..., m, R]`` (``e_0 = 1``; ``m = 0`` allowed)."""
    e = [jnp.ones_like(a[..., 0, :]) if a.shape[-2] else jnp.ones(a.shape[:-2] + a.shape[-1:], a.dtype)]
    e += [jnp.zeros_like(e[0])] * kmax
    for p in range(a.shape[-2]):
        ap = a[..., p, :]
        for k in range(min(p + 1, kmax), 0, -1):
            e[k] = e[k] + ap * e[k - 1]
    return jnp.stack(e, axis=-2)                                                        # [..., kmax+1, R]


def _sna_eval(model, w, kernel, bias, basis):
    """``f: [N, O]`` from the raw arrays (same math as ``SNA.__call__``)."""
    orders, d = model.orders, model.in_dim
    phi = jnp.einsum("npg,kpgr->nkpr", basis, w)
    z = jnp.concatenate([_esym0(phi[:, i], max(orders))[:, k] / math.comb(d, k) for i, k in enumerate(orders)],
                        axis=-1)
    out = z @ kernel
    return out + bias if bias is not None else out


def _lstsq(a, b, ridge):
    if ridge > 0:
        a = jnp.concatenate([a, jnp.sqrt(jnp.asarray(ridge, a.dtype)) * jnp.eye(a.shape[1], dtype=a.dtype)])
        b = jnp.concatenate([b, jnp.zeros((a.shape[1],) + b.shape[1:], b.dtype)])
    return jnp.linalg.lstsq(a, b)[0]


def _als_sweep(model, w, kernel, bias, basis, ys, ridge):
    orders, d, n_k, r = model.orders, model.in_dim, len(model.orders), model.rank
    kmax, n, o = max(orders), ys.shape[0], ys.shape[1]
    g = basis.shape[-1]
    comb = jnp.asarray([math.comb(d, k) for k in orders], w.dtype)
    # head: ys ~ z kernel + bias
    phi = jnp.einsum("npg,kpgr->nkpr", basis, w)
    z = jnp.concatenate([_esym0(phi[:, i], kmax)[:, k] / comb[i] for i, k in enumerate(orders)], axis=-1)
    if bias is not None:
        sol = _lstsq(jnp.concatenate([z, jnp.ones((n, 1), z.dtype)], axis=-1), ys, ridge)
        kernel, bias = sol[:-1], sol[-1]
    else:
        kernel = _lstsq(z, ys, ridge)
    h = kernel.reshape(n_k, r, o) / comb[:, None, None]                                  # [K, R, O]
    b0 = bias if bias is not None else jnp.zeros((o,), w.dtype)
    for p in range(d):
        phi = jnp.einsum("npg,kpgr->nkpr", basis, w)
        others = jnp.concatenate([phi[:, :, :p], phi[:, :, p + 1:]], axis=2)           # [N, K, d-1, R]
        e = _esym0(others, kmax)                                                         # [N, K, kmax+1, R]
        idx = jnp.arange(n_k)
        ks = jnp.asarray(orders)
        coef = e[:, idx, ks - 1]                                                         # [N, K, R] e_{k-1}
        const = e[:, idx, ks]                                                            # [N, K, R] e_k
        design = jnp.einsum("kro,nkr,ng->nokgr", h, coef, basis[:, p]).reshape(n * o, n_k * g * r)
        target = (ys - b0 - jnp.einsum("kro,nkr->no", h, const)).reshape(n * o)
        wp = _lstsq(design, target, ridge).reshape(n_k, g, r)
        w = w.at[:, p].set(wp)
    return w, kernel, bias


def _unpack(model, params, dtype):
    p = params["params"]
    w = jnp.asarray(p["modes"], dtype)
    kernel = jnp.asarray(p["head"]["kernel"], dtype)
    bias = jnp.asarray(p["head"]["bias"], dtype) if model.use_bias else None
    return w, kernel, bias


def _pack(model, params, w, kernel, bias):
    p = params["params"]
    head = {"kernel": kernel.astype(p["head"]["kernel"].dtype)}
    if model.use_bias:
        head["bias"] = bias.astype(p["head"]["bias"].dtype)
    return {**params, "params": {**p, "modes": w.astype(p["modes"].dtype), "head": head}}


def _compute_dtype(params, xs, ys):
    dts = [jnp.asarray(v).dtype for v in jax.tree.leaves(params)] + [ys.dtype]
    if jnp.issubdtype(xs.dtype, jnp.floating):
        dts.append(xs.dtype)
    return functools.reduce(jnp.promote_types, dts, jnp.dtype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("model", "iters", "ridge"))
def _fit_als(model, params, xs, ys, iters, ridge):
    dt = _compute_dtype(params, xs, ys)
    ys = ys.astype(dt)
    basis = _basis(model, xs, dt)
    w, kernel, bias = _unpack(model, params, dt)

    def mse(w, kernel, bias):
        return jnp.mean((_sna_eval(model, w, kernel, bias, basis) - ys) ** 2)

    def body(c, _):
        c = _als_sweep(model, *c, basis, ys, ridge)
        return c, mse(*c)

    l0 = mse(w, kernel, bias)
    (w, kernel, bias), losses = jax.lax.scan(body, (w, kernel, bias), None, length=iters)
    return _pack(model, params, w, kernel, bias), {"loss": jnp.concatenate([l0[None], losses])}


def fit_als(model, params, xs, ys, *, iters: int = 20, ridge: float = 0.0):
    """Fit an :class:`SNA` to samples by alternating least squares (see the module docstring).

    Args:
      model: the :class:`SNA` (any ``kind`` and ``basis``); params: its ``{'params': ...}`` (the
        starting point, e.g. ``model.init(key, x0)``; its ranks/shapes fix the fit's rank).
      xs: ``[N, in_dim]`` inputs (floats in ``[0, 1]`` for ``basis='bspline'``, integer ids for
        ``'categorical'``); ys: ``[N, out_dim]`` targets (``[N]`` when ``out_dim == 1``).
      iters: sweeps (each: the head, then every coordinate's modes); ridge: ``>= 0`` L2 weight on
        each least-squares solve (0: minimum-norm least squares).

    Returns ``(params, history)``: the fitted params (the input dtypes; computed in
    ``promote_types(params, xs, ys, float32)``; use float64 via ``jax.experimental.enable_x64`` to
    reach float64 tolerance) and ``history = {'loss': [iters + 1]}`` (MSE before and after each sweep,
    non-increasing up to rounding for ``ridge = 0``). Pure and jit-compiled; works inside ``jax.jit``
    (``model``, ``iters``, ``ridge`` static). The rank is the model's ``rank``, a Python int (static:
    it fixes shapes, it cannot be traced).

    Raises:
      TypeError: ``model`` not an :class:`SNA`; ``params`` not its ``{'params': ...}``; ``xs`` not a
        floating (bspline) / integer (categorical) array; non-int ``iters``, non-float ``ridge``.
      ValueError: ``params`` of another configuration (e.g. another rank); ``xs`` not
        ``[N >= 1, in_dim]``; ``ys`` not ``[N, out_dim]``; ``iters < 1``; ``ridge < 0``; and, **only
        for concrete (non-traced) inputs**, NaN/Inf in ``xs``/``ys`` or ``xs`` outside ``[0, 1]``
        (bspline) / ``[0, num_basis)`` (categorical). Under ``jax.jit`` these value checks are
        skipped: NaN propagates, out-of-range bspline inputs are clipped to ``[0, 1]`` and out-of-range
        category ids get an all-zero one-hot.
    """
    _check_model(model, params)
    xs, ys = _check_data(model, xs, ys)
    iters = _pos_int(iters, "iters")
    ridge = check_float(ridge, "ridge", low=0.0)
    return _fit_als(model, params, xs, ys, iters, ridge)


def fit_adam(model, params, xs, ys, *, steps: int = 1000, learning_rate: float = 1e-2, optimizer=None,
             batch_size: int | None = None, key=None):
    """Fit an :class:`SNA` to samples by gradient descent on the MSE (default ``optax.adam``).

    ``optimizer``: any optax ``GradientTransformation`` (overrides ``learning_rate``; e.g. a
    warmup-cosine Adam as KHRONOS trains); ``batch_size``: minibatch size (None: full batch; then
    ``key`` is required to sample batches with replacement). Returns ``(params, history)`` with
    ``history = {'loss': [steps]}`` (the minibatch MSE before each update) and ``'final'`` (full-data
    MSE of the returned params). One ``lax.scan``, jit-compiled; inputs as :func:`fit_als`.
    Minibatches draw ``batch_size`` indices uniformly *with replacement* each step, so a
    ``batch_size`` larger than ``N`` is allowed (it repeats samples). The data checks on values (NaN,
    range) run only on concrete inputs, as in :func:`fit_als` (skipped under ``jax.jit``).

    Raises:
      TypeError: as :func:`fit_als`; ``optimizer`` not an optax ``GradientTransformation``; a
        non-int ``steps`` / ``batch_size``; ``key`` not a PRNG key when ``batch_size`` is given.
      ValueError: as :func:`fit_als` (params, shapes, concrete values); ``steps < 1``;
        ``learning_rate <= 0`` (when ``optimizer`` is None); ``batch_size < 1``.
    """
    _check_model(model, params)
    xs, ys = _check_data(model, xs, ys)
    steps = _pos_int(steps, "steps")
    if optimizer is None:
        learning_rate = check_float(learning_rate, "learning_rate", low=0.0, low_open=True)
        optimizer = optax.adam(learning_rate)
    elif not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"optimizer must be an optax GradientTransformation (e.g. optax.adam(1e-2)), "
                        f"got {type(optimizer).__name__}")
    if batch_size is not None:
        batch_size = _pos_int(batch_size, "batch_size")
        key = check_key(key, "key")
    return _fit_adam(model, params, xs, ys, steps, optimizer, batch_size, key)


@functools.partial(jax.jit, static_argnames=("model", "steps", "optimizer", "batch_size"))
def _fit_adam(model, params, xs, ys, steps, optimizer, batch_size, key):
    dt = _compute_dtype(params, xs, ys)
    ys = ys.astype(dt)
    basis = _basis(model, xs, dt)
    cast = jax.tree.map(lambda a: a.astype(dt), params)

    def loss(q, bas, y):
        w, kernel, bias = _unpack(model, q, dt)
        return jnp.mean((_sna_eval(model, w, kernel, bias, bas) - y) ** 2)

    def body(c, k):
        q, st = c
        if batch_size is None:
            bas, y = basis, ys
        else:
            i = jax.random.randint(k, (batch_size,), 0, ys.shape[0])
            bas, y = basis[i], ys[i]
        val, g = jax.value_and_grad(loss)(q, bas, y)
        upd, st = optimizer.update(g, st, q)
        return (optax.apply_updates(q, upd), st), val

    keys = jax.random.split(key, steps) if batch_size is not None else None
    (q, _), losses = jax.lax.scan(body, (cast, optimizer.init(cast)), keys, length=steps)
    out = jax.tree.map(lambda a, ref: a.astype(ref.dtype), q, params)
    return out, {"loss": losses, "final": loss(q, basis, ys)}


def grow_rank(model, params, new_rank: int, *, key):
    """Append ``new_rank - model.rank`` components to an :class:`SNA`: returns ``(new_model, new_params)``.

    New mode weights are drawn like ``SNA.init`` (``mode_mean + init_scale N(0, 1)``) and their head
    weights are zero, so the new model computes exactly the same function; training then uses them.
    ``new_rank`` must be ``>= model.rank`` (a Python int: it fixes shapes).

    Raises:
      TypeError: ``model`` not an :class:`SNA`; ``params`` not its ``{'params': ...}``; ``new_rank``
        not an int; ``key`` not a PRNG key.
      ValueError: ``params`` of another configuration; ``new_rank < model.rank`` or ``< 1``.
    """
    _check_model(model, params)
    new_rank = _pos_int(new_rank, "new_rank")
    if new_rank < model.rank:
        raise ValueError(f"new_rank={new_rank} must be >= the model's rank {model.rank} (grow_rank only adds "
                         f"components)")
    key = check_key(key, "key")
    p = params["params"]
    w = jnp.asarray(p["modes"])
    extra = new_rank - model.rank
    n_k = len(model.orders)
    neww = (model.mode_mean + model.init_scale * jax.random.normal(key, w.shape[:-1] + (extra,))).astype(w.dtype)
    kern = jnp.asarray(p["head"]["kernel"])
    kern = kern.reshape(n_k, model.rank, model.out_dim)
    kern = jnp.concatenate([kern, jnp.zeros((n_k, extra, model.out_dim), kern.dtype)], axis=1)
    head = {**p["head"], "kernel": kern.reshape(n_k * new_rank, model.out_dim)}
    new_model = model.clone(rank=new_rank)
    return new_model, {**params, "params": {**p, "modes": jnp.concatenate([w, neww], axis=-1), "head": head}}


def fit_rank_schedule(model, xs, ys, *, ranks, key, method: str = "als", iters: int = 20,
                      steps: int = 1000, learning_rate: float = 1e-2, tol: float = 0.0, ridge: float = 0.0):
    """Fit an :class:`SNA` with a growing rank: stage ``s`` fits rank ``ranks[s]`` (by ALS or Adam),
    starting from the previous stage's fit plus new components (:func:`grow_rank`).

    ``model``: the SNA configuration (its ``rank`` is replaced by ``ranks[0]``); ``ranks``: a
    non-empty non-decreasing sequence of ints ``>= 1``; ``key``: PRNG key (init and new components);
    ``method``: 'als' (``iters`` sweeps per stage, ``ridge``) or 'adam' (``steps``, ``learning_rate``);
    ``tol >= 0``: stop after the first stage whose final MSE is ``<= tol``.
    Returns ``(model, params, history)`` with the final model, its params and ``history =
    {'ranks': [...], 'loss': [final MSE per stage], 'curves': [per-stage loss arrays]}``.
    The ranks are Python ints (each stage compiles its own program); the data's value checks run
    on concrete inputs only (:func:`fit_als`).

    Raises:
      TypeError: ``model`` not an :class:`SNA`; ``ranks`` not a tuple/list of ints; ``key`` not a
        PRNG key; non-numeric ``tol`` / ``iters`` / ``steps`` / ``learning_rate`` / ``ridge``; bad
        ``xs`` / ``ys`` kinds (:func:`fit_als`).
      ValueError: empty or decreasing ``ranks`` or a rank ``< 1``; ``method`` not 'als'/'adam';
        ``tol < 0``; ``iters < 0``; ``steps < 1``; ``learning_rate <= 0``; ``ridge < 0``; bad data
        shapes or (concrete) values.
    """
    if not isinstance(model, SNA):
        raise TypeError(f"model must be an SNA module (e.g. SNA(in_dim=3, rank=4)), got {type(model).__name__}")
    if isinstance(ranks, (str, bytes)) or not isinstance(ranks, (tuple, list)):
        raise TypeError(f"ranks must be a non-empty tuple of ints, e.g. (1, 2, 4), got {ranks!r:.60}")
    if not ranks:
        raise ValueError("ranks must be a non-empty tuple of ints, e.g. (1, 2, 4), got ()")
    ranks = [check_int(r, f"ranks[{i}]", low=1) for i, r in enumerate(ranks)]
    if any(b < a for a, b in zip(ranks, ranks[1:])):
        raise ValueError(f"ranks must be non-decreasing (the rank only grows), got {ranks}")
    key = check_key(key, "key")
    check_choice(method, "method", ("als", "adam"))
    tol = check_float(tol, "tol", low=0.0)
    check_int(iters, "iters", low=0)
    check_int(steps, "steps", low=1)
    check_float(learning_rate, "learning_rate", low=0.0, low_open=True)
    check_float(ridge, "ridge", low=0.0)
    xs, ys = _check_data(model, xs, ys)
    model = model.clone(rank=ranks[0])
    x0 = xs[0]
    params = model.init(jax.random.fold_in(key, 0), x0)
    hist = {"ranks": [], "loss": [], "curves": []}
    for s, r in enumerate(ranks):
        if s:
            model, params = grow_rank(model, params, r, key=jax.random.fold_in(key, s))
        if method == "als":
            params, h = fit_als(model, params, xs, ys, iters=iters, ridge=ridge)
            final = h["loss"][-1]
        else:
            params, h = fit_adam(model, params, xs, ys, steps=steps, learning_rate=learning_rate)
            final = h["final"]
        hist["ranks"].append(r)
        hist["loss"].append(float(final))
        hist["curves"].append(h["loss"])
        if hist["loss"][-1] <= tol:
            break
    return model, params, hist
