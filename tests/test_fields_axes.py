"""Issue 17: per-axis resolutions (Nx, Ny, Nz), per-mode VM ranks, encoder-level apply, density-only fields.

References are float64 NumPy transcriptions of TensoRF's reconstruction (outer products summed over
components) and of trilinear interpolation (align corners), independent of lrjax's interpolators.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrjax import fields as L
from lrjax.fields.hashgrid import hash_encode, level_layout
from lrjax.fields.tensorf import factor_list
from lrjax.fields.train import make_optimizer, make_photometric_step

RES = (3, 4, 5)


def _np_dense(field, params):
    """float64 NumPy: T[i, j, k] = [sum_sigma comps, basis^T app comps] from the factors."""
    f = {k: [np.asarray(a, np.float64) for a in v] for k, v in factor_list(field, params).items()}
    rs = field.sigma_ranks
    if isinstance(field, L.CPField):
        lx, ly, lz = f["lines"]
        comps = [np.einsum("ri,rj,rk->ijkr", lx, ly, lz)]
        rs = rs[:1]
    else:
        (pxy, pxz, pyz), (lz, ly, lx) = f["planes"], f["lines"]
        comps = [np.einsum("rij,rk->ijkr", pxy, lz), np.einsum("rik,rj->ijkr", pxz, ly),
                 np.einsum("rjk,ri->ijkr", pyz, lx)]
    s = sum(c[..., :r].sum(-1) for c, r in zip(comps, rs))[..., None]
    if not field.appearance:
        return s
    app = np.concatenate([c[..., r:] for c, r in zip(comps, rs)], -1)
    return np.concatenate([s, app @ np.asarray(params["params"]["basis"], np.float64)], -1)


def _np_trilinear(grid, u):
    """float64 trilinear interpolation of grid [Nx, Ny, Nz, C] at u [P, 3] in [-1, 1] (align corners)."""
    out = np.zeros((u.shape[0], grid.shape[-1]))
    for p, pt in enumerate(np.asarray(u, np.float64)):
        pos = [(pt[a] + 1) / 2 * (grid.shape[a] - 1) for a in range(3)]
        i0 = [min(int(np.floor(q)), grid.shape[a] - 2) for a, q in enumerate(pos)]
        w = [q - i for q, i in zip(pos, i0)]
        for c in np.ndindex(2, 2, 2):
            wt = np.prod([w[a] if c[a] else 1 - w[a] for a in range(3)])
            out[p] += wt * grid[i0[0] + c[0], i0[1] + c[1], i0[2] + c[2]]
    return out


def _vertices(shape):
    axes = [np.linspace(-1, 1, n) for n in shape]
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1)


FIELDS = {
    "cp": L.CPField(resolution=RES, rank_sigma=2, rank_app=3, geo_dim=4),
    "vm": L.VMField(resolution=RES, rank_sigma=(2, 1, 3), rank_app=(1, 2, 2), geo_dim=4),
    "vm_sigma": L.VMField(resolution=RES, rank_sigma=(2, 1, 3), appearance=False),
}


@pytest.mark.parametrize("name", list(FIELDS))
def test_noncubic_tensor_fields_equal_dense_reconstruction(name):
    """CP / VM with (3, 4, 5) vertices (and per-mode VM ranks) == their dense volume, float64 reference."""
    f = FIELDS[name]
    p = jax.tree.map(lambda a: a * 3.0, L.init_field(f, jax.random.key(0)))
    ref = _np_dense(f, p)
    assert ref.shape == RES + (f.feature_dim,)
    dense = (L.cp_dense if name == "cp" else L.vm_dense)(f, p)
    np.testing.assert_allclose(dense["params"]["grid"], ref, rtol=1e-5, atol=1e-5)
    x = np.concatenate([np.random.default_rng(0).uniform(-1, 1, (40, 3)),
                        [[-1, -1, -1], [1, 1, 1], [1, -1, 0.3]]]).astype(np.float32)
    feats = jax.jit(lambda q, x: f.apply(q, x, method="features"))(p, jnp.asarray(x))
    np.testing.assert_allclose(feats.raw, _np_trilinear(ref, x), rtol=1e-4, atol=1e-4)
    # the same dense volume in a GridField renders the same field
    grid = L.GridField(resolution=RES, geo_dim=4, appearance=f.appearance)
    a, b = f.apply(p, x), grid.apply(dense, x)
    np.testing.assert_allclose(a.feature, b.feature, atol=1e-4)
    np.testing.assert_allclose(a.rgb, b.rgb, atol=1e-5)


def test_per_mode_vm_ranks_count_params_and_layout():
    rs, ra, g = (3, 1, 2), (2, 4, 1), 4
    f = L.VMField(resolution=RES, rank_sigma=rs, rank_app=ra, geo_dim=g, color_hidden=5)
    p = L.init_field(f, jax.random.key(1))["params"]
    nx, ny, nz = RES
    shapes = {"plane_xy": (5, nx, ny), "line_z": (5, nz), "plane_xz": (5, nx, nz), "line_y": (5, ny),
              "plane_yz": (3, ny, nz), "line_x": (3, nx), "basis": (7, g)}
    for k, s in shapes.items():
        assert p[k].shape == s, k
    factors = 5 * (nx * ny + nz) + 5 * (nx * nz + ny) + 3 * (ny * nz + nx) + 7 * g
    head = (g * 5 + 5) + (5 * 3 + 3)
    assert L.count_params({"params": p}) == factors + head
    # a cube with equal ranks keeps the stacked layout (and an int equals the 3-tuple bit for bit)
    a, b = L.VMField(resolution=4, rank_sigma=2), L.VMField(resolution=(4, 4, 4), rank_sigma=(2, 2, 2))
    pa, pb = L.init_field(a, jax.random.key(2)), L.init_field(b, jax.random.key(2))
    assert pa["params"]["planes"].shape == (3, 18, 4, 4)
    assert jax.tree.all(jax.tree.map(lambda u, v: bool(jnp.array_equal(u, v)), pa, pb))
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (6, 3)), jnp.float32)
    assert bool(jnp.array_equal(a.apply(pa, x).rgb, b.apply(pb, x).rgb))


@pytest.mark.parametrize("name", ["cp", "vm", "grid"])
def test_noncubic_upsample_equals_trilinear_of_dense(name):
    f = {"cp": FIELDS["cp"], "vm": FIELDS["vm"], "grid": L.GridField(resolution=RES, geo_dim=2)}[name]
    p = L.init_field(f, jax.random.key(3))
    target = (4, 6, 9)
    f2, p2 = L.upsample(f, p, target)
    assert f2.grid_shape == target and getattr(f2, "rank_sigma", None) == getattr(f, "rank_sigma", None)
    dense = (lambda f, p: p["params"]["grid"]) if name == "grid" else \
        (lambda f, p: (L.cp_dense if name == "cp" else L.vm_dense)(f, p)["params"]["grid"])
    old = np.asarray(dense(f, p), np.float64)
    new = dense(f2, p2)
    ref = _np_trilinear(old, _vertices(target).reshape(-1, 3)).reshape(target + (old.shape[-1],))
    np.testing.assert_allclose(new, ref, atol=1e-5)
    # regularisers follow the new shapes (per-mode means)
    if name == "vm":
        planes = factor_list(f2, p2)["planes"]
        tv = sum(2 * (np.mean(np.diff(np.asarray(pl, np.float64)[:r], axis=1) ** 2)
                      + np.mean(np.diff(np.asarray(pl, np.float64)[:r], axis=2) ** 2))
                 for pl, r in zip(planes, f2.sigma_ranks))
        np.testing.assert_allclose(float(L.tv_loss(f2, p2)), tv, rtol=1e-5)
        fl = factor_list(f2, p2)
        l1 = sum(np.mean(np.abs(np.asarray(fl["planes"][m])[:r])) + np.mean(np.abs(np.asarray(fl["lines"][m])[:r]))
                 for m, r in enumerate(f2.sigma_ranks))
        np.testing.assert_allclose(float(L.l1_density(f2, p2)), l1, rtol=1e-5)
    # a cube upsampled to a non-cube changes layout and still interpolates the old field
    if name == "cp":
        c = L.CPField(resolution=3, rank_sigma=1, rank_app=2, geo_dim=2)
        pc = L.init_field(c, jax.random.key(4))
        c2, pc2 = L.upsample(c, pc, (3, 5, 5))
        assert "line_y" in pc2["params"] and "lines" not in pc2["params"]
        x = jnp.asarray(_vertices((3, 3, 3)).reshape(-1, 3), jnp.float32)
        np.testing.assert_allclose(c.apply(pc, x).feature, c2.apply(pc2, x).feature, atol=1e-5)
    assert L.resolution_schedule((8, 8, 4), (16, 32, 4), 2) == [(11, 16, 4), (16, 32, 4)]


def test_5x6x7_scene_end_to_end():
    """init, apply (jit/vmap), render, one training step of a 5x6x7 VM field with per-mode ranks."""
    f = L.VMField(resolution=(5, 6, 7), rank_sigma=(2, 1, 1), rank_app=(2, 1, 1), geo_dim=3, color_hidden=8)
    p = L.init_field(f, jax.random.key(5))
    rays = L.pinhole_rays(L.look_at((3.0, 0.4, 0.2)), 2, 4, 4.0)
    out = L.render_rays(lambda x, d: f.apply(p, x, d), rays, n_samples=6)
    assert out.rgb.shape == (8, 3) and bool(jnp.all(jnp.isfinite(out.rgb)))
    opt = make_optimizer(1e-2, 10)
    step = make_photometric_step(f, opt, batch=8, n_samples=6)
    p2, _, loss = step(p, opt.init(p), jax.random.key(6), rays.origins, rays.directions, jnp.full((8, 3), 0.3))
    assert np.isfinite(float(loss))
    assert jax.tree.structure(p2) == jax.tree.structure(p)
    assert any(bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p2)))


def test_features_and_density_through_apply():
    f = L.GridField(resolution=(2, 3, 4), geo_dim=3, view_dependent=True)
    p = L.init_field(f, jax.random.key(7))
    x = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (5, 3)), jnp.float32)
    d = jnp.array([0.0, 0.0, 1.0])
    full = f.apply(p, x, d)
    feats = jax.jit(lambda q, x: f.apply(q, x, method="features"))(p, x)    # no direction needed
    assert isinstance(feats, L.fields.FieldFeatures)
    np.testing.assert_allclose(feats.raw, L.fields.interp_grid(p["params"]["grid"], x), atol=1e-6)
    np.testing.assert_allclose(feats.feature, full.feature, atol=1e-6)
    np.testing.assert_allclose(feats.sigma, full.sigma, rtol=1e-6)
    np.testing.assert_allclose(f.apply(p, x, method="density"), full.sigma, rtol=1e-6)
    with pytest.raises(TypeError, match="method='features'"):
        f.apply(p, x, method="encode")
    np.testing.assert_allclose(f.apply(p, x, d, method="density"), full.sigma, rtol=1e-6)   # d ignored
    with pytest.raises(ValueError, match=r"method must be one of .*'features' or 'density'"):
        f.apply(p, x, method="dens")


def test_density_only_fields():
    fields = {"cp": L.CPField(resolution=RES, rank_sigma=2, appearance=False),
              "vm": L.VMField(resolution=3, rank_sigma=2, appearance=False),
              "sh": L.SHGridField(resolution=(3, 3, 4), appearance=False),
              "hash": L.HashGridField(levels=2, log2_table_size=6, min_res=2, max_res=4, hidden=4,
                                      appearance=False)}
    x = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (4, 3)), jnp.float32)
    for name, f in fields.items():                       # (the SH grid is a GridField: covers the grid)
        p = L.init_field(f, jax.random.key(8))
        keys = set(p["params"])
        assert not any(k.startswith("color") or k == "basis" for k in keys), (name, keys)
        out = f.apply(p, x)
        assert f.feature_dim == 1 and out.feature.shape == (4, 1), name
        np.testing.assert_array_equal(out.rgb, np.full((4, 3), 0.5, np.float32))
        np.testing.assert_allclose(f.apply(p, x, method="density"), out.sigma, rtol=1e-6)
    pc = L.init_field(fields["cp"], jax.random.key(9))
    assert pc["params"]["line_x"].shape == (2, 3)                 # density components only
    pv = L.init_field(fields["vm"], jax.random.key(9))
    assert pv["params"]["planes"].shape == (3, 2, 3, 3)
    f0 = L.VMField(resolution=3, rank_sigma=2, rank_app=0, appearance=False)    # rank_app unused: 0 is fine
    assert jax.tree.map(jnp.shape, L.init_field(f0, jax.random.key(9))) == jax.tree.map(jnp.shape, pv)
    assert float(L.tv_loss(fields["vm"], pv, "app")) == 0.0 and float(L.tv_loss(fields["cp"], pc, "app")) == 0.0
    assert L.vm_dense(fields["vm"], pv)["params"]["grid"].shape == (3, 3, 3, 1)
    # renders (grey where opaque): acc/depth are exact, colour = 0.5 acc + bg (1 - acc)
    rays = L.pinhole_rays(L.look_at((3.0, 0.2, 0.1)), 2, 2, 2.0)
    r = L.render_rays(lambda a, b: fields["cp"].apply(pc, a, b), rays, n_samples=4, bg=1.0)
    np.testing.assert_allclose(r.rgb, (0.5 * r.acc + (1 - r.acc))[:, None] * np.ones(3), atol=1e-6)
    with pytest.raises(ValueError, match="appearance"):
        L.check_compatible(L.GridField(appearance=False), L.GridField())


def test_hash_grid_per_axis_dense_level_is_trilinear():
    lay = level_layout(1, (3, 4, 5), (3, 4, 5), 12)
    (scale, side, rows, hashed), = lay
    assert side == (4, 5, 6) and rows == 4 * 5 * 6 and not hashed
    f = L.HashGridField(levels=1, log2_table_size=12, min_res=(3, 4, 5), max_res=(3, 4, 5), hidden=4)
    table = L.init_field(f, jax.random.key(10))["params"]["table_0"]
    x = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (16, 3)), jnp.float32)
    enc = hash_encode([table], x, lay)
    grid = np.asarray(table, np.float64).reshape(6, 5, 4, 2).transpose(2, 1, 0, 3)    # i + j Vx + k Vx Vy
    v = (np.asarray(x, np.float64) + 1) / 2 * np.asarray(scale) + 0.5                  # vertex coordinates
    np.testing.assert_allclose(enc, _np_trilinear(grid, v / (np.asarray(side) - 1) * 2 - 1), atol=1e-6)
    # an int layout is unchanged; a per-axis layout with a hashed level stays within the table
    assert level_layout(2, 4, 8, 6) == level_layout(2, 4, 8, 6)
    assert level_layout(1, (3, 4, 5), (8, 9, 10), 12) == lay          # one level: min_res, max_res unused
    assert level_layout(2, (4, 4, 2), (16, 8, 4), 6)[-1][2:] == (64, True)


def test_new_input_checks_name_the_argument():
    for cls in (L.GridField, L.SHGridField, L.CPField, L.VMField):
        with pytest.raises(ValueError, match="resolution"):
            cls(resolution=(4, 4))                               # wrong length
        with pytest.raises(ValueError, match=r"resolution\[1\]"):
            cls(resolution=(4, 0, 4))                            # non-positive entry
        with pytest.raises(ValueError, match=r"resolution\[2\]"):
            cls(resolution=(4, 4, -3))
        with pytest.raises(TypeError, match="resolution"):
            cls(resolution="4x4x4")
    with pytest.raises(ValueError, match="rank_sigma"):
        L.VMField(rank_sigma=(4, 4))                             # rank tuple of wrong length
    with pytest.raises(ValueError, match="rank_app"):
        L.VMField(rank_app=(4, 4, 4, 4))
    with pytest.raises(ValueError, match=r"rank_sigma\[0\]"):
        L.VMField(rank_sigma=(0, 4, 4))
    with pytest.raises(TypeError, match="rank_sigma"):
        L.CPField(rank_sigma=(4, 4, 4))                          # CP ranks are ints
    with pytest.raises(ValueError, match="min_res"):
        L.HashGridField(min_res=(16, 16), max_res=128)
    with pytest.raises(ValueError, match="max_res"):
        L.HashGridField(min_res=(16, 16, 16), max_res=(32, 8, 32))
    with pytest.raises(TypeError, match="appearance"):
        L.GridField(appearance="no")
    f = FIELDS["cp"]
    p = L.init_field(f, jax.random.key(11))
    with pytest.raises(ValueError, match="new_res"):
        L.upsample(f, p, (4, 6))
    with pytest.raises(ValueError, match="new_res"):
        L.upsample(f, p, (4, 3, 9))                              # smaller than 4 on y
    with pytest.raises(ValueError, match="final"):
        L.resolution_schedule((8, 8, 8), (16, 4, 16), 2)
    with pytest.raises(TypeError, match="field must be a GridField, SHGridField, CPField or VMField for tv_loss"):
        L.tv_loss(L.HashGridField(levels=1, log2_table_size=6, min_res=2, max_res=2, hidden=4), {"params": {}})
