"""Procedural scenes with analytic geometry, cameras and ground-truth images, so that field
training, rendering and distillation run offline.

A scene is a union of coloured shapes (spheres and boxes) with signed distance ``sdf(x) = min_k
sdf_k(x)``. It is itself a field (``scene(x, d) -> FieldOutput``)::

    sigma(x) = peak * sigmoid(-sdf(x) / sharpness)
    rgb(x)   = albedo_k* tex(x) (ambient + (1 - ambient) max(n(x) . l, 0)),   k* = argmin_k sdf_k(x)
    tex(x)   = 1 - texture_amp (1 + sin(2 pi f x_1) sin(2 pi f x_2) sin(2 pi f x_3)) / 2,   f = texture_freq

with ``n = grad sdf_k* / |grad sdf_k*|`` and a fixed light direction ``l`` (view-independent).
Ground-truth images are rendered with the package's own renderer at many midpoint samples
(``gt_samples=256``; the quadrature has converged there: 128 vs 512 samples agree to ~70 dB on
the default scene). Defaults (3 spheres, ``peak=50``, ``sharpness=0.02``, radius-3 cameras,
40 deg field of view) follow ``shared/research/fields.md`` section 7. ``texture_amp=0`` (default)
gives plain albedos; :func:`textured_scene` is the harder scene of ``experiments/bench_pvd.py``
(a solid 3-D sine texture of ``texture_freq`` cycles per unit on every shape: fine detail that a
field learns from images slowly).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lrjax._validation import check_bool, check_choice, check_float, check_int
from lrjax.fields.fields import FieldOutput, _array, _pos_float, _pos_int
from lrjax.fields.render import Rays, look_at, pinhole_rays, render_rays

__all__ = ["Shape", "Scene", "default_scene", "textured_scene", "random_scene", "fibonacci_poses", "random_poses",
           "SceneData", "make_dataset", "dataset_rays"]


def _triple(v, name):
    if isinstance(v, (str, bytes)) or not isinstance(v, (tuple, list, np.ndarray, jax.Array)) or len(v) != 3:
        raise TypeError(f"{name} must be a tuple of 3 numbers, got {v!r}")
    return tuple(check_float(x, f"{name}[{i}]") for i, x in enumerate(v))


@dataclass(frozen=True)
class Shape:
    """``kind`` 'sphere' (``size`` = radius) or 'box' (``size`` = half-extent), centre, RGB albedo."""

    kind: str
    center: tuple
    size: float
    albedo: tuple

    def __post_init__(self):
        check_choice(self.kind, "kind", ("sphere", "box"))
        _pos_float(self.size, "size")
        _triple(self.center, "center")
        for i, v in enumerate(_triple(self.albedo, "albedo")):
            check_float(v, f"albedo[{i}]", low=0.0, high=1.0)

    def sdf(self, x):
        q = x - jnp.asarray(self.center, x.dtype)
        if self.kind == "sphere":
            return jnp.linalg.norm(q, axis=-1) - self.size
        q = jnp.abs(q) - self.size
        # safe norm: inside the box max(q, 0) = 0 and the plain norm's gradient (the normals) is NaN
        out = jnp.sqrt(jnp.maximum(jnp.sum(jnp.maximum(q, 0.0) ** 2, axis=-1), 1e-30))
        return out + jnp.minimum(jnp.max(q, axis=-1), 0.0)


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
    texture_freq: float = 0.0
    texture_amp: float = 0.0

    def __post_init__(self):
        if not isinstance(self.shapes, (tuple, list)):
            raise TypeError(f"shapes must be a non-empty tuple of Shape, got {type(self.shapes).__name__}")
        if not self.shapes:
            raise ValueError("shapes must be a non-empty tuple of Shape")
        for i, sh in enumerate(self.shapes):
            if not isinstance(sh, Shape):
                raise TypeError(f"shapes[{i}] must be a Shape, got {type(sh).__name__}")
        _pos_float(self.peak, "peak")
        _pos_float(self.sharpness, "sharpness")
        light = _triple(self.light, "light")
        if not np.linalg.norm(light) > 0:
            raise ValueError("light must be a non-zero 3-vector (the light direction)")
        check_float(self.ambient, "ambient", low=0.0, high=1.0)
        _pos_float(self.bound, "bound")
        check_int(self.geo_dim, "geo_dim", low=0)
        check_float(self.texture_freq, "texture_freq", low=0.0)
        check_float(self.texture_amp, "texture_amp", low=0.0, high=1.0)

    def sdfs(self, x):
        return jnp.stack([s.sdf(x) for s in self.shapes], axis=-1)

    def __call__(self, x, d=None) -> FieldOutput:
        """Analytic field outputs at points ``x: [..., 3]`` (``d`` is ignored: view-independent)."""
        x = _array(x, "x", min_ndim=1, last=3, kind="numeric").astype(jnp.float32)
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
        if self.texture_amp > 0:
            w = 2 * np.pi * self.texture_freq
            pat = jnp.sin(w * x[..., 0]) * jnp.sin(w * x[..., 1]) * jnp.sin(w * x[..., 2])
            shade = shade * (1 - self.texture_amp * 0.5 * (1 + pat))
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


def textured_scene(texture_freq: float = 3.0, texture_amp: float = 0.7) -> Scene:
    """Three spheres and a box with a solid sine texture (``texture_freq`` cycles per unit, contrast
    ``texture_amp``): the "from scratch is slow" scene of ``experiments/bench_pvd.py``.

    Args: ``texture_freq`` >= 0 (float, default 3.0); ``texture_amp`` in ``[0, 1]`` (float, default
    0.7; 0 = untextured albedo). Raises TypeError for a non-number and ValueError outside those ranges.
    Returns a :class:`Scene`, itself a callable field ``scene(x [N, 3], d [N, 3] or None) ->
    FieldOutput`` (sigma [N], rgb [N, 3]), so it can be passed directly as a
    :class:`~lrjax.fields.pvd.PointDistill` teacher ``f(x, d)`` or rendered."""
    check_float(texture_freq, "texture_freq", low=0.0)
    check_float(texture_amp, "texture_amp", low=0.0, high=1.0)
    return Scene((Shape("sphere", (-0.35, 0.0, 0.0), 0.40, (0.9, 0.25, 0.2)),
                  Shape("sphere", (0.4, 0.1, 0.2), 0.30, (0.25, 0.85, 0.3)),
                  Shape("sphere", (0.05, -0.35, -0.35), 0.25, (0.2, 0.35, 0.95)),
                  Shape("box", (0.3, 0.45, -0.35), 0.2, (0.95, 0.85, 0.3))),
                 texture_freq=texture_freq, texture_amp=texture_amp)


def random_scene(seed: int, n_shapes: int = 4) -> Scene:
    """Random spheres and boxes inside ``[-0.7, 0.7]^3`` with random albedos."""
    check_int(seed, "seed", low=0)
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


def _check_orbit(radius, min_elev_deg, max_elev_deg):
    _pos_float(radius, "radius")
    lo = check_float(min_elev_deg, "min_elev_deg", low=-90.0, high=90.0, low_open=True, high_open=True)
    hi = check_float(max_elev_deg, "max_elev_deg", low=-90.0, high=90.0, low_open=True, high_open=True)
    if hi < lo:
        raise ValueError(f"max_elev_deg={hi} must be >= min_elev_deg={lo}")


def fibonacci_poses(n: int, radius: float = 3.0, min_elev_deg: float = 5.0, max_elev_deg: float = 75.0):
    """``[n, 4, 4]`` cameras on a Fibonacci spiral of the upper hemisphere, looking at the origin.

    Elevations must lie in the open interval (-90, 90) degrees (at the pole the z-up camera is
    undefined)."""
    _pos_int(n, "n")
    _check_orbit(radius, min_elev_deg, max_elev_deg)
    golden = np.pi * (3 - np.sqrt(5))
    lo, hi = np.sin(np.deg2rad(min_elev_deg)), np.sin(np.deg2rad(max_elev_deg))
    return np.stack([_pose_at(i * golden, np.arcsin(lo + (hi - lo) * (i + 0.5) / n), radius)
                     for i in range(n)]).astype(np.float32)


def random_poses(seed: int, n: int, radius: float = 3.0, min_elev_deg: float = 5.0,
                 max_elev_deg: float = 75.0):
    """``[n, 4, 4]`` random cameras (uniform azimuth, elevation uniform in degrees)."""
    check_int(seed, "seed", low=0)
    _pos_int(n, "n")
    _check_orbit(radius, min_elev_deg, max_elev_deg)
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
    if not isinstance(scene, Scene):
        raise TypeError(f"scene must be a Scene or None, got {type(scene).__name__}")
    _pos_int(n_train, "n_train")
    _pos_int(n_test, "n_test")
    _pos_int(height, "height")
    _pos_int(width, "width")
    check_float(fov_deg, "fov_deg", low=0.0, high=180.0, low_open=True, high_open=True)
    _pos_float(radius, "radius")
    _pos_int(gt_samples, "gt_samples")
    check_int(test_seed, "test_seed", low=0)
    focal = 0.5 * width / np.tan(np.deg2rad(fov_deg) / 2)
    train_poses = fibonacci_poses(n_train, radius)
    test_poses = random_poses(test_seed, n_test, radius)

    @jax.jit
    def render(c2w):
        rays = pinhole_rays(c2w, height, width, focal)
        return render_rays(scene, rays, bound=scene.bound, n_samples=gt_samples).rgb

    def images(poses):
        out = np.stack([np.asarray(render(p)).reshape(height, width, 3) for p in poses])
        if not np.isfinite(out).all():
            # seen only with XLA_FLAGS=--xla_backend_optimization_level=0: XLA:CPU then miscompiles the box
            # SDF's forward-mode normals inside this jitted renderer (the same scene is finite evaluated alone)
            raise FloatingPointError(
                f"make_dataset: the ground-truth render of this scene gave {int((~np.isfinite(out)).sum())} "
                "non-finite pixel values; if XLA_FLAGS has --xla_backend_optimization_level=0, remove it "
                "(XLA:CPU miscompiles the box normals at -O0), or use a scene without boxes")
        return out

    return SceneData(images(train_poses), train_poses, images(test_poses), test_poses, height, width,
                     float(focal), scene.bound)


def dataset_rays(data: SceneData, test: bool = False):
    """All rays of the train (or test) views and their target colours: ``(Rays [V*H*W], rgb)``."""
    if not isinstance(data, SceneData):
        raise TypeError(f"data must be a SceneData (from make_dataset), got {type(data).__name__}")
    check_bool(test, "test")
    poses, imgs = (data.test_poses, data.test_images) if test else (data.poses, data.images)
    rays = [pinhole_rays(p, data.height, data.width, data.focal) for p in poses]
    return (Rays(jnp.concatenate([r.origins for r in rays]), jnp.concatenate([r.directions for r in rays])),
            jnp.asarray(imgs.reshape(-1, 3)))

