"""Shared test models: a linen ``nn.scan`` stack of residual Dense layers, whose kernel is one
``[L, d, d]`` leaf (``blocks/fc/kernel`` by default) -- the layout lrjax's axes read as a stack."""
import flax.linen as nn


def scan_stack(features: int, *, length: int = 3, name: str = "fc", stack: str = "blocks") -> nn.Module:
    """A linen module ``x -> h`` with ``h = h + Dense(features, name=name)(h)`` scanned ``length`` times
    (params ``{stack}/{name}/kernel: [length, features, features]`` and ``.../bias``)."""

    class Block(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return h + nn.Dense(features, name=name)(h), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                           length=length)(name=stack)(x, None)[0]

    return Stack()
