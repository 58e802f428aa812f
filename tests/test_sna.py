"""SNA: elementary symmetric terms, bounded interaction order, exact rank-R representation, fitting."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lrjax import fields as L
from lrjax.nn.sna import SNA, SNAField, bspline_basis, elementary_symmetric, spline_coefficients


def _randn(seed, shape, dtype=jnp.float32):
    """Standard normal test data drawn by NumPy (eager jax.random compiles one program per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), dtype)


def test_elementary_symmetric_bruteforce():
    a = np.asarray(_randn(0, (3, 5, 2)))
    e = np.asarray(elementary_symmetric(jnp.asarray(a), 5))
    for k in range(1, 6):
        ref = sum(np.prod(a[:, list(c), :], axis=1) for c in itertools.combinations(range(5), k))
        np.testing.assert_allclose(e[:, k - 1], ref, rtol=1e-5, atol=1e-5)


def test_bspline_partition_of_unity_and_quadratic_reproduction():
    g = 9
    h = 1 / (g - 1)
    x = jnp.linspace(h / 2, 1 - h / 2, 41)
    b = bspline_basis(x, g)
    np.testing.assert_allclose(b.sum(-1), 1.0, atol=1e-6)
    c = spline_coefficients((0.3, -1.2, 2.0), g)
    np.testing.assert_allclose(b @ c, 0.3 - 1.2 * x + 2 * x ** 2, atol=1e-5)


def _mixed_difference(fn, x, h, axes):
    """Finite mixed difference of ``fn`` along ``axes`` (zero iff no interaction among them)."""
    tot = 0.0
    for signs in itertools.product((0, 1), repeat=len(axes)):
        y = x
        for ax, s in zip(axes, signs):
            y = y.at[..., ax].add(s * h)
        tot = tot + (-1) ** (len(axes) - sum(signs)) * fn(y)
    return tot


@pytest.mark.parametrize("kind,order,vanishing", [("additive", None, 2), ("quadratic", None, 3),
                                                  ("bounded", 2, 3), ("cp", None, None)])
def test_interaction_order_is_bounded(kind, order, vanishing):
    m = SNA(in_dim=4, out_dim=1, rank=3, kind=kind, order=order, num_basis=6, init_scale=0.5)
    p = m.init(jax.random.key(1), jnp.zeros((4,)))
    fn = jax.jit(lambda x: m.apply(p, x)[..., 0])
    x = jax.random.uniform(jax.random.key(2), (16, 4), minval=0.1, maxval=0.7)
    if vanishing is None:                      # full CP: the order-4 interaction is present
        assert float(jnp.max(jnp.abs(_mixed_difference(fn, x, 0.2, (0, 1, 2, 3))))) > 1e-5
        return
    for axes in itertools.combinations(range(4), vanishing):
        np.testing.assert_allclose(_mixed_difference(fn, x, 0.2, axes), 0.0, atol=2e-5)
    lower = _mixed_difference(fn, x, 0.2, tuple(range(vanishing - 1)))
    assert float(jnp.max(jnp.abs(lower))) > 1e-4          # order vanishing-1 interactions exist


def test_rank_r_sna_represents_rank_r_separable_target_exactly():
    d, r, g = 3, 3, 8
    coef = _randn(3, (3, d, r))               # quadratic factors
    amp = _randn(4, (r,))

    def target(x):                                                        # sum_r a_r prod_p q_{p,r}(x_p)
        q = coef[0] + coef[1] * x[..., :, None] + coef[2] * x[..., :, None] ** 2     # [..., d, r]
        return jnp.sum(amp * jnp.prod(q, axis=-2), axis=-1)

    m = SNA(in_dim=d, out_dim=1, rank=r, kind="cp", num_basis=g, use_bias=False)
    w = spline_coefficients((coef[0], coef[1], coef[2]), g)               # [d, r, G]
    params = {"params": {"modes": jnp.transpose(w, (0, 2, 1))[None],     # [1, d, G, r]
                         "head": {"kernel": amp[:, None]}}}              # e_d / C(d, d) = product
    h = 1 / (g - 1)
    x = jax.random.uniform(jax.random.key(5), (256, d), minval=h / 2, maxval=1 - h / 2)
    y, ref = m.apply(params, x)[:, 0], target(x)
    np.testing.assert_allclose(y, ref, atol=2e-5 * float(jnp.max(jnp.abs(ref))))
    # vmapped over coordinates == batched
    np.testing.assert_allclose(jax.vmap(lambda xi: m.apply(params, xi))(x)[:, 0], y, atol=1e-6)


def test_fit_rank_r_target_and_rank_deficit_bound():
    """Adam fits a rank-2 separable target with a rank-2 SNA; rank 1 stays above Eckart-Young."""
    g, n = 8, 24
    t = jnp.linspace(0.0, 1.0, n)
    f1 = jnp.stack([jnp.sin(3 * t), 0.5 + t ** 2])                    # 2 factors per coordinate
    f2 = jnp.stack([jnp.cos(2 * t), t - 0.3])
    target = f1.T @ f2                                                   # [n, n], rank 2
    xs = jnp.stack(jnp.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    s = np.linalg.svd(np.asarray(target), compute_uv=False)
    best_rank1 = float(np.sum(s[1:] ** 2) / target.size)                  # min MSE of any rank-1 map

    def fit(rank):
        m = SNA(in_dim=2, out_dim=1, rank=rank, kind="cp", num_basis=g, use_bias=False)  # bias adds rank
        p = m.init(jax.random.key(6), jnp.zeros((2,)))
        opt = optax.adam(optax.cosine_decay_schedule(3e-2, 1500, 0.01))

        def loss(q):
            return jnp.mean((m.apply(q, xs)[:, 0] - target.reshape(-1)) ** 2)

        def body(c, _):
            q, s_ = c
            l, gr = jax.value_and_grad(loss)(q)
            u, s_ = opt.update(gr, s_, q)
            return (optax.apply_updates(q, u), s_), l

        (p, _), _ = jax.lax.scan(body, (p, opt.init(p)), None, length=1500)
        return float(loss(p))

    fit2, fit1 = fit(2), fit(1)
    assert fit1 >= best_rank1 * (1 - 1e-3)
    assert fit2 < 0.02 * best_rank1          # rank 2 gets far below what any rank-1 map can reach


def test_categorical_and_field():
    m = SNA(in_dim=3, out_dim=10, rank=4, kind="quadratic", basis="categorical", num_basis=10)
    p = m.init(jax.random.key(0), jnp.zeros((3,), jnp.int32))
    ids = jnp.array([[1, 2, 3], [9, 0, 4]])
    assert m.apply(p, ids).shape == (2, 10)
    # additive + pairwise: changing one token changes logits only through its own terms
    f = SNAField(rank=4, num_basis=6)
    fp = L.init_field(f, jax.random.key(1))
    out = jax.jit(f.apply)(fp, jax.random.uniform(jax.random.key(2), (4, 5, 3), minval=-1, maxval=1))
    assert out.feature.shape == (4, 5, 16) and out.rgb.shape == (4, 5, 3)
    L.check_compatible(f, L.CPField())


def test_errors():
    with pytest.raises(ValueError, match="rank"):
        SNA(in_dim=3, rank=0)
    with pytest.raises(ValueError, match="order=4 must be <= in_dim=3"):
        SNA(in_dim=3, kind="bounded", order=4)
    with pytest.raises(ValueError, match="kind must be one of"):
        SNA(in_dim=3, kind="tucker")
    with pytest.raises(ValueError, match="order is only used"):
        SNA(in_dim=3, kind="cp", order=2)
    with pytest.raises(ValueError, match="rank"):
        SNAField(rank=-1)
    m = SNA(in_dim=2, rank=2)
    p = m.init(jax.random.key(0), jnp.zeros((2,)))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        m.apply(p, jnp.array([0.5, 1.5]))
    with pytest.raises(ValueError, match="in_dim=2"):
        m.apply(p, jnp.zeros((3,)))
    mc = SNA(in_dim=2, rank=2, basis="categorical", num_basis=5)
    pc = mc.init(jax.random.key(0), jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match=r"categorical inputs must lie in \[0, 5\)"):
        mc.apply(pc, jnp.array([0, 5]))
    with pytest.raises(ValueError, match=r"rank mismatch: modes has rank 2 but this SNA has rank=8"):
        SNA(in_dim=2).apply(p, jnp.zeros((2,)))


# --------------------------------------------------------------------------- fitting (issue 17)
def _cp_target(d=3, r=2, g=5, n=120):
    m = SNA(in_dim=d, out_dim=1, rank=r, kind="cp", num_basis=g, use_bias=False)
    pt = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), m.init(jax.random.key(0), jnp.zeros((d,))))
    pt["params"]["modes"] = jax.random.normal(jax.random.key(100), pt["params"]["modes"].shape, jnp.float64)
    xs = jax.random.uniform(jax.random.key(1), (n, d), jnp.float64)
    return m, pt, xs


def test_als_recovers_rank_r_separable_target_float64():
    """A rank-2 CP target on 3 coordinates: the rank schedule (1, 2) of ALS recovers it to float64
    tolerance (at unseen points too); every ALS sweep is non-increasing; grow_rank keeps the function."""
    from lrjax.nn.sna import fit_als, fit_rank_schedule, grow_rank
    with jax.enable_x64(True):
        m, pt, xs = _cp_target()
        ys = m.apply(pt, xs)
        model, p, hist = fit_rank_schedule(m, xs, ys, ranks=(1, 2), key=jax.random.key(0), iters=100)
        assert model.rank == 2 and hist["ranks"] == [2 - 1, 2] and hist["loss"][0] > 1e-4
        xt = jax.random.uniform(jax.random.key(2), (64, 3), jnp.float64)
        scale = float(jnp.max(jnp.abs(m.apply(pt, xt))))
        err = float(jnp.max(jnp.abs(model.apply(p, xt) - m.apply(pt, xt))))
        assert hist["loss"][-1] < 1e-20 and err < 1e-8 * scale, (hist["loss"], err)
        for curve in hist["curves"]:
            c = np.asarray(curve)
            assert np.all(np.diff(c) <= 1e-9 * c[0])                  # ALS never increases the loss
        m3, p3 = grow_rank(model, p, 3, key=jax.random.key(3))
        assert m3.rank == 3 and p3["params"]["modes"].shape[-1] == 3
        np.testing.assert_allclose(m3.apply(p3, xt), model.apply(p, xt), rtol=0, atol=1e-14)
        # one more ALS sweep from the exact solution stays exact (rank-deficient design: min-norm, no NaN)
        p4, h4 = fit_als(m3, p3, xs, ys, iters=1)
        assert np.all(np.isfinite(np.asarray(h4["loss"]))) and float(h4["loss"][-1]) < 1e-20


def test_als_other_kinds_jit_and_adam():
    """ALS works for every kind (here quadratic, 2 outputs, bias) inside an outer jax.jit; Adam fits
    the rank-2 CP target too (looser)."""
    from lrjax.nn.sna import fit_adam, fit_als
    m = SNA(in_dim=3, out_dim=2, rank=2, kind="quadratic", num_basis=4)
    pt = m.init(jax.random.key(4), jnp.zeros((3,)))
    pt["params"]["modes"] = jax.random.normal(jax.random.key(5), pt["params"]["modes"].shape)
    xs = jax.random.uniform(jax.random.key(6), (80, 3))
    ys = m.apply(pt, xs)
    p0 = m.init(jax.random.key(7), jnp.zeros((3,)))
    p, h = jax.jit(lambda q, x, y: fit_als(m, q, x, y, iters=15))(p0, xs, ys)
    c = np.asarray(h["loss"])
    assert c.shape == (16,) and np.all(np.diff(c) <= 1e-5 * c[0]) and c[-1] < 1e-2 * c[0]
    assert jax.tree.map(lambda a: a.dtype, p) == jax.tree.map(lambda a: a.dtype, p0)
    with jax.enable_x64(True):
        mc, pt64, xs64 = _cp_target()
        ys64 = np.asarray(mc.apply(pt64, xs64), np.float32)
    p0 = mc.init(jax.random.key(8), jnp.zeros((3,)))
    p0 = {"params": {**p0["params"], "modes": jax.random.normal(jax.random.key(10), p0["params"]["modes"].shape)}}
    pa, ha = fit_adam(mc, p0, np.asarray(xs64, np.float32), ys64, steps=3000, learning_rate=3e-2)
    assert ha["loss"].shape == (3000,) and float(ha["final"]) < 2e-3 * float(np.var(ys64)), float(ha["final"])
    _, hb = fit_adam(mc, pa, np.asarray(xs64, np.float32), ys64[:, 0], steps=3, batch_size=16,
                     key=jax.random.key(9))
    assert hb["loss"].shape == (3,)


def test_fit_errors_name_the_argument():
    from lrjax.nn.sna import fit_adam, fit_als, fit_rank_schedule, grow_rank
    m = SNA(in_dim=2, rank=2, num_basis=4)
    p = m.init(jax.random.key(0), jnp.zeros((2,)))
    xs, ys = jnp.full((5, 2), 0.5), jnp.zeros((5,))
    with pytest.raises(TypeError, match="model"):
        fit_als("sna", p, xs, ys)
    with pytest.raises(ValueError, match="xs"):
        fit_als(m, p, jnp.full((5, 3), 0.5), ys)
    with pytest.raises(ValueError, match="xs"):
        fit_als(m, p, jnp.full((5, 2), 1.5), ys)
    with pytest.raises(ValueError, match="ys"):
        fit_als(m, p, xs, jnp.zeros((4,)))
    with pytest.raises(ValueError, match="iters"):
        fit_als(m, p, xs, ys, iters=0)
    with pytest.raises(ValueError, match="ridge"):
        fit_als(m, p, xs, ys, ridge=-1.0)
    with pytest.raises(TypeError, match="optimizer"):
        fit_adam(m, p, xs, ys, optimizer="adam")
    with pytest.raises(TypeError, match="key"):
        fit_adam(m, p, xs, ys, batch_size=2)
    with pytest.raises(ValueError, match="new_rank"):
        grow_rank(m, p, 1, key=jax.random.key(0))
    with pytest.raises(ValueError, match="ranks"):
        fit_rank_schedule(m, xs, ys, ranks=(2, 1), key=jax.random.key(0))
    with pytest.raises(ValueError, match="method"):
        fit_rank_schedule(m, xs, ys, ranks=(1,), key=jax.random.key(0), method="sgd")
