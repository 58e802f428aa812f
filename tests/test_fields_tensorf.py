"""TensoRF regularisers (L1 on density factors, total variation) and resolution upsampling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrjax import fields as L
from lrjax.fields.fields import interp_grid
from lrjax.fields.tensorf import total_variation


def _smooth_cp(res):
    """A CP field whose lines are smooth functions of the vertex position."""
    f = L.CPField(resolution=res, rank_sigma=2, rank_app=3, geo_dim=4)
    p = L.init_field(f, jax.random.key(0))
    t = np.linspace(-1, 1, res)
    r = np.arange(5)[:, None]
    lines = np.stack([np.cos((m + 1) * t + r) for m in range(3)]).astype(np.float32)    # [3, 5, res]
    return f, {"params": {**p["params"], "lines": jnp.asarray(lines)}}


def _vertices(n):
    g = jnp.linspace(-1.0, 1.0, n)
    return jnp.stack(jnp.meshgrid(g, g, g, indexing="ij"), -1)


@pytest.mark.parametrize("kind", ["cp", "vm", "grid", "sh"])
def test_upsample_equals_trilinear_of_dense(kind):
    f = {"cp": L.CPField(resolution=5, rank_sigma=2, rank_app=3, geo_dim=4),
         "vm": L.VMField(resolution=5, rank_sigma=2, rank_app=3, geo_dim=4),
         "grid": L.GridField(resolution=5, geo_dim=4),
         "sh": L.SHGridField(resolution=5, sh_degree=2)}[kind]
    p = L.init_field(f, jax.random.key(1))
    f2, p2 = L.upsample(f, p, 7)                          # 7 - 1 is not a multiple of 5 - 1
    assert f2.resolution == 7 and type(f2) is type(f)
    dense = {"cp": L.cp_dense, "vm": L.vm_dense}.get(kind, lambda f, p: p)
    old, new = dense(f, p)["params"]["grid"], dense(f2, p2)["params"]["grid"]
    np.testing.assert_allclose(new, interp_grid(old, _vertices(7)), atol=1e-5)
    # the head / basis are kept
    for k in p["params"]:
        if k not in ("lines", "planes", "grid"):
            assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), p["params"][k], p2["params"][k]))


@pytest.mark.parametrize("kind", ["cp", "vm"])
def test_upsample_nested_preserves_field_everywhere(kind):
    f = L.CPField(resolution=5, rank_sigma=2, rank_app=3) if kind == "cp" else \
        L.VMField(resolution=5, rank_sigma=2, rank_app=3)
    p = L.init_field(f, jax.random.key(2))
    f2, p2 = L.upsample(f, p, 9)                          # 9 - 1 = 2 (5 - 1): old vertices kept
    x = jax.random.uniform(jax.random.key(3), (200, 3), minval=-1, maxval=1)
    a, b = f.apply(p, x), f2.apply(p2, x)
    np.testing.assert_allclose(a.feature, b.feature, atol=1e-5)
    np.testing.assert_allclose(a.rgb, b.rgb, atol=1e-5)


def test_upsample_smooth_field_interpolation_error():
    f, p = _smooth_cp(17)
    f2, p2 = L.upsample(f, p, 40)
    x = jax.random.uniform(jax.random.key(4), (500, 3), minval=-1, maxval=1)
    err = np.max(np.abs(np.asarray(f.apply(p, x).feature - f2.apply(p2, x).feature)))
    # piecewise-linear interpolation error of cos(3t) on spacing h = 2/16: <= h^2/8 * 9 per factor
    assert 0 < err < 0.2


def test_resolution_schedule_matches_tensorf():
    assert L.resolution_schedule(128, 300, 5) == [152, 180, 213, 253, 300]
    assert L.resolution_schedule(16, 16, 2) == [16, 16]


def test_tv_of_constant_is_zero_and_matches_numpy():
    f = L.VMField(resolution=6, rank_sigma=2, rank_app=3, geo_dim=4)
    p = L.init_field(f, jax.random.key(5))
    const = jax.tree.map(lambda a: a, p)
    const["params"]["planes"] = jnp.full_like(p["params"]["planes"], 0.7)
    assert float(L.tv_loss(f, const, "all")) == 0.0
    planes = np.asarray(p["params"]["planes"], np.float64)[:, :2]
    ref = sum(2 * (np.mean(np.diff(planes[m], axis=1) ** 2) + np.mean(np.diff(planes[m], axis=2) ** 2))
              for m in range(3))
    np.testing.assert_allclose(float(L.tv_loss(f, p)), ref, rtol=1e-5)
    cp = L.CPField(resolution=6, rank_sigma=2, rank_app=3, geo_dim=4)
    pc = L.init_field(cp, jax.random.key(6))
    lines = np.asarray(pc["params"]["lines"], np.float64)[:, 2:]
    ref = sum(2 * np.mean(np.diff(lines[m], axis=-1) ** 2) for m in range(3))
    np.testing.assert_allclose(float(L.tv_loss(cp, pc, "app")), ref, rtol=1e-5)
    g = L.GridField(resolution=4, geo_dim=2)
    pg = L.init_field(g, jax.random.key(7))
    gg = np.asarray(pg["params"]["grid"], np.float64)[..., :1]
    ref = 2 * sum(np.mean(np.diff(gg, axis=a) ** 2) for a in range(3))
    np.testing.assert_allclose(float(L.tv_loss(g, pg)), ref, rtol=1e-5)
    assert float(total_variation(jnp.ones((3, 4, 5)), (0, 1, 2))) == 0.0


def test_l1_matches_numpy():
    f = L.VMField(resolution=5, rank_sigma=2, rank_app=3, geo_dim=4)
    p = L.init_field(f, jax.random.key(8))
    pl, li = (np.asarray(p["params"][k], np.float64)[:, :2] for k in ("planes", "lines"))
    ref = sum(np.mean(np.abs(pl[m])) + np.mean(np.abs(li[m])) for m in range(3))
    np.testing.assert_allclose(float(L.l1_density(f, p)), ref, rtol=1e-5)
    cp = L.CPField(resolution=5, rank_sigma=2, rank_app=3, geo_dim=4)
    pc = L.init_field(cp, jax.random.key(9))
    li = np.asarray(pc["params"]["lines"], np.float64)[:, :2]
    np.testing.assert_allclose(float(L.l1_density(cp, pc)), sum(np.mean(np.abs(li[m])) for m in range(3)),
                               rtol=1e-5)


def test_regularizer_in_training_and_pvd():
    from lrjax.fields import pvd as P
    from lrjax.fields.train import make_optimizer, make_photometric_step
    f = L.VMField(resolution=6, rank_sigma=2, rank_app=3)
    p = L.init_field(f, jax.random.key(10))
    opt = make_optimizer(1e-2, 10)
    o = jnp.tile(jnp.array([[0.0, 0.0, 3.0]]), (8, 1))
    d = jnp.tile(jnp.array([[0.0, 0.0, -1.0]]), (8, 1))
    base = make_photometric_step(f, opt, batch=8, n_samples=8)
    reg = make_photometric_step(f, opt, batch=8, n_samples=8, regularizer=lambda q: 10.0 * L.l1_density(f, q))
    args = (p, opt.init(p), jax.random.key(0), o, d, jnp.ones((8, 3)))
    assert float(reg(*args)[2]) == pytest.approx(float(base(*args)[2]) + 10 * float(L.l1_density(f, p)), rel=1e-4)
    t = L.GridField(resolution=4)
    tp = L.init_field(t, jax.random.key(11))
    dist = P.PVD(t, tp, f, opt, poses=L.random_poses(0, 4), height=4, width=4, focal=4.0,
                 config=P.PVDConfig(stage_steps=(0, 0), batch_rays=8, n_samples=8),
                 regularizer=lambda q: L.tv_loss(f, q))
    _, m = dist.step(dist.init(jax.random.key(1)), jax.random.key(2))
    assert float(m["reg"]) == pytest.approx(float(L.tv_loss(f, dist.init(jax.random.key(1)).params)), rel=1e-4)


def test_errors_name_the_argument():
    f = L.CPField(resolution=5, rank_sigma=2, rank_app=3)
    p = L.init_field(f, jax.random.key(0))
    with pytest.raises(ValueError, match="new_res"):
        L.upsample(f, p, 3)
    with pytest.raises(TypeError, match="new_res"):    # a float is the wrong kind (TypeError since issue 10)
        L.upsample(f, p, 7.5)
    with pytest.raises(TypeError, match="field must be"):
        L.upsample(L.HashGridField(), p, 8)
    with pytest.raises(ValueError, match="params must be"):
        L.upsample(f, {"params": {"grid": 1}}, 8)
    with pytest.raises(TypeError, match="field must be a CPField or VMField"):
        L.l1_density(L.MLPField(), p)
    with pytest.raises(ValueError, match="part must be"):
        L.tv_loss(f, p, "density")
    with pytest.raises(ValueError, match="final"):
        L.resolution_schedule(64, 32, 2)
    from lrjax.fields.train import make_optimizer, make_photometric_step
    with pytest.raises(TypeError, match="regularizer"):
        make_photometric_step(f, make_optimizer(1e-2, 5), regularizer=0.1)
