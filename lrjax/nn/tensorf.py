"""TensoRF low-rank tensor fields: CP and VM (vector-matrix) decompositions (Chen et al. 2022,
*TensoRF: Tensorial Radiance Fields*, ECCV).

Both factorize the 4-D feature grid ``T[i, j, k, c]`` of a :class:`~lrjax.nn.fields.GridField`.
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
:class:`~lrjax.nn.fields.Field` is shared by all fields so they can be distilled into each other.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from lrjax.nn.fields import Field, _pos_float, _pos_int, interp_line, interp_plane

__all__ = ["CPField", "VMField", "cp_dense", "vm_dense", "MAT_MODE", "VEC_MODE"]

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
    lines, basis = params["params"]["lines"], params["params"]["basis"]
    a = jnp.einsum("ri,rj,rk->ijkr", lines[0], lines[1], lines[2])
    s = jnp.sum(a[..., :field.rank_sigma], axis=-1, keepdims=True)
    return _with_grid(params, jnp.concatenate([s, a[..., field.rank_sigma:] @ basis], axis=-1))


def vm_dense(field: VMField, params):
    """Parameters of the :class:`GridField` equal to a VM field (see :func:`cp_dense`)."""
    planes, lines, basis = (params["params"][k] for k in ("planes", "lines", "basis"))
    comps = [jnp.einsum("rij,rk->ijkr", planes[0], lines[0]),        # XY plane, Z line
             jnp.einsum("rik,rj->ijkr", planes[1], lines[1]),        # XZ plane, Y line
             jnp.einsum("rjk,ri->ijkr", planes[2], lines[2])]        # YZ plane, X line
    rs = field.rank_sigma
    s = sum(jnp.sum(c[..., :rs], axis=-1) for c in comps)[..., None]
    app = jnp.concatenate([c[..., rs:] for c in comps], axis=-1)
    return _with_grid(params, jnp.concatenate([s, app @ basis], axis=-1))
