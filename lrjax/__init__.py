"""lrjax: low-rank deep learning in JAX/Flax, as pure functions over parameter pytrees.

Submodules with heavier imports load on first use: ``lrjax.checkpoint`` (orbax),
``lrjax.interop`` (safetensors/PEFT), ``lrjax.data`` (TFDS), ``lrjax.models``, ``lrjax.es``,
``lrjax.optim``, ``lrjax.nn`` (layers: attention, SNA), ``lrjax.fields`` (radiance fields, renderer, PVD),
``lrjax.compress`` (post-training low-rank compression), ``lrjax.metrics`` (calibration metrics),
``lrjax.losses`` (training losses such as DSCLoRA's spatial-affinity distillation).
``lrjax.interpreter`` is the jaxpr interpreter behind :func:`lrjax.factored` and ``lrjax.es``.
"""
import importlib

from lrjax import axes, interpreter, linalg, reparam, tree
from lrjax.axes import Axes
from lrjax.reparam import (NOLA, AdapterBank, BlockLoRA, CoDyRA, ConvDoRA, ConvLoRA, CPDoRA, CPLoRA, DoRA, FlyLoRA,
                           HypeLoRA, LoRA, LoRAGA, LoRASB, LoRAXS, MarkBoard, MoLoRA, MTLoRA, NeRA, PiSSA, Reparam,
                           RSLoRA, SeqBottleneck, factored)

__version__ = "0.1.0"

_LAZY = ("checkpoint", "interop", "data", "models", "es", "optim", "nn", "fields", "compress", "metrics", "losses")

__all__ = ["axes", "linalg", "tree", "reparam", "Axes", "Reparam", "LoRA", "RSLoRA", "DoRA", "PiSSA",
           "LoRAGA", "LoRASB", "LoRAXS", "NOLA", "BlockLoRA", "CoDyRA", "ConvLoRA", "CPLoRA", "ConvDoRA", "CPDoRA",
           "HypeLoRA", "factored", "FlyLoRA", "NeRA", "SeqBottleneck", "MoLoRA", "MTLoRA", "AdapterBank", "MarkBoard",
           "interpreter", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return importlib.import_module(f"lrjax.{name}")
    raise AttributeError(f"module 'lrjax' has no attribute {name!r}")
