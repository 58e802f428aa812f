"""TensoRF low-rank tensor fields: CP and VM (vector-matrix) decompositions (Chen et al. 2022,
*TensoRF: Tensorial Radiance Fields*, ECCV).

Both factorize the 4-D feature grid ``T[i, j, k, c]`` of a :class:`~lrjax.fields.fields.GridField`.
Let ``R = rank_sigma + rank_app`` components, ``L^m_r`` lines (1-D, ``N_c`` vertices) and
``P^m_r`` planes (2-D, ``N_a x N_b``), sampled with linear / bilinear interpolation (align corners,
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

**Per-axis resolution and per-mode ranks.** ``resolution`` is an int ``N`` (a cube) or
``(Nx, Ny, Nz)``; a line along axis ``a`` then has ``N_a`` vertices and a plane over axes
``(a, b)`` is ``N_a x N_b``. A VM field's ``rank_sigma`` / ``rank_app`` may be per mode,
``(R_XY-Z, R_XZ-Y, R_YZ-X)`` in TensoRF's matMode/vecMode order (e.g. LLFF ``rank_sigma=(16, 4, 4)``,
``rank_app=(48, 12, 12)``); an int means the same rank for all three pairs. CP components span
all three axes, so a CP field's ranks are ints. Parameter layout: a cubic field with equal ranks
stores stacked factors exactly as before (CP ``lines: [3, R, N]``; VM ``planes: [3, R, N, N]``,
``lines: [3, R, N]``), so an int resolution gives the same parameters and results; otherwise the
factors are stored per axis / mode: CP ``line_x: [R, Nx]``, ``line_y``, ``line_z``; VM
``plane_xy: [R_0, Nx, Ny]`` with ``line_z: [R_0, Nz]``, ``plane_xz: [R_1, Nx, Nz]`` with ``line_y``,
``plane_yz: [R_2, Ny, Nz]`` with ``line_x``. In every layout each mode's first ``R_sigma`` components
are the density ones. :func:`factor_list` returns the factors in one form for either layout.
With ``appearance=False`` (density-only) there are no appearance components and no basis.

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
from lrjax.fields.fields import (Field, GridField, _array, _check_variables, _freeze_tuple, _pos_float,
                                 _pos_int, check_resolution, interp_line, interp_plane)

__all__ = ["CPField", "VMField", "cp_dense", "vm_dense", "MAT_MODE", "VEC_MODE", "l1_density", "tv_loss",
           "total_variation", "upsample", "resolution_schedule", "factor_list"]

MAT_MODE = ((0, 1), (0, 2), (1, 2))
VEC_MODE = (2, 1, 0)
_AXES = "xyz"
_PLANE_NAMES = tuple(f"plane_{_AXES[a]}{_AXES[b]}" for a, b in MAT_MODE)      # plane_xy, plane_xz, plane_yz
_VM_LINE_NAMES = tuple(f"line_{_AXES[c]}" for c in VEC_MODE)                  # line_z, line_y, line_x
_CP_LINE_NAMES = tuple(f"line_{a}" for a in _AXES)                             # line_x, line_y, line_z


def _mode_ranks(value, name, owner, per_mode):
    """An int rank (``>= 1``) as a 3-tuple, or (VM only) a 3-tuple of ints ``>= 1``."""
    if isinstance(value, (tuple, list)):
        if not per_mode:
            raise TypeError(f"{name} must be an int for {owner} (a CP component spans all three axes; "
                            f"per-mode ranks are a VMField option), got {tuple(value)!r}")
        if len(value) != 3:
            raise ValueError(f"{name} must be an int or a tuple of 3 ints, one rank per plane/line pair "
                             f"(XY-Z, XZ-Y, YZ-X), got {len(value)} entries: {tuple(value)!r}")
        return tuple(check_int(v, f"{name}[{i}]", low=1) for i, v in enumerate(value))
    r = _pos_int(value, name)
    return (r, r, r)


class _TensorField(Field):
    """Shared config of the low-rank tensor fields: grid resolution, density and appearance ranks."""

    resolution: int | tuple = 64
    rank_sigma: int | tuple = 16
    rank_app: int | tuple = 32
    init_scale: float = 0.2
    density_scale: float = 10.0

    _per_mode = False

    def validate(self):
        for a in ("resolution", "rank_sigma", "rank_app"):
            _freeze_tuple(self, a)
        check_resolution(self.resolution, "resolution")
        _mode_ranks(self.rank_sigma, "rank_sigma", type(self).__name__, self._per_mode)
        if self.appearance or not (isinstance(self.rank_app, int) and not isinstance(self.rank_app, bool)
                                   and self.rank_app == 0):
            _mode_ranks(self.rank_app, "rank_app", type(self).__name__, self._per_mode)
        _pos_float(self.init_scale, "init_scale")

    @property
    def grid_shape(self) -> tuple:
        """``(Nx, Ny, Nz)`` vertices per axis."""
        return check_resolution(self.resolution, "resolution")

    @property
    def sigma_ranks(self) -> tuple:
        """Density components per mode (3-tuple; CP: the same number three times)."""
        return _mode_ranks(self.rank_sigma, "rank_sigma", type(self).__name__, self._per_mode)

    @property
    def app_ranks(self) -> tuple:
        """Appearance components per mode (``(0, 0, 0)`` for a density-only field)."""
        if not self.appearance:
            return (0, 0, 0)
        return _mode_ranks(self.rank_app, "rank_app", type(self).__name__, self._per_mode)

    @property
    def stacked(self) -> bool:
        """True when the factors are stored stacked (cubic grid, equal ranks per mode)."""
        return len(set(self.grid_shape)) == 1 and len(set(self.sigma_ranks)) == 1 and len(set(self.app_ranks)) == 1


class CPField(_TensorField):
    """CP-decomposed field: ``R = rank_sigma + rank_app`` rank-1 components of 3 lines each.

    ``resolution``: int or ``(Nx, Ny, Nz)``; ``rank_sigma``, ``rank_app``: ints ``>= 1``
    (``rank_app`` unused when ``appearance=False``, where ``rank_app=0`` is also accepted). Parameters: ``lines: [3, R, N]`` (cube) or
    ``line_x: [R, Nx]``, ``line_y: [R, Ny]``, ``line_z: [R, Nz]``; ``basis: [rank_app, geo_dim]``."""

    def encode(self, u):
        rs, ra = self.sigma_ranks[0], self.app_ranks[0]
        r = rs + ra
        init = nn.initializers.normal(self.init_scale)
        if self.stacked:
            lines = self.param("lines", init, (3, r, self.grid_shape[0]))
        else:
            lines = [self.param(nm, init, (r, n)) for nm, n in zip(_CP_LINE_NAMES, self.grid_shape)]
        a = interp_line(lines[0], u[..., 0]) * interp_line(lines[1], u[..., 1]) \
            * interp_line(lines[2], u[..., 2])                                  # [..., R]
        s = jnp.sum(a[..., :rs], axis=-1, keepdims=True)
        if not self.appearance:
            return s
        basis = self.param("basis", nn.initializers.lecun_normal(), (ra, self.geo_dim))
        return jnp.concatenate([s, a[..., rs:] @ basis], axis=-1)


class VMField(_TensorField):
    """VM-decomposed field: per mode ``m``, ``R_m`` plane x line components (TensoRF VM-split).

    ``resolution``: int or ``(Nx, Ny, Nz)``; ``rank_sigma``, ``rank_app``: an int or a per-mode
    3-tuple (XY-Z, XZ-Y, YZ-X), entries ``>= 1`` (``rank_app`` unused when ``appearance=False``,
    where ``rank_app=0`` is also accepted).
    Parameters: see the module docstring; ``basis: [sum_m rank_app_m, geo_dim]``."""

    rank_sigma: int | tuple = 8
    rank_app: int | tuple = 16
    init_scale: float = 0.1

    _per_mode = True

    def encode(self, u):
        rss, ras = self.sigma_ranks, self.app_ranks
        shape = self.grid_shape
        init = nn.initializers.normal(self.init_scale)
        if self.stacked:
            r, n = rss[0] + ras[0], shape[0]
            planes = self.param("planes", init, (3, r, n, n))
            lines = self.param("lines", init, (3, r, n))
        else:
            planes, lines = [], []
            for m, ((a, b), c) in enumerate(zip(MAT_MODE, VEC_MODE)):
                r = rss[m] + ras[m]
                planes.append(self.param(_PLANE_NAMES[m], init, (r, shape[a], shape[b])))
                lines.append(self.param(_VM_LINE_NAMES[m], init, (r, shape[c])))
        comps = []
        for m, ((a, b), c) in enumerate(zip(MAT_MODE, VEC_MODE)):
            comps.append(interp_plane(planes[m], u[..., a], u[..., b]) * interp_line(lines[m], u[..., c]))
        s = sum(jnp.sum(cm[..., :rs], axis=-1) for cm, rs in zip(comps, rss))[..., None]
        if not self.appearance:
            return s
        basis = self.param("basis", nn.initializers.lecun_normal(), (sum(ras), self.geo_dim))
        app = jnp.concatenate([cm[..., rs:] for cm, rs in zip(comps, rss)], axis=-1)
        return jnp.concatenate([s, app @ basis], axis=-1)


_FACTOR_KEYS = ("lines", "planes") + _PLANE_NAMES + _VM_LINE_NAMES + _CP_LINE_NAMES


def _with_grid(params, grid):
    p = dict(params["params"])
    for k in _FACTOR_KEYS + ("basis",):
        p.pop(k, None)
    p["grid"] = grid
    return {"params": p}


def _cp_lines(p):
    if "lines" in p:
        return [p["lines"][m] for m in range(3)]
    return [p[k] for k in _CP_LINE_NAMES]


def _vm_factors(p):
    if "planes" in p:
        return [p["planes"][m] for m in range(3)], [p["lines"][m] for m in range(3)]
    return [p[k] for k in _PLANE_NAMES], [p[k] for k in _VM_LINE_NAMES]


def factor_list(field, params):
    """The factors of a CP / VM field as per-mode lists, whatever the storage layout.

    CP: ``{'lines': [L_x [R, Nx], L_y [R, Ny], L_z [R, Nz]]}``; VM: ``{'planes': [P_XY [R_0, Nx, Ny],
    P_XZ [R_1, Nx, Nz], P_YZ [R_2, Ny, Nz]], 'lines': [L_Z [R_0, Nz], L_Y [R_1, Ny], L_X [R_2, Nx]]}``.
    Each mode's first ``sigma_ranks[m]`` components are the density ones. ``TypeError`` /
    ``ValueError`` (naming ``field`` / ``params``) for anything else."""
    p = _factors(field, params, "factor_list")
    if isinstance(field, VMField):
        planes, lines = _vm_factors(p)
        return {"planes": planes, "lines": lines}
    return {"lines": _cp_lines(p)}


def cp_dense(field: CPField, params):
    """Parameters of the :class:`GridField` (same resolution, ``appearance`` and head) equal to a CP field.

    ``T[i,j,k] = [sum_{r<R_s} A_r, B^T A_{R_s:}]`` with ``A_r[i,j,k] = L^X_r[i] L^Y_r[j] L^Z_r[k]``
    (``T: [Nx, Ny, Nz, feature_dim]``; density-only: ``[..., 1]``).
    """
    if not isinstance(field, CPField):
        raise TypeError(f"field must be a CPField for cp_dense, got {type(field).__name__}")
    _check_variables(field, params, "params")
    lx, ly, lz = _cp_lines(params["params"])
    a = jnp.einsum("ri,rj,rk->ijkr", lx, ly, lz)
    rs = field.sigma_ranks[0]
    s = jnp.sum(a[..., :rs], axis=-1, keepdims=True)
    if not field.appearance:
        return _with_grid(params, s)
    return _with_grid(params, jnp.concatenate([s, a[..., rs:] @ params["params"]["basis"]], axis=-1))


def vm_dense(field: VMField, params):
    """Parameters of the :class:`GridField` equal to a VM field (see :func:`cp_dense`)."""
    if not isinstance(field, VMField):
        raise TypeError(f"field must be a VMField for vm_dense, got {type(field).__name__}")
    _check_variables(field, params, "params")
    planes, lines = _vm_factors(params["params"])
    comps = [jnp.einsum("rij,rk->ijkr", planes[0], lines[0]),        # XY plane, Z line
             jnp.einsum("rik,rj->ijkr", planes[1], lines[1]),        # XZ plane, Y line
             jnp.einsum("rjk,ri->ijkr", planes[2], lines[2])]        # YZ plane, X line
    rss = field.sigma_ranks
    s = sum(jnp.sum(c[..., :rs], axis=-1) for c, rs in zip(comps, rss))[..., None]
    if not field.appearance:
        return _with_grid(params, s)
    app = jnp.concatenate([c[..., rs:] for c, rs in zip(comps, rss)], axis=-1)
    return _with_grid(params, jnp.concatenate([s, app @ params["params"]["basis"]], axis=-1))


# --------------------------------------------------------------------------- regularisers and schedule
def _factors(field, params, what):
    """The ``params['params']`` dict of a CP/VM field, with a clear error for anything else."""
    if not isinstance(field, (CPField, VMField)):
        raise TypeError(f"field must be a CPField or VMField for {what}, got {type(field).__name__}")
    if not isinstance(params, dict) or not isinstance(params.get("params"), dict):
        raise TypeError(f"params must be the {type(field).__name__}'s parameters dict {{'params': {{'lines', ...}}}} "
                        f"(as returned by init_field(field, key)) for {what}, got {type(params).__name__}")
    if not any(k in params["params"] for k in ("lines",) + _CP_LINE_NAMES + _VM_LINE_NAMES):
        raise ValueError(f"params must be the {type(field).__name__}'s parameters ({{'params': {{'lines', ...}}}}, "
                         f"as returned by init_field(field, key)) for {what}")
    _check_variables(field, params, "params")
    return params["params"]


def _part(x, rs, part):
    """Density (``r < rs``) or appearance components of one mode's factor ``[R_m, ...]``."""
    return x[:rs] if part == "sigma" else x[rs:] if part == "app" else x


def _split(x, field, part):
    """Density (``r < rank_sigma``) or appearance components of a ``[3, R, ...]`` factor stack."""
    check_choice(part, "part", ("sigma", "app", "all"))
    rs = field.sigma_ranks[0]
    return x[:, :rs] if part == "sigma" else x[:, rs:] if part == "app" else x


def l1_density(field, params):
    """TensoRF's L1 sparsity loss on the density factors (``tensoRF.py`` ``density_L1``)::

        VM:  sum_m mean|P^m_r| + mean|L^m_r|     over r < R_sigma,m
        CP:  sum_m mean|L^m_r|                   over r < rank_sigma

    (means per mode, so with per-axis resolutions / per-mode ranks each mode's mean is over its own
    shape). TensoRF weights it by 8e-5 (VM Lego; 4e-5 after the box shrink) or 1e-5 (CP); PVD's VM 1e-4.
    """
    p = _factors(field, params, "l1_density")
    rss = field.sigma_ranks
    if isinstance(field, VMField):
        planes, lines = _vm_factors(p)
    else:
        planes, lines = None, _cp_lines(p)
    total = sum(jnp.mean(jnp.abs(lines[m][:rss[m]])) for m in range(3))
    if planes is not None:
        total = total + sum(jnp.mean(jnp.abs(planes[m][:rss[m]])) for m in range(3))
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
    caller's, e.g. ``loss + 1e-2 * tv_loss(field, params)``. Means are per mode (each over its own
    per-axis shape). A density-only field (``appearance=False``) has no appearance part: 'app'
    gives 0.

    The formula (:func:`total_variation`, TensoRF's ``TVLoss`` factor 2): for each factor ``X``
    (a line ``[R, N]``, a plane ``[R, N_a, N_b]`` or the grid ``V [Nx, Ny, Nz, C]``, restricted to
    the components/channels of ``part``)::

        TV(X) = 2 * sum_{a in spatial axes} mean((X[.., i+1, ..] - X[.., i, ..])^2)

    summed over the three modes (lines / planes); for a grid ``2 * sum_{a=x,y,z} mean(diff_a(V)^2)``.

    Raises:
      TypeError: ``field`` not a GridField / SHGridField / CPField / VMField; ``params`` not a dict.
      ValueError: ``part`` not 'sigma'/'app'/'all'; ``params`` not this field's; an axis with < 2
        vertices.
    """
    check_choice(part, "part", ("sigma", "app", "all"))
    if not isinstance(field, (GridField, CPField, VMField)):
        raise TypeError(f"field must be a GridField, SHGridField, CPField or VMField for tv_loss, "
                        f"got {type(field).__name__}")
    if isinstance(field, GridField):
        g = params["params"]["grid"] if isinstance(params, dict) and "grid" in params.get("params", {}) else None
        if g is None:
            raise ValueError("params must be the GridField's parameters ({'params': {'grid': ...}})")
        _check_variables(field, params, "params")
        g = g[..., :1] if part == "sigma" else g[..., 1:] if part == "app" else g
        if g.shape[-1] == 0:
            return jnp.zeros((), g.dtype)
        return total_variation(g, (0, 1, 2))
    p = _factors(field, params, "tv_loss")
    if not isinstance(field, (CPField, VMField)):
        raise TypeError(f"field must be a GridField, SHGridField, CPField or VMField for tv_loss, "
                        f"got {type(field).__name__}")
    rss = field.sigma_ranks
    if isinstance(field, VMField):
        facs, axes = _vm_factors(p)[0], (-2, -1)
    else:
        facs, axes = _cp_lines(p), (-1,)
    parts = [_part(facs[m], rss[m], part) for m in range(3)]
    terms = [total_variation(x, axes) for x in parts if x.shape[0]]
    return sum(terms) if terms else jnp.zeros((), facs[0].dtype)


def _resample(x, n, axis):
    """Linear (align-corners) resampling of ``x`` along ``axis`` to ``n`` vertices."""
    x = jnp.moveaxis(x, axis, -1)
    flat = x.reshape(-1, x.shape[-1])
    out = interp_line(flat, jnp.linspace(-1.0, 1.0, n)).T                       # [C, n]
    return jnp.moveaxis(out.reshape(x.shape[:-1] + (n,)), -1, axis)


def upsample(field, params, new_res):
    """Resample a grid / CP / VM field to ``new_res`` vertices (TensoRF ``upsample_volume_grid``).

    ``new_res``: an int (a cube) or ``(Nx, Ny, Nz)``, each ``>=`` the field's resolution on that axis.
    Lines are resampled linearly, planes bilinearly and dense grids trilinearly, all with aligned
    corners, so the new field interpolates the old one at its vertices: since trilinear
    interpolation of an outer product is the product of the factors' interpolations,
    ``dense(upsample(p))`` equals trilinear interpolation of ``dense(p)`` at the new vertices, and
    if ``new_res - 1`` is a multiple of ``resolution - 1`` (per axis) the field is unchanged everywhere.
    Returns ``(new_field, new_params)`` (``new_field.resolution = new_res``; the parameter layout
    follows the new field, e.g. a cube upsampled to a non-cube is stored per axis); the colour head,
    basis and per-mode ranks are kept. Re-create the optimizer state after an upsample (TensoRF also
    resets the learning rate).
    """
    if not isinstance(field, (GridField, CPField, VMField)):
        raise TypeError(f"field must be a GridField, SHGridField, CPField or VMField to upsample, "
                        f"got {type(field).__name__}")
    if not isinstance(params, dict):
        raise TypeError(f"params must be the field's parameters dict {{'params': ...}}, got {type(params).__name__}")
    target = check_resolution(new_res, "new_res")
    old = field.grid_shape
    if any(t < o for t, o in zip(target, old)):
        raise ValueError(f"new_res={new_res!r} must be >= the field's resolution {field.resolution!r} on every "
                         f"axis (upsample only refines the grid)")
    if isinstance(new_res, list):
        new_res = tuple(new_res)
    new_field = field.clone(resolution=new_res)
    p = dict(params["params"]) if isinstance(params, dict) and "params" in params else None
    if isinstance(field, GridField):
        if p is None or "grid" not in p:
            raise ValueError("params must be the GridField's parameters ({'params': {'grid': ...}})")
        _check_variables(field, params, "params")
        for a in range(3):
            p["grid"] = _resample(p["grid"], target[a], a)
        return new_field, {**params, "params": p}
    p = dict(_factors(field, params, "upsample"))
    if field.stacked and new_field.stacked:                    # the cube -> cube path of the original code
        n = target[0]
        p["lines"] = _resample(p["lines"], n, -1)
        if isinstance(field, VMField):
            p["planes"] = _resample(_resample(p["planes"], n, -1), n, -2)
        return new_field, {**params, "params": p}
    for k in _FACTOR_KEYS:
        p.pop(k, None)
    if isinstance(field, VMField):
        planes, lines = _vm_factors(params["params"])
        planes = [_resample(_resample(pl, target[b], -1), target[a], -2) for pl, (a, b) in zip(planes, MAT_MODE)]
        lines = [_resample(li, target[c], -1) for li, c in zip(lines, VEC_MODE)]
        if new_field.stacked:
            p["planes"], p["lines"] = jnp.stack(planes), jnp.stack(lines)
        else:
            p.update(zip(_PLANE_NAMES, planes))
            p.update(zip(_VM_LINE_NAMES, lines))
    else:
        lines = [_resample(li, target[m], -1) for m, li in enumerate(_cp_lines(params["params"]))]
        if new_field.stacked:
            p["lines"] = jnp.stack(lines)
        else:
            p.update(zip(_CP_LINE_NAMES, lines))
    return new_field, {**params, "params": p}


def resolution_schedule(start, final, num_upsamples: int):
    """TensoRF's resolutions after each upsample: voxel counts log-linear from ``start^3`` to
    ``final^3`` (``train.py``: 128 -> 300 in 5 steps gives 152, 180, 213, 253, 300).

    ``start``, ``final``: ints (returns a list of ints) or ``(Nx, Ny, Nz)`` tuples (returns a list of
    tuples; each axis goes log-linearly from its start to its final size, so the voxel count is
    log-linear too, as TensoRF's ``N_to_reso`` keeps the box's aspect ratio)."""
    if isinstance(start, (tuple, list)) or isinstance(final, (tuple, list)):
        s3, f3 = check_resolution(start, "start"), check_resolution(final, "final")
        _pos_int(num_upsamples, "num_upsamples")
        if any(f < s for s, f in zip(s3, f3)):
            raise ValueError(f"final={final!r} must be >= start={start!r} on every axis")
        t = np.linspace(0.0, 1.0, num_upsamples + 1)[1:]
        axes = [np.exp(np.log(float(s)) + t * (np.log(float(f)) - np.log(float(s)))) for s, f in zip(s3, f3)]
        return [tuple(int(round(a[i])) for a in axes) for i in range(num_upsamples)]
    _pos_int(start, "start", 2)
    _pos_int(final, "final", 2)
    _pos_int(num_upsamples, "num_upsamples")
    if final < start:
        raise ValueError(f"final={final} must be >= start={start}")
    counts = np.exp(np.linspace(np.log(float(start) ** 3), np.log(float(final) ** 3), num_upsamples + 1))[1:]
    return [int(round(c ** (1.0 / 3.0))) for c in counts]
