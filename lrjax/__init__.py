"""lrjax: low-rank deep learning in JAX/Flax, as pure functions over parameter pytrees.

Submodules with heavier imports load on first use: ``lrjax.checkpoint`` (orbax),
``lrjax.interop`` (safetensors/PEFT), ``lrjax.data`` (TFDS), ``lrjax.models``, ``lrjax.es``,
``lrjax.optim``, ``lrjax.nn`` (layers: attention, SNA), ``lrjax.fields`` (radiance fields, renderer, PVD),
``lrjax.compress`` (post-training low-rank compression), ``lrjax.metrics`` (calibration metrics).
"""
import importlib

from lrjax import axes, linalg, reparam, tree
from lrjax.axes import Axes
from lrjax.reparam import (NOLA, BlockLoRA, CoDyRA, ConvDoRA, ConvLoRA, CPDoRA, CPLoRA, DoRA, HypeLoRA, LoRA,
                           LoRAGA, LoRASB, LoRAXS, PiSSA, Reparam, RSLoRA, factored)

__version__ = "0.1.0"

_LAZY = ("checkpoint", "interop", "data", "models", "es", "optim", "nn", "fields", "compress", "metrics")

__all__ = ["axes", "linalg", "tree", "reparam", "Axes", "Reparam", "LoRA", "RSLoRA", "DoRA", "PiSSA",
           "LoRAGA", "LoRASB", "LoRAXS", "NOLA", "BlockLoRA", "CoDyRA", "ConvLoRA", "CPLoRA", "ConvDoRA", "CPDoRA",
           "HypeLoRA", "factored", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return importlib.import_module(f"lrjax.{name}")
    raise AttributeError(f"module 'lrjax' has no attribute {name!r}")
