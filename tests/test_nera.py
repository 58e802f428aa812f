"""NeRA (lrjax.reparam.nera) against a float64 NumPy transcription of the paper's equations
y = W x + b + alpha R phi(x), phi(x)_j = sum_d sum_k max(0, 1 - |s_d x_d - t_dk|) C[d, k, j]; linen,
NNX, plain functions; init; gradients to every factor; memory (no [tokens, M, K, r] intermediate)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lrjax
from lrjax.interpreter import NotMergeable
from lrjax.reparam.nera import NeRA, nera_features


def _randn(seed, shape, dtype=jnp.float32):
    """Standard normal test data drawn by NumPy (eager jax.random compiles one program per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), dtype)


def _ref_branch(x, f):
    t, s, c, r, alpha = (np.asarray(f[k], np.float64) for k in ("t", "s", "C", "R", "alpha"))
    h = np.maximum(0.0, 1.0 - np.abs(x[..., :, None] * s[:, None] - t))
    phi = np.einsum("...mk,mkr->...r", h, c)
    return alpha * phi @ r


def _gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _rng(key):
    """A NumPy generator seeded by a jax key: test data without one eager jax.random program per shape."""
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).tolist())


def _randomize(ad, key):
    """Factors away from their init (larger C, gain 0.7, scales and knots moved) so every term matters."""
    out = {}
    rng = _rng(key)
    for p, f in sorted(ad.items()):
        dt = {k: f[k].dtype for k in ("C", "s", "t", "alpha")}
        s, t = (np.asarray(f[k], np.float32) for k in ("s", "t"))
        out[p] = {**f, "C": jnp.asarray(0.5 * rng.normal(size=f["C"].shape), dt["C"]),
                  "s": jnp.asarray(s * (1 + 0.3 * rng.normal(size=s.shape)), dt["s"]),
                  "t": jnp.asarray(t + 0.2 * rng.normal(size=t.shape), dt["t"]),
                  "alpha": jnp.asarray(np.full(f["alpha"].shape, 0.7), dt["alpha"])}
    return out


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(8, name="fc1")(x))
        return nn.Dense(6, name="fc2")(h)


@pytest.fixture(scope="module")
def mlp():
    model = MLP()
    x = 1.5 * _randn(0, (2, 3, 5))
    params = model.init(jax.random.key(1), x)
    rp = NeRA(rank=3, num_knots=4)
    base, ad = rp.init(jax.random.key(2), params)
    return model, x, params, rp, base, _randomize(ad, jax.random.key(3))


def _mlp_ref(params, ad, x):
    p = jax.tree_util.tree_map(lambda t: np.asarray(t, np.float64), params["params"])
    xr = np.asarray(x, np.float64)
    h = _gelu(xr @ p["fc1"]["kernel"] + p["fc1"]["bias"] + _ref_branch(xr, ad["params/fc1/kernel"]))
    return h @ p["fc2"]["kernel"] + p["fc2"]["bias"] + _ref_branch(h, ad["params/fc2/kernel"])


def test_linen_mlp_matches_float64(mlp):
    model, x, params, rp, base, ad = mlp
    y = jax.jit(lrjax.factored(model.apply, rp))(base, ad, x)
    np.testing.assert_allclose(np.asarray(y, np.float64), _mlp_ref(params, ad, x), rtol=2e-4, atol=2e-5)


def test_nnx_and_plain_function():
    rp = NeRA(rank=2, num_knots=3, knot_range=2.0)
    lin = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    gdef, state = nnx.split(lin)
    base, ad = rp.init(jax.random.key(1), state)
    ad = _randomize(ad, jax.random.key(2))
    (k,) = ad
    x = _randn(3, (7, 4))
    y = lrjax.factored(lambda s, x: nnx.merge(gdef, s)(x), rp)(base, ad, x)
    xr = np.asarray(x, np.float64)
    ref = xr @ np.asarray(state["kernel"].value, np.float64) + np.asarray(state["bias"].value, np.float64) \
        + _ref_branch(xr, ad[k])
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2e-4, atol=2e-5)
    # plain function: a kernel with two input axes contracted by an einsum
    p = {"w": _randn(4, (2, 3, 4))}
    rp2 = NeRA(rank=2, num_knots=3, targets="w", axes=lrjax.axes.Axes((), (0, 1), (2,)))
    b2, a2 = rp2.init(jax.random.key(5), p)
    a2 = _randomize(a2, jax.random.key(6))
    xx = _randn(7, (5, 2, 3))
    y2 = lrjax.factored(lambda p, x: jnp.einsum("thd,hdo->to", x, p["w"]), rp2)(b2, a2, xx)
    xm = np.asarray(xx, np.float64).reshape(5, 6)
    np.testing.assert_allclose(np.asarray(y2, np.float64),
                               xm @ np.asarray(p["w"], np.float64).reshape(6, 4) + _ref_branch(xm, a2["w"]),
                               rtol=2e-4, atol=2e-5)


def test_init_values_and_param_count():
    rp = NeRA(rank=4)  # defaults: K = 8, alpha0 = 1e-3, knots in [-3, 3]
    p = {"kernel": _randn(0, (64, 32))}
    _, ad = rp.init(jax.random.key(1), p)
    f = ad["kernel"]
    np.testing.assert_allclose(f["t"], np.broadcast_to(np.linspace(-3, 3, 8), (64, 8)), rtol=1e-6)
    assert np.array_equal(f["s"], np.ones(64)) and f["alpha"].shape == () and float(f["alpha"]) == pytest.approx(1e-3)
    assert abs(float(f["C"].std()) / 1e-3 - 1) < 0.1
    r = np.asarray(f["R"])
    assert r.shape == (4, 32) and np.abs(r).max() <= 0.5 and r.std() > 0.2  # U(-1/sqrt(r), 1/sqrt(r)), not zero
    assert rp.num_params(ad) == 64 * 8 * 4 + 64 * 8 + 64 + 4 * 32 + 1
    assert rp.trainable_keys == ("t", "s", "C", "R", "alpha")


def test_grad_reaches_every_factor_and_matches_finite_differences(mlp):
    model, x, params, rp, base, ad = mlp
    g = lrjax.factored(model.apply, rp)
    grads = jax.jit(jax.grad(lambda a: jnp.sum(g(base, a, x) ** 2)))(ad)
    for k, gr in grads.items():
        for n, v in gr.items():
            assert float(jnp.abs(v).sum()) > 0, (k, n)
    k = "params/fc1/kernel"
    for n, idx in (("C", (1, 2, 0)), ("t", (2, 1)), ("s", (3,))):
        def loss64(delta):
            v = np.asarray(ad[k][n], np.float64).copy()
            v[idx] += delta
            return np.sum(_mlp_ref(params, {**ad, k: {**ad[k], n: v}}, x) ** 2)
        fd = (loss64(1e-5) - loss64(-1e-5)) / 2e-5
        np.testing.assert_allclose(float(grads[k][n][idx]), fd, rtol=5e-3, atol=1e-4)


def test_no_tokens_by_m_by_k_by_r_intermediate():
    """The forward and backward never form [tokens, M, K, r] (the basis is contracted as a matmul)."""
    t_, m, k, r = 11, 7, 5, 3
    rp = NeRA(rank=r, num_knots=k, targets="w")
    p = {"w": jnp.ones((m, 4))}
    base, ad = rp.init(jax.random.key(0), p)
    x = jnp.ones((t_, m))
    g = lrjax.factored(lambda p, x: x @ p["w"], rp)
    jaxpr = jax.make_jaxpr(jax.grad(lambda a, x: jnp.sum(g(base, a, x) ** 2), argnums=(0, 1)))(ad, x)
    sizes = []

    def walk(jp):
        for eqn in jp.eqns:
            for v in eqn.outvars:
                sizes.append(int(np.prod(v.aval.shape)) if hasattr(v.aval, "shape") else 0)
            for sub in jax.core.jaxprs_in_params(eqn.params) if hasattr(jax.core, "jaxprs_in_params") else []:
                walk(sub)
            for prm in eqn.params.values():
                inner = getattr(prm, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    walk(inner)
    walk(jaxpr.jaxpr)
    assert max(sizes) == t_ * m * k  # the basis is the largest intermediate
    np.testing.assert_allclose(nera_features(x, ad["w"]["s"], ad["w"]["t"], ad["w"]["C"]),
                               np.einsum("tmk,mkr->tr", np.maximum(0, 1 - np.abs(np.asarray(x)[..., None] -
                                                                               np.asarray(ad["w"]["t"]))),
                                         np.asarray(ad["w"]["C"])), rtol=1e-5, atol=1e-8)


def test_bfloat16_and_vmap(mlp):
    rp = NeRA(rank=2, num_knots=4, targets="w")
    p = {"w": (_randn(0, (6, 4)) / 2).astype(jnp.bfloat16)}
    base, ad = rp.init(jax.random.key(1), p)
    assert all(v.dtype == jnp.bfloat16 for v in ad["w"].values())
    ad = _randomize(ad, jax.random.key(2))
    x = _randn(3, (5, 6)).astype(jnp.bfloat16)
    g = lrjax.factored(lambda p, x: x @ p["w"], rp)
    y = g(base, ad, x)
    assert y.dtype == jnp.bfloat16
    xr = np.asarray(x.astype(jnp.float32), np.float64)
    ref = xr @ np.asarray(p["w"].astype(jnp.float32), np.float64) + _ref_branch(xr, ad["w"])
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=3e-2, atol=3e-2)
    stacked = jax.tree_util.tree_map(lambda t: jnp.stack([t, t]), ad)
    stacked["w"]["alpha"] = stacked["w"]["alpha"].at[1].set(0)
    ys = jax.vmap(g, in_axes=(None, 0, None))(base, stacked, x)
    np.testing.assert_array_equal(np.asarray(ys[0], np.float32), np.asarray(y, np.float32))
    np.testing.assert_array_equal(np.asarray(ys[1], np.float32), np.asarray(x @ p["w"], np.float32))


def test_not_mergeable_and_bad_input(mlp):
    model, x, params, rp, base, ad = mlp
    for op in ("merge", "materialize", "delta"):
        with pytest.raises(NotMergeable, match=f"NeRA.{op}"):
            getattr(rp, op)(base, ad)
    for kw, exc, name in ((dict(num_knots=1), ValueError, "num_knots"), (dict(num_knots=2.5), TypeError, "num_knots"),
                          (dict(knot_range=0.0), ValueError, "knot_range"),
                          (dict(knot_range=float("nan")), ValueError, "knot_range"),
                          (dict(knot_range="3"), TypeError, "knot_range"), (dict(alpha=-1.0), ValueError, "alpha")):
        with pytest.raises(exc, match=name):
            NeRA(**kw)
    f = ad["params/fc1/kernel"]
    with pytest.raises(ValueError, match="disagree"):
        nera_features(jnp.ones((2, 4)), f["s"], f["t"], f["C"])
    with pytest.raises(TypeError, match="x"):
        nera_features(jnp.ones((2, 5), jnp.int32), f["s"], f["t"], f["C"])
    with pytest.raises(ValueError, match="c"):
        nera_features(jnp.ones((2, 5)), f["s"], f["t"], f["C"][0])
    k = "params/fc1/kernel"
    bad = {**ad, k: {**ad[k], "C": ad[k]["C"][..., :2]}}
    with pytest.raises(ValueError, match=r"'C'.*shape.*rank=3"):
        lrjax.factored(model.apply, rp)(base, bad, x)
    with pytest.raises(ValueError, match="no factor 'alpha'"):
        lrjax.factored(model.apply, rp)(base, {**ad, k: {n: v for n, v in ad[k].items() if n != "alpha"}}, x)
