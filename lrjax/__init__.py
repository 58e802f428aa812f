"""lrjax: low-rank deep learning in JAX/Flax, as pure functions over parameter pytrees.

Submodules with heavier imports load on first use: ``lrjax.checkpoint`` (orbax),
``lrjax.interop`` (safetensors/PEFT), ``lrjax.data`` (TFDS), ``lrjax.models``, ``lrjax.es``,
``lrjax.optim``, ``lrjax.nn`` (layers: attention, SNA), ``lrjax.fields`` (radiance fields, renderer, PVD),
``lrjax.compress`` (post-training low-rank compression), ``lrjax.metrics`` (calibration metrics),
``lrjax.losses`` (training losses such as DSCLoRA's spatial-affinity distillation).
``lrjax.search`` (FSAP ``arch_hash``, compiled peak memory, evolutionary search under a memory
budget), ``lrjax.sharding`` (FSDP shardings of params and optimizer state over a device mesh).
``lrjax.interpreter`` is the jaxpr interpreter behind :func:`lrjax.factored` and ``lrjax.es``.
The pretraining reparameterizations ``SLTrain``, ``PureLowRank``, ``NOBLE`` and ``HGF`` load with
:mod:`lrjax.nn` on first use.
"""
import importlib

from lrjax import axes, interpreter, linalg, reparam, tree
from lrjax.axes import Axes
from lrjax.reparam import (NOLA, AdapterBank, BlockLoRA, CoDyRA, ConvDoRA, ConvLoRA, CPDoRA, CPLoRA, DoRA, FlyLoRA,
                           HypeLoRA, LoRA, LoRAGA, LoRASB, LoRAXS, MarkBoard, MoLoRA, MTLoRA, NeRA, PiSSA, Reparam,
                           RSLoRA, SeqBottleneck, factored)

__version__ = "0.1.0"

_LAZY = ("checkpoint", "interop", "data", "models", "es", "optim", "nn", "fields", "compress", "metrics", "losses",
         "search", "sharding")
_LAZY_REPARAM = ("SLTrain", "PureLowRank", "NOBLE", "HGF")

__all__ = ["axes", "linalg", "tree", "reparam", "Axes", "Reparam", "LoRA", "RSLoRA", "DoRA", "PiSSA",
           "LoRAGA", "LoRASB", "LoRAXS", "NOLA", "BlockLoRA", "CoDyRA", "ConvLoRA", "CPLoRA", "ConvDoRA", "CPDoRA",
           "HypeLoRA", "factored", "FlyLoRA", "NeRA", "SeqBottleneck", "MoLoRA", "MTLoRA", "AdapterBank", "MarkBoard",
           "interpreter", *_LAZY_REPARAM, *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return importlib.import_module(f"lrjax.{name}")
    if name in _LAZY_REPARAM:
        return getattr(reparam, name)
    raise AttributeError(f"module 'lrjax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
