"""SLTrain (sparse plus low-rank pretraining): lrjax/nn/sltrain.py and lrjax/reparam/sltrain.py.

References: float64 NumPy transcriptions of W = s a b + S (S = values scattered at the fixed support,
row-major over the [in, out] kernel), of the paper's backward (G_W = x^T dy, da = s G_W b^T,
db = s a^T G_W, d values = G_W.flat[idx]) and of the paper's Table 2 parameter counts."""
from __future__ import annotations

import contextlib
import io
import math
import re

import flax
import flax.linen as nn
import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lrjax
from lrjax.nn import sltrain as S
from lrjax.reparam.sltrain import PureLowRank, SLTrain, is_placeholder


def _randn(seed, shape, dtype=jnp.float32):
    """Standard normal test data drawn by NumPy (eager jax.random compiles one program per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), dtype)


def _np_weight(a, b, values, idx, s):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    w = s * a @ b
    if values is not None:
        flat = w.reshape(-1)
        flat[np.asarray(idx)] += np.asarray(values, np.float64)
        w = flat.reshape(w.shape)
    return w


def _rand_factors(m=12, n=10, r=3, delta=0.1, seed=0):
    rng = np.random.default_rng(seed)
    idx = S.sparse_support(m, n, delta, seed)
    return (rng.normal(size=(m, r)).astype(np.float32), rng.normal(size=(r, n)).astype(np.float32),
            rng.normal(size=idx.shape).astype(np.float32), idx)


# ----------------------------------------------------------------- parameter counts
PAPER = {  # Table 2 of the paper (millions): full, low-rank, SLTrain
    "60M": (58, 43, 44), "130M": (134, 94, 97), "350M": (368, 185, 194), "1B": (1339, 609, 646)}


@pytest.mark.parametrize("size", list(PAPER))
def test_llama_param_counts_match_paper(size):
    c = S.SLTRAIN_LLAMA_CONFIGS[size]
    got = S.llama_param_counts(c["hidden"], c["ffn"], c["layers"], c["rank"], 0.03)
    half_up = {k: math.floor(v / 1e6 + 0.5) for k, v in got.items()}
    assert (half_up["full"], half_up["lowrank"], half_up["sltrain"]) == PAPER[size]
    # independent transcription of the count
    h, f, L, r = c["hidden"], c["ffn"], c["layers"], c["rank"]
    lin = [(h, h)] * 4 + [(h, f)] * 2 + [(f, h)]
    fixed = 2 * 32000 * h + 2 * h * L + h
    assert got["sltrain"] == fixed + L * sum(r * (i + o) + int(0.03 * i * o) for i, o in lin)


def test_num_params_formula_layer_and_reparam():
    assert S.sltrain_num_params(64, 48, 8, 0.03) == 8 * 112 + math.floor(0.03 * 64 * 48)
    assert S.sltrain_num_params(64, 48, 8, 0.03, bias=True) == 8 * 112 + 92 + 48
    assert S.lowrank_num_params(64, 48, 8) == 8 * 112
    layer = S.SLTrainLinear(64, 48, rank=8, rngs=nnx.Rngs(0))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(layer, nnx.Param)))
    assert n == S.sltrain_num_params(64, 48, 8, bias=True)
    lr = S.LowRankLinear(64, 48, rank=8, use_bias=False, rngs=nnx.Rngs(0))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(lr, nnx.Param))) == 8 * 112
    rp = SLTrain(rank=4, delta=0.05, targets="kernel")
    _, ad = rp.init(jax.random.key(0), {"l1": {"kernel": jnp.ones((20, 30))}, "l2": {"kernel": jnp.ones((30, 7))}})
    assert rp.num_params(ad) == S.sltrain_num_params(20, 30, 4, 0.05) + S.sltrain_num_params(30, 7, 4, 0.05)


# ----------------------------------------------------------------- support
def test_support_fixed_sorted_regenerable():
    idx = S.sparse_support(40, 30, 0.03, 7)
    assert idx.dtype == np.int32 and idx.shape == (math.floor(0.03 * 1200),)
    assert np.all(np.diff(idx) > 0) and idx[0] >= 0 and idx[-1] < 1200  # sorted, distinct, in range
    np.testing.assert_array_equal(idx, S.sparse_support(40, 30, 0.03, 7))
    assert not np.array_equal(idx, S.sparse_support(40, 30, 0.03, 8))
    assert S.nnz_count(512, 512, 0.03) == 7864  # int(0.03 * 512 * 512)
    rp = SLTrain(rank=2, seed=3)
    sup = rp.support("stack/kernel", (3,), 20, 10)
    assert sup.shape == (3, 6) and not np.array_equal(sup[0], sup[1])  # one support per layer
    np.testing.assert_array_equal(sup, SLTrain(rank=2, seed=3).support("stack/kernel", (3,), 20, 10))


# ----------------------------------------------------------------- pure math vs float64
def test_weight_and_matmul_match_numpy():
    a, b, v, idx = _rand_factors()
    s = 0.7
    ref = _np_weight(a, b, v, idx, s)
    np.testing.assert_allclose(S.sltrain_weight(a, b, v, idx, s), ref, rtol=1e-5, atol=1e-5)
    x = np.random.default_rng(1).normal(size=(5, 12)).astype(np.float32)
    bias = np.arange(10, dtype=np.float32)
    y = S.sltrain_matmul(jnp.asarray(x), a, b, v, idx, s, jnp.asarray(bias))
    np.testing.assert_allclose(y, x.astype(np.float64) @ ref + bias, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(S.sltrain_weight(a, b, None, None, s), _np_weight(a, b, None, None, s),
                               rtol=1e-5, atol=1e-5)


def test_init_w_equals_s():
    layer = S.SLTrainLinear(16, 12, rank=4, delta=0.1, seed=5, rngs=nnx.Rngs(0))
    assert not np.any(np.asarray(layer.b[...]))
    w = np.zeros(16 * 12)
    w[np.asarray(layer.support[...])] = np.asarray(layer.values[...], np.float64)
    np.testing.assert_array_equal(np.asarray(layer.weight()), w.reshape(16, 12).astype(np.float32))
    bound = 1 / math.sqrt(16)
    assert np.abs(layer.a[...]).max() <= bound and np.abs(layer.values[...]).max() <= bound
    np.testing.assert_array_equal(layer.support[...], S.sparse_support(16, 12, 0.1, 5))


def test_grad_identities_vs_numpy():
    a, b, v, idx = _rand_factors(seed=2)
    s = 0.5
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 12)).astype(np.float32)
    dy = rng.normal(size=(6, 10)).astype(np.float32)
    loss = lambda a, b, v, x: jnp.sum(S.sltrain_matmul(x, a, b, v, idx, s) * dy)  # noqa: E731
    ga, gb, gv, gx = jax.grad(loss, argnums=(0, 1, 2, 3))(a, b, v, x)
    G = x.astype(np.float64).T @ dy  # G_W = x^T dy
    W = _np_weight(a, b, v, idx, s)
    np.testing.assert_allclose(ga, s * G @ b.T.astype(np.float64), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gb, s * a.T.astype(np.float64) @ G, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gv, G.reshape(-1)[idx], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gx, dy.astype(np.float64) @ W.T, rtol=1e-4, atol=1e-4)


def _residual_shapes(f, *args):
    """Shapes of the values the forward of ``f`` computes and saves for its backward (from
    ``print_saved_residuals``; the arguments and constants it saves are left out)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        jax.ad_checkpoint.print_saved_residuals(f, *args)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    assert lines  # the printer reported something
    out = []
    for ln in lines:
        if "from the argument" in ln or "from a constant" in ln:
            continue
        m = re.match(r"\s*\w+\[([\d,]*)\]", ln)
        assert m, ln
        out.append(tuple(int(d) for d in m.group(1).split(",") if d))
    return out


def _mlp(p, x):
    return jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"]) @ p["l2"]["kernel"]


def _mlp_setup(rp_cls=SLTrain, dtype=jnp.float32, **kw):
    """A plain-dict 2-layer MLP (kernels [6, 10] and [10, 4]), the reparam and adapters with B != 0."""
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"l1": {"kernel": jax.random.normal(k1, (6, 10)), "bias": jnp.full((10,), 0.1)},
              "l2": {"kernel": jax.random.normal(k2, (10, 4))}}
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    rp = rp_cls(rank=2, targets="kernel", **kw)
    base, ad = rp.init(jax.random.key(1), params)
    ad = {p: {**f, "b": (f["b"] + 0.5).astype(f["b"].dtype)} for p, f in ad.items()}  # make s a b matter
    x = _randn(3, (5, 6)).astype(dtype)
    return rp, params, base, ad, x


def test_dense_w_not_stored_between_forward_and_backward():
    a, b, v, idx = _rand_factors(m=24, n=20, seed=4)
    x = jnp.ones((7, 24))
    f = lambda a, b, v, x: S.sltrain_matmul(x, a, b, v, idx, 0.5).sum()  # noqa: E731
    shapes = _residual_shapes(f, a, b, v, x)
    assert (24, 20) not in shapes and (480,) not in shapes
    # control: without the checkpoint the forward saves the dense W for dx = dy W^T
    g = lambda a, b, v, x: (x @ S.sltrain_weight(a, b, v, idx, 0.5)).sum()  # noqa: E731
    assert (24, 20) in _residual_shapes(g, a, b, v, x)
    # the same through the reparameterization and lrjax.factored
    rp, _, base, ad, x = _mlp_setup(delta=0.2)
    g = lrjax.factored(_mlp, rp)
    shapes = _residual_shapes(lambda ad: g(base, ad, x).sum(), ad)
    assert (6, 10) not in shapes and (10, 4) not in shapes and (60,) not in shapes


def test_reparam_factored_equals_dense_numpy():
    rp, params, base, ad, x = _mlp_setup(delta=0.2, seed=5)
    assert all(is_placeholder(lrjax.tree.get(base, p)) and lrjax.tree.get(base, p).size == 0 for p in ad)
    assert lrjax.tree.get(base, "l1/bias") is params["l1"]["bias"]  # untargeted leaves untouched
    merged = rp.merge(base, ad)
    ws = {}
    for p, f in ad.items():
        w = lrjax.tree.get(merged, p)
        ws[p] = ref = _np_weight(f["a"], f["b"], f["values"], rp.support(p, (), *w.shape), rp.scale)
        np.testing.assert_allclose(w, ref, rtol=1e-5, atol=1e-5)
    xr = np.asarray(x, np.float64)
    y_ref = np.tanh(xr @ ws["l1/kernel"] + 0.1) @ ws["l2/kernel"]
    g = jax.jit(lrjax.factored(_mlp, rp))
    np.testing.assert_allclose(g(base, ad, x), y_ref, rtol=1e-4, atol=1e-5)
    # a base that still holds the full-size kernels gives the same (their values are ignored)
    np.testing.assert_allclose(g(params, ad, x), y_ref, rtol=1e-4, atol=1e-5)
    assert _mlp(base, x).shape != y_ref.shape  # the placeholder base alone is not the model
    # vmap over inputs; unmerge gives the placeholder base back
    np.testing.assert_allclose(jax.vmap(lambda xi: g(base, ad, xi))(x[:, None]), y_ref[:, None], rtol=1e-4,
                               atol=1e-5)
    assert all(is_placeholder(lrjax.tree.get(rp.unmerge(merged, ad), p)) for p in ad)


class _NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(6, 10, rngs=rngs)
        self.fc2 = nnx.Linear(10, 4, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jnp.tanh(self.fc1(x)))


def test_reparam_nnx_state():
    gd, state = nnx.split(_NNXMLP(nnx.Rngs(0)))
    apply = lambda st, x: nnx.merge(gd, st)(x)  # noqa: E731
    rp = SLTrain(rank=2, delta=0.2, targets="kernel")
    base, ad = rp.init(jax.random.key(0), state)
    assert sorted(ad) == ["fc1/kernel", "fc2/kernel"]
    ad = {p: {**f, "b": f["b"] + 0.2} for p, f in ad.items()}
    x = jnp.ones((3, 6))
    stats = lrjax.reparam.FactoredStats()
    y = jax.jit(lrjax.factored(apply, rp, stats=stats))(base, ad, x)
    assert stats.factored == len(ad) and not stats.fallback
    np.testing.assert_allclose(y, apply(rp.merge(base, ad), x), rtol=1e-5, atol=1e-5)


def test_reparam_init_b_zero_gives_s():
    rp = SLTrain(rank=2, delta=0.2, targets="kernel")
    params = {"Dense_0": {"kernel": jnp.ones((8, 6)), "bias": jnp.zeros(6)}}
    base, ad = rp.init(jax.random.key(0), params)
    f = ad["Dense_0/kernel"]
    assert not np.any(np.asarray(f["b"]))
    w = np.zeros(48)
    w[rp.support("Dense_0/kernel", (), 8, 6)] = np.asarray(f["values"])
    np.testing.assert_array_equal(rp.materialize(base, ad)["Dense_0"]["kernel"], w.reshape(8, 6))
    bound = 1 / math.sqrt(8)
    assert np.abs(f["a"]).max() <= bound and np.abs(f["values"]).max() <= bound and np.any(np.asarray(f["a"]))


def test_reparam_grads_and_support_not_trained():
    rp, _, base, ad, x = _mlp_setup(delta=0.2)
    g = lrjax.factored(_mlp, rp)
    loss = lambda base, ad: jnp.mean(g(base, ad, x) ** 2)  # noqa: E731
    dense_loss = lambda base, ad: jnp.mean(_mlp(rp.materialize(base, ad), x) ** 2)  # noqa: E731
    gb, ga = jax.jit(jax.grad(loss, argnums=(0, 1)))(base, ad)
    rb, ra = jax.jit(jax.grad(dense_loss, argnums=(0, 1)))(base, ad)
    tr, fr = rp.split(ad)
    for p in ad:
        assert set(ga[p]) == {"a", "b", "values"} == set(tr[p]) and fr[p] == {}  # no support anywhere
        for k in ga[p]:
            np.testing.assert_allclose(ga[p][k], ra[p][k], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gb["l1"]["bias"], rb["l1"]["bias"], rtol=1e-4, atol=1e-6)
    # optimizer steps on base and adapters: the nonzeros of W - s a b stay on the fixed support
    opt = optax.adam(1e-1)

    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda pr: loss(*pr))(params)
        upd, state = opt.update(grads, state, params)
        return optax.apply_updates(params, upd), state

    params = (base, ad)
    state = opt.init(params)
    for _ in range(2):
        params, state = step(params, state)
    base2, ad2 = params
    merged = rp.merge(base2, ad2)
    for p, f in ad2.items():
        w = np.asarray(lrjax.tree.get(merged, p), np.float64)
        sparse = w - _np_weight(f["a"], f["b"], None, None, rp.scale)
        off = np.ones(w.size, bool)
        off[rp.support(p, (), *w.shape)] = False
        assert np.abs(sparse.reshape(-1)[off]).max() < 1e-5
        assert not np.allclose(f["values"], ad[p]["values"])  # the values did train


def test_layer_support_not_in_optimizer():
    layer = S.SLTrainLinear(8, 6, rank=2, delta=0.2, rngs=nnx.Rngs(0))
    sup0 = np.asarray(layer.support[...])
    opt = nnx.Optimizer(layer, optax.sgd(0.1), wrt=nnx.Param)
    x = jnp.ones((4, 8))

    @nnx.jit
    def step(layer, opt):
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
        opt.update(layer, grads)

    step(layer, opt)
    np.testing.assert_array_equal(layer.support[...], sup0)
    assert not any(l.dtype == jnp.int32 for l in jax.tree.leaves(nnx.state(layer, nnx.Param)))
    assert np.any(np.asarray(layer.b[...]))  # B left zero after one step


def test_linen_params_and_scan_stack():
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(5)(nn.relu(nn.Dense(9)(x)))

    x = jnp.ones((3, 7))
    params = MLP().init(jax.random.key(0), x)
    rp = SLTrain(rank=2, delta=0.1, targets="kernel", seed=4)
    base, ad = rp.init(jax.random.key(1), params)
    ad = {p: {**f, "b": f["b"] + 0.3} for p, f in ad.items()}
    y = jax.jit(lrjax.factored(MLP().apply, rp))(base, ad, x)
    with pytest.raises(flax.errors.ScopeParamShapeError):  # a placeholder base alone fails loudly
        MLP().apply(base, x)
    np.testing.assert_allclose(y, MLP().apply(rp.materialize(base, ad), x), rtol=1e-5, atol=1e-5)

    # an [L, M, N] stack scanned with lax.scan (nn.scan layout); each layer has its own support
    def stack_fn(p, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["stack"])[0]

    params = {"stack": jnp.ones((3, 6, 6))}
    rp = SLTrain(rank=2, delta=0.2, targets="stack")
    base, ad = rp.init(jax.random.key(2), params)
    ad = {p: {**f, "b": f["b"] + 0.1} for p, f in ad.items()}
    stats = lrjax.reparam.FactoredStats()
    y = jax.jit(lrjax.factored(stack_fn, rp, stats=stats))(base, ad, jnp.ones((2, 6)))
    w = rp.materialize(base, ad)["stack"]
    f = ad["stack"]
    sup = rp.support("stack", (3,), 6, 6)
    for l in range(3):
        np.testing.assert_allclose(w[l], _np_weight(f["a"][l], f["b"][l], f["values"][l], sup[l], rp.scale),
                                   rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, stack_fn({"stack": w}, jnp.ones((2, 6))), rtol=1e-5, atol=1e-5)
    assert stats.factored >= 1 and not stats.fallback


def test_vmap_and_bfloat16():
    layer = S.SLTrainLinear(8, 6, rank=2, delta=0.2, rngs=nnx.Rngs(0))
    xs = _randn(0, (4, 3, 8))
    ys = jax.vmap(layer)(xs)
    np.testing.assert_allclose(ys, layer(xs), rtol=1e-6, atol=1e-6)
    lb = S.SLTrainLinear(8, 6, rank=2, delta=0.2, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    yb = lb(xs.astype(jnp.bfloat16))
    assert yb.dtype == jnp.bfloat16 and lb.weight().dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(yb, np.float32), np.asarray(layer(xs)), rtol=0.05, atol=0.05)
    # reparam on a bfloat16 model: weight computed in float32, rounded once to bfloat16
    rp, _, base, ad, x = _mlp_setup(dtype=jnp.bfloat16, delta=0.2)
    merged = rp.merge(base, ad)
    for p, f in ad.items():
        w = lrjax.tree.get(merged, p)
        assert w.dtype == jnp.bfloat16 and f["a"].dtype == jnp.bfloat16
        ref = _np_weight(np.asarray(f["a"], np.float32), np.asarray(f["b"], np.float32),
                         np.asarray(f["values"], np.float32), rp.support(p, (), *w.shape), rp.scale)
        once = np.asarray(jnp.asarray(ref, jnp.float32).astype(jnp.bfloat16), np.float32)
        np.testing.assert_array_equal(np.asarray(w, np.float32), once)
    y = jax.jit(lrjax.factored(_mlp, rp))(base, ad, x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(_mlp(merged, x), np.float32), atol=0.1)


def test_pure_lowrank_arm():
    lr = S.LowRankLinear(64, 48, rank=8, alpha=16.0, use_bias=False, rngs=nnx.Rngs(0))
    assert np.any(np.asarray(lr.a[...])) and np.any(np.asarray(lr.b[...]))  # both factors nonzero
    w = np.asarray(lr.weight(), np.float64)
    assert 0.5 < w.var() * 3 * 64 < 2.0  # entry variance ~ 1/(3 d_in), like a kaiming-uniform dense kernel
    x = jnp.ones((2, 64))
    np.testing.assert_allclose(lr(x), np.ones((2, 64)) @ _np_weight(lr.a[...], lr.b[...], None, None, 2.0),
                               rtol=1e-4, atol=1e-4)
    rp, _, base, ad, x = _mlp_setup(PureLowRank)
    assert all(set(f) == {"a", "b"} for f in ad.values())
    _, ad0 = rp.init(jax.random.key(1), {"kernel": jnp.ones((6, 10))})
    assert np.all(np.asarray(ad0["kernel"]["b"]) != 0)
    merged = rp.merge(base, ad)
    for p, f in ad.items():
        np.testing.assert_allclose(lrjax.tree.get(merged, p), _np_weight(f["a"], f["b"], None, None, rp.scale),
                                   rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(lrjax.factored(_mlp, rp))(base, ad, x), _mlp(merged, x), rtol=1e-5,
                               atol=1e-5)
    assert rp.num_params(ad) == S.lowrank_num_params(6, 10, 2) + S.lowrank_num_params(10, 4, 2)


# ----------------------------------------------------------------- bad input
@pytest.mark.parametrize("delta", [0.0, 1.0, -0.1, 1.5])
def test_bad_delta_value(delta):
    with pytest.raises(ValueError, match="delta"):
        SLTrain(rank=2, delta=delta)
    with pytest.raises(ValueError, match="delta"):
        S.SLTrainLinear(8, 8, rank=2, delta=delta, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="delta"):
        S.sparse_support(8, 8, delta)


def test_bad_input_kinds_and_values():
    with pytest.raises(TypeError, match="delta"):
        SLTrain(rank=2, delta="0.03")
    with pytest.raises(TypeError, match="rank"):
        SLTrain(rank=2.0)
    with pytest.raises(TypeError, match="rank"):
        S.SLTrainLinear(8, 8, rank=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rank"):
        S.SLTrainLinear(8, 6, rank=7, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="use_bias"):
        S.SLTrainLinear(8, 6, rank=2, use_bias=1, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="in_features"):
        S.LowRankLinear(True, 6, rank=2, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="seed"):
        SLTrain(rank=2, seed=True)
    with pytest.raises(ValueError, match="seed"):
        SLTrain(rank=2, seed=-1)
    with pytest.raises(TypeError, match="rngs"):
        S.SLTrainLinear(8, 6, rank=2, rngs=0)
    with pytest.raises(TypeError, match="seed"):  # abstract init needs an explicit support seed
        nnx.eval_shape(lambda: S.SLTrainLinear(8, 6, rank=2, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match="seed"):
        S.sparse_support(8, 6, 0.2, seed=1.5)
    with pytest.raises(ValueError, match="x must"):
        S.SLTrainLinear(8, 6, rank=2, rngs=nnx.Rngs(0))(jnp.ones((2, 5)))
    params = {"Dense_0": {"kernel": jnp.ones((8, 6))}}
    with pytest.raises(ValueError, match="rank"):
        SLTrain(rank=7).init(jax.random.key(0), params)
    with pytest.raises(ValueError, match="delta"):  # floor(delta * 48) = 0 for this leaf
        SLTrain(rank=2, delta=0.01).init(jax.random.key(0), params)
    with pytest.raises(ValueError, match="grads"):
        SLTrain(rank=2).init(jax.random.key(0), params, grads={"Dense_0/kernel": jnp.ones((8, 6))})
    base, ad = SLTrain(rank=2, delta=0.2).init(jax.random.key(0), params)
    with pytest.raises(ValueError, match="values"):  # adapters of another delta
        SLTrain(rank=2, delta=0.3).materialize(base, ad)
    with pytest.raises(ValueError, match="rank"):
        SLTrain(rank=3, delta=0.2).materialize(base, ad)
    bad = {"Dense_0/kernel": {**ad["Dense_0/kernel"], "values": ad["Dense_0/kernel"]["values"] * jnp.nan}}
    with pytest.raises(ValueError, match="NaN"):
        SLTrain(rank=2, delta=0.2).merge(base, bad)


def test_bad_x_idx_and_args_of_pure_functions():
    layer = S.SLTrainLinear(4, 3, rank=2, delta=0.5, seed=0, rngs=nnx.Rngs(0))
    lr = S.LowRankLinear(4, 3, rank=2, rngs=nnx.Rngs(0))
    a, b, v = jnp.ones((4, 2)), jnp.ones((2, 3)), jnp.ones(3)
    for f in (layer, lr, lambda x: S.sltrain_matmul(x, a, b, v, np.array([0, 1, 2]), 1.0)):
        with pytest.raises(TypeError, match="x must be a floating-point.*astype"):  # was all zeros
            f(jnp.ones((2, 4), jnp.int32))
        with pytest.raises(TypeError, match="x must.*jnp.asarray"):
            f([[1.0, 2.0, 3.0, 4.0]])
    bad_idx = [(np.array([0, 0, 5]), ValueError, "idx must be strictly increasing"),  # duplicates were summed
               (np.array([2, 1, 5]), ValueError, "idx must be strictly increasing"),
               (np.array([0, 1, 12]), ValueError, "idx holds positions"),  # out of range was dropped
               (np.array([-1, 1, 2]), ValueError, "idx holds positions"),  # negative wrapped
               (np.array([0, 1]), ValueError, "idx must have the shape"),
               (np.array([0.0, 1.0, 2.0]), TypeError, "idx must be an integer")]
    for idx, exc, msg in bad_idx:
        with pytest.raises(exc, match=msg):
            S.sltrain_weight(a, b, v, idx, 1.0)
        with pytest.raises(exc, match=msg):
            S.sltrain_matmul(jnp.ones((1, 4)), a, b, v, jnp.asarray(idx), 1.0)
    ok = np.array([0, 5, 11])
    with pytest.raises(ValueError, match="b must"):
        S.sltrain_weight(a, jnp.ones((3, 3)), v, ok, 1.0)
    with pytest.raises(ValueError, match="values must"):
        S.sltrain_weight(a, b, jnp.ones((2, 3)), ok, 1.0)
    with pytest.raises(TypeError, match="scale"):
        S.sltrain_weight(a, b, v, ok, "1")
    with pytest.raises(ValueError, match="bias"):
        S.sltrain_matmul(jnp.ones((1, 4)), a, b, v, ok, 1.0, jnp.ones(4))
    with pytest.raises(ValueError, match="x must"):
        S.sltrain_matmul(jnp.ones((1, 5)), a, b, v, ok, 1.0)
    with pytest.raises(TypeError, match="key"):
        S.sltrain_init(0, 4, 3, 2, 0.5)
    with pytest.raises(TypeError, match="key"):
        S.lowrank_init(0, 4, 3, 2, 1.0)
    with pytest.raises(TypeError, match="path"):
        S.path_seed(0, 3)
    # a traced idx is not inspected (values unknown) and still gives the scatter
    w = jax.jit(lambda i: S.sltrain_weight(a, b, v, i, 1.0))(jnp.asarray(ok))
    np.testing.assert_allclose(w, _np_weight(a, b, v, ok, 1.0), rtol=1e-6)


def test_pure_lowrank_takes_no_delta_or_seed():
    import dataclasses
    with pytest.raises(TypeError, match="delta"):
        PureLowRank(rank=2, delta=0.05)
    with pytest.raises(TypeError, match="seed"):
        PureLowRank(rank=2, seed=3)
    rp = PureLowRank(rank=2)
    assert dataclasses.replace(rp, alpha=4.0).alpha == 4.0  # replace passes every field: still accepted
    with pytest.raises(ValueError, match="PureLowRank replaces"):
        rp.init(jax.random.key(0), {"kernel": jnp.full((4, 3), jnp.nan)})


def test_nnx_vmap_stack_with_one_seed_shares_the_support():
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r):
        return S.SLTrainLinear(4, 3, rank=2, delta=0.5, seed=7, rngs=r)

    st = make(nnx.Rngs(0))
    sup = np.asarray(st.support[...])
    assert sup.shape == (3, 6) and (sup == sup[0]).all()  # documented: one seed -> one support
    st.support[...] = jnp.stack([S.sparse_support(4, 3, 0.5, (7, l)) for l in range(3)])  # the documented fix
    assert len({tuple(r) for r in np.asarray(st.support[...])}) == 3
