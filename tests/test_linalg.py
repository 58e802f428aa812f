import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lrjax import linalg


def _lowrank(rng, b, m, n, k, decay=0.5):
    u = np.linalg.qr(rng.standard_normal((*b, m, m)))[0][..., :k]
    v = np.linalg.qr(rng.standard_normal((*b, n, n)))[0][..., :k]
    s = decay ** np.arange(k)
    return (u * s[..., None, :]) @ np.swapaxes(v, -1, -2)


@given(st.integers(2, 9), st.integers(2, 9), st.integers(0, 2))
def test_svd_matches_float64_and_signs_pinned(m, n, nb):
    rng = np.random.default_rng(m * 31 + n + nb)
    x = rng.standard_normal((2,) * nb + (m, n))
    r = min(m, n)
    u, s, vt = linalg.svd(jnp.asarray(x, jnp.float32), r)
    s64 = np.linalg.svd(x, compute_uv=False)
    np.testing.assert_allclose(s, s64, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(u * s[..., None, :] @ vt), x, atol=1e-4)
    # the pinned convention: largest-|.| entry of every left vector is positive
    idx = np.argmax(np.abs(np.asarray(u)), axis=-2)
    assert np.all(np.take_along_axis(np.asarray(u), idx[..., None, :], axis=-2) > 0)


def test_svd_truncation_is_best_rank_k():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 7))
    u, s, vt = linalg.svd(x, 3)
    err = np.linalg.norm(x - np.asarray(u * s @ vt))
    s64 = np.linalg.svd(x, compute_uv=False)
    np.testing.assert_allclose(err, np.sqrt(np.sum(s64[3:] ** 2)), rtol=1e-4)


@given(st.integers(2, 9), st.integers(2, 9), st.integers(0, 2), st.sampled_from(["left", "right"]))
def test_gram_svd_matches_float64_svd_with_the_same_signs(m, n, nb, side):
    """gram_svd returns the vectors of a float64 SVD, signs pinned by the left vectors on both sides."""
    rng = np.random.default_rng(m * 17 + n * 3 + nb)
    r = min(m, n)
    s_true = 2.0 ** -np.arange(r)                         # well separated: vectors are defined
    u0 = np.linalg.qr(rng.standard_normal((2,) * nb + (m, r)))[0]
    v0 = np.linalg.qr(rng.standard_normal((2,) * nb + (n, r)))[0]
    x = (u0 * s_true) @ np.swapaxes(v0, -1, -2)
    k = max(1, r - 1)                                     # the last value sits at 2^-8 s_1 at most
    vec, s = jax.jit(lambda x: linalg.gram_svd(x, k, side=side))(jnp.asarray(x, jnp.float32))
    u64, s64, vt64 = np.linalg.svd(x, full_matrices=False)
    idx = np.argmax(np.abs(u64), axis=-2)[..., None, :]
    sign = np.sign(np.take_along_axis(u64, idx, axis=-2))         # pin like lrjax.linalg.svd
    ref = (u64 * sign)[..., :k] if side == "left" else np.swapaxes(vt64 * np.swapaxes(sign, -1, -2), -1, -2)[..., :k]
    np.testing.assert_allclose(s, s64[..., :k], rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(vec, ref, atol=2e-3)
    with pytest.raises(ValueError, match="side"):
        linalg.gram_svd(x, k, side="top")


def test_randomized_svd_close_to_exact_on_decaying_spectrum_batched():
    rng = np.random.default_rng(1)
    x = jnp.asarray(_lowrank(rng, (3,), 40, 30, 20), jnp.float32)
    ex = linalg.svd(x, 5)
    ra = linalg.randomized_svd(jax.random.key(0), x, 5, n_iter=3)
    np.testing.assert_allclose(ra.s, ex.s, rtol=1e-4)
    np.testing.assert_allclose(ra.u, ex.u, atol=1e-3)  # same sign convention -> same vectors
    assert ra.u.shape == (3, 40, 5) and ra.vt.shape == (3, 5, 30)


def test_orthonormalize_and_subspace_iteration():
    rng = np.random.default_rng(2)
    x = jnp.asarray(_lowrank(rng, (), 30, 20, 20, decay=0.3), jnp.float32)
    q = linalg.orthonormalize(jnp.asarray(rng.standard_normal((30, 4)), jnp.float32))
    np.testing.assert_allclose(q.T @ q, np.eye(4), atol=1e-5)
    q = linalg.subspace_iteration(x, q, n_iter=30)
    u = linalg.svd(x, 4).u
    # the projector onto the refined subspace equals the top-4 left singular projector
    np.testing.assert_allclose(q @ q.T, u @ u.T, atol=1e-3)


def test_rank_selection():
    s = jnp.asarray([3.0, 2.0, 1.0, 0.5])
    tot = 9 + 4 + 1 + 0.25
    assert linalg.select_rank(s, energy=9 / tot) == 1
    assert linalg.select_rank(s, energy=13.5 / tot) == 3
    assert linalg.select_rank(s, energy=1.0) == 4
    assert linalg.select_rank(jnp.eye(6), rank=2) == 2
    assert linalg.select_rank(s, energy=1.0, max_rank=2) == 2
    np.testing.assert_array_equal(linalg.energy_rank(jnp.stack([s, jnp.full(4, 2.0)]), 0.5), [1, 2])


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"rank must be an int >= 1"):
        linalg.svd(jnp.ones((3, 4)), 0)
    with pytest.raises(ValueError, match=r"rank=5 exceeds min\(M, N\)"):
        linalg.randomized_svd(jax.random.key(0), jnp.ones((3, 4)), 5)
    with pytest.raises(ValueError, match="ndim >= 2"):
        linalg.svd(jnp.ones(3))
    with pytest.raises(TypeError, match="floating"):
        linalg.svd(jnp.ones((3, 3), jnp.int32))
    with pytest.raises(ValueError, match="exactly one"):
        linalg.select_rank(jnp.ones(3))
    with pytest.raises(ValueError, match="energy"):
        linalg.select_rank(jnp.ones(3), energy=1.5)


def test_bf16_input_and_jit():
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 8, 6)), jnp.bfloat16)
    u, s, vt = jax.jit(lambda x: linalg.svd(x, 3))(x)
    assert u.dtype == jnp.float32 and u.shape == (2, 8, 3)
