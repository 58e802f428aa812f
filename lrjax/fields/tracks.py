"""TracksTo4D: 3-D structure, cameras and a low-rank motion basis from 2-D point tracks.

Kasten, Lu & Maron, "Fast Encoder-Based 3D from Casual Videos via Point Track Processing"
(NeurIPS 2024, arXiv:2404.07097). Derived from the paper and ``shared/research/architectures.md``
section 15 only; the official code (NVlabs/tracks-to-4d) is under a non-commercial licence and was
neither read nor ported.

Input. A scene's tracks are one array ``tracks [T, P, 3]`` (T frames, P points), entry
``(x, y, o)``: the point's image position in *normalized* image coordinates (pixel coordinates
premultiplied by ``K^-1``, the paper's convention: intrinsics are known and removed before the
network) and its visibility ``o in {0, 1}``. Invisible entries' ``(x, y)`` are ignored (zeroed
before the network and masked out of every loss). A batch of scenes is ``[B, T, P, 3]``.

Model (the paper's two principles).

* Symmetry: the network is equivariant to permutations of the points. It alternates attention
  across the point axis (inside each frame; no positional code, so permutation equivariant) and
  attention across the time axis (inside each point's track; frames get a sinusoidal code of
  ``t / T``, so time order is used). Per-point outputs are read from the mean over frames,
  per-frame outputs from the mean over points (permutation invariant).
* Low-rank motion: each point ``p`` has ``K + 1`` basis positions ``B_p = (B_p0, ..., B_pK)``,
  ``B_pk in R^3``; each frame ``t`` has coefficients ``c_t = (c_t0, ..., c_tK)`` with ``c_t0 = 1``
  (``B_p0`` is the static part)::

      X_tp = sum_k c_tk B_pk                         (trajectories)

  so the trajectory matrix ``[T, 3P]`` (row t = all points of frame t) factors as
  ``C [T, K+1] @ B [K+1, 3P]`` and has rank ``<= K + 1``; the ``[3T, P]`` matrix (rows = (t, xyz),
  columns = points) equals ``(C kron I_3) [3T, 3(K+1)] @ B' [3(K+1), P]`` and has rank
  ``<= 3(K + 1)``; removing the static part ``X - B_0`` leaves rank ``<= K`` (``[T, 3P]``).
* Cameras: per frame a rotation ``R_t`` (camera-to-world, from the 6-D representation of Zhou et
  al. 2019 by Gram-Schmidt) and a camera centre ``t_t``; a world point is seen at
  ``X^c = R_t^T (X - t_t)`` and projects to ``pi(X^c) = (X^c_x / X^c_z, X^c_y / X^c_z)`` (the
  paper's normalized pinhole, ``K = I``); ``intrinsics=(fx, fy, cx, cy)`` maps to pixels instead
  ([ours], for users who keep pixel tracks). The depth in the division is clamped at
  ``min_depth`` (default ``1e-4``) so that a point behind the camera gives a large finite error and
  the depth penalty, never NaN.

Losses (:func:`tracks_losses`; the paper's unsupervised terms -- it trains on 2-D tracks only):

* dynamic reprojection ``L_reproj = sum_tp o_tp |pi(X^c_tp) - x_tp|^2 / sum_tp o_tp`` (all of the
  model: static + dynamic bases);
* static reprojection with a per-point uncertainty ``sigma_p > 0`` (``elu + 1`` of a head output):
  ``L_static = mean_{visible tp} log(sigma_p + r_tp^2 / sigma_p)`` with ``r_tp`` the reprojection
  error of the static part ``B_p0`` alone (a Cauchy-like robust term: minimised at
  ``sigma_p = r_p``, so points that the static part explains get a small sigma);
* sparsity of the dynamic part ``L_sparse = mean_{p, k >= 1, xyz} |B_pk| / sigma_p`` (pushes
  points with small sigma, i.e. static points, to zero motion). It is a prior on the predicted
  bases, not a data term: it averages over *all* points whatever their visibility (as the research
  note's ``0.001 * mean|B_dynamic / sigma|``), so it is not masked by ``o``;
* negative-depth penalty ``L_depth = sum_tp o_tp relu(min_depth - X^c_z,tp) / sum o`` (points
  must be in front of the camera).

Total ``w_reproj L_reproj + w_static L_static + w_sparse L_sparse + w_depth L_depth`` with the
defaults ``50, 1, 1e-3, 1`` (the weights of the research note; the paper lists the four terms).
Not implemented: the paper's camera "warm-up" to ``R = I, t = (0, 0, -d)`` is replaced by an
offset in the translation head (``init_depth``) so the untrained network already outputs that
camera ([ours]); the per-frame head is an MLP on the point-pooled features (the research note
mentions a circular temporal convolution there; the time attention already mixes frames).

Also here: :func:`synthetic_tracks`, random scenes of static points plus points moving in a
shared low-rank basis, seen by a random orbiting camera with random drop-outs, whose tracks are
the exact projections (so a ground-truth model has reprojection error exactly 0).

Shapes: everything accepts a single scene or leading batch axes (the losses ``jax.vmap`` over
scenes). Dtypes: inputs may be float32 or bfloat16; the math runs in
``promote_types(dtype, float32)``. The geometry functions (:func:`trajectories`,
:func:`rotation_6d`, :func:`world_to_camera`, :func:`project`) round their outputs once to the
input dtype; :class:`TracksTo4D` (float32 parameters) returns its outputs in
``promote_types(tracks.dtype, float32)``, i.e. float32 for float16/bfloat16 tracks; the losses are
in that compute dtype. NumPy inputs are converted with ``jnp.asarray`` first (float64 becomes
float32 unless ``jax_enable_x64`` is on), so they raise no dtype-truncation warnings.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrjax._validation import (check_array, check_choice, check_finite, check_float, check_int, check_key,
                               compute_dtype, is_concrete)

__all__ = ["TracksTo4D", "TracksOutput", "SyntheticTracks", "check_tracks", "trajectories", "trajectory_matrix",
           "rotation_6d", "world_to_camera", "project", "predict_tracks", "tracks_losses", "reprojection_error",
           "synthetic_tracks"]


# ----------------------------------------------------------------------------------------------- checks
def check_tracks(tracks, name: str = "tracks"):
    """Validate point tracks ``[T, P, 3]`` or ``[B, T, P, 3]`` = ``(x, y, visible)``.

    Raises ``TypeError`` for a non-array or a non-floating array and ``ValueError`` for a wrong rank,
    a last axis other than 3, fewer than 1 frame / point, NaN/Inf, or (for concrete input) a
    visibility channel ``tracks[..., 2]`` with values other than 0 and 1. Returns the array."""
    tracks = check_array(tracks, name, kind="floating")
    if tracks.ndim not in (3, 4):
        raise ValueError(f"{name} must have shape [frames, points, 3] or [scenes, frames, points, 3], got shape "
                         f"{tuple(tracks.shape)}")
    if tracks.shape[-1] != 3:
        raise ValueError(f"{name} must have a last axis of size 3 (x, y, visible), got shape {tuple(tracks.shape)}")
    if tracks.shape[-2] < 1 or tracks.shape[-3] < 1:
        raise ValueError(f"{name} needs at least one frame and one point, got shape {tuple(tracks.shape)}")
    check_finite(tracks, name)
    if is_concrete(tracks):
        with jax.ensure_compile_time_eval():
            vis = jnp.asarray(tracks[..., 2], jnp.float32)
            ok = bool(jnp.all((vis == 0) | (vis == 1)))
        if not ok:
            raise ValueError(f"{name}[..., 2] is the visibility and must be 0 or 1 (a boolean mask cast to float); "
                             "got other values -- threshold soft visibilities first")
    return jnp.asarray(tracks) if isinstance(tracks, np.ndarray) else tracks


def _float_array(x, name, ndim=None, min_ndim=None, last=None):
    x = check_array(x, name, kind="floating", ndim=ndim, min_ndim=min_ndim, last=last)
    check_finite(x, name)
    return jnp.asarray(x) if isinstance(x, np.ndarray) else x


def _intrinsics(intrinsics):
    if intrinsics is None:
        return None
    if isinstance(intrinsics, (str, bytes)) or not isinstance(intrinsics, (tuple, list)):
        raise TypeError(f"intrinsics must be None (normalized coordinates, the paper's convention) or a tuple "
                        f"(fx, fy, cx, cy), got {intrinsics!r}")
    if len(intrinsics) != 4:
        raise ValueError(f"intrinsics must have 4 entries (fx, fy, cx, cy), got {len(intrinsics)}: {intrinsics!r}")
    fx, fy, cx, cy = (check_float(v, f"intrinsics[{i}]") for i, v in enumerate(intrinsics))
    if fx <= 0 or fy <= 0:
        raise ValueError(f"intrinsics focal lengths fx, fy must be > 0, got {fx}, {fy}")
    return fx, fy, cx, cy


# --------------------------------------------------------------------------------------------- geometry
def trajectories(bases, coeffs):
    """``X_tp = sum_k c_tk B_pk``: bases ``[..., P, K+1, 3]``, coeffs ``[..., T, K+1]`` -> ``[..., T, P, 3]``.

    Leading axes broadcast (a batch of scenes). Computed in ``promote_types(dtype, float32)``."""
    bases = _float_array(bases, "bases", min_ndim=3, last=3)
    coeffs = _float_array(coeffs, "coeffs", min_ndim=2)
    if coeffs.shape[-1] != bases.shape[-2]:
        raise ValueError(f"coeffs must have K+1 = {bases.shape[-2]} columns (bases has K+1 = {bases.shape[-2]} "
                         f"basis positions per point), got shape {tuple(coeffs.shape)}")
    dt = compute_dtype(bases.dtype, coeffs.dtype)
    out = jnp.einsum("...tk,...pkd->...tpd", coeffs.astype(dt), bases.astype(dt))
    return out.astype(jnp.promote_types(bases.dtype, coeffs.dtype))


def trajectory_matrix(points, layout: str = "frames"):
    """Reshape trajectories ``[T, P, 3]`` into a matrix: ``layout="frames"`` -> ``[T, 3P]`` (rank
    ``<= K+1`` for a ``K+1``-basis model), ``"points"`` -> ``[3T, P]`` (rank ``<= 3(K+1)``)."""
    points = _float_array(points, "points", ndim=3, last=3)
    check_choice(layout, "layout", ("frames", "points"))
    t, p, _ = points.shape
    if layout == "frames":
        return points.reshape(t, 3 * p)
    return jnp.transpose(points, (0, 2, 1)).reshape(3 * t, p)


def rotation_6d(r6):
    """Rotation matrices ``[..., 3, 3]`` from the 6-D representation ``[..., 6]`` (Zhou et al. 2019):
    ``b1 = a1/|a1|``, ``b2 = normalize(a2 - (b1.a2) b1)``, ``b3 = b1 x b2``; columns ``(b1, b2, b3)``.
    Norms are floored at 1e-8 (a degenerate input gives a finite matrix, not NaN)."""
    r6 = _float_array(r6, "r6", min_ndim=1, last=6)
    dt = compute_dtype(r6.dtype)
    a1, a2 = r6[..., :3].astype(dt), r6[..., 3:].astype(dt)

    def nrm(v):
        return v / jnp.sqrt(jnp.maximum(jnp.sum(v * v, -1, keepdims=True), 1e-16))
    b1 = nrm(a1)
    b2 = nrm(a2 - jnp.sum(b1 * a2, -1, keepdims=True) * b1)
    b3 = jnp.cross(b1, b2)
    return jnp.stack([b1, b2, b3], axis=-1).astype(r6.dtype)


def world_to_camera(points, rotations, translations):
    """``X^c_tp = R_t^T (X_tp - t_t)``: points ``[..., T, P, 3]``, rotations ``[..., T, 3, 3]``
    (camera-to-world), translations ``[..., T, 3]`` (camera centres) -> ``[..., T, P, 3]``."""
    points = _float_array(points, "points", min_ndim=3, last=3)
    rotations = _float_array(rotations, "rotations", min_ndim=3, last=3)
    translations = _float_array(translations, "translations", min_ndim=2, last=3)
    if rotations.shape[-2] != 3 or rotations.shape[-3] != points.shape[-3] or \
            translations.shape[-2] != points.shape[-3]:
        raise ValueError(f"rotations [T, 3, 3] and translations [T, 3] must have T = {points.shape[-3]} frames like "
                         f"points {tuple(points.shape)}, got {tuple(rotations.shape)} and {tuple(translations.shape)}")
    dt = compute_dtype(points.dtype, rotations.dtype, translations.dtype)
    rel = points.astype(dt) - translations.astype(dt)[..., :, None, :]
    out = jnp.einsum("...tji,...tpj->...tpi", rotations.astype(dt), rel)
    return out.astype(jnp.promote_types(points.dtype, rotations.dtype))


def project(points_cam, intrinsics=None, *, min_depth: float = 1e-4):
    """Pinhole projection ``[..., 3] -> [..., 2]``: ``(X/Z, Y/Z)`` with ``Z`` clamped to ``>= min_depth``
    (normalized coordinates, the paper's convention), or ``(fx X/Z + cx, fy Y/Z + cy)`` given
    ``intrinsics=(fx, fy, cx, cy)``."""
    points_cam = _float_array(points_cam, "points_cam", min_ndim=1, last=3)
    k = _intrinsics(intrinsics)
    min_depth = check_float(min_depth, "min_depth", low=0.0, low_open=True)
    dt = compute_dtype(points_cam.dtype)
    p = points_cam.astype(dt)
    xy = p[..., :2] / jnp.maximum(p[..., 2:3], min_depth)
    if k is not None:
        fx, fy, cx, cy = k
        xy = xy * jnp.asarray([fx, fy], dt) + jnp.asarray([cx, cy], dt)
    return xy.astype(points_cam.dtype)


class TracksOutput(NamedTuple):
    """What :class:`TracksTo4D` predicts for one scene (leading batch axes for a batch).

    bases ``[P, K+1, 3]`` (``bases[:, 0]`` static), coeffs ``[T, K+1]`` (``coeffs[:, 0] == 1``),
    rotations ``[T, 3, 3]`` (camera-to-world), translations ``[T, 3]`` (camera centres),
    sigma ``[P]`` (> 0, per-point uncertainty of the static reprojection)."""
    bases: jax.Array
    coeffs: jax.Array
    rotations: jax.Array
    translations: jax.Array
    sigma: jax.Array

    def points(self):
        """World trajectories ``X [T, P, 3]``."""
        return trajectories(self.bases, self.coeffs)


def predict_tracks(out: TracksOutput, intrinsics=None, *, min_depth: float = 1e-4):
    """Reproject a prediction: returns ``(xy [..., T, P, 2], depth [..., T, P])``. Raises TypeError
    when ``out`` is not a :class:`TracksOutput`, and as :func:`project` for ``intrinsics``/``min_depth``."""
    if not isinstance(out, TracksOutput):
        raise TypeError(f"out must be a TracksOutput (what TracksTo4D returns), got {type(out).__name__}")
    cam = world_to_camera(out.points(), out.rotations, out.translations)
    return project(cam, intrinsics, min_depth=min_depth), cam[..., 2]


def _check_out(out, tracks):
    if not isinstance(out, TracksOutput):
        raise TypeError(f"out must be a TracksOutput (what TracksTo4D returns), got {type(out).__name__}")
    t, p = tracks.shape[-3], tracks.shape[-2]
    if out.bases.shape[:-2] != tracks.shape[:-3] + (p,) or out.coeffs.shape[:-1] != tracks.shape[:-3] + (t,):
        raise ValueError(f"out (bases {tuple(out.bases.shape)}, coeffs {tuple(out.coeffs.shape)}) does not match "
                         f"tracks {tuple(tracks.shape)}: predict on the same tracks")


def _scene_losses(out, tracks, intrinsics, min_depth):
    dt = compute_dtype(tracks.dtype, out.bases.dtype)
    vis = tracks[..., 2].astype(dt)
    target = tracks[..., :2].astype(dt)
    n_vis = jnp.maximum(jnp.sum(vis), 1.0)
    out = TracksOutput(*(jnp.asarray(a, dt) for a in out))
    cam = world_to_camera(out.points(), out.rotations, out.translations)
    xy = project(cam, intrinsics, min_depth=min_depth)
    r2 = jnp.sum((xy - target) ** 2, -1)
    reproj = jnp.sum(vis * r2) / n_vis
    pos = r2 > 0
    err = jnp.sum(vis * jnp.where(pos, jnp.sqrt(jnp.where(pos, r2, 1.0)), 0.0)) / n_vis
    static_pts = jnp.broadcast_to(out.bases[None, :, 0, :], cam.shape)
    xy_s = project(world_to_camera(static_pts, out.rotations, out.translations), intrinsics, min_depth=min_depth)
    r2_s = jnp.sum((xy_s - target) ** 2, -1)
    sigma = out.sigma[None, :]
    static = jnp.sum(vis * jnp.log(sigma + r2_s / sigma)) / n_vis
    if out.bases.shape[-2] > 1:
        sparse = jnp.mean(jnp.abs(out.bases[:, 1:, :]) / out.sigma[:, None, None])
    else:
        sparse = jnp.zeros((), dt)
    depth = jnp.sum(vis * jax.nn.relu(min_depth - cam[..., 2])) / n_vis
    return {"reproj": reproj, "static": static, "sparse": sparse, "depth": depth, "error": err}


def tracks_losses(out: TracksOutput, tracks, *, intrinsics=None, w_reproj: float = 50.0, w_static: float = 1.0,
                  w_sparse: float = 1e-3, w_depth: float = 1.0, min_depth: float = 1e-4):
    """The paper's unsupervised losses (module docstring), averaged over scenes.

    ``out``: :class:`TracksOutput` for ``tracks [T, P, 3]`` or ``[B, T, P, 3]`` (``jax.vmap`` over B).
    Returns ``(total, terms)`` with ``terms = {"reproj", "static", "sparse", "depth", "error"}``
    (``error``: the mean Euclidean reprojection error over visible entries, not in the total).
    A scene with no visible entry contributes 0 to ``reproj``, ``static``, ``depth`` and ``error``
    (the data terms); ``sparse`` is a prior on the predicted bases over all points and still counts. Raises like :func:`check_tracks`,
    ``TypeError`` for ``out`` of another type, ``ValueError`` for a negative weight."""
    tracks = check_tracks(tracks)
    _check_out(out, tracks)
    k = _intrinsics(intrinsics)
    ws = [check_float(w, n, low=0.0) for w, n in ((w_reproj, "w_reproj"), (w_static, "w_static"),
                                                   (w_sparse, "w_sparse"), (w_depth, "w_depth"))]
    min_depth = check_float(min_depth, "min_depth", low=0.0, low_open=True)
    fn = lambda o, tr: _scene_losses(o, tr, k, min_depth)  # noqa: E731
    if tracks.ndim == 4:
        fn = jax.vmap(fn)
    terms = jax.tree.map(jnp.mean, fn(out, tracks))
    total = ws[0] * terms["reproj"] + ws[1] * terms["static"] + ws[2] * terms["sparse"] + ws[3] * terms["depth"]
    return total, terms


def reprojection_error(out: TracksOutput, tracks, *, intrinsics=None, min_depth: float = 1e-4):
    """Mean Euclidean reprojection error ``mean_{visible tp} |pi(X^c_tp) - x_tp|`` (normalized image
    units), averaged over scenes for a batch."""
    return tracks_losses(out, tracks, intrinsics=intrinsics, min_depth=min_depth)[1]["error"]


# ---------------------------------------------------------------------------------------------- network
def _sincos(x, n_freqs):
    """``[..., D] -> [..., D (1 + 2 n_freqs)]``: x, sin(2^i pi x), cos(2^i pi x)."""
    freqs = (2.0 ** jnp.arange(n_freqs, dtype=x.dtype)) * jnp.pi
    ang = x[..., None] * freqs
    enc = jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], -1).reshape(*x.shape[:-1], -1)
    return jnp.concatenate([x, enc], -1)


class _Block(nnx.Module):
    """Pre-LN transformer block attending over axis -2 of ``[..., S, W]`` (no positional code:
    equivariant to permutations of S)."""

    def __init__(self, width, heads, rngs):
        self.heads = heads
        self.norm1 = nnx.LayerNorm(width, rngs=rngs)
        self.qkv = nnx.Linear(width, 3 * width, rngs=rngs)
        self.proj = nnx.Linear(width, width, rngs=rngs)
        self.norm2 = nnx.LayerNorm(width, rngs=rngs)
        self.fc1 = nnx.Linear(width, 2 * width, rngs=rngs)
        self.fc2 = nnx.Linear(2 * width, width, rngs=rngs)

    def __call__(self, x):
        h = self.norm1(x)
        d = x.shape[-1] // self.heads
        q, k, v = jnp.split(self.qkv(h).reshape(*x.shape[:-1], 3 * self.heads, d), 3, axis=-2)
        a = jax.nn.softmax(jnp.einsum("...qhd,...khd->...hqk", q, k) / math.sqrt(d), axis=-1)
        x = x + self.proj(jnp.einsum("...hqk,...khd->...qhd", a, v).reshape(x.shape))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x))))


class TracksTo4D(nnx.Module):
    """Point-permutation-equivariant network: tracks ``[..., T, P, 3]`` -> :class:`TracksOutput`.

    Args: ``n_bases`` K >= 0 (dynamic bases; K + 1 basis positions per point with the static one;
    K = 0 is a static-only model), ``width`` (divisible by ``heads``), ``depth`` (number of
    point-attention + time-attention pairs), ``heads``, ``n_freqs`` (sinusoidal frequencies of the
    (x, y) input code; the paper uses 12), ``init_depth`` d (the untrained camera sits at
    ``t = (0, 0, -d)`` with ``R = I``, looking at the origin along +z), ``rngs`` (``nnx.Rngs``).
    Defaults are scaled down from the paper's (K = 12, width 256, 3 layer pairs) for CPU.

    Forward: embed ``o * PE(x, y)`` and ``o`` (invisible entries are zeroed first) with a linear
    layer, add a linear code of the frame's sinusoidal time code; ``depth`` times attend across
    points then across frames; per point, the frame-mean feature -> MLP -> ``B_p [K+1, 3]`` and
    ``sigma_p = elu(s) + 1 + 1e-4``; per frame, the point-mean feature -> MLP -> 6-D rotation
    (added to the identity's ``(1,0,0, 0,1,0)``), translation (plus ``(0, 0, -d)``) and
    ``c_t1..c_tK`` (``c_t0 = 1`` is prepended). Equivariance is exact up to float summation
    order: ``net(tracks[:, perm]) == net(tracks)`` permuted on its point axes.
    Raises ``TypeError``/``ValueError`` (naming the argument) for bad settings and bad tracks."""

    def __init__(self, n_bases: int = 3, *, width: int = 64, depth: int = 2, heads: int = 4, n_freqs: int = 6,
                 init_depth: float = 5.0, rngs: nnx.Rngs):
        self.n_bases = check_int(n_bases, "n_bases", low=0)
        width = check_int(width, "width", low=1)
        heads = check_int(heads, "heads", low=1)
        if width % heads:
            raise ValueError(f"width must be divisible by heads, got width={width}, heads={heads}")
        self.depth = check_int(depth, "depth", low=1)
        self.n_freqs = check_int(n_freqs, "n_freqs", low=0)
        self.init_depth = check_float(init_depth, "init_depth", low=0.0, low_open=True)
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"rngs must be an nnx.Rngs, got {type(rngs).__name__}; pass rngs=nnx.Rngs(0)")
        small = nnx.initializers.normal(1e-2)
        self.embed = nnx.Linear(2 * (1 + 2 * self.n_freqs) + 1, width, rngs=rngs)
        self.time_embed = nnx.Linear(1 + 2 * 4, width, rngs=rngs)
        self.point_blocks = nnx.List([_Block(width, heads, rngs) for _ in range(self.depth)])
        self.time_blocks = nnx.List([_Block(width, heads, rngs) for _ in range(self.depth)])
        self.point_fc = nnx.Linear(width, width, rngs=rngs)
        self.point_out = nnx.Linear(width, 3 * (self.n_bases + 1) + 1, kernel_init=small, rngs=rngs)
        self.frame_fc = nnx.Linear(width, width, rngs=rngs)
        self.frame_out = nnx.Linear(width, 9 + self.n_bases, kernel_init=small, rngs=rngs)

    def __call__(self, tracks) -> TracksOutput:
        tracks = check_tracks(tracks)
        dt = compute_dtype(tracks.dtype)
        tracks = tracks.astype(dt)
        t_len = tracks.shape[-3]
        vis = tracks[..., 2:3]
        xy = jnp.where(vis > 0, tracks[..., :2], 0.0)
        h = self.embed(jnp.concatenate([vis * _sincos(xy, self.n_freqs), vis], -1))       # [..., T, P, W]
        tcode = _sincos((jnp.arange(t_len, dtype=dt) / t_len)[:, None], 4)                 # [T, 9]
        h = h + self.time_embed(tcode)[:, None, :]
        for pb, tb in zip(self.point_blocks, self.time_blocks):
            h = pb(h)                                                                     # across points
            h = jnp.swapaxes(tb(jnp.swapaxes(h, -2, -3)), -2, -3)                          # across frames
        k1 = self.n_bases + 1
        pr = self.point_out(jax.nn.gelu(self.point_fc(jnp.mean(h, axis=-3))))             # [..., P, 3K+4]
        bases = pr[..., :3 * k1].reshape(*pr.shape[:-1], k1, 3)
        sigma = jax.nn.elu(pr[..., -1]) + 1.0 + 1e-4
        fr = self.frame_out(jax.nn.gelu(self.frame_fc(jnp.mean(h, axis=-2))))             # [..., T, 9+K]
        r6 = fr[..., :6] + jnp.asarray([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], dt)
        trans = fr[..., 6:9] + jnp.asarray([0.0, 0.0, -self.init_depth], dt)
        coeffs = jnp.concatenate([jnp.ones(fr.shape[:-1] + (1,), dt), fr[..., 9:]], -1)
        return TracksOutput(bases, coeffs, rotation_6d(r6), trans, sigma)


# -------------------------------------------------------------------------------------- synthetic scenes
class SyntheticTracks(NamedTuple):
    """A synthetic scene: ``tracks [T, P, 3]`` (exact projections, visibility 0/1) and its ground
    truth ``points [T, P, 3]``, ``bases [P, K+1, 3]``, ``coeffs [T, K+1]`` (``c_t0 = 1``),
    ``rotations [T, 3, 3]``, ``translations [T, 3]``, ``dynamic [P]`` (bool)."""
    tracks: jax.Array
    points: jax.Array
    bases: jax.Array
    coeffs: jax.Array
    rotations: jax.Array
    translations: jax.Array
    dynamic: jax.Array


def synthetic_tracks(key, n_frames: int = 16, n_points: int = 64, *, n_bases: int = 2,
                     dynamic_fraction: float = 0.25, motion_scale: float = 0.3, drop_prob: float = 0.1,
                     distance: tuple = (4.0, 6.0), sweep: float = 0.6, extent: float = 1.0) -> SyntheticTracks:
    """One random scene (``jax.vmap`` over keys for a batch).

    Points: static basis ``B_p0 ~ U[-extent, extent]^3``; the first ``round(dynamic_fraction P)``
    points are dynamic with ``B_pk ~ N(0, motion_scale^2)`` for ``k = 1..n_bases`` (0 for static
    points); coefficients ``c_tk = sin(2 pi f_k t / T + phi_k)``, ``f_k ~ U[0.5, 1.5]``,
    ``phi_k ~ U[0, 2 pi]`` (smooth, shared by the points). Camera: centre on a circle of radius
    ``U[*distance]`` around the origin at height ``U[-0.5, 0.5]``, azimuth sweeping ``sweep`` radians
    over the clip from a random start, looking at the origin (+z forward, the projection of
    :func:`project`). Visibility: each entry dropped with probability ``drop_prob``, and entries
    behind the camera or outside ``|x|, |y| <= 1`` are invisible. Tracks = exact projections
    (invisible entries keep their projection; every consumer masks them)."""
    key = check_key(key)
    n_frames = check_int(n_frames, "n_frames", low=1)
    n_points = check_int(n_points, "n_points", low=1)
    n_bases = check_int(n_bases, "n_bases", low=0)
    dynamic_fraction = check_float(dynamic_fraction, "dynamic_fraction", low=0.0, high=1.0)
    motion_scale = check_float(motion_scale, "motion_scale", low=0.0)
    drop_prob = check_float(drop_prob, "drop_prob", low=0.0, high=1.0, high_open=True)
    sweep = check_float(sweep, "sweep")
    extent = check_float(extent, "extent", low=0.0, low_open=True)
    if isinstance(distance, (str, bytes)) or not isinstance(distance, (tuple, list)) or len(distance) != 2:
        raise TypeError(f"distance must be a (low, high) tuple, got {distance!r}")
    d_lo, d_hi = (check_float(v, f"distance[{i}]", low=0.0, low_open=True) for i, v in enumerate(distance))
    if d_hi < d_lo:
        raise ValueError(f"distance must have low <= high, got {distance!r}")
    ks = jax.random.split(key, 9)
    t, p, k = n_frames, n_points, n_bases
    n_dyn = int(round(dynamic_fraction * p))
    dynamic = jnp.arange(p) < n_dyn
    b0 = jax.random.uniform(ks[0], (p, 1, 3), minval=-extent, maxval=extent)
    bk = motion_scale * jax.random.normal(ks[1], (p, k, 3)) * dynamic[:, None, None]
    bases = jnp.concatenate([b0, bk], 1)
    freq = jax.random.uniform(ks[2], (k,), minval=0.5, maxval=1.5)
    phase = jax.random.uniform(ks[3], (k,), minval=0.0, maxval=2 * jnp.pi)
    tt = jnp.arange(t, dtype=jnp.float32) / max(t, 1)
    coeffs = jnp.concatenate([jnp.ones((t, 1)), jnp.sin(2 * jnp.pi * tt[:, None] * freq + phase)], 1)
    points = trajectories(bases, coeffs)
    radius = jax.random.uniform(ks[4], (), minval=d_lo, maxval=d_hi)
    height = jax.random.uniform(ks[5], (), minval=-0.5, maxval=0.5)
    az = jax.random.uniform(ks[6], (), minval=0.0, maxval=2 * jnp.pi) + sweep * tt
    centres = jnp.stack([radius * jnp.sin(az), jnp.full_like(az, height), -radius * jnp.cos(az)], -1)
    fwd = -centres / jnp.linalg.norm(centres, axis=-1, keepdims=True)
    up = jnp.broadcast_to(jnp.asarray([0.0, -1.0, 0.0]), fwd.shape)        # image y points down
    right = jnp.cross(up, fwd)
    right = right / jnp.linalg.norm(right, axis=-1, keepdims=True)
    down = jnp.cross(fwd, right)
    rot = jnp.stack([right, down, fwd], -1)                                 # camera-to-world, det +1
    cam = world_to_camera(points, rot, centres)
    xy = project(cam)
    vis = (jax.random.uniform(ks[7], (t, p)) >= drop_prob) & (cam[..., 2] > 1e-2) & \
          jnp.all(jnp.abs(xy) <= 1.0, -1)
    tracks = jnp.concatenate([xy, vis[..., None].astype(xy.dtype)], -1)
    return SyntheticTracks(tracks, points, bases, coeffs, rot, centres, dynamic)
