"""lrjax: low-rank deep learning in JAX/Flax, as pure functions over parameter pytrees."""
from lrjax import axes, linalg, tree
from lrjax.axes import Axes
from lrjax.reparam import DoRA, LoRA, PiSSA, Reparam, RSLoRA, factored

__version__ = "0.1.0"

__all__ = ["axes", "linalg", "tree", "Axes", "Reparam", "LoRA", "RSLoRA", "DoRA", "PiSSA", "factored"]
