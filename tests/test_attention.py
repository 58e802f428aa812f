"""KDA / GDN kernels (lrjax.nn.attention): recurrent == chunkwise == a float64 NumPy transcription of
the paper's recurrence; decode steps, states, lengths, grouped heads, bfloat16, gradients, bad input."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrjax.nn.attention import chunk_gdn, chunk_kda, gdn_step, kda_step, recurrent_gdn, recurrent_kda


@pytest.fixture
def x64():
    """float64 for one test only (restored afterwards)."""
    with jax.enable_x64(True):
        yield


def make(B=2, T=37, H=2, HV=4, K=8, V=6, *, decay=(0.0, 1.0), scalar=False, seed=0, h0=True):
    """Random inputs as NumPy float64 (L2-normalized keys, beta in (0, 1))."""
    r = np.random.default_rng(seed)
    k = r.normal(size=(B, T, H, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    lo, hi = decay
    x = dict(q=r.normal(size=(B, T, H, K)), k=k, v=r.normal(size=(B, T, HV, V)),
             g=-r.uniform(lo, hi, size=(B, T, HV) if scalar else (B, T, HV, K)),
             beta=r.uniform(0.05, 1.0, size=(B, T, HV)))
    s = 0.5 * r.normal(size=(B, HV, K, V)) if h0 else None
    return x, s


def numpy_reference(q, k, v, g, beta, h0=None, scale=None):
    """The paper's recurrence, literally, in float64:
    S_t = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T,  o_t = S_t^T (scale q_t)."""
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    rep = HV // H
    scale = K ** -0.5 if scale is None else scale
    if g.ndim == 3:
        g = np.repeat(g[..., None], K, axis=-1)
    o = np.zeros((B, T, HV, V))
    S = np.zeros((B, HV, K, V)) if h0 is None else np.array(h0, np.float64)
    eye = np.eye(K)
    for b in range(B):
        for h in range(HV):
            St = S[b, h].copy()
            for t in range(T):
                kt, qt = k[b, t, h // rep], q[b, t, h // rep] * scale
                bt = beta[b, t, h]
                St = (eye - bt * np.outer(kt, kt)) @ np.diag(np.exp(g[b, t, h])) @ St + bt * np.outer(kt, v[b, t, h])
                o[b, t, h] = St.T @ qt
            S[b, h] = St
    return o, S


def J(d, dtype):
    return {n: jnp.asarray(a, dtype) for n, a in d.items()}


# ---------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("scalar", [False, True], ids=["kda", "gdn"])
def test_float64_recurrent_chunk_numpy(x64, scalar):
    x, h0 = make(T=45, decay=(0.0, 5.0), scalar=scalar)
    ref_o, ref_s = numpy_reference(**x, h0=h0)
    xj = J(x, jnp.float64)
    s0 = jnp.asarray(h0)
    o_r, s_r = recurrent_kda(**xj, initial_state=s0)
    assert o_r.dtype == jnp.float64 and s_r.dtype == jnp.float64
    assert np.abs(np.asarray(o_r) - ref_o).max() <= 1e-12
    assert np.abs(np.asarray(s_r) - ref_s).max() <= 1e-12
    for C in (16, 32, 64):  # 45 tokens: partial last chunk for every C
        o_c, s_c = chunk_kda(**xj, initial_state=s0, chunk_size=C)
        assert np.abs(np.asarray(o_c - o_r)).max() <= 1e-12, C
        assert np.abs(np.asarray(s_c - s_r)).max() <= 1e-12, C
    if scalar:  # the GDN entry points are the same computation
        o_g, s_g = chunk_gdn(**xj, initial_state=s0, chunk_size=16)
        o_gr, _ = recurrent_gdn(**xj, initial_state=s0)
        assert np.abs(np.asarray(o_g - o_r)).max() <= 1e-12
        assert np.abs(np.asarray(o_gr - o_r)).max() <= 1e-12
        xk = dict(xj, g=jnp.broadcast_to(xj["g"][..., None], xj["g"].shape + (8,)))
        o_k, _ = chunk_kda(**xk, initial_state=s0, chunk_size=16)
        assert np.abs(np.asarray(o_k - o_g)).max() <= 1e-12


def test_float64_very_strong_decay_exact_fallback(x64):
    """Sub-chunks spanning > 60 of cumulative decay take the masked (all exponents <= 0) path."""
    x, h0 = make(B=1, T=40, H=1, HV=2, K=4, V=3, decay=(10.0, 30.0), seed=12)
    ref_o, ref_s = numpy_reference(**x, h0=h0)
    o, s = chunk_kda(**J(x, jnp.float64), initial_state=jnp.asarray(h0), chunk_size=32)
    assert np.abs(np.asarray(o) - ref_o).max() <= 1e-12 and np.abs(np.asarray(s) - ref_s).max() <= 1e-12
    o32, _ = chunk_kda(**J(x, jnp.float32), initial_state=jnp.asarray(h0, jnp.float32), chunk_size=32)
    assert bool(jnp.all(jnp.isfinite(o32))) and np.abs(np.asarray(o32) - ref_o).max() <= 1e-5


def test_float32_strong_decay_chunk64():
    """g = -5 per step over 64-token chunks: exp(-G) would be exp(320); the masked pairwise form is
    finite and within 1e-5 of the recurrent form and of the float64 reference."""
    x, h0 = make(B=1, T=100, H=2, HV=2, K=8, V=8, seed=1)
    x["g"] = np.full_like(x["g"], -5.0)
    xj = J(x, jnp.float32)
    o_c, s_c = chunk_kda(**xj, initial_state=jnp.asarray(h0, jnp.float32), chunk_size=64)
    o_r, s_r = recurrent_kda(**xj, initial_state=jnp.asarray(h0, jnp.float32))
    assert bool(jnp.all(jnp.isfinite(o_c))) and bool(jnp.all(jnp.isfinite(s_c)))
    assert float(jnp.abs(o_c - o_r).max()) <= 1e-5 and float(jnp.abs(s_c - s_r).max()) <= 1e-5
    ref_o, _ = numpy_reference(**{n: np.asarray(a, np.float64) for n, a in xj.items()}, h0=h0.astype(np.float32))
    assert np.abs(np.asarray(o_c) - ref_o).max() <= 1e-5


@pytest.mark.parametrize("scalar", [False, True], ids=["kda", "gdn"])
def test_float32_chunk_vs_recurrent(scalar):
    x, h0 = make(T=70, decay=(0.0, 3.0), scalar=scalar, seed=2)
    xj = J(x, jnp.float32)
    o_r, s_r = recurrent_kda(**xj, initial_state=jnp.asarray(h0, jnp.float32))
    for C in (16, 64):
        o_c, s_c = chunk_kda(**xj, initial_state=jnp.asarray(h0, jnp.float32), chunk_size=C)
        assert float(jnp.abs(o_c - o_r).max()) <= 1e-5 and float(jnp.abs(s_c - s_r).max()) <= 1e-5


def test_prefill_then_decode_equals_one_pass():
    x, h0 = make(T=24, seed=3)
    xj = J(x, jnp.float32)
    s0 = jnp.asarray(h0, jnp.float32)
    o_full, s_full = recurrent_kda(**xj, initial_state=s0)
    P = 17
    pre = {n: a[:, :P] for n, a in xj.items()}
    o_pre, s = chunk_kda(**pre, initial_state=s0, chunk_size=8)
    outs = [o_pre]
    for t in range(P, 24):
        o_t, s = kda_step(*(xj[n][:, t] for n in ("q", "k", "v", "g", "beta")), s)
        outs.append(o_t[:, None])
    o = jnp.concatenate(outs, axis=1)
    assert float(jnp.abs(o - o_full).max()) <= 1e-5 and float(jnp.abs(s - s_full).max()) <= 1e-5
    # GDN step
    xs, _ = make(T=5, scalar=True, seed=4)
    xs = J(xs, jnp.float32)
    o_g, s_g = recurrent_gdn(**xs, initial_state=s0)
    st = s0
    for t in range(5):
        o_t, st = gdn_step(*(xs[n][:, t] for n in ("q", "k", "v", "g", "beta")), st)
    assert float(jnp.abs(o_t - o_g[:, -1]).max()) <= 1e-6 and float(jnp.abs(st - s_g).max()) <= 1e-6


@pytest.mark.parametrize("fn", [recurrent_kda, chunk_kda], ids=["recurrent", "chunk"])
def test_lengths_padding_exact(fn):
    x, h0 = make(B=2, T=20, seed=5)
    xj = J(x, jnp.float32)
    s0 = jnp.asarray(h0, jnp.float32)
    kw = {"chunk_size": 8} if fn is chunk_kda else {}
    o, s = fn(**xj, initial_state=s0, lengths=jnp.array([20, 11]), **kw)
    short = {n: a[1:, :11] for n, a in xj.items()}
    o1, s1 = fn(**short, initial_state=s0[1:], **kw)
    assert float(jnp.abs(o[1, :11] - o1[0]).max()) <= 1e-6
    assert float(jnp.abs(s[1] - s1[0]).max()) <= 1e-6
    assert float(jnp.abs(o[1, 11:]).max()) == 0.0
    o_all, s_all = fn(**xj, initial_state=s0, **kw)
    np.testing.assert_array_equal(np.asarray(o[0]), np.asarray(o_all[0]))


def test_bfloat16_inputs_float32_state_rounded_once():
    x, h0 = make(T=30, seed=6)
    xb = J(x, jnp.bfloat16)
    for fn in (recurrent_kda, chunk_kda):
        o, s = fn(**xb)
        assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
        o32, s32 = fn(**{n: a.astype(jnp.float32) for n, a in xb.items()})
        np.testing.assert_array_equal(np.asarray(o), np.asarray(o32.astype(jnp.bfloat16)))
        np.testing.assert_array_equal(np.asarray(s), np.asarray(s32))
    o, s = kda_step(*(xb[n][:, 0] for n in ("q", "k", "v", "g", "beta")), jnp.zeros((2, 4, 8, 6), jnp.float32))
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32


def test_jit_matches_eager():
    x, h0 = make(T=19, seed=7)
    xj = J(x, jnp.float32)
    f = jax.jit(lambda a: chunk_kda(**a, chunk_size=8))
    o, s = f(xj)
    o2, s2 = chunk_kda(**xj, chunk_size=8)
    assert float(jnp.abs(o - o2).max()) <= 1e-6 and float(jnp.abs(s - s2).max()) <= 1e-6


def test_grad_chunk_finite_differences(x64):
    x, h0 = make(B=1, T=11, H=1, HV=2, K=4, V=3, decay=(0.0, 2.0), seed=8)
    xj = J(x, jnp.float64)
    s0 = jnp.asarray(h0)
    w = jnp.asarray(np.random.default_rng(9).normal(size=(1, 11, 2, 3)))

    def loss(fn, a, **kw):
        o, s = fn(**a, initial_state=s0, **kw)
        return jnp.sum(o * w) + 0.3 * jnp.sum(s ** 2)

    f_c = lambda a: loss(chunk_kda, a, chunk_size=4)  # noqa: E731 - partial chunks and 3 chunks
    grads = jax.grad(f_c)(xj)
    grads_r = jax.grad(lambda a: loss(recurrent_kda, a))(xj)
    rng = np.random.default_rng(10)
    for n in ("q", "k", "v", "g", "beta"):
        assert bool(jnp.all(jnp.isfinite(grads[n])))
        assert float(jnp.abs(grads[n] - grads_r[n]).max()) <= 1e-10, n
        d = jnp.asarray(rng.normal(size=xj[n].shape))
        if n == "g":  # keep g <= 0 in the perturbation
            d = -jnp.abs(d)
        eps = 1e-6
        fd = (f_c(dict(xj, **{n: xj[n] + eps * d})) - f_c(dict(xj, **{n: xj[n] - eps * d}))) / (2 * eps)
        assert abs(float(fd) - float(jnp.vdot(grads[n], d))) <= 1e-7 * max(1.0, abs(float(fd))), n


def test_grad_float32_strong_decay_finite():
    x, h0 = make(B=1, T=70, H=1, HV=1, K=4, V=4, seed=11)
    x["g"] = np.full_like(x["g"], -5.0)
    xj = J(x, jnp.float32)
    gr = jax.grad(lambda a: jnp.sum(chunk_kda(**a)[0] ** 2))(xj)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in gr.values())


def test_float32_whole_chunk_tier_edge():
    """g = -1.85 per step, C = 64: every chunk spans 59.2 <= 60 either side of its middle token, so
    the whole-chunk factorized pair scores run, with factors up to exp(59) and the masked (i > r)
    products up to exp(118) = inf in float32 before the mask: outputs, states and gradients stay
    finite and within 1e-5 of the recurrent form."""
    x, h0 = make(B=1, T=150, H=2, HV=2, K=8, V=8, seed=5)
    x["g"] = np.full_like(x["g"], -1.85)
    xj = J(x, jnp.float32)
    s0 = jnp.asarray(h0, jnp.float32)
    o_c, s_c = chunk_kda(**xj, initial_state=s0, chunk_size=64)
    o_r, s_r = recurrent_kda(**xj, initial_state=s0)
    assert bool(jnp.all(jnp.isfinite(o_c))) and bool(jnp.all(jnp.isfinite(s_c)))
    assert float(jnp.abs(o_c - o_r).max()) <= 1e-5 and float(jnp.abs(s_c - s_r).max()) <= 1e-5
    gr = jax.grad(lambda a: jnp.sum(chunk_kda(**a, initial_state=s0)[0] ** 2))(xj)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in gr.values())


# ---------------------------------------------------------------------------------- bad input
SEQ_FNS = {"recurrent_kda": recurrent_kda, "chunk_kda": chunk_kda, "recurrent_gdn": recurrent_gdn,
           "chunk_gdn": chunk_gdn}
STEP_FNS = {"kda_step": kda_step, "gdn_step": gdn_step}
ALL_FNS = {**SEQ_FNS, **STEP_FNS}


def _args(name, B=1, T=5, H=2, HV=2, K=4, V=3):
    """Valid arguments (keyword dict) for ``name``; step functions drop the T axis."""
    scalar = "gdn" in name
    step = name in STEP_FNS
    lead = (B,) if step else (B, T)
    a = dict(q=jnp.zeros((*lead, H, K)), k=jnp.zeros((*lead, H, K)), v=jnp.zeros((*lead, HV, V)),
             g=-jnp.ones((*lead, HV) if scalar else (*lead, HV, K)), beta=jnp.ones((*lead, HV)))
    if step:
        a["state"] = jnp.zeros((B, HV, K, V))
    return a


def _bad_cases(name):
    """(description, modified kwargs, exception type, regex the message must match)."""
    a = _args(name)
    step = name in STEP_FNS
    st = "state" if step else "initial_state"
    lead = a["q"].shape[:-2]
    cases = [
        ("heads do not divide", dict(_args(name, HV=3)), ValueError, r"\bv has 3 value heads.*multiple"),
        ("positive log-decay", dict(a, g=-a["g"]), ValueError, r"\bg is a log-decay.*<= 0"),
        ("state wrong shape", dict(a, **{st: jnp.zeros((1, 2, 4, 4))}), ValueError, st + " must have shape"),
        ("state not an array", dict(a, **{st: [[0.0]]}), TypeError, st + " must be an array"),
        ("batch mismatch", dict(a, v=jnp.zeros((2, *a["v"].shape[1:]))), ValueError, r"\bv must have the batch"),
        ("k shape", dict(a, k=jnp.zeros((*lead, 2, 5))), ValueError, r"\bk must have the shape of q"),
        ("g shape", dict(a, g=-jnp.ones((*lead, 2, 7))), ValueError, r"\bg must have shape"),
        ("beta shape", dict(a, beta=jnp.ones((*lead, 3))), ValueError, r"\bbeta must have shape"),
        ("q rank", dict(a, q=jnp.zeros((3, 4))), ValueError, r"\bq must have shape"),
        ("q list", dict(a, q=[[0.0]]), TypeError, r"\bq must be an array"),
        ("q integer", dict(a, q=jnp.zeros(a["q"].shape, jnp.int32)), TypeError, r"\bq must be a floating"),
        ("v NaN", dict(a, v=jnp.full(a["v"].shape, jnp.nan)), ValueError, r"\bv contains NaN"),
        ("beta Inf", dict(a, beta=jnp.full(a["beta"].shape, jnp.inf)), ValueError, r"\bbeta contains NaN"),
        ("scale negative", dict(a, scale=-1.0), ValueError, r"\bscale must be"),
        ("scale string", dict(a, scale="0.5"), TypeError, r"\bscale must be a real number"),
    ]
    if not step:
        cases += [
            ("time mismatch", dict(a, v=jnp.zeros((1, 4, 2, 3))), ValueError, r"\bv must have the batch and time"),
            ("lengths too long", dict(a, lengths=jnp.array([6])), ValueError, r"\blengths must lie in"),
            ("lengths float", dict(a, lengths=jnp.array([2.0])), TypeError, r"\blengths must be an integer"),
            ("lengths shape", dict(a, lengths=jnp.array([2, 3])), ValueError, r"\blengths must have shape"),
        ]
    else:
        cases.append(("state None", dict(a, state=None), TypeError, r"\bstate must be an array"))
    if "gdn" in name:
        cases.append(("gdn with KDA gate", dict(a, g=-jnp.ones((*lead, 2, 4))), ValueError,
                      r"\bg must have shape .*one log-decay per value head\)"))
    if name.startswith("chunk"):
        for bad, exc in ((0, ValueError), (-16, ValueError), (16.0, TypeError), (True, TypeError), ("64", TypeError)):
            cases.append((f"chunk_size={bad!r}", dict(a, chunk_size=bad), exc, r"\bchunk_size must be an int"))
    return cases


BAD = [(fn, desc, kw, exc, msg) for fn in ALL_FNS for desc, kw, exc, msg in _bad_cases(fn)]


@pytest.mark.parametrize("fn,desc,kw,exc,msg", BAD, ids=[f"{b[0]}-{b[1]}" for b in BAD])
def test_bad_input_clear_error(fn, desc, kw, exc, msg):
    with pytest.raises(exc, match=msg):
        ALL_FNS[fn](**kw)


@pytest.mark.parametrize("fn", list(ALL_FNS))
def test_valid_args_run(fn):
    o, s = ALL_FNS[fn](**_args(fn))
    assert bool(jnp.all(jnp.isfinite(o))) and s.shape == (1, 2, 4, 3)


def test_decay_check_skipped_under_jit():
    """Value checks read concrete arrays only: under jit a positive g is not checked (documented)."""
    a = _args("chunk_kda")
    o, _ = jax.jit(lambda g: chunk_kda(**dict(a, g=g)))(-a["g"] * 0.01)
    assert o.shape == (1, 5, 2, 3)
