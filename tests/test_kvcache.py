"""Low-rank KV caches (lrjax.nn.attention.kvcache: Palu whitened SVD, plain SVD) and MLA
(lrjax.nn.attention.mla); tiny shapes, float64 NumPy references."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lrjax.models.char_transformer import CausalSelfAttention
from lrjax.nn.attention import kvcache as K
from lrjax.nn.attention import mla as M


def _randn(seed, shape, dtype=jnp.float32):
    """Standard normal test data drawn by NumPy (eager jax.random compiles one program per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), dtype)

ROOT = Path(__file__).resolve().parents[1]
D, H, HD = 8, 2, 4  # d_model, heads, head_dim: N = 8


def _correlated(rng, n, d):
    mix = rng.normal(size=(d, d)) * np.geomspace(1, 0.02, d)[:, None]  # strongly anisotropic inputs
    return (rng.normal(size=(n, d)) @ mix + 0.1 * rng.normal(size=(1, d))).astype(np.float32)


def _np_tail(x, w, group_cols, r):
    """Float64 transcription of Palu: S S^T = X^T X (Cholesky), s = svd(S^T W_g); sqrt(sum_{i>=r} s_i^2)."""
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    s_low = np.linalg.cholesky(x64.T @ x64)
    tail = 0.0
    for cols in group_cols:
        s = np.linalg.svd(s_low.T @ w64[:, cols], compute_uv=False)
        tail += float((s[r:] ** 2).sum())
    return np.sqrt(tail)


def test_palu_error_is_whitened_tail_and_beats_svd():
    rng = np.random.default_rng(0)
    x = _correlated(rng, 96, D)
    w_k = rng.normal(size=(D, H * HD)).astype(np.float32)
    w_v = rng.normal(size=(D, H * HD)).astype(np.float32)
    x64 = x.astype(np.float64)
    for gs, groups in ((2, [slice(0, 8)]), (1, [slice(0, 4), slice(4, 8)])):
        gh = gs * HD
        for ratio in (0.25, 0.5):
            r = round(ratio * gh)
            (kv,), plan = K.compress_kv(jnp.asarray(w_k), jnp.asarray(w_v), jnp.asarray(x), n_heads=H, ratio=ratio,
                                        group_size=gs, eps=0.0)
            assert plan.ranks_k == ((r,) * len(groups),) and plan.ratio == pytest.approx(r * len(groups) / 8)
            assert kv.down_k.shape == (D, r * len(groups)) and kv.up_k.shape == (r * len(groups), H * HD)
            err = np.linalg.norm(x64 @ w_k - x64 @ np.asarray(kv.down_k, np.float64) @ np.asarray(kv.up_k, np.float64))
            ref = _np_tail(x, w_k, groups, r)
            assert err == pytest.approx(ref, rel=2e-3) and plan.err_k[0] == pytest.approx(ref, rel=2e-3)
            (kvs,), _ = K.compress_kv(jnp.asarray(w_k), jnp.asarray(w_v), n_heads=H, ratio=ratio, group_size=gs,
                                      method="svd")
            err_svd = np.linalg.norm(x64 @ w_v - x64 @ np.asarray(kvs.down_v, np.float64) @ np.asarray(kvs.up_v))
            err_pal = np.linalg.norm(x64 @ w_v - x64 @ np.asarray(kv.down_v, np.float64) @ np.asarray(kv.up_v))
            assert err_pal < 0.9 * err_svd, (gs, ratio, err_pal, err_svd)
            # the plain SVD is the optimum of the *weight* error instead
            werr = lambda f: np.linalg.norm(w_v - np.asarray(f.down_v, np.float64) @ np.asarray(f.up_v))  # noqa: E731
            assert werr(kvs) <= werr(kv) + 1e-5
    # energy allocation: meets the budget exactly, every group keeps >= 1, errors no worse in sum
    wk3, wv3 = np.stack([w_k, 3 * w_k[:, ::-1]]), np.stack([w_v, w_v * 0.1])
    x3 = np.stack([x, _correlated(rng, 96, D)])
    layers, plan = K.compress_kv(jnp.asarray(wk3), jnp.asarray(wv3), jnp.asarray(x3), n_heads=H, ratio=0.25,
                                 group_size=1, allocation="energy")
    assert len(layers) == 2 and sum(plan.widths) == round(0.25 * 2 * 16) and min(map(min, plan.ranks_k)) >= 1
    _, uni = K.compress_kv(jnp.asarray(wk3), jnp.asarray(wv3), jnp.asarray(x3), n_heads=H, ratio=0.25, group_size=1)
    rel = lambda p: sum(e ** 2 for e in p.rel_err_k + p.rel_err_v)  # noqa: E731
    assert rel(plan) <= rel(uni) + 1e-9
    assert plan.cache_bytes(10, 2, jnp.float32) == 2 * 10 * 8 * 4 and plan.full_cache_bytes(10) == 10 * 2 * 16 * 2


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_full_rank_is_exact_attention_and_prefill_decode(dtype):
    rng = np.random.default_rng(1)
    attn = CausalSelfAttention(D, H, rngs=nnx.Rngs(0))
    w = {k: getattr(attn, k).kernel[...] * 10 for k in "qkvo"}  # larger weights: non-trivial softmax
    for k in "qkvo":
        getattr(attn, k).kernel[...] = w[k]
    x = jnp.asarray(rng.normal(size=(2, 6, D)), jnp.float32)
    calib = jnp.asarray(_correlated(rng, 64, D))
    (kv,), plan = K.compress_kv(w["k"], w["v"], calib, n_heads=H, ratio=1.0, group_size=1)
    assert plan.ratio == 1.0
    xd = x.astype(dtype)
    y = K.latent_self_attention(xd, w["q"], w["o"], kv, n_heads=H)
    y_ref = attn(x)  # the char transformer's own attention, float32
    assert y.dtype == dtype
    tol = 2e-4 if dtype == jnp.float32 else 0.05 * float(jnp.max(jnp.abs(y_ref)))
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref), atol=tol)
    np.testing.assert_allclose(np.asarray(K.dense_self_attention(x, w["q"], w["k"], w["v"], w["o"], n_heads=H)),
                               np.asarray(y_ref), atol=2e-5)
    # a compressed cache: prefill 3 tokens, then decode 3 -> the same as one full latent pass
    (kv2,), _ = K.compress_kv(w["k"], w["v"], calib, n_heads=H, ratio=0.5, group_size=2)
    full = K.latent_self_attention(xd, w["q"], w["o"], kv2, n_heads=H)
    yp, cache = K.latent_prefill(xd[:, :3], w["q"], w["o"], kv2, n_heads=H, capacity=6)
    ys = [yp]
    for t in range(3, 6):
        yt, cache = K.latent_decode_step(xd[:, t], w["q"], w["o"], kv2, cache, n_heads=H)
        ys.append(yt[:, None])
    assert cache.h_k.shape == (2, 6, 4) and int(cache.length) == 6
    tol = 1e-5 if dtype == jnp.float32 else 0.02 * float(jnp.max(jnp.abs(full.astype(jnp.float32))))
    np.testing.assert_allclose(np.asarray(jnp.concatenate(ys, 1), np.float32), np.asarray(full, np.float32), atol=tol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mla_direct_and_absorbed_equal_reference_and_prefill_decode(dtype):
    p = M.init_mla_params(jax.random.key(0), D, H, 3, std=0.5)
    x = _randn(1, (2, 7, D)).astype(dtype)
    y = M.mla_forward(p, x, n_heads=H)
    assert y.dtype == dtype
    # float64 NumPy transcription of the direct form (K, V materialized)
    pn = {k: np.asarray(v, np.float64) for k, v in p.items()}
    xn = np.asarray(x, np.float64)
    c = xn @ pn["w_dkv"]
    c = c / np.sqrt((c ** 2).mean(-1, keepdims=True) + 1e-6) * pn["kv_norm"]
    q, k, v = (a.reshape(2, 7, H, HD) for a in (xn @ pn["w_q"], c @ pn["w_uk"], c @ pn["w_uv"]))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(HD) + np.where(np.tri(7) > 0, 0, -np.inf)
    pr = np.exp(s - s.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    ref = np.einsum("bhqk,bkhd->bqhd", pr, v).reshape(2, 7, -1) @ pn["w_o"]
    tol = 1e-5 if dtype == jnp.float32 else 0.03 * np.abs(ref).max()
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, atol=tol)
    np.testing.assert_allclose(np.asarray(M.mla_forward(p, x, n_heads=H, absorb=True), np.float64), ref, atol=tol)
    yp, cache = M.mla_prefill(p, x[:, :4], n_heads=H, capacity=7)
    ys = [yp]
    for t in range(4, 7):
        yt, cache = M.mla_decode_step(p, x[:, t], cache, n_heads=H)
        ys.append(yt[:, None])
    assert cache.c.shape == (2, 7, 3)  # d_c numbers per token, whatever H
    np.testing.assert_allclose(np.asarray(jnp.concatenate(ys, 1), np.float64), np.asarray(y, np.float64), atol=tol)
    if dtype == jnp.float32:
        g = jax.grad(lambda q: jnp.sum(M.mla_forward(q, x, n_heads=H) ** 2))(p)
        assert all(bool(jnp.all(jnp.isfinite(a))) and float(jnp.abs(a).sum()) > 0 for a in g.values())
        layer = M.MultiHeadLatentAttention(D, H, 3, rngs=nnx.Rngs(0))
        yl = layer(x)  # same shapes as above: no new compile
        y1, c1 = layer.prefill(x[:, :4], capacity=7)
        y2, _ = layer.decode(x[:, 4], c1)
        np.testing.assert_allclose(np.asarray(y2), np.asarray(yl[:, 4]), atol=1e-5)


def test_bad_input():
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.normal(size=(D, H * HD)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(32, D)), jnp.float32)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="ratio"):
            K.compress_kv(w, w, x, n_heads=H, ratio=bad, group_size=1)
    with pytest.raises(TypeError, match="ratio"):
        K.compress_kv(w, w, x, n_heads=H, ratio="half", group_size=1)
    with pytest.raises(ValueError, match="x must be calibration"):
        K.compress_kv(w, w, x[:, :5], n_heads=H, ratio=0.5, group_size=1)
    with pytest.raises(ValueError, match="x "):
        K.compress_kv(w, w, None, n_heads=H, ratio=0.5, group_size=1)
    with pytest.raises(ValueError, match="n_heads"):
        K.compress_kv(w, w, x, n_heads=3, ratio=0.5, group_size=1)
    with pytest.raises(ValueError, match="group_size"):
        K.compress_kv(w, w, x, n_heads=H, ratio=0.5, group_size=3)
    with pytest.raises(ValueError, match="w_v"):
        K.compress_kv(w, w[:, :4], x, n_heads=H, ratio=0.5, group_size=1)
    with pytest.raises(TypeError, match="w_k"):
        K.compress_kv(np.ones((D, 8), np.int32), w, x, n_heads=H, group_size=1)
    with pytest.raises(TypeError, match="method"):
        K.compress_kv(w, w, x, n_heads=H, group_size=1, method=1)
    with pytest.raises(ValueError, match="allocation"):
        K.compress_kv(w, w, x, n_heads=H, group_size=1, allocation="fisher")
    (kv,), _ = K.compress_kv(w, w, x, n_heads=H, ratio=0.5, group_size=1)
    cache = K.init_latent_cache(kv, 2, 4)
    bad = cache._replace(h_k=jnp.zeros((2, 4, 3)))
    with pytest.raises(ValueError, match="cache.h_k"):
        K.latent_decode_step(jnp.zeros((2, D)), w, w.T, kv, bad, n_heads=H)
    with pytest.raises(TypeError, match="cache"):
        K.latent_decode_step(jnp.zeros((2, D)), w, w.T, kv, (cache.h_k, cache.h_v), n_heads=H)
    with pytest.raises(ValueError, match="x must have shape"):
        K.latent_self_attention(jnp.zeros((2, 3, 5)), w, w.T, kv, n_heads=H)
    p = M.init_mla_params(jax.random.key(0), D, H, 3)
    with pytest.raises(ValueError, match="cache.c"):
        M.mla_decode_step(p, jnp.zeros((2, D)), M.init_mla_cache(2, 4, 5), n_heads=H)
    with pytest.raises(ValueError, match="n_heads"):
        M.mla_forward(p, jnp.zeros((1, 2, D)), n_heads=3)
    with pytest.raises(ValueError, match="params"):
        M.mla_forward({**p, "w_uk": jnp.zeros((3, 4))}, jnp.zeros((1, 2, D)), n_heads=H)
    with pytest.raises(ValueError, match="params is missing"):
        M.mla_forward({"w_q": p["w_q"]}, jnp.zeros((1, 2, D)), n_heads=H)
    with pytest.raises(ValueError, match="n_heads"):
        M.MultiHeadLatentAttention(10, 3, 4, rngs=nnx.Rngs(0))
    # compress_kv: host-only (tracers refused), all-zero calibration, default group_size divides n_heads
    with pytest.raises(TypeError, match="host-only"):
        jax.jit(lambda a, b, c: K.compress_kv(a, b, c, n_heads=H, group_size=1))(w, w, x)
    with pytest.raises(ValueError, match="x .*all zero.*eps cannot help"):
        K.compress_kv(w, w, jnp.zeros_like(x), n_heads=H, ratio=0.5)
    assert K.compress_kv(w, w, x, n_heads=H, ratio=0.5)[1].group_size == H      # H=2: largest divisor <= 4
    # decoding into a full cache is refused (it used to overwrite the last slot silently)
    xs = jnp.asarray(rng.normal(size=(2, 3, D)), jnp.float32)
    _, full = K.latent_prefill(xs, w, w.T, kv, n_heads=H, capacity=3)
    with pytest.raises(ValueError, match="cache is full.*capacity"):
        K.latent_decode_step(xs[:, 0], w, w.T, kv, full, n_heads=H)
    _, mfull = M.mla_prefill(p, xs, n_heads=H, capacity=3)
    with pytest.raises(ValueError, match="cache is full.*capacity"):
        M.mla_decode_step(p, xs[:, 0], mfull, n_heads=H)
    # no token / non-finite x
    x0 = jnp.zeros((2, 0, D))
    for call in (lambda: K.dense_self_attention(x0, w, w, w, w.T, n_heads=H),
                 lambda: K.latent_prefill(x0, w, w.T, kv, n_heads=H, capacity=3),
                 lambda: M.mla_prefill(p, x0, n_heads=H, capacity=3),
                 lambda: M.MultiHeadLatentAttention(D, H, 3, rngs=nnx.Rngs(0))(x0),
                 lambda: M.mla_forward(p, xs.at[0, 1, 2].set(jnp.nan), n_heads=H)):
        with pytest.raises(ValueError, match="x "):
            call()
    # causal_attention / mla_attend: out-of-range positions refused; a fully masked (traced) row is 0
    q4 = xs.reshape(2, 3, H, HD)
    c3 = xs[..., :3]
    for kw, name in (({"length": 0}, "length"), ({"length": 4}, "length"), ({"q_start": -1}, "q_start")):
        with pytest.raises(ValueError, match=name):
            K.causal_attention(q4, q4, q4, **kw)
        with pytest.raises(ValueError, match=name):
            M.mla_attend(q4, c3, p["w_uk"], p["w_uv"], **kw)
    masked = jax.jit(lambda n: (K.causal_attention(q4, q4, q4, length=n),
                                M.mla_attend(q4, c3, p["w_uk"], p["w_uv"], length=n)))(0)
    for o in masked:
        np.testing.assert_array_equal(np.asarray(o), 0.0)


def test_kv_cache_quick(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", LRJAX_DATA_DIR=str(tmp_path / "data"), MPLBACKEND="Agg",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "res"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "kv_cache.py"), "--quick", "--out", str(out),
                           "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "kv_cache.json").read_text())
    assert (out / "kv_cache.png").stat().st_size > 0 and "| cache |" in (out / "kv_cache.md").read_text()
    assert res["palu_full_matches"]["abs_loss_diff"] < 1e-4
    methods = {r["method"] for r in res["rows"]}
    assert {"full", "palu", "svd", "mla"} <= methods
    for r in res["rows"]:
        assert np.isfinite(r["loss"]) and 0 < r["cache_ratio"] <= 1.0
    assert res["timing"]["full (plain forward)"]["ratio_to_limit"] == 1.0
