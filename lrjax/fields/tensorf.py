"""TensoRF low-rank tensor fields: CP and VM (vector-matrix) decompositions (Chen et al. 2022,
*TensoRF: Tensorial Radiance Fields*, ECCV).

Both factorize the 4-D feature grid ``T[i, j, k, c]`` of a :class:`~lrjax.fields.fields.GridField`.
Let ``R = rank_sigma + rank_app`` components, ``L^m_r`` lines (1-D, ``N`` vertices) and
``P^m_r`` planes (2-D, ``N x N``), sampled with linear / bilinear interpolation (align corners,
as TensoRF's ``grid_sample(align_corners=True)``).

CP (TensoRF Eq. 3)::

    A_r(u)    = L^X_r(u_x) L^Y_r(u_y) L^Z_r(u_z)                         r < R
    s(u)      = sum_{r < R_sigma} A_r(u)
    g(u)      = B^T [A_r(u)]_{R_sigma <= r < R}                          B: [R_app, geo_dim]

VM (TensoRF Eq. 5), plane/line pairs ``(XY, Z), (XZ, Y), (YZ, X)`` (TensoRF's matMode/vecMode)::

    A^m_r(u)  = P^m_r(u_a, u_b) L^m_r(u_c)
    s(u)      = sum_m sum_{r < R_sigma} A^m_r(u)
    g(u)      = B^T concat_m [A^m_r(u)]_{R_sigma <= r < R}               B: [3 R_app, geo_dim]

Trilinear interpolation of an outer product equals the product of the factors' (bi)linear
interpolations, so ``encode`` equals ``interp_grid(dense(params), u)`` *exactly*:
:func:`cp_dense` / :func:`vm_dense` return the equivalent :class:`GridField` parameters (tested).

Defaults are CPU-sized. TensoRF's Lego: VM ranks ``16/48`` per plane at 300^3, CP ``96/288`` at
500^3; init ``0.1 N(0,1)`` (VM) / ``0.2 N(0,1)`` (CP); PVD's VM: basis ``144 -> 15``. TensoRF
uses ``softplus(s - 10)`` for density; here the PVD convention ``exp(clip(s))`` of
:class:`~lrjax.fields.fields.Field` is shared by all fields so they can be distilled into each other.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from lrjax._validation import check_choice, check_int
from lrjax.fields.fields import (Field, GridField, _array, _check_variables, _pos_float, _pos_int,
                                 interp_line, interp_plane)

__all__ = ["CPField", "VMField", "cp_dense", "vm_dense", "MAT_MODE", "VEC_MODE", "l1_density", "tv_loss",
           "total_variation", "upsample", "resolution_schedule"]

MAT_MODE = ((0, 1), (0, 2), (1, 2))
VEC_MODE = (2, 1, 0)


class _TensorField(Field):
    """Shared config of the low-rank tensor fields: grid resolution, density and appearance ranks."""

    resolution: int = 64
    rank_sigma: int = 16
    rank_app: int = 32
    init_scale: float = 0.2
    density_scale: float = 10.0

    def validate(self):
        _pos_int(self.resolution, "resolution", 2)
        _pos_int(self.rank_sigma, "rank_sigma")
        _pos_int(self.rank_app, "rank_app")
        _pos_float(self.init_scale, "init_scale")


class CPField(_TensorField):
    """CP-decomposed field: ``R = rank_sigma + rank_app`` rank-1 components of 3 lines each."""

    def encode(self, u):
        r = self.rank_sigma + self.rank_app
        lines = self.param("lines", nn.initializers.normal(self.init_scale), (3, r, self.resolution))
        basis = self.param("basis", nn.initializers.lecun_normal(), (self.rank_app, self.geo_dim))
        a = interp_line(lines[0], u[..., 0]) * interp_line(lines[1], u[..., 1]) \
            * interp_line(lines[2], u[..., 2])                                  # [..., R]
        s = jnp.sum(a[..., :self.rank_sigma], axis=-1, keepdims=True)
        return jnp.concatenate([s, a[..., self.rank_sigma:] @ basis], axis=-1)


class VMField(_TensorField):
    """VM-decomposed field: per mode ``m``, ``R`` plane x line components (TensoRF VM-split)."""

    rank_sigma: int = 8
    rank_app: int = 16
    init_scale: float = 0.1

    def encode(self, u):
        r, n = self.rank_sigma + self.rank_app, self.resolution
        planes = self.param("planes", nn.initializers.normal(self.init_scale), (3, r, n, n))
        lines = self.param("lines", nn.initializers.normal(self.init_scale), (3, r, n))
        basis = self.param("basis", nn.initializers.lecun_normal(), (3 * self.rank_app, self.geo_dim))
        comps = []
        for m, ((a, b), c) in enumerate(zip(MAT_MODE, VEC_MODE)):
            comps.append(interp_plane(planes[m], u[..., a], u[..., b]) * interp_line(lines[m], u[..., c]))
        s = sum(jnp.sum(cm[..., :self.rank_sigma], axis=-1) for cm in comps)[..., None]
        app = jnp.concatenate([cm[..., self.rank_sigma:] for cm in comps], axis=-1)
        return jnp.concatenate([s, app @ basis], axis=-1)


def _with_grid(params, grid):
    p = dict(params["params"])
    for k in ("lines", "planes", "basis"):
        p.pop(k, None)
    p["grid"] = grid
    return {"params": p}


def cp_dense(field: CPField, params):
    """Parameters of the :class:`GridField` (same resolution and head) equal to a CP field.

    ``T[i,j,k] = [sum_{r<R_s} A_r, B^T A_{R_s:}]`` with ``A_r[i,j,k] = L^X_r[i] L^Y_r[j] L^Z_r[k]``.
    """
    if not isinstance(field, CPField):
        raise TypeError(f"field must be a CPField for cp_dense, got {type(field).__name__}")
    _check_variables(field, params, "params")
    lines, basis = params["params"]["lines"], params["params"]["basis"]
    a = jnp.einsum("ri,rj,rk->ijkr", lines[0], lines[1], lines[2])
    s = jnp.sum(a[..., :field.rank_sigma], axis=-1, keepdims=True)
    return _with_grid(params, jnp.concatenate([s, a[..., field.rank_sigma:] @ basis], axis=-1))


def vm_dense(field: VMField, params):
    """Parameters of the :class:`GridField` equal to a VM field (see :func:`cp_dense`)."""
    if not isinstance(field, VMField):
        raise TypeError(f"field must be a VMField for vm_dense, got {type(field).__name__}")
    _check_variables(field, params, "params")
    planes, lines, basis = (params["params"][k] for k in ("planes", "lines", "basis"))
    comps = [jnp.einsum("rij,rk->ijkr", planes[0], lines[0]),        # XY plane, Z line
             jnp.einsum("rik,rj->ijkr", planes[1], lines[1]),        # XZ plane, Y line
             jnp.einsum("rjk,ri->ijkr", planes[2], lines[2])]        # YZ plane, X line
    rs = field.rank_sigma
    s = sum(jnp.sum(c[..., :rs], axis=-1) for c in comps)[..., None]
    app = jnp.concatenate([c[..., rs:] for c in comps], axis=-1)
    return _with_grid(params, jnp.concatenate([s, app @ basis], axis=-1))


# --------------------------------------------------------------------------- regularisers and schedule
def _factors(field, params, what):
    """The ``params['params']`` dict of a CP/VM field, with a clear error for anything else."""
    if not isinstance(field, (CPField, VMField)):
        raise TypeError(f"field must be a CPField or VMField for {what}, got {type(field).__name__}")
    if not isinstance(params, dict) or not isinstance(params.get("params"), dict):
        raise TypeError(f"params must be the {type(field).__name__}'s parameters dict {{'params': {{'lines', ...}}}} "
                        f"(as returned by init_field(field, key)) for {what}, got {type(params).__name__}")
    if "lines" not in params["params"]:
        raise ValueError(f"params must be the {type(field).__name__}'s parameters ({{'params': {{'lines', ...}}}}, "
                         f"as returned by init_field(field, key)) for {what}")
    _check_variables(field, params, "params")
    return params["params"]


def _split(x, field, part):
    """Density (``r < rank_sigma``) or appearance components of a ``[3, R, ...]`` factor stack."""
    check_choice(part, "part", ("sigma", "app", "all"))
    rs = field.rank_sigma
    return x[:, :rs] if part == "sigma" else x[:, rs:] if part == "app" else x


def l1_density(field, params):
    """TensoRF's L1 sparsity loss on the density factors (``tensoRF.py`` ``density_L1``)::

        VM:  sum_m mean|P^m_r| + mean|L^m_r|     over r < rank_sigma
        CP:  sum_m mean|L^m_r|                   over r < rank_sigma

    TensoRF weights it by 8e-5 (VM Lego; 4e-5 after the box shrink) or 1e-5 (CP); PVD's VM 1e-4.
    """
    p = _factors(field, params, "l1_density")
    total = sum(jnp.mean(jnp.abs(_split(p["lines"], field, "sigma")[m])) for m in range(3))
    if isinstance(field, VMField):
        total = total + sum(jnp.mean(jnp.abs(_split(p["planes"], field, "sigma")[m])) for m in range(3))
    return total


def total_variation(x, axes):
    """``2 sum_{a in axes} mean((x[.., i+1, ..] - x[.., i, ..])^2)`` over the given spatial axes
    (TensoRF's ``TVLoss`` for a batch of one: ``2 (h_tv / count_h + w_tv / count_w)``).

    ``x``: floating array; ``axes``: a non-empty tuple of distinct valid axes of ``x``."""
    x = _array(x, "x", min_ndim=1, finite=False)
    if isinstance(axes, (int, np.integer)) and not isinstance(axes, bool):
        axes = (axes,)
    if not isinstance(axes, (tuple, list)) or not axes:
        raise TypeError(f"axes must be a non-empty tuple of ints, got {axes!r}")
    axes = [check_int(a, "axes", low=-x.ndim, high=x.ndim - 1) for a in axes]
    if len({a % x.ndim for a in axes}) != len(axes):
        raise ValueError(f"axes must be distinct, got {axes}")
    total = 0.0
    for a in axes:
        if x.shape[a] < 2:
            raise ValueError(f"total_variation needs >= 2 entries along axis {a}, got shape {x.shape}")
        total = total + jnp.mean(jnp.diff(x, axis=a) ** 2)
    return 2.0 * total


def tv_loss(field, params, part: str = "sigma"):
    """Total variation of the VM planes (``sum_m TV_2d(P^m)``), CP lines (``sum_m TV_1d(L^m)``) or a
    dense grid (:class:`~lrjax.fields.fields.GridField` incl. the SH grid: 3-D TV of ``V``).

    ``part``: 'sigma' (density components / channel), 'app' (appearance) or 'all'. TensoRF applies
    it with weight 1e-2 on planes / 1e-3 on lines (LLFF; 0 for synthetic scenes); the weight is the
    caller's, e.g. ``loss + 1e-2 * tv_loss(field, params)``.
    """
    check_choice(part, "part", ("sigma", "app", "all"))
    if isinstance(field, GridField):
        g = params["params"]["grid"] if isinstance(params, dict) and "grid" in params.get("params", {}) else None
        if g is None:
            raise ValueError("params must be the GridField's parameters ({'params': {'grid': ...}})")
        _check_variables(field, params, "params")
        g = g[..., :1] if part == "sigma" else g[..., 1:] if part == "app" else g
        return total_variation(g, (0, 1, 2))
    p = _factors(field, params, "tv_loss")
    if not isinstance(field, (CPField, VMField)):
        raise TypeError(f"field must be a GridField, SHGridField, CPField or VMField for tv_loss, "
                        f"got {type(field).__name__}")
    if isinstance(field, VMField):
        planes = _split(p["planes"], field, part)
        return sum(total_variation(planes[m], (-2, -1)) for m in range(3))
    lines = _split(p["lines"], field, part)
    return sum(total_variation(lines[m], (-1,)) for m in range(3))


def _resample(x, n, axis):
    """Linear (align-corners) resampling of ``x`` along ``axis`` to ``n`` vertices."""
    x = jnp.moveaxis(x, axis, -1)
    flat = x.reshape(-1, x.shape[-1])
    out = interp_line(flat, jnp.linspace(-1.0, 1.0, n)).T                       # [C, n]
    return jnp.moveaxis(out.reshape(x.shape[:-1] + (n,)), -1, axis)


def upsample(field, params, new_res: int):
    """Resample a grid / CP / VM field to ``new_res`` vertices per side (TensoRF ``upsample_volume_grid``).

    Lines are resampled linearly, planes bilinearly and dense grids trilinearly, all with aligned
    corners, so the new field interpolates the old one at its vertices: since trilinear
    interpolation of an outer product is the product of the factors' interpolations,
    ``dense(upsample(p))`` equals trilinear interpolation of ``dense(p)`` at the new vertices, and
    if ``new_res - 1`` is a multiple of ``resolution - 1`` the field is unchanged everywhere.
    Returns ``(new_field, new_params)``; the colour head and basis are kept. Re-create the optimizer
    state after an upsample (TensoRF also resets the learning rate).
    """
    if not isinstance(field, (GridField, CPField, VMField)):
        raise TypeError(f"field must be a GridField, SHGridField, CPField or VMField to upsample, "
                        f"got {type(field).__name__}")
    if not isinstance(params, dict):
        raise TypeError(f"params must be the field's parameters dict {{'params': ...}}, got {type(params).__name__}")
    _pos_int(new_res, "new_res", 2)
    if new_res < field.resolution:
        raise ValueError(f"new_res={new_res} must be >= the field's resolution {field.resolution} "
                         f"(upsample only refines the grid)")
    p = dict(params["params"]) if isinstance(params, dict) and "params" in params else None
    if isinstance(field, GridField):
        if p is None or "grid" not in p:
            raise ValueError("params must be the GridField's parameters ({'params': {'grid': ...}})")
        _check_variables(field, params, "params")
        for a in range(3):
            p["grid"] = _resample(p["grid"], new_res, a)
    else:
        p = dict(_factors(field, params, "upsample"))
        p["lines"] = _resample(p["lines"], new_res, -1)
        if isinstance(field, VMField):
            p["planes"] = _resample(_resample(p["planes"], new_res, -1), new_res, -2)
    return field.clone(resolution=new_res), {**params, "params": p}


def resolution_schedule(start: int, final: int, num_upsamples: int):
    """TensoRF's per-side resolutions after each upsample: voxel counts log-linear from ``start^3``
    to ``final^3`` (``train.py``: 128 -> 300 in 5 steps gives 152, 180, 213, 253, 300)."""
    _pos_int(start, "start", 2)
    _pos_int(final, "final", 2)
    _pos_int(num_upsamples, "num_upsamples")
    if final < start:
        raise ValueError(f"final={final} must be >= start={start}")
    counts = np.exp(np.linspace(np.log(float(start) ** 3), np.log(float(final) ** 3), num_upsamples + 1))[1:]
    return [int(round(c ** (1.0 / 3.0))) for c in counts]
