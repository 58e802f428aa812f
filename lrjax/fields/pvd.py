"""Progressive volume distillation between any two field types: PVD (Fang et al. 2023, *One is
All: Bridging the Gap Between Neural Radiance Fields Architectures with Progressive Volume
Distillation*, AAAI) and its active-learning extension PVD-AL (Fang et al. 2023, *Progressive
Volume Distillation with Active Learning for Efficient NeRF Architecture Conversion*).

The teacher ``T`` (frozen) and the student ``S`` are evaluated on the *same* sample points ``x``
of the same rays (random cameras; no training images are needed). With the shared field outputs
of :class:`~lrjax.fields.fields.FieldOutput` (feature ``F = [s_pre, g]``, clipped log-density
``s_pre``, point colour ``c``, rendered colour ``C``), the block-wise schedule of PVD is::

    stage 1 (step < stage_steps[0]):  L = w_F(t) D(F_S, F_T)
    stage 2 (step < stage_steps[1]):  L = w_F(t) D(F_S, F_T) + w_s D(s_pre_S, s_pre_T) + w_c D(c_S, c_T)
    stage 3 (afterwards):             L = stage 2 + w_C D(C_S, C_T)

where ``w_F(t) = w_F decay^t`` (PVD multiplies the feature weight by 0.995 every step) and ``D``
is a mean square over the selected points/rays (``loss='mse'``) or, as in the official code's
``normL2``, the Frobenius norm of the difference (``loss='norm'``).

**Density range constraint.** Log-densities of both models are clipped to ``density_clip`` before
the exponential and the density loss is taken on the clipped *log* density (the paper's special
treatment of density: raw densities span orders of magnitude and would dominate a loss on
``sigma``; official code ``network.py``: clamp to ``[-2, 7]``, loss on ``sigma_pre``). Both fields
must therefore share ``density_clip`` (:func:`~lrjax.fields.fields.check_compatible`).

**Points.** PVD's CUDA ray marcher only evaluates points in occupied cells of the teacher's
occupancy grid, which the student inherits. This CPU implementation samples every ray uniformly,
so the colour and geometry-feature losses are restricted to *significant* samples
(``point_mask='weight'``: teacher or student compositing weight above ``weight_threshold``;
``'all'``: every sample), while the log-density (also the first feature channel) is compared at
every sample after raising both to ``density_floor``::

    D_sigma = mean_i ( max(s_pre_S, f) - max(s_pre_T, f) )^2

i.e. where the teacher is empty (below ``f``; ``exp(-4)`` gives alpha < 2e-3 per sample here) the
student only has to be empty too. This stands in for the teacher's occupancy grid: it teaches the
student empty space from stage 1 on without letting the huge, irrelevant spread of empty-space
log-densities dominate the loss. Options (not the paper): ``density_mask='points'`` takes the
density loss on the selected points only, and ``density_space='alpha'`` compares the per-sample
opacities ``1 - exp(-sigma delta)`` instead of log-densities (bounded, saturating inside objects, so
a low-rank student is not asked to match the teacher's interior or near-empty log-density values).

**Plenoxel (SH grid) pairs.** :class:`~lrjax.fields.plenoxels.SHGridField` has no MLP colour head
and its feature holds SH coefficients, so when teacher or student is one, the feature term keeps
only the log-density channel (the official code disables the feature stage for such pairs).

**Head inheritance.** The official code loads the teacher checkpoint into the student with
``strict=False``, which copies every same-shaped tensor, in particular the colour MLP that all
field types share. ``inherit_head=True`` does the same (the colour head is copied, then trained),
so the feature stage teaches the student the teacher's feature space.

**PVD-AL** (``active=ActiveConfig(...)``), three levels of teacher-student feedback:

* *rays*: each step the ``ray_ratio`` fraction of rays with the largest ``sum |C_S - C_T|`` enter
  a ring-buffer pool; once the pool holds ``min_pool`` rays, that fraction of every batch is drawn
  from the pool (official: top 10 %, pool ``4096 x 150``).
* *points*: on rays with teacher or student opacity ``>= 0.5``, only the top ``point_ratio`` (30 %)
  samples by compositing weight (union of teacher's and student's picks) carry point losses.
* *images*: a running error per camera of the pose pool; ``pose_ratio`` of the rays come from the
  worst ``pose_ratio`` cameras, orbited by a random rotation of up to ``pose_jitter`` rad about
  each axis (official: lowest-PSNR 10 % of poses, perturbed roll/pitch/yaw in ``U(+-pi/20)``; here
  the perturbation rotates the camera about the scene centre).

**Two modes, their costs.** *Ray mode* (:class:`PVD`, the paper's): per step ``batch_rays x
n_samples`` teacher and student queries on the samples of camera rays, plus compositing of both;
activation memory ``O(batch_rays n_samples (student + teacher width))``; it needs a camera pool and
supervises the rendered colour too. *Point mode* (:class:`PointDistill`, any-to-any conversion by
point queries): per step ``batch_points`` queries at points drawn from the teacher's occupied volume
(found once by an occupancy probe of ``occupancy_res^3 x occupancy_samples`` queries) and uniform
view directions, no compositing; memory ``O(batch_points x student width)``. The teacher may be any
traceable callable ``f(x, d) -> (sigma, rgb)``, not only an lrjax field. Point mode is PVD's
stage-2 loss at freely chosen points; it cannot see occlusion, so it teaches the whole occupied
volume (also hidden interiors) and relies on the clipped log-density floor for empty space.

Stages and weights where the paper is silent follow the official code (``megvii-research/
AAAI2023-PVD``, branches ``main`` and ``PVD-AL``); the defaults here are rescaled for the mean
square loss and short CPU runs and are documented on :class:`PVDConfig`.
"""
from __future__ import annotations

from dataclasses import dataclass, field as dc_field
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lrjax._validation import check_array, check_bool, check_choice, check_float, check_int
from lrjax.fields.fields import (Field, FieldOutput, _check_key, _check_variables, _pos_float, _pos_int,
                                 check_compatible, init_field)
from lrjax.fields.render import Rays, _check_poses, composite, near_far, stratified_samples

__all__ = ["ActiveConfig", "PVDConfig", "ALState", "PVDState", "PVD", "inherit_head", "stage_of",
           "PointConfig", "PointState", "PointDistill"]


@dataclass(frozen=True)
class ActiveConfig:
    """PVD-AL options (see module docstring). Set a ratio to 0 to switch that level off."""

    ray_ratio: float = 0.1
    pool_size: int = 16384
    min_pool: int = 2048
    point_ratio: float = 0.3
    point_min_acc: float = 0.5
    pose_ratio: float = 0.1
    pose_jitter: float = float(np.pi / 20)
    pose_ema: float = 0.9

    def __post_init__(self):
        for n in ("ray_ratio", "point_ratio", "pose_ratio", "point_min_acc"):
            check_float(getattr(self, n), n, low=0.0, high=1.0)
        check_float(self.pose_jitter, "pose_jitter", low=0.0, high=float(np.pi))
        check_float(self.pose_ema, "pose_ema", low=0.0, high=1.0, high_open=True)
        _pos_int(self.pool_size, "pool_size")
        _pos_int(self.min_pool, "min_pool")
        if self.min_pool > self.pool_size:
            raise ValueError(f"min_pool={self.min_pool} must be <= pool_size={self.pool_size}")


@dataclass(frozen=True)
class PVDConfig:
    """Distillation settings.

    stage_steps: ``(end of stage 1, end of stage 2)`` in steps (official default ``(2000, 5000)``
      of 30k; ``(0, 0)`` runs stage 3 only).
    w_feature, feature_decay: feature weight and its per-step decay (official 2e-3 x 0.995^t).
    w_sigma, w_color, w_rgb: log-density, point-colour and rendered-colour weights (official
      2e-3, 2e-3, 1 with the norm loss; with mean squares the point terms are rescaled to 0.1).
    loss: 'mse' or 'norm' (the official ``normL2``: Frobenius norm of the difference).
    point_mask: 'weight' or 'all' (see module docstring); weight_threshold for 'weight'.
    density_floor: log-densities below it count as empty in the density loss (see module docstring).
    density_mask: where the point density loss (and the density channel of the feature loss) is
      taken: 'floor' (default: every sample, both log-densities raised to ``density_floor``) or
      'points' (only the samples selected by ``point_mask`` / PVD-AL, like the colour loss).
    density_space: 'log' (default, the paper: clipped log-density ``s_pre``) or 'alpha' (the
      per-sample opacity ``1 - exp(-sigma delta)``, bounded in [0, 1]; ``density_floor`` unused);
      applies to the density channel of the feature loss too.
    batch_rays, n_samples: rays per step and stratified samples per ray.
    bg: background colour (white).
    inherit_head: copy the teacher's colour head into the student at :meth:`PVD.init`.
    active: :class:`ActiveConfig` to enable PVD-AL, or None.
    """

    stage_steps: tuple = (50, 150)
    w_feature: float = 0.1
    feature_decay: float = 0.995
    w_sigma: float = 0.1
    w_color: float = 0.1
    w_rgb: float = 1.0
    loss: str = "mse"
    point_mask: str = "weight"
    weight_threshold: float = 1e-4
    density_floor: float = -4.0
    density_mask: str = "floor"
    density_space: str = "log"
    batch_rays: int = 1024
    n_samples: int = 64
    bg: float = 1.0
    inherit_head: bool = True
    active: ActiveConfig | None = dc_field(default=None)

    def __post_init__(self):
        _check_stage_steps(self.stage_steps)
        check_choice(self.loss, "loss", ("mse", "norm"))
        check_choice(self.point_mask, "point_mask", ("weight", "all"))
        check_choice(self.density_mask, "density_mask", ("floor", "points"))
        check_choice(self.density_space, "density_space", ("log", "alpha"))
        _pos_int(self.batch_rays, "batch_rays")
        _pos_int(self.n_samples, "n_samples")
        for n in ("w_feature", "w_sigma", "w_color", "w_rgb"):
            check_float(getattr(self, n), n, low=0.0)
        check_float(self.feature_decay, "feature_decay", low=0.0, high=1.0, low_open=True)
        check_float(self.weight_threshold, "weight_threshold", low=0.0)
        check_float(self.density_floor, "density_floor")
        check_float(self.bg, "bg", low=0.0, high=1.0)
        check_bool(self.inherit_head, "inherit_head")
        if self.active is not None and not isinstance(self.active, ActiveConfig):
            raise TypeError(f"active must be an ActiveConfig or None, got {type(self.active).__name__}")


def _check_stage_steps(stage_steps):
    if isinstance(stage_steps, (str, bytes)) or not isinstance(stage_steps, (tuple, list)) or len(stage_steps) != 2:
        raise TypeError(f"stage_steps must be a pair (s1, s2) of ints, got {stage_steps!r}")
    s1 = check_int(stage_steps[0], "stage_steps[0]", low=0)
    s2 = check_int(stage_steps[1], "stage_steps[1]", low=0)
    if s1 > s2:
        raise ValueError(f"stage_steps must be two ints 0 <= s1 <= s2, got {tuple(stage_steps)!r}")
    return s1, s2


def stage_of(step: int, stage_steps) -> int:
    """1, 2 or 3 for a (Python int) step."""
    step = check_int(step, "step", low=0)
    stage_steps = _check_stage_steps(stage_steps)
    return 1 if step < stage_steps[0] else 2 if step < stage_steps[1] else 3


class ALState(NamedTuple):
    """PVD-AL buffers: hard-ray pool (origins, directions), its fill and write pointer, and a
    running error per camera of the pose pool."""

    pool_o: jax.Array
    pool_d: jax.Array
    size: jax.Array
    ptr: jax.Array
    pose_err: jax.Array


class PVDState(NamedTuple):
    params: dict
    opt_state: tuple
    step: jax.Array
    al: ALState


def inherit_head(teacher_params, student_params):
    """Copy every teacher colour-head tensor (``color_*``) whose shape matches into the student."""
    for v, nm in ((teacher_params, "teacher_params"), (student_params, "student_params")):
        if not isinstance(v, dict) or not isinstance(v.get("params"), dict):
            raise TypeError(f"{nm} must be a field's parameters {{'params': {{...}}}}, got {type(v).__name__}")
    tp, sp = teacher_params["params"], dict(student_params["params"])
    for k, v in tp.items():
        if k.startswith("color") and k in sp and jax.tree.map(jnp.shape, sp[k]) == jax.tree.map(jnp.shape, v):
            sp[k] = v
    return {**student_params, "params": sp}


def _init_student(student, key, student_params, teacher_params, inherit):
    """The student's initial parameters: checks ``key``, initialises ``student`` from it unless
    ``student_params`` are given (then checks them against ``student``), and copies the teacher's colour
    head into them when ``inherit`` and ``teacher_params`` is not None (see :func:`inherit_head`)."""
    _check_key(key)
    if student_params is None:
        student_params = init_field(student, key)
    else:
        _check_variables(student, student_params, "student_params")
    if teacher_params is not None and inherit:
        student_params = inherit_head(teacher_params, student_params)
    return student_params


_PROBE_RES = 16


def _check_teacher_finite(teacher: Field, teacher_params):
    """Refuse (ValueError) a Field teacher whose outputs are NaN/Inf at a probe of ``_PROBE_RES^3``
    jittered points, one per cell of a grid over ``[-bound, bound]^3`` (view direction +z); eager, on the
    concrete ``teacher_params``, like :class:`PointDistill`'s occupancy probe."""
    n, bd = _PROBE_RES, float(teacher.bound)
    cell = 2 * bd / n
    idx = jnp.stack(jnp.meshgrid(*(jnp.arange(n),) * 3, indexing="ij"), -1).reshape(-1, 3)
    x = -bd + (idx + jax.random.uniform(jax.random.key(0), idx.shape)) * cell
    d = jnp.broadcast_to(jnp.array([0.0, 0.0, 1.0]), x.shape)
    out = teacher.apply(teacher_params, x, d)
    if not bool(_outputs_finite(out.sigma, out.rgb, out.feature)):
        raise _nonfinite_teacher_error("probe", "teacher_params")


def _rotation(angles):
    cx, cy, cz = jnp.cos(angles)
    sx, sy, sz = jnp.sin(angles)
    rx = jnp.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = jnp.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = jnp.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _masked_mean(err, mask):
    return jnp.sum(err * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _masked_norm(err, mask):
    return jnp.sqrt(jnp.sum(err * mask) + 1e-12)


class PVD:
    """Distil ``teacher`` (with fixed ``teacher_params``) into ``student``.

    ``poses``: ``[P, 4, 4]`` camera pool the rays are drawn from (random poses around the scene;
    see :func:`~lrjax.fields.scenes.random_poses`), ``height``/``width``/``focal``: its pinhole camera.
    ``optimizer``: an optax transformation for the student. ``regularizer``: optional
    ``reg(student_params) -> scalar`` added to every stage's loss (official PVD: ``1e-4 *``
    :func:`~lrjax.fields.tensorf.l1_density` for a VM student), reported as the ``reg`` term.

    The teacher is probed once, eagerly, at ``16^3`` jittered points (one per cell of a grid over
    ``[-bound, bound]^3``); a NaN/Inf ``sigma``, ``rgb`` or ``feature`` there raises ``ValueError``
    naming ``teacher`` (as :class:`PointDistill`'s occupancy probe does).
    """

    def __init__(self, teacher: Field, teacher_params, student: Field, optimizer, *, poses, height: int,
                 width: int, focal: float, config: PVDConfig = PVDConfig(), regularizer=None):
        check_compatible(teacher, student)
        if regularizer is not None and not callable(regularizer):
            raise TypeError(f"regularizer must be a callable reg(student_params) -> scalar or None, "
                            f"got {type(regularizer).__name__}")
        if not (callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))):
            raise TypeError(f"optimizer must be an optax GradientTransformation, got {type(optimizer).__name__}")
        self.regularizer = regularizer
        _check_variables(teacher, teacher_params, "teacher_params")
        teacher_params = jax.tree.map(jnp.asarray, teacher_params)
        if not isinstance(config, PVDConfig):
            raise TypeError(f"config must be a PVDConfig, got {type(config).__name__}")
        poses = _check_poses(poses, "poses")
        _pos_int(height, "height")
        _pos_int(width, "width")
        _pos_float(focal, "focal")
        _check_teacher_finite(teacher, teacher_params)
        self.teacher, self.student, self.tparams = teacher, student, teacher_params
        self.optimizer, self.config = optimizer, config
        self.poses, self.height, self.width, self.focal = poses, height, width, float(focal)
        self._steps = {s: jax.jit(lambda st, k, s=s: self._step(st, k, s)) for s in (1, 2, 3)}

    # ------------------------------------------------------------------ state
    def init(self, key, student_params=None) -> PVDState:
        """Initial state; the student is freshly initialised unless ``student_params`` are given."""
        student_params = _init_student(self.student, key, student_params, self.tparams, self.config.inherit_head)
        ac = self.config.active
        n = ac.pool_size if ac is not None else 1
        al = ALState(jnp.zeros((n, 3)), jnp.zeros((n, 3)).at[:, 2].set(1.0), jnp.int32(0), jnp.int32(0),
                     jnp.zeros((self.poses.shape[0],)))
        return PVDState(student_params, self.optimizer.init(student_params), jnp.int32(0), al)

    # ------------------------------------------------------------------ rays
    def _camera_rays(self, key, c2w):
        """One random sub-pixel ray per camera in ``c2w: [B, 4, 4]``."""
        u = jax.random.uniform(key, (c2w.shape[0], 2))
        cam = jnp.stack([(u[:, 0] - 0.5) * self.width / self.focal, -(u[:, 1] - 0.5) * self.height / self.focal,
                         -jnp.ones(c2w.shape[0])], axis=-1)
        d = jnp.einsum("bij,bj->bi", c2w[:, :3, :3], cam)
        return c2w[:, :3, 3], d / jnp.linalg.norm(d, axis=-1, keepdims=True)

    def _sample_rays(self, key, al: ALState):
        cfg, ac = self.config, self.config.active
        b, npose = cfg.batch_rays, self.poses.shape[0]
        kp, kr, kh, kj, kpool = jax.random.split(key, 5)
        pidx = jax.random.randint(kp, (b,), 0, npose)
        c2w = self.poses[pidx]
        if ac is not None and ac.pose_ratio > 0:
            n_hard = max(1, int(round(ac.pose_ratio * npose)))
            hard = jnp.argsort(-al.pose_err)[:n_hard]
            k = max(1, int(round(ac.pose_ratio * b)))
            hp = hard[jax.random.randint(kh, (k,), 0, n_hard)]
            rot = jax.vmap(_rotation)(jax.random.uniform(kj, (k, 3), minval=-ac.pose_jitter,
                                                         maxval=ac.pose_jitter))
            pc = self.poses[hp]
            moved = jnp.concatenate([rot @ pc[:, :3, :3], (rot @ pc[:, :3, 3:4])], axis=-1)
            use = jnp.any(al.pose_err > 0)
            c2w = c2w.at[:k, :3, :4].set(jnp.where(use, moved, c2w[:k, :3, :4]))
            pidx = pidx.at[:k].set(jnp.where(use, hp, pidx[:k]))
        o, d = self._camera_rays(kr, c2w)
        if ac is not None and ac.ray_ratio > 0:
            k = max(1, int(round(ac.ray_ratio * b)))
            j = jax.random.randint(kpool, (k,), 0, jnp.maximum(al.size, 1))
            use = al.size >= ac.min_pool
            o = o.at[b - k:].set(jnp.where(use, al.pool_o[j], o[b - k:]))
            d = d.at[b - k:].set(jnp.where(use, al.pool_d[j], d[b - k:]))
            pidx = pidx.at[b - k:].set(jnp.where(use, -1, pidx[b - k:]))
        return Rays(o, d), pidx

    # ------------------------------------------------------------------ losses
    def _point_mask(self, wt, ws, acc_t, acc_s):
        cfg, ac = self.config, self.config.active
        if ac is not None and ac.point_ratio < 1.0:
            k = max(1, int(np.ceil(ac.point_ratio * wt.shape[-1])))
            kth_t = jax.lax.top_k(wt, k)[0][:, -1:]
            kth_s = jax.lax.top_k(ws, k)[0][:, -1:]
            sel = ((wt >= kth_t) & (acc_t[:, None] >= ac.point_min_acc)) | \
                  ((ws >= kth_s) & (acc_s[:, None] >= ac.point_min_acc))
            return sel.astype(jnp.float32)
        if cfg.point_mask == "all":
            return jnp.ones_like(wt)
        return ((wt > cfg.weight_threshold) | (ws > cfg.weight_threshold)).astype(jnp.float32)

    def losses(self, params, rays: Rays, key, stage: int, step):
        """Per-term losses (dict) and auxiliary outputs for the given rays and stage."""
        check_int(stage, "stage", low=1, high=3)
        cfg = self.config
        near, far, _ = near_far(rays, self.teacher.bound)
        z, delta = stratified_samples(key, near, far, cfg.n_samples, perturb=True)
        pts = jnp.clip(rays.origins[:, None] + z[..., None] * rays.directions[:, None],
                       -self.teacher.bound, self.teacher.bound)
        dirs = jnp.broadcast_to(rays.directions[:, None], pts.shape)
        t = jax.lax.stop_gradient(self.teacher.apply(self.tparams, pts, dirs))
        ct, acc_t, _, wt = composite(t.sigma, t.rgb, delta, bg=cfg.bg)
        s = self.student.apply(params, pts, dirs)
        cs, acc_s, _, ws = composite(s.sigma, s.rgb, delta, bg=cfg.bg)
        mask = self._point_mask(wt, jax.lax.stop_gradient(ws), acc_t, jax.lax.stop_gradient(acc_s))
        red = _masked_mean if cfg.loss == "mse" else _masked_norm
        nch = 1.0 if cfg.loss == "norm" else None
        terms = {}
        wf = cfg.w_feature * cfg.feature_decay ** step.astype(jnp.float32)
        if cfg.density_space == "alpha":
            dens = ((1.0 - jnp.exp(-s.sigma * delta)) - (1.0 - jnp.exp(-t.sigma * delta))) ** 2
        else:
            floor = cfg.density_floor
            dens = (jnp.maximum(s.sigma_pre, floor) - jnp.maximum(t.sigma_pre, floor)) ** 2
        everywhere = jnp.ones_like(mask) if cfg.density_mask == "floor" else mask
        nf = nch or s.feature.shape[-1]
        terms["feature"] = wf * red(dens, everywhere) / nf
        if self.teacher.has_color_head and self.student.has_color_head:
            geo = jnp.sum((s.feature[..., 1:] - t.feature[..., 1:]) ** 2, -1)
            terms["feature"] = terms["feature"] + wf * red(geo, mask) / nf
        if stage >= 2:
            terms["sigma"] = cfg.w_sigma * red(dens, everywhere)
            terms["color"] = cfg.w_color * red(jnp.sum((s.rgb - t.rgb) ** 2, -1) / (nch or 3.0), mask)
        if stage >= 3:
            ones = jnp.ones_like(acc_t)
            terms["rgb"] = cfg.w_rgb * red(jnp.sum((cs - ct) ** 2, -1) / (nch or 3.0), ones)
        if self.regularizer is not None:
            terms["reg"] = self.regularizer(params)
        ray_err = jnp.sum(jnp.abs(jax.lax.stop_gradient(cs) - ct), -1)
        return terms, {"ray_err": ray_err, "rgb_mse": jnp.mean((jax.lax.stop_gradient(cs) - ct) ** 2)}

    # ------------------------------------------------------------------ step
    def _step(self, state: PVDState, key, stage: int):
        kr, ks = jax.random.split(key)
        rays, pidx = self._sample_rays(kr, state.al)

        def total(p):
            terms, aux = self.losses(p, rays, ks, stage, state.step)
            return sum(terms.values()), (terms, aux)

        (loss, (terms, aux)), g = jax.value_and_grad(total, has_aux=True)(state.params)
        upd, opt_state = self.optimizer.update(g, state.opt_state, state.params)
        params = optax.apply_updates(state.params, upd)
        al = self._update_al(state.al, rays, pidx, aux["ray_err"])
        metrics = {"loss": loss, "rgb_mse": aux["rgb_mse"], **terms}
        return PVDState(params, opt_state, state.step + 1, al), metrics

    def _update_al(self, al: ALState, rays, pidx, err):
        ac = self.config.active
        if ac is None:
            return al
        if ac.ray_ratio > 0:
            k = max(1, int(round(ac.ray_ratio * err.shape[0])))
            _, top = jax.lax.top_k(err, k)
            slots = (al.ptr + jnp.arange(k)) % ac.pool_size
            al = al._replace(pool_o=al.pool_o.at[slots].set(rays.origins[top]),
                             pool_d=al.pool_d.at[slots].set(rays.directions[top]),
                             size=jnp.minimum(al.size + k, ac.pool_size), ptr=(al.ptr + k) % ac.pool_size)
        if ac.pose_ratio > 0:
            valid = pidx >= 0
            idx = jnp.where(valid, pidx, 0)
            n = al.pose_err.shape[0]
            s = jnp.zeros(n).at[idx].add(jnp.where(valid, err, 0.0))
            c = jnp.zeros(n).at[idx].add(valid.astype(jnp.float32))
            seen = c > 0
            new = jnp.where(seen, ac.pose_ema * al.pose_err + (1 - ac.pose_ema) * s / jnp.maximum(c, 1), al.pose_err)
            al = al._replace(pose_err=new)
        return al

    def _check_state(self, state, key):
        if not isinstance(state, PVDState):
            raise TypeError(f"state must be the PVDState returned by PVD.init / PVD.step, got {type(state).__name__}")
        _check_key(key)

    def compile(self, state: PVDState, key):
        """Compile (and discard one run of) every stage's step, so that timing excludes compilation."""
        self._check_state(state, key)
        for s in (1, 2, 3):
            jax.block_until_ready(self._steps[s](state, key))

    def step(self, state: PVDState, key):
        """One jitted distillation step at the stage of ``state.step``: ``(state, metrics)``."""
        self._check_state(state, key)
        stage = stage_of(int(state.step), self.config.stage_steps)
        return self._steps[stage](state, key)


# =========================================================================== point-query distillation
@dataclass(frozen=True)
class PointConfig:
    """Settings of :class:`PointDistill` (point-query distillation; see its docstring).

    batch_points: points (teacher queries) per step.
    occupied_ratio: fraction of each batch drawn inside the teacher's occupied cells (the rest is
      uniform in the box, which teaches the student empty space).
    occupancy_res, occupancy_samples, occupancy_threshold: the one-off occupancy probe: the teacher
      is queried at ``occupancy_samples`` jittered points per cell of an ``occupancy_res^3`` grid; a
      cell is occupied when its largest density is ``>= occupancy_threshold``; the mask is then
      dilated by one cell (surfaces between probe points).
    w_feature, w_sigma, w_color: weights of the geometry-feature term (only with a Field teacher
      whose colour head the student shares), the log-density term and the point-colour term.
    density_floor: log-densities below it count as empty (both raised to it, as in :class:`PVDConfig`);
      point colours and features are compared only where the teacher is above it. Must be below the
      student's ``density_clip`` maximum (else every loss is 0; :class:`PointDistill` raises ValueError).
    active_ratio, pool_size, min_pool, pool_jitter: point-level active learning (PVD-AL's "point"
      level moved to point queries): the ``active_ratio`` fraction of each batch with the largest
      error enters a ring pool; once it holds ``min_pool`` points, that fraction of every batch is
      re-drawn from the pool, moved by ``N(0, (pool_jitter * cell)^2)``. ``active_ratio=0``: off.
    inherit_head: copy the teacher's colour head into the student (Field teachers only). A student
      whose colour head differs in shape (e.g. another ``color_hidden``) is refused with ValueError;
      with ``inherit_head=False`` such a pair trains without the feature term.
    """

    batch_points: int = 16384
    occupied_ratio: float = 0.75
    occupancy_res: int = 32
    occupancy_samples: int = 2
    occupancy_threshold: float = 0.5
    w_feature: float = 1.0
    w_sigma: float = 1.0
    w_color: float = 1.0
    density_floor: float = -4.0
    active_ratio: float = 0.0
    pool_size: int = 65536
    min_pool: int = 8192
    pool_jitter: float = 0.5
    inherit_head: bool = True

    def __post_init__(self):
        _pos_int(self.batch_points, "batch_points")
        check_float(self.occupied_ratio, "occupied_ratio", low=0.0, high=1.0)
        _pos_int(self.occupancy_res, "occupancy_res")
        _pos_int(self.occupancy_samples, "occupancy_samples")
        check_float(self.occupancy_threshold, "occupancy_threshold", low=0.0)
        for n in ("w_feature", "w_sigma", "w_color"):
            check_float(getattr(self, n), n, low=0.0)
        check_float(self.density_floor, "density_floor")
        check_float(self.active_ratio, "active_ratio", low=0.0, high=1.0, high_open=True)
        _pos_int(self.pool_size, "pool_size")
        _pos_int(self.min_pool, "min_pool")
        if self.min_pool > self.pool_size:
            raise ValueError(f"min_pool={self.min_pool} must be <= pool_size={self.pool_size}")
        check_float(self.pool_jitter, "pool_jitter", low=0.0)
        check_bool(self.inherit_head, "inherit_head")


class PointState(NamedTuple):
    """Student parameters, optimiser state, step and the hard-point pool ``[pool_size, 3]`` (a dummy
    ``[1, 3]`` when active learning is off, ``active_ratio=0``), with its fill ``size`` and write ``ptr``."""

    params: dict
    opt_state: tuple
    step: jax.Array
    pool: jax.Array
    size: jax.Array
    ptr: jax.Array


def _teacher_outputs(out, n_shape, where="teacher"):
    """``(sigma [...], rgb [..., 3], feature or None)`` from a teacher's return value."""
    if isinstance(out, FieldOutput):
        return out.sigma, out.rgb, out.feature
    if isinstance(out, (tuple, list)) and len(out) == 2:
        return out[0], out[1], None
    raise TypeError(f"{where} must return (sigma, rgb) (or a FieldOutput), got {type(out).__name__}"
                    + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else ""))


def _outputs_finite(sigma, rgb, feat):
    """Scalar bool: every teacher output (``feat`` may be None) is finite."""
    ok = jnp.all(jnp.isfinite(sigma)) & jnp.all(jnp.isfinite(rgb))
    if feat is not None:
        ok = ok & jnp.all(jnp.isfinite(feat))
    return ok


def _nonfinite_teacher_error(where, fix):
    return ValueError(f"teacher returned NaN or Inf (sigma, rgb or feature) at some {where} points in "
                      f"[-bound, bound]^3; distilling it would train on loss=nan: fix the {fix} so it is finite "
                      "everywhere in the box")


def _check_teacher_fn(fn, name="teacher"):
    """Trace ``fn`` once on 4 points and refuse wrong kinds/shapes (eagerly, naming ``teacher``)."""
    x = jax.ShapeDtypeStruct((4, 3), jnp.float32)
    try:
        out = jax.eval_shape(fn, x, x)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a traceable callable f(x [N, 3], d [N, 3]) -> (sigma [N], rgb [N, 3]); "
                        f"calling it on [4, 3] inputs failed: {e}") from None
    sigma, rgb, _ = _teacher_outputs(out, (4,), name)
    for v, nm, shape in ((sigma, "sigma", (4,)), (rgb, "rgb", (4, 3))):
        if not hasattr(v, "shape") or not hasattr(v, "dtype"):
            raise TypeError(f"{name} must return arrays (sigma [N], rgb [N, 3]); its {nm} is a {type(v).__name__}")
        if tuple(v.shape) != shape:
            raise ValueError(f"{name} must return sigma [N] and rgb [N, 3] for x [N, 3]; for N=4 its {nm} has "
                             f"shape {tuple(v.shape)}, expected {shape}")
        if not jnp.issubdtype(v.dtype, jnp.floating):
            raise TypeError(f"{name} must return floating-point {nm}, got {v.dtype}")


class PointDistill:
    r"""Point-query distillation of any teacher into a field ``student`` (PVD's any-to-any conversion
    without cameras or rays).

    ``teacher`` is either an :class:`~lrjax.fields.fields.Field` with ``teacher_params``, or any
    traceable callable ``f(x: [N, 3], d: [N, 3]) -> (sigma [N], rgb [N, 3])`` (a FieldOutput is
    accepted too), so models from elsewhere can be converted. Each step draws ``batch_points`` points
    ``x`` -- the ``occupied_ratio`` fraction uniformly inside the cells of the teacher's occupancy
    grid (built once, :meth:`occupancy`), the rest uniformly in ``[-bound, bound]^3`` -- and unit view
    directions ``d`` uniform on the sphere, then minimises (mean squares over the points; ``O`` = the
    points where the teacher's log-density exceeds the floor ``f``)::

        L = w_s mean_x (max(s_S(x), f) - max(s_T(x), f))^2
          + w_c mean_{x in O} |c_S(x, d) - c_T(x, d)|^2 / 3
          + w_F mean_{x in O} |g_S(x) - g_T(x)|^2 / geo_dim        (Field teacher sharing the head)
          + reg(params)

    with ``s = clip(log sigma, density_clip)`` of the *student's* ``density_clip`` (PVD's density
    range constraint and log-domain density loss, official ``network.py``). This is PVD's stage-2
    loss (features, point density, point colour) evaluated at freely drawn points instead of at the
    samples of camera rays, so it needs no poses, no compositing and no stage schedule.

    **Costs per step** (Q = teacher queries; memory = activations kept for the backward pass):

    * ray mode (:class:`PVD`): ``Q = batch_rays * n_samples`` teacher and student queries plus
      compositing of both; memory ``O(batch_rays * n_samples * (student width + teacher width))``;
      supervision falls on samples along camera rays (most of them in empty space without an
      occupancy grid), and the rendered-colour loss ties the student to what cameras see.
    * point mode (this class): ``Q = batch_points`` teacher and student queries, no compositing;
      memory ``O(batch_points * student width)`` (the teacher runs without gradients); once,
      ``occupancy_res^3 * occupancy_samples`` teacher queries for the occupancy probe and an
      ``occupancy_res^3`` boolean mask. Points concentrate where the teacher is occupied, so a
      step's queries are spent where the image is made.

    Point mode reproduces the teacher wherever the student can represent it: a student of the same
    family and resolution as a grid teacher (or a dense grid for a VM/CP teacher of the same
    resolution, whose interpolants are trilinear on each cell) is driven to the teacher to float
    tolerance. It does not see occlusion, so a student with too little capacity spends it
    uniformly over the occupied volume rather than on visible surfaces.

    ``optimizer``: an optax transformation. ``regularizer``: optional ``reg(student_params) -> scalar``
    (a floating scalar; anything else raises TypeError at :meth:`init`). ``key``: the occupancy probe's
    PRNG key (default None = ``jax.random.key(0)``).

    A callable teacher's ``sigma`` is checked for shape and finiteness only (on the occupancy probe,
    which refuses NaN/Inf in any output with ValueError naming ``teacher``); a negative ``sigma`` reads
    as empty (log-density floored). A Field teacher must be compatible with the student
    (:func:`~lrjax.fields.fields.check_compatible`: e.g. the same ``geo_dim`` when both have a colour
    head) even with ``inherit_head=False``; to distil across differing feature sizes, pass the teacher
    as a callable ``lambda x, d: teacher.apply(teacher_params, x, d)`` (no feature term then).

    Raises ``TypeError`` for a teacher that is not a Field/callable or returns non-arrays, and
    ``ValueError`` for wrong output shapes, a non-finite teacher output, a mismatched Field pair,
    ``density_floor`` not below the student's clip maximum or an un-inheritable colour head.
    """

    def __init__(self, teacher, student: Field, optimizer, *, teacher_params=None,
                 config: PointConfig = PointConfig(), regularizer=None, key=None):
        if not isinstance(student, Field):
            raise TypeError(f"student must be an lrjax.fields Field instance, got {type(student).__name__}")
        if not isinstance(config, PointConfig):
            raise TypeError(f"config must be a PointConfig, got {type(config).__name__}")
        if not (callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))):
            raise TypeError(f"optimizer must be an optax GradientTransformation, got {type(optimizer).__name__}")
        if regularizer is not None and not callable(regularizer):
            raise TypeError(f"regularizer must be a callable reg(student_params) -> scalar or None, "
                            f"got {type(regularizer).__name__}")
        if isinstance(teacher, Field):
            check_compatible(teacher, student)
            if teacher_params is None:
                raise TypeError("teacher_params is required when teacher is a Field (its parameters from init_field)")
            _check_variables(teacher, teacher_params, "teacher_params")
            tparams = jax.tree.map(jnp.asarray, teacher_params)
            self.tparams = tparams
            self._tfn = lambda x, d: teacher.apply(tparams, x, d)
            self.use_features = teacher.has_color_head and student.has_color_head
        else:
            if not callable(teacher):
                raise TypeError(f"teacher must be a Field or a callable f(x, d) -> (sigma, rgb), "
                                f"got {type(teacher).__name__}")
            if teacher_params is not None:
                raise TypeError("teacher_params is only for a Field teacher; close a callable teacher over "
                                "its own parameters")
            _check_teacher_fn(teacher)
            self.tparams = None
            self._tfn = teacher
            self.use_features = False
        self.teacher, self.student, self.optimizer, self.config = teacher, student, optimizer, config
        lo, hi = student.density_clip
        if not config.density_floor < hi:
            raise ValueError(f"config.density_floor={config.density_floor} must be below the student's density_clip "
                             f"maximum {hi} (log-densities are clipped to density_clip={tuple(student.density_clip)}, "
                             "so every point would count as empty and every loss would be 0): lower density_floor")
        if self.tparams is not None and self.use_features:
            sshape = jax.eval_shape(lambda: init_field(student, jax.random.key(0)))["params"]
            tshape = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tparams["params"])
            bad = [k for k in tshape if k.startswith("color")
                   and (k not in sshape or jax.tree.map(jnp.shape, sshape[k]) != jax.tree.map(jnp.shape, tshape[k]))]
            if bad:
                if config.inherit_head:
                    raise ValueError(f"inherit_head=True but the student's colour head differs from the teacher's "
                                     f"(mismatched {', '.join(sorted(bad))}, e.g. a different color_hidden): the head "
                                     "cannot be copied and the feature term would compare unrelated feature spaces; "
                                     "give the student the teacher's head sizes or set PointConfig(inherit_head=False) "
                                     "(then the feature term is skipped)")
                self.use_features = False                   # heads not shared: no feature term
        self.regularizer = regularizer
        self.bound = float(student.bound)
        key = jax.random.key(0) if key is None else _check_key(key)
        self.occupied = self._probe(key)                     # flat indices of occupied cells (numpy)
        self._step_fn = jax.jit(self._step)

    # ------------------------------------------------------------------ occupancy
    def _teacher(self, x, d):
        sigma, rgb, feat = _teacher_outputs(self._tfn(x, d), x.shape[:-1])
        lo, hi = self.student.density_clip
        s = jnp.clip(jnp.log(jnp.maximum(sigma.astype(jnp.float32), 1e-30)), lo, hi)
        return s, rgb.astype(jnp.float32), feat

    def _probe(self, key):
        cfg, n = self.config, self.config.occupancy_res
        cell = 2 * self.bound / n
        idx = jnp.stack(jnp.meshgrid(*(jnp.arange(n),) * 3, indexing="ij"), -1).reshape(-1, 3)
        base = -self.bound + idx * cell

        @jax.jit
        def dens(k):
            x = base + jax.random.uniform(k, base.shape) * cell
            d = jnp.broadcast_to(jnp.array([0.0, 0.0, 1.0]), x.shape)
            ok = _outputs_finite(*_teacher_outputs(self._tfn(x, d), x.shape[:-1]))
            return jax.lax.stop_gradient(self._teacher(x, d)[0]), ok

        outs = [dens(k) for k in jax.random.split(key, cfg.occupancy_samples)]
        if not all(bool(ok) for _, ok in outs):
            raise _nonfinite_teacher_error("occupancy-probe", "teacher (or its teacher_params)")
        smax = np.max([np.asarray(s_) for s_, _ in outs], axis=0)
        occ = (np.exp(smax) >= cfg.occupancy_threshold).reshape(n, n, n)
        for ax in range(3):                                   # dilate by one cell: separable 3x3x3 max
            occ = occ | (np.roll(occ, 1, ax) & _not_wrapped(n, ax, 1)) | (np.roll(occ, -1, ax) & _not_wrapped(n, ax, -1))
        return np.flatnonzero(occ).astype(np.int32)

    def occupancy(self):
        """Boolean ``[R, R, R]`` occupancy mask of the teacher used for sampling (R = occupancy_res)."""
        n = self.config.occupancy_res
        m = np.zeros(n ** 3, bool)
        m[self.occupied] = True
        return m.reshape(n, n, n)

    # ------------------------------------------------------------------ sampling
    def sample_points(self, key, state: PointState | None = None, num: int | None = None):
        """``(x [B, 3], d [B, 3])`` of one step (B = ``num`` or batch_points; the hard-point pool of
        ``state`` is used when active learning is on)."""
        if not (isinstance(key, jax.core.Tracer) or _is_typed_key(key)):
            _check_key(key)
        cfg, bd = self.config, self.bound
        b = cfg.batch_points if num is None else check_int(num, "num", low=1)
        n = cfg.occupancy_res
        cell = 2 * bd / n
        ko, kj, ku, kd, kp, kq = jax.random.split(key, 6)
        n_occ = int(round(cfg.occupied_ratio * b)) if self.occupied.size else 0
        x = jax.random.uniform(ku, (b, 3), minval=-bd, maxval=bd)
        if n_occ:
            occ = jnp.asarray(self.occupied)
            c = occ[jax.random.randint(ko, (n_occ,), 0, occ.shape[0])]
            ijk = jnp.stack([c // (n * n), (c // n) % n, c % n], -1)
            x = x.at[:n_occ].set(-bd + (ijk + jax.random.uniform(kj, (n_occ, 3))) * cell)
        if state is not None and cfg.active_ratio > 0:
            k = max(1, int(round(cfg.active_ratio * b)))
            j = jax.random.randint(kp, (k,), 0, jnp.maximum(state.size, 1))
            moved = jnp.clip(state.pool[j] + cfg.pool_jitter * cell * jax.random.normal(kq, (k, 3)), -bd, bd)
            x = x.at[b - k:].set(jnp.where(state.size >= cfg.min_pool, moved, x[b - k:]))
        d = jax.random.normal(kd, (b, 3))
        d = d / jnp.maximum(jnp.linalg.norm(d, axis=-1, keepdims=True), 1e-12)
        return jnp.clip(x, -bd, bd), d

    # ------------------------------------------------------------------ state / losses / step
    def init(self, key, student_params=None) -> PointState:
        """Initial state; the student is freshly initialised unless ``student_params`` are given."""
        student_params = _init_student(self.student, key, student_params, self.tparams, self.config.inherit_head)
        if self.regularizer is not None:
            r = jax.eval_shape(self.regularizer, student_params)
            if not (hasattr(r, "shape") and r.shape == () and jnp.issubdtype(r.dtype, jnp.floating)):
                raise TypeError(f"regularizer must return a floating scalar reg(student_params) -> [], got "
                                f"{getattr(r, 'shape', type(r).__name__)} {getattr(r, 'dtype', '')}")
        n = self.config.pool_size if self.config.active_ratio > 0 else 1
        return PointState(student_params, self.optimizer.init(student_params), jnp.int32(0),
                          jnp.zeros((n, 3)), jnp.int32(0), jnp.int32(0))

    def losses(self, params, x, d):
        """Per-term losses (dict) and the per-point error ``[B]`` at points ``x`` ``[B, 3]`` / directions
        ``d`` ``[B, 3]`` (floating, B >= 1). Raises TypeError for a non-floating ``x``/``d`` and ValueError
        for other shapes."""
        cfg = self.config
        for v, nm in ((x, "x"), (d, "d")):
            check_array(v, nm, kind="floating")
            if v.ndim != 2 or v.shape[-1] != 3 or v.shape[0] < 1:
                raise ValueError(f"{nm} must have shape [B, 3] with B >= 1 points, got {tuple(v.shape)}")
        if x.shape != d.shape:
            raise ValueError(f"x and d must have the same shape [B, 3], got x {tuple(x.shape)} and d {tuple(d.shape)}")
        ts, trgb, tfeat = jax.tree.map(jax.lax.stop_gradient, self._teacher(x, d))
        s = self.student.apply(params, x, d if self.student.view_dependent else None)
        f = cfg.density_floor
        dens = (jnp.maximum(s.sigma_pre, f) - jnp.maximum(ts, f)) ** 2
        occ = (ts > f).astype(jnp.float32)
        col = jnp.sum((s.rgb - trgb) ** 2, -1) / 3.0
        terms = {"sigma": cfg.w_sigma * jnp.mean(dens), "color": cfg.w_color * _masked_mean(col, occ)}
        err = dens + occ * col
        if self.use_features and tfeat is not None:
            geo = jnp.sum((s.feature[..., 1:] - tfeat[..., 1:]) ** 2, -1) / max(1, s.feature.shape[-1] - 1)
            terms["feature"] = cfg.w_feature * _masked_mean(geo, occ)
            err = err + occ * geo
        if self.regularizer is not None:
            terms["reg"] = self.regularizer(params)
        return terms, err

    def _step(self, state: PointState, key):
        cfg = self.config
        x, d = self.sample_points(key, state)

        def total(p):
            terms, err = self.losses(p, x, d)
            return sum(terms.values()), (terms, err)

        (loss, (terms, err)), g = jax.value_and_grad(total, has_aux=True)(state.params)
        upd, opt_state = self.optimizer.update(g, state.opt_state, state.params)
        params = optax.apply_updates(state.params, upd)
        pool, size, ptr = state.pool, state.size, state.ptr
        if cfg.active_ratio > 0:
            k = max(1, int(round(cfg.active_ratio * x.shape[0])))
            _, top = jax.lax.top_k(err, k)
            slots = (ptr + jnp.arange(k)) % cfg.pool_size
            pool = pool.at[slots].set(x[top])
            size, ptr = jnp.minimum(size + k, cfg.pool_size), (ptr + k) % cfg.pool_size
        return PointState(params, opt_state, state.step + 1, pool, size, ptr), {"loss": loss, **terms}

    def step(self, state: PointState, key):
        """One jitted distillation step: ``(state, metrics)``."""
        if not isinstance(state, PointState):
            raise TypeError(f"state must be the PointState returned by PointDistill.init / step, "
                            f"got {type(state).__name__}")
        if not _is_typed_key(key):                     # the full check costs ~ms of eager work per step
            _check_key(key)
        return self._step_fn(state, key)

    def point_error(self, params, key, num: int = 4096):
        """Largest ``|s_S - s_T|`` (log-density, both clipped) and ``|c_S - c_T|`` over ``num`` points of
        the sampling distribution (no floor, no mask): ``{'sigma_pre': float, 'rgb': float}``."""
        _check_key(key)
        num = _pos_int(num, "num")
        _check_variables(self.student, params, "params")
        x, d = self.sample_points(key, num=num)
        ts, trgb, _ = self._teacher(x, d)
        s = self.student.apply(params, x, d if self.student.view_dependent else None)
        return {"sigma_pre": float(jnp.max(jnp.abs(s.sigma_pre - ts))),
                "rgb": float(jnp.max(jnp.abs(s.rgb - trgb)))}


def _is_typed_key(key):
    return (isinstance(key, jax.Array) and not isinstance(key, jax.core.Tracer) and key.shape == ()
            and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key))


def _not_wrapped(n, axis, shift):
    """Mask that drops the slice ``np.roll`` wrapped around on ``axis``."""
    m = np.ones((n, n, n), bool)
    sl = [slice(None)] * 3
    sl[axis] = 0 if shift > 0 else n - 1
    m[tuple(sl)] = False
    return m
