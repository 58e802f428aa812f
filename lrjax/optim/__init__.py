"""Low-rank gradient optimizers as optax transformations.

One projection protocol (:mod:`lrjax.optim.projection`) and one short file per method:

* :func:`galore` -- GaLore (Zhao et al. 2024), exact, randomized or warm-started refreshes;
* :func:`fira` -- Fira (Chen et al. 2024): GaLore + norm-scaled residual, norm-growth limiter;
* :func:`dct` -- SVD-free projection onto the best-aligned DCT columns (Modoranu et al. 2025);
* :func:`owlore` -- OwLore (Li et al. 2024): outlier-weighted layer sampling with GaLore inside;
* :func:`scale_by_adam_8bit` -- Adam with 8-bit block-wise quantized moments (an inner optimizer);
* :func:`scale_by_adam_torch` -- Adam with PyTorch's ``eps`` placement (to reproduce galore-torch
  for any ``eps``; ``optax.scale_by_adam`` agrees with it only where ``eps`` is negligible);
* optimizer-side LoRA (:mod:`lrjax.optim.lora_pro`): :func:`lora_pro` (LoRA-Pro, efficient and
  full), :func:`lora_fa` (LoRA-FA), :func:`riemannian_lora` -- they read the adapters' ``A``/``B``
  pairs and the scale of a :class:`lrjax.LoRA` config;
* :func:`layerwise_step` (:mod:`lrjax.optim.layerwise`) -- the paper's per-layer weight update: any
  per-leaf transformation (GaLore included) applied to each leaf's gradient inside the backward pass,
  so the compiled step never holds the whole model's gradient (:func:`layerwise_init`,
  :func:`layerwise_update`, :class:`LayerwiseState`);
* :func:`prox_soft_threshold` (:mod:`lrjax.optim.prox`) -- the proximal L1 step of CoDyRA's gates,
  with :func:`codyra_lambda_schedule`.

The factories ``galore``, ``fira``, ``dct``, ``owlore`` and ``lora_pro`` share their module's name:
``lrjax.optim.lora_pro`` is the function; the module's other names are imported with
``from lrjax.optim.lora_pro import lora_pro_adjust, solve_sylvester_psd`` (which reads the module).

Each wraps an inner params-free optax transformation and is itself a
``GradientTransformation``::

    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      lrjax.optim.galore(optax.scale_by_adam(), rank=128, refresh="subspace"),
                      optax.scale_by_learning_rate(1e-2))
"""
from lrjax.optim import projection, prox, quant
from lrjax.optim.dct import dct
from lrjax.optim.fira import fira
from lrjax.optim.galore import galore, scale_by_adam_torch
from lrjax.optim.owlore import OwLoreState, outlier_ratios, owlore
from lrjax.optim.projection import ProjectionState, nbytes, theoretical_state_bytes
from lrjax.optim.quant import scale_by_adam_8bit
from lrjax.optim.lora_pro import (lora_fa, lora_pro, riemannian_lora, scale_by_lora_fa, scale_by_lora_pro,
                                  scale_by_riemannian_lora)
from lrjax.optim import layerwise
from lrjax.optim.layerwise import LayerwiseState, layerwise_init, layerwise_step, layerwise_update
from lrjax.optim.prox import codyra_lambda_schedule, factor_mask, prox_soft_threshold

__all__ = ["projection", "quant", "scale_by_adam_8bit", "scale_by_adam_torch", "galore", "fira", "dct", "owlore", "outlier_ratios",
           "ProjectionState", "OwLoreState", "nbytes", "theoretical_state_bytes",
           "prox", "lora_pro", "scale_by_lora_pro", "lora_fa", "scale_by_lora_fa", "riemannian_lora",
           "scale_by_riemannian_lora", "prox_soft_threshold", "codyra_lambda_schedule", "factor_mask",
           "layerwise", "layerwise_step", "layerwise_init", "layerwise_update", "LayerwiseState"]
