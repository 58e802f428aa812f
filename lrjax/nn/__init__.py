"""Layers: separable neural architectures (SNA); attention and pretraining layers come here too.

* :mod:`lrjax.nn.sna` -- separable neural architectures (additive / quadratic / CP, bounded order)
  and the SNA radiance field :class:`~lrjax.nn.sna.SNAField`.

Radiance fields, the renderer, scenes and PVD live in :mod:`lrjax.fields`.
"""
from lrjax.nn.sna import KINDS, SNA, SNAField, bspline_basis, elementary_symmetric, spline_coefficients

__all__ = ["SNA", "SNAField", "bspline_basis", "elementary_symmetric", "spline_coefficients", "KINDS"]
