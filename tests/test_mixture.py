"""Mixture of low-rank experts (lrjax.nn.mixture): float64 NumPy references of every equation, the
RLOO router estimator's unbiasedness on a toy problem with a known gradient, subset probabilities,
effective support, the NNX layer, dtypes, jit/grad/vmap and bad input."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lrjax.nn import mixture as mx


def _rand(seed, *shape, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _ref_delta(x, a_list, b_list, g, s=1.0):
    """float64: s * sum_e g_e (x a_e) b_e, one expert at a time."""
    x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
    y = 0.0
    for e, (a, b) in enumerate(zip(a_list, b_list)):
        y = y + g[..., e:e + 1] * ((x @ np.asarray(a, np.float64)) @ np.asarray(b, np.float64))
    return s * y


def _gates(seed, bshape, e, k):
    """Random top-k-sparse non-negative gates [*bshape, E]."""
    rng = np.random.default_rng(seed)
    g = rng.random(bshape + (e,)).astype(np.float32)
    order = np.argsort(-g, axis=-1)
    mask = np.zeros_like(g, bool)
    np.put_along_axis(mask, order[..., :k], True, axis=-1)
    return np.where(mask, g, 0.0).astype(np.float32)


# ------------------------------------------------------------------------------ mixture_delta
def test_stacked_mixture_equals_float64_expert_loop():
    e, m, n, r = 4, 6, 5, 2
    x, a, b = _rand(0, 3, 7, m), _rand(1, e, m, r), _rand(2, e, r, n)
    g = _gates(3, (3, 7), e, 2)
    y = mx.mixture_delta(x, a, b, g, scale=0.5)
    assert y.shape == (3, 7, n) and y.dtype == jnp.float32
    np.testing.assert_allclose(y, _ref_delta(x, a, b, g, 0.5), rtol=1e-5, atol=1e-5)


def test_heterogeneous_packed_equals_per_expert_loop():
    m, n, ranks = 6, 5, (1, 3, 2, 1)
    a_list = [_rand(10 + i, m, r) for i, r in enumerate(ranks)]
    b_list = [_rand(20 + i, r, n) for i, r in enumerate(ranks)]
    a, b, rk = mx.pack_experts(a_list, b_list)
    assert rk == ranks and a.shape == (m, 7) and b.shape == (7, n)  # no padding: R = sum of ranks
    np.testing.assert_array_equal(mx.expert_ids(ranks), [0, 1, 1, 1, 2, 2, 3])
    x, g = _rand(4, 9, m), _gates(5, (9,), 4, 2)
    np.testing.assert_allclose(mx.mixture_delta(x, a, b, g, ranks=rk, scale=2.0),
                               _ref_delta(x, a_list, b_list, g, 2.0), rtol=1e-5, atol=1e-5)
    for (ai, bi), (ar, br) in zip(mx.unpack_experts(a, b, rk), zip(a_list, b_list)):
        np.testing.assert_array_equal(ai, ar)
        np.testing.assert_array_equal(bi, br)
    # stacked -> packed round trip
    ast, bst = _rand(6, 3, m, 2), _rand(7, 3, 2, n)
    ap, bp, rk2 = mx.pack_experts(ast, bst)
    assert rk2 == (2, 2, 2)
    np.testing.assert_array_equal(mx.unpack_experts(ap, bp, rk2)[1][0], ast[1])
    g3 = _gates(8, (4,), 3, 2)
    xx = _rand(9, 4, m)
    np.testing.assert_allclose(mx.mixture_delta(xx, ap, bp, g3, ranks=rk2), mx.mixture_delta(xx, ast, bst, g3),
                               rtol=1e-6, atol=1e-6)


def test_mixture_bfloat16_rounds_once():
    e, m, n, r = 3, 8, 4, 2
    x = jnp.asarray(_rand(0, 5, m), jnp.bfloat16)
    a, b = jnp.asarray(_rand(1, e, m, r), jnp.bfloat16), jnp.asarray(_rand(2, e, r, n), jnp.bfloat16)
    g = _gates(3, (5,), e, 2)
    y = mx.mixture_delta(x, a, b, g)
    assert y.dtype == jnp.bfloat16
    ref = _ref_delta(np.asarray(x, np.float32), np.asarray(a, np.float32), np.asarray(b, np.float32), g)
    # computed in float32 and rounded once: within half a bfloat16 ulp (2^-8 relative) of the exact value
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2 ** -8, atol=1e-6)
    assert mx.mixture_delta(x, a.astype(jnp.float32), b, g).dtype == jnp.float32


def test_mixture_jit_grad_vmap():
    e, m, n, r = 3, 5, 4, 2
    x, a, b, c = _rand(0, 6, m), _rand(1, e, m, r), _rand(2, e, r, n), _rand(3, 6, n)
    g = _gates(4, (6,), e, 2)
    f = lambda a, b, x, g: mx.mixture_delta(x, a, b, g, scale=1.5)  # noqa: E731
    np.testing.assert_allclose(jax.jit(f)(a, b, x, g), f(a, b, x, g), rtol=1e-6, atol=1e-6)
    ga, gb = jax.grad(lambda a, b: jnp.sum(f(a, b, x, g) * c), argnums=(0, 1))(a, b)
    x64, c64, g64 = (np.asarray(v, np.float64) for v in (x, c, g))
    for i in range(e):  # d/da_e = s x^T (g_e * c) b_e^T ; d/db_e = s (x a_e)^T (g_e * c)
        gc = g64[:, i:i + 1] * c64
        np.testing.assert_allclose(ga[i], 1.5 * x64.T @ gc @ np.asarray(b[i], np.float64).T, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(gb[i], 1.5 * (x64 @ np.asarray(a[i], np.float64)).T @ gc, rtol=1e-4, atol=1e-5)
    yv = jax.vmap(lambda xi, gi: mx.mixture_delta(xi, a, b, gi))(x, g)
    np.testing.assert_allclose(yv, mx.mixture_delta(x, a, b, g), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------ routers
def test_router_logits_probs_topk_float64():
    x, w, bias = _rand(0, 4, 6), _rand(1, 6, 5), _rand(2, 5)
    z = mx.router_logits(x, w, bias)
    z64 = np.asarray(x, np.float64) @ np.asarray(w, np.float64) + bias
    np.testing.assert_allclose(z, z64, rtol=1e-5, atol=1e-5)
    p = mx.router_probs(z, temperature=2.0)
    p64 = np.exp(z64 / 2) / np.exp(z64 / 2).sum(-1, keepdims=True)
    np.testing.assert_allclose(p, p64, rtol=1e-5, atol=1e-6)
    g, idx = mx.topk_gates(z, 2, temperature=2.0)
    top = np.argsort(-z64, axis=-1)[:, :2]
    np.testing.assert_array_equal(idx, top)
    want = np.zeros_like(p64)
    sel = np.take_along_axis(p64, top, -1)
    np.put_along_axis(want, top, sel / sel.sum(-1, keepdims=True), -1)
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.sum(g, -1), 1.0, rtol=1e-6)
    g2, _ = mx.topk_gates(z, 2, renormalize=False, temperature=2.0)
    want2 = np.zeros_like(p64)
    np.put_along_axis(want2, top, sel, -1)
    np.testing.assert_allclose(g2, want2, rtol=1e-5, atol=1e-6)
    # the soft router is trained through its gates: the gradient reaches the logits of the active experts
    dz = jax.grad(lambda z: jnp.sum(mx.topk_gates(z, 2)[0] * jnp.arange(5.0)))(z)
    assert np.all(np.take_along_axis(np.asarray(dz), top, -1) != 0)
    assert np.count_nonzero(dz) == 8


def _set_probs64(z, k):
    """float64 probability of every k-subset under sequential sampling without replacement."""
    p = np.exp(z - z.max())
    p = p / p.sum()
    out = {}
    for subset in itertools.combinations(range(len(z)), k):
        tot = 0.0
        for perm in itertools.permutations(subset):
            q, rem = 1.0, 1.0
            for i in perm:
                q *= p[i] / rem
                rem -= p[i]
            tot += q
        out[subset] = tot
    return out


_slp = jax.jit(mx.subset_log_prob, static_argnames="ordered")  # one compile instead of many eager ops


def test_subset_log_prob_float64_and_sums_to_one():
    z = np.array([0.3, -1.0, 2.0, 0.5, 0.0], np.float32)
    ref = _set_probs64(z.astype(np.float64), 3)
    combos = np.array(list(ref), np.int32)
    lp = _slp(jnp.broadcast_to(z, (len(combos), 5)), combos)
    np.testing.assert_allclose(np.exp(lp), list(ref.values()), rtol=1e-5)
    assert abs(float(np.exp(lp).sum()) - 1.0) < 1e-5
    perms = np.array(list(itertools.permutations(range(5), 3)), np.int32)
    lpo = _slp(jnp.broadcast_to(z, (len(perms), 5)), perms, ordered=True)
    assert abs(float(np.exp(lpo).sum()) - 1.0) < 1e-5
    p = np.exp(z.astype(np.float64)) / np.exp(z.astype(np.float64)).sum()
    i, j, k = perms[7]
    np.testing.assert_allclose(np.exp(lpo[7]), p[i] * p[j] / (1 - p[i]) * p[k] / (1 - p[i] - p[j]), rtol=1e-5)
    # the set probability does not depend on the order the experts are listed in
    np.testing.assert_allclose(_slp(z, np.array([3, 0, 2])), _slp(z, np.array([0, 2, 3])), rtol=1e-6)
    # peaked logits: masked log-sum-exp, no log(1 - sum p) cancellation
    zp = jnp.array([30.0, 0.0, -5.0, 1.0])
    lp2 = _slp(zp, jnp.array([0, 3]), ordered=True)  # naive log(1 - p_0) is log(0) in float32
    want = (30.0 - np.logaddexp.reduce([30.0, 0.0, -5.0, 1.0])) + (1.0 - np.logaddexp.reduce([0.0, -5.0, 1.0]))
    np.testing.assert_allclose(lp2, want, rtol=1e-5)


def test_sample_subset_matches_plackett_luce_frequencies():
    z = np.array([1.0, 0.0, -0.5, 0.7], np.float32)
    n = 20000
    idx = np.asarray(mx.sample_subset(jax.random.key(0), jnp.broadcast_to(z, (n, 4)), 2))
    assert idx.shape == (n, 2) and idx.dtype == np.int32
    assert np.all(idx[:, 0] != idx[:, 1])
    ref = _set_probs64(z.astype(np.float64), 2)
    got = {s: 0 for s in ref}
    for row in np.sort(idx, axis=1):
        got[tuple(row)] += 1
    for s, p in ref.items():
        assert abs(got[s] / n - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-3, (s, got[s] / n, p)
    # first draw is distributed as pi (ordered / sequential sampling)
    p = np.exp(z) / np.exp(z).sum()
    first = np.bincount(idx[:, 0], minlength=4) / n
    np.testing.assert_allclose(first, p, atol=5 * np.sqrt(p * (1 - p) / n).max())


def test_remix_gates_train_and_inference():
    z = jnp.asarray(_rand(0, 6, 5))
    rt = jax.jit(mx.remix_gates, static_argnums=2)(jax.random.key(1), z, 2)
    np.testing.assert_allclose(np.sum(rt.gates, -1), 1.0)  # omega = 1/k by default
    assert set(np.unique(np.asarray(rt.gates))) <= {0.0, 0.5}
    np.testing.assert_array_equal(np.sort(np.nonzero(np.asarray(rt.gates))[1].reshape(6, 2), 1), np.sort(rt.idx, 1))
    np.testing.assert_allclose(rt.log_prob, _slp(z, rt.idx), rtol=1e-6)
    inf = mx.remix_gates(None, z, 2, omega=1.0)
    np.testing.assert_array_equal(np.sort(inf.idx, 1), np.sort(np.argsort(-np.asarray(z), 1)[:, :2], 1))
    np.testing.assert_array_equal(inf.log_prob, 0.0)
    assert float(jnp.sum(inf.gates)) == 12.0
    # the output does not depend on the router through the gates: gradient only through log_prob
    dz = jax.jit(jax.grad(lambda z: jnp.sum(mx.remix_gates(jax.random.key(1), z, 2).gates)))(z)
    np.testing.assert_array_equal(dz, 0.0)
    np.testing.assert_array_equal(mx.subset_gates(jnp.array([[0, 3]]), 4, 0.25), [[0.25, 0, 0, 0.25]])


# ---------------------------------------------------------------------------------------- RLOO
def test_rloo_advantages_and_surrogate_value():
    losses = jnp.asarray(_rand(0, 4, 3))
    adv = mx.rloo_advantages(losses)
    l64 = np.asarray(losses, np.float64)
    for mi in range(4):
        others = np.delete(l64, mi, axis=0).mean(0)
        np.testing.assert_allclose(adv[mi], l64[mi] - others, rtol=1e-5, atol=1e-6)
    lp = jnp.asarray(_rand(1, 4, 3))
    np.testing.assert_allclose(mx.rloo_surrogate(losses, lp), l64.mean(), rtol=1e-6)  # value = the mean loss
    g = jax.grad(lambda lp: mx.rloo_surrogate(losses, lp))(lp)
    np.testing.assert_allclose(g, np.asarray(adv) / 12, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("ordered", [False, True])
def test_rloo_estimator_is_unbiased_on_a_toy_router(ordered):
    """E=4 experts, k=2, S=4 subsets per input, loss f(S) a fixed table: E_S[f] has the closed form
    sum_S P(S) f(S); its exact float64 gradient (central differences) must equal the Monte Carlo mean
    of the RLOO surrogate's gradient within 4.5 standard errors."""
    e, k, s, n_keys = 4, 2, 4, 3000
    theta = np.array([0.4, -0.3, 0.9, 0.0])
    subsets = list(itertools.combinations(range(e), k))
    f = dict(zip(subsets, [1.0, 3.0, -0.5, 2.0, 0.2, 1.5]))

    def expected(t):
        return sum(p * f[q] for q, p in _set_probs64(t, k).items())

    h = 1e-5
    exact = np.array([(expected(theta + h * np.eye(e)[i]) - expected(theta - h * np.eye(e)[i])) / (2 * h)
                      for i in range(e)])
    table = np.zeros((e, e), np.float32)
    for (i, j), v in f.items():
        table[i, j] = table[j, i] = v
    table = jnp.asarray(table)

    def estimate(key, t):
        z = jnp.broadcast_to(t, (s, e))
        idx = mx.sample_subset(key, z, k)
        losses = table[idx[:, 0], idx[:, 1]]
        return jax.grad(lambda t: mx.rloo_surrogate(losses[:, None], mx.subset_log_prob(
            jnp.broadcast_to(t, (s, e)), idx, ordered=ordered)[:, None]))(t)

    g = jax.jit(jax.vmap(estimate, in_axes=(0, None)))(jax.random.split(jax.random.key(0), n_keys),
                                                        jnp.asarray(theta, jnp.float32))
    g = np.asarray(g, np.float64)
    mean, se = g.mean(0), g.std(0) / math.sqrt(n_keys)
    assert np.all(np.abs(mean - exact) < 4.5 * se + 1e-3), (mean, exact, se)
    assert np.linalg.norm(exact) > 10 * np.linalg.norm(se)  # the test has power: the gradient is well resolved


# ---------------------------------------------------------------------------- effective support
def test_effective_support_definitions():
    p = np.array([[0.5, 0.5, 0, 0], [1, 0, 0, 0], [0.25] * 4, [0, 0, 0, 0]], np.float32)
    for kind in ("entropy", "simpson", "threshold"):
        np.testing.assert_allclose(mx.effective_support(p, kind=kind), [2, 1, 4, 0], rtol=1e-6)
    q = np.random.default_rng(0).dirichlet(np.ones(6) * 0.5, size=20)
    ent = np.asarray(mx.effective_support(q.astype(np.float32)))
    simp = np.asarray(mx.effective_support(q.astype(np.float32), kind="simpson"))
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.nansum(np.where(q > 0, q * np.log(q), 0), 1)
    np.testing.assert_allclose(ent, np.exp(h), rtol=1e-5)
    np.testing.assert_allclose(simp, 1 / np.sum(q ** 2, 1), rtol=1e-5)
    assert np.all(ent >= simp - 1e-5) and np.all(simp >= 1 - 1e-6) and np.all(ent <= 6 + 1e-5)
    np.testing.assert_array_equal(mx.effective_support(q.astype(np.float32), kind="threshold", threshold=0.1),
                                  np.sum(q > 0.1, 1))
    # un-normalized gates are normalized first
    np.testing.assert_allclose(mx.effective_support(np.array([0.3, 0.3, 0.0], np.float32)), 2.0, rtol=1e-6)
    assert mx.effective_support(jnp.asarray(p, jnp.bfloat16)).dtype == jnp.float32


def test_mixture_branch_composes_router_gates_and_delta():
    x, wr, a, b = _rand(0, 5, 6), _rand(1, 6, 4), _rand(2, 4, 6, 2), _rand(3, 4, 2, 3)
    d, rt = mx.mixture_branch(x, wr, a, b, k=2, scale=0.5)
    g, idx = mx.topk_gates(mx.router_logits(x, wr), 2)
    np.testing.assert_allclose(rt.gates, g, rtol=1e-6)
    np.testing.assert_allclose(d, _ref_delta(x, a, b, g, 0.5), rtol=1e-5, atol=1e-5)
    d2, rt2 = mx.mixture_branch(x, wr, a, b, k=2, router="remix", key=jax.random.key(0))
    np.testing.assert_allclose(d2, _ref_delta(x, a, b, rt2.gates), rtol=1e-5, atol=1e-5)
    assert rt2.log_prob.shape == (5,) and np.all(np.asarray(rt2.log_prob) < 0)
    with pytest.raises(ValueError, match="router"):
        mx.mixture_branch(x, wr, a, b, k=2, router="soft")


# ----------------------------------------------------------------------------------- NNX layer
@pytest.mark.parametrize("router", ["topk", "remix"])
def test_mixture_layer_composes_base_router_experts(router):
    m, n, ranks = 6, 5, (1, 2, 2, 3)
    w0, b0 = _rand(0, m, n), _rand(1, n)
    layer = mx.MixtureLoRA(m, n, num_experts=4, rank=ranks, k=2, router=router, scale=0.5, base_kernel=w0,
                           base_bias=b0, rngs=nnx.Rngs(0))
    x = _rand(2, 3, 4, m)
    np.testing.assert_allclose(layer(x), x @ w0 + b0, rtol=1e-5, atol=1e-5)  # b = 0 at init: the base
    layer.b[...] = jnp.asarray(_rand(3, 8, n))
    y, rt = layer(x, key=jax.random.key(5), return_aux=True)
    a_list = [np.asarray(p[0]) for p in mx.unpack_experts(layer.a[...], layer.b[...], ranks)]
    b_list = [np.asarray(p[1]) for p in mx.unpack_experts(layer.a[...], layer.b[...], ranks)]
    ref = np.asarray(x, np.float64) @ w0 + b0 + _ref_delta(x, a_list, b_list, rt.gates, 0.5)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    z = mx.router_logits(x, layer.router[...])
    if router == "topk":
        np.testing.assert_allclose(rt.gates, mx.topk_gates(z, 2)[0], rtol=1e-6)
    else:
        np.testing.assert_allclose(np.sum(rt.gates, -1), 1.0)
        y_inf, rt_inf = layer(x, return_aux=True)
        np.testing.assert_array_equal(rt_inf.gates, mx.remix_gates(None, z, 2).gates)
    # nnx.grad differentiates the Params (router, a, b), never the frozen base
    grads = nnx.jit(nnx.grad(lambda mdl: jnp.sum(mdl(x) ** 2)))(layer)
    names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(grads)}
    assert names == {"router", "a", "b"}
    y_jit = nnx.jit(lambda mdl, x: mdl(x))(layer, x)
    np.testing.assert_allclose(y_jit, layer(x), rtol=1e-5, atol=1e-5)


def test_mixture_layer_bfloat16_and_remix_training_step():
    layer = mx.MixtureLoRA(8, 4, num_experts=4, rank=2, k=2, router="remix", param_dtype=jnp.bfloat16,
                           rngs=nnx.Rngs(1))
    x = jnp.asarray(_rand(0, 6, 8), jnp.bfloat16)
    assert layer(x).dtype == jnp.bfloat16
    t = jnp.asarray(_rand(1, 6, 4))

    def loss(mdl, keys):
        def one(key):
            y, rt = mdl(x, key=key, return_aux=True)
            return jnp.mean((y.astype(jnp.float32) - t) ** 2, -1), rt.log_prob
        losses, lps = jax.vmap(one)(keys)
        return mx.rloo_surrogate(losses, lps)

    g = nnx.jit(nnx.grad(loss))(layer, jax.random.split(jax.random.key(0), 4))
    flat = dict(nnx.to_flat_state(g))
    assert all(np.all(np.isfinite(np.asarray(v[...], np.float32))) for v in flat.values())
    assert float(jnp.max(jnp.abs(flat[("router",)][...]))) > 0  # RLOO reaches the router


# ------------------------------------------------------------------------------------ bad input
def test_bad_input_names_the_argument():
    z, x = jnp.zeros((3, 4)), jnp.zeros((3, 5))
    a, b, g = jnp.zeros((4, 5, 2)), jnp.zeros((4, 2, 6)), jnp.zeros((3, 4))
    with pytest.raises(ValueError, match="k=5 exceeds"):
        mx.topk_gates(z, 5)
    with pytest.raises(ValueError, match="k must be"):
        mx.topk_gates(z, 0)
    with pytest.raises(TypeError, match="k must be"):
        mx.sample_subset(jax.random.key(0), z, 2.0)
    with pytest.raises(ValueError, match="expert axis mismatch"):
        mx.mixture_delta(x, a, jnp.zeros((3, 2, 6)), g)
    with pytest.raises(ValueError, match="ranks mismatch"):
        mx.mixture_delta(x, a, jnp.zeros((4, 3, 6)), g)
    with pytest.raises(ValueError, match="gates must have E = 4"):
        mx.mixture_delta(x, a, b, jnp.zeros((3, 5)))
    with pytest.raises(ValueError, match="gates must have shape"):
        mx.mixture_delta(x, a, b, jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="x: "):
        mx.mixture_delta(jnp.zeros((3, 7)), a, b, g)
    with pytest.raises(ValueError, match="ranks=.*sum to"):
        mx.mixture_delta(x, jnp.zeros((5, 8)), jnp.zeros((8, 6)), g, ranks=(2, 2, 2, 1))
    with pytest.raises(TypeError, match="ranks must be a tuple"):
        mx.mixture_delta(x, jnp.zeros((5, 8)), jnp.zeros((8, 6)), g, ranks=8)
    with pytest.raises(ValueError, match=r"ranks\[1\]"):
        mx.mixture_delta(x, jnp.zeros((5, 8)), jnp.zeros((8, 6)), g, ranks=(8, 0, 0, 0))
    with pytest.raises(TypeError, match="gates"):
        mx.mixture_delta(x, a, b, jnp.zeros((3, 4), jnp.int32))
    with pytest.raises(ValueError, match="gates contains NaN"):
        mx.mixture_delta(x, a, b, jnp.full((3, 4), jnp.nan))
    for t in (float("inf"), float("nan"), 0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            mx.router_probs(z, temperature=t)
    with pytest.raises(ValueError, match="temperature"):
        mx.remix_gates(jax.random.key(0), z, 2, temperature=float("inf"))
    with pytest.raises(ValueError, match="omega"):
        mx.remix_gates(None, z, 2, omega=-1.0)
    with pytest.raises(ValueError, match="idx repeats"):
        mx.subset_log_prob(z, jnp.array([[1, 1]] * 3))
    with pytest.raises(ValueError, match="idx holds expert indices outside"):
        mx.subset_log_prob(z, jnp.array([[0, 4]] * 3))
    with pytest.raises(ValueError, match="idx must have shape"):
        mx.subset_log_prob(z, jnp.array([[0, 1]] * 2))
    with pytest.raises(ValueError, match="MAX_UNORDERED_K"):
        mx.subset_log_prob(jnp.zeros(8), jnp.arange(7))
    with pytest.raises(TypeError, match="key"):
        mx.sample_subset(0, z, 2)
    with pytest.raises(ValueError, match="losses must have S >= 2"):
        mx.rloo_surrogate(jnp.zeros((1, 3)), jnp.zeros((1, 3)))
    with pytest.raises(ValueError, match="losses and log_probs"):
        mx.rloo_surrogate(jnp.zeros((4, 3)), jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="kind"):
        mx.effective_support(g, kind="gini")
    with pytest.raises(ValueError, match="threshold"):
        mx.effective_support(g, kind="threshold", threshold=1.0)
    with pytest.raises(ValueError, match="probs has negative"):
        mx.effective_support(-jnp.ones(3))
    with pytest.raises(ValueError, match="w_router"):
        mx.router_logits(x, jnp.zeros((4, 4)))
    with pytest.raises(ValueError, match="ranks mismatch"):
        mx.pack_experts([jnp.zeros((5, 2))], [jnp.zeros((3, 6))])
    with pytest.raises(ValueError, match="same number"):
        mx.pack_experts([jnp.zeros((5, 2))], [])
    with pytest.raises(ValueError, match="k=3 exceeds"):
        mx.MixtureLoRA(5, 6, num_experts=2, rank=2, k=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="router"):
        mx.MixtureLoRA(5, 6, router="soft", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rank lists 2 ranks"):
        mx.MixtureLoRA(5, 6, num_experts=4, rank=(1, 2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rank=9 exceeds"):
        mx.MixtureLoRA(5, 6, rank=9, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="base_kernel"):
        mx.MixtureLoRA(5, 6, base_kernel=jnp.zeros((6, 5)), rngs=nnx.Rngs(0))
    layer = mx.MixtureLoRA(5, 6, num_experts=4, rank=1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="in_features"):
        layer(jnp.zeros((2, 4)))
