"""Plenoxel-style SH grid: float64 NumPy reference (SH basis, trilinear interpolation), PVD use, errors."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import lpmv

from lrjax import fields as L
from lrjax.fields import pvd as P
from lrjax.fields.train import make_optimizer


def real_sh(l_max, d):
    """Real SH ``Y_lm`` (m = -l..l, Condon-Shortley phase) from associated Legendre functions, float64."""
    d = np.asarray(d, np.float64)
    theta, phi = np.arccos(np.clip(d[:, 2], -1, 1)), np.arctan2(d[:, 1], d[:, 0])
    out = []
    for l in range(l_max + 1):
        for m in range(-l, l + 1):
            am = abs(m)
            k = math.sqrt((2 * l + 1) / (4 * math.pi) * math.factorial(l - am) / math.factorial(l + am))
            p = lpmv(am, l, np.cos(theta))
            if m == 0:
                out.append(k * p)
            else:
                out.append(math.sqrt(2) * k * p * (np.sin(am * phi) if m < 0 else np.cos(am * phi)))
    return np.stack(out, -1)


def trilinear(grid, u):
    """Align-corners trilinear interpolation in float64 by explicit loops."""
    n = grid.shape[0]
    out = np.zeros((u.shape[0], grid.shape[-1]))
    for q, p in enumerate(u):
        pos = (p + 1) * 0.5 * (n - 1)
        i = np.minimum(np.floor(pos).astype(int), n - 2)
        w = pos - i
        for c in np.ndindex(2, 2, 2):
            wt = np.prod([w[a] if c[a] else 1 - w[a] for a in range(3)])
            out[q] += wt * grid[i[0] + c[0], i[1] + c[1], i[2] + c[2]]
    return out


def _dirs(n, seed=0):
    d = np.random.default_rng(seed).normal(size=(n, 3))
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def test_sh_basis_matches_legendre_reference():
    d = _dirs(50)
    np.testing.assert_allclose(np.asarray(L.sh_encoding(jnp.asarray(d, jnp.float32), 3)), real_sh(2, d),
                               atol=1e-6)


@pytest.mark.parametrize("bands", [1, 2, 3])
def test_sh_grid_matches_numpy(bands):
    f = L.SHGridField(resolution=5, sh_degree=bands, density_clip=(-20.0, 20.0), color_scale=3.0)
    p = L.init_field(f, jax.random.key(0))
    grid = np.asarray(p["params"]["grid"], np.float64)
    assert grid.shape == (5, 5, 5, 1 + 3 * bands ** 2)
    x = np.random.default_rng(1).uniform(-1, 1, (40, 3))
    d = _dirs(40, 2)
    out = f.apply(p, jnp.asarray(x, jnp.float32), jnp.asarray(d, jnp.float32))
    feat = trilinear(grid, x)
    coef = feat[:, 1:].reshape(40, 3, bands ** 2)
    rgb = 1 / (1 + np.exp(-3.0 * np.einsum("ack,ak->ac", coef, real_sh(bands - 1, d))))
    np.testing.assert_allclose(np.asarray(out.sigma_pre), 10.0 * feat[:, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.rgb), rgb, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.feature[:, 1:]), feat[:, 1:], atol=1e-5)
    # view dependence: a different direction changes the colour (bands > 1) but not the density
    out2 = f.apply(p, jnp.asarray(x, jnp.float32), -jnp.asarray(d, jnp.float32))
    np.testing.assert_allclose(out2.sigma, out.sigma)
    assert (bands == 1) == bool(np.allclose(out2.rgb, out.rgb))


def test_sh_grid_as_pvd_student_and_teacher():
    t = L.GridField(resolution=6)
    tp = L.init_field(t, jax.random.key(0))
    s = L.SHGridField(resolution=6, sh_degree=2)
    L.check_compatible(t, s)
    L.check_compatible(s, L.CPField(geo_dim=7))
    cfg = P.PVDConfig(stage_steps=(5, 10), batch_rays=64, n_samples=16)
    poses = L.random_poses(0, 6)
    d = P.PVD(t, tp, s, make_optimizer(3e-2, 30), poses=poses, height=8, width=8, focal=10.0, config=cfg)
    st = d.init(jax.random.key(1))
    losses = []
    for k in jax.random.split(jax.random.key(2), 30):
        st, m = d.step(st, k)
        losses.append(float(m["rgb_mse"]))
        assert np.isfinite(float(m["loss"]))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    # and the other way round: SH grid teacher, MLP-head student
    d2 = P.PVD(s, st.params, L.CPField(resolution=6, rank_sigma=2, rank_app=4), make_optimizer(3e-2, 5),
               poses=poses, height=8, width=8, focal=10.0, config=cfg)
    _, m = d2.step(d2.init(jax.random.key(3)), jax.random.key(4))
    assert np.isfinite(float(m["loss"]))


def test_sh_grid_errors():
    with pytest.raises(ValueError, match="sh_degree"):
        L.SHGridField(sh_degree=4)
    with pytest.raises(ValueError, match="view_dependent"):
        L.SHGridField(view_dependent=False)
    with pytest.raises(ValueError, match="resolution"):
        L.SHGridField(resolution=1)
    with pytest.raises(ValueError, match="color_scale"):
        L.SHGridField(color_scale=0.0)
    f = L.SHGridField(resolution=3)
    p = L.init_field(f, jax.random.key(0))
    with pytest.raises(ValueError, match="view_dependent"):
        f.apply(p, jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="density_clip"):
        L.check_compatible(f, L.GridField(density_clip=(-2.0, 7.0)))
