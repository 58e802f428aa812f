"""lrjax.losses: DSCLoRA's spatial affinity distillation loss against a float64 NumPy transcription
of FAKD's ``spatial_similarity`` + L1, its invariances, precision and bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lrjax.losses import spatial_affinity, spatial_affinity_loss


def _np_affinity(f, eps=1e-7):
    """float64 transcription: per position, divide the channel vector by (its L2 norm + eps);
    A = F_hat^T F_hat over flattened H*W positions (row-major)."""
    f = np.asarray(f, np.float64)
    *b, h, w, c = f.shape
    f = f.reshape(*b, h * w, c)
    fh = f / (np.sqrt((f ** 2).sum(-1, keepdims=True)) + eps)
    return np.einsum("...pc,...qc->...pq", fh, fh)


def _np_loss(s, t, distance="l1", eps=1e-7):
    d = _np_affinity(s, eps) - _np_affinity(t, eps)
    return np.mean(np.abs(d)) if distance == "l1" else np.mean(d ** 2)


_loss = jax.jit(spatial_affinity_loss, static_argnames=("distance", "eps"))


def _feats(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@settings(max_examples=8, deadline=None)
@given(b=st.integers(1, 2), h=st.sampled_from([1, 3]), w=st.sampled_from([2, 4]), cs=st.sampled_from([1, 5]),
       ct=st.sampled_from([2, 5]),
       distance=st.sampled_from(["l1", "l2"]), seed=st.integers(0, 100))
def test_loss_matches_float64_transcription(b, h, w, cs, ct, distance, seed):
    s, t = _feats(seed, (b, h, w, cs)), _feats(seed + 1, (b, h, w, ct))
    got = _loss(s, t, distance=distance)
    np.testing.assert_allclose(float(got), _np_loss(s, t, distance), rtol=2e-5, atol=1e-6)


def test_affinity_matches_transcription_and_is_cosine():
    f = _feats(0, (2, 3, 4, 5))
    a = spatial_affinity(f)
    assert a.shape == (2, 12, 12) and a.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(a), _np_affinity(f), atol=1e-6)
    # diagonal = 1 (unit vectors), symmetric, entries in [-1, 1]
    np.testing.assert_allclose(np.diagonal(np.asarray(a), axis1=-2, axis2=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(a), np.swapaxes(np.asarray(a), -1, -2), atol=1e-6)
    # position ordering: row-major p = h * W + w
    p, q = 1 * 4 + 2, 2 * 4 + 3
    u, v = np.asarray(f[0, 1, 2], np.float64), np.asarray(f[0, 2, 3], np.float64)
    assert abs(float(a[0, p, q]) - u @ v / np.linalg.norm(u) / np.linalg.norm(v)) < 1e-5


def test_invariances():
    s, t = _feats(1, (2, 4, 4, 6)), _feats(2, (2, 4, 4, 3))
    base = float(_loss(s, t))
    assert base > 0.05
    # identical features: exactly zero
    assert float(_loss(s, s)) == 0.0
    # positive per-position rescaling of the student (channel normalization removes it)
    scale = jnp.exp(_feats(3, (2, 4, 4, 1)))
    assert abs(float(_loss(s * scale, t)) - base) < 1e-5
    # orthogonal channel mixing of the teacher
    qm, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    assert abs(float(_loss(s, t @ jnp.asarray(qm, jnp.float32))) - base) < 1e-5
    # symmetric in its arguments; a sign flip of every position changes nothing
    assert abs(float(_loss(t, s)) - base) < 1e-6
    assert abs(float(_loss(-s, t)) - base) < 1e-6
    # a spatial permutation applied to only one side changes the loss (the loss sees positions)
    assert abs(float(_loss(jnp.flip(s, axis=-2), t)) - base) > 1e-3


def test_loss_is_sensitive_to_structure_not_channels():
    # student = teacher with extra channels duplicated: affinity identical -> loss 0
    t = _feats(4, (1, 3, 3, 4))
    s = jnp.concatenate([t, t], axis=-1)
    assert float(spatial_affinity_loss(s, t)) < 1e-6


def test_jit_grad_vmap_and_zero_positions_are_finite():
    s, t = _feats(5, (2, 3, 3, 4)), _feats(6, (2, 3, 3, 4))
    s = s.at[:, 0, 0].set(0.0)  # dead positions: zero channel vectors
    val = jax.jit(spatial_affinity_loss)(s, t)
    np.testing.assert_allclose(float(val), _np_loss(s, t), rtol=2e-5)
    g = jax.jit(jax.grad(spatial_affinity_loss))(s, t)
    assert bool(jnp.all(jnp.isfinite(g)))
    # gradient vs central finite differences on one entry
    e = jnp.zeros_like(s).at[1, 2, 1, 3].set(1e-2)
    fd = (float(_loss(s + e, t, distance="l2")) - float(_loss(s - e, t, distance="l2"))) / 2e-2
    g2 = jax.jit(jax.grad(lambda x: spatial_affinity_loss(x, t, distance="l2")))(s)
    assert abs(float(g2[1, 2, 1, 3]) - fd) < 1e-3 * max(1.0, abs(fd))
    v = jax.jit(jax.vmap(lambda a, b: spatial_affinity_loss(a[None], b[None])))(s, t)
    np.testing.assert_allclose(float(jnp.mean(v)), float(val), rtol=1e-5)
    # all-zero on both sides: 0, finite gradient
    z = jnp.zeros((1, 2, 2, 3))
    assert float(spatial_affinity_loss(z, z)) == 0.0
    assert bool(jnp.all(jnp.isfinite(jax.grad(spatial_affinity_loss)(z, z))))


def test_bfloat16_computes_in_float32():
    s, t = _feats(7, (1, 4, 4, 8)), _feats(8, (1, 4, 4, 8))
    sb, tb = s.astype(jnp.bfloat16), t.astype(jnp.bfloat16)
    got = spatial_affinity_loss(sb, tb)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), _np_loss(sb.astype(jnp.float32), tb.astype(jnp.float32)), rtol=1e-5)
    a = spatial_affinity(sb)
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(a, np.float32), _np_affinity(sb.astype(jnp.float32)), atol=1e-2)


def test_bad_input():
    s = _feats(9, (1, 2, 2, 3))
    with pytest.raises(TypeError, match="student"):
        spatial_affinity_loss([[1.0]], s)
    with pytest.raises(TypeError, match="teacher"):
        spatial_affinity_loss(s, jnp.ones((1, 2, 2, 3), jnp.int32))
    with pytest.raises(ValueError, match="student"):
        spatial_affinity_loss(jnp.ones((2, 3)), s)
    with pytest.raises(ValueError, match="teacher"):
        spatial_affinity_loss(s, jnp.ones((1, 2, 3, 3)))
    with pytest.raises(ValueError, match="teacher"):
        spatial_affinity_loss(s, s.at[0, 0, 0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="distance"):
        spatial_affinity_loss(s, s, distance="cos")
    with pytest.raises(TypeError, match="distance"):
        spatial_affinity_loss(s, s, distance=1)
    with pytest.raises(ValueError, match="eps"):
        spatial_affinity_loss(s, s, eps=0.0)
    with pytest.raises(TypeError, match="eps"):
        spatial_affinity(s, eps="small")
    with pytest.raises(ValueError, match="features"):
        spatial_affinity(jnp.ones((1, 0, 2, 3)))
