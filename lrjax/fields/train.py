"""Training a field on posed images (the "from scratch" baseline of PVD) and evaluating it.

Photometric loss over a random batch of training rays (NeRF, Mildenhall et al. 2020)::

    L(theta) = mean_r || C_theta(r) - C_gt(r) ||^2

with stratified samples (``perturb=True``), Adam ``(0.9, 0.99, eps=1e-15)`` (Instant-NGP / PVD)
and an exponential learning-rate decay to ``final_ratio`` of the initial rate (TensoRF decays to
0.1x). :func:`train_loop` times only the optimisation steps (each ``block_until_ready``) and
evaluates test PSNR every ``eval_every`` steps, stopping once a target PSNR is reached.
"""
from __future__ import annotations

import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lrjax._validation import check_bool, check_float
from lrjax.fields.fields import Field, _array, _check_key, _pos_float, _pos_int
from lrjax.fields.metrics import psnr, ssim
from lrjax.fields.render import Rays, _check_poses, pinhole_rays, render_rays
from lrjax.fields.scenes import SceneData, dataset_rays

__all__ = ["make_optimizer", "default_lr", "make_photometric_step", "render_views", "make_evaluator",
           "LoopResult", "train_loop", "photometric_state_step"]


def make_optimizer(lr: float, steps: int, final_ratio: float = 0.1):
    """Adam(0.9, 0.99, eps 1e-15) with ``lr`` decayed exponentially to ``final_ratio * lr``."""
    _pos_float(lr, "lr")
    _pos_int(steps, "steps")
    check_float(final_ratio, "final_ratio", low=0.0, high=1.0, low_open=True)
    sched = optax.exponential_decay(lr, transition_steps=steps, decay_rate=final_ratio)
    return optax.adam(sched, b1=0.9, b2=0.99, eps=1e-15)


def _check_field(field, name="field"):
    if not isinstance(field, Field):
        raise TypeError(f"{name} must be an lrjax.fields Field (e.g. GridField()), got {type(field).__name__}")
    return field


def _check_optimizer(optimizer, name="optimizer"):
    if not (callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))):
        raise TypeError(f"{name} must be an optax GradientTransformation (e.g. make_optimizer(lr, steps)), "
                        f"got {type(optimizer).__name__}")
    return optimizer


def _check_bg(bg):
    if isinstance(bg, (bool, np.bool_, str)) or bg is None:
        raise TypeError(f"bg must be a number in [0, 1] or an RGB triple, got {bg!r}")
    b = _array(bg, "bg", convert=True, kind="numeric")
    if b.shape not in ((), (3,)):
        raise ValueError(f"bg must be a scalar or a [3] colour, got shape {tuple(b.shape)}")
    return bg


def _check_callable(fn, name, what):
    if not callable(fn):
        raise TypeError(f"{name} must be a callable {what}, got {type(fn).__name__}")
    return fn


def default_lr(field: Field) -> float:
    """Per-type learning rates: grids/tensors 2e-2, hash 1e-2, MLP 2e-3 (PVD scales MLP by 0.1)."""
    from lrjax.fields.fields import MLPField
    from lrjax.fields.hashgrid import HashGridField
    _check_field(field)
    if isinstance(field, MLPField):
        return 2e-3
    if isinstance(field, HashGridField):
        return 1e-2
    return 2e-2


def make_photometric_step(field: Field, optimizer, *, batch: int = 1024, n_samples: int = 64,
                          bg=1.0, regularizer: Callable | None = None) -> Callable:
    """``step(params, opt_state, key, origins, directions, targets) -> (params, opt_state, loss)``.

    ``regularizer``: optional ``reg(params) -> scalar`` added to the loss, e.g. TensoRF's
    ``lambda p: 8e-5 * l1_density(field, p) + 1e-2 * tv_loss(field, p)``.
    """
    _check_field(field)
    _check_optimizer(optimizer)
    _pos_int(batch, "batch")
    _pos_int(n_samples, "n_samples")
    _check_bg(bg)
    if regularizer is not None and not callable(regularizer):
        raise TypeError(f"regularizer must be a callable reg(params) -> scalar or None, "
                        f"got {type(regularizer).__name__}")

    @jax.jit
    def step(params, opt_state, key, origins, directions, targets):
        k1, k2 = jax.random.split(key)
        idx = jax.random.randint(k1, (batch,), 0, origins.shape[0])
        rays = Rays(origins[idx], directions[idx])

        def loss_fn(p):
            out = render_rays(lambda x, d: field.apply(p, x, d), rays, bound=field.bound,
                              n_samples=n_samples, key=k2, perturb=True, bg=bg)
            loss = jnp.mean((out.rgb - targets[idx]) ** 2)
            return loss if regularizer is None else loss + regularizer(p)

        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt_state = optimizer.update(g, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, loss

    return step


def render_views(apply_fn: Callable, poses, height: int, width: int, focal: float, *, bound: float = 1.0,
                 n_samples: int = 64, bg=1.0):
    """Render ``[V, H, W, 3]`` images (midpoint samples) of ``apply_fn`` (traceable; one view at a time).

    ``poses``: ``[V, 4, 4]`` (or ``[V, 3, 4]``) camera-to-world matrices."""
    _check_callable(apply_fn, "apply_fn", "(x, d) -> FieldOutput")
    poses = _check_poses(poses, "poses")
    _pos_int(height, "height")
    _pos_int(width, "width")
    _pos_float(bound, "bound")
    _pos_int(n_samples, "n_samples")
    def one(c2w):
        rays = pinhole_rays(c2w, height, width, focal)
        return render_rays(apply_fn, rays, bound=bound, n_samples=n_samples, bg=bg).rgb.reshape(height, width, 3)
    return jax.lax.map(one, jnp.asarray(poses))


def make_evaluator(field: Field, data: SceneData, *, n_samples: int = 64, with_ssim: bool = False):
    """``evaluate(params) -> {'psnr': float[, 'ssim': float]}`` on the test views of ``data``."""
    _check_field(field)
    if not isinstance(data, SceneData):
        raise TypeError(f"data must be a SceneData (from make_dataset), got {type(data).__name__}")
    _pos_int(n_samples, "n_samples")
    check_bool(with_ssim, "with_ssim")
    @jax.jit
    def render(params):
        return render_views(lambda x, d: field.apply(params, x, d), data.test_poses, data.height,
                            data.width, data.focal, bound=data.bound, n_samples=n_samples)

    def evaluate(params, return_images=False):
        check_bool(return_images, "return_images")
        imgs = render(params)
        res = {"psnr": float(psnr(imgs, data.test_images))}
        if with_ssim:
            res["ssim"] = float(ssim(imgs, data.test_images))
        if return_images:
            res["images"] = imgs
        return res

    return evaluate


class LoopResult(NamedTuple):
    """``history``: list of ``(step, train_seconds, psnr)``; ``steps_to_target`` / ``seconds_to_target``
    are None if the target was not reached; ``step_times``: per-step seconds."""

    state: tuple
    history: list
    steps_to_target: int | None
    seconds_to_target: float | None
    step_times: list


def train_loop(step: Callable, state: tuple, *, steps: int, key, evaluate: Callable, params_of: Callable,
               eval_every: int = 50, target_psnr: float | None = None, progress: bool = False,
               desc: str = "train") -> LoopResult:
    """Run ``state = step(*state, key_i)`` for up to ``steps`` steps (the first call is a warm-up
    compile, excluded from timing); evaluate ``evaluate(params_of(state))`` every ``eval_every``."""
    _check_callable(step, "step", "(*state, key) -> state")
    if not isinstance(state, tuple):
        raise TypeError(f"state must be a tuple (the arguments of step before the key), got {type(state).__name__}")
    _pos_int(steps, "steps")
    _check_key(key)
    _check_callable(evaluate, "evaluate", "(params) -> {'psnr': ...}")
    _check_callable(params_of, "params_of", "(state) -> params")
    _pos_int(eval_every, "eval_every")
    check_float(target_psnr, "target_psnr", allow_none=True)
    check_bool(progress, "progress")
    if not isinstance(desc, str):
        raise TypeError(f"desc must be a str, got {type(desc).__name__}")
    keys = jax.random.split(key, steps + 1)
    jax.block_until_ready(step(*state, keys[-1]))                        # compile / warm-up
    history, times, total = [], [], 0.0
    hit_steps = hit_secs = None
    it = range(1, steps + 1)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=desc, leave=False)
    for i in it:
        t0 = time.perf_counter()
        state = step(*state, keys[i - 1])
        jax.block_until_ready(state)
        dt = time.perf_counter() - t0
        times.append(dt)
        total += dt
        if i % eval_every == 0 or i == steps:
            p = evaluate(params_of(state))["psnr"]
            history.append((i, total, p))
            if target_psnr is not None and p >= target_psnr:
                hit_steps, hit_secs = i, total
                break
    return LoopResult(state, history, hit_steps, hit_secs, times)


def photometric_state_step(field, optimizer, data: SceneData, **kw):
    """Adapter for :func:`train_loop`: ``(params, opt_state, key) -> (params, opt_state)``."""
    if not isinstance(data, SceneData):
        raise TypeError(f"data must be a SceneData (from make_dataset), got {type(data).__name__}")
    rays, target = dataset_rays(data)
    inner = make_photometric_step(field, optimizer, **kw)

    def step(params, opt_state, key):
        p, s, _ = inner(params, opt_state, key, rays.origins, rays.directions, target)
        return p, s
    return step
