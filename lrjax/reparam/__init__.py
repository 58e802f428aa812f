"""Low-rank reparameterizations of parameter pytrees (see :mod:`lrjax.reparam.base`)."""
from lrjax.reparam.base import Adapters, LowRankForm, Reparam
from lrjax.reparam.dora import DoRA
from lrjax.reparam import multi
from lrjax.reparam.factored import FactoredStats, factored
from lrjax.reparam.grads import estimate_grads
from lrjax.reparam.lora import LoRA, RSLoRA
from lrjax.reparam.pissa import PiSSA

__all__ = ["Reparam", "LowRankForm", "Adapters", "LoRA", "RSLoRA", "DoRA", "PiSSA", "factored",
           "FactoredStats", "multi", "estimate_grads"]
