"""CoDyRA (gated LoRA, prune, task switch) and the proximal soft-threshold optax step, against
float64 NumPy transcriptions of the paper's / official code's equations."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lrjax
from lrjax.optim.prox import (SoftThresholdState, codyra_lambda_schedule, factor_mask,
                              prox_soft_threshold, soft_threshold)
from lrjax.reparam.codyra import CoDyRA


def _params(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)  # noqa: E731
    return {"fc": {"kernel": f(6, 5), "bias": f(5)}, "stack": {"kernel": f(3, 4, 5)}}


def _trained(rp, params, seed=1):
    """Adapters with non-zero B (as after training) and some gates set to exactly 0 (built in NumPy:
    eager per-op dispatch of many small jax ops is slow on a loaded CPU)."""
    rng = np.random.default_rng(seed)
    dt = params["fc"]["kernel"].dtype if rp.dtype is None else rp.dtype
    r = rp.rank
    shapes = {"fc/kernel": ((6, r), (r, 5), (r,)), "stack/kernel": ((3, 4, r), (3, r, 5), (3, r))}
    out = {p: {k: rng.standard_normal(s) for k, s in zip("abg", sh)} for p, sh in shapes.items()}
    out["fc/kernel"]["g"][[0, 2]] = 0.0
    out["stack/kernel"]["g"][:, 1] = 0.0
    out["stack/kernel"]["g"][0, 3] = 0.0
    return params, {p: {k: jnp.asarray(x, dt) for k, x in f.items()} for p, f in out.items()}


def _ref_eff(w, f, s):
    """float64 ``W + s A diag(g) B`` over a leading batch axis (``[*batch, M, N]`` views)."""
    a, b, g = (np.asarray(f[k], np.float64) for k in ("a", "b", "g"))
    return np.asarray(w, np.float64) + s * np.einsum("...mr,...r,...rn->...mn", a, g, b)


def _mlp(params, x):
    h = jnp.tanh(x @ params["fc"]["kernel"] + params["fc"]["bias"])
    for k in range(3):
        h = jnp.tanh(h[..., :4] @ params["stack"]["kernel"][k])
    return h


# ------------------------------------------------------------------------------ reparam
def test_init_unchanged_lora_a_and_gate_shapes():
    params = _params()
    rp = CoDyRA(rank=3)
    base, ad = rp.init(jax.random.key(0), params)
    assert base is params
    assert set(ad["fc/kernel"]) == {"a", "b", "g"}
    assert ad["fc/kernel"]["g"].shape == (3,) and ad["stack/kernel"]["g"].shape == (3, 3)
    _, lora = lrjax.LoRA(rank=3).init(jax.random.key(0), params)
    for p in ad:  # A as LoRA's (kaiming-uniform from the same per-leaf key), B = 0
        np.testing.assert_array_equal(ad[p]["a"], lora[p]["a"])
        assert not np.any(np.asarray(ad[p]["b"]))
        assert np.all(np.asarray(ad[p]["g"]) != 0)
    eff = rp.materialize(base, ad)
    for x, y in zip(jax.tree_util.tree_leaves(eff), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(x, y)
    assert rp.scale == 1.0 and CoDyRA(rank=4, alpha=2.0).scale == 0.5
    # bfloat16 factors on a float32 base: still exactly the base at init
    rp16 = CoDyRA(rank=3, dtype=jnp.bfloat16)
    b16, ad16 = rp16.init(jax.random.key(0), params)
    assert ad16["fc/kernel"]["g"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(rp16.materialize(b16, ad16)["fc"]["kernel"], params["fc"]["kernel"])


def test_gates_are_standard_normal():
    w = {"kernel": jnp.zeros((64, 64))}
    _, ad = CoDyRA(rank=64).init(jax.random.key(3), w)
    g = np.asarray(ad["kernel"]["g"], np.float64)
    assert abs(g.mean()) < 0.4 and 0.7 < g.std() < 1.3  # N(0, 1), 64 draws


@pytest.mark.parametrize("alpha", [None, 2.0])
def test_materialize_equals_numpy_and_factored(alpha):
    params = _params()
    rp = CoDyRA(rank=4, alpha=alpha)
    s = 1.0 if alpha is None else alpha / 4
    base, ad = _trained(rp, params)
    eff = rp.materialize(base, ad)
    np.testing.assert_allclose(eff["fc"]["kernel"], _ref_eff(params["fc"]["kernel"], ad["fc/kernel"], s),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(eff["stack"]["kernel"],
                               _ref_eff(params["stack"]["kernel"], ad["stack/kernel"], s), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(eff["fc"]["bias"], params["fc"]["bias"])
    x = jnp.asarray(np.random.default_rng(5).standard_normal((7, 6)), jnp.float32)
    np.testing.assert_allclose(lrjax.factored(_mlp, rp)(base, ad, x), _mlp(eff, x), rtol=1e-5, atol=1e-5)


def test_bfloat16_factored_and_vmap_over_adapters():
    params = _params(dtype=jnp.bfloat16)
    rp = CoDyRA(rank=4)
    base, ad = _trained(rp, params)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((7, 6)), jnp.bfloat16)
    eff = rp.materialize(base, ad)
    assert eff["fc"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(eff["fc"]["kernel"], np.float32),
                               _ref_eff(params["fc"]["kernel"].astype(jnp.float32), ad["fc/kernel"], 1.0),
                               rtol=1e-2, atol=2e-2)  # one bfloat16 rounding of the f32 result
    fc = lambda ps, x: x @ ps["fc"]["kernel"]  # noqa: E731
    y_f = lrjax.factored(fc, rp)(base, ad, x)
    np.testing.assert_allclose(np.asarray(y_f, np.float32), np.asarray(fc(eff, x), np.float32), rtol=2e-2, atol=5e-2)
    # vmap over a stack of adapters (e.g. seeds)
    stacked = jax.tree.map(lambda v: jnp.stack([v, 2 * v]), ad)
    out = jax.vmap(lambda a: rp.materialize(base, a)["fc"]["kernel"])(stacked)
    np.testing.assert_array_equal(out[0], eff["fc"]["kernel"])


def test_gate_gradient_equals_numpy():
    """d/dg_j sum(C * W_eff) = s (A^T C B^T)_jj: the gate enters as diag(g) between A and B."""
    params = _params()
    rp = CoDyRA(rank=4, alpha=2.0)
    base, ad = _trained(rp, params)
    c = np.random.default_rng(9).standard_normal((6, 5))
    loss = lambda a: jnp.sum(jnp.asarray(c, jnp.float32) * rp.materialize(base, a)["fc"]["kernel"])  # noqa: E731
    gr = jax.grad(loss)(ad)["fc/kernel"]
    a, b = (np.asarray(ad["fc/kernel"][k], np.float64) for k in ("a", "b"))
    g = np.asarray(ad["fc/kernel"]["g"], np.float64)
    np.testing.assert_allclose(gr["g"], 0.5 * np.diag(a.T @ c @ b.T), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gr["a"], 0.5 * c @ b.T * g[None, :], rtol=1e-5, atol=1e-5)


def test_prune_drops_zero_gates_and_keeps_function():
    params = _params()
    rp = CoDyRA(rank=4)
    base, ad = _trained(rp, params)
    pr = rp.prune(ad)
    assert pr["fc/kernel"]["a"].shape == (6, 2) and pr["fc/kernel"]["b"].shape == (2, 5)
    np.testing.assert_array_equal(pr["fc/kernel"]["g"], np.asarray(ad["fc/kernel"]["g"])[[1, 3]])
    # stack: rank 1 is zero in every layer -> dropped; rank 3 is zero in layer 0 only -> kept
    assert pr["stack/kernel"]["g"].shape == (3, 3)
    np.testing.assert_array_equal(pr["stack/kernel"]["a"], np.asarray(ad["stack/kernel"]["a"])[..., [0, 2, 3]])
    assert {p: np.asarray(v).tolist() for p, v in rp.active_ranks(ad).items()} == \
        {"fc/kernel": 2, "stack/kernel": [2, 3, 3]}
    e0, e1 = rp.materialize(base, ad), rp.materialize(base, pr)
    for x, y in zip(jax.tree_util.tree_leaves(e0), jax.tree_util.tree_leaves(e1)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
    # all gates zero -> a rank-0 adapter: materialize = base, merge works, factored works
    ad["fc/kernel"]["g"] = jnp.zeros(4)
    pr0 = rp.prune(ad)
    assert pr0["fc/kernel"]["a"].shape == (6, 0) and pr0["fc/kernel"]["g"].shape == (0,)
    np.testing.assert_array_equal(rp.merge(base, pr0)["fc"]["kernel"], params["fc"]["kernel"])
    x = jnp.ones((2, 6))
    np.testing.assert_allclose(lrjax.factored(_mlp, rp)(base, pr0, x), _mlp(rp.materialize(base, pr0), x),
                               rtol=1e-5, atol=1e-6)
    # pruning twice is a no-op
    pr2 = rp.prune(pr)
    for x, y in zip(jax.tree_util.tree_leaves(pr), jax.tree_util.tree_leaves(pr2)):
        np.testing.assert_array_equal(x, y)


def test_next_task_merges_and_keeps_function():
    params = _params()
    rp = CoDyRA(rank=4)
    base, ad = _trained(rp, params)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((5, 6)), jnp.float32)
    before = _mlp(rp.materialize(base, ad), x)
    for adapters in (ad, rp.prune(ad)):
        nb, na = rp.next_task(jax.random.key(7), base, adapters)
        np.testing.assert_allclose(nb["fc"]["kernel"], _ref_eff(params["fc"]["kernel"], ad["fc/kernel"], 1.0),
                                   rtol=1e-5, atol=1e-5)
        after = _mlp(rp.materialize(nb, na), x)
        np.testing.assert_array_equal(after, _mlp(nb, x))
        np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)
        assert na["fc/kernel"]["a"].shape == (6, 4) and na["fc/kernel"]["g"].shape == (4,)  # initial rank again
        assert not np.any(np.asarray(na["fc/kernel"]["b"]))
        assert not np.allclose(na["fc/kernel"]["g"], ad["fc/kernel"]["g"])


# --------------------------------------------------------------------------- prox step
def _np_soft(x, lam):
    return np.sign(x) * np.maximum(np.abs(x) - lam, 0.0)


def test_prox_step_equals_closed_form_with_exact_zeros():
    rng = np.random.default_rng(0)
    lam = 0.3
    p = rng.standard_normal((4, 50)).astype(np.float32)
    u = rng.standard_normal((4, 50)).astype(np.float32) * 0.5
    x = p.astype(np.float64) + u
    u[np.abs(np.abs(x) - lam) < 1e-3] += 0.01  # keep away from the threshold itself (f32 vs f64 rounding)
    u[0, :5] = -p[0, :5]  # p + u = 0 exactly
    params = {"g": jnp.asarray(p), "w": jnp.asarray(p)}
    updates = {"g": jnp.asarray(u), "w": jnp.asarray(u)}
    tx = prox_soft_threshold(lam, mask={"g": True, "w": False})
    st = tx.init(params)
    new_u, st = tx.update(updates, st, params)
    out = optax.apply_updates(params, new_u)
    ref = _np_soft(p.astype(np.float64) + u, lam)
    assert np.sum(ref == 0) > 20
    np.testing.assert_array_equal(np.asarray(out["g"]) == 0, ref == 0)
    np.testing.assert_allclose(out["g"], ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(new_u["w"], u)  # unmasked: passed through
    assert isinstance(st, SoftThresholdState) and int(st.count) == 1
    # lam = 0 is the identity; the elementwise helper is the same map
    u0, _ = prox_soft_threshold(0.0).update(updates, prox_soft_threshold(0.0).init(params), params)
    np.testing.assert_array_equal(u0["g"], u)
    np.testing.assert_allclose(soft_threshold(jnp.asarray(x, jnp.float32), lam), _np_soft(x, lam), atol=1e-6)


def test_prox_bfloat16_exact_zeros():
    p = jnp.asarray([0.1, -0.2, 1.5, -2.0], jnp.bfloat16)
    u = jnp.asarray([0.05, 0.1, 0.0, 0.25], jnp.bfloat16)
    tx = prox_soft_threshold(0.5)
    nu, _ = tx.update(u, tx.init(p), p)
    out = optax.apply_updates(p, nu)
    assert out.dtype == jnp.bfloat16 and nu.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out[:2], np.float32), [0.0, 0.0])
    np.testing.assert_allclose(np.asarray(out[2:], np.float32), [1.0, -1.25], atol=1e-2)


def test_chain_sgd_prox_is_proximal_gradient_and_jits():
    """chain(sgd(lr), prox(lam_t)) = g <- S_{lam_t}(g - lr grad f(g)) (float64 NumPy), eager and jit."""
    rng = np.random.default_rng(1)
    c = rng.standard_normal(12)
    h = np.abs(rng.standard_normal(12)) + 0.5
    lr = 0.2
    sched = lambda t: 0.05 * (t + 1)  # noqa: E731
    ad = {"w/kernel": {"a": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32),
                       "b": jnp.zeros((2, 4)), "g": jnp.asarray(rng.standard_normal(12), jnp.float32)}}
    f = lambda ad: 0.5 * jnp.sum(jnp.asarray(h, jnp.float32) * (ad["w/kernel"]["g"] - c) ** 2) \
        + jnp.sum(ad["w/kernel"]["a"] ** 2)  # noqa: E731
    tx = optax.chain(optax.sgd(lr), prox_soft_threshold(sched, mask=factor_mask(ad, "g")))

    def step(ad, st):
        u, st = tx.update(jax.grad(f)(ad), st, ad)
        return optax.apply_updates(ad, u), st

    g_ref = np.asarray(ad["w/kernel"]["g"], np.float64)
    a_ref = np.asarray(ad["w/kernel"]["a"], np.float64)
    eager, jitted = (ad, tx.init(ad)), (ad, tx.init(ad))
    jstep = jax.jit(step)
    for t in range(6):
        g_ref = _np_soft(g_ref - lr * h * (g_ref - c), sched(t))
        a_ref = a_ref - lr * 2 * a_ref  # unmasked: plain SGD
        eager, jitted = step(*eager), jstep(*jitted)
        for got in (eager[0], jitted[0]):
            np.testing.assert_allclose(got["w/kernel"]["g"], g_ref, rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(np.asarray(got["w/kernel"]["g"]) == 0, g_ref == 0)
            np.testing.assert_allclose(got["w/kernel"]["a"], a_ref, rtol=1e-5, atol=1e-6)
    assert np.sum(g_ref == 0) >= 3 and int(jitted[1][1].count) == 6


def test_prox_callable_mask_and_traced_negative_schedule_poisons():
    params = {"p": {"a": jnp.ones(3), "g": jnp.asarray([0.1, -1.0, 2.0])}}
    tx = prox_soft_threshold(0.5, mask=lambda ps: factor_mask(ps, "g"))
    u, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(optax.apply_updates(params, u)["p"]["g"], [0.0, -0.5, 1.5])
    np.testing.assert_array_equal(u["p"]["a"], 0.0)
    bad = prox_soft_threshold(lambda t: jnp.where(t > 0, -1.0, 0.0))
    st = bad.init(params)
    upd = jax.jit(bad.update)
    z = jax.tree.map(jnp.zeros_like, params)
    u, st = upd(z, st, params)
    assert np.all(np.isfinite(u["p"]["g"]))
    u, st = upd(z, st, params)  # step 1: lam = -1 under jit -> NaN, never a silent expansion
    assert np.all(np.isnan(u["p"]["g"]))


# ----------------------------------------------------------------------------- schedule
def _official_thresholds(total, kappa, dense_frac, n):
    """The threshold actually applied at each iteration, transcribed from the official training
    loop's control flow (None where no threshold is applied)."""
    lambdas = np.linspace(0, kappa, n)
    dense = dense_frac * total
    step = int((total - dense) // n)
    j, lam, out = 0, lambdas[0], []
    for it in range(total):
        if step > 0 and it >= dense and it % step == 0:
            j += 1
            lam = lambdas[min(n - 1, j)]
        out.append(lam if it > dense else None)
    return out


@pytest.mark.parametrize("total,kappa,frac,n", [(500, 0.005, 0.5, 50), (1000, 7e-4, 0.5, 50),
                                                 (237, 0.01, 0.3, 7), (60, 1.0, 0.0, 4)])
def test_schedule_matches_official_loop(total, kappa, frac, n):
    s = codyra_lambda_schedule(total, kappa, frac, n)
    ref = _official_thresholds(total, kappa, frac, n)
    got = np.asarray(jax.jit(jax.vmap(s))(jnp.arange(total)))
    want = np.array([0.0 if r is None else r for r in ref])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


def test_schedule_key_steps():
    s = codyra_lambda_schedule(500, 0.005)
    k = 0.005 / 49
    for t, v in [(0, 0.0), (250, 0.0), (251, k), (254, k), (255, 2 * k), (489, 48 * k), (490, 0.005),
                 (499, 0.005), (5000, 0.005)]:
        assert math.isclose(float(s(t)), v, rel_tol=1e-6, abs_tol=1e-12), (t, float(s(t)), v)


# ---------------------------------------------------------------------------- bad input
def test_bad_prox_inputs():
    params = {"g": jnp.ones(3)}
    with pytest.raises(ValueError, match="lam"):
        prox_soft_threshold(-0.1)
    with pytest.raises(ValueError, match="lam"):
        prox_soft_threshold(float("nan"))
    with pytest.raises(TypeError, match="lam"):
        prox_soft_threshold("0.1")
    with pytest.raises(TypeError, match="lam"):
        prox_soft_threshold(True)
    with pytest.raises(ValueError, match="lam"):  # a schedule's concrete value is checked eagerly
        prox_soft_threshold(lambda t: -1.0).init(params)
    with pytest.raises(TypeError, match="mask"):
        prox_soft_threshold(0.1, mask={"g": 1})
    with pytest.raises(ValueError, match="mask"):
        prox_soft_threshold(0.1, mask={"h": True}).init(params)
    with pytest.raises(ValueError, match="mask"):
        prox_soft_threshold(0.1, mask={"g": True, "h": False}).init(params)
    tx = prox_soft_threshold(0.1)
    with pytest.raises(TypeError, match="params"):
        tx.update(params, tx.init(params))
    with pytest.raises(ValueError, match="params"):
        tx.update(params, tx.init(params), {"g": jnp.ones(3), "h": jnp.ones(1)})
    with pytest.raises(TypeError, match="keys"):
        factor_mask({"p": {"g": jnp.ones(2)}}, 3)
    with pytest.raises(ValueError, match="keys"):
        factor_mask({"p": {"a": jnp.ones(2)}}, "g")
    with pytest.raises(TypeError, match="adapters"):
        factor_mask([jnp.ones(2)])


def test_bad_schedule_inputs():
    with pytest.raises(ValueError, match="total_steps"):
        codyra_lambda_schedule(60, 0.01, 0.5, 50)  # 30 sparse steps < 50 levels
    with pytest.raises(TypeError, match="total_steps"):
        codyra_lambda_schedule(500.0, 0.01)
    with pytest.raises(ValueError, match="kappa_max"):
        codyra_lambda_schedule(500, -0.01)
    with pytest.raises(ValueError, match="dense_fraction"):
        codyra_lambda_schedule(500, 0.01, 1.0)
    with pytest.raises(ValueError, match="n_levels"):
        codyra_lambda_schedule(500, 0.01, 0.5, 1)


def test_bad_codyra_inputs():
    params = _params()
    rp = CoDyRA(rank=4)
    base, ad = _trained(rp, params)
    big = {p: dict(f) for p, f in ad.items()}
    big["fc/kernel"] = {"a": jnp.ones((6, 5)), "b": jnp.ones((5, 5)), "g": jnp.ones(5)}
    with pytest.raises(ValueError, match="adapters.*rank 5"):
        rp.materialize(base, big)
    bad_g = {p: dict(f) for p, f in ad.items()}
    bad_g["fc/kernel"]["g"] = jnp.ones(3)
    with pytest.raises(ValueError, match=r"adapters.*\['g'\]"):
        rp.materialize(base, bad_g)
    with pytest.raises(ValueError, match=r"adapters.*\['g'\]"):
        rp.prune(bad_g)
    with pytest.raises(ValueError, match="adapters.*'g'"):
        rp.materialize(base, {"fc/kernel": {"a": jnp.ones((6, 2)), "b": jnp.ones((2, 5))}})
    with pytest.raises(TypeError, match="adapters"):
        rp.prune([ad])
    with pytest.raises(TypeError, match="adapters.*jit"):
        jax.jit(rp.prune)(ad)
    nan = {p: dict(f) for p, f in ad.items()}
    nan["fc/kernel"]["g"] = nan["fc/kernel"]["g"].at[1].set(jnp.nan)
    with pytest.raises(ValueError, match="adapters.*NaN"):
        rp.prune(nan)
    with pytest.raises(ValueError, match="adapters.*NaN"):
        rp.next_task(jax.random.key(1), base, nan)
    with pytest.raises(TypeError, match="key"):
        rp.next_task(3, base, ad)
    with pytest.raises(ValueError, match="adapters"):
        rp.next_task(jax.random.key(1), base, {"fc/kernel": ad["fc/kernel"]})


@pytest.mark.parametrize("args,exc,name", [
    ((["x"],), TypeError, "adapters"), (({"k": [1]},), TypeError, "adapters"),
    (({"k": {"a": 1}}, 3), TypeError, "keys"), (({"k": {"a": 1}}, ()), TypeError, "keys"),
    (({"k": {"a": 1}}, "g"), ValueError, "keys"),
])
def test_factor_mask_bad_input(args, exc, name):
    with pytest.raises(exc, match=name):
        factor_mask(*args)
