"""FlyLoRA (lrjax.reparam.flylora) against a float64 NumPy transcription of the paper's equations:
sparse frozen A, top-k routing over A x + d (signed and abs), y = W x + s B (z * mask), the
load-balancing rule d <- d + u sign(mean(c) - c), on linen, NNX, plain functions and nn.scan stacks;
multi-task averaging; refusals."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _stacks import scan_stack
import lrjax
from lrjax.interpreter import NotMergeable
from lrjax.reparam.flylora import FlyLoRA, average_adapters, sparse_projection


def _randn(seed, shape, dtype=jnp.float32):
    """Standard normal test data drawn by NumPy (eager jax.random compiles one program per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), dtype)


def _gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _ref_branch(x, f, rp):
    """float64: (delta, counts) of one FlyLoRA leaf on x [..., M]."""
    a, b, d = (np.asarray(f[k], np.float64) for k in "abd")
    z = x @ a
    score = z + d
    if rp.select == "abs":
        score = np.abs(score)
    idx = np.argsort(-score, axis=-1)[..., :rp.top_k]
    mask = np.zeros_like(z)
    np.put_along_axis(mask, idx, 1.0, axis=-1)
    return rp.scale * (z * mask) @ b, mask.reshape(-1, z.shape[-1]).sum(0)


def _ref_state(d, c, u):
    return np.asarray(d, np.float64) + u * np.sign(c.mean(-1, keepdims=True) - c)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(16, name="fc1")(x))
        return nn.Dense(12, name="fc2")(h)


def _rng(key):
    """A NumPy generator seeded by a jax key: test data without one eager jax.random program per shape."""
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).tolist())


def _randomize(ad, key, scale=0.3):
    """Nonzero B and a nonzero router bias so the test sees both the update and the bias's effect."""
    out = {}
    rng = _rng(key)
    for p, f in sorted(ad.items()):
        out[p] = {**f, "b": jnp.asarray(scale * rng.normal(size=f["b"].shape), f["b"].dtype),
                  "d": jnp.asarray(0.5 * rng.normal(size=f["d"].shape), jnp.float32)}
    return out


@pytest.fixture(scope="module")
def mlp():
    model = MLP()
    x = _randn(0, (2, 5, 8))
    params = model.init(jax.random.key(1), x)
    return model, x, params


@pytest.mark.parametrize("select", ["signed", "abs"])
def test_linen_mlp_matches_float64(mlp, select):
    model, x, params = mlp
    rp = FlyLoRA(rank=8, top_k=2, alpha=16.0, u=0.01, select=select)
    base, ad = rp.init(jax.random.key(2), params)
    ad = _randomize(ad, jax.random.key(3))
    y, state = jax.jit(lrjax.factored(model.apply, rp))(base, ad, x)
    p = jax.tree_util.tree_map(lambda t: np.asarray(t, np.float64), params["params"])
    xr = np.asarray(x, np.float64)
    d1, c1 = _ref_branch(xr, ad["params/fc1/kernel"], rp)
    h = _gelu(xr @ p["fc1"]["kernel"] + d1 + p["fc1"]["bias"])
    d2, c2 = _ref_branch(h, ad["params/fc2/kernel"], rp)
    ref = h @ p["fc2"]["kernel"] + d2 + p["fc2"]["bias"]
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2e-4, atol=2e-5)
    for k, c in (("params/fc1/kernel", c1), ("params/fc2/kernel", c2)):
        assert c.sum() == 10 * rp.top_k  # every token selects exactly k ranks
        np.testing.assert_allclose(np.asarray(state[k]["d"]), _ref_state(ad[k]["d"], c, rp.u), atol=1e-7)
    # the bias changes the selection, not the selected values: with d = 0 the output differs
    ad0 = {k: {**f, "d": jnp.zeros_like(f["d"])} for k, f in ad.items()}
    y0, _ = lrjax.factored(model.apply, rp)(base, ad0, x)
    assert not np.allclose(np.asarray(y0), np.asarray(y), atol=1e-4)


def test_init_sparse_a_zero_b_zero_d_and_identity_at_init(mlp):
    model, x, params = mlp
    rp = FlyLoRA(rank=8, top_k=2)
    base, ad = rp.init(jax.random.key(2), params)
    assert base is params
    f = ad["params/fc1/kernel"]
    a = np.asarray(f["a"])
    assert a.shape == (8, 8) and rp.nonzeros(8) == 2
    assert ((a != 0).sum(0) == 2).all()  # p = M // (r // k) nonzeros per rank row
    assert not f["b"].any() and not f["d"].any() and f["d"].dtype == jnp.float32
    y, _ = lrjax.factored(model.apply, rp)(base, ad, x)
    np.testing.assert_allclose(y, model.apply(params, x), rtol=1e-6, atol=1e-6)
    # reproducible A (same key, same path); different for another key
    _, ad2 = rp.init(jax.random.key(2), params)
    _, ad3 = rp.init(jax.random.key(9), params)
    assert np.array_equal(ad2["params/fc1/kernel"]["a"], a)
    assert not np.array_equal(ad3["params/fc1/kernel"]["a"], a)
    # value distribution N(0, (1/r)^2) on a larger draw
    big = np.asarray(sparse_projection(jax.random.key(0), 512, 32, 128))
    nz = big[big != 0]
    assert ((big != 0).sum(0) == 128).all() and abs(nz.std() * 32 - 1) < 0.05


def test_nnx_and_plain_einsum(mlp):
    rp = FlyLoRA(rank=4, top_k=1, alpha=4.0, u=0.5)
    lin = nnx.Linear(8, 6, rngs=nnx.Rngs(0))
    gdef, state = nnx.split(lin)
    x = _randn(3, (7, 8))
    base, ad = rp.init(jax.random.key(4), state)
    ad = _randomize(ad, jax.random.key(5))
    (k,) = ad
    y, st = lrjax.factored(lambda s, x: nnx.merge(gdef, s)(x), rp)(base, ad, x)
    xr = np.asarray(x, np.float64)
    dref, c = _ref_branch(xr, ad[k], rp)
    ref = xr @ np.asarray(state["kernel"].value, np.float64) + dref + np.asarray(state["bias"].value, np.float64)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(np.asarray(st[k]["d"]), _ref_state(ad[k]["d"], c, rp.u), atol=1e-7)
    # plain function, kernel with two input axes (heads x head_dim -> out) contracted by an einsum
    p = {"w": _randn(6, (2, 4, 5))}
    rp2 = FlyLoRA(rank=4, top_k=2, targets="w", axes=lrjax.axes.Axes((), (0, 1), (2,)))
    b2, a2 = rp2.init(jax.random.key(7), p)
    a2 = _randomize(a2, jax.random.key(8))
    xx = _randn(9, (3, 2, 4))
    y2, _ = lrjax.factored(lambda p, x: jnp.einsum("thd,hdo->to", x, p["w"]), rp2)(b2, a2, xx)
    xm = np.asarray(xx, np.float64).reshape(3, 8)
    ref2 = xm @ np.asarray(p["w"], np.float64).reshape(8, 5) + _ref_branch(xm, a2["w"], rp2)[0]
    np.testing.assert_allclose(np.asarray(y2, np.float64), ref2, rtol=2e-4, atol=2e-5)


def ScanMLP():
    return scan_stack(8)


def test_scan_stack_has_per_layer_state():
    model = ScanMLP()
    x = _randn(0, (6, 8))
    params = model.init(jax.random.key(1), x)
    rp = FlyLoRA(rank=4, top_k=2, alpha=4.0, u=0.1)
    base, ad = rp.init(jax.random.key(2), params)
    ad = _randomize(ad, jax.random.key(3))
    (k,) = ad
    assert ad[k]["a"].shape == (3, 8, 4) and ad[k]["d"].shape == (3, 4)
    y, st = jax.jit(lrjax.factored(model.apply, rp))(base, ad, x)
    p = params["params"]["blocks"]["fc"]
    h = np.asarray(x, np.float64)
    counts = []
    for layer in range(3):
        f = {n: ad[k][n][layer] for n in "abd"}
        dh, c = _ref_branch(h, f, rp)
        h = h + h @ np.asarray(p["kernel"][layer], np.float64) + dh + np.asarray(p["bias"][layer], np.float64)
        counts.append(c)
    np.testing.assert_allclose(np.asarray(y, np.float64), h, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(np.asarray(st[k]["d"]), _ref_state(ad[k]["d"], np.stack(counts), rp.u), atol=1e-6)
    ad2 = rp.with_state(ad, st)
    assert ad2[k]["d"].shape == (3, 4) and ad2[k]["b"] is ad[k]["b"]


def test_balancing_rule_spreads_the_load():
    """Repeated forwards with the rule: the bias pushes the per-rank counts toward their mean."""
    rp = FlyLoRA(rank=8, top_k=2, u=0.05, select="signed", targets="w")
    p = {"w": _randn(0, (16, 8))}
    base, ad = rp.init(jax.random.key(1), p)
    x = _randn(2, (64, 16)) + 1.0  # a shifted input: a skewed initial routing
    fn = jax.jit(lrjax.factored(lambda p, x: x @ p["w"], rp))

    def spread(ad):
        _, c = _ref_branch(np.asarray(x, np.float64), ad["w"], rp)
        return c.max() - c.min()

    s0 = spread(ad)
    for _ in range(60):
        _, st = fn(base, ad, x)
        ad = rp.with_state(ad, st)
    assert spread(ad) < s0


def test_grad_jit_vmap_and_frozen_keys(mlp):
    model, x, params = mlp
    rp = FlyLoRA(rank=8, top_k=2, alpha=16.0)
    base, ad = rp.init(jax.random.key(2), params)
    ad = _randomize(ad, jax.random.key(3))
    g = lrjax.factored(model.apply, rp)
    grads = jax.jit(jax.grad(lambda a: jnp.sum(g(base, a, x)[0] ** 2)))(ad)
    for k, gr in grads.items():
        assert float(jnp.abs(gr["b"]).sum()) > 0
        assert float(jnp.abs(gr["a"]).sum()) == 0.0 and float(jnp.abs(gr["d"]).sum()) == 0.0
    tr, fr = rp.split(ad)
    assert set(tr["params/fc1/kernel"]) == {"b"} and rp.num_params(ad) == 8 * (16 + 12)
    # finite differences on one entry of B against the float64 reference
    k = "params/fc2/kernel"
    p = jax.tree_util.tree_map(lambda t: np.asarray(t, np.float64), params["params"])

    def loss64(b):
        a = {**ad, k: {**ad[k], "b": b}}
        xr = np.asarray(x, np.float64)
        h = _gelu(xr @ p["fc1"]["kernel"] + _ref_branch(xr, a["params/fc1/kernel"], rp)[0] + p["fc1"]["bias"])
        return np.sum((h @ p["fc2"]["kernel"] + _ref_branch(h, a[k], rp)[0] + p["fc2"]["bias"]) ** 2)

    b = np.asarray(ad[k]["b"], np.float64)
    e = np.zeros_like(b)
    e[1, 3] = 1e-4
    fd = (loss64(b + e) - loss64(b - e)) / 2e-4
    np.testing.assert_allclose(float(grads[k]["b"][1, 3]), fd, rtol=2e-3)
    # vmap over two adapter sets
    stacked = jax.tree_util.tree_map(lambda t: jnp.stack([t, t]), ad)
    stacked = {kk: {**f, "b": f["b"].at[1].multiply(2.0)} for kk, f in stacked.items()}
    ys, _ = jax.vmap(g, in_axes=(None, 0, None))(base, stacked, x)
    y1, _ = g(base, {kk: {**f, "b": 2 * f["b"]} for kk, f in ad.items()}, x)
    np.testing.assert_allclose(ys[1], y1, rtol=1e-5, atol=1e-6)


def test_detach_input_blocks_the_branch_gradient_into_x():
    p = {"w": _randn(0, (8, 8))}
    x = _randn(1, (4, 8))
    for detach in (False, True):
        rp = FlyLoRA(rank=4, top_k=2, detach_input=detach, targets="w")
        base, ad = rp.init(jax.random.key(2), p)
        ad = _randomize(ad, jax.random.key(3))
        g = lrjax.factored(lambda p, x: x @ p["w"], rp)
        gx = jax.grad(lambda x: jnp.sum(g(base, ad, x)[0]))(x)
        base_only = jnp.broadcast_to(p["w"].sum(1), x.shape)
        assert np.allclose(gx, base_only, atol=1e-5) == detach


def test_bfloat16():
    rp = FlyLoRA(rank=4, top_k=2, alpha=8.0, targets="w")
    p = {"w": (_randn(0, (8, 8)) / 3).astype(jnp.bfloat16)}
    base, ad = rp.init(jax.random.key(1), p)
    assert ad["w"]["a"].dtype == jnp.bfloat16 and ad["w"]["d"].dtype == jnp.float32
    ad = _randomize(ad, jax.random.key(2))
    x = _randn(3, (6, 8)).astype(jnp.bfloat16)
    y, st = lrjax.factored(lambda p, x: x @ p["w"], rp)(base, ad, x)
    assert y.dtype == jnp.bfloat16 and st["w"]["d"].dtype == jnp.float32
    xr = np.asarray(x.astype(jnp.float32), np.float64)
    ref = xr @ np.asarray(p["w"].astype(jnp.float32), np.float64) + _ref_branch(xr, ad["w"], rp)[0]
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2e-2, atol=2e-2)


def test_weight_space_operations_raise_not_mergeable(mlp):
    _, x, params = mlp
    rp = FlyLoRA(rank=8, top_k=2)
    base, ad = rp.init(jax.random.key(2), params)
    for op in ("merge", "materialize", "delta", "unmerge"):
        with pytest.raises(NotMergeable, match=f"FlyLoRA.{op}"):
            getattr(rp, op)(base, ad)


def test_average_adapters(mlp):
    _, _, params = mlp
    rp = FlyLoRA(rank=8, top_k=2)
    base, ad = rp.init(jax.random.key(2), params)
    tasks = [_randomize(ad, jax.random.key(10 + i)) for i in range(3)]
    avg = average_adapters(tasks)
    for k in ad:
        assert np.array_equal(avg[k]["a"], ad[k]["a"])
        for n in ("b", "d"):
            want = np.mean([np.asarray(t[k][n], np.float64) for t in tasks], 0)
            np.testing.assert_allclose(np.asarray(avg[k][n]), want, rtol=1e-6, atol=1e-7)
    # LoRA adapters: A and B averaged separately
    lrp = lrjax.LoRA(rank=2)
    _, l1 = lrp.init(jax.random.key(0), params)
    _, l2 = lrp.init(jax.random.key(1), params)
    la = average_adapters([l1, l2])
    np.testing.assert_allclose(la["params/fc1/kernel"]["a"], (l1["params/fc1/kernel"]["a"] + l2["params/fc1/kernel"]["a"]) / 2,
                               rtol=1e-6)
    # refusals
    _, other = rp.init(jax.random.key(99), params)
    with pytest.raises(ValueError, match=r"adapters_list\[1\].*'a'.*same key"):
        average_adapters([ad, other])
    with pytest.raises(ValueError, match="adapters_list"):
        average_adapters([ad, {k: v for k, v in list(ad.items())[:1]}])
    with pytest.raises(ValueError, match=r"adapters_list\[1\].*shape|adapters_list\[1\].*float"):
        average_adapters([ad, {k: {**f, "b": f["b"][:1]} for k, f in ad.items()}])
    with pytest.raises(ValueError, match="adapters_list"):
        average_adapters([ad, {k: {"a": f["a"], "b": f["b"]} for k, f in ad.items()}])
    with pytest.raises(ValueError, match="adapters_list is empty"):
        average_adapters([])
    with pytest.raises(TypeError, match="adapters_list"):
        average_adapters(ad)
    with pytest.raises(TypeError, match=r"adapters_list\[0\]"):
        average_adapters([{"x": {"a": [1.0]}}])


def test_bad_config_and_leaf():
    for kw, exc, name in ((dict(top_k=9), ValueError, "top_k"), (dict(top_k=0), ValueError, "top_k"),
                          (dict(top_k=2.0), TypeError, "top_k"), (dict(u=-0.1), ValueError, "u"),
                          (dict(u=float("inf")), ValueError, "u"), (dict(u="1"), TypeError, "u"),
                          (dict(select="magnitude"), ValueError, "select"), (dict(select=None), TypeError, "select"),
                          (dict(detach_input=1), TypeError, "detach_input")):
        with pytest.raises(exc, match=name):
            FlyLoRA(rank=8, **kw)
    with pytest.raises(ValueError, match="p must"):
        sparse_projection(jax.random.key(0), 4, 2, 5)
    with pytest.raises(TypeError, match="key"):
        sparse_projection("k", 4, 2, 1)
    rp = FlyLoRA(rank=8, top_k=1)  # the rank rule (M >= rank) also keeps p = M // (r // k) >= 1
    with pytest.raises(ValueError, match="rank=8 exceeds"):
        rp.init(jax.random.key(0), {"kernel": jnp.ones((4, 16))})
    with pytest.raises(ValueError, match="rank=8 exceeds"):
        rp.init(jax.random.key(0), {"kernel": jnp.ones((16, 4))})
    # a wrongly shaped router bias is refused before tracing
    rp = FlyLoRA(rank=4, top_k=2)
    p = {"kernel": jnp.ones((8, 8))}
    base, ad = rp.init(jax.random.key(0), p)
    bad = {"kernel": {**ad["kernel"], "d": jnp.zeros(3)}}
    with pytest.raises(ValueError, match="'d'.*shape"):
        lrjax.factored(lambda p, x: x @ p["kernel"], rp)(base, bad, jnp.ones((2, 8)))
