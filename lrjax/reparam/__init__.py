"""Low-rank reparameterizations of parameter pytrees (see :mod:`lrjax.reparam.base`).

One protocol (:class:`Reparam`: ``init``, ``materialize``, ``merge``, ``unmerge``, ``split``/``join``)
and one short file per variant:

* :class:`LoRA`, :class:`RSLoRA` (``lora.py``), :class:`DoRA`, :class:`PiSSA`;
* data-aware inits: :class:`LoRAGA` (``lora_ga.py``, official and PEFT semantics),
  :class:`LoRASB` and :class:`LoRAXS` (``lora_sb.py``: frozen ``A``, ``B`` around a trainable core),
  fed by :func:`estimate_grads`;
* seed-regenerated and shared factors: :class:`NOLA`, :class:`BlockLoRA`;
* gated ranks: :class:`CoDyRA` (with :func:`lrjax.optim.prox.prox_soft_threshold`);
* conv kernels (Flax HWIO): :class:`ConvLoRA`, :class:`CPLoRA`, :class:`ConvDoRA`, :class:`CPDoRA`
  (``conv.py``; PEFT's conv convention is plain :class:`LoRA`/:class:`DoRA`);
* generated factors: :class:`HypeLoRA` (a hypernetwork emitting LoRA adapters);
* :mod:`lrjax.reparam.loram`: LoRAM's prune -> train small -> recover into full shapes;
* :mod:`lrjax.reparam.multi`: several named adapters on one base;
* activation-space adapters (``activation_space = True``: the layer computes ``x W + branch(x)``,
  input-dependent, so ``merge`` raises :class:`NotMergeable`): run through :func:`factored`, whose
  jaxpr interpreter lives in :mod:`lrjax.interpreter` (the extension point
  :meth:`Reparam.kernel_value`).

Optimizer-side LoRA variants (LoRA-Pro, LoRA-FA, Riemannian) are optax transformations in
:mod:`lrjax.optim.lora_pro`.
"""
from lrjax.reparam.base import Adapters, LowRankForm, Reparam
from lrjax.reparam.dora import DoRA
from lrjax.reparam import multi
from lrjax.reparam.factored import FactoredStats, factored
from lrjax.reparam.grads import estimate_grads
from lrjax.reparam.lora import LoRA, RSLoRA
from lrjax.reparam.pissa import PiSSA
from lrjax.reparam.lora_ga import LoRAGA
from lrjax.reparam.lora_sb import LoRASB, LoRAXS
from lrjax.reparam.nola import NOLA
from lrjax.reparam.block_lora import BlockLoRA
from lrjax.reparam.codyra import CoDyRA
from lrjax.reparam.conv import ConvLoRA, CPLoRA, ConvDoRA, CPDoRA
from lrjax.reparam.hypelora import HypeLoRA
from lrjax.reparam import loram
from lrjax.interpreter import NotMergeable

__all__ = ["Reparam", "LowRankForm", "Adapters", "LoRA", "RSLoRA", "DoRA", "PiSSA", "factored",
           "FactoredStats", "multi", "estimate_grads", "LoRAGA", "LoRASB", "LoRAXS", "NOLA", "BlockLoRA",
           "CoDyRA", "ConvLoRA", "CPLoRA", "ConvDoRA", "CPDoRA", "HypeLoRA", "loram", "NotMergeable"]
