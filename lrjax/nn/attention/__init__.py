"""Low-rank attention in pure JAX: Kimi Delta Attention (KDA) and Gated DeltaNet (GDN).

* :mod:`~lrjax.nn.attention.naive` -- the recurrent form (``lax.scan``) and the one-token decode
  step: :func:`recurrent_kda`, :func:`kda_step`, :func:`recurrent_gdn`, :func:`gdn_step`.
* :mod:`~lrjax.nn.attention.chunk` -- the chunkwise-parallel form (UT transform, triangular solve,
  float32-safe under strong decay): :func:`chunk_kda`, :func:`chunk_gdn`.
* :mod:`~lrjax.nn.attention.kda` -- the layers (Flax NNX): :class:`KimiDeltaAttention` (KDA or,
  with ``gate='gdn'``, Gated DeltaNet), :class:`SoftmaxAttention`, :class:`HybridStack` (3:1).
* :mod:`~lrjax.nn.attention.lragent` -- LRAgent: several LoRA agents share one base KV cache plus a
  low-rank value cache ``L = s X A_v`` (shared ``A_v``); attention computes ``P V_base + (P L) B_v``
  without forming ``L B_v``: :func:`lragent_prefill`, :func:`lragent_decode_step`, :class:`LRCache`.
* :mod:`~lrjax.nn.attention.kvcache` -- Palu-style low-rank KV caches: per head-group whitened (or plain)
  SVD of ``W_k``, ``W_v`` (:func:`compress_kv`), a latent cache and reconstruction at attention time
  (:func:`latent_prefill`, :func:`latent_decode_step`), rank allocation to a target cache ratio.
* :mod:`~lrjax.nn.attention.lama` -- LAMA: rank-m bilinear scoring of (GRU) states against a global
  context vector (:class:`LAMA`), and the structured self-attention baseline (:class:`StructuredSelfAttention`).
* :mod:`~lrjax.nn.attention.drrl` -- DR-RL: attention on truncated-SVD Q/K at a per-segment rank chosen by
  a policy trained with REINFORCE on the paper's reward (:func:`lowrank_attention`, :func:`drrl_reward`,
  :func:`reinforce_loss`; the perturbation identity and bounds in the submodule).
* :mod:`~lrjax.nn.attention.mla` -- multi-head latent attention (DeepSeek-V2) trained from scratch:
  :class:`MultiHeadLatentAttention`, a cache of width ``d_c`` per token.

Shapes follow fla (flash-linear-attention): ``q, k: [B, T, H, K]``, ``v: [B, T, HV, V]``,
``g: [B, T, HV, K]`` (KDA) or ``[B, T, HV]`` (GDN), ``beta: [B, T, HV]``, states ``[B, HV, K, V]``.
"""
from lrjax.nn.attention.chunk import DEFAULT_CHUNK, chunk_gdn, chunk_kda
from lrjax.nn.attention.kda import GATES, MODES, HybridStack, KimiDeltaAttention, ShortConvolution, SoftmaxAttention
from lrjax.nn.attention.naive import gdn_step, kda_step, recurrent_gdn, recurrent_kda
from lrjax.nn.attention import drrl, kvcache, lama, lragent, mla
from lrjax.nn.attention.drrl import drrl_reward, lowrank_attention, reinforce_loss
from lrjax.nn.attention.lama import LAMA, StructuredSelfAttention, lama_attention, lama_bilinear
from lrjax.nn.attention.kvcache import (KVPlan, LatentCache, LatentKV, compress_kv, dense_self_attention,
                                        init_latent_cache, latent_decode_step, latent_kv, latent_prefill,
                                        latent_self_attention)
from lrjax.nn.attention.mla import (MLACache, MultiHeadLatentAttention, init_mla_cache, init_mla_params, mla_attend,
                                    mla_decode_step, mla_forward, mla_prefill)
from lrjax.nn.attention.lragent import (LRCache, cache_nbytes, init_lrcache, lragent_append, lragent_attention,
                                        lragent_cache, lragent_decode_step, lragent_prefill, materialize_values)

__all__ = ["recurrent_kda", "kda_step", "recurrent_gdn", "gdn_step", "chunk_kda", "chunk_gdn",
           "DEFAULT_CHUNK", "KimiDeltaAttention", "SoftmaxAttention", "HybridStack", "ShortConvolution",
           "GATES", "MODES", "lragent", "LRCache", "init_lrcache", "lragent_cache", "lragent_append",
           "lragent_attention", "lragent_prefill", "lragent_decode_step", "materialize_values", "cache_nbytes",
           "kvcache", "KVPlan", "LatentKV", "LatentCache", "compress_kv", "latent_kv", "latent_self_attention",
           "dense_self_attention", "init_latent_cache", "latent_prefill", "latent_decode_step",
           "mla", "MultiHeadLatentAttention", "MLACache", "init_mla_params", "init_mla_cache", "mla_forward",
           "mla_attend", "mla_prefill", "mla_decode_step",
           "lama", "LAMA", "StructuredSelfAttention", "lama_attention", "lama_bilinear",
           "drrl", "lowrank_attention", "drrl_reward", "reinforce_loss"]
