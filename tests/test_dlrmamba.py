"""DLRMamba (lrjax.nn.dlrmamba): the selective scan against a float64 NumPy loop, the four SS2D
directions, the whole SS2D block against a float64 NumPy transcription, the low-rank model at full
rank against the dense one, the distillation losses against NumPy, jit/grad/vmap, bfloat16 and bad input."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lrjax.nn import dlrmamba as M


def _rand(key, *shapes):
    """float32 standard normal draws (NumPy: no eager jax.random program compiled per shape)."""
    rng = np.random.default_rng(key)
    return [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]


def _scan_inputs(key=0, batch=(2,), L=5, d=3, n=2):
    x, dl, al, B, C, D, h0 = _rand(key, batch + (L, d), batch + (L, d), (d, n), batch + (L, n), batch + (L, n),
                                   (d,), batch + (d, n))
    return x, jax.nn.softplus(dl), -jnp.exp(al), B, C, D, h0


def np_selective_scan(x, delta, A, B, C, D=None, h0=None):
    """float64 loop over batch, time, channel and state: the Mamba recurrence as written."""
    x, delta, A, B, C = (np.asarray(a, np.float64) for a in (x, delta, A, B, C))
    bs, L, d = x.shape
    n = A.shape[-1]
    y = np.zeros((bs, L, d))
    hs = np.zeros((bs, L, d, n))
    for b in range(bs):
        h = np.zeros((d, n)) if h0 is None else np.asarray(h0, np.float64)[b].copy()
        for t in range(L):
            for i in range(d):
                for j in range(n):
                    h[i, j] = math.exp(delta[b, t, i] * A[i, j]) * h[i, j] + delta[b, t, i] * x[b, t, i] * B[b, t, j]
                y[b, t, i] = sum(C[b, t, j] * h[i, j] for j in range(n))
                if D is not None:
                    y[b, t, i] += float(D[i]) * x[b, t, i]
            hs[b, t] = h
    return y, hs


@pytest.mark.parametrize("method", M.SCAN_METHODS)
def test_selective_scan_matches_numpy_loop(method):
    x, dl, A, B, C, D, h0 = _scan_inputs()
    y, h = M.selective_scan(x, dl, A, B, C, D, h0=h0, return_states=True, method=method)
    ry, rh = np_selective_scan(x, dl, A, B, C, D, h0)
    np.testing.assert_allclose(np.asarray(y), ry, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(h), rh, atol=2e-5, rtol=2e-5)
    y0 = M.selective_scan(x, dl, A, B, C)
    np.testing.assert_allclose(np.asarray(y0), np_selective_scan(x, dl, A, B, C)[0], atol=2e-5, rtol=2e-5)


def test_scan_and_associative_agree_values_and_grads():
    x, dl, A, B, C, D, h0 = _scan_inputs(1, batch=(2,), L=7, d=3, n=2)

    def f(method):
        return lambda x, dl, A: jnp.sum(jnp.sin(M.selective_scan(x, dl, A, B, C, D, h0=h0, method=method)))
    np.testing.assert_allclose(f("scan")(x, dl, A), f("associative")(x, dl, A), rtol=1e-5)
    g1 = jax.grad(f("scan"), argnums=(0, 1, 2))(x, dl, A)
    g2 = jax.grad(f("associative"), argnums=(0, 1, 2))(x, dl, A)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
        assert np.all(np.isfinite(np.asarray(a)))


def test_scan_orders_and_cross_merge():
    h, w = 3, 4
    o = M.scan_orders(h, w)
    grid = np.arange(h * w).reshape(h, w)
    np.testing.assert_array_equal(o[0], grid.reshape(-1))
    np.testing.assert_array_equal(o[1], grid.T.reshape(-1))
    np.testing.assert_array_equal(o[2], grid.reshape(-1)[::-1])
    np.testing.assert_array_equal(o[3], grid.T.reshape(-1)[::-1])
    (x,) = _rand(2, (2, h * w, 3))
    xs = M.cross_scan(x, h, w)
    np.testing.assert_array_equal(xs[:, 1], np.asarray(x).reshape(2, h, w, 3).transpose(0, 2, 1, 3).reshape(2, h * w, 3))
    # merging the unchanged scans maps every direction back to row-major: 4 x
    np.testing.assert_allclose(M.cross_merge(xs, h, w), 4 * x, rtol=1e-6)
    # each direction separately: merge of a one-direction tensor is its inverse permutation
    for k in range(4):
        only = jnp.zeros_like(xs).at[:, k].set(xs[:, k])
        np.testing.assert_allclose(M.cross_merge(only, h, w), x, rtol=1e-6)


def test_reversed_input_swaps_forward_and_reverse_scans():
    """Reversing the token order (a 180-degree grid rotation) turns direction 2 (reversed row-major)
    into direction 0 and direction 3 into 1: the selective-scan outputs swap exactly."""
    h, w = 3, 4
    x, dl, B, C = _rand(3, (2, h * w, 3), (2, h * w, 3), (2, h * w, 2), (2, h * w, 2))
    A = -jnp.exp(_rand(4, (3, 2))[0])

    def run(x, dl, B, C):
        cs = lambda a: M.cross_scan(a, h, w)
        return M.selective_scan(cs(x), jax.nn.softplus(cs(dl)), A, cs(B), cs(C))
    y = run(x, dl, B, C)
    yr = run(*(a[:, ::-1] for a in (x, dl, B, C)))
    for k, kr in ((0, 2), (1, 3), (2, 0), (3, 1)):
        np.testing.assert_allclose(yr[:, kr], y[:, k], atol=1e-6)
    assert not np.allclose(y[:, 0], y[:, 2])   # the directions really differ


def _dense_params(key=0, dm=4, di=6, n=3, R=2, kc=3):
    ks = _rand(key, (dm, 2 * di), (kc, kc, di), (di,), (4, di, R + 2 * n), (4, R, di), (4, di), (4, di, n), (4, di),
               (di,), (di,), (di, dm))
    p = dict(zip(M.SS2D_KEYS, ks))
    p["in_proj"] = p["in_proj"] / 2
    p["x_proj"] = p["x_proj"] / 2
    p["A_log"] = 0.3 * p["A_log"]
    p["norm_scale"] = 1 + 0.1 * p["norm_scale"]
    return p


def np_ss2d(p, x, h, w):
    """float64 NumPy transcription of the SS2D block (module docstring), one image at a time."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    x = np.asarray(x, np.float64)
    silu = lambda a: a / (1 + np.exp(-a))
    softplus = lambda a: np.log1p(np.exp(a))
    out = []
    for img in x:
        xz = img @ p["in_proj"]
        di = xz.shape[-1] // 2
        xi, z = xz[:, :di], xz[:, di:]
        g = xi.reshape(h, w, di)
        kc = p["conv_w"].shape[0]
        r = kc // 2
        pad = np.pad(g, ((r, r), (r, r), (0, 0)))
        conv = np.zeros_like(g)
        for i in range(h):
            for j in range(w):
                conv[i, j] = np.sum(pad[i:i + kc, j:j + kc] * p["conv_w"], axis=(0, 1)) + p["conv_b"]
        xi = silu(conv).reshape(h * w, di)
        n = p["A_log"].shape[-1]
        R = p["dt_proj"].shape[1]
        merged = np.zeros((h * w, di))
        orders = [[i * w + j for i in range(h) for j in range(w)], [i * w + j for j in range(w) for i in range(h)]]
        orders += [orders[0][::-1], orders[1][::-1]]
        for k, order in enumerate(orders):
            seq = xi[order]
            proj = seq @ p["x_proj"][k]
            dt, Bm, Cm = proj[:, :R], proj[:, R:R + n], proj[:, R + n:]
            delta = softplus(dt @ p["dt_proj"][k] + p["dt_bias"][k])
            y, _ = np_selective_scan(seq[None], delta[None], -np.exp(p["A_log"][k]), Bm[None], Cm[None], p["D"][k])
            for pos, tok in enumerate(order):
                merged[tok] += y[0, pos]
        mu = merged.mean(-1, keepdims=True)
        var = ((merged - mu) ** 2).mean(-1, keepdims=True)
        yn = (merged - mu) / np.sqrt(var + 1e-5) * p["norm_scale"] + p["norm_bias"]
        out.append((yn * silu(z)) @ p["out_proj"])
    return np.stack(out)


def test_ss2d_matches_numpy_block_and_rotation_equivariance():
    h, w = 3, 3
    p = _dense_params()
    (x,) = _rand(5, (2, h * w, 4))
    y, states = M.ss2d(p, x, height=h, width=w, return_states=True)
    np.testing.assert_allclose(y, np_ss2d(p, x, h, w), atol=1e-4, rtol=1e-4)
    assert states.shape == (2, 4, h * w, 6, 3) and states.dtype == jnp.float32
    # rotate the grid 180 degrees: reversed tokens, rotated conv kernel, directions (0 2)(1 3) swapped
    q = dict(p, conv_w=p["conv_w"][::-1, ::-1])
    for k in ("x_proj", "dt_proj", "dt_bias", "A_log", "D"):
        q[k] = p[k][jnp.array([2, 3, 0, 1])]
    np.testing.assert_allclose(M.ss2d(q, x[:, ::-1], height=h, width=w), y[:, ::-1], atol=1e-5)


def test_full_rank_factorization_equals_dense():
    h, w = 3, 3
    p = _dense_params(1)
    (x,) = _rand(6, (2, h * w, 4))
    y = M.ss2d(p, x, height=h, width=w)
    q = dict(p)
    for k in M.FACTORIZABLE:
        m, n = p[k].shape[-2:]
        q[k] = M.factorize_weight(p[k], min(m, n))
        np.testing.assert_allclose(M.dense_weight(q[k]), p[k], atol=1e-5)
    np.testing.assert_allclose(M.ss2d(q, x, height=h, width=w), y, atol=1e-4)
    # truncation is the best rank-r approximation (Eckart-Young): the error is the tail of the spectrum
    w2 = np.asarray(p["in_proj"], np.float64)
    s = np.linalg.svd(w2, compute_uv=False)
    err = np.linalg.norm(w2 - np.asarray(M.dense_weight(M.factorize_weight(p["in_proj"], 2)), np.float64))
    np.testing.assert_allclose(err, np.sqrt(np.sum(s[2:] ** 2)), rtol=1e-4)


def test_module_low_rank_at_full_rank_equals_dense_module():
    # d_model = d_inner = N = 8: every factorized matrix has min(m, n) = 8, so rank 8 is full rank for all
    kw = dict(d_model=8, d_state=8, expand=1, height=2, width=3)
    dense = M.LowRankSS2D(rngs=nnx.Rngs(0), **kw)
    low = M.LowRankSS2D(rank=8, rngs=nnx.Rngs(1), **kw)
    init = M.LowRankSS2D(rank=8, factorize=("A_log",), rngs=nnx.Rngs(0), **kw)
    # the factored A_log starts at exactly the dense S4D-real init
    np.testing.assert_array_equal(M.dense_weight(init.weights()["A_log"]), dense.A_log[...])
    for k in M.FACTORIZE:
        f = M.factorize_weight(getattr(dense, k)[...], 8)
        getattr(low, k + "_u")[...] = f["u"]
        getattr(low, k + "_v")[...] = f["v"]
    for k in ("conv_w", "conv_b", "dt_proj", "dt_bias", "D", "norm_scale", "norm_bias"):
        getattr(low, k)[...] = getattr(dense, k)[...]
    (x,) = _rand(7, (2, 6, 8))
    y, st = dense(x, return_states=True)
    yl, stl = low(x, return_states=True)
    np.testing.assert_allclose(yl, y, atol=1e-4)
    np.testing.assert_allclose(stl, st, atol=1e-4)
    # a truncated student (rank 2) is a different function
    for k in M.FACTORIZE:
        f = M.factorize_weight(getattr(dense, k)[...], 2)
        setattr(low, k + "_u", nnx.Param(f["u"]))
        setattr(low, k + "_v", nnx.Param(f["v"]))
    assert float(jnp.abs(low(x) - y).max()) > 1e-3


def test_classifier_params_states_and_counts():
    kw = dict(d_model=8, n_layers=1, d_state=3, expand=2, height=2, width=3)
    t = M.DLRMambaClassifier(rngs=nnx.Rngs(0), **kw)
    s = M.DLRMambaClassifier(rank=2, rngs=nnx.Rngs(0), **kw)
    x = jax.random.uniform(jax.random.key(0), (2, 6))
    logits, states = s(x, return_states=True)
    assert logits.shape == (2, 10) and len(states) == 1 and states[0].shape == (2, 4, 6, 16, 3)
    count = lambda m: sum(a.size for a in jax.tree_util.tree_leaves(nnx.state(m, nnx.Param)))
    di, n, R, r = 16, 3, 1, 2
    dense = 8 * 2 * di + 4 * di * (R + 2 * n) + di * 8 + 4 * di * n
    low = r * (8 + 2 * di) + 4 * r * (di + R + 2 * n) + r * (di + 8) + 4 * r * (di + n)
    assert count(t) - count(s) == dense - low


def test_jit_vmap_grad():
    x, dl, A, B, C, D, h0 = _scan_inputs(8)
    y = M.selective_scan(x, dl, A, B, C, D)
    np.testing.assert_allclose(jax.jit(M.selective_scan)(x, dl, A, B, C, D), y, atol=1e-6)
    yv = jax.vmap(lambda a, b, c, e: M.selective_scan(a, b, A, c, e, D))(x, dl, B, C)
    np.testing.assert_allclose(yv, y, atol=1e-6)
    m = M.DLRMambaClassifier(d_model=8, n_layers=1, d_state=2, expand=1, height=2, width=3, rank=2, rngs=nnx.Rngs(0))
    g, p = nnx.split(m)
    xs = jax.random.uniform(jax.random.key(1), (3, 6))
    t = M.DLRMambaClassifier(d_model=8, n_layers=1, d_state=2, expand=1, height=2, width=3, rngs=nnx.Rngs(1))
    lt, st = t(xs, return_states=True)

    def loss(p):
        lo, ss = nnx.merge(g, p)(xs, return_states=True)
        return M.distill_loss(jnp.mean(lo ** 2), ss, st, lam=0.5) + M.logit_kd_loss(lo, lt)
    val, grads = jax.jit(jax.value_and_grad(loss))(p)
    assert np.isfinite(float(val))
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(np.all(np.isfinite(np.asarray(a))) for a in leaves) and any(float(jnp.abs(a).max()) > 0 for a in leaves)


def test_bfloat16_inputs_float32_state():
    x, dl, A, B, C, D, _ = _scan_inputs(9, L=8)
    xb, db, Bb, Cb = (a.astype(jnp.bfloat16) for a in (x, dl, B, C))
    y, h = M.selective_scan(xb, db, A, Bb, Cb, D, return_states=True)
    assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
    ref, rh = np_selective_scan(*(np.asarray(a.astype(jnp.float32)) for a in (xb, db, A, Bb, Cb, D)))
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=3e-2, rtol=2e-2)   # one rounding of y
    np.testing.assert_allclose(np.asarray(h), rh, atol=1e-5, rtol=1e-5)               # state exact in f32
    m = M.DLRMambaClassifier(d_model=8, n_layers=1, d_state=2, expand=1, height=2, width=3, rank=2, rngs=nnx.Rngs(0))
    xs = jax.random.uniform(jax.random.key(1), (3, 6))
    lo, st = m(xs.astype(jnp.bfloat16), return_states=True)
    assert lo.dtype == jnp.bfloat16 and st[0].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(lo, np.float32), m(xs.astype(jnp.bfloat16).astype(jnp.float32)),
                               atol=3e-2, rtol=2e-2)


def test_distill_losses_match_numpy():
    hs = _rand(10, (2, 4, 5, 3, 2), (2, 4, 5, 3, 2))
    ht = _rand(11, (2, 4, 5, 3, 4), (2, 4, 5, 3, 2))
    (P,) = _rand(12, (4, 2))
    val = M.state_distill_loss(hs, ht, [P, None])
    a = [np.asarray(v, np.float64) for v in hs]
    b = [np.asarray(v, np.float64) for v in ht]
    Pn = np.asarray(P, np.float64)
    t0 = b[0] @ Pn
    ref = np.mean((a[0] - t0) ** 2) + np.mean((a[1] - b[1]) ** 2)
    np.testing.assert_allclose(val, ref, rtol=1e-5)
    nval = M.state_distill_loss(hs, ht, [P, None], normalize=True)
    nref = np.mean((a[0] - t0) ** 2) / np.mean(t0 ** 2) + np.mean((a[1] - b[1]) ** 2) / np.mean(b[1] ** 2)
    np.testing.assert_allclose(nval, nref, rtol=1e-5)
    task = jnp.float32(0.7)
    np.testing.assert_allclose(M.distill_loss(task, hs, ht, lam=0.25, proj=[P, None]), 0.7 + 0.25 * ref, rtol=1e-5)
    # gradients: the teacher gets none, P and the student do
    gt, gp = jax.grad(lambda t, P: M.state_distill_loss(hs, [t, ht[1]], [P, None]), argnums=(0, 1))(ht[0], P)
    assert float(jnp.abs(gt).max()) == 0.0 and float(jnp.abs(gp).max()) > 0
    gs = jax.grad(lambda s: M.state_distill_loss([s, hs[1]], ht, [P, None]))(hs[0])
    np.testing.assert_allclose(gs, 2 * (a[0] - t0) / a[0].size, rtol=1e-4, atol=1e-7)
    # logit KD: T^2 KL(p_t || p_s) at T = 2
    zs, zt = _rand(13, (6, 10), (6, 10))
    T = 2.0
    ls = np.asarray(zs, np.float64) / T
    lt = np.asarray(zt, np.float64) / T
    ls = ls - np.log(np.exp(ls).sum(-1, keepdims=True))
    lt = lt - np.log(np.exp(lt).sum(-1, keepdims=True))
    kd = T * T * np.mean(np.sum(np.exp(lt) * (lt - ls), -1))
    np.testing.assert_allclose(M.logit_kd_loss(zs, zt, temperature=T), kd, rtol=1e-5)
    assert abs(float(M.logit_kd_loss(zt, zt))) < 1e-6


def test_bad_input():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match="rank=9 exceeds.*A_log"):
        M.LowRankSS2D(16, d_state=8, expand=1, rank=9, rngs=rngs)
    with pytest.raises(ValueError, match="rank"):
        M.factorize_weight(jnp.ones((3, 5)), 4)
    with pytest.raises(TypeError, match="rank"):
        M.LowRankSS2D(8, rank=True, rngs=rngs)
    with pytest.raises(TypeError, match="height"):
        M.LowRankSS2D(8, height=True, rngs=rngs)
    with pytest.raises(TypeError, match="d_state"):
        M.DLRMambaClassifier(d_state=2.0, rngs=rngs)
    with pytest.raises(ValueError, match="factorize"):
        M.LowRankSS2D(8, rank=2, factorize=("dt_proj",), rngs=rngs)
    with pytest.raises(TypeError, match="factorize"):
        M.LowRankSS2D(8, rank=2, factorize="in_proj", rngs=rngs)
    with pytest.raises(ValueError, match="d_conv"):
        M.LowRankSS2D(8, d_conv=2, rngs=rngs)
    with pytest.raises(TypeError, match="rngs"):
        M.LowRankSS2D(8, rngs=0)
    # the input checks run before any weight is read: an abstract model (no eager init) is enough
    m = nnx.eval_shape(lambda: M.DLRMambaClassifier(d_model=8, n_layers=1, d_state=2, expand=1, height=4, width=4,
                                                    rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="x must be.*16"):
        m(jnp.ones((2, 15)))
    with pytest.raises(TypeError, match="x"):
        m(jnp.ones((2, 16), jnp.int32))
    with pytest.raises(TypeError, match="return_states"):
        m(jnp.ones((2, 16)), return_states=1)
    with pytest.raises(ValueError, match="x must have H\\*W"):
        M.cross_scan(jnp.ones((2, 15, 3)), 4, 4)
    with pytest.raises(ValueError, match="y must be"):
        M.cross_merge(jnp.ones((2, 3, 16, 3)), 4, 4)
    # validation only: NumPy inputs of the usual shapes (no eager jax.random programs to compile)
    dense = {k: np.ones(v.shape, np.float32) for k, v in jax.eval_shape(_dense_params).items()}
    with pytest.raises(ValueError, match="x must have H\\*W"):
        M.ss2d(dense, jnp.ones((2, 10, 4)), height=3, width=3)
    with pytest.raises(ValueError, match="missing"):
        M.ss2d({k: v for k, v in dense.items() if k != "D"}, jnp.ones((2, 9, 4)), height=3, width=3)
    x, dl, A, B, C, D, h0 = (np.full(v.shape, 0.5, np.float32) for v in jax.eval_shape(_scan_inputs))
    with pytest.raises(ValueError, match="delta"):
        M.selective_scan(x, dl[:, :-1], A, B, C)
    with pytest.raises(ValueError, match="B must"):
        M.selective_scan(x, dl, A, B[..., :1], C)
    with pytest.raises(ValueError, match="A must"):
        M.selective_scan(x, dl, A[:2], B, C)
    with pytest.raises(ValueError, match="h0"):
        M.selective_scan(x, dl, A, B, C, h0=h0[..., :1])
    with pytest.raises(TypeError, match="delta"):
        M.selective_scan(x, dl.astype(jnp.int32), A, B, C)
    with pytest.raises(TypeError, match="x"):
        M.selective_scan(np.asarray(x).tolist(), dl, A, B, C)
    with pytest.raises(ValueError, match="method"):
        M.selective_scan(x, dl, A, B, C, method="parallel")
    hs, ht = np.ones((2, 3, 2), np.float32), np.ones((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match="proj\\[0\\]"):
        M.state_distill_loss([hs], [ht])
    with pytest.raises(ValueError, match="proj\\[0\\] must be"):
        M.state_distill_loss([hs], [ht], [jnp.ones((2, 4))])
    with pytest.raises(ValueError, match="layers"):
        M.state_distill_loss([hs, hs], [ht])
    with pytest.raises(TypeError, match="student_states"):
        M.state_distill_loss(None, [ht])
    with pytest.raises(ValueError, match="lam"):
        M.distill_loss(jnp.float32(0), [hs], [hs], lam=-1.0)
    with pytest.raises(TypeError, match="lam"):
        M.distill_loss(jnp.float32(0), [hs], [hs], lam=True)
    with pytest.raises(ValueError, match="temperature"):
        M.logit_kd_loss(hs, hs, temperature=0.0)
    # empty batches, NaN kernels, malformed factored weights, a rank with nothing to factorize
    with pytest.raises(ValueError, match="student_logits has no elements"):
        M.logit_kd_loss(jnp.ones((0, 3)), jnp.ones((0, 3)))
    with pytest.raises(ValueError, match=r"student_states\[0\].*empty"):
        M.state_distill_loss([hs[:0]], [hs[:0]])
    with pytest.raises(ValueError, match="w contains NaN"):
        M.factorize_weight(jnp.full((3, 3), jnp.nan), 2)
    with pytest.raises(ValueError, match=r"w\['u'\].*w\['v'\]"):
        M.dense_weight({"u": jnp.ones((3, 2)), "v": jnp.ones((3, 4))})
    with pytest.raises(TypeError, match="w must be an array"):
        M.dense_weight([1.0, 2.0])
    with pytest.raises(ValueError, match="factorize=\\(\\)"):
        M.LowRankSS2D(8, rank=1, factorize=(), rngs=rngs)


def test_kd_masked_teacher_and_zero_teacher_normalize():
    # a teacher class masked with -inf has p_t = 0 and contributes 0 log 0 = 0 (it gave NaN)
    zs = jnp.asarray([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])
    zt = jnp.asarray([[1.0, -jnp.inf, 3.0], [2.0, 0.0, -jnp.inf]])
    T = 2.0
    ls, lt = np.asarray(zs, np.float64) / T, np.asarray(zt, np.float64) / T
    ls = ls - np.log(np.exp(ls).sum(-1, keepdims=True))
    lt = lt - np.log(np.exp(lt).sum(-1, keepdims=True))
    pt = np.exp(lt)
    kd = T * T * np.mean(np.sum(np.where(pt > 0, pt * (np.where(pt > 0, lt, 0.0) - ls), 0.0), -1))
    np.testing.assert_allclose(M.logit_kd_loss(zs, zt, temperature=T), kd, rtol=1e-5)
    g = jax.grad(lambda s: M.logit_kd_loss(s, zt, temperature=T))(zs)
    # d/dz_s of T^2 KL = T (p_s - p_t)
    np.testing.assert_allclose(g, T * (np.exp(ls) - pt) / 2, rtol=1e-5, atol=1e-7)
    # normalize=True with an all-zero teacher: the plain MSE (it was divided by 1e-12)
    s = jnp.full((1, 2, 2), 0.5)
    val = M.state_distill_loss([s], [jnp.zeros((1, 2, 2))], normalize=True)
    np.testing.assert_allclose(val, 0.25, rtol=1e-6)
    assert np.isfinite(jax.grad(lambda s: M.state_distill_loss([s], [jnp.zeros((1, 2, 2))], normalize=True))(s)).all()
