"""Mixed precision is rounded once (issue 10, item 1) and degenerate weights give no NaN (item 2).

Rule under test (``lrjax.reparam.base``): every effective weight is computed in
``compute_dtype(w, factors) = promote_types(w, A, B, [m,] float32)`` and cast once to ``w.dtype``.

How ``merge`` is checked against float64: the exact value ``x = W + s A B`` (times DoRA's
``c``) is computed in float64 with NumPy and rounded once to the base dtype by
:func:`round_to` (round-half-even, written here from ``frexp``; no double rounding through
float32). lrjax computes in float32 (the spec's compute dtype), whose error is bounded by
``err`` below. Where ``x - err`` and ``x + err`` round to the same base-dtype value, lrjax must
return exactly that value (bitwise). Elsewhere (``x`` lies within float32 error of a rounding
boundary: the only double-rounding case the float32 compute admits) it must lie in
``[round(x - err), round(x + err)]``; for 16-bit bases that band holds about 1% of the
entries (< 3% asserted, from a pessimistic bound). For a float32 base the band is the float32 compute error itself (a few ulp).
The old code (rounding the factor product to bfloat16 before adding) fails this check.
"""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import lrjax
from lrjax.reparam import multi

DT = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}
PAIRS = [(b, f) for b in DT for f in DT]
EPS32 = 2.0 ** -24
M, N, R = 32, 24, 4
# (significand bits incl. the implicit one, frexp exponent of the smallest normal)
FMT = {np.dtype(np.float32): (24, -125), np.dtype(ml_dtypes.bfloat16): (8, -125),
       np.dtype(np.float16): (11, -13)}

VARIANTS = {
    "lora": lambda fd: lrjax.LoRA(rank=R, alpha=3.0, dtype=fd),
    "rslora": lambda fd: lrjax.RSLoRA(rank=R, alpha=3.0, dtype=fd),
    "dora": lambda fd: lrjax.DoRA(rank=R, alpha=3.0, dtype=fd),
    "pissa": lambda fd: lrjax.PiSSA(rank=R, alpha=3.0, dtype=fd),
}


def round_to(x, dtype):
    """float64 ``x`` rounded once (nearest, ties to even) to ``dtype``'s grid, as float64."""
    p, emin = FMT[np.dtype(dtype)]
    x = np.asarray(x, np.float64)
    _, e = np.frexp(x)
    q = np.ldexp(1.0, np.maximum(e, emin) - p)  # the spacing of dtype's grid around x
    return np.rint(x / q) * q


def f64(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def assert_rounded_once(got, x, err, dtype):
    """See the module docstring. Returns the fraction of entries in the rounding band."""
    assert got.dtype == jnp.dtype(dtype)
    g = f64(got)
    lo, hi = round_to(x - err, dtype), round_to(x + err, dtype)
    sure = lo == hi
    bad = sure & (g != round_to(x, dtype))
    assert not bad.any(), f"{bad.sum()} entries not the float64 value rounded once, e.g. " \
                          f"{g[bad][:3]} vs {round_to(x, dtype)[bad][:3]}"
    assert np.all((g >= lo) & (g <= hi)), "entries outside the float32-compute rounding band"
    return 1.0 - sure.mean()


def _base(bd, seed=0):
    return {"w": {"kernel": jnp.asarray(np.random.default_rng(seed).standard_normal((M, N)), DT[bd])}}


def _perturb(ad, seed=1):
    rng = np.random.default_rng(seed)
    out = {}
    for p, f in ad.items():
        g = dict(f)
        g["b"] = jnp.asarray(f64(f["b"]) + 0.3 * rng.standard_normal(f["b"].shape), f["b"].dtype)
        g["a"] = jnp.asarray(f64(f["a"]) + 0.1 * rng.standard_normal(f["a"].shape), f["a"].dtype)
        if "m" in f:
            g["m"] = jnp.asarray(f64(f["m"]) * (1 + 0.1 * rng.standard_normal(f["m"].shape)), f["m"].dtype)
        out[p] = g
    return out


def _exact(rp, w, f):
    """float64 value and float32-compute error bound of W_eff (matrix view [M, N])."""
    a, b = f64(f["a"]), f64(f["b"])
    s = rp.scale
    v = w + s * a @ b
    err = 4 * (R + 2) * EPS32 * (np.abs(w) + s * np.abs(a) @ np.abs(b))
    if "m" not in f:
        return v, err
    m = f64(f["m"])
    mdt = f["m"].dtype
    nrm = np.linalg.norm(v, axis=0)
    rel = 4 * (M + 4) * EPS32 + (np.abs(v) * err).sum(0) / np.maximum(nrm, 1e-30) ** 2
    # lrjax rounds the float32 norm to m's dtype before dividing; bracket that rounding
    n_lo, n_hi = round_to(nrm * (1 - rel), mdt), round_to(nrm * (1 + rel), mdt)
    c = m / round_to(nrm, mdt)
    c_lo, c_hi = np.minimum(m / n_lo, m / n_hi), np.maximum(m / n_lo, m / n_hi)
    x = v * c
    spread = np.abs(v) * np.maximum(c_hi - c, c - c_lo)
    return x, np.abs(c) * err + spread + 4 * EPS32 * np.abs(x)


@pytest.mark.parametrize("bd,fd", PAIRS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_merge_rounds_once_and_factored_equals_materialize(name, bd, fd):
    rp = VARIANTS[name](DT[fd])
    params = _base(bd)
    w0 = params["w"]["kernel"]
    base, ad = rp.init(jax.random.key(0), params)
    f = ad["w/kernel"]
    assert f["a"].dtype == jnp.dtype(DT[fd]) and base["w"]["kernel"].dtype == jnp.dtype(DT[bd])
    eff0 = rp.materialize(base, ad)["w"]["kernel"]
    assert eff0.dtype == w0.dtype
    if name != "pissa":  # B = 0 (and DoRA's c = 1) at init: the model is unchanged bit for bit
        np.testing.assert_array_equal(f64(eff0), f64(w0))
    else:  # the residual is stored in the base dtype: W up to one ulp of max(|W|, |W_res|)
        big = np.maximum(np.abs(f64(w0)), np.abs(f64(base["w"]["kernel"])))
        p, _ = FMT[np.dtype(DT[bd])]
        assert np.all(np.abs(f64(eff0) - f64(w0)) <= 2.0 ** (1 - p) * big)  # <= 1 ulp(big) .. 2 ulp

    ad = _perturb(ad)
    f = ad["w/kernel"]
    wb = f64(base["w"]["kernel"])
    merged = rp.merge(base, ad)["w"]["kernel"]
    x, err = _exact(rp, wb, f)
    band = assert_rounded_once(merged, x, err, DT[bd])
    if bd != "f32":
        # the band is pessimistic (a worst-case float32 error bound); for DoRA a whole column is in
        # it when its norm lies near a rounding boundary of m's dtype
        assert band < (0.1 if name == "dora" else 0.03)
    # materialize == merge; under jit XLA may fuse the float32 compute differently (an FMA), so
    # the jitted value is held to the same once-rounded check rather than bitwise to eager
    np.testing.assert_array_equal(f64(rp.materialize(base, ad)["w"]["kernel"]), f64(merged))
    assert_rounded_once(jax.jit(rp.materialize)(base, ad)["w"]["kernel"], x, err, DT[bd])
    assert_rounded_once(rp.delta(base, ad)["w/kernel"], x - wb, err + 4 * EPS32 * np.abs(wb), DT[bd])
    if name != "dora":  # unmerge: (W_merged - s A B) computed once
        a, b = f64(f["a"]), f64(f["b"])
        wm = f64(merged)
        xu = wm - rp.scale * a @ b
        eu = 4 * (R + 2) * EPS32 * (np.abs(wm) + rp.scale * np.abs(a) @ np.abs(b))
        assert_rounded_once(rp.unmerge({"w": {"kernel": merged}}, ad)["w"]["kernel"], xu, eu, DT[bd])

    # the factored path: its materialize fallback is bitwise the materialized weight ...
    g_out = lrjax.factored(lambda p, x: p["w"]["kernel"], rp)(base, ad, jnp.zeros(()))
    np.testing.assert_array_equal(f64(g_out), f64(merged))
    # ... and a factored product equals the materialized one to the output dtype's rounding
    xin = jnp.asarray(np.random.default_rng(2).standard_normal((3, M)), DT[bd])
    fn = lambda p, x: x @ p["w"]["kernel"]  # noqa: E731
    y_f = lrjax.factored(fn, rp, mode="factored")(base, ad, xin)
    y_m = fn(rp.materialize(base, ad), xin)
    assert y_f.dtype == y_m.dtype == jnp.dtype(DT[bd])
    eps = float(jnp.finfo(DT[bd]).eps)
    scale = np.abs(f64(xin)) @ (np.abs(wb) + rp.scale * np.abs(f64(f["a"])) @ np.abs(f64(f["b"])))
    if "m" in f:
        scale = scale * np.abs(x / np.where(np.abs(wb + rp.scale * f64(f["a"]) @ f64(f["b"])) > 0,
                                            wb + rp.scale * f64(f["a"]) @ f64(f["b"]), 1)).max()
    assert np.all(np.abs(f64(y_f) - f64(y_m)) <= 8 * eps * scale + 1e-6)


def test_old_double_rounding_is_caught():
    """The pre-fix formula (bf16 product added in bf16) fails the once-rounded check."""
    rp = lrjax.LoRA(rank=R, alpha=3.0)
    base, ad = rp.init(jax.random.key(0), _base("bf16"))
    ad = _perturb(ad)
    f = ad["w/kernel"]
    w = base["w"]["kernel"]
    old = w + rp.scale * (f["a"] @ f["b"])  # all bfloat16
    x, err = _exact(rp, f64(w), f)
    with pytest.raises(AssertionError, match="not the float64 value rounded once"):
        assert_rounded_once(old, x, err, jnp.bfloat16)


@pytest.mark.parametrize("bd,fd", PAIRS)
def test_combine_rounds_once(bd, fd):
    params = _base(bd)
    rpa = lrjax.LoRA(rank=R, alpha=3.0, dtype=DT[fd])
    rpd = lrjax.DoRA(rank=2, dtype=DT[fd])
    named = {"a": _perturb(rpa.init(jax.random.key(0), params)[1], 1),
             "d": _perturb(rpd.init(jax.random.key(1), params)[1], 2)}
    rps = {"a": rpa, "d": rpd}
    w = f64(params["w"]["kernel"])
    xa, ea = _exact(rpa, w, named["a"]["w/kernel"])
    xd, ed = _exact(rpd, w, named["d"]["w/kernel"])
    out = multi.combine(params, named, rps, {"a": 0.25, "d": 0.5})["w"]["kernel"]
    x = w + 0.25 * (xa - w) + 0.5 * (xd - w)
    err = 0.25 * ea + 0.5 * ed + 8 * EPS32 * (np.abs(w) + np.abs(xa) + np.abs(xd))
    band = assert_rounded_once(out, x, err, DT[bd])
    if bd != "f32":
        assert band < 0.1  # includes DoRA columns whose norm is near a rounding boundary of m
    # traced weights (learned mixing) are rounded once as well (jit may fuse the float32 math)
    out_j = jax.jit(lambda wa: multi.combine(params, named, rps, {"a": wa, "d": 0.5}))(jnp.float32(0.25))
    assert_rounded_once(out_j["w"]["kernel"], x, err, DT[bd])


# ------------------------------------------------------------------ degenerate weights (item 2)
def _dora_ref(w, a, b, m, s):
    """float64 reference of lrjax's rule: the direction of a zero column is zero."""
    v = w + s * a @ b
    nrm = np.linalg.norm(v, axis=0)
    c = np.where(nrm > 0, m / np.where(nrm > 0, nrm, 1), 0.0)
    return v * c


def test_dora_zero_column_has_zero_direction_and_finite_grads():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 5))
    w[:, 2] = 0.0  # a pruned output unit
    p = {"k": {"kernel": jnp.asarray(w, jnp.float32)}}
    rp = lrjax.DoRA(rank=2, alpha=3.0)
    base, ad = rp.init(jax.random.key(0), p)
    f = ad["k/kernel"]
    assert float(f["m"][2]) == 0.0
    eff = rp.materialize(base, ad)["k"]["kernel"]
    assert np.all(np.isfinite(eff)) and np.all(np.asarray(eff[:, 2]) == 0)
    np.testing.assert_array_equal(eff, p["k"]["kernel"])  # init still exact
    # B = 0 keeps the column zero: gradients w.r.t. base, a, b, m are finite
    gx = rng.standard_normal((6, 5))
    loss = lambda b, a: jnp.sum(jnp.asarray(gx, jnp.float32) * rp.materialize(b, a)["k"]["kernel"])  # noqa
    gb, ga = jax.grad(loss, argnums=(0, 1))(base, ad)
    for g in jax.tree.leaves((gb, ga)):
        assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(ga["k/kernel"]["m"][2], 0.0)
    np.testing.assert_array_equal(ga["k/kernel"]["b"][:, 2], 0.0)  # a pruned unit stays pruned
    # a zero column reached during training (non-zero m): output 0 there, matches the float64 rule
    a = rng.standard_normal((6, 2))
    b = rng.standard_normal((2, 5))
    b[:, 2] = 0.0
    m = np.abs(rng.standard_normal(5)) + 0.5
    ad2 = {"k/kernel": {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32),
                        "m": jnp.asarray(m, jnp.float32)}}
    eff2 = rp.materialize(base, ad2)["k"]["kernel"]
    np.testing.assert_allclose(eff2, _dora_ref(w, a, b, m, rp.scale), rtol=1e-5, atol=1e-6)
    gb, ga = jax.jit(jax.grad(loss, argnums=(0, 1)))(base, ad2)
    for g in jax.tree.leaves((gb, ga)):
        assert np.all(np.isfinite(g))
    # the factored path agrees, also with finite gradients
    x = jnp.asarray(rng.standard_normal((3, 6)), jnp.float32)
    fn = lambda p, x: x @ p["k"]["kernel"]  # noqa: E731
    y = lrjax.factored(fn, rp)(base, ad2, x)
    np.testing.assert_allclose(y, np.asarray(x, np.float64) @ _dora_ref(w, a, b, m, rp.scale), rtol=1e-5, atol=1e-5)
    gf = jax.grad(lambda a_: jnp.sum(lrjax.factored(fn, rp)(base, a_, x)))(ad2)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(gf))
    # column_norm: zero value, zero (not inf/NaN) gradient at a zero column
    from lrjax.reparam.dora import column_norm
    gn = jax.grad(lambda v: jnp.sum(column_norm(v)))(jnp.asarray(w, jnp.float32))
    assert np.all(np.isfinite(gn)) and np.all(np.asarray(gn[:, 2]) == 0)
    # unmerge_with_norms recovers a zero column exactly
    norms = rp.column_norms(base, ad)
    back = rp.unmerge_with_norms(rp.merge(base, ad), ad, norms)["k"]["kernel"]
    np.testing.assert_allclose(back, w, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(back[:, 2]) == 0)


@pytest.mark.parametrize("n_iter", [None, 2])
@pytest.mark.parametrize("which", ["rank2", "zero"])
def test_pissa_rank_deficient_weight(which, n_iter):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((8, 2)) @ rng.standard_normal((2, 6)) if which == "rank2" else np.zeros((8, 6))
    p = {"k": {"kernel": jnp.asarray(w, jnp.float32)}}
    rp = lrjax.PiSSA(rank=4, n_iter=n_iter)
    base, ad = rp.init(jax.random.key(0), p)
    f = ad["k/kernel"]
    for x in (base["k"]["kernel"], f["a"], f["b"]):
        assert np.all(np.isfinite(x))
    eff = rp.materialize(base, ad)["k"]["kernel"]
    if which == "zero":
        np.testing.assert_array_equal(eff, w)
        np.testing.assert_array_equal(f["a"], 0.0)
        np.testing.assert_array_equal(base["k"]["kernel"], 0.0)
    else:
        np.testing.assert_allclose(eff, w, rtol=0, atol=4 * EPS32 * np.abs(w).max())
        # the two missing singular directions give (numerically) zero factor columns
        assert float(jnp.abs(f["a"][:, 2:]).max()) < 1e-3 * float(jnp.abs(f["a"][:, :2]).max())
    g = jax.grad(lambda a_: jnp.sum(rp.materialize(base, a_)["k"]["kernel"] ** 2))(ad)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g))
