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
  :meth:`Reparam.kernel_value`): :class:`FlyLoRA` (top-k routed ranks, load-balancing state),
  :class:`NeRA` (KAN-spline branch), :class:`SeqBottleneck` (Pfeiffer adapter; NICE coupling in
  :mod:`~lrjax.reparam.bottleneck`), :class:`MoLoRA` (mixture of LoRA experts, top-k router),
  :class:`AdapterBank` (many adapters in one batch, one per example);
* task axes: :class:`MTLoRA` (shared + task-specific adapters, per-task streams);
  :class:`MarkBoard` (swappable per-bit LoRA watermark branches);
* pretraining layers on any model's kernels (their math and Flax layers are in :mod:`lrjax.nn`;
  loaded on first use): :class:`SLTrain` (``W = s B A + S`` with a fixed random support, replacing the
  kernel) and :class:`PureLowRank` (``W = s B A`` from scratch), :class:`NOBLE` (a permanent nonlinear
  low-rank branch, CosNet), :class:`HGF` (a ternary BitNet b1.58 kernel plus a gated low-rank
  correction; ``pure_ternary=True`` for plain BitNet).

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
from lrjax.reparam import bank, bottleneck, flylora, markboard, molora, mtlora, nera
from lrjax.reparam.bank import AdapterBank
from lrjax.reparam.bottleneck import SeqBottleneck
from lrjax.reparam.flylora import FlyLoRA
from lrjax.reparam.markboard import MarkBoard
from lrjax.reparam.molora import MoLoRA
from lrjax.reparam.mtlora import MTLoRA
from lrjax.reparam.nera import NeRA

import importlib as _importlib

#: names whose modules import :mod:`lrjax.nn` (Flax layers): loaded on first use
_LAZY = {"SLTrain": "sltrain", "PureLowRank": "sltrain", "NOBLE": "noble", "HGF": "hgf",
         "sltrain": "sltrain", "noble": "noble", "hgf": "hgf"}


def __getattr__(name):
    if name in _LAZY:
        mod = _importlib.import_module(f"lrjax.reparam.{_LAZY[name]}")
        return mod if name == _LAZY[name] else getattr(mod, name)
    raise AttributeError(f"module 'lrjax.reparam' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


__all__ = ["Reparam", "LowRankForm", "Adapters", "LoRA", "RSLoRA", "DoRA", "PiSSA", "factored",
           "FactoredStats", "multi", "estimate_grads", "LoRAGA", "LoRASB", "LoRAXS", "NOLA", "BlockLoRA",
           "CoDyRA", "ConvLoRA", "CPLoRA", "ConvDoRA", "CPDoRA", "HypeLoRA", "loram", "NotMergeable",
           # issue 12: activation-space adapters, mixtures, many adapters per batch
           "FlyLoRA", "NeRA", "SeqBottleneck", "MoLoRA", "MTLoRA", "AdapterBank", "MarkBoard",
           "flylora", "nera", "bottleneck", "molora", "mtlora", "bank", "markboard",
           # issue 14: pretraining layers as reparameterizations (lazy)
           "SLTrain", "PureLowRank", "NOBLE", "HGF", "sltrain", "noble", "hgf"]
