"""LAMA (Mehta et al. 2019) and the structured self-attention baseline: float64 checks against dense
NumPy forms of the paper's equations, masking, transforms and bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lrjax.nn.attention.lama import (LAMA, StructuredSelfAttention, attention_pool, lama_attention, lama_bilinear,
                                     masked_mean, structured_self_attention)


def _randn(seed, shape, dtype=jnp.float32):
    """Standard normal test data drawn by NumPy (eager jax.random compiles one program per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), dtype)

def _np_lama(h, c, p, q, mask):
    """Independent float64 transcription: dense per-head bilinear forms, tanh, L2 over heads, masked softmax."""
    T, m = h.shape[0], p.shape[1]
    z = np.array([[h[t] @ np.outer(q[:, j], p[:, j]) @ c for j in range(m)] for t in range(T)])  # [T, m]
    a = np.tanh(z)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    out = np.zeros((m, T))
    idx = np.nonzero(mask)[0]
    e = np.exp(a[idx].T - a[idx].T.max(axis=1, keepdims=True))
    out[:, idx] = e / e.sum(axis=1, keepdims=True)
    return z, out


def test_lama_float64_matches_dense_bilinear_and_masks():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        B, T, d, m = 3, 7, 5, 3
        h = rng.normal(size=(B, T, d))
        p, q = rng.normal(size=(d, m)), rng.normal(size=(d, m))
        lengths = np.array([7, 4, 1])
        mask = np.arange(T)[None] < lengths[:, None]
        mask[1, 0] = False                                  # a left pad too
        c = np.asarray(masked_mean(jnp.asarray(h), jnp.asarray(mask)))
        for b in range(B):
            np.testing.assert_allclose(c[b], h[b][mask[b]].mean(0), rtol=1e-12)
        z = np.asarray(lama_bilinear(jnp.asarray(h), jnp.asarray(c), jnp.asarray(p), jnp.asarray(q)))
        a = np.asarray(lama_attention(jnp.asarray(h), jnp.asarray(p), jnp.asarray(q), mask=jnp.asarray(mask)))
        assert z.dtype == np.float64 and a.shape == (B, m, T)
        for b in range(B):
            # the sum of the m rank-one head scores is the dense rank-m bilinear form h^T (Q P^T) c
            np.testing.assert_allclose(z[b].sum(-1), h[b] @ (q @ p.T) @ c[b], rtol=1e-12, atol=1e-12)
            z_ref, a_ref = _np_lama(h[b], c[b], p, q, mask[b])
            np.testing.assert_allclose(z[b], z_ref, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(a[b], a_ref, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(a.sum(-1), 1.0, rtol=1e-12)
        assert np.all(a[~np.broadcast_to(mask[:, None, :], a.shape)] == 0.0)
        # fully padded sequence: zeros, never NaN; zero states: finite (L2 of a zero vector guarded)
        a0 = np.asarray(lama_attention(jnp.zeros((1, 4, d)), jnp.asarray(p), jnp.asarray(q),
                                       mask=jnp.zeros((1, 4), bool)))
        assert np.all(a0 == 0.0)
        assert np.all(np.isfinite(np.asarray(lama_attention(jnp.zeros((1, 4, d)), jnp.asarray(p), jnp.asarray(q)))))
        # structured self-attention baseline vs NumPy: softmax(W2 tanh(W1 H^T))
        w1, w2 = rng.normal(size=(4, d)), rng.normal(size=(2, 4))
        s = np.asarray(structured_self_attention(jnp.asarray(h), jnp.asarray(w1), jnp.asarray(w2), jnp.asarray(mask)))
        lg = w2 @ np.tanh(w1 @ h[0].T)
        np.testing.assert_allclose(s[0], np.exp(lg) / np.exp(lg).sum(1, keepdims=True), rtol=1e-12)
        np.testing.assert_allclose(s.sum(-1), 1.0, rtol=1e-12)
        M = np.asarray(attention_pool(jnp.asarray(a), jnp.asarray(h)))
        np.testing.assert_allclose(M[0], a[0] @ h[0], rtol=1e-12)


def test_lama_module_jit_grad_vmap_dtypes():
    d, m, T = 6, 3, 5
    lama = LAMA(d, m, rngs=nnx.Rngs(0))
    ssa = StructuredSelfAttention(d, m, 4, rngs=nnx.Rngs(1))
    assert lama.p.value.shape == (d, m) and lama.q.value.shape == (d, m)
    n_lama = sum(x.size for x in jax.tree.leaves(nnx.state(lama, nnx.Param)))
    n_ssa = sum(x.size for x in jax.tree.leaves(nnx.state(ssa, nnx.Param)))
    assert n_lama == 2 * d * m and n_ssa == 4 * (d + m)
    assert sum(x.size for x in jax.tree.leaves(nnx.state(LAMA(d, m, context="learned", rngs=nnx.Rngs(0)),
                                                           nnx.Param))) == 2 * d * m + d
    h = _randn(0, (2, T, d))
    mask = jnp.array([[True] * T, [False, True, True, True, False]])
    M, A = lama(h, mask)
    assert M.shape == (2, m, d) and A.shape == (2, m, T)
    # padding does not change the result: the unpadded middle of row 1 alone gives the same weights
    _, A1 = lama(h[1:, 1:4])
    np.testing.assert_allclose(A[1, :, 1:4], A1[0], rtol=1e-5, atol=1e-6)
    # jit / grad / vmap through the pure function
    p, q = lama.p.value, lama.q.value
    f = jax.jit(lambda h, p, q: jnp.sum(attention_pool(lama_attention(h, p, q, mask=mask), h) ** 2))
    g = jax.grad(f, argnums=(0, 1, 2))(h, p, q)
    assert all(bool(jnp.all(jnp.isfinite(x))) and float(jnp.abs(x).sum()) > 0 for x in g)
    np.testing.assert_allclose(f(h, p, q), jnp.sum(M ** 2), rtol=1e-5)
    av = jax.vmap(lambda hh, mm: lama_attention(hh, p, q, mask=mm))(h, mask)
    np.testing.assert_allclose(av, A, rtol=1e-5, atol=1e-7)
    # bfloat16 in -> bfloat16 out, close to float32
    Mb, Ab = lama(h.astype(jnp.bfloat16), mask)
    assert Mb.dtype == jnp.bfloat16 and Ab.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(Ab, np.float32), A, atol=3e-2)


def test_lama_bad_input_named():
    h, p = jnp.ones((2, 4, 3)), jnp.ones((3, 2))
    with pytest.raises(ValueError, match="heads"):
        LAMA(3, 0, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="heads"):
        LAMA(3, 2.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="context"):
        LAMA(3, 2, context="max", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="p must have m >= 1"):
        lama_attention(h, jnp.ones((3, 0)), jnp.ones((3, 0)))
    with pytest.raises(ValueError, match="q must have shape"):
        lama_attention(h, p, jnp.ones((4, 2)))
    with pytest.raises(ValueError, match="p and q"):
        lama_attention(h, p, jnp.ones((3, 3)))
    with pytest.raises(ValueError, match="width d = 5"):
        LAMA(5, 2, rngs=nnx.Rngs(0))(h)
    with pytest.raises(ValueError, match="c must have shape"):
        lama_bilinear(h, jnp.ones((2, 4)), p, p)
    with pytest.raises(ValueError, match="mask"):
        lama_attention(h, p, p, mask=jnp.ones((2, 5), bool))
    with pytest.raises(TypeError, match="mask"):
        lama_attention(h, p, p, mask=jnp.ones((2, 4)))
    with pytest.raises(TypeError, match="h must be a floating"):
        lama_attention(jnp.ones((2, 4, 3), jnp.int32), p, p)
    with pytest.raises(ValueError, match="w2"):
        structured_self_attention(h, jnp.ones((4, 3)), jnp.ones((2, 5)))


def test_lama_nan_in_padded_steps_cannot_leak_and_real_nan_refused():
    h = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, 3)), jnp.float32)
    p = jnp.asarray(np.random.default_rng(2).normal(size=(3, 2)), jnp.float32)
    mask = jnp.array([[True, True, False, False]])
    hn = h.at[0, 2].set(jnp.nan).at[0, 3].set(jnp.inf)
    np.testing.assert_array_equal(masked_mean(hn, mask), masked_mean(h, mask))
    a = lama_attention(hn, p, p, mask=mask)
    np.testing.assert_array_equal(a, lama_attention(h, p, p, mask=mask))
    np.testing.assert_array_equal(attention_pool(a, hn), attention_pool(a, h))
    m, _ = LAMA(3, 2, rngs=nnx.Rngs(0))(hn, mask)
    assert np.all(np.isfinite(np.asarray(m)))
    with pytest.raises(ValueError, match="h contains NaN"):
        lama_attention(hn, p, p, mask=jnp.ones((1, 4), bool))
    with pytest.raises(ValueError, match="h contains NaN"):
        masked_mean(hn)
    with pytest.raises(ValueError, match="h contains NaN"):
        attention_pool(jnp.ones((1, 2, 4)) / 4, hn)
