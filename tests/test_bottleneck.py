"""Bottleneck adapters (lrjax.reparam.bottleneck): the sequential Pfeiffer adapter as an
activation-space branch (h <- h + up(relu(down h + b_down)) + b_up, with the base bias folded in
exactly) against float64 NumPy on linen, NNX, plain functions and an nn.scan stack; the NICE
coupling's exact inverse, unit Jacobian determinant and a tied-head round trip; refusals."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _stacks import scan_stack
import lrjax
from lrjax.interpreter import NotMergeable
from lrjax.reparam.bottleneck import SeqBottleneck, bottleneck_size, nice_forward, nice_init, nice_inverse


def _randn(seed, shape, dtype=jnp.float32):
    """Standard normal test data drawn by NumPy (eager jax.random compiles one program per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), dtype)


def _adapter64(h, f, scaling=1.0):
    """float64 Pfeiffer adapter on the layer output h (after its bias): scaling * (up relu(down h))."""
    g = {k: np.asarray(v, np.float64) for k, v in f.items()}
    a = np.maximum(0.0, h @ g["down"] + g["down_bias"])
    return scaling * (a @ g["up"] + g["up_bias"])


def _randomize(ad, key):
    out = {}
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).tolist())  # NumPy draws: no eager jax.random program per shape
    for p, f in sorted(ad.items()):
        out[p] = {**f, **{n: jnp.asarray(0.5 * rng.standard_normal(f[n].shape), f[n].dtype)
                          for n in ("down", "down_bias", "up", "up_bias")}}
    return out


def _gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


class FFN(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(16, name="fc1")(x))
        return x + nn.Dense(8, name="fc2")(h)  # residual around the FFN


def test_linen_ffn_output_matches_float64_with_bias_folded_in():
    model = FFN()
    x = _randn(0, (2, 3, 8))
    params = model.init(jax.random.key(1), x)
    params = jax.tree_util.tree_map(lambda t: t + 0.3, params)  # nonzero biases
    rp = SeqBottleneck(targets=r"fc2/kernel", reduction_factor=4, scaling=0.7)
    base, ad = rp.init(jax.random.key(2), params)
    (k,) = ad
    assert k == "params/fc2/kernel" and ad[k]["down"].shape == (8, 2)
    np.testing.assert_array_equal(ad[k]["bias"], params["params"]["fc2"]["bias"])  # the frozen copy
    ad = _randomize(ad, jax.random.key(3))
    y = jax.jit(lrjax.factored(model.apply, rp))(base, ad, x)
    p = jax.tree_util.tree_map(lambda t: np.asarray(t, np.float64), params["params"])
    xr = np.asarray(x, np.float64)
    hid = _gelu(xr @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    h = hid @ p["fc2"]["kernel"] + p["fc2"]["bias"]  # the FFN output, bias included
    ref = xr + h + _adapter64(h, ad[k], 0.7)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2e-4, atol=2e-5)
    # wrong without the bias copy: the branch would see x W instead of x W + b
    y_nob = lrjax.factored(model.apply, rp)(base, {k: {**ad[k], "bias": jnp.zeros(8)}}, x)
    assert not np.allclose(np.asarray(y_nob), ref, atol=1e-3)


def test_no_bias_nnx_plain_and_sync():
    # a Dense without bias: the stored bias is zero and the branch adapts x W exactly
    lin = nnx.Linear(6, 8, use_bias=False, rngs=nnx.Rngs(0))
    gdef, state = nnx.split(lin)
    rp = SeqBottleneck(reduction_factor=2)
    base, ad = rp.init(jax.random.key(1), state)
    (k,) = ad
    assert not ad[k]["bias"].any() and ad[k]["down"].shape == (8, 4)
    ad = _randomize(ad, jax.random.key(2))
    x = _randn(3, (5, 6))
    y = lrjax.factored(lambda s, x: nnx.merge(gdef, s)(x), rp)(base, ad, x)
    h = np.asarray(x, np.float64) @ np.asarray(state["kernel"].value, np.float64)
    np.testing.assert_allclose(np.asarray(y, np.float64), h + _adapter64(h, ad[k]), rtol=2e-4, atol=2e-5)
    # plain dict with a sibling bias under another name; bias_name=None ignores it
    p = {"ffn": {"w_out": _randn(4, (6, 8)), "b_out": jnp.linspace(-1, 1, 8)}}
    fn = lambda p, x: x @ p["ffn"]["w_out"] + p["ffn"]["b_out"]  # noqa: E731
    for name in ("b_out", None):
        rp2 = SeqBottleneck(targets="w_out", reduction_factor=2, bias_name=name)
        b2, a2 = rp2.init(jax.random.key(5), p)
        a2 = _randomize(a2, jax.random.key(6))
        y2 = lrjax.factored(fn, rp2)(b2, a2, x)
        xw = np.asarray(x, np.float64) @ np.asarray(p["ffn"]["w_out"], np.float64)
        bb = np.asarray(p["ffn"]["b_out"], np.float64)
        want = xw + bb + _adapter64(xw + bb if name else xw, a2["ffn/w_out"])
        np.testing.assert_allclose(np.asarray(y2, np.float64), want, rtol=2e-4, atol=2e-5)
    # sync_bias after the base bias changed
    rp2 = SeqBottleneck(targets="w_out", reduction_factor=2, bias_name="b_out")
    b2, a2 = rp2.init(jax.random.key(5), p)
    new = {"ffn": {**p["ffn"], "b_out": p["ffn"]["b_out"] * 3}}
    np.testing.assert_array_equal(rp2.sync_bias(new, a2)["ffn/w_out"]["bias"], new["ffn"]["b_out"])


def ScanFFN():
    return scan_stack(8, length=2, name="ffn")


def test_scan_stack_per_layer_bias():
    model = ScanFFN()
    x = _randn(0, (4, 8))
    params = model.init(jax.random.key(1), x)
    params = jax.tree_util.tree_map(lambda t: t + 0.2, params)
    rp = SeqBottleneck(reduction_factor=4)
    base, ad = rp.init(jax.random.key(2), params)
    (k,) = ad
    assert ad[k]["bias"].shape == (2, 8) and ad[k]["down"].shape == (2, 8, 2)
    ad = _randomize(ad, jax.random.key(3))
    y = lrjax.factored(model.apply, rp)(base, ad, x)
    p = params["params"]["blocks"]["ffn"]
    h = np.asarray(x, np.float64)
    for layer in range(2):
        o = h @ np.asarray(p["kernel"][layer], np.float64) + np.asarray(p["bias"][layer], np.float64)
        h = h + o + _adapter64(o, {n: v[layer] for n, v in ad[k].items()})
    np.testing.assert_allclose(np.asarray(y, np.float64), h, rtol=2e-4, atol=2e-5)


def test_init_grad_bfloat16_and_refusals():
    p = {"fc": {"kernel": _randn(0, (8, 64)), "bias": jnp.ones(64)}}
    rp = SeqBottleneck()  # reduction 16 -> bottleneck 4, "bert" init
    base, ad = rp.init(jax.random.key(1), p)
    f = ad["fc/kernel"]
    assert f["down"].shape == (64, 4) and f["up"].shape == (4, 64) and bottleneck_size(8, 16) == 1
    assert abs(float(jnp.concatenate([f["down"].ravel(), f["up"].ravel()]).std()) / 0.02 - 1) < 0.15
    assert not f["down_bias"].any() and not f["up_bias"].any()
    assert rp.frozen_keys == ("bias",) and rp.num_params(ad) == 2 * 64 * 4 + 4 + 64
    fn = lambda p, x: x @ p["fc"]["kernel"] + p["fc"]["bias"]  # noqa: E731
    g = lrjax.factored(fn, rp)
    x = _randn(2, (3, 8))
    grads = jax.jit(jax.grad(lambda a: jnp.sum(g(base, a, x) ** 2)))(ad)["fc/kernel"]
    assert all(float(jnp.abs(grads[n]).sum()) > 0 for n in ("down", "down_bias", "up", "up_bias"))
    assert float(jnp.abs(grads["bias"]).sum()) == 0.0
    stacked = jax.tree_util.tree_map(lambda t: jnp.stack([t, 0 * t]), ad)  # vmap over two adapter sets
    ys = jax.vmap(g, in_axes=(None, 0, None))(base, stacked, x)
    np.testing.assert_allclose(ys[0], g(base, ad, x), rtol=1e-6)
    np.testing.assert_allclose(ys[1], fn(p, x), rtol=1e-6)  # a zero adapter (and zero bias copy) is the base
    for op in ("merge", "materialize", "delta"):
        with pytest.raises(NotMergeable, match=f"SeqBottleneck.{op}"):
            getattr(rp, op)(base, ad)
    # bfloat16
    pb = jax.tree_util.tree_map(lambda t: t.astype(jnp.bfloat16), p)
    bb, ab = rp.init(jax.random.key(1), pb)
    ab = _randomize(ab, jax.random.key(4))
    yb = lrjax.factored(fn, rp)(bb, ab, x.astype(jnp.bfloat16))
    assert yb.dtype == jnp.bfloat16
    hb = np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32), np.float64) @ \
        np.asarray(pb["fc"]["kernel"].astype(jnp.float32), np.float64) + 1.0
    np.testing.assert_allclose(np.asarray(yb, np.float64), hb + _adapter64(hb, ab["fc/kernel"]), rtol=3e-2, atol=5e-2)
    for kw, exc, name in ((dict(reduction_factor=0), ValueError, "reduction_factor"),
                          (dict(reduction_factor="16"), TypeError, "reduction_factor"),
                          (dict(scaling=float("inf")), ValueError, "scaling"), (dict(init_std=-1.0), ValueError, "init_std"),
                          (dict(bias_name=3), TypeError, "bias_name"), (dict(bias_name=""), TypeError, "bias_name")):
        with pytest.raises(exc, match=name):
            SeqBottleneck(**kw)
    with pytest.raises(ValueError, match="reduction_factor"):
        bottleneck_size(64, 0)
    with pytest.raises(TypeError, match="n must"):
        bottleneck_size(64.0, 16)
    with pytest.raises(ValueError, match="bias leaf 'fc/bias'.*shape"):
        SeqBottleneck().init(jax.random.key(0), {"fc": {"kernel": jnp.ones((8, 64)), "bias": jnp.ones(3)}})
    with pytest.raises(ValueError, match=r"'down'.*shape.*bottleneck"):
        g(base, {"fc/kernel": {**f, "down": f["down"][:, :2]}}, x)


def _nice64(params, e, inverse=False):
    q = jax.tree_util.tree_map(lambda t: np.asarray(t, np.float64), params)
    mlp = lambda m, v: np.maximum(0, v @ m["w1"] + m["b1"]) @ m["w2"] + m["b2"]  # noqa: E731
    d1 = params["G"]["w1"].shape[0]
    a, b = e[..., :d1], e[..., d1:]
    if not inverse:
        y1 = a + mlp(q["F"], b)
        return np.concatenate([y1, b + mlp(q["G"], y1)], -1)
    e2 = b - mlp(q["G"], a)
    return np.concatenate([a - mlp(q["F"], e2), e2], -1)


@pytest.mark.parametrize("d", [8, 7])
def test_nice_forward_inverse_and_unit_jacobian(d):
    ip = nice_init(jax.random.key(0), d, init_std=0.5)  # large weights: a far-from-identity coupling
    assert ip["F"]["w1"].shape == (d - d // 2, (d - d // 2) // 2) and ip["F"]["w2"].shape[-1] == d // 2
    e = _randn(1, (2, 3, d))
    y = jax.jit(nice_forward)(ip, e)
    er = np.asarray(e, np.float64)
    np.testing.assert_allclose(np.asarray(y, np.float64), _nice64(ip, er), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(nice_inverse(ip, y), np.float64), _nice64(ip, np.asarray(y, np.float64), True),
                               rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(y - e).max()) > 0.1
    np.testing.assert_allclose(nice_inverse(ip, y), e, rtol=1e-5, atol=1e-5)
    j = jax.jacfwd(lambda v: nice_forward(ip, v))(e[0, 0])
    assert abs(np.linalg.det(np.asarray(j, np.float64)) - 1.0) < 1e-4
    if d != 8:
        return
    # vmap over parameter sets, grad, bfloat16 (once)
    ips = jax.tree_util.tree_map(lambda t: jnp.stack([t, 2 * t]), ip)
    ys = jax.vmap(nice_forward, in_axes=(0, None))(ips, e)
    np.testing.assert_allclose(ys[0], y, rtol=1e-6)
    gr = jax.grad(lambda q: jnp.sum(nice_forward(q, e) ** 2))(ip)
    assert all(float(jnp.abs(v).sum()) > 0 for v in jax.tree_util.tree_leaves(gr))
    yb = nice_forward(ip, e.astype(jnp.bfloat16))
    assert yb.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(yb, np.float32), _nice64(ip, np.asarray(e.astype(jnp.bfloat16), np.float64)),
                               rtol=3e-2, atol=3e-2)


def test_nice_tied_head_round_trip_and_refusals():
    """After the embedding lookup and its inverse before a tied head, an identity body gives the
    base model's logits exactly (the coupling cancels)."""
    emb = _randn(0, (11, 6))
    ip = nice_init(jax.random.key(1), 6, init_std=0.3)
    ids = jnp.array([[1, 4, 7], [0, 10, 3]])
    e = emb[ids]
    logits = nice_inverse(ip, nice_forward(ip, e)) @ emb.T
    np.testing.assert_allclose(logits, e @ emb.T, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="reduction_factor"):
        nice_init(jax.random.key(0), 2, reduction_factor=2)
    with pytest.raises(ValueError, match="d must be"):
        nice_init(jax.random.key(0), 1)
    with pytest.raises(TypeError, match="key"):
        nice_init(0, 8)
    with pytest.raises(ValueError, match="e has width 5"):
        nice_forward(ip, jnp.ones((2, 5)))
    with pytest.raises(TypeError, match="params"):
        nice_forward({"F": ip["F"]}, e)
    with pytest.raises(TypeError, match="y"):
        nice_inverse(ip, [[1.0] * 6])


def test_bias_name_typo_is_refused():
    params = {"fc": {"kernel": jnp.ones((4, 32)), "bias": jnp.ones(32)}}
    with pytest.raises(ValueError, match="bias_name='b'.*no leaf 'fc/b'"):
        lrjax.SeqBottleneck(bias_name="b").init(jax.random.key(0), params)
