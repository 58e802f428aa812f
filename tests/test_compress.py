"""lrjax.compress core: factorizations, rank rules, report, factored path, bad inputs."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lrjax
import lrjax.compress as C


def _randn(seed, shape, dtype=jnp.float32):
    """Standard normal test data drawn by NumPy (eager jax.random compiles one program per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), dtype)


def _params(key=0):
    rng = np.random.default_rng(key)  # NumPy draws: no eager jax.random program per shape
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    return {"l1": {"kernel": f(16, 12), "bias": jnp.zeros(12)}, "l2": {"kernel": f(12, 8)}, "stack": f(3, 10, 6)}


def _f(p, x):
    return jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"]) @ p["l2"]["kernel"]


def _x(n=40, m=16, key=5):
    rng = np.random.default_rng(key)  # NumPy draws: no eager jax.random program per shape
    return jnp.asarray(rng.standard_normal((n, m)) @ rng.standard_normal((m, m)), jnp.float32)  # correlated inputs


# ------------------------------------------------------------------------------- math
def test_whitened_error_equals_tail_and_beats_plain_svd():
    w = _randn(1, (16, 12))
    x = _x()
    for r in (2, 5, 9):
        a, b, s = C.whitened_svd(w, x, r, eps=0.0)
        err = float(jnp.linalg.norm(x @ w - x @ a @ b))
        tail = float(jnp.sqrt(jnp.sum(s[r:] ** 2)))
        assert err == pytest.approx(tail, rel=1e-3)
        u, sp, vt = lrjax.linalg.svd(w, r)
        plain = float(jnp.linalg.norm(x @ w - x @ (u * sp) @ vt))
        assert err < plain


def test_whitened_rank_deficient_calib_needs_eps():
    w = _randn(1, (16, 12))
    x = _x(n=5)  # 5 samples < 16 inputs: X^T X singular
    a, b, _ = C.whitened_svd(w, x, 4)  # default eps (1e-4) regularizes
    assert bool(jnp.all(jnp.isfinite(a))) and bool(jnp.all(jnp.isfinite(b)))
    with pytest.raises(ValueError, match="eps"):
        C.whitened_svd(w, x, 4, eps=0.0)


def test_compress_rules_factored_path_and_report():
    p = _params()
    x = _x()
    for kw in [dict(rank=3), dict(energy=0.9), dict(ratio=2.0), dict(reduction=0.4),
               dict(rank=3, method="randomized", key=jax.random.key(0))]:
        c = C.compress(p, ("l1/kernel", "l2/kernel", "stack"), **kw)
        y1 = lrjax.factored(_f, c.rp)(c.base, c.factors, x)
        y2 = _f(c.materialize(), x)
        np.testing.assert_allclose(y1, y2, rtol=1e-4, atol=1e-4)
        rep = c.report
        assert rep.bytes_after < rep.bytes_before or kw.get("energy")
        assert "| l1/kernel |" in rep.table() and "**total**" in rep.table()
        for row in rep.layers:
            if row.kind == "lowrank":
                assert row.bytes_after == int(np.prod(row.batch or (1,))) * row.rank * (row.m + row.n) * 4
        assert rep.model_bytes_before - rep.model_bytes_after == rep.bytes_before - rep.bytes_after
    assert float(jnp.abs(c.base["l1"]["kernel"]).max()) == 0.0 and c.base["l1"]["bias"] is p["l1"]["bias"]


def test_svd_error_is_eckart_young_and_stack_is_batched():
    p = _params()
    c = C.compress(p, "stack", rank=3)
    w = p["stack"]
    s = jnp.linalg.svd(w, compute_uv=False)
    want = float(jnp.sqrt(jnp.sum(s[:, 3:] ** 2)) / jnp.linalg.norm(w))
    assert c.report.layers[0].rel_error == pytest.approx(want, rel=1e-4)
    assert c.factors["stack"]["a"].shape == (3, 10, 3) and c.factors["stack"]["b"].shape == (3, 3, 6)
    for i in range(3):  # each slice is its own truncated SVD
        ui, si, vti = lrjax.linalg.svd(w[i], 3)
        np.testing.assert_allclose(c.factors["stack"]["a"][i] @ c.factors["stack"]["b"][i], (ui * si) @ vti,
                                   atol=1e-4)


def test_whitened_compress_uses_collected_activations():
    p = _params()
    x = _x()
    cal = C.collect_activations(_f, p, ("l1/kernel", "l2/kernel"), x)
    np.testing.assert_allclose(cal["l1/kernel"], x)
    np.testing.assert_allclose(cal["l2/kernel"], jnp.tanh(x @ p["l1"]["kernel"]), atol=1e-5)
    cw = C.compress(p, ("l1/kernel", "l2/kernel"), rank=3, method="whitened", calib=cal)
    cs = C.compress(p, ("l1/kernel", "l2/kernel"), rank=3)
    ow = float(jnp.linalg.norm(x @ p["l1"]["kernel"] - x @ cw.materialize()["l1"]["kernel"]))
    os_ = float(jnp.linalg.norm(x @ p["l1"]["kernel"] - x @ cs.materialize()["l1"]["kernel"]))
    assert ow < os_


def test_collect_activations_follows_scan_per_layer():
    """A kernel sliced by nn.scan gets per-layer activations [L, n, M], equal to a manual loop over
    the layers (float32), usable as calib by compress(method='whitened'); a reverse lax.scan reads
    its slices in reverse order; a stack the scan never multiplies is refused."""
    import sys, os
    sys.path.insert(0, os.path.dirname(__file__))
    from _stacks import scan_stack
    mod = scan_stack(5, length=3)
    x = _randn(2, (2, 4, 5))
    p = mod.init(jax.random.key(0), x)
    cal = C.collect_activations(mod.apply, p, "kernel", x)
    path = "params/blocks/fc/kernel"
    assert set(cal) == {path} and cal[path].shape == (3, 8, 5) and cal[path].dtype == jnp.float32
    kern, bias = p["params"]["blocks"]["fc"]["kernel"], p["params"]["blocks"]["fc"]["bias"]
    h, want = x, []
    for layer in range(3):  # the manual per-layer loop
        want.append(h.reshape(-1, 5))
        h = h + h @ kern[layer] + bias[layer]
    np.testing.assert_allclose(cal[path], np.stack(want), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(C.collect_activations(mod.apply, p, "kernel", x, max_rows=3)[path],
                               np.stack(want)[:, :3], rtol=1e-6, atol=1e-6)
    cw = C.compress(p, "kernel", rank=2, method="whitened", calib=cal)
    cs = C.compress(p, "kernel", rank=2)
    assert cw.factors[path]["a"].shape == (3, 5, 2)
    dw = cw.materialize()["params"]["blocks"]["fc"]["kernel"]
    ds = cs.materialize()["params"]["blocks"]["fc"]["kernel"]
    for layer in range(3):  # whitening with the layer's own inputs minimizes that layer's output error
        xl = want[layer]
        assert float(jnp.linalg.norm(xl @ (kern[layer] - dw[layer]))) <= float(
            jnp.linalg.norm(xl @ (kern[layer] - ds[layer]))) * (1 + 1e-4)

    w = _randn(3, (3, 4, 4))

    def rev(q, v):  # lax.scan reverse=True: slice 2 runs first
        def body(c, wl):
            return jnp.tanh(c @ wl), c.sum()
        return jax.lax.scan(body, v, q["w"], reverse=True)

    v = _randn(4, (2, 4))
    got = C.collect_activations(rev, {"w": w}, "w", v)["w"]
    h2, man = v, {}
    for layer in (2, 1, 0):
        man[layer] = h2
        h2 = jnp.tanh(h2 @ w[layer])
    np.testing.assert_allclose(got, np.stack([man[i] for i in range(3)]), rtol=1e-6, atol=1e-6)

    def partial(q, v):  # the stack is sliced by the scan but never multiplied there
        return jax.lax.scan(lambda c, wl: (c, None), v @ q["w"][0], q["w"])[0]

    with pytest.raises(ValueError, match="targets"):
        C.collect_activations(partial, {"w": w}, "w", v)


def test_pela_rank_closed_form_and_param_count():
    assert C.pela_rank(768, 768, 2.0) == 192 and C.pela_rank(768, 3072, 2.0) == 307
    assert C.pela_rank(4, 4, 100.0) == 1
    p = {"a": {"kernel": jnp.ones((64, 48)) + _randn(0, (64, 48))},
         "b": {"kernel": _randn(1, (48, 96))}}
    for c in (1.5, 2.0, 3.0):
        rep = C.compress(p, ratio=c).report
        assert rep.bytes_after / rep.bytes_before == pytest.approx(1 / c, rel=0.06)
        assert rep.bytes_after <= rep.bytes_before / c


@settings(max_examples=15, deadline=None)
@given(a=st.sampled_from([0.3, 0.7, 1.0, 2.0]), tau=st.floats(0.005, 0.5), n=st.sampled_from([16, 256]))
def test_welore_keep_matches_power_law_closed_form(a, tau, n):
    s = np.arange(1, n + 1.0) ** -a
    closed = math.floor((tau * (1 - n ** -a) + n ** -a) ** (-1 / a))
    got = int(C.welore_keep(s, tau))
    # the closed form's floor may sit exactly on a boundary: allow the float32 tie only
    assert got == closed or abs(((tau * (1 - n ** -a) + n ** -a) ** (-1 / a)) - round(closed)) < 1e-3


def test_welore_tau_heterogeneous_spectra():
    spectra = [np.arange(1, 257.0) ** -a for a in (0.2, 0.4, 0.8, 1.5, 3.0)]
    tau, keeps = C.welore_tau(spectra, 0.5, by="rank")
    assert keeps == [239, 223, 146, 27, 5] and sum(keeps) == 640
    assert tau == pytest.approx(0.0067, abs=2e-4)
    uni = [np.sqrt(np.sum(s[128:] ** 2) / np.sum(s ** 2)) for s in spectra]
    wel = [np.sqrt(np.sum(s[k:] ** 2) / np.sum(s ** 2)) for s, k in zip(spectra, keeps)]
    assert sum(wel) < sum(uni)  # non-uniform allocation beats uniform at equal total rank


def test_welore_tau_params_hits_target():
    p = _params()
    c = C.compress(p, ("l1/kernel", "l2/kernel", "stack"), reduction=0.5)
    assert c.report.extra["tau"] > 0
    assert 1 - c.report.ratio >= 0.5 - 0.25  # stacks store their largest rank


# --------------------------------------------------------------------------- bad input
P = _params()
W = P["l1"]["kernel"]
X = _x()


def _calls_ratio(v):
    return [lambda: C.compress(P, "l1/kernel", reduction=v), lambda: C.welore_tau([np.ones(3) * [3, 2, 1]], v)]


@pytest.mark.parametrize("v", [0.0, 1.0, -0.2, 1.5, float("nan")])
@pytest.mark.parametrize("i", [0, 1])
def test_reduction_outside_unit_interval(v, i):
    with pytest.raises(ValueError, match="reduction"):
        _calls_ratio(v)[i]()


@pytest.mark.parametrize("call", [lambda: C.compress(P, "l1/kernel", ratio=1.0),
                                  lambda: C.compress(P, "l1/kernel", ratio=0.5),
                                  lambda: C.pela_rank(4, 4, 0.9)])
def test_ratio_must_exceed_one(call):
    with pytest.raises(ValueError, match="ratio"):
        call()


@pytest.mark.parametrize("call,name", [
    (lambda: C.compress(P, "l1/kernel", rank=2, method="whitened", calib={"l1/kernel": X[:, :12]}), "calib"),
    (lambda: C.compress(P, "l1/kernel", rank=2, method="whitened", calib={"l2/kernel": X}), "calib"),
    (lambda: C.whitened_svd(W, X[:, :5], 2), "x"),
    (lambda: C.factorize(W, 2, method="whitened", x=X[:, :5]), "x"),
    (lambda: C.compress(P, "stack", rank=2, method="whitened", calib={"stack": X[:, :10]}), "calib"),
])
def test_calibration_of_wrong_width(call, name):
    with pytest.raises(ValueError, match=name):
        call()


@pytest.mark.parametrize("call", [lambda: C.compress(P, "l1/kernel", rank=13),
                                  lambda: C.compress(P, "stack", rank=7),
                                  lambda: C.compress(P, ("l1/kernel", "l2/kernel"), rank={"l1/kernel": 3, "l2/kernel": 9}),
                                  lambda: C.factorize(W, 13), lambda: C.whitened_svd(W, X, 13)])
def test_rank_above_min_mn_refused(call):
    with pytest.raises(ValueError, match="rank"):
        call()


NAN_P = {"l1": {"kernel": W.at[0, 0].set(jnp.nan)}}


@pytest.mark.parametrize("call,name", [
    (lambda: C.compress(NAN_P, "l1/kernel", rank=2), "params"),
    (lambda: C.factorize(W.at[1, 1].set(jnp.inf), 2), "w"),
    (lambda: C.whitened_svd(W.at[1, 1].set(jnp.nan), X, 2), "w"),
    (lambda: C.whitened_svd(W, X.at[0, 0].set(jnp.nan), 2), "x"),
    (lambda: C.compress(P, "l1/kernel", rank=2, method="whitened", calib={"l1/kernel": X.at[0, 0].set(jnp.nan)}),
     "calib"),
    (lambda: C.welore_tau([np.array([1.0, np.nan])], 0.5), "spectra"),
    (lambda: C.welore_keep(np.array([1.0, np.nan]), 0.5), "s"),
    (lambda: C.energy_keep(np.array([1.0, np.inf]), 0.5), "s"),
    (lambda: C.compress(NAN_P, "l1/kernel", reduction=0.5), "params"),
    (lambda: C.compress(NAN_P, "l1/kernel", ratio=2.0, method="randomized", key=jax.random.key(0)), "params"),
])
def test_nan_inputs_refused(call, name):
    with pytest.raises(ValueError, match=name):
        call()


@pytest.mark.parametrize("call,exc,name", [
    (lambda: C.compress(P, "l1/kernel", rank="3"), TypeError, "rank"),
    (lambda: C.compress(P, "l1/kernel", rank=True), TypeError, "rank"),
    (lambda: C.compress(P, "l1/kernel", energy=1.5), ValueError, "energy"),
    (lambda: C.compress(P, "l1/kernel", energy="all"), TypeError, "energy"),
    (lambda: C.compress(P, "l1/kernel", rank=2, energy=0.9), ValueError, "exactly one"),
    (lambda: C.compress(P, "l1/kernel"), ValueError, "exactly one"),
    (lambda: C.compress(P, "l1/kernel", rank=2, method="qr"), ValueError, "method"),
    (lambda: C.compress(P, "l1/kernel", rank=2, method="whitened"), ValueError, "calib"),
    (lambda: C.compress(P, "l1/kernel", rank=2, method="whitened", calib=[X]), TypeError, "calib"),
    (lambda: C.compress(P, "l1/kernel", rank=2, method="randomized"), ValueError, "key"),
    (lambda: C.compress(P, "l1/kernel", energy=0.9, method="randomized", key=jax.random.key(0)), ValueError,
     "randomized"),
    (lambda: C.compress(P, "l1/kernel", rank=2, eps=-1.0), ValueError, "eps"),
    (lambda: C.compress(P, "l1/kernel", reduction=0.5, by="bytes"), ValueError, "by"),
    (lambda: C.compress(P, "l1/kernel", reduction=0.5, min_ratio=1.0), ValueError, "min_ratio"),
    (lambda: C.compress(P, "l1/kernel", rank=2, oversample=-1), ValueError, "oversample"),
    (lambda: C.compress(P, "nope", rank=2), ValueError, "targets"),
    (lambda: C.compress(P, "bias", rank=1), ValueError, "ndim"),
    (lambda: C.compress({"k": jnp.ones((4, 4), jnp.int32)}, "k", rank=1), TypeError, "params"),
    (lambda: C.compress(P, ("l1/kernel",), rank={"l9/kernel": 2}), ValueError, "rank"),
    (lambda: C.factorize([[1.0, 2.0]], 1), TypeError, "w"),
    (lambda: C.factorize(W, 2, method="randomized"), ValueError, "key"),
    (lambda: C.whitened_svd(W, X, 2, eps=float("nan")), ValueError, "eps"),
    (lambda: C.welore_tau([], 0.5), TypeError, "spectra"),
    (lambda: C.welore_tau([np.ones(3)], 0.5, by="params"), ValueError, "shapes"),
    (lambda: C.welore_keep(np.ones(3), 1.5), ValueError, "tau"),
    (lambda: C.energy_keep(np.ones(3), 0.0), ValueError, "energy"),
    (lambda: C.pela_rank(0, 4, 2.0), ValueError, "m"),
    (lambda: C.collect_activations("f", P, "kernel", X), TypeError, "fn"),
    (lambda: C.collect_activations(_f, P, "kernel", X, max_rows=0), ValueError, "max_rows"),
])
def test_bad_arguments_named(call, exc, name):
    with pytest.raises(exc, match=name):
        call()
