"""EGGROLL: low-rank evolution strategies at population scale (Sarkar et al. 2025,
"Evolution Strategies at the Hyperscale").

* :class:`Eggroll` -- the estimator: ``init`` / ``estimate`` (or ``fitness`` + ``tell``) for any
  params pytree and fitness function; sharded over a mesh axis with ``jax.shard_map``. For
  fitness computed outside JAX: ``ask`` (a chunk of members' perturbed params or noise, batched)
  and ``tell`` (the fitness vector). The returned gradient is a descent gradient of the smoothed
  loss (``-fitness`` when maximizing), for ``params - lr * grad`` (optax).
* :func:`perturbed_call` -- run an unmodified model with one member's perturbation, low-rank
  kernels factored (``x W + s (x A) B^T``); vmap it over members.
* :func:`lowrank_dense`, :func:`lowrank_einsum`, :class:`PerturbedLinear` -- explicit layers for
  your own Flax modules.
* :class:`IntEggroll` (:mod:`lrjax.es.integer`) -- integer-only EGGROLL: int8 weights and
  activations, int32 accumulation, integer low-rank noise and a thresholded sign update
  (:func:`int_dense`, :func:`int_embed`, :func:`quantize` / :func:`dequantize`).
* :mod:`lrjax.es.noise` (counter-based noise), :mod:`lrjax.es.shaping` (fitness shaping and the
  non-finite rule).
"""
from lrjax.es import integer, noise, shaping
from lrjax.es.eggroll import Eggroll, EggrollState, EstimateInfo
from lrjax.es.integer import IntEggroll, IntLowRankNoise, IntStepInfo, dequantize, int_dense, int_embed, quantize
from lrjax.es.noise import LowRankNoise
from lrjax.es.perturbed import FactoredStats, PerturbedLinear, lowrank_dense, lowrank_einsum, perturbed_call
from lrjax.es.shaping import shape_fitness

__all__ = ["Eggroll", "EggrollState", "EstimateInfo", "LowRankNoise", "perturbed_call", "lowrank_dense",
           "lowrank_einsum", "PerturbedLinear", "FactoredStats", "shape_fitness", "noise", "shaping",
           "integer", "IntEggroll", "IntLowRankNoise", "IntStepInfo", "int_dense", "int_embed", "quantize", "dequantize"]
