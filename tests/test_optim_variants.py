"""lrjax.optim variants over the projection protocol: Fira, DCT projection, OwLore."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lrjax.optim import dct, fira, galore, nbytes, outlier_ratios, owlore
from lrjax.optim.dct import DCTBasis, dct_matrix
from lrjax.optim.projection import LeafPlan
from lrjax.axes import Axes


def _randn(seed, shape, dtype=jnp.float32):
    """Standard normal test data drawn by NumPy (eager jax.random compiles one program per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), dtype)


def _params(seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return {"w1": 0.4 * jax.random.normal(k[0], (6, 8)), "b1": jnp.zeros((8,)),
            "w2": 0.4 * jax.random.normal(k[1], (8, 5))}


def _grads(t, params):
    return jax.tree_util.tree_map(lambda x: jax.random.normal(jax.random.fold_in(jax.random.key(t), x.size),
                                                              x.shape), params)


def _run(opt, params, steps):
    s = opt.init(params)
    upd = jax.jit(opt.update)
    outs = []
    for t in range(steps):
        u, s = upd(_grads(t, params), s)
        outs.append(u)
    return outs, s


# ----------------------------------------------------------------------------- Fira
def test_fira_without_residual_is_galore():
    params = _params()
    a, _ = _run(fira(optax.scale_by_adam(), 2, update_proj_gap=3, residual=False, scale=0.5), params, 5)
    b, _ = _run(galore(optax.scale_by_adam(), 2, update_proj_gap=3, scale=0.5), params, 5)
    for ua, ub in zip(a, b):
        for k in params:
            np.testing.assert_array_equal(ua[k], ub[k])


def _fira_reference(gs, rank, scale, gamma=1.01, b1=0.9, b2=0.999, eps=1e-8):
    """Direct NumPy transcription of the paper's equations for one [M, N] matrix, M <= N (left)."""
    m = v = None
    prev = None
    out = []
    for t, g in enumerate(gs, 1):
        g = np.asarray(g, np.float64)
        if t == 1:
            u, _, _ = np.linalg.svd(g, full_matrices=False)
            P = u[:, :rank]
            m = np.zeros((rank, g.shape[1])); v = np.zeros_like(m)
        R = P.T @ g
        m = b1 * m + (1 - b1) * R
        v = b2 * v + (1 - b2) * R * R
        N = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
        phi = np.linalg.norm(N, axis=0) / (np.linalg.norm(R, axis=0) + 1e-8)
        S = (g - P @ R) * phi[None, :]
        ns = np.linalg.norm(S)
        if prev is not None:
            lam = max(ns / (prev + 1e-8), gamma) / gamma
            S = S / lam
            ns = ns / lam
        prev = ns
        out.append(scale * P @ N + S)
    return out


def test_fira_matches_paper_equations_with_limiter():
    g0 = _randn(0, (6, 10))
    # growing residuals so that the norm-growth limiter engages
    gs = [g0 * (1.0 + 0.5 * t) + 0.1 * jax.random.normal(jax.random.key(t + 1), (6, 10)) for t in range(5)]
    opt = fira(optax.scale_by_adam(), 3, update_proj_gap=100, scale=0.25)
    s = opt.init({"w": g0})
    ref = _fira_reference(gs, 3, 0.25)
    norms = []
    for g, r in zip(gs, ref):
        u, s = opt.update({"w": g}, s)
        np.testing.assert_allclose(u["w"], r, rtol=2e-4, atol=2e-5)
        norms.append(float(s.extra["w"]))
    assert all(b <= 1.01 * a * (1 + 1e-5) for a, b in zip(norms, norms[1:]))    # limiter holds


def test_fira_update_is_full_rank_and_right_side():
    g = _randn(0, (10, 6))                       # M > N: right projection
    opt = fira(optax.scale_by_adam(), 2)
    u, s = opt.update({"w": g}, opt.init({"w": g}))
    assert s.basis["w"].shape == (6, 2)
    sv = np.linalg.svd(np.asarray(u["w"]), compute_uv=False)
    assert (sv > 1e-4 * sv[0]).sum() == 6                                    # GaLore's would be rank 2
    ug, _ = galore(optax.scale_by_adam(), 2).update({"w": g}, galore(optax.scale_by_adam(), 2).init({"w": g}))
    assert np.linalg.matrix_rank(np.asarray(ug["w"]), tol=1e-5) == 2


def test_fira_argument_errors():
    with pytest.raises(ValueError, match="gamma"):
        fira(optax.scale_by_adam(), 2, gamma=0.5)
    with pytest.raises(TypeError, match="residual"):
        fira(optax.scale_by_adam(), 2, residual="yes")
    with pytest.raises(TypeError, match="inner needs `params`"):
        fira(optax.adamw(1e-3), 2)


# ----------------------------------------------------------------------------- DCT
def test_dct_matrix_orthonormal_and_matches_scipy_convention():
    q = np.asarray(dct_matrix(12, jnp.float64 if jax.config.jax_enable_x64 else jnp.float32))
    np.testing.assert_allclose(q.T @ q, np.eye(12), atol=1e-6)
    x = np.random.default_rng(0).normal(size=12)
    scipy_fft = pytest.importorskip("scipy.fft")
    np.testing.assert_allclose(q.T @ x, scipy_fft.dct(x, type=2, norm="ortho"), atol=1e-5)


@pytest.mark.parametrize("left", [True, False])
def test_dct_selects_best_aligned_columns(left):
    d, other, r = 16, 9, 3
    q = np.asarray(dct_matrix(d))
    chosen = [11, 2, 7]
    rng = np.random.default_rng(0)
    coef = rng.normal(size=(r, other)) * np.array([5.0, 3.0, 1.0])[:, None]
    g = q[:, chosen] @ coef + 1e-3 * rng.normal(size=(d, other))             # G in span of 3 columns
    g = g if left else g.T
    lp = LeafPlan("w", g.shape, Axes((), (0,), (1,)), (), *g.shape, left, r)
    for ell in (1, 2):
        idx = DCTBasis(ell).refresh(None, jnp.asarray(g, jnp.float32), None, lp)
        assert idx.dtype == jnp.int32 and sorted(idx.tolist()) == sorted(chosen)
        # brute force: no other r-subset captures more energy (ell=2 is exactly that criterion)
        sc = np.asarray(DCTBasis(2).scores(jnp.asarray(g, jnp.float32), lp))
        assert set(np.argsort(-sc)[:r]) == set(chosen)
    idx = DCTBasis(2).refresh(None, jnp.asarray(g, jnp.float32), None, lp)
    assert idx.tolist() == chosen                                            # descending score order


def test_dct_optimizer_state_stores_indices_only():
    params = {"w": jnp.zeros((16, 24)), "s": jnp.zeros((2, 8, 4)), "b": jnp.zeros((24,))}
    opt = dct(optax.scale_by_adam(), 4, update_proj_gap=2)
    outs, s = _run(opt, params, 3)
    assert s.basis["w"].shape == (4,) and s.basis["w"].dtype == jnp.int32
    assert s.basis["s"].shape == (2, 4)
    assert all(bool(jnp.all(jnp.isfinite(u["w"]))) for u in outs)
    moments = 2 * 4 * (4 * 24 + 2 * 8 * 4) + 2 * 4 * 24
    assert nbytes(s) == moments + 4 * (4 + 2 * 4) + 4 + 4 + (1 + 2)         # + counts + flags
    # the update lies in the span of the chosen DCT columns
    q = np.asarray(dct_matrix(16))[:, np.asarray(s.basis["w"])]
    u = np.asarray(outs[-1]["w"])
    np.testing.assert_allclose(q @ (q.T @ u), u, atol=1e-5)


# ----------------------------------------------------------------------------- OwLore
def _layered(L=4, d=8, seed=0):
    k = jax.random.split(jax.random.key(seed), 2 * L + 2)
    p = {"embed": {"embedding": jax.random.normal(k[0], (11, d))}, "head": {"kernel": jax.random.normal(k[1], (d, 3))},
         "blocks": {}}
    for i in range(L):
        p["blocks"][str(i)] = {"fc": {"kernel": 0.1 * jax.random.normal(k[2 + 2 * i], (d, d)),
                                      "bias": jnp.zeros((d,))},
                               "ln": {"scale": jnp.ones((d,))}}
    return p


def test_outlier_ratios_formula():
    p = _layered()
    w = np.asarray(p["blocks"]["2"]["fc"]["kernel"]).copy()
    w[0, :5] = 100.0                                                         # 5 outliers in layer 2
    p["blocks"]["2"]["fc"]["kernel"] = jnp.asarray(w)
    d = np.asarray(outlier_ratios(p, m=5.0))
    a = np.abs(w)
    assert d[2] == pytest.approx(100 * np.mean(a > 5 * a.mean()), rel=1e-5) and d[2] > 0
    assert d[0] == d[1] == d[3] == 0.0
    with pytest.raises(ValueError, match="capture group"):
        outlier_ratios(p, layers=r"blocks/\d+")


def test_owlore_trains_gamma_layers_and_keeps_no_state_for_frozen():
    p = _layered(L=4)
    opt = owlore(optax.scale_by_adam(), 2, gamma=2, period=3, update_proj_gap=2, ratios=[1.0, 0.0, 3.0, 0.0])
    s = opt.init(p)
    # state: 2 slots x one layer's (projected) state, nothing per frozen layer
    assert s.slots.inner.mu["fc"]["kernel"].shape == (2, 2, 8)
    assert s.slots.inner.mu["fc"]["bias"].shape == (2, 8)
    np.testing.assert_allclose(s.probs, [0.25, 0.0, 0.75, 0.0])
    upd = jax.jit(opt.update)
    seen = set()
    for t in range(9):
        u, s = upd(_grads(t, p), s)
        act = sorted(np.asarray(s.active).tolist())
        assert act == [0, 2]                                                  # zero-probability layers never drawn
        seen.add(tuple(act))
        for i in range(4):
            nz = float(jnp.abs(u["blocks"][str(i)]["fc"]["kernel"]).sum()) > 0
            assert nz == (i in act)
            assert (float(jnp.abs(u["blocks"][str(i)]["ln"]["scale"]).sum()) > 0) == (i in act)
        assert float(jnp.abs(u["head"]["kernel"]).sum()) > 0                  # rest always trained
        assert float(jnp.abs(u["embed"]["embedding"]).sum()) > 0


def test_owlore_resamples_and_resets_slots_each_period():
    p = _layered(L=5)
    opt = owlore(optax.scale_by_adam(), 2, gamma=2, period=2, update_proj_gap=10, seed=3)
    s = opt.init(p)                                                           # random init: uniform
    np.testing.assert_allclose(s.probs, 0.2)
    upd = jax.jit(opt.update)
    actives, counts = [], []
    for t in range(12):
        _, s = upd(_grads(t, p), s)
        actives.append(tuple(np.asarray(s.active).tolist()))
        counts.append(int(s.slots.count))
    assert counts == [1, 2] * 6                                               # slot state reset per period
    assert all(actives[2 * k] == actives[2 * k + 1] for k in range(6))
    assert len(set(actives)) > 1 and all(len(set(a)) == 2 for a in actives)


def test_owlore_argument_errors():
    p = _layered(L=3)
    with pytest.raises(ValueError, match="gamma=4.*L=3"):
        owlore(optax.scale_by_adam(), 2, gamma=4).init(p)
    with pytest.raises(ValueError, match="gamma"):
        owlore(optax.scale_by_adam(), 2, gamma=0)
    with pytest.raises(ValueError, match="capture group"):
        owlore(optax.scale_by_adam(), 2, layers=r"blocks/\d+")
    with pytest.raises(ValueError, match="ratios"):
        owlore(optax.scale_by_adam(), 2, gamma=1, ratios=[1.0, 2.0]).init(p)
    with pytest.raises(ValueError, match="rank=9"):
        owlore(optax.scale_by_adam(), 9, gamma=1).init(p)
    with pytest.raises(TypeError, match="inner needs `params`"):
        owlore(optax.adamw(1e-3), 2)


def _scanned(p):
    """The same model with its layers as one nn.scan-style stack (axis 0 = layer)."""
    ids = sorted(p["blocks"], key=int)
    stack = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[p["blocks"][i] for i in ids])
    return {"embed": p["embed"], "head": p["head"], "scan": stack}


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_owlore_on_scan_stack_equals_separate_layers(wd):
    """Stacked layers (scan_layers=) follow exactly the trajectory of the same layers as separate
    leaves: same sampled layers, same projected updates, same weight decay."""
    p = _layered(L=4)
    kw = dict(gamma=2, period=2, update_proj_gap=3, ratios=[1.0, 2.0, 3.0, 4.0], seed=1, weight_decay=wd)
    sep = owlore(optax.scale_by_adam(), 2, **kw)
    scn = owlore(optax.scale_by_adam(), 2, scan_layers="scan/.*", **kw)
    ps = _scanned(p)
    s1, s2 = sep.init(p), scn.init(ps)
    assert s2.slots.inner.mu["scan"]["fc"]["kernel"].shape == (2, 2, 8)         # per-layer projection, gamma slots
    assert s2.slots.inner.mu["scan"]["fc"]["bias"].shape == (2, 8)               # stacked bias: not projected
    u1f, u2f = jax.jit(sep.update), jax.jit(scn.update)
    for t in range(6):
        g = _grads(t, p)
        u1, s1 = u1f(g, s1, p)
        u2, s2 = u2f(_scanned(g), s2, ps)
        np.testing.assert_array_equal(s1.active, s2.active)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                               _scanned(u1), u2)
    np.testing.assert_allclose(outlier_ratios(ps, m=1.0, scan_layers="scan/.*"),
                               outlier_ratios(p, m=1.0), rtol=1e-6)


def test_owlore_weight_decay_only_on_trained_leaves():
    p = _layered(L=4)
    kw = dict(gamma=1, period=5, update_proj_gap=5, ratios=[0.0, 1.0, 0.0, 0.0])
    plain, wd = owlore(optax.scale_by_adam(), 2, **kw), owlore(optax.scale_by_adam(), 2, weight_decay=0.5, **kw)
    g = _grads(0, p)
    u0, _ = plain.update(g, plain.init(p), p)
    u1, s1 = wd.update(g, wd.init(p), p)
    assert np.asarray(s1.active).tolist() == [1]
    diff = jax.tree_util.tree_map(lambda a, b: np.asarray(b - a), u0, u1)
    for i in range(4):                                # frozen layers: exactly zero, no decay
        want = 0.5 * np.asarray(p["blocks"][str(i)]["fc"]["kernel"]) if i == 1 else 0.0
        np.testing.assert_allclose(diff["blocks"][str(i)]["fc"]["kernel"], want, rtol=1e-5, atol=1e-7)
        if i != 1:
            assert not np.any(np.asarray(u1["blocks"][str(i)]["fc"]["kernel"]))
    np.testing.assert_allclose(diff["head"]["kernel"], 0.5 * np.asarray(p["head"]["kernel"]), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="needs the parameters"):
        wd.update(g, wd.init(p))
    with pytest.raises(ValueError, match="weight_decay"):
        owlore(optax.scale_by_adam(), 2, weight_decay=-1.0)


def test_owlore_scan_layer_errors():
    p = _scanned(_layered(L=4))
    with pytest.raises(ValueError, match="matches no leaf"):
        owlore(optax.scale_by_adam(), 2, gamma=1).init(p)
    bad = dict(p, extra={"kernel": jnp.zeros((3, 8, 8))})
    with pytest.raises(ValueError, match="axis 0 .*has 3 layers"):
        owlore(optax.scale_by_adam(), 2, gamma=1, scan_layers=["scan/.*", "extra/kernel"]).init(bad)
    with pytest.raises(ValueError, match="does not batch axis 0"):
        owlore(optax.scale_by_adam(), 2, gamma=1, scan_layers="scan/.*",
               axes={"fc/kernel": Axes((), (0, 1), (2,))}).init(p)
