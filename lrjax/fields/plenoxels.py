"""Plenoxel-style spherical-harmonic voxel grid (Fridovich-Keil et al. 2022, *Plenoxels: Radiance
Fields without Neural Networks*, CVPR) as a :class:`~lrjax.fields.fields.Field`.

A dense grid ``V: [Nx, Ny, Nz, 1 + 3K]`` (``resolution``: an int ``N`` or ``(Nx, Ny, Nz)``) stores, per vertex, a log-density and ``K = sh_degree^2``
spherical-harmonic coefficients per colour channel (``sh_degree`` counts SH *bands*, as in
:func:`~lrjax.fields.fields.sh_encoding`: 1, 2 or 3 bands = SH degree 0, 1 or 2; Plenoxels uses
degree 2, i.e. 9 coefficients). Both are trilinearly interpolated (align corners) and there is no
network::

    [s(u), c(u)] = trilinear(V, u)                      c: [3, K]
    s_pre        = clip(density_scale s(u) + density_shift, c_min, c_max)
    rgb          = sigmoid( color_scale sum_k c_{., k}(u) Y_k(d) )     (Y_k: real SH of direction d)

Plenoxels uses ReLU density and an unbounded colour, with a sparse grid and coarse-to-fine
upsampling; ``color_scale=10`` plays the role of ``density_scale`` for the colour logits (Adam
moves each grid value by about the learning rate per step, and a saturated colour needs a logit of
several units, i.e. ``c_0 = logit / Y_0`` of ~10 at ``Y_0 = 0.28``). Here density and colour go through the activations every field of this package shares
(``exp`` of the clipped log-density, sigmoid colour) so that PVD can distil to and from it, as the
official PVD code does for its Plenoxel "tensors" model (``rgb = sigmoid(sum SH * coef)``). The
grid can be refined with :func:`~lrjax.fields.tensorf.upsample` and regularised with
:func:`~lrjax.fields.tensorf.tv_loss`.

With ``appearance=False`` the grid holds the log-density only (``[Nx, Ny, Nz, 1]``, no SH
coefficients; ``view_dependent`` is then not required) and the colour is the documented grey 0.5
of :class:`~lrjax.fields.fields.Field`.

The field's *feature* is ``[s_pre, c]`` (``1 + 3K`` values) and the colour is not computed by an
MLP head, so ``geo_dim`` is unused and :attr:`has_color_head` is False: PVD then distils only the
density channel of the feature (the official code skips the feature stage for Plenoxel pairs) and
:func:`~lrjax.fields.fields.check_compatible` no longer requires ``geo_dim`` / ``sh_degree`` to agree.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from lrjax.fields.fields import GridField, _pos_float, sh_encoding

__all__ = ["SHGridField"]


class SHGridField(GridField):
    """Dense voxel grid of log-density + SH colour coefficients (see module docstring).

    resolution: vertices per side, an int ``N`` (a cube) or ``(Nx, Ny, Nz)``; sh_degree: SH bands (1..3, default 3 = 9 coefficients per
    channel); color_scale: multiplier of the SH sum (see module docstring); init_scale: std of the
    Gaussian initial grid values; view_dependent must be True (unless ``appearance=False``).
    """

    view_dependent: bool = True
    sh_degree: int = 3
    color_scale: float = 10.0

    def validate(self):
        super().validate()
        _pos_float(self.color_scale, "color_scale")
        if self.sh_degree > 3:
            raise ValueError(f"sh_degree must be 1, 2 or 3 SH bands (SH degree <= 2, Plenoxels: 3 bands "
                             f"= 9 coefficients) for SHGridField, got {self.sh_degree!r}")
        if not self.view_dependent and self.appearance:
            raise ValueError("view_dependent must be True for SHGridField: its colour is sum_k c_k Y_k(d) "
                             "of the view direction d (use GridField for a view-independent grid)")

    @property
    def has_color_head(self) -> bool:
        return False

    @property
    def num_coeffs(self) -> int:
        return self.sh_degree ** 2

    @property
    def feature_dim(self) -> int:
        return 1 + 3 * self.num_coeffs if self.appearance else 1

    def color(self, geo, d=None):
        coef = geo.reshape(*geo.shape[:-1], 3, self.num_coeffs)
        basis = sh_encoding(d, self.sh_degree)[..., None, :]                  # [..., 1, K]
        return nn.sigmoid(self.color_scale * jnp.sum(coef * basis, axis=-1))
