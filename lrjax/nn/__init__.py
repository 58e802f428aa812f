"""Layers: separable neural architectures (SNA), low-rank attention, mixtures, and the low-rank layers for
pretraining and search (issue 14), each with its math as pure functions beside the Flax NNX module.

* :mod:`lrjax.nn.sna` -- separable neural architectures (additive / quadratic / CP, bounded order)
  and the SNA radiance field :class:`~lrjax.nn.sna.SNAField`; fitting to samples by ALS / Adam with a
  rank schedule (:func:`fit_als`, :func:`fit_adam`, :func:`fit_rank_schedule`, :func:`grow_rank`).
* :mod:`lrjax.nn.attention` -- Kimi Delta Attention and Gated DeltaNet: recurrent and chunkwise
  kernels, the decode step, the KDA layer and the 3:1 KDA:attention hybrid stack; LRAgent's shared
  low-rank value cache.
* :mod:`lrjax.nn.mixture` -- mixtures of low-rank experts: the :class:`MixtureLoRA` layer, softmax
  top-k and ReMix routers (RLOO surrogate), effective support (router collapse), FlexMoRE experts.
* :mod:`lrjax.nn.sltrain` -- SLTrain ``W = (alpha/r) B A + S`` (fixed random support, ``W`` rebuilt in
  ``jax.checkpoint``): :class:`SLTrainLinear`, the pure low-rank arm :class:`LowRankLinear`, parameter
  counts (the paper's LLaMA table). On any model: :class:`lrjax.reparam.SLTrain`.
* :mod:`lrjax.nn.noble` -- NOBLE ``x W + sigma(x W_down) W_up`` with CosNet / ReLU / GELU branches:
  :class:`NOBLELinear`. On any model: :class:`lrjax.reparam.NOBLE`.
* :mod:`lrjax.nn.hgf` -- BitNet b1.58 quantizers, the STE, :class:`BitLinear`, HGF's gated low-rank
  correction :class:`HGFLinear`, the 2-bit packed inference form. On any model: :class:`lrjax.reparam.HGF`.
* :mod:`lrjax.nn.maestro` -- Maestro's ordered-dropout factorized layers (:class:`MaestroLinear`),
  samplers, hierarchical group lasso, importance and progressive shrinking.
* :mod:`lrjax.nn.mcuformer` -- MCUFormer's supernet of factorized layers (nested slicing, subnets,
  compiled memory); the search itself is :mod:`lrjax.search`.
* :mod:`lrjax.nn.dlrmamba` -- DLRMamba: the selective scan, SS2D's four scan orders, low-rank
  projections and state distillation (:class:`LowRankSS2D`, :class:`DLRMambaClassifier`).

Radiance fields, the renderer, scenes and PVD live in :mod:`lrjax.fields`.
"""
from lrjax.nn.attention import (HybridStack, KimiDeltaAttention, SoftmaxAttention, chunk_gdn, chunk_kda, gdn_step,
                                kda_step, recurrent_gdn, recurrent_kda)
from lrjax.nn import mixture
from lrjax.nn.mixture import MixtureLoRA
from lrjax.nn import dlrmamba, hgf, maestro, mcuformer, noble, sltrain
from lrjax.nn.dlrmamba import DLRMambaClassifier, LowRankSS2D
from lrjax.nn.hgf import BitLinear, HGFLinear
from lrjax.nn.maestro import MaestroLinear
from lrjax.nn.noble import NOBLELinear
from lrjax.nn.sltrain import LowRankLinear, SLTrainLinear
from lrjax.nn.sna import (KINDS, SNA, SNAField, bspline_basis, elementary_symmetric, fit_adam, fit_als,
                          fit_rank_schedule, grow_rank, spline_coefficients)

__all__ = ["SNA", "SNAField", "bspline_basis", "elementary_symmetric", "spline_coefficients", "KINDS",
           "fit_als", "fit_adam", "fit_rank_schedule", "grow_rank",
           "recurrent_kda", "chunk_kda", "kda_step", "recurrent_gdn", "chunk_gdn", "gdn_step",
           "KimiDeltaAttention", "SoftmaxAttention", "HybridStack", "mixture", "MixtureLoRA",
           # issue 14: pretraining and search layers
           "sltrain", "noble", "hgf", "maestro", "mcuformer", "dlrmamba", "SLTrainLinear", "LowRankLinear",
           "NOBLELinear", "BitLinear", "HGFLinear", "MaestroLinear", "LowRankSS2D", "DLRMambaClassifier"]
