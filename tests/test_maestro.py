"""Maestro (lrjax.nn.maestro): SVD recovery on a linear map (the official notebook's setup), the
ordered-dropout samplers by counting, the group lasso / importance against a float64 NumPy
transcription of the official formulas, shrinking, truncation, the loss, jit/grad/vmap, bfloat16
and bad input."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from lrjax.nn import maestro as M
from lrjax.nn.maestro import MaestroLinear


def _rand_layer(seed, din, dout, d=None, bias=True, dtype=np.float32):
    rng = np.random.default_rng(seed)
    d = min(din, dout) if d is None else d
    lay = {"u": rng.standard_normal((din, d)).astype(dtype), "v": rng.standard_normal((dout, d)).astype(dtype)}
    if bias:
        lay["bias"] = rng.standard_normal(dout).astype(dtype)
    return lay


# ------------------------------------------------------------------------- float64 references
def np_norms(u, v, hierarchical):
    su, sv = (u.astype(np.float64) ** 2).sum(0), (v.astype(np.float64) ** 2).sum(0)
    if hierarchical:
        su = np.array([su[k:].sum() for k in range(su.size)])
        sv = np.array([sv[k:].sum() for k in range(sv.size)])
    return np.sqrt(su), np.sqrt(sv)


def np_forward(lay, x, k=None):
    u, v = np.asarray(lay["u"], np.float64), np.asarray(lay["v"], np.float64)
    k = u.shape[1] if k is None else k
    y = np.asarray(x, np.float64) @ u[:, :k] @ v[:, :k].T
    return y + np.asarray(lay["bias"], np.float64) if "bias" in lay else y


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


# ------------------------------------------------------------------------------ SVD recovery
def test_linear_map_recovers_svd():
    """Official notebook setup: m, n, h = 9, 6, 3, rank-3 C, x = I_9, MSE, SGD lr 0.5, the per-layer
    sampler (one layer: j ~ U{1..6}), no lasso. The notebook runs 2000 steps on its C; this NumPy C
    (seed 0) has a smaller spectral gap, so 8000 steps (one jitted lax.scan, ~1 s)."""
    m, n, h = 9, 6, 3
    rng = np.random.default_rng(0)
    C = rng.standard_normal((m, h)) @ rng.standard_normal((h, n))
    A, S, Bt = np.linalg.svd(C)
    Cj, x = jnp.asarray(C, jnp.float32), jnp.eye(m)
    lay0 = M.init_layer(jax.random.key(0), m, n, use_bias=False)

    def step(lay, key):
        k = M.sample_ranks(key, [6], "per_layer")[0]
        g = jax.grad(lambda l: jnp.mean((M.maestro_linear(l, x, k) - Cj) ** 2))(lay)
        return jax.tree.map(lambda p, g: p - 0.5 * g, lay, g), None

    lay = jax.jit(lambda l, key: jax.lax.scan(step, l, jax.random.split(key, 8000))[0])(lay0, jax.random.key(100))
    imp = np.asarray(M.importance(lay, hierarchical=False))
    np.testing.assert_array_less(np.abs(imp[:h] / S[:h] - 1), 0.02)
    assert np.all(imp[h:] < 0.05 * S[h - 1]), (imp, S)
    for k in range(1, n + 1):
        best = (A[:, :k] * S[:k]) @ Bt[:k]
        err = np.sum((np.asarray(M.to_dense(lay, k), np.float64) - best) ** 2)
        assert err < 1e-2, (k, err)
    # the untrained layer is far from it (the test can fail)
    assert np.sum((np.asarray(M.to_dense(lay0, 1), np.float64) - (A[:, :1] * S[:1]) @ Bt[:1]) ** 2) > 1.0


# ----------------------------------------------------------------------------------- sampler
def test_per_layer_sampler_distribution():
    ranks = (2, 5, 3)
    n = 20000
    draws = np.asarray(jax.vmap(lambda k: M.sample_ranks(k, ranks))(jax.random.split(jax.random.key(1), n)))
    full = np.array(ranks)
    below = draws < full
    assert below.sum(1).max() <= 1  # at most one layer truncated per step
    assert np.all((draws >= 1) & (draws <= full))
    # every pair (i, j < d_i) has probability 1 / sum d; "all full" collects the L pairs (i, d_i)
    tot = sum(ranks)
    for i, d in enumerate(ranks):
        for j in range(1, d):
            freq = np.mean(draws[:, i] == j)
            assert abs(freq - 1 / tot) < 0.01, (i, j, freq)
    assert abs(np.mean(~below.any(1)) - len(ranks) / tot) < 0.015


def test_across_layers_sampler_distribution():
    ranks = (2, 4)
    n = 20000
    draws = np.asarray(jax.vmap(lambda k: M.sample_ranks(k, ranks, "across_layers"))(
        jax.random.split(jax.random.key(2), n)))
    for i, d in enumerate(ranks):
        for j in range(1, d + 1):
            assert abs(np.mean(draws[:, i] == j) - 1 / d) < 0.015
    # independent: the joint is the product of the marginals
    assert abs(np.mean((draws[:, 0] == 1) & (draws[:, 1] == 4)) - 1 / 8) < 0.01


def test_sampler_under_jit_is_deterministic():
    key = jax.random.key(3)
    a = jax.jit(lambda k: M.sample_ranks(k, (4, 6)))(key)
    assert a.dtype == jnp.int32 and a.shape == (2,)
    np.testing.assert_array_equal(a, M.sample_ranks(key, (4, 6)))


# --------------------------------------------------------------------- lasso and importance
@pytest.mark.parametrize("hierarchical", [True, False])
def test_lasso_importance_vs_numpy(hierarchical):
    lay = _rand_layer(4, 7, 5)
    lay["u"][:, 3] = 0.0  # a dead component
    lay["v"][:, 4] = 0.0
    a, b = np_norms(lay["u"], lay["v"], hierarchical)
    np.testing.assert_allclose(M.group_lasso(lay, hierarchical=hierarchical), a + b, rtol=1e-6)
    np.testing.assert_allclose(M.importance(lay, hierarchical=hierarchical), a * b, rtol=1e-6, atol=1e-12)
    lay2 = _rand_layer(5, 5, 3)
    a2, b2 = np_norms(lay2["u"], lay2["v"], hierarchical)
    np.testing.assert_allclose(M.group_lasso_penalty([lay, lay2], hierarchical=hierarchical),
                               (a + b).sum() + (a2 + b2).sum(), rtol=1e-6)
    if hierarchical:
        imp = np.asarray(M.importance(lay))
        assert np.all(np.diff(imp) <= 1e-6)  # non-increasing: shrinking keeps a prefix


def test_lasso_gradient_at_zero_is_finite():
    z = {"u": jnp.zeros((4, 3)), "v": jnp.zeros((5, 3))}
    for h in (True, False):
        g = jax.grad(lambda l: M.group_lasso_penalty([l], hierarchical=h))(z)
        assert all(np.all(np.isfinite(x)) and np.all(x == 0) for x in jax.tree.leaves(g))
    lay = _rand_layer(6, 4, 3, bias=False)
    lay["u"][:, 2] = 0.0
    lay["v"][:, 2] = 0.0
    g = jax.grad(lambda l: M.group_lasso_penalty([l]))(jax.tree.map(jnp.asarray, lay))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g))
    # gradient of sum_k sqrt(sum_{j>=k} ||u_j||^2) w.r.t. u_0 is u_0 / in_0 (only k = 0 sees u_0)
    a, _ = np_norms(lay["u"], lay["v"], True)
    np.testing.assert_allclose(g["u"][:, 0], lay["u"][:, 0] / a[0], rtol=1e-5)


# -------------------------------------------------------------------------------- shrinking
def test_shrink_keeps_important_components_in_order():
    rng = np.random.default_rng(7)
    scale = np.array([3.0, 2.0, 1e-4, 1.0, 1e-5])
    lay = {"u": (rng.standard_normal((6, 5)) * scale).astype(np.float32),
           "v": (rng.standard_normal((5, 5)) * scale).astype(np.float32), "bias": np.ones(5, np.float32)}
    imp = np.prod(np_norms(lay["u"], lay["v"], False), 0)
    thr = 1e-3
    (out,) = M.shrink([lay], thr, hierarchical=False)
    keep = np.nonzero(imp >= thr)[0]
    assert keep.tolist() == [0, 1, 3]
    np.testing.assert_array_equal(out["u"], lay["u"][:, keep])
    np.testing.assert_array_equal(out["v"], lay["v"][:, keep])
    np.testing.assert_array_equal(out["bias"], lay["bias"])
    # hierarchical importance is a suffix product: component 3 keeps 0..3 alive
    (outh,) = M.shrink([lay], thr)
    assert M.layer_rank(outh) == 4
    # nothing above the threshold: the most important component survives (min_rank)
    (one,) = M.shrink([lay], 1e9, hierarchical=False)
    np.testing.assert_array_equal(one["u"], lay["u"][:, :1])
    (two,) = M.shrink([lay], 1e9, hierarchical=False, min_rank=2)
    assert M.layer_rank(two) == 2
    # threshold 0 keeps all
    assert M.layer_rank(M.shrink([lay], 0.0)[0]) == 5


# ----------------------------------------------------------------------------- truncation
@pytest.mark.parametrize("k", [1, 3, 5])
def test_truncation_equals_dense(k):
    lay = _rand_layer(8, 5, 7)
    x = np.random.default_rng(9).standard_normal((4, 5)).astype(np.float32)
    ref = np_forward(lay, x, k)
    np.testing.assert_allclose(M.maestro_linear(lay, x, k), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(M.maestro_linear(lay, x, jnp.int32(k)), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(M.to_dense(lay, k), lay["u"][:, :k] @ lay["v"][:, :k].T, rtol=1e-5, atol=1e-5)
    t = M.truncate(lay, k)
    assert t["u"].shape == (5, k) and t["v"].shape == (7, k)
    np.testing.assert_allclose(M.maestro_linear(t, x), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(M.rank_mask(k, 5), (np.arange(5) < k).astype(np.float32))


def test_full_equals_dense_and_traced_k_compiles_once():
    lay = _rand_layer(10, 6, 4)
    x = np.random.default_rng(11).standard_normal((3, 6)).astype(np.float32)
    np.testing.assert_allclose(M.maestro_linear(lay, x), np_forward(lay, x), rtol=1e-5, atol=1e-5)
    traces = []

    @jax.jit
    def f(k):
        traces.append(1)
        return M.maestro_linear(lay, x, k)

    outs = [f(jnp.int32(k)) for k in range(1, 5)]
    assert len(traces) == 1
    for k, o in enumerate(outs, 1):
        np.testing.assert_allclose(o, np_forward(lay, x, k), rtol=1e-5, atol=1e-5)
    # vmap over k
    ys = jax.vmap(lambda k: M.maestro_linear(lay, x, k))(jnp.arange(1, 5))
    np.testing.assert_allclose(ys, np.stack([np_forward(lay, x, k) for k in range(1, 5)]), rtol=1e-5, atol=1e-5)


def test_from_dense_is_svd():
    rng = np.random.default_rng(12)
    W = rng.standard_normal((8, 5)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    lay = M.from_dense(W, b)
    assert lay["u"].shape == (8, 5) and lay["v"].shape == (5, 5)
    np.testing.assert_allclose(M.to_dense(lay), W, rtol=1e-4, atol=1e-5)
    A, S, Bt = np.linalg.svd(W.astype(np.float64), full_matrices=False)
    for k in (1, 2, 4):
        np.testing.assert_allclose(M.to_dense(lay, k), (A[:, :k] * S[:k]) @ Bt[:k], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(M.importance(lay, hierarchical=False), S, rtol=1e-5)
    np.testing.assert_array_equal(lay["bias"], b)
    # wide kernel: d = d_in
    assert M.from_dense(W.T)["u"].shape == (5, 5)
    # rank-deficient kernel: finite factors
    assert np.all(np.isfinite(M.from_dense(np.zeros((4, 3), np.float32))["u"]))


def test_init_layer_shapes_and_torch_bounds():
    lay = M.init_layer(jax.random.key(0), 16, 4)
    assert lay["u"].shape == (16, 4) and lay["v"].shape == (4, 4) and lay["bias"].shape == (4,)
    assert np.abs(lay["u"]).max() <= 0.25 and np.abs(lay["v"]).max() <= 0.5
    assert "bias" not in M.init_layer(jax.random.key(0), 3, 4, use_bias=False)


# ------------------------------------------------------------------------------------ loss
def test_distillation_and_maestro_loss_vs_numpy():
    rng = np.random.default_rng(13)
    lf = rng.standard_normal((6, 4)).astype(np.float32)
    lt = rng.standard_normal((6, 4)).astype(np.float32)
    y = rng.integers(0, 4, 6).astype(np.int32)
    ls_f, ls_t = np_log_softmax(lf.astype(np.float64)), np_log_softmax(lt.astype(np.float64))
    ref = -ls_f[np.arange(6), y].mean() - (np.exp(ls_f) * ls_t).sum(1).mean()
    np.testing.assert_allclose(M.distillation_loss(lf, lt, y), ref, rtol=1e-5)
    # no gradient flows into the teacher of the second term
    g = jax.grad(lambda a: M.distillation_loss(a, jnp.asarray(lt), y))(jnp.asarray(lf))
    g_ce = jax.grad(lambda a: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(a), y[:, None], -1)))(jnp.asarray(lf))
    np.testing.assert_allclose(g, g_ce, rtol=1e-5, atol=1e-7)

    layers = [M.init_layer(k, a, b) for k, a, b in zip(jax.random.split(jax.random.key(0), 2), (5, 8), (8, 3))]
    x = rng.standard_normal((6, 5)).astype(np.float32)
    y3 = y % 3
    key = jax.random.key(4)
    ranks = M.sample_ranks(key, [5, 3])
    full = M.mlp_apply(layers, x)
    trunc = M.mlp_apply(layers, x, ranks)
    pen = float(M.group_lasso_penalty(layers))
    got = M.maestro_loss(layers, x, y3, key, gp_lambda=0.01)
    np.testing.assert_allclose(got, M.distillation_loss(full, trunc, y3) + 0.01 * pen, rtol=1e-5)
    # the MLP forward vs NumPy (relu between layers, last layer linear)
    h = np.maximum(np_forward(layers[0], x, int(ranks[0])), 0)
    np.testing.assert_allclose(trunc, np_forward(layers[1], h, int(ranks[1])), rtol=1e-4, atol=1e-5)
    nf = M.maestro_loss(layers, x, y3, key, gp_lambda=0.0, full_pass=False)
    ref_nf = -np_log_softmax(np.asarray(trunc, np.float64))[np.arange(6), y3].mean()
    np.testing.assert_allclose(nf, ref_nf, rtol=1e-5)
    # jit + grad: finite, every factor gets a gradient
    g = jax.jit(jax.grad(lambda ls, k: M.maestro_loss(ls, x, y3, k, sampler="across_layers")))(layers, key)
    assert all(np.all(np.isfinite(a)) and np.any(a != 0) for a in jax.tree.leaves(g))


def test_bfloat16():
    lay = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), _rand_layer(14, 6, 4))
    x = jnp.asarray(np.random.default_rng(15).standard_normal((3, 6)), jnp.bfloat16)
    for k in (None, 2, jnp.int32(2)):
        y = M.maestro_linear(lay, x, k)
        assert y.dtype == jnp.bfloat16
        ref = np_forward(jax.tree.map(lambda a: np.asarray(a, np.float32), lay), np.asarray(x, np.float32),
                         None if k is None else 2)
        np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=0.02, atol=0.05)
    assert M.importance(lay).dtype == jnp.float32
    assert M.maestro_linear(lay, x.astype(jnp.float32)).dtype == jnp.float32
    assert M.init_layer(jax.random.key(0), 4, 3, dtype=jnp.bfloat16)["u"].dtype == jnp.bfloat16
    g = jax.grad(lambda l: jnp.sum(M.maestro_linear(l, x, 2).astype(jnp.float32)))(lay)
    assert g["u"].dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g["u"], np.float32)))


# ---------------------------------------------------------------------------------- NNX layer
def test_nnx_layer():
    layer = MaestroLinear(6, 4, rngs=nnx.Rngs(0))
    assert layer.rank == 4 and layer.u.value.shape == (6, 4) and layer.bias.value.shape == (4,)
    x = np.random.default_rng(16).standard_normal((2, 6)).astype(np.float32)
    np.testing.assert_allclose(layer(x, 2), np_forward(layer.layer, x, 2), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer(x), np_forward(layer.layer, x), rtol=1e-5, atol=1e-5)
    y = nnx.jit(lambda m, x, k: m(x, k))(layer, x, jnp.int32(3))
    np.testing.assert_allclose(y, np_forward(layer.layer, x, 3), rtol=1e-5, atol=1e-5)
    W = np.random.default_rng(17).standard_normal((6, 4)).astype(np.float32)
    dl = MaestroLinear.from_dense(jnp.asarray(W))
    assert dl.bias is None
    np.testing.assert_allclose(dl.to_dense(), W, rtol=1e-4, atol=1e-5)
    dl.u.value = dl.u.value.at[:, 3].set(0.0)
    assert dl.shrink(1e-5, hierarchical=False) == 3 and dl.u.value.shape == (6, 3)
    assert dl.importance().shape == (3,) and dl.group_lasso().shape == (3,)


# --------------------------------------------------------------------------------- bad input
def test_bad_input():
    lay = _rand_layer(18, 5, 3)
    x = np.ones((2, 5), np.float32)
    with pytest.raises(ValueError, match="k must be in 1..3"):
        M.maestro_linear(lay, x, 4)
    with pytest.raises(ValueError, match="k must be in 1..3"):
        M.maestro_linear(lay, x, 0)
    with pytest.raises(ValueError, match="k must be in 1..3"):
        M.maestro_linear(lay, x, jnp.int32(5))
    with pytest.raises(TypeError, match="k must be"):
        M.maestro_linear(lay, x, True)
    with pytest.raises(TypeError, match="k must be"):
        M.maestro_linear(lay, x, 2.0)
    with pytest.raises(TypeError, match="k must be"):
        M.maestro_linear(lay, x, jnp.float32(2))
    with pytest.raises(TypeError, match="k must be a Python int for truncate"):
        M.truncate(lay, jnp.int32(2))
    with pytest.raises(ValueError, match="trailing axis of size 5"):
        M.maestro_linear(lay, np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="threshold"):
        M.shrink([lay], -1.0)
    with pytest.raises(TypeError, match="threshold"):
        M.shrink([lay], "0.1")
    with pytest.raises(TypeError, match="min_rank"):
        M.shrink([lay], 0.1, min_rank=True)
    with pytest.raises(TypeError, match="layers must be a list"):
        M.shrink(lay, 0.1)
    with pytest.raises(ValueError, match="sampler"):
        M.sample_ranks(jax.random.key(0), [3], "uniform")
    with pytest.raises(TypeError, match="ranks\\[0\\]"):
        M.sample_ranks(jax.random.key(0), [True])
    with pytest.raises(ValueError, match="ranks\\[1\\]"):
        M.sample_ranks(jax.random.key(0), [3, 0])
    with pytest.raises(TypeError, match="key"):
        M.sample_ranks(0, [3])
    with pytest.raises(TypeError, match="hierarchical"):
        M.importance(lay, hierarchical=1)
    with pytest.raises(ValueError, match="missing the factor 'v'"):
        M.importance({"u": lay["u"]})
    with pytest.raises(ValueError, match="inner dimension"):
        M.importance({"u": np.ones((5, 3), np.float32), "v": np.ones((3, 2), np.float32)})
    with pytest.raises(ValueError, match="exceeds min"):
        M.importance({"u": np.ones((2, 3), np.float32), "v": np.ones((4, 3), np.float32)})
    with pytest.raises(TypeError, match="floating"):
        M.importance({"u": np.ones((5, 3), np.int32), "v": np.ones((3, 3), np.float32)})
    with pytest.raises(ValueError, match="bias"):
        M.maestro_linear({**lay, "bias": np.ones(4, np.float32)}, x)
    with pytest.raises(ValueError, match="must chain"):
        M.mlp_apply([lay, lay], x)
    with pytest.raises(ValueError, match="gp_lambda"):
        M.maestro_loss([lay], x, np.zeros(2, np.int32), jax.random.key(0), gp_lambda=-1.0)
    with pytest.raises(TypeError, match="full_pass"):
        M.maestro_loss([lay], x, np.zeros(2, np.int32), jax.random.key(0), full_pass=1)
    with pytest.raises(TypeError, match="labels"):
        M.distillation_loss(np.ones((2, 3), np.float32), np.ones((2, 3), np.float32), np.zeros(2, np.float32))
    with pytest.raises(TypeError, match="in_features"):
        M.init_layer(jax.random.key(0), 4.0, 3)
    with pytest.raises(ValueError, match="out_features"):
        M.init_layer(jax.random.key(0), 4, 0)
    with pytest.raises(TypeError, match="use_bias"):
        M.init_layer(jax.random.key(0), 4, 3, use_bias="yes")
    with pytest.raises(ValueError, match="kernel"):
        M.from_dense(np.full((3, 2), np.nan, np.float32))
    with pytest.raises(ValueError, match="ranks must have one entry per layer"):
        M.mlp_apply([lay], x, [1, 2])
    with pytest.raises(TypeError, match="rngs"):
        MaestroLinear(3, 2, rngs=0)
    # labels outside 0..C-1 (-1 used to count as the last class, C gave NaN), empty batches
    lg = np.ones((2, 3), np.float32)
    for bad in ([0, -1], [0, 3]):
        with pytest.raises(ValueError, match="labels must be class indices in 0..2"):
            M.distillation_loss(lg, lg, np.asarray(bad, np.int32))
    lay3 = _rand_layer(19, 5, 3)
    for fp in (True, False):
        with pytest.raises(ValueError, match="labels must be class indices in 0..2"):
            M.maestro_loss([lay3], x, np.asarray([1, 3], np.int32), jax.random.key(0), full_pass=fp)
    with pytest.raises(ValueError, match="logits_full has an empty batch"):
        M.distillation_loss(lg[:0], lg[:0], np.zeros(0, np.int32))
    with pytest.raises(ValueError, match="x has an empty batch"):
        M.maestro_loss([lay3], x[:0], np.zeros(0, np.int32), jax.random.key(0))
    # non-finite factors are refused by shrink (they used to shrink silently), empty kernels by from_dense
    nan_lay = {**lay, "v": lay["v"].copy()}
    nan_lay["v"][0, 1] = np.nan
    with pytest.raises(ValueError, match=r"layers\[1\]\['v'\] contains NaN"):
        M.shrink([_rand_layer(20, 3, 5), nan_lay], 0.1)
    with pytest.raises(ValueError, match="kernel has shape"):
        M.from_dense(np.ones((0, 3), np.float32))
