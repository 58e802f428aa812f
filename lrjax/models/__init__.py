"""Small reference models used by the experiments and tests (Flax NNX)."""
from lrjax.models.char_transformer import (ADAPTER_TARGETS, Block, CausalSelfAttention,
                                           CharTransformer, MLP, apply_fn, loss_fn, split)

__all__ = ["CharTransformer", "CausalSelfAttention", "MLP", "Block", "ADAPTER_TARGETS",
           "loss_fn", "apply_fn", "split"]
