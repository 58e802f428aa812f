"""Renderer vs a float64 NumPy reference, ray geometry, scenes, metrics and errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrjax import fields as L


def _np_render(sigma, rgb, z, delta, bg, far):
    """Float64 reference with the product form of transmittance."""
    sigma, rgb, z, delta = (np.asarray(a, np.float64) for a in (sigma, rgb, z, delta))
    alpha = 1.0 - np.exp(-sigma * delta)
    col = np.zeros((sigma.shape[0], 3))
    acc = np.zeros(sigma.shape[0])
    depth = np.zeros(sigma.shape[0])
    w_all = np.zeros_like(sigma)
    for r in range(sigma.shape[0]):
        trans = 1.0
        for i in range(sigma.shape[1]):
            w = trans * alpha[r, i]
            w_all[r, i] = w
            col[r] += w * rgb[r, i]
            acc[r] += w
            depth[r] += w * z[r, i]
            trans *= 1.0 - alpha[r, i]
        col[r] += (1 - acc[r]) * np.asarray(bg)
        depth[r] += (1 - acc[r]) * far[r]
    return col, acc, depth, w_all


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_render_matches_numpy_float64(seed):
    f = L.GridField(resolution=5, density_clip=(-10.0, 3.0))
    p = L.init_field(f, jax.random.key(seed))
    p = jax.tree.map(lambda a: a * 20.0, p)           # a wide range of densities
    k = jax.random.split(jax.random.key(100 + seed), 3)
    o = jax.random.uniform(k[0], (7, 3), minval=-2.5, maxval=2.5)
    o = o.at[:, 2].set(3.0)
    tgt = jax.random.uniform(k[1], (7, 3), minval=-0.5, maxval=0.5)
    d = tgt - o
    rays = L.Rays(o, d / jnp.linalg.norm(d, axis=-1, keepdims=True))
    bg = jnp.array([0.2, 0.5, 1.0])
    out = jax.jit(lambda q, r, key: L.render_rays(lambda x, dd: f.apply(q, x, dd), r, n_samples=16,
                                                  key=key, perturb=True, bg=bg))(p, rays, k[2])
    near, far, hit = L.near_far(rays, 1.0)
    col, acc, depth, w = _np_render(out.field.sigma, out.field.rgb, out.z,
                                    np.broadcast_to((far - near)[:, None] / 16, out.z.shape), bg, far)
    np.testing.assert_allclose(out.rgb, col, atol=2e-5)
    np.testing.assert_allclose(out.acc, acc, atol=2e-5)
    np.testing.assert_allclose(out.weights, w, atol=2e-5)
    np.testing.assert_allclose(out.depth, depth, rtol=1e-4, atol=1e-4)
    # identity: sum w = 1 - prod(1 - alpha)
    alpha = 1 - np.exp(-np.asarray(out.field.sigma, np.float64) * (np.asarray(far - near)[:, None] / 16))
    np.testing.assert_allclose(out.acc, 1 - np.prod(1 - alpha, axis=-1), atol=2e-5)
    assert bool(jnp.all(hit)) and float(jnp.max(jnp.abs(out.points))) <= 1.0
    # samples are inside their strata, increasing
    assert bool(jnp.all(jnp.diff(out.z, axis=-1) > 0))
    assert bool(jnp.all((out.z >= near[:, None]) & (out.z <= far[:, None])))


def test_ray_geometry_and_missed_rays():
    c2w = L.look_at((0.0, -3.0, 0.0))
    rays = L.pinhole_rays(c2w, 4, 6, 5.0)
    assert rays.origins.shape == (24, 3)
    np.testing.assert_allclose(jnp.linalg.norm(rays.directions, axis=-1), 1.0, atol=1e-6)
    centre = jnp.mean(rays.directions, axis=0)
    np.testing.assert_allclose(centre / jnp.linalg.norm(centre), [0, 1, 0], atol=1e-6)
    near, far, hit = L.near_far(L.Rays(jnp.array([[0.0, -3.0, 0.0]]), jnp.array([[0.0, 1.0, 0.0]])), 1.0)
    np.testing.assert_allclose([near[0], far[0]], [2.0, 4.0], atol=1e-6)
    # a ray that misses the box renders the background
    miss = L.Rays(jnp.array([[0.0, -3.0, 2.0]]), jnp.array([[0.0, 1.0, 0.0]]))
    out = L.render_rays(L.default_scene(), miss, n_samples=8, bg=0.25)
    np.testing.assert_allclose(out.rgb, [[0.25, 0.25, 0.25]], atol=1e-6)


def test_vmap_over_rays_equals_batched():
    f = L.CPField(resolution=5, rank_sigma=2, rank_app=2)
    p = L.init_field(f, jax.random.key(0))
    rays = L.pinhole_rays(L.look_at((2.0, 2.0, 1.0)), 3, 3, 3.0)
    fn = lambda x, d: f.apply(p, x, d)  # noqa: E731
    batched = jax.jit(lambda r: L.render_rays(fn, r, n_samples=8).rgb)(rays)
    single = jax.jit(jax.vmap(lambda o, d: L.render_rays(fn, L.Rays(o[None], d[None]), n_samples=8).rgb[0]))(*rays)
    np.testing.assert_allclose(batched, single, atol=1e-6)


def test_scene_and_metrics():
    data = L.make_dataset(n_train=2, n_test=1, height=12, width=12, gt_samples=64)
    assert data.images.shape == (2, 12, 12, 3) and data.test_images.shape == (1, 12, 12, 3)
    img = data.images[0]
    assert img.min() < 0.6 and img.max() > 0.95          # objects in front of a white background
    s = L.default_scene()
    x = jnp.array([[-0.35, 0.0, 0.0], [0.9, 0.9, 0.9]])
    out = s(x)
    assert float(out.sigma[0]) > 49 and float(out.sigma[1]) < 1e-3
    assert float(L.psnr(img, img * 0 + img)) == float("inf")   # identical images: infinite PSNR
    np.testing.assert_allclose(float(L.psnr(jnp.zeros(4), jnp.full(4, 0.1))), 20.0, atol=1e-4)
    assert abs(float(L.ssim(data.images, data.images)) - 1.0) < 1e-6
    noisy = np.clip(data.images + 0.1 * np.random.default_rng(0).normal(size=data.images.shape), 0, 1)
    assert 0.0 < float(L.ssim(noisy, data.images)) < 0.99
    rs = L.random_scene(3, n_shapes=3)
    assert len(rs.shapes) == 3 and rs(jnp.zeros((2, 3))).rgb.shape == (2, 3)


def test_render_errors():
    f = L.GridField(resolution=4)
    p = L.init_field(f, jax.random.key(0))
    fn = lambda x, d: f.apply(p, x, d)  # noqa: E731
    with pytest.raises(ValueError, match="empty ray batch"):
        L.render_rays(fn, L.Rays(jnp.zeros((0, 3)), jnp.zeros((0, 3))))
    with pytest.raises(ValueError, match=r"rays\.origins must have a trailing axis of size 3"):
        L.render_rays(fn, L.Rays(jnp.zeros((4, 2)), jnp.zeros((4, 2))))
    with pytest.raises(ValueError, match="key is required"):
        L.render_rays(fn, L.pinhole_rays(L.look_at((3.0, 0, 0)), 2, 2, 2.0), perturb=True)
    with pytest.raises(ValueError, match="n_samples"):
        L.render_rays(fn, L.pinhole_rays(L.look_at((3.0, 0, 0)), 2, 2, 2.0), n_samples=0)
    with pytest.raises(ValueError, match="a and b must have the same shape"):
        L.psnr(jnp.zeros(3), jnp.zeros(4))
    with pytest.raises(ValueError, match="smaller than the SSIM window"):
        L.ssim(jnp.zeros((8, 8, 3)), jnp.zeros((8, 8, 3)))
