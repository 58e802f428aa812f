"""Fields: one interface, CP/VM == dense reconstruction, hash encoding facts, vmap/jit, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrjax import fields as L
from lrjax.fields.hashgrid import fast_hash, hash_encode, level_layout

FIELDS = {
    "mlp": L.MLPField(n_freqs=3, width=16, depth=2, skip=1),
    "grid": L.GridField(resolution=6),
    "cp": L.CPField(resolution=6, rank_sigma=3, rank_app=4),
    "vm": L.VMField(resolution=6, rank_sigma=2, rank_app=3),
    "hash": L.HashGridField(levels=3, log2_table_size=8, min_res=4, max_res=16, hidden=16),
}


def _points(key, shape=(5, 4)):
    return jax.random.uniform(key, shape + (3,), minval=-1.0, maxval=1.0)


@pytest.mark.parametrize("name", list(FIELDS))
def test_interface_jit_vmap(name):
    f = FIELDS[name]
    p = L.init_field(f, jax.random.key(0))
    x = _points(jax.random.key(1))
    ps = L.init_field(f, jax.random.key(2), num=3)

    @jax.jit
    def run(p, ps, x):
        out = f.apply(p, x)
        over_rays = jax.vmap(lambda xr: f.apply(p, xr))(x)
        over_samples = jax.vmap(lambda xs: f.apply(p, xs), in_axes=1, out_axes=1)(x)
        fields = jax.vmap(f.apply, in_axes=(0, None))(ps, x)          # a batch of 3 fields
        g = jax.grad(lambda q: jnp.sum(f.apply(q, x).feature ** 2) + jnp.sum(f.apply(q, x).rgb))(p)
        return out, over_rays, over_samples, fields, g

    out, over_rays, over_samples, fields, g = run(p, ps, x)
    assert out.feature.shape == (5, 4, 16) and out.sigma.shape == (5, 4) and out.rgb.shape == (5, 4, 3)
    np.testing.assert_allclose(out.feature[..., 0], out.sigma_pre)
    np.testing.assert_allclose(out.sigma, jnp.exp(out.sigma_pre), rtol=1e-6)
    assert bool(jnp.all((out.rgb > 0) & (out.rgb < 1)))
    for o in (over_rays, over_samples):
        np.testing.assert_allclose(o.feature, out.feature, atol=1e-5)
        np.testing.assert_allclose(o.rgb, out.rgb, atol=1e-6)
    assert fields.feature.shape == (3, 5, 4, 16)
    p1 = jax.tree.map(lambda a: a[1], ps)
    np.testing.assert_allclose(fields.feature[1], jax.jit(f.apply)(p1, x).feature, atol=1e-5)
    assert all(bool(jnp.any(v != 0)) for v in jax.tree.leaves(g))     # gradients reach every leaf


@pytest.mark.parametrize("name", ["cp", "vm"])
def test_tensor_fields_equal_dense_reconstruction(name):
    f = FIELDS[name]
    p = L.init_field(f, jax.random.key(3))
    p = jax.tree.map(lambda a: a * 5.0, p)              # make the products non-negligible
    dense = (L.cp_dense if name == "cp" else L.vm_dense)(f, p)
    grid = L.GridField(resolution=f.resolution)
    assert dense["params"]["grid"].shape == (6, 6, 6, 16)
    x = _points(jax.random.key(4), (64,))
    x = x.at[:4].set(jnp.array([[-1, -1, -1], [1, 1, 1], [1, -1, 0.2], [0, 0, 0]], jnp.float32))
    a, b = jax.jit(f.apply)(p, x), jax.jit(grid.apply)(dense, x)
    scale = float(jnp.max(jnp.abs(a.feature)))
    assert scale > 1e-2
    np.testing.assert_allclose(a.feature, b.feature, atol=1e-5 * scale)
    np.testing.assert_allclose(a.rgb, b.rgb, atol=1e-5)
    # at grid vertices the field equals the stored tensor entry
    n = f.resolution
    verts = jnp.array([[2, 3, 5], [0, 5, 1]])
    xv = -1.0 + 2.0 * verts / (n - 1)
    ref = dense["params"]["grid"][verts[:, 0], verts[:, 1], verts[:, 2]]
    np.testing.assert_allclose(jax.jit(f.apply)(p, xv).feature[:, 1:], ref[:, 1:], atol=1e-5 * scale)


def test_hash_function_values_and_layout():
    ijk = jnp.array([[0, 1, 0], [0, 0, 1], [1, 1, 1], [3, 5, 7]])
    h = np.asarray(fast_hash(ijk)).astype(np.int64)
    np.testing.assert_array_equal(h, [2654435761, 805459861, 2922720805, 1191511397])
    np.testing.assert_array_equal(h % 2 ** 14, [14769, 6037, 11813, 1381])
    np.testing.assert_array_equal(h % 2 ** 19, [489905, 153493, 339493, 329061])
    lay = level_layout(8, 16, 128, 14)
    assert [hashed for *_, hashed in lay] == [False, False] + [True] * 6
    assert abs(lay[-1][0] - 127.0) < 1e-6 and all(r <= 2 ** 14 for _, _, r, _ in lay)


def test_hash_dense_level_is_trilinear():
    """A single dense level: the encoding is trilinear interpolation of its table."""
    f = L.HashGridField(levels=1, features_per_level=2, log2_table_size=12, min_res=5, max_res=5)
    p = L.init_field(f, jax.random.key(5))
    table = p["params"]["table_0"]
    layout = level_layout(1, 5, 5, 12)
    (scale, side, rows, hashed), = layout
    assert not hashed and rows == side ** 3
    x = _points(jax.random.key(6), (32,))
    enc = hash_encode([table], x, layout)
    v = (x + 1) / 2 * scale + 0.5
    grid = table.reshape(side, side, side, 2).transpose(2, 1, 0, 3)      # index i + j s + k s^2
    # trilinear at v on the vertex grid: map to interp_grid's [-1, 1] align-corners convention
    ref = L.fields.interp_grid(grid, v / (side - 1) * 2 - 1)
    np.testing.assert_allclose(enc, ref, atol=1e-7)


def test_view_dependent_and_encodings():
    f = L.GridField(resolution=4, view_dependent=True, sh_degree=3)
    p = L.init_field(f, jax.random.key(7))
    x = _points(jax.random.key(8), (6,))
    d = jnp.array([0.0, 0.0, 1.0])
    assert f.apply(p, x, d).rgb.shape == (6, 3)
    with pytest.raises(ValueError, match="view_dependent"):
        f.apply(p, x)
    pe = L.positional_encoding(x, 4)
    assert pe.shape == (6, 3 * 9)
    # SH bands are orthonormal on the sphere (Monte Carlo, 4 pi normalisation)
    dirs = jax.random.normal(jax.random.key(9), (100000, 3))
    sh = L.sh_encoding(dirs / jnp.linalg.norm(dirs, axis=-1, keepdims=True), 4)
    gram = 4 * np.pi * np.asarray(sh.T @ sh) / sh.shape[0]
    np.testing.assert_allclose(gram, np.eye(16), atol=0.05)


def test_errors():
    with pytest.raises(ValueError, match="rank_sigma"):
        L.CPField(rank_sigma=0)
    with pytest.raises(ValueError, match="rank_app"):
        L.VMField(rank_app=-2)
    with pytest.raises(ValueError, match="resolution"):
        L.GridField(resolution=1)
    with pytest.raises(ValueError, match="bound"):
        L.MLPField(bound=0.0)
    with pytest.raises(ValueError, match="max_res"):
        L.HashGridField(min_res=64, max_res=32)
    with pytest.raises(ValueError, match="density_clip"):
        L.GridField(density_clip=(3.0, -1.0))
    f = FIELDS["grid"]
    p = L.init_field(f, jax.random.key(0))
    with pytest.raises(ValueError, match=r"box \[-bound, bound\]"):
        f.apply(p, jnp.array([[0.0, 1.5, 0.0]]))
    with pytest.raises(ValueError, match=r"x must have shape"):
        f.apply(p, jnp.zeros((4, 2)))
    # under jit out-of-box points are clipped to the box, not an error
    np.testing.assert_allclose(jax.jit(f.apply)(p, jnp.array([[0.0, 1.5, 0.0]])).feature,
                               f.apply(p, jnp.array([[0.0, 1.0, 0.0]])).feature)
    with pytest.raises(ValueError, match="mismatched field configs.*geo_dim"):
        L.check_compatible(L.GridField(geo_dim=7), L.CPField())
    with pytest.raises(ValueError, match="density_clip"):
        L.check_compatible(L.GridField(), L.CPField(density_clip=(-2.0, 7.0)))
    L.check_compatible(L.GridField(), L.HashGridField())


def test_param_counts():
    f = L.CPField(resolution=6, rank_sigma=3, rank_app=4)
    p = L.init_field(f, jax.random.key(0))
    assert p["params"]["lines"].shape == (3, 7, 6) and p["params"]["basis"].shape == (4, 15)
    assert L.param_bytes(p) == 4 * L.count_params(p)
