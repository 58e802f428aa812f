"""LoRA-SB and LoRA-XS (lrjax.reparam.lora_sb): init vs float64 NumPy transcriptions of the official
code, the orthonormality invariants, the exact projected one-step update of the core, materialized
vs factored paths, split/join and parameter counts, jit/stacks/vmap, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrjax
from lrjax.reparam import estimate_grads
from lrjax.reparam.lora_sb import LoRASB, LoRAXS


def _randn(seed, shape, dtype=jnp.float32):
    """Standard normal test data drawn by NumPy (eager jax.random compiles one program per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), dtype)

T, V = TypeError, ValueError


def _params(dtype=jnp.float32):
    rng = np.random.default_rng(4)  # NumPy draws: no eager jax.random program per shape
    f = lambda s, c=1.0: jnp.asarray((c * rng.standard_normal(s)).astype(np.float32), dtype)  # noqa: E731
    return {"d0": {"kernel": f((6, 8)), "bias": jnp.zeros(8, dtype)},
            "d1": {"kernel": f((8, 4), 0.5), "bias": jnp.zeros(4, dtype)}}


def _fwd(p, x):
    p = jax.tree.map(lambda t: t.astype(jnp.float32), p)
    return jnp.tanh(x @ p["d0"]["kernel"] + p["d0"]["bias"]) @ p["d1"]["kernel"] + p["d1"]["bias"]


def _loss(p, batch):
    x, y = batch
    return jnp.mean((_fwd(p, x) - y) ** 2)


def _batches(n=3):
    rng = np.random.default_rng(2)
    return [(jnp.asarray(rng.standard_normal((5, 6)), jnp.float32),
             jnp.asarray(rng.standard_normal((5, 4)), jnp.float32)) for _ in range(n)]


_G = {}


def _grads():
    if not _G:
        _G.update(estimate_grads(_loss, _params(), _batches(), "kernel"))
    return _G


def _np(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


_PATHS = {"d0/kernel": "d0", "d1/kernel": "d1"}


def _svd_pinned(x):
    """Thin SVD with lrjax's sign rule (largest-magnitude entry of each left vector positive)."""
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    for i in range(len(s)):
        j = np.argmax(np.abs(u[:, i]))
        if u[j, i] < 0:
            u[:, i] *= -1
            vt[i] *= -1
    return u, s, vt


# ------------------------------------------------------------------------------ LoRA-SB init
@pytest.mark.parametrize("alpha", [None, 6.0])
def test_lora_sb_init_matches_float64_transcription(alpha):
    """Official find_and_initialize_grad: dW~_t = -eta1 sign(sum_t grad_t) (torch, out x in); SVD of
    dW~_t^T = U S V^T (q = r); lora_A = U_r^T, lora_B = V_r, latent R = diag(S_r); here A = U_r,
    B = V_r^T, R = diag(S_r) / s (= the official R when alpha = r)."""
    rp = LoRASB(rank=2, alpha=alpha, eta1=3e-3)
    p, bs = _params(), _batches()
    base, ad = rp.init(jax.random.key(0), p, grads=_grads())
    assert base is p  # the base is not offset
    s = rp.scale
    for path, mod in _PATHS.items():
        gsum_t = sum(_np(jax.grad(_loss)(p, b)[mod]["kernel"]) for b in bs).T   # torch orientation, summed
        dw_t = -3e-3 * np.sign(gsum_t)
        u, sv, vt = _svd_pinned(dw_t.T)                                          # official: SVD of dW~_t^T
        assert sv[1] - sv[2] > 1e-2 * sv[0]  # a gap, so the rank-2 vectors are well defined
        lora_a, lora_b, latent = u[:, :2].T, vt[:2].T, np.diag(sv[:2])
        f = ad[path]
        np.testing.assert_allclose(_np(f["a"]), lora_a.T, atol=2e-5)
        np.testing.assert_allclose(_np(f["b"]), lora_b.T, atol=2e-5)
        np.testing.assert_allclose(_np(f["r"]), latent.T / s, rtol=2e-5, atol=1e-9)
        # s A R B = trunc_r(dW~) in the matrix view: the init contains the approximate first update
        delta = _np(rp.delta(base, ad)[path])
        np.testing.assert_allclose(delta, (u[:, :2] * sv[:2]) @ vt[:2], atol=1e-6)


def test_lora_xs_init_matches_float64_transcription():
    """Official find_and_initialize: SVD of target.weight.T (= lrjax's view) -> lora_A = (U_r S_r)^T,
    lora_B = V_r, R ~ N(0, 1e-5^2); the base is unchanged."""
    rp = LoRAXS(rank=2, alpha=4.0)
    p = _params()
    base, ad = rp.init(jax.random.key(0), p)
    assert base is p
    for path, mod in _PATHS.items():
        u, sv, vt = _svd_pinned(_np(p[mod]["kernel"]))
        np.testing.assert_allclose(_np(ad[path]["a"]), u[:, :2] * sv[:2], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(_np(ad[path]["b"]), vt[:2], atol=1e-5)
    # the core's spread: 1e-5 (official sigma), over a stack of 64 cores (256 draws)
    w = _randn(1, (64, 4, 4))
    _, ad = LoRAXS(rank=2).init(jax.random.key(2), {"stack": {"kernel": w}})
    core = _np(ad["stack/kernel"]["r"])
    assert core.shape == (64, 2, 2) and 0.8e-5 < core.std() < 1.2e-5 and abs(core.mean()) < 2e-6
    # output (almost) unchanged: exactly with core_std=0, within s |A||R||B| otherwise
    b0, a0 = LoRAXS(rank=2, core_std=0.0).init(jax.random.key(0), p)
    np.testing.assert_array_equal(np.asarray(LoRAXS(rank=2, core_std=0.0).materialize(b0, a0)["d0"]["kernel"]),
                                  np.asarray(p["d0"]["kernel"]))


def test_orthonormal_invariants():
    p, g = _params(), _grads()
    _, sb = LoRASB(rank=2).init(jax.random.key(0), p, grads=g)
    _, xs = LoRAXS(rank=2).init(jax.random.key(0), p)
    for path, mod in _PATHS.items():
        a, b = _np(sb[path]["a"]), _np(sb[path]["b"])
        np.testing.assert_allclose(a.T @ a, np.eye(2), atol=1e-6)          # A^T A = I_r (matrix view)
        np.testing.assert_allclose(b @ b.T, np.eye(2), atol=1e-6)          # B B^T = I_r
        r = _np(sb[path]["r"])
        np.testing.assert_array_equal(r, np.diag(np.diag(r)))              # diagonal core, descending
        assert np.all(np.diff(np.diag(r)) <= 0) and np.all(np.diag(r) >= 0)
        ax, bx = _np(xs[path]["a"]), _np(xs[path]["b"])
        sv = np.linalg.svd(_np(p[mod]["kernel"]), compute_uv=False)[:2]
        np.testing.assert_allclose(ax.T @ ax, np.diag(sv ** 2), rtol=1e-5, atol=1e-5)   # orthogonal columns
        np.testing.assert_allclose(bx @ bx.T, np.eye(2), atol=1e-6)


# -------------------------------------------------------------------------------- invariant
@pytest.mark.parametrize("cls", [LoRASB, LoRAXS])
def test_one_sgd_step_on_the_core_is_the_projected_gradient(cls):
    """R <- R - eta dL/dR moves W_eff by exactly -eta s^2 A A^T G B^T B (= -eta s^2 P_A G P_B for
    LoRA-SB), G = dL/dW_eff: checked in float64 from the core gradients JAX computes (only the core
    is differentiated: split/join)."""
    rp = cls(rank=2, alpha=4.0)  # s = 2
    p, bs = _params(), _batches()
    kw = {"grads": _grads()} if rp.needs_grads else {}
    base, ad = rp.init(jax.random.key(0), p, **kw)
    ad = {k: {**f, "r": f["r"] + 0.3 * jnp.eye(2)} for k, f in ad.items()}  # away from init: any R
    tr, fr = rp.split(ad)
    assert all(set(t) == {"r"} for t in tr.values()) and all(set(f) == {"a", "b"} for f in fr.values())
    gr = jax.grad(lambda t: _loss(rp.materialize(base, rp.join(t, fr)), bs[0]))(tr)
    assert all(set(t) == {"r"} for t in gr.values())
    eff = rp.materialize(base, ad)
    gw = jax.grad(_loss)(eff, bs[0])
    eta, s = 0.7, rp.scale
    for path, mod in _PATHS.items():
        a, b, r = _np(ad[path]["a"]), _np(ad[path]["b"]), _np(ad[path]["r"])
        new = s * a @ (r - eta * _np(gr[path]["r"])) @ b
        old = s * a @ r @ b
        G = _np(gw[mod]["kernel"])
        want = -eta * s * s * a @ a.T @ G @ b.T @ b
        np.testing.assert_allclose(new - old, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
        if cls is LoRASB:
            pa, pb = a @ np.linalg.pinv(a), np.linalg.pinv(b) @ b
            np.testing.assert_allclose(want, -eta * s * s * pa @ G @ pb, atol=1e-6 * np.abs(want).max())


# ------------------------------------------------------------------ factored path, dtypes
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("cls", [LoRASB, LoRAXS])
def test_factored_equals_materialized(cls, dtype):
    rp = cls(rank=2, alpha=4.0)
    p = _params(dtype)
    kw = {"grads": estimate_grads(_loss, p, _batches(), rp.targets)} if rp.needs_grads else {}
    base, ad = rp.init(jax.random.key(0), p, **kw)
    assert ad["d0/kernel"]["r"].dtype == dtype and base["d0"]["kernel"].dtype == dtype
    ad = {k: {**f, "r": (f["r"].astype(jnp.float32) + 0.2 * jnp.eye(2)).astype(dtype)} for k, f in ad.items()}

    def fwd(q, x):  # stays in the params' dtype so the factored path sees the kernels' own dtype
        h = jnp.tanh(x.astype(dtype) @ q["d0"]["kernel"] + q["d0"]["bias"])
        return h @ q["d1"]["kernel"] + q["d1"]["bias"]
    x = jnp.asarray(np.random.default_rng(3).standard_normal((7, 6)), dtype)
    stats = lrjax.reparam.FactoredStats()
    y_f = lrjax.factored(fwd, rp, stats=stats)(base, ad, x)
    y_m = fwd(rp.materialize(base, ad), x)
    assert stats.factored == 2 and not stats.fallback
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(_np(y_f), _np(y_m), rtol=tol, atol=tol)
    # gradients wrt the cores agree as well
    tr, fr = rp.split(ad)
    g_f = jax.grad(lambda t: jnp.sum(lrjax.factored(fwd, rp)(base, rp.join(t, fr), x).astype(jnp.float32)))(tr)
    g_m = jax.grad(lambda t: jnp.sum(fwd(rp.materialize(base, rp.join(t, fr)), x).astype(jnp.float32)))(tr)
    for k in g_f:
        np.testing.assert_allclose(_np(g_f[k]["r"]), _np(g_m[k]["r"]), rtol=5 * tol, atol=5 * tol)


def test_num_params_merge_unmerge_and_stacked_counts():
    p = _params()
    rp = LoRAXS(rank=2)
    base, ad = rp.init(jax.random.key(0), p)
    assert rp.num_params(ad) == 2 * 2 ** 2 and rp.trainable_keys == ("r",)
    assert rp.trainable_mask(ad) == {k: {"a": False, "r": True, "b": False} for k in ad}
    form = rp.factors(None, ad["d0/kernel"])  # exporters read the form without a base
    np.testing.assert_allclose(_np(form.a), _np(ad["d0/kernel"]["a"]) @ _np(ad["d0/kernel"]["r"]), atol=1e-6)
    ad = {k: {**f, "r": f["r"] + jnp.eye(2)} for k, f in ad.items()}
    merged = rp.merge(base, ad)
    np.testing.assert_allclose(_np(rp.unmerge(merged, ad)["d1"]["kernel"]), _np(p["d1"]["kernel"]), atol=1e-5)
    _, st = rp.init(jax.random.key(0), {"stack": {"kernel": jnp.ones((5, 4, 3))}})
    assert rp.num_params(st) == 5 * 4


# ------------------------------------------------------------------------- jit, stacks, vmap
def test_lora_sb_init_inside_jit_with_stacked_estimate_grads():
    rp = LoRASB(rank=2, eta1=1e-2)
    p, bs = _params(), _batches()
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *bs)

    @jax.jit
    def init_from_data(params, batches):
        return rp.init(jax.random.key(0), params, grads=estimate_grads(_loss, params, batches, rp.targets,
                                                                       stacked=True))
    _, ad = init_from_data(p, stacked)
    _, ad0 = rp.init(jax.random.key(0), p, grads=_grads())
    for k in ad:
        for f in ("a", "r", "b"):
            np.testing.assert_allclose(_np(ad[k][f]), _np(ad0[k][f]), atol=1e-5)


@pytest.mark.parametrize("cls", [LoRASB, LoRAXS])
def test_stacked_leaves_equal_per_slice_init_and_vmap(cls):
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((3, 6, 5)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((3, 6, 5)), jnp.float32)
    rp = cls(rank=2, core_std=0.0) if cls is LoRAXS else cls(rank=2)
    kw = (lambda gg, path: {"grads": {path: gg}}) if rp.needs_grads else (lambda gg, path: {})
    _, ad = rp.init(jax.random.key(0), {"stack": {"kernel": w}}, **kw(g, "stack/kernel"))
    assert ad["stack/kernel"]["r"].shape == (3, 2, 2)
    _, vad = jax.vmap(lambda wi, gi: rp.init(jax.random.key(0), {"kernel": wi}, **kw(gi, "kernel")))(w, g)
    for i in range(3):
        _, adi = rp.init(jax.random.key(0), {"kernel": w[i]}, **kw(g[i], "kernel"))
        for f in ("a", "r", "b"):
            np.testing.assert_allclose(_np(ad["stack/kernel"][f][i]), _np(adi["kernel"][f]), atol=1e-5)
            np.testing.assert_allclose(_np(vad["kernel"][f][i]), _np(adi["kernel"][f]), atol=1e-5)


def test_zero_gradient_is_refused_and_rank_one_gradient_is_finite():
    p = _params()
    rp = LoRASB(rank=2)
    with pytest.raises(ValueError, match=r"grads\['d0/kernel'\] is all zeros"):
        rp.init(jax.random.key(0), p, grads={k: jnp.zeros_like(v) for k, v in _grads().items()})
    g = {k: jnp.outer(jnp.arange(1.0, v.shape[0] + 1), 1.0 + jnp.arange(v.shape[1])) for k, v in _grads().items()}
    base, ad = rp.init(jax.random.key(0), p, grads=g)  # sign(G) has rank 1: the second core entry is ~0
    for f in ad.values():
        assert np.all(np.isfinite(_np(f["r"]))) and np.abs(_np(f["r"])[1, 1]) < 1e-6 * np.abs(_np(f["r"])[0, 0])
        np.testing.assert_allclose(_np(f["a"]).T @ _np(f["a"]), np.eye(2), atol=1e-5)


def test_official_eta1():
    assert LoRASB.official_eta1(1e-3, 0.06, 1000) == pytest.approx(1e-3 / 60)
    with pytest.raises(V, match="warmup_ratio"):
        LoRASB.official_eta1(1e-3, 0.0, 1000)
    with pytest.raises(T, match="total_steps"):
        LoRASB.official_eta1(1e-3, 0.06, 10.5)
    with pytest.raises(V, match="lr"):
        LoRASB.official_eta1(-1.0, 0.06, 10)


# -------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("make,exc,match", [
    (lambda: LoRASB(eta1=0.0), V, "eta1"),
    (lambda: LoRASB(eta1="1e-3"), T, "eta1"),
    (lambda: LoRASB(n_iter=-1), V, "n_iter"),
    (lambda: LoRAXS(core_std=-1e-5), V, "core_std"),
    (lambda: LoRAXS(core_std=float("nan")), V, "core_std"),
    (lambda: LoRAXS(rank=0), V, "rank"),
])
def test_bad_config(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_bad_init_and_adapters():
    p, g = _params(), _grads()
    with pytest.raises(V, match="grads: LoRASB is a data-aware init"):
        LoRASB(rank=2).init(jax.random.key(0), p)
    with pytest.raises(V, match="grads: LoRAXS does not use gradients"):
        LoRAXS(rank=2).init(jax.random.key(0), p, grads=g)
    with pytest.raises(V, match=r"grads: 'd1/bias' is not targeted"):
        LoRASB(rank=2).init(jax.random.key(0), p, grads={**g, "d1/bias": jnp.zeros(4)})
    with pytest.raises(V, match=r"rank=5 exceeds min\(M, N\) = 4 for leaf 'd1/kernel'"):
        LoRAXS(rank=5).init(jax.random.key(0), p)
    rp = LoRAXS(rank=2)
    base, ad = rp.init(jax.random.key(0), p)
    with pytest.raises(V, match=r"adapters\['d0/kernel'\]\['r'\]: the core must have shape \(2, 2\)"):
        rp.materialize(base, {**ad, "d0/kernel": {**ad["d0/kernel"], "r": jnp.zeros((2, 3))}})
    with pytest.raises(V, match=r"adapters\['d0/kernel'\] has no factor 'r'"):
        rp.materialize(base, {**ad, "d0/kernel": {"a": ad["d0/kernel"]["a"], "b": ad["d0/kernel"]["b"]}})
    with pytest.raises(T, match=r"adapters\['d0/kernel'\]\['r'\] has dtype int32"):
        rp.materialize(base, {**ad, "d0/kernel": {**ad["d0/kernel"], "r": jnp.zeros((2, 2), jnp.int32)}})
    with pytest.raises(V, match=r"factors have rank 2 but this LoRAXS has rank=1"):
        LoRAXS(rank=1).materialize(base, ad)
    with pytest.raises(V, match=r"unknown factor 'm'"):
        rp.materialize(base, {**ad, "d0/kernel": {**ad["d0/kernel"], "m": jnp.ones(8)}})
    with pytest.raises(V, match=r"adapters\['d0/kernel'\]\['r'\] contains NaN"):
        rp.merge(base, {**ad, "d0/kernel": {**ad["d0/kernel"], "r": jnp.full((2, 2), jnp.nan)}})
