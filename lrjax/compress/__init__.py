"""Post-training low-rank compression (``lrjax.compress``): one SVD toolkit with rank rules
(:mod:`lrjax.compress.core`) and the methods built on it: WeLore (:mod:`~lrjax.compress.welore`),
PELA (:mod:`~lrjax.compress.pela`),
DSFormer (:mod:`~lrjax.compress.dsformer`) and LR^2VQ (:mod:`~lrjax.compress.lr2vq`)."""
from lrjax.compress.core import (METHODS, Compressed, LayerReport, LowRankParams, Report, collect_activations,
                                 compress, energy_keep, factorize, pela_rank, tree_bytes, welore_keep, welore_tau,
                                 whitened_svd)
from lrjax.compress import dsformer, lr2vq, pela, welore

__all__ = ["METHODS", "Compressed", "LayerReport", "LowRankParams", "Report", "collect_activations", "compress",
           "energy_keep", "factorize", "pela_rank", "tree_bytes", "welore_keep", "welore_tau", "whitened_svd",
           "welore", "pela", "dsformer", "lr2vq"]
