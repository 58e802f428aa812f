"""MoLoRA (mixture of LoRA experts at targeted kernels, activation-space) vs float64 NumPy."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _stacks import scan_stack
import lrjax
from lrjax.interpreter import NotMergeable
from lrjax.reparam.molora import MoLoRA, router_probs


def _randn(seed, shape, dtype=jnp.float32):
    """Standard normal test data drawn by NumPy (eager jax.random compiles one program per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), dtype)


def _ref(x, w, f, k, s, renorm=True, temp=1.0):
    x = np.asarray(x, np.float64)
    a, b, wr = (np.asarray(f[n], np.float64) for n in ("a", "b", "router"))
    z = x @ wr / temp
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    g = np.zeros_like(p)
    top = np.argsort(-z, axis=-1, kind="stable")[..., :k]
    np.put_along_axis(g, top, np.take_along_axis(p, top, -1), -1)
    if renorm:
        g /= g.sum(-1, keepdims=True)
    delta = sum(g[..., e:e + 1] * (x @ a[e] @ b[e]) for e in range(a.shape[0]))
    return x @ np.asarray(w, np.float64) + s * delta


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(6, use_bias=False, name="fc")(x)


@pytest.mark.parametrize("k,renorm", [(1, True), (2, True), (2, False), (4, True)])
def test_matches_float64(k, renorm):
    model = MLP()
    x = _randn(0, (7, 5))
    params = model.init(jax.random.key(1), x)
    rp = MoLoRA(rank=2, alpha=4.0, num_experts=4, k=k, renormalize=renorm)
    base, ad = rp.init(jax.random.key(2), params)
    (p,) = ad
    ad = {p: {**ad[p], "b": jax.random.normal(jax.random.key(3), ad[p]["b"].shape) * 0.3}}
    y = jax.jit(lrjax.factored(model.apply, rp))(base, ad, x)
    want = _ref(x, params["params"]["fc"]["kernel"], ad[p], k, rp.scale, renorm)
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=1e-4, atol=1e-5)
    probs = router_probs(rp, ad, p, x)
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-6)


def test_starts_unchanged_grads_reach_router_and_merge_refuses():
    model = MLP()
    x = _randn(0, (7, 5))
    params = model.init(jax.random.key(1), x)
    rp = MoLoRA(rank=2, num_experts=3, k=2)
    base, ad = rp.init(jax.random.key(2), params)
    g = lrjax.factored(model.apply, rp)
    np.testing.assert_allclose(g(base, ad, x), model.apply(params, x), rtol=1e-6)
    (p,) = ad
    ad = {p: {**ad[p], "b": ad[p]["b"] + 0.1}}
    grads = jax.grad(lambda a: jnp.sum(g(base, a, x) ** 2))(ad)
    for n in ("a", "b", "router"):
        assert float(jnp.abs(grads[p][n]).sum()) > 0, n
    for op in ("merge", "materialize", "delta"):
        with pytest.raises(NotMergeable, match="activation-space"):
            getattr(rp, op)(base, ad)


def test_scan_stack_and_bfloat16():
    model = scan_stack(4, length=2, stack="s")
    x = _randn(0, (3, 4))
    params = model.init(jax.random.key(1), x)
    rp = MoLoRA(rank=1, num_experts=2, k=1)
    base, ad = rp.init(jax.random.key(2), params)
    (p,) = ad
    assert ad[p]["a"].shape == (2, 2, 4, 1)
    ad = {p: {**ad[p], "b": jnp.ones_like(ad[p]["b"]) * 0.2}}
    y = lrjax.factored(model.apply, rp)(base, ad, x)
    h = np.asarray(x, np.float64)
    kp = params["params"]["s"]["fc"]
    for layer in range(2):
        fl = {n: np.asarray(v[layer]) for n, v in ad[p].items()}
        h = h + _ref(h, kp["kernel"][layer], fl, 1, rp.scale) + np.asarray(kp["bias"][layer], np.float64)
    np.testing.assert_allclose(np.asarray(y, np.float64), h, rtol=1e-4, atol=1e-5)
    pb = jax.tree_util.tree_map(lambda v: v.astype(jnp.bfloat16), params)
    rpb = MoLoRA(rank=1, num_experts=2, k=1)
    bb, ab = rpb.init(jax.random.key(2), pb)
    yb = lrjax.factored(model.apply, rpb)(bb, ab, x.astype(jnp.bfloat16))
    assert yb.dtype == jnp.bfloat16


@pytest.mark.parametrize("kw,name", [({"k": 5, "num_experts": 4}, "k"), ({"k": 0}, "k"), ({"num_experts": 0}, "num_experts"),
                                     ({"temperature": 0.0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
                                     ({"renormalize": "yes"}, "renormalize"), ({"rank": 0}, "rank")])
def test_bad_config(kw, name):
    with pytest.raises((ValueError, TypeError), match=name):
        MoLoRA(**kw)


def test_bad_adapters_and_router_probs():
    params = {"w": jnp.ones((5, 6))}
    rp = MoLoRA(rank=2, num_experts=3, targets="w")
    base, ad = rp.init(jax.random.key(0), params)
    bad = {"w": {**ad["w"], "router": jnp.ones((5, 4))}}
    with pytest.raises(ValueError, match="router.*num_experts"):
        lrjax.factored(lambda p, x: x @ p["w"], rp)(base, bad, jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="path"):
        router_probs(rp, ad, "nope", jnp.ones((2, 5)))
    with pytest.raises(TypeError, match="rp"):
        router_probs(lrjax.LoRA(), ad, "w", jnp.ones((2, 5)))
