"""LoRA / rsLoRA / DoRA / PiSSA against float64 NumPy math, invariants, errors, the factored path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import lrjax
from lrjax import reparam
from lrjax.axes import Axes


def _randn(seed, shape, dtype=jnp.float32):
    """Standard normal test data drawn by NumPy (eager jax.random compiles one program per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), dtype)

VARIANTS = {
    "lora": lambda r: lrjax.LoRA(rank=r, alpha=3.0),
    "rslora": lambda r: lrjax.RSLoRA(rank=r, alpha=3.0),
    "dora": lambda r: lrjax.DoRA(rank=r, alpha=3.0),
    "pissa": lambda r: lrjax.PiSSA(rank=r, alpha=3.0),
}


def _params(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)  # noqa: E731
    return {"fc": {"kernel": f(6, 5), "bias": f(5)},
            "attn": {"query": {"kernel": f(6, 2, 3)}, "out": {"kernel": f(2, 3, 6)}},
            "conv": {"kernel": f(3, 3, 2, 4)},
            "stack": {"kernel": f(3, 4, 5)}}


# numpy float64 matrix views, written independently of lrjax.axes
VIEWS = {
    "fc/kernel": (lambda w: w[None], lambda m, s: m[0]),
    "attn/query/kernel": (lambda w: w.reshape(1, 6, 6), lambda m, s: m.reshape(s)),
    "attn/out/kernel": (lambda w: w.reshape(1, 6, 6), lambda m, s: m.reshape(s)),
    "conv/kernel": (lambda w: w.reshape(1, 18, 4), lambda m, s: m.reshape(s)),
    "stack/kernel": (lambda w: w, lambda m, s: m),
}


def _perturb(adapters, seed=1, scale=0.3):
    leaves, td = jax.tree_util.tree_flatten(adapters)
    rng = np.random.default_rng(seed)  # NumPy draws: no eager jax.random program per leaf shape
    return jax.tree_util.tree_unflatten(
        td, [jnp.asarray(np.asarray(x, np.float32) + scale * rng.standard_normal(x.shape), x.dtype) for x in leaves])


def _ref_eff(name, rp, w, f):
    a = np.asarray(f["a"], np.float64).reshape((-1,) + f["a"].shape[-2:])
    b = np.asarray(f["b"], np.float64).reshape((-1,) + f["b"].shape[-2:])
    r = a.shape[-1]
    s = 3.0 / np.sqrt(r) if name == "rslora" else 3.0 / r
    v = w + s * a @ b
    if name == "dora":
        m = np.asarray(f["m"], np.float64).reshape(v.shape[0], -1)
        v = v * (m / np.linalg.norm(v, axis=-2))[:, None, :]
    return v


@pytest.mark.parametrize("name", list(VARIANTS))
def test_materialize_matches_float64(name):
    rp = VARIANTS[name](2)
    params = _params()
    base, ad = rp.init(jax.random.key(0), params)
    assert sorted(ad) == sorted(VIEWS)  # bias not targeted by the default "kernel"
    ad = _perturb(ad)
    eff = lrjax.tree.flatten(rp.materialize(base, ad))
    for path, (to_m, from_m) in VIEWS.items():
        w = to_m(np.asarray(lrjax.tree.get(base, path), np.float64))
        want = from_m(_ref_eff(name, rp, w, ad[path]), eff[path].shape)
        np.testing.assert_allclose(np.asarray(eff[path]), want, rtol=1e-5, atol=1e-5, err_msg=path)
    np.testing.assert_array_equal(eff["fc/bias"], params["fc"]["bias"])


def test_pissa_factors_are_the_principal_triplets_float64():
    params = _params()
    rp = lrjax.PiSSA(rank=2, alpha=3.0)
    base, ad = rp.init(jax.random.key(0), params)
    w = np.asarray(params["fc"]["kernel"], np.float64)
    u, s, vt = np.linalg.svd(w)
    trunc = (u[:, :2] * s[:2]) @ vt[:2]
    f = ad["fc/kernel"]
    np.testing.assert_allclose(rp.scale * np.asarray(f["a"] @ f["b"], np.float64), trunc, atol=1e-5)
    np.testing.assert_allclose(np.asarray(base["fc"]["kernel"]), w - trunc, atol=1e-5)
    # A^T A = B B^T = diag(S_r / s): the factors are balanced
    np.testing.assert_allclose(np.asarray(f["a"].T @ f["a"]), np.diag(s[:2] / rp.scale), atol=1e-5)
    np.testing.assert_allclose(np.asarray(f["b"] @ f["b"].T), np.diag(s[:2] / rp.scale), atol=1e-5)
    # randomized variant agrees on a matrix with a spectral gap
    rp2 = lrjax.PiSSA(rank=2, alpha=3.0, n_iter=8)
    base2, _ = rp2.init(jax.random.key(0), params)
    np.testing.assert_allclose(base2["fc"]["kernel"], base["fc"]["kernel"], atol=5e-3)


def test_mlp_output_matches_float64():
    rng = np.random.default_rng(5)
    params = {"l1": {"kernel": jnp.asarray(rng.standard_normal((8, 7)), jnp.float32)},
              "l2": {"kernel": jnp.asarray(rng.standard_normal((7, 3)), jnp.float32)}}
    x = rng.standard_normal((4, 8))
    fwd = lambda p, x: jnp.tanh(x @ p["l1"]["kernel"]) @ p["l2"]["kernel"]  # noqa: E731
    for name, mk in VARIANTS.items():
        rp = mk(3)
        base, ad = rp.init(jax.random.key(2), params)
        ad = _perturb(ad)
        y = fwd(rp.materialize(base, ad), jnp.asarray(x, jnp.float32))
        w1 = _ref_eff(name, rp, np.asarray(base["l1"]["kernel"], np.float64)[None], ad["l1/kernel"])[0]
        w2 = _ref_eff(name, rp, np.asarray(base["l2"]["kernel"], np.float64)[None], ad["l2/kernel"])[0]
        np.testing.assert_allclose(np.asarray(y), np.tanh(x @ w1) @ w2, rtol=1e-5, atol=1e-5, err_msg=name)


# ------------------------------------------------------------------ invariants (hypothesis)
dims = st.integers(2, 7)


@settings(max_examples=12)
@given(m=dims, n=dims, r=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_init_leaves_model_unchanged_exactly(m, n, r, seed):
    r = min(r, m, n)
    w = jnp.asarray(np.random.default_rng(seed).standard_normal((m, n)), jnp.float32)
    for rp in (lrjax.LoRA(rank=r, alpha=2.0), lrjax.RSLoRA(rank=r), lrjax.DoRA(rank=r, alpha=5.0)):
        base, ad = rp.init(jax.random.key(seed), {"k": {"kernel": w}})
        np.testing.assert_array_equal(rp.materialize(base, ad)["k"]["kernel"], w)


@settings(max_examples=12)
@given(m=dims, n=dims, r=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_pissa_reconstructs_and_merge_unmerge_roundtrip(m, n, r, seed):
    r = min(r, m, n)
    w = jnp.asarray(np.random.default_rng(seed).standard_normal((m, n)), jnp.float32)
    p = {"k": {"kernel": w}}
    base, ad = lrjax.PiSSA(rank=r, alpha=2.0).init(jax.random.key(0), p)
    np.testing.assert_allclose(lrjax.PiSSA(rank=r, alpha=2.0).materialize(base, ad)["k"]["kernel"], w,
                               atol=2e-5 * float(jnp.abs(w).max()) * max(m, n))
    for rp in (lrjax.LoRA(rank=r), lrjax.RSLoRA(rank=r, alpha=3.0), lrjax.PiSSA(rank=r)):
        base, ad = rp.init(jax.random.key(seed), p)
        ad = _perturb(ad, seed=seed)
        back = rp.unmerge(rp.merge(base, ad), ad)["k"]["kernel"]
        np.testing.assert_allclose(back, base["k"]["kernel"], atol=1e-5 * (1 + float(jnp.abs(w).max())))
    rp = lrjax.DoRA(rank=r)
    base, ad = rp.init(jax.random.key(seed), p)
    ad = _perturb(ad, seed=seed, scale=0.05)
    norms = rp.column_norms(base, ad)
    back = rp.unmerge_with_norms(rp.merge(base, ad), ad, norms)["k"]["kernel"]
    np.testing.assert_allclose(back, w, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- jit / grad / vmap / dtypes
def test_grads_match_analytic_float64_and_dora_norm_is_detached():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((5, 4))
    g = rng.standard_normal((5, 4))
    p = {"k": {"kernel": jnp.asarray(w, jnp.float32)}}
    loss = lambda rp, ad: jnp.sum(jnp.asarray(g, jnp.float32) * rp.materialize(p, ad)["k"]["kernel"])  # noqa
    for rp in (lrjax.LoRA(rank=2, alpha=3.0), lrjax.DoRA(rank=2, alpha=3.0)):
        _, ad = rp.init(jax.random.key(0), p)
        ad = _perturb(ad)
        gr = jax.jit(jax.grad(lambda ad: loss(rp, ad)))(ad)["k/kernel"]
        a, b = (np.asarray(ad["k/kernel"][k], np.float64) for k in "ab")
        s = rp.scale
        gv = g
        if isinstance(rp, lrjax.DoRA):
            m = np.asarray(ad["k/kernel"]["m"], np.float64)
            v = w + s * a @ b
            nrm = np.linalg.norm(v, axis=0)  # treated as a constant (detached)
            gv = g * (m / nrm)
            np.testing.assert_allclose(gr["m"], np.sum(g * v, axis=0) / nrm, rtol=1e-5)
        np.testing.assert_allclose(gr["a"], s * gv @ b.T, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(gr["b"], s * a.T @ gv, rtol=1e-5, atol=1e-6)


def test_vmap_over_a_population_of_adapters():
    p = _params()
    rp = lrjax.LoRA(rank=2, targets="fc/kernel")
    _, ad = rp.init(jax.random.key(0), p)
    pop = jax.vmap(lambda k: _perturb(ad, seed=0) if False else jax.tree.map(
        lambda x: x + jax.random.normal(k, x.shape), ad))(jax.random.split(jax.random.key(1), 4))
    out = jax.vmap(lambda a: rp.materialize(p, a)["fc"]["kernel"])(pop)
    for i in range(4):
        one = jax.tree.map(lambda x: x[i], pop)
        np.testing.assert_allclose(out[i], rp.materialize(p, one)["fc"]["kernel"], rtol=1e-6)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_bfloat16(name):
    p = _params(dtype=jnp.bfloat16)
    rp = VARIANTS[name](2)
    base, ad = rp.init(jax.random.key(0), p)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(ad))
    eff = jax.jit(rp.materialize)(base, _perturb(ad))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(eff))
    ref = jax.jit(rp.materialize)(jax.tree.map(lambda x: x.astype(jnp.float32), base),
                                  jax.tree.map(lambda x: x.astype(jnp.float32), _perturb(ad)))
    for a, b in zip(jax.tree.leaves(eff), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=5e-2, atol=5e-2)


def test_factor_dtype_override_mixed_precision():
    p = _params(dtype=jnp.bfloat16)
    rp = lrjax.LoRA(rank=2, dtype=jnp.float32)
    base, ad = rp.init(jax.random.key(0), p)
    assert ad["fc/kernel"]["a"].dtype == jnp.float32
    assert rp.materialize(base, ad)["fc"]["kernel"].dtype == jnp.bfloat16


# --------------------------------------------------------------------- Flax + factored path
class _Linen(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(12, name="fc1")(x)
        q = nn.DenseGeneral((2, 3), name="query")(h)  # [embed, heads, head_dim] kernel
        h = nn.DenseGeneral(12, axis=(-2, -1), name="out")(jax.nn.gelu(q))
        c = nn.Conv(4, (3,), name="conv")(h[..., None])
        return nn.Dense(5, name="fc2")(h + c.sum(-1))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_factored_equals_materialized_linen(name):
    model = _Linen()
    x = _randn(0, (3, 7))
    params = model.init(jax.random.key(1), x)["params"]
    rp = VARIANTS[name](2)
    base, ad = rp.init(jax.random.key(2), params)
    ad = _perturb(ad, scale=0.1)
    fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    stats = reparam.FactoredStats()
    g = lrjax.factored(fn, rp, stats=stats)
    y_ref = fn(rp.materialize(base, ad), x)
    np.testing.assert_allclose(jax.jit(g)(base, ad, x), y_ref, rtol=2e-5, atol=2e-5)
    assert stats.factored == 5 and stats.fallback == []  # the conv runs as two convolutions (lrjax.reparam.conv)
    ga = jax.grad(lambda a: jnp.sum(g(base, a, x) ** 2))(ad)
    gb = jax.grad(lambda a: jnp.sum(fn(rp.materialize(base, a), x) ** 2))(ad)
    for u, v in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-4)


def test_factored_nnx_and_scan_fallback():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(8, 8, rngs=rngs)

    class M(nnx.Module):
        def __init__(self, rngs):
            self.inp = nnx.Linear(4, 8, rngs=rngs)
            self.blocks = nnx.List([Block(rngs) for _ in range(2)])

        def __call__(self, x):
            x = self.inp(x)
            for b in self.blocks:
                x = jax.nn.relu(b.a(x))
            return x

    gd, st = nnx.split(M(nnx.Rngs(0)), nnx.Param)
    fn = lambda s, x: nnx.merge(gd, s)(x)  # noqa: E731
    rp = lrjax.DoRA(rank=2, targets=["inp/kernel", r"blocks/\d+/a/kernel"])
    base, ad = rp.init(jax.random.key(0), st)
    ad = _perturb(ad, scale=0.1)
    x = jnp.ones((2, 4))
    stats = reparam.FactoredStats()
    np.testing.assert_allclose(lrjax.factored(fn, rp, stats=stats)(base, ad, x),
                               fn(rp.materialize(base, ad), x), rtol=1e-5, atol=1e-5)
    assert stats.factored == 3 and not stats.fallback

    # stacked [L, in, out] kernel used inside lax.scan: followed into the body, sliced per layer
    ps = {"w": {"kernel": _randn(3, (3, 4, 4))}}
    scan_fn = lambda p, x: jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"]["kernel"])[0]  # noqa
    rp = lrjax.LoRA(rank=2)
    base, ad = rp.init(jax.random.key(0), ps)
    ad = _perturb(ad)
    stats = reparam.FactoredStats()
    np.testing.assert_allclose(lrjax.factored(scan_fn, rp, stats=stats)(base, ad, x),
                               scan_fn(rp.materialize(base, ad), x), rtol=1e-5, atol=1e-5)
    assert stats.factored == 1 and not stats.fallback
    gs = jax.grad(lambda a: jnp.sum(lrjax.factored(scan_fn, rp)(base, a, x) ** 2))(ad)
    gm = jax.grad(lambda a: jnp.sum(scan_fn(rp.materialize(base, a), x) ** 2))(ad)
    for u, v in zip(jax.tree.leaves(gs), jax.tree.leaves(gm)):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5)
    # DoRA stacks inside a scan fall back to the materialized weight (still exact)
    rpd = lrjax.DoRA(rank=2)
    based, add = rpd.init(jax.random.key(0), ps)
    stats = reparam.FactoredStats()
    np.testing.assert_allclose(lrjax.factored(scan_fn, rpd, stats=stats)(based, add, x),
                               scan_fn(rpd.materialize(based, add), x), rtol=1e-5, atol=1e-5)
    assert stats.fallback == ["scan"]


# --------------------------------------------------------------------------- bad input
def test_errors_name_the_argument():
    p = _params()
    with pytest.raises(ValueError, match="rank must be an int >= 1"):
        lrjax.LoRA(rank=0)
    with pytest.raises(TypeError, match="rank must be an int >= 1"):
        lrjax.LoRA(rank=2.5)
    with pytest.raises(ValueError, match=r"rank=5 exceeds min\(M, N\) = 4 for leaf 'conv/kernel'"):
        lrjax.LoRA(rank=5).init(jax.random.key(0), p)
    with pytest.raises(ValueError, match=r"'fc/kernal'.*Nearest available paths.*fc/kernel"):
        lrjax.LoRA(rank=2, targets="fc/kernal").init(jax.random.key(0), p)
    with pytest.raises(ValueError, match=r"'fc/bias' has shape \(5,\).*needs a matrix"):
        lrjax.LoRA(rank=2, targets="fc/.*").init(jax.random.key(0), p)
    with pytest.raises(TypeError, match="dtype int32"):
        lrjax.LoRA(rank=2, targets="i").init(jax.random.key(0), {"i": jnp.ones((3, 3), jnp.int32)})
    with pytest.raises(TypeError, match="floating dtype"):
        lrjax.LoRA(rank=2, dtype=jnp.int8)
    bad = dict(p, fc=dict(p["fc"], kernel=p["fc"]["kernel"].at[0, 0].set(jnp.nan)))
    with pytest.raises(ValueError, match="NaN"):
        lrjax.LoRA(rank=2).init(jax.random.key(0), bad)
    with pytest.raises(ValueError, match="alpha"):
        lrjax.LoRA(rank=2, alpha=-1.0)


def test_adapters_for_another_base_are_refused():
    rp = lrjax.LoRA(rank=2, targets="fc/kernel")
    _, ad = rp.init(jax.random.key(0), _params())
    other = {"fc": {"kernel": jnp.ones((7, 5)), "bias": jnp.zeros(5)}}
    with pytest.raises(ValueError, match="do not fit the base leaf"):
        rp.merge(other, ad)
    with pytest.raises(ValueError, match="no matching leaf"):
        rp.merge({"dense": {"kernel": jnp.ones((6, 5))}}, ad)
    with pytest.raises(TypeError, match="factors must be floating"):
        rp.materialize(_params(), {"fc/kernel": {"a": jnp.ones((6, 2), jnp.int32), "b": jnp.ones((2, 5))}})
    rp = lrjax.DoRA(rank=2, targets="fc/kernel")
    base, ad = rp.init(jax.random.key(0), _params())
    with pytest.raises(ValueError, match="cannot be inverted"):
        rp.unmerge(rp.merge(base, ad), ad)
    with pytest.raises(ValueError, match="not DoRA adapters"):
        rp.materialize(base, {"fc/kernel": {k: v for k, v in ad["fc/kernel"].items() if k != "m"}})


def test_axes_override_changes_the_view():
    p = {"w": {"kernel": jnp.asarray(np.random.default_rng(0).standard_normal((5, 3)), jnp.float32)}}
    rp = lrjax.LoRA(rank=2, axes={"w/kernel": Axes((), (1,), (0,))})  # torch-layout [out, in]
    base, ad = rp.init(jax.random.key(0), p)
    assert ad["w/kernel"]["a"].shape == (3, 2) and ad["w/kernel"]["b"].shape == (2, 5)
    ad = _perturb(ad)
    want = np.asarray(p["w"]["kernel"]) + (np.asarray(ad["w/kernel"]["a"]) @ np.asarray(ad["w/kernel"]["b"])).T
    np.testing.assert_allclose(rp.materialize(base, ad)["w"]["kernel"], want, rtol=1e-5)


def test_named_adapters_switch_combine_merge():
    p = _params()
    rpa, rpd = lrjax.LoRA(rank=2, targets="fc/kernel"), lrjax.DoRA(rank=1, targets=["fc/kernel", "stack/kernel"])
    named = {"a": _perturb(rpa.init(jax.random.key(0), p)[1], 1),
             "d": _perturb(rpd.init(jax.random.key(1), p)[1], 2, scale=0.1)}
    rps = {"a": rpa, "d": rpd}
    np.testing.assert_array_equal(reparam.multi.use(p, named, rps, "a")["fc"]["kernel"],
                                  rpa.materialize(p, named["a"])["fc"]["kernel"])
    np.testing.assert_allclose(reparam.multi.combine(p, named, rps, {"d": 1.0})["stack"]["kernel"],
                               rpd.materialize(p, named["d"])["stack"]["kernel"], rtol=1e-6, atol=1e-6)
    mix = reparam.multi.combine(p, named, rps, {"a": 0.25, "d": 0.5})
    da = rpa.delta(p, named["a"])
    dd = rpd.delta(p, named["d"])
    w = np.asarray(p["fc"]["kernel"], np.float64)
    np.testing.assert_allclose(mix["fc"]["kernel"], w + 0.25 * np.asarray(da["fc/kernel"]) + 0.5 * np.asarray(dd["fc/kernel"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(mix["conv"]["kernel"], p["conv"]["kernel"])
    np.testing.assert_array_equal(reparam.multi.merge(p, named, rps, "a")["fc"]["kernel"],
                                  rpa.merge(p, named["a"])["fc"]["kernel"])
    with pytest.raises(KeyError, match="available"):
        reparam.multi.use(p, named, rps, "zz")
    with pytest.raises(TypeError, match="PiSSA"):
        reparam.multi.combine(p, {"p": named["a"]}, {"p": lrjax.PiSSA(rank=2, targets="fc/kernel")}, {"p": 1.0})


def test_single_axes_override_and_eval_shape_init():
    x = jnp.ones((5, 3))
    rp = lrjax.LoRA(rank=2, axes=Axes((), (1,), (0,)))
    _, ad = rp.init(jax.random.key(0), {"kernel": x})
    assert ad["kernel"]["a"].shape == (3, 2)
    abstract = jax.eval_shape(lambda: rp.init(jax.random.key(0), {"kernel": x}))
    assert abstract[1]["kernel"]["b"].shape == (2, 5)


@pytest.mark.parametrize("mode", ["factored", "fused", "auto"])
def test_factored_modes_values_and_grads(mode):
    rng = np.random.default_rng(4)
    p = {"l1": {"kernel": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32)},
         "l2": {"kernel": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)}}
    fn = lambda p, x: jnp.tanh(x @ p["l1"]["kernel"]) @ p["l2"]["kernel"]  # noqa: E731
    x = jnp.asarray(rng.standard_normal((2, 4, 6)), jnp.float32)  # 8 tokens >= M: auto picks fused
    rp = lrjax.RSLoRA(rank=2, alpha=3.0)
    base, ad = rp.init(jax.random.key(0), p)
    ad = _perturb(ad)
    g = lrjax.factored(fn, rp, mode=mode)
    loss = lambda b, a: jnp.sum(jnp.sin(g(b, a, x)))  # noqa: E731
    ref = lambda b, a: jnp.sum(jnp.sin(fn(rp.materialize(b, a), x)))  # noqa: E731
    np.testing.assert_allclose(jax.jit(loss)(base, ad), ref(base, ad), rtol=1e-5)
    for argnum in (0, 1):  # adapters and (for correctness, though usually frozen) the base
        got = jax.jit(jax.grad(loss, argnums=argnum))(base, ad)
        want = jax.grad(ref, argnums=argnum)(base, ad)
        for u, v in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="mode must be"):
        lrjax.factored(fn, rp, mode="dense")
