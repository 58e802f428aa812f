"""Multiresolution hash encoding (Müller et al. 2022, *Instant Neural Graphics Primitives with a
Multiresolution Hash Encoding*, SIGGRAPH), as a :class:`~lrjax.fields.fields.Field`.

Level ``l = 0..L-1`` has growth factor ``b = exp((ln N_max - ln N_min) / (L - 1))`` and (as in
tiny-cuda-nn's ``grid.h``) scale ``S_l = N_min b^l - 1``. With ``v = (u + 1) / 2`` in ``[0, 1]^3``::

    p     = v S_l + 1/2,     cell = floor(p),     w = p - cell          (tcnn ``pos_fract``)
    f_l   = sum over the 8 corners c of cell: trilinear(w, c) * table_l[index_l(c)]
    F(u)  = MLP([f_0, ..., f_{L-1}])                                    (Instant-NGP density MLP)

``index_l`` is dense, ``i + j V + k V^2`` with ``V_l = ceil(S_l) + 2`` vertices per side (every
corner of every reachable cell is stored: an implementation choice; tiny-cuda-nn uses stride
``ceil(S_l) + 1`` and wraps at the far face, torch-ngp/PVD uses ``+1`` stride and returns zeros
outside the box), while ``V_l^3 <= T``; otherwise the spatial hash of the paper (Eq. 4)::

    h(i, j, k) = (i * 1  XOR  j * 2654435761  XOR  k * 805459861) mod T        (uint32 arithmetic)

**Per-axis resolution** (an extension; tiny-cuda-nn has none): ``min_res`` / ``max_res`` may be
``(Nx, Ny, Nz)`` tuples. Each axis ``a`` then has its own growth ``b_a``, scale
``S_{l,a} = N_min,a b_a^l - 1`` and ``V_{l,a} = ceil(S_{l,a}) + 2`` vertices; a level is dense
(index ``i + j V_x + k V_x V_y``) while ``V_x V_y V_z <= T``, else hashed as above. Ints (a cube)
give exactly the layout and values of the cubic code.

Tables have ``min(V_l^3, T)`` rows of ``F`` features, initialised ``U(-1e-4, 1e-4)``.
Paper defaults: ``L=16, F=2, T=2^14..2^24, N_min=16``; PVD: ``L=14, T=2^19, N_max=2048``; the CPU
defaults here: ``L=8, F=2, T=2^14, N_min=16, N_max=128``.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from lrjax._validation import check_int, is_concrete
from lrjax.fields.fields import Field, _array, _freeze_tuple, _pos_int, check_resolution

__all__ = ["HashGridField", "hash_encode", "fast_hash", "level_layout", "PRIMES"]

PRIMES = (1, 2654435761, 805459861)


def fast_hash(ijk):
    """``XOR_i ijk_i * pi_i`` in uint32 (wrapping) for non-negative integer ``ijk: [..., 3]``."""
    ijk = _array(ijk, "ijk", min_ndim=1, last=3, kind="integer", finite=False)
    if is_concrete(ijk) and ijk.size and bool(jnp.any(ijk < 0)):
        raise ValueError("ijk must be non-negative integer grid coordinates (got a negative entry)")
    ijk = ijk.astype(jnp.uint32)
    return (ijk[..., 0] * jnp.uint32(PRIMES[0])) ^ (ijk[..., 1] * jnp.uint32(PRIMES[1])) \
        ^ (ijk[..., 2] * jnp.uint32(PRIMES[2]))


def level_layout(levels, min_res, max_res, log2_table_size):
    """Per level ``(scale, vertices_per_side, rows, hashed)`` (pure Python, static).

    ``min_res``, ``max_res``: ints (a cube) or ``(Nx, Ny, Nz)`` tuples (each ``>= 2``); with a tuple
    (either one) ``scale`` and ``vertices_per_side`` are 3-tuples (per axis)."""
    levels = _pos_int(levels, "levels")
    log2_table_size = check_int(log2_table_size, "log2_table_size", low=1, high=30)
    if isinstance(min_res, (tuple, list)) or isinstance(max_res, (tuple, list)):
        lo3, hi3 = check_resolution(min_res, "min_res"), check_resolution(max_res, "max_res")
        if any(h < lo for lo, h in zip(lo3, hi3)):
            raise ValueError(f"max_res={max_res!r} must be >= min_res={min_res!r} on every axis")
        per_axis = [level_layout(levels, lo, h, log2_table_size) for lo, h in zip(lo3, hi3)]
        table = 2 ** log2_table_size
        out = []
        for lvl in range(levels):
            scale = tuple(ax[lvl][0] for ax in per_axis)
            side = tuple(ax[lvl][1] for ax in per_axis)
            n = side[0] * side[1] * side[2]
            out.append((scale, side, n if n <= table else table, n > table))
        return tuple(out)
    min_res = _pos_int(min_res, "min_res", 2)
    max_res = _pos_int(max_res, "max_res", 2)
    if max_res < min_res:
        raise ValueError(f"max_res={max_res} must be >= min_res={min_res}")
    b = 1.0 if levels == 1 else math.exp((math.log(max_res) - math.log(min_res)) / (levels - 1))
    table = 2 ** log2_table_size
    out = []
    for lvl in range(levels):
        scale = min_res * b ** lvl - 1.0
        side = int(math.ceil(scale)) + 2
        dense = side ** 3 <= table
        out.append((scale, side, side ** 3 if dense else table, not dense))
    return tuple(out)


def hash_encode(tables, u, layout):
    """Multiresolution hash encoding of ``u: [..., 3]`` in ``[-1, 1]^3`` -> ``[..., L * F]``.

    ``tables[l]: [rows_l, F]``; ``layout`` from :func:`level_layout`."""
    if not isinstance(layout, (tuple, list)) or not all(isinstance(v, tuple) and len(v) == 4 for v in layout):
        raise TypeError("layout must be the tuple returned by level_layout(levels, min_res, max_res, "
                        f"log2_table_size), got {type(layout).__name__}")
    if not isinstance(tables, (tuple, list)) or len(tables) != len(layout):
        raise TypeError(f"tables must be a list of {len(layout)} arrays [rows_l, F] (one per level of layout), "
                        f"got {type(tables).__name__}")
    for lvl, (t, (_, _, rows, _)) in enumerate(zip(tables, layout)):
        t = _array(t, f"tables[{lvl}]", ndim=2, finite=False)
        if t.shape[0] != rows:
            raise ValueError(f"tables[{lvl}] must have {rows} rows for this layout, got shape {t.shape}")
    u = _array(u, "u", min_ndim=1, last=3)
    v = (u + 1.0) * 0.5
    feats = []
    for table, (scale, side, rows, hashed) in zip(tables, layout):
        if isinstance(scale, tuple):                      # per-axis level
            p = v * jnp.asarray(scale, v.dtype) + 0.5
            sx, sy = side[0], side[1]
        else:
            p = v * scale + 0.5
            sx = sy = side
        cell = jnp.floor(p)
        w = p - cell
        cell = cell.astype(jnp.int32)
        f = 0.0
        for c in np.ndindex(2, 2, 2):
            corner = cell + jnp.asarray(c, jnp.int32)
            if hashed:
                idx = (fast_hash(corner) & jnp.uint32(rows - 1)).astype(jnp.int32)
            else:
                idx = corner[..., 0] + sx * (corner[..., 1] + sy * corner[..., 2])
            wc = jnp.prod(jnp.where(jnp.asarray(c, bool), w, 1.0 - w), axis=-1)
            f = f + table[idx] * wc[..., None]
        feats.append(f)
    return jnp.concatenate(feats, axis=-1)


class HashGridField(Field):
    """Hash-grid encoder + density MLP (``hidden`` units, ``mlp_layers`` hidden layers).

    ``min_res`` / ``max_res``: ints or per-axis ``(Nx, Ny, Nz)`` tuples (see the module docstring).
    With ``levels=1`` the growth factor is 1 and the single level uses ``min_res`` (per axis);
    ``max_res`` is then only checked (``>= min_res``) and otherwise unused."""

    levels: int = 8
    features_per_level: int = 2
    log2_table_size: int = 14
    min_res: int | tuple = 16
    max_res: int | tuple = 128
    hidden: int = 64
    mlp_layers: int = 1

    def validate(self):
        _pos_int(self.levels, "levels")
        _pos_int(self.features_per_level, "features_per_level")
        check_int(self.log2_table_size, "log2_table_size", low=1, high=30)
        _freeze_tuple(self, "min_res")
        _freeze_tuple(self, "max_res")
        if isinstance(self.min_res, tuple) or isinstance(self.max_res, tuple):
            level_layout(self.levels, self.min_res, self.max_res, self.log2_table_size)
        else:
            _pos_int(self.min_res, "min_res", 2)
            _pos_int(self.max_res, "max_res", 2)
            if self.max_res < self.min_res:
                raise ValueError(f"max_res={self.max_res} must be >= min_res={self.min_res}")
        _pos_int(self.hidden, "hidden")
        _pos_int(self.mlp_layers, "mlp_layers", 0)

    def encode_levels(self, u):
        """The concatenated level features ``[..., L * F]``."""
        init = nn.initializers.uniform(2e-4)
        layout = level_layout(self.levels, self.min_res, self.max_res, self.log2_table_size)
        tables = [self.param(f"table_{lvl}", lambda k, s: init(k, s) - 1e-4, (rows, self.features_per_level))
                  for lvl, (_, _, rows, _) in enumerate(layout)]
        return hash_encode(tables, u, layout)

    def encode(self, u):
        h = self.encode_levels(u)
        for i in range(self.mlp_layers):
            h = nn.relu(nn.Dense(self.hidden, name=f"hidden_{i}")(h))
        return nn.Dense(self.feature_dim, name="feature_out")(h)
