"""Differentiable volume rendering: rays, ray/box intersection, stratified sampling, compositing.

Emission-absorption quadrature (Max 1995; NeRF, Mildenhall et al. 2020, Eq. 3) with ``S`` samples
``z_1 < ... < z_S`` on a ray ``o + z d``::

    alpha_i = 1 - exp(-sigma_i delta_i)
    T_i     = exp(-sum_{j<i} sigma_j delta_j) = prod_{j<i} (1 - alpha_j)
    w_i     = T_i alpha_i,        acc = sum_i w_i = 1 - prod_i (1 - alpha_i)
    C       = sum_i w_i c_i + (1 - acc) bg,     depth = sum_i w_i z_i + (1 - acc) far

Samples lie between the ray's entry and exit of the box ``[-bound, bound]^3`` (slab test, as
torch-ngp / PVD's ``near_far_from_aabb``; ``near`` is clamped to ``min_near``). The interval is cut
into ``S`` equal strata of width ``delta = (far - near) / S``; sample ``i`` sits at the stratum's
midpoint (``perturb=False``) or uniformly inside it (``perturb=True``). Each sample's ``delta`` is
its stratum width, so the quadrature is the midpoint / stratified rule of the integral. (PVD uses
z-differences with the last delta = the stratum width, which is the same for midpoints; TensoRF
uses a last delta of 0.) Rays that miss the box get ``near = far`` and ``delta = 0``, hence the
background colour. Everything is shaped ``[R, ...]`` (rays first) and differentiable.

**Units.** :func:`render_rays` (and :func:`pinhole_rays`) *normalise* ray directions to unit
length, so ``z``, ``delta``, ``near``/``far`` and ``depth`` are world distances from the origin and
the image does not depend on the length of the given directions (scaling ``d`` by 10 gives the
same image to float tolerance; NeRF instead multiplies t-deltas by ``||d||``, which is the same
quadrature). A zero-length direction is refused on concrete input (under ``jit`` such a ray stays
at its origin). The lower-level :func:`near_far` works in the ray parameter ``t`` of ``o + t d``
for whatever ``d`` it is given. :func:`composite` takes ``delta`` as given: pass world-unit deltas.

**Checks.** Every function checks kinds, ranks and trailing sizes eagerly (also under ``jit``), and
on concrete input refuses NaN/Inf, negative densities or deltas, ``far < near`` and degenerate
cameras (``eye == target``, ``up`` parallel to the view direction, focal <= 0) with a
``ValueError`` naming the argument. Degenerate but valid input never gives NaN: all-zero density
renders the background with ``acc = 0``; missed rays render the background; an empty batch
(``R = 0``) composites to empty outputs.
"""
from __future__ import annotations

import numbers
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lrjax._validation import check_bool, check_finite, check_float, is_concrete
from lrjax.fields.fields import (FieldOutput, _array, _check_key, _concrete, _pos_float, _pos_int,
                                 _unit)

__all__ = ["Rays", "RenderOutput", "look_at", "pinhole_rays", "near_far", "stratified_samples",
           "composite", "render_rays", "render_image"]


class Rays(NamedTuple):
    """``origins: [R, 3]`` and ``directions: [R, 3]`` (any non-zero length; see module docstring)."""

    origins: jax.Array
    directions: jax.Array


class RenderOutput(NamedTuple):
    """``rgb: [R, 3]``, ``acc: [R]``, ``depth: [R]``, ``weights: [R, S]``, ``z: [R, S]``,
    ``points: [R, S, 3]`` and the field's per-sample :class:`FieldOutput` (``field``)."""

    rgb: jax.Array
    acc: jax.Array
    depth: jax.Array
    weights: jax.Array
    z: jax.Array
    points: jax.Array
    field: FieldOutput


def _vec3(v, name):
    return _array(v, name, ndim=1, last=3, convert=True).astype(jnp.float32)


def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)):
    """Camera-to-world ``[4, 4]`` matrix (OpenGL convention: the camera looks along ``-z_cam``).

    ``eye``, ``target``, ``up``: 3-vectors (arrays or lists/tuples of 3 numbers). On concrete input
    ``eye == target``, a zero ``up`` or an ``up`` parallel to the view direction raise ``ValueError``
    (the camera's orientation would be undefined); under ``jit`` the last case falls back to the
    world axis least aligned with the view direction.
    """
    eye, target, up = _vec3(eye, "eye"), _vec3(target, "target"), _vec3(up, "up")
    fwd = target - eye
    fn = jnp.linalg.norm(fwd)
    un = jnp.linalg.norm(up)
    if _concrete(fn, un):
        if not float(fn) > 1e-9:
            raise ValueError(f"eye and target must differ (the view direction is target - eye), "
                             f"got eye = target = {np.asarray(eye).tolist()}")
        if not float(un) > 1e-9:
            raise ValueError("up must be a non-zero 3-vector, got (0, 0, 0)")
        sin = float(jnp.linalg.norm(jnp.cross(fwd / fn, up / un)))
        if sin < 1e-6:
            raise ValueError(f"up={np.asarray(up).tolist()} is parallel to the view direction "
                             f"target - eye = {np.asarray(fwd).tolist()}; pick an up vector that is "
                             f"not collinear with it (e.g. (0, 1, 0))")
    fwd = fwd / jnp.maximum(fn, 1e-30)
    right = jnp.cross(fwd, up)
    alt = jnp.eye(3)[jnp.argmin(jnp.abs(fwd))]
    right = jnp.where(jnp.linalg.norm(right) < 1e-6 * jnp.maximum(un, 1e-30), jnp.cross(fwd, alt), right)
    right = right / jnp.maximum(jnp.linalg.norm(right), 1e-30)
    cam_up = jnp.cross(right, fwd)
    rot = jnp.stack([right, cam_up, -fwd], axis=1)
    return jnp.eye(4).at[:3, :3].set(rot).at[:3, 3].set(eye)


def _check_c2w(c2w, name="c2w"):
    c2w = _array(c2w, name, ndim=2, convert=True)
    if c2w.shape not in ((4, 4), (3, 4)):
        raise ValueError(f"{name} must have shape [3, 4] or [4, 4], got {tuple(c2w.shape)}")
    if is_concrete(c2w):
        det = float(np.linalg.det(np.asarray(c2w[:3, :3], np.float64)))
        if not abs(det) > 1e-9:
            raise ValueError(f"{name}: its rotation block c2w[:3, :3] is singular (det {det:.3g}); "
                             f"pass a camera-to-world pose such as look_at(eye)")
    return c2w


def _check_poses(poses, name="poses"):
    """``[P > 0, 4, 4]`` (or ``[P, 3, 4]``) finite camera-to-world poses with non-singular rotations."""
    poses = _array(poses, name, ndim=3, kind="numeric").astype(jnp.float32)
    if poses.shape[1:] not in ((4, 4), (3, 4)) or poses.shape[0] == 0:
        raise ValueError(f"{name} must have shape [P>0, 4, 4], got {tuple(poses.shape)}")
    if is_concrete(poses):
        det = np.abs(np.linalg.det(np.asarray(poses[:, :3, :3], np.float64)))
        bad = np.flatnonzero(~(det > 1e-9))
        if bad.size:
            raise ValueError(f"{name}[{int(bad[0])}]: the rotation block [:3, :3] is singular; pass "
                             f"camera-to-world poses such as look_at(eye)")
    return poses


def _check_focal(focal):
    if isinstance(focal, jax.core.Tracer):
        return focal
    return check_float(focal, "focal", low=0.0, low_open=True)


def pinhole_rays(c2w, height: int, width: int, focal: float) -> Rays:
    """Rays through pixel centres of a pinhole camera, row-major ``[height * width]``.

    ``c2w``: ``[3, 4]`` or ``[4, 4]`` camera-to-world pose; ``focal > 0`` in pixels. Directions are
    unit vectors."""
    height = _pos_int(height, "height")
    width = _pos_int(width, "width")
    focal = _check_focal(focal)
    c2w = _check_c2w(c2w)
    j, i = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32),
                        indexing="ij")
    dirs = jnp.stack([(i + 0.5 - width / 2) / focal, -(j + 0.5 - height / 2) / focal,
                      -jnp.ones_like(i)], axis=-1).reshape(-1, 3)
    d = dirs @ c2w[:3, :3].T
    d = d / jnp.maximum(jnp.linalg.norm(d, axis=-1, keepdims=True), 1e-30)
    return Rays(jnp.broadcast_to(c2w[:3, 3], d.shape), d)


def _check_rays(rays, allow_empty=False):
    if isinstance(rays, (str, bytes)) or not isinstance(rays, (Rays, tuple, list)) or len(rays) != 2:
        raise TypeError(f"rays must be a Rays(origins, directions) pair of [R, 3] arrays, "
                        f"got {type(rays).__name__}")
    o = _array(rays[0], "rays.origins", ndim=2, last=3)
    d = _array(rays[1], "rays.directions", ndim=2, last=3)
    if d.shape != o.shape:
        raise ValueError(f"rays must be origins and directions of shape [R, 3]; got {o.shape}, {d.shape}")
    if o.shape[0] == 0 and not allow_empty:
        raise ValueError("rays: empty ray batch (R = 0); render at least one ray")
    return Rays(o, d)


def near_far(rays: Rays, bound: float, min_near: float = 0.0):
    """Entry/exit parameters ``t`` of the rays ``o + t d`` through ``[-bound, bound]^3`` (slab
    test); ``hit: [R]`` bool. Missed rays return ``near = far`` (so they render the background).

    ``t`` is in units of ``||d||`` (world distances for unit directions)."""
    o, d = _check_rays(rays, allow_empty=True)
    bound = _pos_float(bound, "bound")
    min_near = check_float(min_near, "min_near", low=0.0)
    safe = jnp.where(jnp.abs(d) < 1e-9, 1e-9, d)
    t0, t1 = (-bound - o) / safe, (bound - o) / safe
    near = jnp.maximum(jnp.max(jnp.minimum(t0, t1), axis=-1), min_near)
    far = jnp.min(jnp.maximum(t0, t1), axis=-1)
    hit = far > near
    return near, jnp.where(hit, far, near), hit


def stratified_samples(key, near, far, n_samples: int, perturb: bool = True):
    """``z: [R, S]`` and ``delta: [R, S]`` (stratum widths); ``key`` may be None if not perturbing.

    ``near``, ``far``: ``[R]`` floating arrays with ``far >= near`` (checked on concrete input)."""
    n_samples = _pos_int(n_samples, "n_samples")
    perturb = check_bool(perturb, "perturb")
    near = _array(near, "near", ndim=1)
    far = _array(far, "far", ndim=1)
    if near.shape != far.shape:
        raise ValueError(f"near and far must have the same shape [R], got {near.shape} and {far.shape}")
    if _concrete(near, far) and near.size and bool(jnp.any(far < near)):
        raise ValueError("far must be >= near for every ray (got far < near); use near_far(rays, bound)")
    width = (far - near) / n_samples                                     # [R]
    if perturb:
        if key is None:
            raise ValueError("key is required when perturb=True")
        _check_key(key)
        off = jax.random.uniform(key, near.shape + (n_samples,), dtype=near.dtype)
    else:
        off = jnp.full(near.shape + (n_samples,), 0.5, near.dtype)
    z = near[:, None] + (jnp.arange(n_samples, dtype=near.dtype) + off) * width[:, None]
    return z, jnp.broadcast_to(width[:, None], z.shape)


def _nonneg(x, name):
    if is_concrete(x) and x.size and bool(jnp.any(x < 0)):
        raise ValueError(f"{name} must be >= 0 everywhere (got a negative value)")


def _check_bg(bg, r=None):
    """``bg``: a scalar, ``[3]`` or ``[R, 3]`` colour, finite and in ``[0, 1]`` (values checked when concrete)."""
    if isinstance(bg, (bool, np.bool_)) or isinstance(bg, str):
        raise TypeError(f"bg must be a number or a [3] / [R, 3] colour, got {bg!r}")
    if isinstance(bg, (numbers.Real, list, tuple)):  # host values stay on the host: checkable under jit
        try:
            bg = np.asarray(bg, dtype=np.float32)
        except (TypeError, ValueError):
            raise TypeError(f"bg must be a number or a [3] / [R, 3] colour, got {bg!r:.80}") from None
    bg = _array(bg, "bg", kind="numeric")
    if bg.shape not in ((), (3,)) and not (r is not None and bg.shape == (r, 3)) and \
            not (r is None and bg.ndim == 2 and bg.shape[-1] == 3):
        raise ValueError(f"bg must be a scalar, [3] or [R{'' if r is None else f'={r}'}, 3], got shape "
                         f"{tuple(bg.shape)}")
    check_finite(bg, "bg")
    if is_concrete(bg) and bg.size:
        lo, hi = float(np.min(np.asarray(bg))), float(np.max(np.asarray(bg)))
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"bg must be a colour with values in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    return bg


def composite(sigma, rgb, delta, z=None, bg=1.0, far=None):
    """Alpha-composite samples: returns ``(rgb [R, 3], acc [R], depth [R], weights [R, S])``.

    ``sigma, delta: [R, S]`` (``>= 0``, finite), ``rgb: [R, S, 3]``, ``bg``: scalar, ``[3]`` or
    ``[R, 3]`` (a number or list of 3 numbers is accepted). ``depth`` needs ``z: [R, S]`` (else it is
    0); missing opacity is given depth ``far: [R]`` (default ``z[:, -1]``). ``S >= 1``; ``R = 0``
    gives empty outputs. All-zero density gives ``acc = 0`` and the background, never NaN.
    """
    sigma = _array(sigma, "sigma", ndim=2)
    delta = _array(delta, "delta", ndim=2)
    rgb = _array(rgb, "rgb", ndim=3, last=3)
    if sigma.shape[1] == 0:
        raise ValueError("sigma: zero samples per ray (S = 0); composite needs S >= 1")
    if delta.shape != sigma.shape or rgb.shape[:2] != sigma.shape:
        raise ValueError(f"sigma, delta must be [R, S] and rgb [R, S, 3] with the same R, S; got "
                         f"sigma {sigma.shape}, delta {delta.shape}, rgb {rgb.shape}")
    _nonneg(sigma, "sigma")
    _nonneg(delta, "delta")
    r = sigma.shape[0]
    bg = _check_bg(bg, r)
    if z is not None:
        z = _array(z, "z", ndim=2)
        if z.shape != sigma.shape:
            raise ValueError(f"z must have the shape of sigma {sigma.shape}, got {z.shape}")
    if far is not None:
        far = _array(far, "far", ndim=1)
        if far.shape != (r,):
            raise ValueError(f"far must have shape [R={r}], got {far.shape}")
    tau = sigma * delta
    alpha = 1.0 - jnp.exp(-tau)
    excl = jnp.concatenate([jnp.zeros_like(tau[:, :1]), jnp.cumsum(tau, axis=-1)[:, :-1]], axis=-1)
    trans = jnp.exp(-excl)                                               # exclusive cumsum
    w = alpha * trans
    acc = jnp.sum(w, axis=-1)
    col = jnp.sum(w[..., None] * rgb, axis=-2) + (1.0 - acc)[..., None] * bg
    if z is None:
        depth = jnp.zeros_like(acc)
    else:
        far = z[:, -1] if far is None else far
        depth = jnp.sum(w * z, axis=-1) + (1.0 - acc) * far
    return col, acc, depth, w


def render_rays(apply_fn: Callable, rays: Rays, *, bound: float = 1.0, n_samples: int = 64,
                key=None, perturb: bool = False, bg=1.0, min_near: float = 0.0,
                z_delta=None) -> RenderOutput:
    """Render ``rays`` through a field ``apply_fn(x [R, S, 3], d [R, S, 3]) -> FieldOutput``.

    E.g. ``render_rays(lambda x, d: field.apply(params, x, d), rays)``; pass ``z_delta=(z, delta)``
    to reuse another model's samples (PVD's teacher and student see the same points). Directions
    are normalised first (see the module docstring), so ``z``, ``delta`` and ``depth`` are world
    distances and the image does not depend on the directions' lengths. A density-only field
    (``appearance=False``) has the documented constant colour 0.5: its image is
    ``0.5 acc + bg (1 - acc)`` while ``acc``, ``depth`` and ``weights`` are exact.
    """
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be a callable (x, d) -> FieldOutput, got {type(apply_fn).__name__}")
    rays = _check_rays(rays)
    bound = _pos_float(bound, "bound")
    n_samples = _pos_int(n_samples, "n_samples")
    perturb = check_bool(perturb, "perturb")
    o, d = rays
    d = _unit(d, "rays.directions")
    rays = Rays(o, d)
    near, far, _ = near_far(rays, bound, min_near)
    if z_delta is None:
        z, delta = stratified_samples(key, near, far, n_samples, perturb)
    else:
        if not isinstance(z_delta, (tuple, list)) or len(z_delta) != 2:
            raise TypeError(f"z_delta must be a pair (z, delta) of [R, S] arrays, got {type(z_delta).__name__}")
        z = _array(z_delta[0], "z_delta[0] (z)", ndim=2)
        delta = _array(z_delta[1], "z_delta[1] (delta)", ndim=2)
        if z.shape != delta.shape or z.shape[0] != o.shape[0]:
            raise ValueError(f"z_delta must be two [R={o.shape[0]}, S] arrays, got {z.shape} and {delta.shape}")
    pts = jnp.clip(o[:, None, :] + z[..., None] * d[:, None, :], -bound, bound)
    out = apply_fn(pts, jnp.broadcast_to(d[:, None, :], pts.shape))
    if not isinstance(out, FieldOutput):
        raise TypeError(f"apply_fn must return a FieldOutput, got {type(out).__name__}")
    col, acc, depth, w = composite(out.sigma, out.rgb, delta, z, bg, far)
    return RenderOutput(col, acc, depth, w, z, pts, out)


def render_image(apply_fn: Callable, c2w, height: int, width: int, focal: float, *,
                 bound: float = 1.0, n_samples: int = 64, bg=1.0, chunk: int = 4096):
    """Render a full ``[height, width, 3]`` image (midpoint samples), in ray chunks under ``jit``."""
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be a callable (x, d) -> FieldOutput, got {type(apply_fn).__name__}")
    chunk = _pos_int(chunk, "chunk")
    bound = _pos_float(bound, "bound")
    n_samples = _pos_int(n_samples, "n_samples")
    bg = _check_bg(bg)
    rays = pinhole_rays(c2w, height, width, focal)
    n = rays.origins.shape[0]

    @jax.jit
    def run(o, d):
        return render_rays(apply_fn, Rays(o, d), bound=bound, n_samples=n_samples, bg=bg).rgb

    parts = [run(rays.origins[s:s + chunk], rays.directions[s:s + chunk]) for s in range(0, n, chunk)]
    return jnp.concatenate(parts).reshape(height, width, 3)
