"""FlexMoRE: lrjax.linalg.lowrank_delta / sqrt_split against a float64 NumPy SVD, degenerate deltas,
dtypes, bad input, PiSSA sharing the split, and mixture experts built from fine-tuned weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrjax
from lrjax import linalg
from lrjax.nn import mixture as mx


def _rand(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _trunc64(d, r):
    u, s, vt = np.linalg.svd(np.asarray(d, np.float64), full_matrices=False)
    return (u[..., :, :r] * s[..., None, :r]) @ vt[..., :r, :], s


def test_lowrank_delta_is_the_truncated_svd_float64():
    w0, we = _rand(0, 2, 7, 5), _rand(1, 2, 7, 5)  # batched [*batch, M, N]
    a, b = linalg.lowrank_delta(we, w0, 3)
    assert a.shape == (2, 7, 3) and b.shape == (2, 3, 5) and a.dtype == jnp.float32
    want, s = _trunc64(we.astype(np.float64) - w0, 3)
    np.testing.assert_allclose(np.asarray(a, np.float64) @ np.asarray(b, np.float64), want, rtol=1e-5, atol=1e-5)
    # the sqrt(S) split: a = U_r sqrt(S_r), b = sqrt(S_r) V_r^T, so ||a_i|| = ||b_i|| = sqrt(s_i)
    np.testing.assert_allclose(np.linalg.norm(a, axis=-2), np.sqrt(s[..., :3]), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(b, axis=-1), np.sqrt(s[..., :3]), rtol=1e-5)
    # a^T a = b b^T = diag(S_r) (balanced)
    np.testing.assert_allclose(np.swapaxes(a, -1, -2) @ a, b @ np.swapaxes(b, -1, -2), rtol=1e-4, atol=1e-5)
    # full rank reconstructs the expert exactly
    af, bf = linalg.lowrank_delta(we[0], w0[0], 5)
    np.testing.assert_allclose(w0[0] + af @ bf, we[0], rtol=1e-5, atol=1e-5)
    # jit gives the same factors
    aj, bj = jax.jit(linalg.lowrank_delta, static_argnums=2)(we, w0, 3)
    np.testing.assert_allclose(aj, a, rtol=1e-5, atol=1e-5)


def test_lowrank_delta_degenerate_and_bfloat16():
    w0 = _rand(0, 6, 4)
    a, b = linalg.lowrank_delta(w0, w0, 2)  # zero delta: zero factors, no NaN
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
    np.testing.assert_array_equal(np.asarray(a) @ np.asarray(b), 0.0)
    d1 = np.outer(_rand(1, 6), _rand(2, 4))  # rank-1 delta asked at rank 3
    a, b = linalg.lowrank_delta(w0 + d1, w0, 3)
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
    np.testing.assert_allclose(a @ b, d1, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(a[:, 1:], axis=0), 0.0, atol=2e-3)  # ~sqrt(eps * s_1)
    # bfloat16 weights: the delta is formed in float32 (exact difference of the bf16 values)
    wb, web = jnp.asarray(w0, jnp.bfloat16), jnp.asarray(w0 + 0.01 * _rand(3, 6, 4), jnp.bfloat16)
    a, b = linalg.lowrank_delta(web, wb, 4)
    assert a.dtype == jnp.float32
    want, _ = _trunc64(np.asarray(web, np.float64) - np.asarray(wb, np.float64), 4)
    np.testing.assert_allclose(a @ b, want, rtol=1e-4, atol=1e-6)


def test_lowrank_delta_bad_input():
    w = jnp.zeros((4, 3))
    with pytest.raises(ValueError, match="w_expert and w_base must have the same shape"):
        linalg.lowrank_delta(w, jnp.zeros((3, 4)), 1)
    with pytest.raises(ValueError, match="rank=4 exceeds"):
        linalg.lowrank_delta(w, w, 4)
    with pytest.raises(ValueError, match="rank must be"):
        linalg.lowrank_delta(w, w, 0)
    with pytest.raises(TypeError, match="rank must be"):
        linalg.lowrank_delta(w, w, 1.5)
    with pytest.raises(TypeError, match="w_base"):
        linalg.lowrank_delta(w, jnp.zeros((4, 3), jnp.int32), 1)
    with pytest.raises(ValueError, match="w_expert contains NaN"):
        linalg.lowrank_delta(jnp.full((4, 3), jnp.nan), w, 1)
    with pytest.raises(ValueError, match="w_expert must have ndim >= 2"):
        linalg.lowrank_delta(jnp.zeros(3), jnp.zeros(3), 1)
    with pytest.raises(ValueError, match="scale"):
        linalg.sqrt_split(jnp.zeros((4, 2)), jnp.zeros(2), jnp.zeros((2, 3)), 0.0)
    with pytest.raises(ValueError, match="must agree in r"):
        linalg.sqrt_split(jnp.zeros((4, 2)), jnp.zeros(3), jnp.zeros((2, 3)))


def test_pissa_shares_the_sqrt_split():
    w = _rand(4, 6, 5)
    rp = lrjax.PiSSA(rank=2, alpha=4.0)  # scale s = alpha / r = 2
    _, ad = rp.init(jax.random.key(0), {"k": {"kernel": jnp.asarray(w)}})
    f = ad["k/kernel"]
    a, b = linalg.lowrank_delta(w, np.zeros_like(w), 2)
    np.testing.assert_allclose(f["a"] * np.sqrt(2.0), a, rtol=1e-5, atol=1e-6)  # A = U sqrt(S / s)
    np.testing.assert_allclose(f["b"] * np.sqrt(2.0), b, rtol=1e-5, atol=1e-6)


def test_experts_from_finetuned_mixture_reproduces_the_experts():
    m, n = 6, 5
    w0 = _rand(0, m, n)
    ws = [w0 + _rand(1 + i, m, n) for i in range(3)]
    a, b, ranks = mx.experts_from_finetuned(w0, ws, (5, 2, 1))  # heterogeneous, packed without padding
    assert ranks == (5, 2, 1) and a.shape == (m, 8) and b.shape == (8, n)
    x = _rand(9, 4, m)
    for e in range(3):
        g = np.zeros((4, 3), np.float32)
        g[:, e] = 1.0
        y = x @ w0 + mx.mixture_delta(x, a, b, g, ranks=ranks)
        want, _ = _trunc64(ws[e] - w0, ranks[e])
        np.testing.assert_allclose(y, x.astype(np.float64) @ (w0 + want), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(x @ w0 + mx.mixture_delta(x, a, b, np.eye(3, dtype=np.float32)[[0] * 4], ranks=ranks),
                               x @ ws[0], rtol=1e-4, atol=1e-4)  # full rank = the fine-tuned expert
    a2, b2, r2 = mx.experts_from_finetuned(w0, np.stack(ws), 2)
    assert r2 == (2, 2, 2) and a2.shape == (m, 6)
    with pytest.raises(ValueError, match="ranks lists 2 ranks"):
        mx.experts_from_finetuned(w0, ws, (1, 2))
    with pytest.raises(ValueError, match=r"ranks\[0\]=6 exceeds"):
        mx.experts_from_finetuned(w0, ws, 6)
    with pytest.raises(ValueError, match=r"w_experts\[1\]"):
        mx.experts_from_finetuned(w0, [ws[0], ws[1].T], 1)
    with pytest.raises(ValueError, match="w_experts must hold"):
        mx.experts_from_finetuned(w0, [], 1)

