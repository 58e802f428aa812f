"""Procedural scenes with analytic geometry, cameras and ground-truth images, so that field
training, rendering and distillation run offline.

A scene is a union of coloured shapes (spheres and boxes) with signed distance ``sdf(x) = min_k
sdf_k(x)``. It is itself a field (``scene(x, d) -> FieldOutput``)::

    sigma(x) = peak * sigmoid(-sdf(x) / sharpness)
    rgb(x)   = albedo_k* (ambient + (1 - ambient) max(n(x) . l, 0)),   k* = argmin_k sdf_k(x)

with ``n = grad sdf_k* / |grad sdf_k*|`` and a fixed light direction ``l`` (view-independent).
Ground-truth images are rendered with the package's own renderer at many midpoint samples
(``gt_samples=256``; the quadrature has converged there: 128 vs 512 samples agree to ~70 dB on
the default scene). Defaults (3 spheres, ``peak=50``, ``sharpness=0.02``, radius-3 cameras,
40 deg field of view) follow ``shared/research/fields.md`` section 7.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lrjax.fields.fields import FieldOutput, _pos_float, _pos_int
from lrjax.fields.render import Rays, look_at, pinhole_rays, render_rays

__all__ = ["Shape", "Scene", "default_scene", "random_scene", "fibonacci_poses", "random_poses",
           "SceneData", "make_dataset", "dataset_rays"]


@dataclass(frozen=True)
class Shape:
    """``kind`` 'sphere' (``size`` = radius) or 'box' (``size`` = half-extent), centre, RGB albedo."""

    kind: str
    center: tuple
    size: float
    albedo: tuple

    def __post_init__(self):
        if self.kind not in ("sphere", "box"):
            raise ValueError(f"kind must be 'sphere' or 'box', got {self.kind!r}")
        _pos_float(self.size, "size")
        if len(self.center) != 3 or len(self.albedo) != 3:
            raise ValueError("center and albedo must have 3 entries")

    def sdf(self, x):
        q = x - jnp.asarray(self.center, x.dtype)
        if self.kind == "sphere":
            return jnp.linalg.norm(q, axis=-1) - self.size
        q = jnp.abs(q) - self.size
        return jnp.linalg.norm(jnp.maximum(q, 0.0), axis=-1) + jnp.minimum(jnp.max(q, axis=-1), 0.0)


@dataclass(frozen=True)
class Scene:
    """A union of :class:`Shape` s in ``[-bound, bound]^3`` (see module docstring)."""

    shapes: tuple
    peak: float = 50.0
    sharpness: float = 0.02
    light: tuple = (0.4, 0.3, 0.866)
    ambient: float = 0.3
    bound: float = 1.0
    geo_dim: int = 15

    def __post_init__(self):
        if not self.shapes:
            raise ValueError("shapes must be a non-empty tuple of Shape")
        _pos_float(self.peak, "peak")
        _pos_float(self.sharpness, "sharpness")

    def sdfs(self, x):
        return jnp.stack([s.sdf(x) for s in self.shapes], axis=-1)

    def __call__(self, x, d=None) -> FieldOutput:
        x = jnp.asarray(x, jnp.float32)
        sd = self.sdfs(x)
        k = jnp.argmin(sd, axis=-1)
        sdf = jnp.min(sd, axis=-1)
        # analytic normals of every shape, then pick the nearest one
        flat = x.reshape(-1, 3)
        jac = jax.vmap(jax.jacfwd(self.sdfs))(flat)                      # [P, K, 3]
        n = jnp.take_along_axis(jac, k.reshape(-1, 1, 1), axis=1)[:, 0].reshape(x.shape)
        n = n / (jnp.linalg.norm(n, axis=-1, keepdims=True) + 1e-9)
        light = jnp.asarray(self.light) / np.linalg.norm(self.light)
        shade = self.ambient + (1 - self.ambient) * jnp.maximum(n @ light, 0.0)
        albedo = jnp.asarray([s.albedo for s in self.shapes], jnp.float32)[k]
        rgb = jnp.clip(albedo * shade[..., None], 0.0, 1.0)
        sigma = self.peak * jax.nn.sigmoid(-sdf / self.sharpness)
        sigma_pre = jnp.log(sigma + 1e-30)
        feat = jnp.concatenate([sigma_pre[..., None], jnp.zeros(x.shape[:-1] + (self.geo_dim,))], -1)
        return FieldOutput(feat, sigma_pre, sigma, rgb)


def default_scene() -> Scene:
    """Three spheres (research notes, section 7)."""
    return Scene((Shape("sphere", (-0.35, 0.0, 0.0), 0.40, (0.9, 0.2, 0.2)),
                  Shape("sphere", (0.4, 0.1, 0.2), 0.30, (0.2, 0.8, 0.3)),
                  Shape("sphere", (0.05, -0.35, -0.35), 0.25, (0.2, 0.3, 0.9))))


def random_scene(seed: int, n_shapes: int = 4) -> Scene:
    """Random spheres and boxes inside ``[-0.7, 0.7]^3`` with random albedos."""
    _pos_int(n_shapes, "n_shapes")
    rng = np.random.default_rng(seed)
    shapes = []
    for _ in range(n_shapes):
        kind = "sphere" if rng.random() < 0.6 else "box"
        size = float(rng.uniform(0.15, 0.3))
        c = tuple(float(v) for v in rng.uniform(-0.7 + size, 0.7 - size, 3))
        shapes.append(Shape(kind, c, size, tuple(float(v) for v in rng.uniform(0.1, 0.95, 3))))
    return Scene(tuple(shapes))


def _pose_at(azimuth, elevation, radius):
    eye = radius * np.array([np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth),
                             np.sin(elevation)])
    return np.asarray(look_at(eye))


def fibonacci_poses(n: int, radius: float = 3.0, min_elev_deg: float = 5.0, max_elev_deg: float = 75.0):
    """``[n, 4, 4]`` cameras on a Fibonacci spiral of the upper hemisphere, looking at the origin."""
    _pos_int(n, "n")
    golden = np.pi * (3 - np.sqrt(5))
    lo, hi = np.sin(np.deg2rad(min_elev_deg)), np.sin(np.deg2rad(max_elev_deg))
    return np.stack([_pose_at(i * golden, np.arcsin(lo + (hi - lo) * (i + 0.5) / n), radius)
                     for i in range(n)]).astype(np.float32)


def random_poses(seed: int, n: int, radius: float = 3.0, min_elev_deg: float = 5.0,
                 max_elev_deg: float = 75.0):
    """``[n, 4, 4]`` random cameras (uniform azimuth, elevation uniform in degrees)."""
    _pos_int(n, "n")
    rng = np.random.default_rng(seed)
    az = rng.uniform(-np.pi, np.pi, n)
    el = np.deg2rad(rng.uniform(min_elev_deg, max_elev_deg, n))
    return np.stack([_pose_at(a, e, radius) for a, e in zip(az, el)]).astype(np.float32)


class SceneData(NamedTuple):
    """Training/test images ``[V, H, W, 3]`` with camera-to-world poses ``[V, 4, 4]``."""

    images: np.ndarray
    poses: np.ndarray
    test_images: np.ndarray
    test_poses: np.ndarray
    height: int
    width: int
    focal: float
    bound: float


def make_dataset(scene: Scene | None = None, *, n_train: int = 40, n_test: int = 8, height: int = 32,
                 width: int = 32, fov_deg: float = 40.0, radius: float = 3.0, gt_samples: int = 256,
                 test_seed: int = 1234) -> SceneData:
    """Render ground-truth train views (Fibonacci) and test views (random, ``test_seed``)."""
    scene = default_scene() if scene is None else scene
    _pos_int(n_train, "n_train")
    _pos_int(n_test, "n_test")
    focal = 0.5 * width / np.tan(np.deg2rad(fov_deg) / 2)
    train_poses = fibonacci_poses(n_train, radius)
    test_poses = random_poses(test_seed, n_test, radius)

    @jax.jit
    def render(c2w):
        rays = pinhole_rays(c2w, height, width, focal)
        return render_rays(scene, rays, bound=scene.bound, n_samples=gt_samples).rgb

    def images(poses):
        return np.stack([np.asarray(render(p)).reshape(height, width, 3) for p in poses])

    return SceneData(images(train_poses), train_poses, images(test_poses), test_poses, height, width,
                     float(focal), scene.bound)


def dataset_rays(data: SceneData, test: bool = False):
    """All rays of the train (or test) views and their target colours: ``(Rays [V*H*W], rgb)``."""
    poses, imgs = (data.test_poses, data.test_images) if test else (data.poses, data.images)
    rays = [pinhole_rays(p, data.height, data.width, data.focal) for p in poses]
    return (Rays(jnp.concatenate([r.origins for r in rays]), jnp.concatenate([r.directions for r in rays])),
            jnp.asarray(imgs.reshape(-1, 3)))

