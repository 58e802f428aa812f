"""Low-rank attention in pure JAX: Kimi Delta Attention (KDA) and Gated DeltaNet (GDN).

* :mod:`~lrjax.nn.attention.naive` -- the recurrent form (``lax.scan``) and the one-token decode
  step: :func:`recurrent_kda`, :func:`kda_step`, :func:`recurrent_gdn`, :func:`gdn_step`.
* :mod:`~lrjax.nn.attention.chunk` -- the chunkwise-parallel form (UT transform, triangular solve,
  float32-safe under strong decay): :func:`chunk_kda`, :func:`chunk_gdn`.
* :mod:`~lrjax.nn.attention.kda` -- the layers (Flax NNX): :class:`KimiDeltaAttention` (KDA or,
  with ``gate='gdn'``, Gated DeltaNet), :class:`SoftmaxAttention`, :class:`HybridStack` (3:1).

Shapes follow fla (flash-linear-attention): ``q, k: [B, T, H, K]``, ``v: [B, T, HV, V]``,
``g: [B, T, HV, K]`` (KDA) or ``[B, T, HV]`` (GDN), ``beta: [B, T, HV]``, states ``[B, HV, K, V]``.
"""
from lrjax.nn.attention.chunk import DEFAULT_CHUNK, chunk_gdn, chunk_kda
from lrjax.nn.attention.kda import GATES, MODES, HybridStack, KimiDeltaAttention, ShortConvolution, SoftmaxAttention
from lrjax.nn.attention.naive import gdn_step, kda_step, recurrent_gdn, recurrent_kda

__all__ = ["recurrent_kda", "kda_step", "recurrent_gdn", "gdn_step", "chunk_kda", "chunk_gdn",
           "DEFAULT_CHUNK", "KimiDeltaAttention", "SoftmaxAttention", "HybridStack", "ShortConvolution",
           "GATES", "MODES"]
