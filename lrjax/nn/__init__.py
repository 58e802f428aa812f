"""Layers: separable neural architectures (SNA), low-rank attention; pretraining layers come here too.

* :mod:`lrjax.nn.sna` -- separable neural architectures (additive / quadratic / CP, bounded order)
  and the SNA radiance field :class:`~lrjax.nn.sna.SNAField`.
* :mod:`lrjax.nn.attention` -- Kimi Delta Attention and Gated DeltaNet: recurrent and chunkwise
  kernels, the decode step, the KDA layer and the 3:1 KDA:attention hybrid stack; LRAgent's shared
  low-rank value cache.
* :mod:`lrjax.nn.mixture` -- mixtures of low-rank experts: the :class:`MixtureLoRA` layer, softmax
  top-k and ReMix routers (RLOO surrogate), effective support (router collapse), FlexMoRE experts.

Radiance fields, the renderer, scenes and PVD live in :mod:`lrjax.fields`.
"""
from lrjax.nn.attention import (HybridStack, KimiDeltaAttention, SoftmaxAttention, chunk_gdn, chunk_kda, gdn_step,
                                kda_step, recurrent_gdn, recurrent_kda)
from lrjax.nn import mixture
from lrjax.nn.mixture import MixtureLoRA
from lrjax.nn.sna import KINDS, SNA, SNAField, bspline_basis, elementary_symmetric, spline_coefficients

__all__ = ["SNA", "SNAField", "bspline_basis", "elementary_symmetric", "spline_coefficients", "KINDS",
           "recurrent_kda", "chunk_kda", "kda_step", "recurrent_gdn", "chunk_gdn", "gdn_step",
           "KimiDeltaAttention", "SoftmaxAttention", "HybridStack", "mixture", "MixtureLoRA"]
