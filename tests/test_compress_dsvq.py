"""lrjax.compress.dsformer and lrjax.compress.lr2vq: masks, STE, equal-parameter error, PQ reduction."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lrjax
from lrjax.compress import dsformer as DS
from lrjax.compress import lr2vq as VQ


def _randn(seed, shape, dtype=jnp.float32):
    """Standard normal test data drawn by NumPy (eager jax.random compiles one program per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), dtype)


# ------------------------------------------------------------------------------ DSFormer
@settings(max_examples=8, deadline=None)
@given(k=st.sampled_from([1, 3, 7]), n=st.sampled_from([1, 5]), s=st.integers(1, 7), seed=st.integers(0, 5))
def test_topk_mask_exactly_s_per_column(k, n, s, seed):
    s = min(s, k)
    c = jax.random.normal(jax.random.key(seed), (k, n))
    c = c.at[0].set(c[1] if k > 1 else c[0])  # ties
    mask = np.asarray(DS.topk_mask(c, s))
    assert set(np.unique(mask)) <= {0.0, 1.0}
    np.testing.assert_array_equal(mask.sum(0), np.full(n, s))
    kept = np.where(mask > 0, np.abs(np.asarray(c)), np.inf).min(0)
    dropped = np.where(mask > 0, -np.inf, np.abs(np.asarray(c))).max(0)
    assert np.all(kept >= dropped)


def test_ste_forward_sparse_backward_identity():
    c = _randn(0, (6, 4))
    out = DS.ste(c, 2)
    np.testing.assert_array_equal(np.asarray(out != 0).sum(0), [2] * 4)
    g = jax.grad(lambda c: jnp.sum(DS.ste(c, 2) * jnp.arange(24.0).reshape(6, 4)))(c)
    np.testing.assert_allclose(g, jnp.arange(24.0).reshape(6, 4))  # straight through to every entry


def test_dsformer_init_basis_has_unit_columns_and_stays_bounded():
    # ALS is scale-free (D S = D L^-1 L S): without normalisation an atom drifted to overflow on a
    # trained attention kernel (k = 64, NaN perplexity in bench_compress); the basis is now unit-norm.
    rng = np.random.default_rng(0)
    q1, _ = np.linalg.qr(rng.normal(size=(128, 128)))
    q2, _ = np.linalg.qr(rng.normal(size=(128, 128)))
    w = jnp.asarray((q1 * np.arange(1, 129.0) ** -1.0) @ q2.T, jnp.float32)  # heavy-tailed spectrum
    d, c = DS.init(w, 64, 4)
    norms = np.linalg.norm(np.asarray(d), axis=0)
    assert np.all((np.abs(norms - 1) < 1e-4) | (norms == 0)), norms
    assert np.all(np.isfinite(np.asarray(c)))
    assert float(jnp.linalg.norm(w - d @ c) / jnp.linalg.norm(w)) < 1.0


def test_dsformer_init_refuses_non_finite_factors(monkeypatch):
    monkeypatch.setattr(DS, "_init", lambda w, k, s, iters, lam: (jnp.full((w.shape[0], k), jnp.nan), jnp.zeros((k, w.shape[1]))))
    with pytest.raises(ValueError, match="did not stay finite.*lam"):
        DS.init(jnp.ones((8, 8)), 4, 2)


def test_dense_sparse_beats_svd_at_equal_params_and_runs_factored():
    m, n, k, s = 48, 64, 12, 3
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    c0 = jax.random.normal(k2, (k, n)) * DS.topk_mask(jax.random.normal(k3, (k, n)), s)
    w = jax.random.normal(k1, (m, k)) @ c0 + 0.01 * jax.random.normal(k4, (m, n))
    comp = DS.compress({"fc": {"kernel": w}}, k, s)
    f = comp.factors["fc/kernel"]
    np.testing.assert_array_equal(np.asarray(f["b"] != 0).sum(0), np.full(n, s))
    ds_err = comp.report.layers[0].rel_error
    r = DS.svd_rank_at_equal_params(m, n, k, s)
    assert r * (m + n) <= k * m + s * n
    u, sv, vt = lrjax.linalg.svd(w, r)
    svd_err = float(jnp.linalg.norm(w - (u * sv) @ vt) / jnp.linalg.norm(w))
    assert ds_err < 0.5 * svd_err
    x = jax.random.normal(k4, (5, m))
    fn = lambda p, x: x @ p["fc"]["kernel"]  # noqa: E731
    np.testing.assert_allclose(lrjax.factored(fn, comp.rp)(comp.base, comp.factors, x),
                               fn(comp.materialize(), x), rtol=1e-4, atol=1e-4)
    assert comp.report.layers[0].bytes_after == DS.num_bytes(m, n, k, s) == (k * m + s * n) * 4 + math.ceil(s * n * 4 / 8)
    sf = DS.ste_factors(comp.factors, s)
    np.testing.assert_array_equal(np.asarray(sf["fc/kernel"]["b"] != 0).sum(0), np.full(n, s))


W8 = _randn(1, (8, 6))


@pytest.mark.parametrize("call", [
    lambda: DS.topk_mask(W8, 9), lambda: DS.ste(W8, 9), lambda: DS.init(W8, 3, 4),
    lambda: DS.compress({"k": W8}, 3, 4, "k"), lambda: DS.num_bytes(8, 6, 3, 4),
    lambda: DS.svd_rank_at_equal_params(8, 6, 3, 4),
    lambda: DS.ste_factors({"k": {"a": W8, "b": W8}}, 9)])
def test_s_greater_than_k_refused(call):
    with pytest.raises(ValueError, match="s=.*exceeds the basis size k"):
        call()


@pytest.mark.parametrize("call,exc,name", [
    (lambda: DS.topk_mask(W8, 0), ValueError, "s"),
    (lambda: DS.topk_mask(W8, 2.0), TypeError, "s"),
    (lambda: DS.topk_mask([[1.0]], 1), TypeError, "c"),
    (lambda: DS.topk_mask(jnp.ones(4), 1), ValueError, "c"),
    (lambda: DS.init(W8, 7, 2), ValueError, "k"),
    (lambda: DS.init(W8.at[0, 0].set(jnp.nan), 3, 2), ValueError, "w"),
    (lambda: DS.init(W8, 3, 2, iters=-1), ValueError, "iters"),
    (lambda: DS.init(W8, 3, 2, lam=-1.0), ValueError, "lam"),
    (lambda: DS.compress({"k": W8}, 7, 2, "k"), ValueError, "k"),
    (lambda: DS.compress({"k": W8.at[0, 0].set(jnp.inf)}, 3, 2, "k"), ValueError, "params"),
    (lambda: DS.compress({"k": W8}, "3", 2, "k"), TypeError, "k"),
    (lambda: DS.ste_factors([], 2), TypeError, "factors"),
    (lambda: DS.compress(None, 3, 2), TypeError, "params"),
    (lambda: DS.compress("w", 3, 2), TypeError, "params"),
    (lambda: DS.num_bytes(0, 6, 3, 2), ValueError, "m"),
])
def test_dsformer_bad_arguments_named(call, exc, name):
    with pytest.raises(exc, match=name):
        call()


# -------------------------------------------------------------------------------- LR^2VQ
def test_subvector_roundtrip():
    w = jnp.arange(48.0).reshape(8, 6)
    v = VQ.to_subvectors(w, 4)
    assert v.shape == (12, 4)
    np.testing.assert_array_equal(v[0], w[:4, 0])
    np.testing.assert_array_equal(VQ.from_subvectors(v, (8, 6)), w)


def test_lr2vq_with_identity_projection_is_product_quantization():
    w = _randn(3, (16, 12))
    key = jax.random.key(4)
    q = VQ.quantize(w, 4, 4, 8, key=key, p=jnp.eye(4))
    cb, a = VQ.pq(w, 4, 8, key=key)
    np.testing.assert_array_equal(q["assign"], a)
    np.testing.assert_array_equal(q["codebook"], cb)
    np.testing.assert_array_equal(VQ.reconstruct(q), VQ.from_subvectors(cb[a], w.shape))


def test_lowrank_stage_and_dkm():
    w = _randn(5, (16, 12))
    p, z = VQ.lowrank_init(w, 4, 2)
    assert p.shape == (4, 2) and z.shape == (48, 2)
    np.testing.assert_allclose(p.T @ p, jnp.eye(2), atol=1e-5)
    full_p, full_z = VQ.lowrank_init(w, 4, 4)
    np.testing.assert_allclose(VQ.from_subvectors(VQ.decode(full_p, full_z), w.shape), w, atol=1e-5)
    cb, _ = VQ.kmeans(z, 6, key=jax.random.key(0))
    cb2, soft = VQ.dkm(z, cb, temperature=0.05)
    assert soft.shape == z.shape and cb2.shape == cb.shape
    g = jax.grad(lambda z: jnp.sum(VQ.dkm(z, cb)[1] ** 2))(z)
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0
    q = VQ.quantize(w, 4, 2, 6, key=jax.random.key(0))
    assert VQ.reconstruct(q).shape == w.shape


def test_compression_ratio_formula():
    assert VQ.compression_ratio(1000, 8, 16, 4) == pytest.approx(32 * 1000 * 8 / (1000 * 4 + 32 * (64 + 32)))
    assert VQ.compression_ratio(10 ** 6, 8, 256, 8) == pytest.approx(32 * 8 / 8, rel=0.01)


@pytest.mark.parametrize("call,exc,name", [
    (lambda: VQ.to_subvectors(W8, 3), ValueError, "m"),
    (lambda: VQ.to_subvectors(W8, 0), ValueError, "m"),
    (lambda: VQ.to_subvectors(W8.at[0, 0].set(jnp.nan), 4), ValueError, "w"),
    (lambda: VQ.to_subvectors(jnp.ones(8), 4), ValueError, "w"),
    (lambda: VQ.from_subvectors(jnp.ones((5, 4)), (8, 6)), ValueError, "v"),
    (lambda: VQ.lowrank_init(W8, 4, 5), ValueError, "d"),
    (lambda: VQ.decode(jnp.ones((4, 2)), jnp.ones((3, 3))), ValueError, "z"),
    (lambda: VQ.kmeans(jnp.ones((5, 2)), 6, key=jax.random.key(0)), ValueError, "k"),
    (lambda: VQ.kmeans(jnp.ones((5, 2)), 2, key=jax.random.key(0), iters=-1), ValueError, "iters"),
    (lambda: VQ.dkm(jnp.ones((5, 2)), jnp.ones((2, 3))), ValueError, "codebook"),
    (lambda: VQ.dkm(jnp.ones((5, 2)), jnp.ones((2, 2)), temperature=0.0), ValueError, "temperature"),
    (lambda: VQ.quantize(W8, 4, 2, 3, key=jax.random.key(0), p=jnp.eye(4)), ValueError, "p"),
    (lambda: VQ.reconstruct({"p": 1}), TypeError, "q"),
    (lambda: VQ.pq(W8, 4, 13, key=jax.random.key(0)), ValueError, "k"),
    (lambda: VQ.kmeans(jnp.ones((5, 2)), 2, key=3), TypeError, "key"),
    (lambda: VQ.kmeans(jnp.ones((5, 2)).at[0, 0].set(jnp.nan), 2, key=jax.random.key(0)), ValueError, "z"),
    (lambda: VQ.quantize(W8.at[0, 0].set(jnp.inf), 4, 2, 3, key=jax.random.key(0)), ValueError, "w"),
    (lambda: VQ.compression_ratio(10, 4, 1, 2), ValueError, "k"),
    (lambda: VQ.compression_ratio(10, 4, 16, 5), ValueError, "d"),
])
def test_lr2vq_bad_arguments_named(call, exc, name):
    with pytest.raises(exc, match=name):
        call()
