"""Radiance fields behind one interface: position (and optionally direction) -> density, colour, features.

Every field here is a Flax **linen** module. Linen was chosen over NNX because a linen module is a
stateless description and its parameters are a plain pytree, so the two operations this package
needs most are plain JAX: a *batch of fields* is ``jax.vmap(field.init)(keys, x)`` and is evaluated
with ``jax.vmap(field.apply, in_axes=(0, None))``; rays and samples are leading axes of ``x`` (or
``jax.vmap`` over them); distillation differentiates one parameter pytree while another is held
fixed. No graph/state splitting is involved.

The interface follows the "two-part" model of PVD (Fang et al. 2023, *One is All: Bridging the
Gap Between Neural Radiance Fields Architectures with Progressive Volume Distillation*, AAAI): a
type-specific **encoder** maps the normalised position ``u = x / bound`` in ``[-1, 1]^3`` to a
``1 + geo_dim`` feature ``F(u) = [s(u), g(u)]``, and a shared **colour head** maps ``g`` (and the
encoded view direction) to RGB::

    s_pre = clip(s(u) + density_shift, c_min, c_max)        (PVD's density range constraint)
    sigma = exp(s_pre)                                       (trunc_exp of torch-ngp / PVD)
    rgb   = sigmoid(MLP([g(u), SH(d)]))                       (SH(d) only if view_dependent)

Because every field exposes the same ``F`` (with clipped ``s_pre``), ``sigma_pre``, ``sigma`` and
``rgb``, any field can be distilled into any other stage by stage (:mod:`lrjax.fields.pvd`).

Encoders in this package: :class:`MLPField` (NeRF positional encoding, Mildenhall et al. 2020),
:class:`GridField` (dense voxel grid, trilinear), :class:`~lrjax.fields.tensorf.CPField` and
:class:`~lrjax.fields.tensorf.VMField` (TensoRF, Chen et al. 2022), :class:`~lrjax.fields.hashgrid.HashGridField`
(Instant-NGP, Müller et al. 2022), :class:`~lrjax.nn.sna.SNAField` (separable B-spline CP) and
:class:`~lrjax.fields.plenoxels.SHGridField` (Plenoxels, Fridovich-Keil et al. 2022: SH colour, no MLP).

**Per-axis resolution.** Grid-based fields (:class:`GridField`, the SH grid, CP, VM) take
``resolution`` as an int ``N`` (a cube, ``N x N x N`` vertices) or a tuple ``(Nx, Ny, Nz)`` (each
``>= 2``); :attr:`Field.grid_shape` always gives the 3-tuple. An int and ``(N, N, N)`` build the
same parameters and the same results (bit-identical).

**Encoder-level outputs.** ``field.apply(params, x, method="features")`` returns
:class:`FieldFeatures` (the raw encoder output, the feature, ``sigma_pre`` and ``sigma``) without
evaluating the colour head; ``field.apply(params, x, method="density")`` returns ``sigma`` only.
Both take world points ``x`` like ``__call__`` (``d`` is not needed). ``encode`` itself is the
subclass hook on normalised coordinates and is not meant for ``apply``.

**Density-only fields.** ``appearance=False`` builds a field with no appearance parts at all:
the feature is ``[s_pre]`` (``feature_dim = 1``), no colour head, no appearance factors (CP/VM:
``rank_app`` is not used, no basis), no SH coefficients (SH grid), a 1-channel grid. Such a field's
``__call__`` returns a constant mid-grey ``rgb = 0.5`` (documented placeholder, no parameters,
zero gradient), so it renders: ``acc`` and ``depth`` are exact and the image is grey where opaque.
:func:`check_compatible` refuses to pair a density-only field with a coloured one.

Coordinates: a point must lie in the axis-aligned box ``[-bound, bound]^3``. Concrete (eager)
inputs outside it raise ``ValueError``; traced inputs (under ``jit``) are clipped to the box, as
the renderer's samples always are.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from lrjax._validation import (check_array, check_bool, check_finite, check_float, check_int,
                               check_key, is_concrete)

__all__ = ["FieldOutput", "FieldFeatures", "Field", "MLPField", "GridField", "positional_encoding", "sh_encoding",
           "interp_line", "interp_plane", "interp_grid", "init_field", "count_params", "param_bytes",
           "check_compatible"]


class FieldOutput(NamedTuple):
    """Per-point outputs, all with the leading shape of ``x``.

    ``feature``: ``[..., 1 + geo_dim]``, ``[s_pre, g]`` (PVD's 16-d "feature_sigma_color");
    ``sigma_pre``: ``[...]`` clipped log-density; ``sigma``: ``[...]`` density ``exp(sigma_pre)``;
    ``rgb``: ``[..., 3]`` in ``(0, 1)``.
    """

    feature: jax.Array
    sigma_pre: jax.Array
    sigma: jax.Array
    rgb: jax.Array


class FieldFeatures(NamedTuple):
    """Encoder-level outputs (no colour head), from ``field.apply(params, x, method="features")``.

    ``raw``: ``[..., feature_dim]`` the encoder's output ``F(u) = [s(u), g(u)]`` before the density
    scale/shift/clip; ``feature``: ``[..., feature_dim]`` ``[s_pre, g]`` (as ``FieldOutput.feature``);
    ``sigma_pre``: ``[...]``; ``sigma``: ``[...]``.
    """

    raw: jax.Array
    feature: jax.Array
    sigma_pre: jax.Array
    sigma: jax.Array


# --------------------------------------------------------------------------- validation helpers
def _pos_int(value, name, minimum=1):
    """An int ``>= minimum`` (``TypeError`` for a non-int, ``ValueError`` below the minimum)."""
    return check_int(value, name, low=minimum)


def _pos_float(value, name):
    """A finite real number ``> 0`` (``TypeError`` for a non-number, ``ValueError`` otherwise)."""
    return check_float(value, name, low=0.0, low_open=True)


def check_resolution(value, name="resolution", minimum=2):
    """``value`` as a 3-tuple of ints ``(Nx, Ny, Nz)``: an int ``N`` means ``(N, N, N)``.

    ``TypeError`` for a non-int / non-sequence (or a str), ``ValueError`` for a sequence whose length
    is not 3 or an entry below ``minimum``; both name ``name``."""
    if isinstance(value, (tuple, list)):
        if len(value) != 3:
            raise ValueError(f"{name} must be an int N (a cube) or a tuple of 3 ints (Nx, Ny, Nz), "
                             f"got {len(value)} entries: {tuple(value)!r}")
        return tuple(check_int(v, f"{name}[{i}]", low=minimum) for i, v in enumerate(value))
    if isinstance(value, (str, bytes)) or not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int N (a cube) or a tuple of 3 ints (Nx, Ny, Nz), got "
                        f"{type(value).__name__} {value!r:.60}")
    n = check_int(value, name, low=minimum)
    return (n, n, n)


def _freeze_tuple(module, attr):
    """Store a list attribute of a (frozen) linen module as a tuple, so the module stays hashable."""
    v = getattr(module, attr)
    if isinstance(v, list):
        object.__setattr__(module, attr, tuple(v))


def _is_tracer(x):
    return isinstance(x, jax.core.Tracer)


def _array(x, name, *, ndim=None, min_ndim=None, last=None, kind="floating", convert=False, finite=True):
    """``check_array`` plus (on concrete input) ``check_finite``; returns a ``jnp`` array."""
    x = check_array(x, name, ndim=ndim, min_ndim=min_ndim, last=last, kind=kind, convert=convert)
    if finite:
        check_finite(x, name)
    return jnp.asarray(x)


def _concrete(*xs):
    return all(is_concrete(x) for x in xs)


def _unit(d, name, axis=-1):
    """``d / ||d||`` along ``axis``; a zero-length vector is refused on concrete input (under
    ``jit`` it stays zero instead of becoming NaN)."""
    norm = jnp.linalg.norm(d, axis=axis, keepdims=True)
    if is_concrete(norm) and norm.size:
        with jax.ensure_compile_time_eval():
            bad = int(jnp.sum(norm <= 1e-12))
        if bad:
            raise ValueError(f"{name} has {bad} zero-length direction(s); every direction must be a "
                             f"non-zero 3-vector (it is normalised to unit length)")
    tiny = jnp.asarray(1e-30, norm.dtype) if jnp.issubdtype(norm.dtype, jnp.floating) else 1e-30
    return d / jnp.maximum(norm, tiny)


def _check_variables(module, variables, name="params"):
    """Refuse a params tree that does not belong to ``module`` (wrong structure, shapes or kind).

    Flax would otherwise raise deep inside ``apply`` (or, for unused extra entries, not at all)."""
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise TypeError(f"{name} must be the dict {{'params': ...}} returned by {type(module).__name__}.init "
                        f"(or init_field), got {type(variables).__name__}"
                        + (f" with keys {list(variables)}" if isinstance(variables, Mapping) else ""))
    try:
        expected = _expected_params(module)
    except Exception:  # noqa: BLE001 - modules whose init needs other inputs are checked by flax
        return
    got = variables["params"]
    if not isinstance(got, Mapping):
        raise TypeError(f"{name}['params'] must be a dict of arrays, got {type(got).__name__}")
    exp_flat = flatten_dict(dict(expected))
    got_flat = flatten_dict(_plain(got))
    missing = sorted("/".join(k) for k in exp_flat.keys() - got_flat.keys())
    extra = sorted("/".join(k) for k in got_flat.keys() - exp_flat.keys())
    if missing or extra:
        raise ValueError(f"{name} do not match {type(module).__name__}: missing {missing[:6]}, unexpected "
                         f"{extra[:6]}; pass the parameters returned by init_field(field, key) for this "
                         f"field (a batch from init_field(..., num=n) needs jax.vmap)")
    for k, e in exp_flat.items():
        v = got_flat[k]
        if not isinstance(v, (jax.Array, np.ndarray, jax.core.Tracer)):
            raise TypeError(f"{name}: entry {'/'.join(k)} must be an array, got {type(v).__name__}")
        if tuple(v.shape) != tuple(e.shape):
            vs, es, cls = tuple(v.shape), tuple(e.shape), type(module).__name__
            rank = getattr(module, "rank", None)
            ranked = [(kk, tuple(got_flat[kk].shape)) for kk, ee in exp_flat.items()
                      if isinstance(rank, int) and not isinstance(rank, bool) and kk in got_flat
                      and hasattr(got_flat[kk], "shape") and len(got_flat[kk].shape) == len(ee.shape) >= 2
                      and tuple(got_flat[kk].shape[:-1]) == tuple(ee.shape[:-1]) and ee.shape[-1] == rank
                      and got_flat[kk].shape[-1] != rank]
            if len(vs) == len(es) + 1 and vs[1:] == es:
                hint = "a batch of params from init_field(..., num=n) needs jax.vmap over its leading axis"
            elif ranked:
                r = ranked[0][1][-1]
                hint = (f"rank mismatch: {'/'.join(ranked[0][0])} has rank {r} but this {cls} has rank={rank}; use "
                        f"{cls}(..., rank={r}) (or grow the params with lrjax.nn.sna.grow_rank)")
            else:
                hint = (f"the params were made for another configuration of {cls}; pass the params from "
                        f"init_field(field, key) / {cls}.init for this configuration")
            raise ValueError(f"{name} do not match {cls}: {'/'.join(k)} has shape {vs}, expected {es} ({hint})")
        if not jnp.issubdtype(v.dtype, jnp.floating):
            raise TypeError(f"{name}: entry {'/'.join(k)} must be a floating-point array, got {v.dtype}")


def _plain(tree):
    return {k: _plain(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


@functools.lru_cache(maxsize=128)
def _expected_params(module):
    example = getattr(module, "_example_inputs", None)
    args = example() if example is not None else _field_example(module)
    shapes = jax.eval_shape(lambda k: module.init(k, *args), jax.random.key(0))
    return _plain(shapes["params"])


def _field_example(field):
    x = jnp.zeros((1, 3))
    d = jnp.zeros((1, 3)).at[:, 2].set(1.0) if field.view_dependent else None
    return (x, d)


class CheckedApply:
    """Mixin for linen modules: ``apply`` first checks that ``variables`` belong to the module."""

    def apply(self, variables, *args, **kwargs):
        _check_variables(self, variables, "params")
        return super().apply(variables, *args, **kwargs)


# --------------------------------------------------------------------------- encodings
def positional_encoding(u, n_freqs: int, include_input: bool = True):
    """NeRF encoding ``[u, sin(2^k pi u), cos(2^k pi u)]_{k < n_freqs}`` over the last axis.

    Output size ``3 * (include_input + 2 n_freqs)`` for ``u: [..., 3]`` (Mildenhall et al. 2020, Eq. 4).
    ``u`` must be a floating array ``[..., 3]`` (finite when concrete); ``0 <= n_freqs <= 30``
    (``2^30 pi`` is already far beyond float32 resolution of ``sin``).
    """
    u = _array(u, "u", min_ndim=1, last=3)
    n_freqs = check_int(n_freqs, "n_freqs", low=0, high=30)
    include_input = check_bool(include_input, "include_input")
    freqs = (2.0 ** jnp.arange(n_freqs)) * jnp.pi
    ang = u[..., None, :] * freqs[:, None]                               # [..., F, 3]
    enc = [jnp.sin(ang).reshape(*u.shape[:-1], -1), jnp.cos(ang).reshape(*u.shape[:-1], -1)]
    return jnp.concatenate(([u] if include_input else []) + enc, axis=-1)


def sh_encoding(d, degree: int = 4):
    """Real spherical harmonics of unit directions ``d: [..., 3]``, bands ``0..degree-1``.

    ``degree**2`` outputs (degree in 1..4), with the constants of tiny-cuda-nn / torch-ngp.
    ``d`` is normalised to unit length first (SH are only defined on the sphere), so any non-zero
    length gives the same values; a zero-length direction is refused on concrete input.
    """
    d = _array(d, "d", min_ndim=1, last=3)
    degree = check_int(degree, "degree", low=1, high=4)
    d = _unit(d, "d")
    x, y, z = d[..., 0], d[..., 1], d[..., 2]
    out = [jnp.full_like(x, 0.28209479177387814)]
    if degree > 1:
        out += [-0.48860251190291987 * y, 0.48860251190291987 * z, -0.48860251190291987 * x]
    if degree > 2:
        xx, yy, zz = x * x, y * y, z * z
        out += [1.0925484305920792 * x * y, -1.0925484305920792 * y * z,
                0.31539156525252005 * (2 * zz - xx - yy), -1.0925484305920792 * x * z,
                0.5462742152960396 * (xx - yy)]
    if degree > 3:
        out += [0.5900435899266435 * y * (-3 * xx + yy), 2.890611442640554 * x * y * z,
                0.4570457994644658 * y * (1 - 5 * zz), 0.3731763325901154 * z * (5 * zz - 3),
                0.4570457994644658 * x * (1 - 5 * zz), 1.445305721320277 * z * (xx - yy),
                0.5900435899266435 * x * (-xx + 3 * yy)]
    return jnp.stack(out, axis=-1)


# --------------------------------------------------------------------------- interpolation
def _cell(t, n):
    """Align-corners cell index and weight of ``t`` in ``[-1, 1]`` on ``n`` vertices."""
    pos = (jnp.clip(t, -1.0, 1.0) + 1.0) * (0.5 * (n - 1))
    i0 = jnp.clip(jnp.floor(pos), 0, n - 2).astype(jnp.int32)
    return i0, pos - i0


def interp_line(line, t):
    """Linear interpolation of ``line: [C, N]`` at ``t: [...]`` in [-1, 1] -> ``[..., C]``."""
    line = _array(line, "line", ndim=2, finite=False)
    t = _array(t, "t")
    if line.shape[-1] < 2:
        raise ValueError(f"line must have >= 2 vertices on its last axis, got shape {line.shape}")
    i0, w = _cell(t, line.shape[-1])
    v = line[:, i0] * (1 - w) + line[:, i0 + 1] * w                     # [C, ...]
    return jnp.moveaxis(v, 0, -1)


def interp_plane(plane, a, b):
    """Bilinear interpolation of ``plane: [C, N, M]`` at ``(a, b)`` -> ``[..., C]``."""
    plane = _array(plane, "plane", ndim=3, finite=False)
    a, b = _array(a, "a"), _array(b, "b")
    if min(plane.shape[-2:]) < 2:
        raise ValueError(f"plane must have >= 2 vertices per side, got shape {plane.shape}")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {a.shape} and {b.shape}")
    ia, wa = _cell(a, plane.shape[-2])
    ib, wb = _cell(b, plane.shape[-1])
    v = (plane[:, ia, ib] * (1 - wa) * (1 - wb) + plane[:, ia + 1, ib] * wa * (1 - wb)
         + plane[:, ia, ib + 1] * (1 - wa) * wb + plane[:, ia + 1, ib + 1] * wa * wb)
    return jnp.moveaxis(v, 0, -1)


def interp_grid(grid, u):
    """Trilinear interpolation of ``grid: [Nx, Ny, Nz, C]`` (axis i = coordinate i) at ``u: [..., 3]``."""
    grid = _array(grid, "grid", ndim=4, finite=False)
    u = _array(u, "u", min_ndim=1, last=3)
    if min(grid.shape[:3]) < 2:
        raise ValueError(f"grid must have >= 2 vertices per side, got shape {grid.shape}")
    idx, ws = zip(*(_cell(u[..., k], grid.shape[k]) for k in range(3)))
    out = 0.0
    for cx in (0, 1):
        for cy in (0, 1):
            for cz in (0, 1):
                w = ((ws[0] if cx else 1 - ws[0]) * (ws[1] if cy else 1 - ws[1])
                     * (ws[2] if cz else 1 - ws[2]))
                out = out + grid[idx[0] + cx, idx[1] + cy, idx[2] + cz] * w[..., None]
    return out


# --------------------------------------------------------------------------- base field
class Field(nn.Module):
    """Base radiance field. Subclasses implement :meth:`encode` (``u: [..., 3] -> [..., 1+geo_dim]``).

    Attributes (shared by all fields; :func:`check_compatible` compares them between a teacher and
    a student):
      bound: half-size of the scene box ``[-bound, bound]^3``.
      geo_dim: size of the geometry feature ``g`` fed to the colour head (PVD: 15).
      view_dependent: feed ``SH(d)`` to the colour head (then ``d`` is required).
      sh_degree: SH bands for directions (PVD/Instant-NGP: 4, i.e. 16 values).
      color_hidden, color_layers: width and number of hidden layers of the colour MLP (PVD: 64, 2).
      density_clip: ``(c_min, c_max)`` of the log-density (PVD: ``(-2, 7)`` with an occupancy grid;
        without one ``exp(-2)`` fogs empty space, so the CPU default is ``(-10, 7)``).
      density_shift, density_scale: ``s_pre = clip(density_scale * s(u) + density_shift)``. Explicit
        fields (grid, CP, VM) default to ``density_scale=10``: Adam moves each grid value by about
        the learning rate per step, and log-densities must travel several units (from 0 to the
        empty-space floor or to an opaque surface), so without the scale they need hundreds of
        steps (TensoRF's ``distance_scale=25`` plays the same role).
      appearance: False builds a density-only field (see the module docstring: feature ``[s_pre]``,
        no colour head or appearance parameters, ``rgb`` a constant grey 0.5).

    Methods for ``apply``: ``__call__(x, d=None) -> FieldOutput`` (default),
    ``features(x, d=None) -> FieldFeatures`` and ``density(x) -> sigma`` (no colour head).
    """

    bound: float = 1.0
    geo_dim: int = 15
    view_dependent: bool = False
    sh_degree: int = 4
    color_hidden: int = 32
    color_layers: int = 1
    density_clip: tuple = (-10.0, 7.0)
    density_shift: float = 0.0
    density_scale: float = 1.0
    appearance: bool = True

    def __post_init__(self):
        _pos_float(self.bound, "bound")
        check_bool(self.appearance, "appearance")
        _pos_int(self.geo_dim, "geo_dim")
        check_bool(self.view_dependent, "view_dependent")
        _pos_int(self.color_hidden, "color_hidden")
        _pos_int(self.color_layers, "color_layers", 0)
        _pos_float(self.density_scale, "density_scale")
        check_float(self.density_shift, "density_shift")
        check_int(self.sh_degree, "sh_degree", low=1, high=4)
        if not isinstance(self.density_clip, (tuple, list)) or len(self.density_clip) != 2:
            raise TypeError(f"density_clip must be a pair (min, max) of numbers, got {self.density_clip!r}")
        lo = check_float(self.density_clip[0], "density_clip[0]")
        hi = check_float(self.density_clip[1], "density_clip[1]")
        if not lo < hi:
            raise ValueError(f"density_clip must be (min, max) with min < max, got {self.density_clip!r}")
        if hi > 80.0:
            raise ValueError(f"density_clip max must be <= 80 (exp(80) overflows float32 rendering), "
                             f"got {hi}")
        self.validate()
        super().__post_init__()

    def apply(self, variables, *args, **kwargs):
        """``flax`` ``apply`` after checking that ``variables`` are this field's parameters
        (structure, shapes and kind; ``TypeError``/``ValueError`` naming ``params`` otherwise).

        ``method``: None (``__call__``), ``"features"``, ``"density"`` or a callable; another string
        raises ``ValueError`` listing these."""
        method = kwargs.get("method")
        if isinstance(method, str) and method not in ("__call__", "features", "density", "encode"):
            raise ValueError(f"method must be one of None (the full output), 'features' or 'density' (or a "
                             f"callable), got {method!r}")
        if method == "encode" or getattr(method, "__name__", None) == "encode":
            raise TypeError("method='encode' cannot be applied: encode(u) is the subclass hook on normalised "
                            "coordinates; use field.apply(params, x, method='features') for the raw encoder "
                            "output (FieldFeatures.raw) or method='density' for sigma")
        _check_variables(self, variables, "params")
        return super().apply(variables, *args, **kwargs)

    def validate(self):
        """Eager checks of subclass attributes (raise ``ValueError`` naming the attribute)."""

    @property
    def feature_dim(self) -> int:
        """``1 + geo_dim`` (``1`` for a density-only field, ``appearance=False``)."""
        return 1 + self.geo_dim if self.appearance else 1

    @property
    def has_color_head(self) -> bool:
        """True when the colour comes from the MLP head on ``g`` (every field with appearance but the
        SH grid)."""
        return bool(self.appearance)

    def encode(self, u):
        """Field-specific encoder ``u in [0, 1]^3 -> [..., feature_dim]`` (abstract hook)."""
        raise TypeError(f"{type(self).__name__} must define encode(u): subclass Field with an encoder")

    def color(self, geo, d=None):
        """The colour head: ``sigmoid(MLP([g, SH(d)]))``."""
        h = geo
        if self.view_dependent:
            h = jnp.concatenate([h, sh_encoding(d, self.sh_degree)], axis=-1)
        for i in range(self.color_layers):
            h = nn.relu(nn.Dense(self.color_hidden, name=f"color_{i}")(h))
        return nn.sigmoid(nn.Dense(3, name="color_out")(h))

    def _normalise(self, x, d, need_d=True):
        if not isinstance(x, (jax.Array, np.ndarray, jax.core.Tracer)):
            raise TypeError(f"x must be an array of points [..., 3], got {type(x).__name__}; "
                            f"wrap it with jnp.asarray(...)")
        x = jnp.asarray(x)
        if x.ndim < 1 or x.shape[-1] != 3:
            raise ValueError(f"x must have shape [..., 3], got {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"x must be a floating-point array, got dtype {x.dtype}")
        if not _is_tracer(x) and x.size:
            if not bool(np.all(np.isfinite(np.asarray(x)))):
                raise ValueError("x contains NaN or Inf coordinates; points must be finite and lie in "
                                 "the box [-bound, bound]^3")
            m = float(np.max(np.abs(np.asarray(x))))
            if not m <= self.bound * (1 + 1e-5):
                raise ValueError(f"x: coordinates must lie in the box [-bound, bound]^3 with "
                                 f"bound={self.bound}; got max |x| = {m:.6g}")
        if self.view_dependent and need_d and self.appearance:
            if d is None:
                raise ValueError("d (view directions) is required: this field is view_dependent")
            d = _array(d, "d", min_ndim=1, last=3)
            try:
                d = jnp.broadcast_to(d, x.shape)
            except ValueError:
                raise ValueError(f"d of shape {d.shape} does not broadcast to x's shape {x.shape}") from None
        return jnp.clip(x / self.bound, -1.0, 1.0), d

    def __call__(self, x, d=None) -> FieldOutput:
        """``x: [..., 3]`` world points (``d: [..., 3]`` directions if view-dependent) -> :class:`FieldOutput`."""
        return self._forward(x, d, "all")

    def features(self, x, d=None) -> FieldFeatures:
        """Encoder-level outputs without the colour head: ``field.apply(params, x, method="features")``.

        ``x: [..., 3]`` world points (checked as in ``__call__``); ``d`` is accepted and ignored."""
        return self._forward(x, None, "features")

    def density(self, x, d=None):
        """``sigma: [...]`` only (no colour head): ``field.apply(params, x, method="density")``.

        ``d`` is accepted and ignored (so ``apply(params, x, d, method="density")`` works)."""
        return self._forward(x, None, "features").sigma

    @nn.compact
    def _forward(self, x, d, what):
        u, d = self._normalise(x, d, need_d=what == "all")
        f = self.encode(u)
        lo, hi = self.density_clip
        sigma_pre = jnp.clip(self.density_scale * f[..., 0] + self.density_shift, lo, hi)
        geo = f[..., 1:]
        feature = jnp.concatenate([sigma_pre[..., None], geo], axis=-1)
        if what == "features":
            return FieldFeatures(f, feature, sigma_pre, jnp.exp(sigma_pre))
        if self.appearance:
            rgb = self.color(geo, d)
        else:
            rgb = jnp.full(sigma_pre.shape + (3,), 0.5, sigma_pre.dtype)
        return FieldOutput(feature, sigma_pre, jnp.exp(sigma_pre), rgb)


# --------------------------------------------------------------------------- MLP (NeRF)
class MLPField(Field):
    """NeRF-style MLP: ``F(u) = W_out relu(... relu(W_1 PE(u)))`` (Mildenhall et al. 2020).

    PVD's NeRF teacher/student uses ``n_freqs=10`` (63-d input), 8 layers x 256 with a skip
    concatenation after layer 4; the CPU defaults are smaller (``n_freqs=6``, 4 x 64, skip at 2).
    ``skip``: index of the hidden layer whose input is re-concatenated with ``PE(u)`` (None: none).
    """

    n_freqs: int = 6
    width: int = 64
    depth: int = 4
    skip: int | None = 2

    def validate(self):
        check_int(self.n_freqs, "n_freqs", low=0, high=30)
        _pos_int(self.width, "width")
        _pos_int(self.depth, "depth")
        check_int(self.skip, "skip", allow_none=True)
        if self.skip is not None and not 0 < self.skip < self.depth:
            raise ValueError(f"skip must be None or in 1..depth-1={self.depth - 1}, got {self.skip!r}")

    def encode(self, u):
        pe = positional_encoding(u, self.n_freqs)
        h = pe
        for i in range(self.depth):
            if i == self.skip:
                h = jnp.concatenate([h, pe], axis=-1)
            h = nn.relu(nn.Dense(self.width, name=f"hidden_{i}")(h))
        return nn.Dense(self.feature_dim, name="feature_out")(h)


# --------------------------------------------------------------------------- dense voxel grid
class GridField(Field):
    """Dense voxel grid ``V: [Nx, Ny, Nz, feature_dim]``, ``F(u) = trilinear(V, u)`` (align corners).

    The explicit baseline of the family (PVD's "sparse tensors" are a Plenoxel grid; here dense).
    ``resolution``: int ``N`` (cube) or ``(Nx, Ny, Nz)``, each ``>= 2`` (vertices along x, y, z);
    ``init_scale``: std of the Gaussian initial values.
    """

    resolution: int | tuple = 32
    init_scale: float = 0.1
    density_scale: float = 10.0

    def validate(self):
        _freeze_tuple(self, "resolution")
        check_resolution(self.resolution, "resolution")
        _pos_float(self.init_scale, "init_scale")

    @property
    def grid_shape(self) -> tuple:
        """``(Nx, Ny, Nz)`` vertices per axis."""
        return check_resolution(self.resolution, "resolution")

    def encode(self, u):
        grid = self.param("grid", nn.initializers.normal(self.init_scale), self.grid_shape + (self.feature_dim,))
        return interp_grid(grid, u)


# --------------------------------------------------------------------------- utilities
def init_field(field: Field, key, num: int | None = None):
    """Parameters of ``field`` (``num`` independent fields stacked on a leading axis if given)."""
    if not isinstance(field, Field):
        raise TypeError(f"field must be an lrjax.fields Field (e.g. GridField()), got {type(field).__name__}")
    _check_key(key)
    x = jnp.zeros((1, 3))
    d = jnp.zeros((1, 3)).at[:, 2].set(1.0) if field.view_dependent else None
    if num is None:
        return field.init(key, x, d)
    _pos_int(num, "num")
    return jax.vmap(lambda k: field.init(k, x, d))(jax.random.split(key, num))


def _check_tree(params, name="params"):
    if not isinstance(params, (Mapping, list, tuple)):
        raise TypeError(f"{name} must be a pytree (dict) of arrays, got {type(params).__name__}")
    for leaf in jax.tree.leaves(params):
        if not isinstance(leaf, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
            raise TypeError(f"{name} must contain only arrays, found a {type(leaf).__name__}")
    return params


def _check_key(key, name="key"):
    """A single JAX PRNG key (``jax.random.key(s)`` or a legacy ``uint32[2]`` ``PRNGKey``)."""
    return check_key(key, name)


def count_params(params) -> int:
    """Number of scalars in a params pytree."""
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(_check_tree(params))))


def param_bytes(params) -> int:
    """Bytes of a params pytree (sum of ``size * itemsize``)."""
    return int(sum(p.size * np.dtype(p.dtype).itemsize for p in jax.tree.leaves(_check_tree(params))))


_SHARED = ("bound", "density_clip", "appearance")
_SHARED_HEAD = ("geo_dim", "view_dependent", "sh_degree")


def check_compatible(teacher: Field, student: Field):
    """Raise ``ValueError`` unless two fields share the interface PVD distils across.

    Compared: ``bound``, ``density_clip`` (both must see the same log-density range) and
    ``appearance`` (a density-only field has no colour to distil to or from) and, when
    both fields have an MLP colour head (:attr:`Field.has_color_head`), also ``geo_dim`` (so the
    features have the same size), ``view_dependent`` and ``sh_degree`` (so the head can be copied).
    """
    for f, nm in ((teacher, "teacher"), (student, "student")):
        if not isinstance(f, Field):
            raise TypeError(f"{nm} must be an lrjax.fields Field instance, got {type(f).__name__}")
    names = _SHARED + (_SHARED_HEAD if teacher.has_color_head and student.has_color_head else ())
    bad = [f"{a}: teacher {getattr(teacher, a)!r} vs student {getattr(student, a)!r}"
           for a in names if tuple(np.atleast_1d(getattr(teacher, a))) != tuple(np.atleast_1d(getattr(student, a)))]
    if bad:
        raise ValueError("mismatched field configs (teacher and student must agree): " + "; ".join(bad))
